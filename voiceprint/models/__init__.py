"""Models by name: the ResCNN trunk and heads on top of it.

Adding a head is one file with a builder plus one entry in ``HEADS``.
"""
from voiceprint.models.heads import attach_head, dense_head
from voiceprint.models.rescnn import CLIP_VALUE, build_rescnn

HEADS = {"dense": dense_head}


def build_head(kind: str, **kwargs):
    try:
        builder = HEADS[kind]
    except KeyError:
        raise ValueError(f"unknown head {kind!r}; valid: {', '.join(sorted(HEADS))}") from None
    return builder(**kwargs)


__all__ = ["HEADS", "CLIP_VALUE", "attach_head", "build_head", "build_rescnn", "dense_head"]
