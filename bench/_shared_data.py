"""What the benchmarks share: where ../shared's LibriSpeech-mini is (override with VOICEPRINT_SHARED), and the
load average they print (the machine may be shared, so every result says how busy it was)."""
import os
from pathlib import Path


def default_data() -> Path:
    shared = os.environ.get("VOICEPRINT_SHARED", Path(__file__).resolve().parents[2] / "shared")
    return Path(shared) / "data" / "librispeech-mini"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. "0.37 1.37 1.70"."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
