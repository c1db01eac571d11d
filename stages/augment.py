"""Stage augment: augmented copies of the training utterances as a feature store of their own (augment.* params).

Off by default (an empty store): training then sees exactly the corpus. The training stages read this store
beside data/features (voiceprint.data.store.FeatureStore.union).
"""
import dataclasses
import json
import time
from pathlib import Path

import pandas as pd

from voiceprint.data.augment import AugmentSettings
from voiceprint.core.outputs import atomic_path, write_metrics
from voiceprint.core.params import Params, load_params
from voiceprint.core.runtime import default_workers
from voiceprint.core.stage import run_stage
from voiceprint.data.store import META_FILE, StoreWriter

RAW = Path("data/raw")
FEATURES = Path("data/features")
INPUTS = "data/model_inputs"
OUT = "data/augmented"


def read_settings(params: Params) -> AugmentSettings:
    """Every param this stage reads (dvc.yaml lists the same; tests/test_contracts.py checks it)."""
    return AugmentSettings.read(params)


def main() -> None:
    settings = read_settings(load_params())
    from voiceprint.data.augmented import make_copies, plan
    from voiceprint.data.splits import read_split

    meta = json.loads((FEATURES / META_FILE).read_text())
    kind, vad, sample_rate = meta["kind"], meta.get("vad", "original"), int(meta.get("sample_rate", 16000))
    split, _ = read_split(INPUTS)
    index = pd.read_csv(FEATURES / "index.csv", dtype={"utterance": str, "path": str})
    paths = {u: str(RAW / p) for u, p in zip(index.utterance, index.path)}   # absolute paths stay absolute
    copies = plan(split, settings)
    started, failed, rows = time.perf_counter(), [], []
    with atomic_path(OUT) as tmp:
        writer = StoreWriter(tmp, num_bands=int(meta["num_bands"]), kind=kind,
                             meta={"vad": vad, "sample_rate": sample_rate, "augment": dataclasses.asdict(settings)})
        for copy, feats, baseline, error in make_copies(copies, paths, settings, kind=kind, vad=vad,
                                                        sample_rate=sample_rate, workers=default_workers()):
            if error is not None:
                failed.append({"utterance": copy.utterance, "message": error})
                continue
            writer.add(copy.utterance, copy.speaker, paths[copy.source], feats, baseline)
            rows.append({"utterance": copy.utterance, "speaker": copy.speaker, "role": "train",
                         "label": copy.label, "reason": ""})
        writer.close()
        pd.DataFrame(rows, columns=["utterance", "speaker", "role", "label", "reason"]).to_csv(
            tmp / "utterances.csv", index=False, lineterminator="\n")
        pd.DataFrame(failed, columns=["utterance", "message"]).to_csv(tmp / "failed.csv", index=False,
                                                                        lineterminator="\n")
    for f in failed:
        print(f"  augment: no copy {f['utterance']}: {f['message']}")
    elapsed = time.perf_counter() - started
    store_bytes = sum(p.stat().st_size for p in Path(OUT).rglob("*") if p.is_file())
    added = pd.DataFrame(rows, columns=["speaker", "label"])
    write_metrics("metrics/augment.json", {
        "copies": len(rows), "failed": len(failed), "speakers": int(added.speaker.nunique()),
        "classes": int(added.label.max()) + 1 if len(added) else 0, "seconds": round(elapsed, 1),
        "store_mb": round(store_bytes / 1e6, 2)})
    print(f"augment: {len(rows)} copies of {int((split.role == 'train').sum())} training utterances "
          f"({len(failed)} failed) in {elapsed:.1f} s; {store_bytes / 1e6:.1f} MB")


if __name__ == "__main__":
    run_stage(main)
