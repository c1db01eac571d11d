"""voiceprint: Deep Speaker speaker embeddings as a reproducible DVC pipeline.

``from voiceprint import Recognizer`` is the runtime's entry point (voiceprint.serving.api); it is loaded on first use,
so
``import voiceprint`` stays cheap and pulls in neither TensorFlow nor the API's dependencies.
"""

__version__ = "0.1.0"

_LAZY = {"Recognizer": "voiceprint.serving.api", "Registry": "voiceprint.serving.registry"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'voiceprint' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
