"""Stage download: produce the raw corpus under data/raw/ and its manifest (data.* params).

Each source is one builder: it reads its own data.* keys, writes audio under the temporary raw directory and
returns the manifest plus metrics of its own.
"""
import pandas as pd

from voiceprint.core.contracts import DataSettings
from voiceprint.data.corpus import ADDED_SEPARATOR, MANIFEST_COLUMNS, folder, librispeech, synthetic
from voiceprint.core.errors import DataError
from voiceprint.core.outputs import atomic_path, write_metrics
from voiceprint.core.params import Params, ParamsError, load_params
from voiceprint.core.runtime import default_workers
from voiceprint.core.stage import run_stage

RAW = "data/raw"


def build_synthetic(data: DataSettings, raw, speakers: int | None = None) -> tuple[pd.DataFrame, dict]:
    speakers = data.speakers if speakers is None else speakers
    manifest = synthetic.generate(raw, num_speakers=speakers, utterances_per_speaker=data.utterances_per_speaker,
                                  min_seconds=data.min_seconds, max_seconds=data.max_seconds, seed=data.seed,
                                  workers=default_workers(), progress=True)
    return manifest, {}


def build_librispeech(data: DataSettings, raw) -> tuple[pd.DataFrame, dict]:
    subsets = librispeech.check_subsets(list(data.subsets))
    mirror = librispeech.check_mirror(data.mirror)
    manifest, fetched = librispeech.prepare(raw, subsets, mirror=mirror)
    subset_of = manifest.path.str.split("/").str[1]
    per_subset = {}
    for subset, result in fetched.items():
        rows = manifest[subset_of == subset]
        per_subset[subset] = {
            "utterances": len(rows), "speakers": int(rows.speaker.nunique()),
            "hours": round(float(rows.duration.sum()) / 3600, 4),
            "downloaded_bytes": result.downloaded_bytes, "reused_bytes": result.size if result.reused else 0}
        print(f"  {subset}: {len(rows)} utterances of {rows.speaker.nunique()} speakers; archive "
              + ("reused" if result.reused else f"downloaded ({result.downloaded_bytes} bytes)"))
    unreadable = int(manifest.duration.isna().sum())
    if unreadable:
        print(f"  {unreadable} file(s) with an unreadable header: listed without duration; mfcc rejects them")
    return manifest, {"subsets": per_subset, "unreadable_headers": unreadable,
                      "downloaded_bytes": sum(m["downloaded_bytes"] for m in per_subset.values()),
                      "reused_bytes": sum(m["reused_bytes"] for m in per_subset.values())}


def build_folder(data: DataSettings, raw) -> tuple[pd.DataFrame, dict]:
    """Recordings left where they are: data/raw holds the manifest (absolute paths, content hashes) and
    rejected.csv (every file found but not usable as a recording, with its reason)."""
    source = data.folder
    if not source:
        raise DataError("params.yaml: data.folder: empty; set it to a folder of recordings or a CSV manifest "
                        "(path,speaker) for data.source=folder")
    manifest, rejected = folder.scan(source)
    rejected.to_csv(raw / "rejected.csv", index=False, lineterminator="\n")
    for row in rejected.itertuples():
        print(f"  left out {row.path}: {row.reason}: {row.message}")
    if manifest.empty:
        raise DataError(f"data.folder: {source}: no usable recordings found ({len(rejected)} file(s) left out, "
                        "listed above)")
    reasons = rejected.reason.value_counts().sort_index().to_dict()
    return manifest, {"left_out": len(rejected), "left_out_by_reason": reasons}


# data.source -> builder
BUILDERS = {"synthetic": build_synthetic, "librispeech": build_librispeech, "folder": build_folder}


def add_synthetic(data: DataSettings, source: str, raw, manifest: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """``data.add_synthetic_speakers`` synthetic speakers beside a real source, namespaced "synthetic:<id>"
    (training-only; see voiceprint.data.corpus.ADDED_SEPARATOR)."""
    extra = data.add_synthetic_speakers
    if extra == 0:
        return manifest, {}
    if source == "synthetic":
        raise ParamsError("params.yaml: data.add_synthetic_speakers: adds synthetic speakers to a real source; "
                         "with data.source synthetic use data.speakers")
    if extra < 2:
        raise ParamsError(f"params.yaml: data.add_synthetic_speakers: must be 0 or >= 2, got {extra}")
    added, _ = build_synthetic(data, raw / "synthetic", speakers=extra)
    prefix = f"synthetic{ADDED_SEPARATOR}"
    added = added.assign(path="synthetic/" + added.path, speaker=prefix + added.speaker,
                         utterance=prefix + added.utterance)
    print(f"  added {extra} synthetic speakers ({len(added)} utterances, training only)")
    return pd.concat([manifest, added], ignore_index=True), {"added_synthetic_speakers": extra}


def read_settings(params: Params) -> DataSettings:
    """Every param this stage reads (dvc.yaml lists the same; tests/test_contracts.py checks it)."""
    return DataSettings.read(params)


def main() -> None:
    data = read_settings(load_params())
    source = data.source
    with atomic_path(RAW) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        manifest, source_metrics = BUILDERS[source](data, tmp)
        manifest, added_metrics = add_synthetic(data, source, tmp, manifest)
        source_metrics.update(added_metrics)
        # Source-specific columns (e.g. the folder source's sha1, bytes) follow the common ones: a changed
        # recording changes the manifest, so DVC reruns the features.
        columns = MANIFEST_COLUMNS + [c for c in manifest.columns if c not in MANIFEST_COLUMNS]
        manifest[columns].to_csv(tmp / "manifest.csv", index=False, lineterminator="\n")
    write_metrics("metrics/download.json", {
        "utterances": len(manifest), "speakers": int(manifest.speaker.nunique()),
        "hours": round(float(manifest.duration.sum()) / 3600, 4), **source_metrics})
    print(f"download: {len(manifest)} utterances of {manifest.speaker.nunique()} speakers -> {RAW}")


if __name__ == "__main__":
    run_stage(main)
