"""Stage mfcc: features for every manifest utterance into the feature store (features.* params).

Bad files are listed in data/features/rejected.csv with their reason and counted in metrics/features.json;
speakers left with fewer than 2 usable utterances are counted and printed; the stage fails only when too little
usable audio remains (fewer than 2 speakers with >= 2 utterances).
"""
import time
from pathlib import Path

import pandas as pd

from voiceprint.core.contracts import FeatureParams
from voiceprint.core.errors import DataError
from voiceprint.features import featurize_many
from voiceprint.core.outputs import atomic_path, write_metrics
from voiceprint.core.params import Params, load_params
from voiceprint.core.runtime import default_workers
from voiceprint.core.stage import run_stage
from voiceprint.data.store import StoreWriter

RAW = Path("data/raw")
FEATURES = "data/features"
NUM_BANDS = 64
SAMPLE_RATE = 16000
MIN_UTTERANCES = 2  # per speaker: fewer cannot give a target trial or a training pair


def read_settings(params: Params) -> FeatureParams:
    """Every param this stage reads (dvc.yaml lists the same; tests/test_contracts.py checks it)."""
    return FeatureParams.read(params)


def main() -> None:
    settings = read_settings(load_params()).settings(sample_rate=SAMPLE_RATE, num_bands=NUM_BANDS)
    kind, vad = settings.kind, settings.vad
    # Names as written (a speaker "NA" stays "NA"); a duration left empty (unreadable header) is NaN.
    manifest = pd.read_csv(RAW / "manifest.csv", dtype={"speaker": str, "utterance": str, "path": str},
                           keep_default_na=False)
    manifest["duration"] = pd.to_numeric(manifest["duration"], errors="coerce")
    paths = [str(RAW / p) for p in manifest.path]  # absolute manifest paths (folder source) stay absolute
    rejected = []
    started = time.perf_counter()
    with atomic_path(FEATURES) as tmp:
        writer = StoreWriter.for_features(tmp, settings)
        for i, feats, baseline, reason, message in featurize_many(
                paths, kind, workers=default_workers(), **settings.featurize_kwargs()):
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
        reasons = pd.Series([r["reason"] for r in rejected], dtype=str).value_counts().sort_index().to_dict()
        usable = index.groupby("speaker").size().reindex(sorted(set(manifest.speaker)), fill_value=0)
        too_few = usable[usable < MIN_UTTERANCES]
        if len(too_few):
            listed = ", ".join(f"{s} ({n})" for s, n in too_few.items())
            print(f"mfcc: {len(too_few)} speaker(s) with fewer than {MIN_UTTERANCES} usable utterances "
                  f"(usable count): {listed}")
        enough = int((usable >= MIN_UTTERANCES).sum())
        if enough < 2:
            found = ", ".join(f"{k}: {v}" for k, v in reasons.items()) or "none"
            raise DataError(f"too little usable audio: {len(index)} of {len(manifest)} files usable, "
                            f"{enough} speaker(s) with >= {MIN_UTTERANCES} utterances (need 2); "
                            f"{len(rejected)} file(s) rejected (by reason: {found}), listed above; "
                            f"{len(too_few)} of {len(usable)} speaker(s) have fewer than {MIN_UTTERANCES}")
    elapsed = time.perf_counter() - started
    write_metrics("metrics/features.json", {
        "utterances_in": len(manifest), "utterances_kept": len(index), "rejected": len(rejected),
        "rejected_by_reason": reasons, "frames": int(index.frames.sum()),
        "speakers_in": len(usable), "speakers_kept": enough, "speakers_too_few_utterances": len(too_few)})
    audio_s = float(manifest.duration.sum())
    print(f"mfcc: {len(index)}/{len(manifest)} utterances ({kind}, vad {vad}), {len(rejected)} rejected; "
          f"{audio_s / 60:.1f} min of audio in {elapsed:.1f} s ({audio_s / elapsed:.0f}x real time)")


if __name__ == "__main__":
    run_stage(main)
