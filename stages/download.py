"""Stage download: produce the raw corpus under data/raw/ and its manifest (data.* params)."""
from voiceprint.corpus import MANIFEST_COLUMNS, SOURCES, check_source, synthetic
from voiceprint.outputs import atomic_path, write_metrics
from voiceprint.params import load_params
from voiceprint.runtime import default_workers
from voiceprint.stage import run_stage

RAW = "data/raw"


def main() -> None:
    data = load_params().section("data")
    source = data.str("source", choices=SOURCES)
    check_source(source)
    speakers = data.int("speakers", min=2)
    per_speaker = data.int("utterances_per_speaker", min=2)
    min_seconds = data.float("min_seconds", min=0.0, min_exclusive=True)
    max_seconds = data.float("max_seconds", min=min_seconds)
    seed = data.int("seed", min=0)
    with atomic_path(RAW) as tmp:
        manifest = synthetic.generate(tmp, num_speakers=speakers, utterances_per_speaker=per_speaker,
                                      min_seconds=min_seconds, max_seconds=max_seconds, seed=seed,
                                      workers=default_workers(), progress=True)
        manifest[MANIFEST_COLUMNS].to_csv(tmp / "manifest.csv", index=False, lineterminator="\n")
    write_metrics("metrics/download.json", {
        "utterances": len(manifest), "speakers": int(manifest.speaker.nunique()),
        "hours": round(float(manifest.duration.sum()) / 3600, 4)})
    print(f"download: {len(manifest)} utterances of {manifest.speaker.nunique()} speakers -> {RAW}")


if __name__ == "__main__":
    run_stage(main)
