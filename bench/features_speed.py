"""Real-time factor of featurize_file (decode + trim + features + MFCC baseline), one process, 1 BLAS thread.

    python bench/features_speed.py [--data DIR] [--kinds fbank_norm,logmel_cmn] [--repeat N]

DIR defaults to <shared>/data/librispeech-mini (<shared> = $VOICEPRINT_SHARED or <repo>/../shared).
Prints, per kind: audio seconds, wall seconds, x real time, and the time split by step.
"""

from __future__ import annotations

import os

# Before numpy is imported: one BLAS/OpenMP thread, as in a feature worker.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from threadpoolctl import threadpool_limits  # noqa: E402

from voiceprint import features as F  # noqa: E402
from _shared_data import default_data  # noqa: E402  (bench/ is on sys.path)
from voiceprint.data.audio import load_audio  # noqa: E402

AUDIO_EXTS = {".flac", ".wav", ".ogg", ".mp3"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--kinds", default=",".join(F.FEATURE_KINDS))
    ap.add_argument("--repeat", type=int, default=1, help="passes over the files per kind (best is reported)")
    args = ap.parse_args()

    files = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in AUDIO_EXTS)
    if not files:
        raise SystemExit(f"no audio files under {args.data}")

    with threadpool_limits(limits=1):
        # Warm up imports and cached filterbanks outside the timing.
        for kind in args.kinds.split(","):
            F.featurize_file(files[0], kind)
        audio_s = sum(load_audio(p).shape[0] for p in files) / 16000.0
        print(f"{len(files)} files, {audio_s:.1f} s of audio, data={args.data}")

        for kind in args.kinds.split(","):
            best = None
            for _ in range(max(1, args.repeat)):
                t0 = time.perf_counter()
                for p in files:
                    F.featurize_file(p, kind)
                wall = time.perf_counter() - t0
                best = wall if best is None else min(best, wall)
            # Split by step (separate pass, so the total above is not perturbed by the timers).
            steps = dict.fromkeys(("decode", "trim", "features", "mfcc_stats"), 0.0)
            for p in files:
                t = time.perf_counter()
                y = load_audio(p)
                steps["decode"] += time.perf_counter() - t
                t = time.perf_counter()
                y = F.trim_silence_original(y)
                steps["trim"] += time.perf_counter() - t
                t = time.perf_counter()
                F.FEATURE_KINDS[kind](y)
                steps["features"] += time.perf_counter() - t
                t = time.perf_counter()
                F.mfcc_stats(y)
                steps["mfcc_stats"] += time.perf_counter() - t
            split = ", ".join(f"{k} {audio_s / v:,.0f}x" for k, v in steps.items())
            print(
                f"{kind:11s} audio {audio_s:8.1f} s  wall {best:7.3f} s  {audio_s / best:8,.0f}x real time"
                f"   (per step: {split})"
            )


if __name__ == "__main__":
    main()
