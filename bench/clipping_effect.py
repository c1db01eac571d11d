"""How much does clipping change the features?  Grounds the default of ``features.max_clipped_fraction``.

    python bench/clipping_effect.py [--data DIR] [--every N]

For each file (every N-th of DIR, default <shared>/data/librispeech-mini), the gain that puts a given share of the
samples at full scale, then log-mel features (logmel_cmn: per-utterance mean removed, so the gain alone changes
nothing) of the clipped vs. the unclipped, equally amplified signal.  Prints the mean absolute change in dB over
all frames and bands, and in the loudest frames (95th percentile of the per-frame change).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _shared_data import default_data  # noqa: E402  (bench/ is on sys.path)
from voiceprint.data.audio import load_audio
from voiceprint.features import logmel_cmn, trim_silence_original

FRACTIONS = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--every", type=int, default=10, help="use every N-th file (sorted)")
    args = ap.parse_args()
    files = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in {".flac", ".wav"})[:: args.every]
    if not files:
        raise SystemExit(f"no audio files under {args.data}")
    signals = [trim_silence_original(load_audio(p)) for p in files]
    to_db = 10.0 / np.log(10.0)  # logmel_cmn is a natural log of power
    print(f"{len(files)} files from {args.data}")
    for fraction in FRACTIONS:
        mean_change, loud_change = [], []
        for x in signals:
            gain = 1.0 / np.quantile(np.abs(x), 1.0 - fraction)
            change = np.abs(logmel_cmn(np.clip(x * gain, -1.0, 1.0)) - logmel_cmn(x * gain)) * to_db
            mean_change.append(change.mean())
            loud_change.append(np.percentile(change.mean(axis=1), 95))
        print(f"{fraction:7.2%} of samples clipped: log-mel change {np.mean(mean_change):5.2f} dB on average, "
              f"{np.mean(loud_change):5.2f} dB in the 5% most changed frames")


if __name__ == "__main__":
    main()
