"""The network systems the evaluate stage scores and the bundle serves, built from the trained models.

``softmax`` (the pre-trained trunk), ``base`` (the triplet model), ``head`` (base + the tdnn head) and ``fused``
(base and head embeddings side by side, weighted so the cosine is ``w cos_base + (1 - w) cos_head``). The base and
head embeddings come from ONE trunk pass (voiceprint.models.base_and_head), and the fused model a bundle serves is
one trunk feeding both parts, unless the head was trained with a trunk of its own.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from voiceprint.models.trained_head import TrainedHead

NETWORK_SYSTEMS = ("softmax", "base", "head", "fused")


class Systems:
    """``softmax`` and ``base``: Keras embedding models; ``head``: the tdnn_head stage's output; ``base_weight``:
    the fused system's weight of the base score (None: no fused system)."""

    def __init__(self, softmax, base, head: TrainedHead, base_weight: float | None):
        self.softmax, self.base, self.head, self.base_weight = softmax, base, head, base_weight
        self.names = tuple(n for n in NETWORK_SYSTEMS if n != "fused" or base_weight is not None)

    def model(self, name: str):
        """One Keras model (features -> that system's embedding) for the bundle."""
        if name == "softmax":
            return self.softmax
        if name == "base":
            return self.base
        if name == "head":
            return self.head.system(self.base)
        if name == "fused" and self.base_weight is not None:
            return self.head.fused(self.base, self.base_weight)
        raise ValueError(f"no system {name!r}; valid: {', '.join(self.names)}")

    def embed(self, embed: Callable, names=None) -> dict[str, np.ndarray]:
        """``{name: embeddings}`` for ``names`` (default: all), where ``embed(model, desc)`` embeds a set of
        utterances with one Keras model. Base and head share one pass of the trunk; ``fused`` is their weighted
        concatenation (voiceprint.evaluation.scoring.fuse)."""
        from voiceprint.evaluation.scoring import fuse
        from voiceprint.models import split_base_and_head

        names = self.names if names is None else tuple(names)
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ValueError(f"no system {unknown[0]!r}; valid: {', '.join(self.names)}")
        out = {}
        if "softmax" in names:
            out["softmax"] = embed(self.softmax, "softmax")
        if {"head", "fused"} & set(names):
            both = embed(self.head.with_base(self.base), "base+head")
            out["base"], out["head"] = split_base_and_head(both, int(self.base.output_shape[-1]))
        elif "base" in names:
            out["base"] = embed(self.base, "base")
        if "fused" in names:
            out["fused"] = fuse(out["base"], out["head"], "score", self.base_weight)
        return {name: out[name] for name in names}
