"""How a run's features are made: one :class:`FeatureSettings`, from the params to the served model.

The mfcc stage builds it from its params contract (:meth:`voiceprint.core.contracts.FeatureParams.settings`) and
writes it into the feature store's metadata (:meth:`FeatureSettings.store_meta`); the evaluate stage reads it back
from the store (:meth:`FeatureSettings.from_store`), adds the embedding windows, and the bundle saves it
(:meth:`FeatureSettings.to_dict`, ``thresholds.json``'s ``features``; :func:`voiceprint.serving.bundle.parse_features`
validates it); the API featurizes with it (:meth:`FeatureSettings.featurize_kwargs`). The two formats on disk are
unchanged, so every existing store and bundle reads as before.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureSettings:
    """The ``featurize_file`` arguments a model's input is made with, and how the model reads them."""

    kind: str = "logmel_cmn"
    sample_rate: int = 16000
    num_bands: int = 64
    min_seconds: float = 0.5        # shorter files are rejected (after decoding, before the VAD)
    window_frames: int = 0          # 0 = the whole utterance in one pass
    hop_frames: int = 80
    vad: str | None = "original"    # None: a bundle from before the ``vad`` option (featurize_file's default)
    # Files with more samples than this at full scale are rejected (params.yaml features.max_clipped_fraction).
    # Not stored in a bundle: served files get the pipeline's default rule, not a score the calibration never saw.
    max_clipped_fraction: float | None = 0.01

    def to_dict(self) -> dict:
        """The bundle's ``features`` (thresholds.json)."""
        out = {"kind": self.kind, "sample_rate": self.sample_rate, "num_bands": self.num_bands,
               "min_seconds": self.min_seconds, "window_frames": self.window_frames, "hop_frames": self.hop_frames}
        if self.vad is not None:
            out["vad"] = self.vad
        return out

    def store_meta(self) -> dict:
        """What the feature store records besides its kind and band count (store.json)."""
        return {"vad": self.vad, "sample_rate": self.sample_rate, "min_seconds": self.min_seconds}

    @classmethod
    def from_store(cls, kind: str, num_bands: int, meta: dict, **windows) -> "FeatureSettings":
        """The settings a store was made with (its store.json); ``windows``: window_frames, hop_frames. A store
        from before a key was recorded: the values then in use (VAD ``original``, 16 kHz, no minimum length)."""
        return cls(kind=kind, num_bands=int(num_bands), vad=meta.get("vad", "original"),
                   sample_rate=int(meta.get("sample_rate", 16000)), min_seconds=meta.get("min_seconds", 0.0),
                   **windows)

    def featurize_kwargs(self) -> dict:
        """Keyword arguments of :func:`voiceprint.features.featurize_file` / ``featurize_many`` besides the kind."""
        out = {"sample_rate": self.sample_rate, "min_seconds": self.min_seconds,
               "max_clipped_fraction": self.max_clipped_fraction}
        if self.vad is not None:
            out["vad"] = self.vad
        return out
