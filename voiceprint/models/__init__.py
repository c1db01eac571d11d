"""Models by name: the ResCNN trunk and heads on top of it.

Adding a head is one file with a builder plus its registration: ``register_head(name, builder, tap=...)`` here
(the tap is the part of the base model it reads). The tdnn_head stage offers every registered head; settings
its builder takes beyond the common ones come from ``tdnn.head_args``.
"""
import inspect

from voiceprint.models.heads import (TAPS, attach_head, base_and_head, dense_head, fuse_models, split_base_and_head,
                                     tap_model)
from voiceprint.models.rescnn import CLIP_VALUE, build_rescnn
from voiceprint.models.tdnn import X_VECTOR_CONTEXTS, StatisticsPooling, context_to_conv, frame_tdnn

HEADS = {}      # name -> (builder, the base-model tap it reads)


def register_head(name: str, builder, *, tap: str):
    """Register head ``name``: ``builder(*, input_dim, ...)`` returns a Keras model from the tap's output to the
    (not normalised) head embedding."""
    if name in HEADS:
        raise ValueError(f"head {name!r} is registered already")
    if tap not in TAPS:
        raise ValueError(f"head {name!r}: unknown tap {tap!r}; valid: {', '.join(TAPS)}")
    HEADS[name] = (builder, tap)
    return builder


register_head("dense", dense_head, tap="embedding")
register_head("frame", frame_tdnn, tap="frames")


def head_tap(kind: str) -> str:
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; valid: {', '.join(sorted(HEADS))}")
    return HEADS[kind][1]


def head_settings(kind: str) -> list[str]:
    """The names of the settings head ``kind``'s builder takes."""
    head_tap(kind)
    return list(inspect.signature(HEADS[kind][0]).parameters)


def build_head(kind: str, **kwargs):
    """Build head ``kind`` from the settings its builder takes (e.g. ``contexts`` only reaches the frame TDNN)."""
    accepted = head_settings(kind)
    return HEADS[kind][0](**{k: v for k, v in kwargs.items() if k in accepted})


__all__ = ["CLIP_VALUE", "HEADS", "TAPS", "X_VECTOR_CONTEXTS", "StatisticsPooling", "attach_head", "base_and_head",
           "build_head",
           "build_rescnn", "context_to_conv", "dense_head", "frame_tdnn", "fuse_models", "head_settings", "head_tap",
           "register_head", "split_base_and_head", "tap_model"]
