"""fbank_norm features, ours vs the original recipe, side by side in one process: speed, equality, core scaling.

    pip install -r requirements-bench.txt        # python_speech_features 0.6, the original's feature library
    python bench/features_vs_original.py [--data DIR] [--repeat N] [--workers 2]

DIR defaults to <shared>/data/librispeech-mini (<shared> = $VOICEPRINT_SHARED or <repo>/../shared).

Per file, one process, one BLAS thread:
  original   librosa.load(sr=16000) -> 95th-percentile trim (np.percentile) -> python_speech_features.fbank(nfilt=64)
             -> the original per-frame normalisation loop (deep_speaker/audio.py)
  ours       load_audio -> trim_silence_original -> fbank_original (the same features)
  ours+mfcc  featurize_file(path, "fbank_norm"): the above plus the MFCC-statistics baseline vector the pipeline
             also stores (the original has no such vector)
  logmel     featurize_file(path, "logmel_cmn")
Times are the best of --repeat rounds (rounds interleave the variants, so machine load hits all alike), as wall
time and as this process's CPU time; "x real time" = seconds of audio per second.  Then featurize_many with 1 and
--workers processes (wall time, best of --repeat), beside the speed-up the machine gives plain CPU-bound numpy
jobs in as many processes (its ceiling: shared or hyper-threaded cores scale less than 2x).  The load average is
printed: on a shared machine, compare ratios measured in the same run.
"""

from __future__ import annotations

import os

# Before numpy is imported: one BLAS/OpenMP thread, as in a feature worker.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402
from _shared_data import default_data, load_average  # noqa: E402  (bench/ is on sys.path)

from voiceprint import features as F  # noqa: E402
from voiceprint.data.audio import load_audio  # noqa: E402

try:
    import python_speech_features as psf
except ImportError:  # a benchmark-only dependency
    sys.exit("bench/features_vs_original.py needs python_speech_features (the original's feature library): "
             "pip install -r requirements-bench.txt")


def original(path) -> np.ndarray:
    """The original recipe's per-utterance features, as its code computes them."""
    import librosa

    signal, _ = librosa.load(path, sr=16000, mono=True, dtype=np.float32)
    energy = np.abs(signal)
    loud = np.flatnonzero(energy > np.percentile(energy, 95))
    signal = signal[loud[0] : loud[-1]]
    feat, _ = psf.fbank(signal, samplerate=16000, nfilt=64)
    return np.array([(v - np.mean(v)) / max(np.std(v), 1e-12) for v in feat], dtype=np.float32)


def ours(path) -> np.ndarray:
    return F.fbank_original(F.trim_silence_original(load_audio(path)))


def _fft_work(rounds: int) -> None:
    block = np.random.default_rng(0).standard_normal((256, 512))
    for _ in range(rounds):
        np.fft.rfft(block)


def machine_scaling(workers: int, repeat: int) -> float:
    """How much faster `workers` processes do `workers` equal CPU-bound jobs (numpy rfft) than one process: the
    ceiling any multi-process code can reach on this machine now (1.0-2.0 for 2 workers on 2 free cores)."""
    import multiprocessing

    rounds = 1000
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_fft_work, [10] * workers)  # start the workers
        one = many = np.inf
        for _ in range(repeat):
            t = time.perf_counter()
            for _ in range(workers):
                _fft_work(rounds)
            one = min(one, time.perf_counter() - t)
            t = time.perf_counter()
            pool.map(_fft_work, [rounds] * workers, chunksize=1)
            many = min(many, time.perf_counter() - t)
    return one / many


def _best_times(variants: dict, files: list, repeat: int) -> dict:
    """{name: (best wall s, best cpu s)} over `repeat` interleaved rounds."""
    best = {name: (np.inf, np.inf) for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for p in files:
                fn(p)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--repeat", type=int, default=5, help="rounds; the best is reported")
    ap.add_argument("--workers", type=int, default=2, help="processes for the scaling check (0: skip it)")
    args = ap.parse_args()

    files = sorted(str(p) for p in args.data.rglob("*.flac"))
    if not files:
        raise SystemExit(f"no .flac files under {args.data}")
    print(f"load average at start: {load_average()} ({os.cpu_count()} cores)")

    with threadpool_limits(limits=1):
        differing = total = 0
        for p in files:  # also warms up imports, caches and compiled kernels outside the timing
            a, b = ours(p), original(p)
            differing += int(np.count_nonzero(a != b)) if a.shape == b.shape else a.size
            total += b.size
        F.featurize_file(files[0], "logmel_cmn")
        audio_s = sum(load_audio(p).shape[0] for p in files) / 16000.0
        print(f"{len(files)} files, {audio_s:.1f} s of audio, data={args.data}")
        print(f"fbank_norm ours vs original: {differing} of {total} float32 values differ")

        variants = {
            "original": original,
            "ours": ours,
            "ours+mfcc": lambda p: F.featurize_file(p, "fbank_norm"),
            "logmel+mfcc": lambda p: F.featurize_file(p, "logmel_cmn"),
        }
        best = _best_times(variants, files, args.repeat)
    base_wall, base_cpu = best["original"]
    print(f"{'':12s} {'wall s':>8s} {'x real time':>12s} {'cpu s':>8s} {'x real time/core':>17s} {'vs original':>12s}")
    for name, (wall, cpu) in best.items():
        print(f"{name:12s} {wall:8.3f} {audio_s / wall:12,.0f} {cpu:8.3f} {audio_s / cpu:17,.0f} "
              f"{base_cpu / cpu:11.2f}x")

    if args.workers > 1:
        walls = {}
        for _ in range(args.repeat):
            for workers in (1, args.workers):
                t = time.perf_counter()
                for result in F.featurize_many(files, "fbank_norm", workers=workers, progress=False):
                    assert result[3] is None, result
                walls[workers] = min(walls.get(workers, np.inf), time.perf_counter() - t)
        print(f"featurize_many fbank_norm: 1 worker {walls[1]:.3f} s ({audio_s / walls[1]:,.0f}x), "
              f"{args.workers} workers {walls[args.workers]:.3f} s ({audio_s / walls[args.workers]:,.0f}x): "
              f"{walls[1] / walls[args.workers]:.2f}x faster; the machine's own ceiling now "
              f"(numpy rfft jobs, 1 vs {args.workers} processes): {machine_scaling(args.workers, args.repeat):.2f}x")
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
