"""Stage mfcc: features for every manifest utterance into the feature store (features.* params).

Bad files are listed in data/features/rejected.csv with their reason and counted in metrics/features.json;
the stage fails only when too little usable audio remains.
"""
import time
from pathlib import Path

import pandas as pd

from voiceprint.features import FEATURE_KINDS, featurize_many
from voiceprint.outputs import atomic_path, write_metrics
from voiceprint.params import load_params
from voiceprint.runtime import default_workers
from voiceprint.stage import run_stage
from voiceprint.store import StoreWriter

RAW = Path("data/raw")
FEATURES = "data/features"
NUM_BANDS = 64


def main() -> None:
    params = load_params().section("features")
    kind = params.str("kind", choices=sorted(FEATURE_KINDS))
    min_seconds = params.float("min_seconds", min=0.0)
    manifest = pd.read_csv(RAW / "manifest.csv", dtype={"speaker": str, "utterance": str, "path": str})
    paths = [str(RAW / p) for p in manifest.path]
    rejected = []
    started = time.perf_counter()
    with atomic_path(FEATURES) as tmp:
        writer = StoreWriter(tmp, num_bands=NUM_BANDS, kind=kind)
        for i, feats, baseline, reason, message in featurize_many(paths, kind, workers=default_workers(),
                                                                   min_seconds=min_seconds):
            row = manifest.iloc[i]
            if reason is not None:
                rejected.append({"path": row.path, "speaker": row.speaker, "reason": reason, "message": message})
                continue
            writer.add(row.utterance, row.speaker, row.path, feats, baseline)
        index = writer.close()
        pd.DataFrame(rejected, columns=["path", "speaker", "reason", "message"]).to_csv(
            tmp / "rejected.csv", index=False, lineterminator="\n")
        for r in rejected:
            print(f"  rejected {r['path']}: {r['reason']}: {r['message']}")
        usable = index.groupby("speaker").size()
        if (usable >= 2).sum() < 2:
            raise ValueError(f"too little usable audio: {len(index)} of {len(manifest)} files usable, "
                             f"{(usable >= 2).sum()} speaker(s) with >= 2 utterances (need 2); "
                             f"{len(rejected)} file(s) rejected, listed above")
    elapsed = time.perf_counter() - started
    reasons = pd.Series([r["reason"] for r in rejected], dtype=str).value_counts().to_dict()
    write_metrics("metrics/features.json", {
        "utterances_in": len(manifest), "utterances_kept": len(index), "rejected": len(rejected),
        "rejected_by_reason": reasons, "frames": int(index.frames.sum())})
    audio_s = float(manifest.duration.sum())
    print(f"mfcc: {len(index)}/{len(manifest)} utterances ({kind}), {len(rejected)} rejected; "
          f"{audio_s / 60:.1f} min of audio in {elapsed:.1f} s ({audio_s / elapsed:.0f}x real time)")


if __name__ == "__main__":
    run_stage(main)
