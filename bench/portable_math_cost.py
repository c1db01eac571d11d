"""What the CPU-independent synthesis costs (docs/reproducibility.md), side by side in one process.

1. Each voiceprint.core.portable_math function against numpy's ufunc on the same 50,000 float64 values (time ratio).
2. Synthesising utterances with voiceprint.data.corpus.synthetic as it is, and with numpy's functions put back in
   place of portable_math's (what the generator computed before): time ratio per utterance.
3. Features of those utterances (logmel_cmn + the MFCC baseline vector, as the mfcc stage computes them) with
   portable_math's log against numpy's: time ratio.
4. The corpus's FLAC files at level 0 (what the generator writes) against libsndfile's default level 5: size ratio.

    python bench/portable_math_cost.py [--utterances 24]
"""
import argparse
import io
import sys
import time
import types
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._shared_data import load_average  # noqa: E402
from voiceprint import features  # noqa: E402
from voiceprint.core import portable_math as pm  # noqa: E402
from voiceprint.data.corpus import synthetic  # noqa: E402

# numpy's functions under portable_math's names: (nearly) the generator's arithmetic before this change
NUMPY_MATH = types.SimpleNamespace(exp=np.exp, exp2=np.exp2, log=np.log, log2=np.log2, log10=np.log10,
                                   power=np.power, sin=np.sin, cos=np.cos, complex_multiply=np.multiply)


def best_of(fn, repeat=5):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=24)
    args = parser.parse_args()
    print(f"load average before: {load_average()}")

    x = np.random.default_rng(0).uniform(0.1, 10.0, 50_000)
    print("function   numpy ms  portable ms  ratio")
    for name in ("exp", "log", "log10", "sin", "cos"):
        ours, theirs = best_of(lambda: getattr(pm, name)(x)), best_of(lambda: getattr(np, name)(x))
        print(f"{name:8s} {theirs * 1e3:9.2f} {ours * 1e3:12.2f} {ours / theirs:6.1f}x")
    ours, theirs = best_of(lambda: pm.power(x, 0.7)), best_of(lambda: np.power(x, 0.7))
    print(f"{'power':8s} {theirs * 1e3:9.2f} {ours * 1e3:12.2f} {ours / theirs:6.1f}x")

    jobs = [(2017, u % 6, u) for u in range(args.utterances)]

    def synthesise():
        for seed, spk, utt in jobs:
            synthetic._utterance_audio(seed, spk, utt, 2.0, 4.0, True)

    portable = best_of(synthesise, repeat=2)
    synthetic.pm = NUMPY_MATH
    try:
        numpy_path = best_of(synthesise, repeat=2)
    finally:
        synthetic.pm = pm
    per = 1e3 / len(jobs)
    print(f"synthesis, {len(jobs)} utterances of 2-4 s: numpy functions {numpy_path * per:.0f} ms/utterance, "
          f"portable {portable * per:.0f} ms/utterance: {portable / numpy_path:.2f}x")

    audio = [synthetic._utterance_audio(seed, spk, utt, 2.0, 4.0, True) for seed, spk, utt in jobs]
    signals = [y.astype(np.float32) for y in audio]  # as decoded (near enough: the int16 step is left out)

    def featurize():
        for y in signals:
            speech = features.trim_silence_original(y)
            features.logmel_cmn(speech)
            features.mfcc_stats(speech)

    featurize()  # compile or load the kernels
    portable = best_of(featurize, repeat=3)
    # every features module that calls portable_math
    modules = [features.kernels, features.filterbanks, features.vad, features.kinds, features.mfcc]
    for module in modules:
        module.pm = NUMPY_MATH
    try:
        numpy_path = best_of(featurize, repeat=3)
    finally:
        for module in modules:
            module.pm = pm
    print(f"features (logmel_cmn + mfcc_stats): numpy functions {numpy_path * per:.1f} ms/utterance, "
          f"portable {portable * per:.1f} ms/utterance: {portable / numpy_path:.2f}x")

    sizes = {0.0: 0, None: 0}
    for y in audio:  # float64, as the generator writes it
        for level in sizes:
            buffer = io.BytesIO()
            extra = {} if level is None else {"compression_level": level}
            sf.write(buffer, y, synthetic.SAMPLE_RATE, format="FLAC", subtype="PCM_16", **extra)
            sizes[level] += len(buffer.getvalue())
    print(f"FLAC bytes: level 0 {sizes[0.0]}, default (5) {sizes[None]}: {sizes[0.0] / sizes[None]:.3f}x")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
