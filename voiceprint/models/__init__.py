"""Models by name: the ResCNN trunk and heads on top of it.

Adding a head is one file with a builder plus one entry in ``HEADS``: (builder, the base-model tap it reads).
"""
import inspect

from voiceprint.models.heads import TAPS, attach_head, dense_head, fuse_models, tap_model
from voiceprint.models.rescnn import CLIP_VALUE, build_rescnn
from voiceprint.models.tdnn import X_VECTOR_CONTEXTS, StatisticsPooling, context_to_conv, frame_tdnn

HEADS = {"dense": (dense_head, "embedding"), "frame": (frame_tdnn, "frames")}


def head_tap(kind: str) -> str:
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; valid: {', '.join(sorted(HEADS))}")
    return HEADS[kind][1]


def build_head(kind: str, **kwargs):
    """Build head ``kind`` from the settings its builder takes (e.g. ``contexts`` only reaches the frame TDNN)."""
    head_tap(kind)
    builder = HEADS[kind][0]
    accepted = inspect.signature(builder).parameters
    return builder(**{k: v for k, v in kwargs.items() if k in accepted})


__all__ = ["CLIP_VALUE", "HEADS", "TAPS", "X_VECTOR_CONTEXTS", "StatisticsPooling", "attach_head", "build_head",
           "build_rescnn", "context_to_conv", "dense_head", "frame_tdnn", "fuse_models", "head_tap", "tap_model"]
