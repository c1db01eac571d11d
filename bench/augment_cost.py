"""Cost of each augmentation kind (voiceprint/data/augment.py), one process, 1 BLAS thread.

    python bench/augment_cost.py [--seconds 4] [--utterances 20] [--repeat 3]

Synthetic speech-like utterances (the cost does not depend on the content, only the length); per kind: ms per
utterance, ms per second of audio and x real time on one core (best of --repeat passes).  The SpecAugment row
is one 96 x 160 x 64 training batch (96 crops of 1.6 s).  Prints the load average: the machine may be shared.
"""
from __future__ import annotations

import os

# Before numpy is imported: one BLAS/OpenMP thread, as in a feature worker.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from _shared_data import load_average  # noqa: E402  (bench/ is on sys.path)
from voiceprint.data import augment as A  # noqa: E402

SR = A.SAMPLE_RATE


def speechlike(seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(110 + 40 * rng.random() + 20 * np.sin(2 * np.pi * 3 * t)) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="utterance length")
    ap.add_argument("--utterances", type=int, default=20, help="utterances per pass")
    ap.add_argument("--repeat", type=int, default=3, help="passes per kind (the best is reported)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    wavs = [speechlike(args.seconds, rng) for _ in range(args.utterances)]
    pool = [speechlike(s, rng) for s in rng.uniform(2.0, 6.0, size=30)]
    settings = A.AugmentSettings(copies=1)
    rirs = [A.room_impulse_response(np.random.default_rng(i)) for i in range(len(wavs))]
    batch = rng.standard_normal((96, 160, 64, 1)).astype(np.float32)

    def per_utterance(make):
        return lambda: [make(wav, np.random.default_rng(i)) for i, wav in enumerate(wavs)]

    kinds = {
        "noise white": per_utterance(lambda w, g: A.add_noise(w, g, 10.0, "white")),
        "noise pink": per_utterance(lambda w, g: A.add_noise(w, g, 10.0, "pink")),
        "noise brown": per_utterance(lambda w, g: A.add_noise(w, g, 10.0, "brown")),
        "babble 3 talkers": per_utterance(lambda w, g: A.add_babble(w, pool, g, 10.0, 3)),
        "babble 6 talkers": per_utterance(lambda w, g: A.add_babble(w, pool, g, 10.0, 6)),
        "rir only (0.2-0.8 s)": per_utterance(lambda w, g: A.room_impulse_response(g)),
        "reverberate only": lambda: [A.reverberate(w, r) for w, r in zip(wavs, rirs)],
        "reverb (rir + conv)": per_utterance(lambda w, g: A.reverberate(w, A.room_impulse_response(g))),
        "speed 0.9": per_utterance(lambda w, g: A.speed_perturb(w, 0.9)),
        "speed 1.1": per_utterance(lambda w, g: A.speed_perturb(w, 1.1)),
        "augment_utterance (mix)": per_utterance(lambda w, g: A.augment_utterance(w, settings, g, pool)),
    }
    audio_s = args.utterances * args.seconds
    print(f"{args.utterances} utterances x {args.seconds:g} s, best of {args.repeat}, 1 thread, "
          f"load average {load_average()}")
    print(f"{'kind':26s} {'ms/utt':>8s} {'ms/audio s':>11s} {'x real time':>12s}")
    with threadpool_limits(limits=1):
        for name, fn in kinds.items():
            fn()                                                   # warm-up (imports, FFT plans)
            wall = best_of(args.repeat, fn)
            print(f"{name:26s} {1000 * wall / args.utterances:8.2f} {1000 * wall / audio_s:11.2f} "
                  f"{audio_s / wall:12,.0f}")
        g = np.random.default_rng(1)

        def mask():
            for _ in range(50):                          # results dropped, as in training (memory is reused)
                A.mask_spectrogram(batch, g, 2, 20, 2, 8)
        mask()
        wall = best_of(args.repeat, mask) / 50
        batch_audio = batch.shape[0] * batch.shape[1] / 100.0              # 10 ms frames
        print(f"{'specaugment 96x160x64':26s} {1000 * wall:8.2f} {1000 * wall / batch_audio:11.3f} "
              f"{batch_audio / wall:12,.0f}   (ms per batch; 2+2 masks)")


if __name__ == "__main__":
    main()
