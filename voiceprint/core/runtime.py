"""TensorFlow start-up for training and inference: threads, seeds, determinism, quiet logs.

Call :func:`configure_tensorflow` before any TensorFlow op runs (thread pools are fixed at first use).
Measured on 2 CPU cores: intra-op = all cores, inter-op = 1 and no XLA was fastest for this model.
"""
from __future__ import annotations

import os

from voiceprint.core.errors import DataError, MissingFileError


def env_count(name: str) -> int:
    """A count from the environment (VOICEPRINT_THREADS, VOICEPRINT_WORKERS): unset or 0 means all cores (0).
    Anything but a whole number is refused here: TensorFlow aborts the process on a negative thread count."""
    value = os.environ.get(name, "").strip() or "0"
    if not value.isdigit():
        raise ValueError(f"{name}={os.environ[name]!r}: expected a whole number >= 0 (0 or unset: all cores)")
    return int(value)


def configure_tensorflow(seed: int, threads: int | None = None):
    threads = threads or env_count("VOICEPRINT_THREADS") or os.cpu_count() or 1
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # already initialised in this process (tests): keep the existing pools
    keras.utils.set_random_seed(seed)
    # TensorFlow's CPU kernels used here are deterministic as they are (tests/test_training.py trains twice and
    # compares bytes); the determinism switch costs ~30% of CPU step time, so it is only turned on where
    # nondeterministic kernels exist (GPUs), or when VOICEPRINT_DETERMINISTIC=1 asks for it.
    wanted = os.environ.get("VOICEPRINT_DETERMINISTIC", "auto")
    if wanted == "1" or (wanted == "auto" and tf.config.list_physical_devices("GPU")):
        tf.config.experimental.enable_op_determinism()
    return tf


def load_model(path, *, what: str = "model"):
    """Load a ``.keras`` file in Keras safe mode (no arbitrary code), with a clear error naming the file."""
    from pathlib import Path

    import keras

    import voiceprint.models  # noqa: F401 -- registers our custom layers (e.g. StatisticsPooling) for loading

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} file {path} not found; run the stage that writes it (dvc repro)")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises several types for a bad archive
        raise DataError(f"{path}: cannot load {what}: {exc}") from exc


def default_workers() -> int:
    """Processes for feature work: all cores unless VOICEPRINT_WORKERS says otherwise. Not a param: it changes
    speed, never results, so it must not invalidate DVC stages."""
    return max(1, env_count("VOICEPRINT_WORKERS") or os.cpu_count() or 1)
