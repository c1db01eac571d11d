"""Frame-level features, voice activity detection and batch feature extraction (no TensorFlow).

One module per concept:

* :mod:`~voiceprint.features.framing` -- the framing every kind shares (25 ms window = 400 samples, 10 ms hop =
  160 samples at 16 kHz, no centre padding, zero-padded tail) and the cutting of streamed pieces into frames.
* :mod:`~voiceprint.features.kernels` -- the compiled (numba) kernels: filterbank energies of 64 frames at a time,
  the trim's percentile as a histogram search, the per-frame normalisation; the ``numba``/``numpy`` engine switch
  (:func:`engine`). Kernels compile on first use (~10 s once; later processes load them from numba's cache).
* :mod:`~voiceprint.features.filterbanks` -- the HTK-mel and Slaney-mel filterbanks and the windows.
* :mod:`~voiceprint.features.vad` -- the VADs (``original``: the original recipe's trim, the default;
  ``energy``: block energies against a per-utterance noise floor, removes inner pauses too).
* :mod:`~voiceprint.features.kinds` -- the feature-kind registry (``fbank_norm``, ``logmel_cmn``; a new kind is
  a :class:`FeatureKind` plus :func:`register_feature_kind`).
* :mod:`~voiceprint.features.mfcc` -- ``mfcc_stats``, the 40-dim no-training baseline vector.
* :mod:`~voiceprint.features.runner` -- files: whole, in chunks when longer than 5 min (same results), and many
  in a process pool.
* :mod:`~voiceprint.features.settings` -- :class:`FeatureSettings`, how a run's features are made (the mfcc
  stage, the feature store, the bundle and the API).

Importing the package imports numpy and these modules only (numba when a kernel first runs; no TensorFlow).
"""

from voiceprint.features.framing import FRAME_LEN, FRAME_STEP, NFFT, num_frames
from voiceprint.features.kernels import ENGINES, engine
from voiceprint.features.kinds import (FEATURE_KINDS, PREEMPH, FeatureKind, KindStream, extract, fbank_original,
                                       logmel_cmn, register_feature_kind)
from voiceprint.features.mfcc import MFCC_BANDS, mfcc_stats
from voiceprint.features.runner import (CHUNK_SECONDS, LONG_FILE_SECONDS, MIN_FRAMES, featurize_file,
                                        featurize_many, featurize_signal)
from voiceprint.features.settings import FeatureSettings
from voiceprint.features.vad import VAD_KINDS, NoSpeechError, apply_vad, trim_silence_original, vad_energy

__all__ = [
    "FRAME_LEN",
    "FRAME_STEP",
    "NFFT",
    "PREEMPH",
    "MIN_FRAMES",
    "MFCC_BANDS",
    "ENGINES",
    "FEATURE_KINDS",
    "VAD_KINDS",
    "LONG_FILE_SECONDS",
    "CHUNK_SECONDS",
    "FeatureKind",
    "FeatureSettings",
    "KindStream",
    "NoSpeechError",
    "engine",
    "num_frames",
    "trim_silence_original",
    "vad_energy",
    "apply_vad",
    "fbank_original",
    "logmel_cmn",
    "register_feature_kind",
    "extract",
    "mfcc_stats",
    "featurize_file",
    "featurize_signal",
    "featurize_many",
]
