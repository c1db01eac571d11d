"""voiceprint: Deep Speaker speaker embeddings as a reproducible DVC pipeline."""

__version__ = "0.1.0"
