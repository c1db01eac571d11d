"""Where the benchmarks find ../shared's LibriSpeech-mini (override with VOICEPRINT_SHARED)."""
import os
from pathlib import Path


def default_data() -> Path:
    shared = os.environ.get("VOICEPRINT_SHARED", Path(__file__).resolve().parents[2] / "shared")
    return Path(shared) / "data" / "librispeech-mini"
