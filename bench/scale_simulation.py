"""A LibriSpeech-size corpus through the store, the model_inputs split and the batch samplers: time and memory.

    python bench/scale_simulation.py [--utterances 292367] [--speakers 2484] [--layout single|sharded]
                                     [--eval-speakers 40] [--batches 200] [--dir DIR] [--keep] [--mini DIR]

First, for scale, a real store of LibriSpeech-mini (--mini, default <shared>/data/librispeech-mini; skipped if
absent): featurize_many + StoreWriter, bytes on disk per hour of audio.

Generates the index of a corpus the size of all of LibriSpeech (960 h train + 21.6 h dev/test: 292,367
utterances, 2,484 speakers; per-speaker counts and durations drawn to match, ~12 s per utterance, 100 frames per
second) and a feature store of exactly that size whose frame file is sparse (created with truncate: it costs no
disk, reads give zeros; the readers cannot tell).  --layout sharded writes it as 7 shards, one per LibriSpeech
subset.  Then, timed one by one (wall seconds; the step's Python allocation peak by tracemalloc; RSS after):
FeatureStore.open, splits.split_utterances + make_trials (model_inputs' defaults: 40 evaluation speakers, 10%
validation, 200,000 non-target trials), ClassificationBatches and SpeakerBatches (P 16 x K 4) built over the
training utterances and --batches batches of 160-frame crops drawn from each.  Prints the store's size per hour
of audio and ru_maxrss.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402
from _shared_data import default_data, load_average  # noqa: E402  (bench/ is on sys.path)

from voiceprint.data import store as S  # noqa: E402
from voiceprint.data.splits import make_trials, split_utterances  # noqa: E402

NUM_BANDS = 64
FRAMES_PER_SECOND = 100
# LibriSpeech subsets: (name, utterances, speakers, hours)
SUBSETS = [("train-clean-100", 28539, 251, 100.6), ("train-clean-360", 104014, 921, 363.6),
           ("train-other-500", 148688, 1166, 496.7), ("dev-clean", 2703, 40, 5.4), ("dev-other", 2864, 33, 5.3),
           ("test-clean", 2620, 40, 5.4), ("test-other", 2939, 33, 5.1)]


def librispeech_like_index(utterances: int, speakers: int, seed: int = 0) -> pd.DataFrame:
    """utterance, speaker, path, subset, frames: LibriSpeech's subsets scaled to the requested totals."""
    rng = np.random.default_rng(seed)
    scale_u = utterances / sum(s[1] for s in SUBSETS)
    scale_s = speakers / sum(s[2] for s in SUBSETS)
    parts, first_speaker = [], 0
    for name, n_utt, n_spk, hours in SUBSETS:
        n_utt, n_spk = max(2, round(n_utt * scale_u)), max(2, round(n_spk * scale_s))
        # utterances per speaker: around the subset's mean, every speaker at least 2
        weights = rng.gamma(8.0, 1.0, n_spk)
        per = 2 + np.floor(weights / weights.sum() * (n_utt - 2 * n_spk)).astype(int)
        per[: n_utt - per.sum()] += 1
        speaker = np.repeat(np.arange(first_speaker, first_speaker + n_spk), per)
        mean_s = hours * 3600 / (n_utt / scale_u)  # the subset's mean utterance duration
        seconds = np.clip(rng.gamma(9.0, mean_s / 9.0, n_utt), 1.0, 35.0)
        idx = np.arange(n_utt) - np.repeat(np.cumsum(per) - per, per)
        utt = [f"{s}-{1000 + s}-{i:04d}" for s, i in zip(speaker, idx)]
        parts.append(pd.DataFrame({"utterance": utt, "speaker": speaker.astype(str), "subset": name,
                                   "frames": (seconds * FRAMES_PER_SECOND).astype(np.int64)}))
        first_speaker += n_spk
    index = pd.concat(parts, ignore_index=True)
    index["path"] = index.subset + "/" + index.utterance + ".flac"
    return index


def write_sparse_store(directory: Path, index: pd.DataFrame, layout: str) -> None:
    """A store with ``index``'s utterances, laid out as StoreWriter would, frame files sparse (zeros)."""
    directory.mkdir(parents=True, exist_ok=True)
    header = {"dtype": "float16", "num_bands": NUM_BANDS, "kind": "logmel_cmn", "vad": "original",
              "sample_rate": 16000, "min_seconds": 0.0}
    if layout == "single":
        offsets = np.cumsum(index.frames) - index.frames
        index.assign(offset=offsets)[S.INDEX_COLUMNS].to_csv(directory / S.INDEX_FILE, index=False)
        with open(directory / S.FRAMES_FILE, "wb") as fh:
            fh.truncate(int(index.frames.sum()) * NUM_BANDS * 2)
        np.save(directory / S.BASELINE_FILE, np.zeros((len(index), S.BASELINE_DIM), np.float32))
        meta = {**header, "utterances": len(index), "total_frames": int(index.frames.sum())}
    else:
        (directory / S.SHARDS_DIR).mkdir(exist_ok=True)
        shards, rows = [], []
        for name, part in index.groupby("subset", sort=False):
            part = part.assign(shard=name, offset=np.cumsum(part.frames) - part.frames)
            rows.append(part[S.SHARDED_INDEX_COLUMNS])
            with open(directory / S.SHARDS_DIR / f"{name}.f16", "wb") as fh:
                fh.truncate(int(part.frames.sum()) * NUM_BANDS * 2)
            np.save(directory / S.SHARDS_DIR / f"{name}.baseline.npy", np.zeros((len(part), S.BASELINE_DIM),
                                                                                 np.float32))
            shards.append({"name": name, "utterances": len(part), "frames": int(part.frames.sum())})
        pd.concat(rows).to_csv(directory / S.INDEX_FILE, index=False)
        meta = {**header, "utterances": len(index), "total_frames": int(index.frames.sum()), "shards": shards}
    (directory / S.META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def measured_bytes_per_hour(data: Path, directory: Path) -> None:
    """Featurize the FLAC files under ``data`` into a store as the mfcc stage does; print its bytes per hour."""
    import soundfile as sf

    from voiceprint.features import featurize_many

    files = sorted(data.rglob("*.flac"))
    hours = sum(sf.info(str(p)).duration for p in files) / 3600
    writer = S.StoreWriter(directory, num_bands=NUM_BANDS, kind="fbank_norm", meta={"vad": "original"})
    for i, feats, base, reason, message in featurize_many(files, "fbank_norm", workers=os.cpu_count() or 1,
                                                           progress=False):
        if reason is None:
            writer.add(files[i].stem, files[i].parent.parent.name, str(files[i]), feats, base)
    index = writer.close()
    sizes = {p.name: p.stat().st_size for p in directory.iterdir()}
    total = sum(sizes.values())
    print(f"  LibriSpeech-mini: {len(index)} of {len(files)} files, {hours * 60:.1f} min of audio, "
          f"{index.frames.sum():,} frames after the trim ({index.frames.sum() / (hours * 3600):.1f} per s of audio); "
          f"store {total / 1e6:.1f} MB = {total / hours / 1e6:.1f} MB per hour of audio "
          f"(frames.f16 {sizes[S.FRAMES_FILE] / hours / 1e6:.1f} MB/h) -> {total / hours * 1000 / 1e9:.0f} GB "
          f"for 1,000 h")


class Steps:
    """Times each step; the most Python memory (tracemalloc) it allocated beyond what was live before it, and the
    process RSS after it (RSS includes the pages of the frame files read so far: page cache, not heap)."""

    def __init__(self):
        self.process = psutil.Process()
        tracemalloc.start()

    def run(self, name: str, fn):
        live = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        t = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t
        extra = tracemalloc.get_traced_memory()[1] - live
        rss = self.process.memory_info().rss
        print(f"  {name:50s} {wall:7.2f} s  peak +{extra / 2**20:7.1f} MiB over {live / 2**20:6.1f} MiB live  "
              f"RSS {rss / 2**20:6.0f} MiB", flush=True)
        return result


def _consume(batches, count: int) -> None:
    for i in range(count):  # each batch dropped after use, as training does
        x, y = batches[i]
        assert x.shape[1:] == (160, NUM_BANDS, 1) and len(x) == len(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=292367)
    ap.add_argument("--speakers", type=int, default=2484)
    ap.add_argument("--layout", choices=("single", "sharded"), default="single")
    ap.add_argument("--eval-speakers", type=int, default=40)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--dir", type=Path, default=None, help="where to put the store (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the store")
    ap.add_argument("--mini", type=Path, default=default_data())
    args = ap.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="scale_simulation_"))
    print(f"load average {load_average()}; store in {root} ({args.layout})")
    steps = Steps()
    try:
        if args.mini.is_dir():
            steps.run("LibriSpeech-mini store (features, 2 workers)",
                      lambda: measured_bytes_per_hour(args.mini, root / "librispeech-mini"))
            shutil.rmtree(root / "librispeech-mini")
        index = steps.run("generate the index", lambda: librispeech_like_index(args.utterances, args.speakers))
        hours = index.frames.sum() / FRAMES_PER_SECOND / 3600
        steps.run("write the store (sparse frames)", lambda: write_sparse_store(root, index, args.layout))
        frame_bytes = int(index.frames.sum()) * NUM_BANDS * 2
        disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        print(f"  {len(index):,} utterances, {index.speaker.nunique():,} speakers, {hours:,.0f} h of features, "
              f"{index.frames.sum():,} frames: frames {frame_bytes / 1e9:.1f} GB ({frame_bytes / hours / 1e6:.1f} MB "
              f"per hour), index+baseline+meta {(disk - frame_bytes) / 1e6:.0f} MB")
        store = steps.run("FeatureStore.open", lambda: S.FeatureStore.open(root))
        split = steps.run(f"split_utterances ({args.eval_speakers} evaluation speakers)", lambda: split_utterances(
            store.index, eval_speakers=args.eval_speakers, validation_fraction=0.1, seed=7))
        trials = steps.run("make_trials (max 200,000 non-target)",
                           lambda: make_trials(split, max_nontarget=200_000, seed=7))
        print(f"  {trials.label.sum():,} target and {(trials.label == 0).sum():,} non-target trials; "
              f"roles {split.role.value_counts().to_dict()}")
        train = split[split.role == "train"]
        positions = steps.run("store.position(training utterances)", lambda: store.position(train.utterance))
        labels = train.label.to_numpy()

        steps.run("import keras (batching)", lambda: __import__("voiceprint.training.batching"))
        from voiceprint.training.batching import ClassificationBatches, SpeakerBatches

        classification = steps.run("ClassificationBatches(batch 64, 160 frames)", lambda: ClassificationBatches(
            store, positions, labels, batch_size=64, frames=160, seed=0))
        steps.run(f"  {args.batches} batches", lambda: _consume(classification, args.batches))
        speaker = steps.run("SpeakerBatches(P 16 x K 4, 160 frames)", lambda: SpeakerBatches(
            store, positions, labels, frames=160, speakers_per_batch=16, utterances_per_speaker=4,
            steps=args.batches, seed=0))
        x, y = speaker[0]
        assert x.shape == (64, 160, NUM_BANDS, 1) and len(set(y.tolist())) == 16
        steps.run(f"  {args.batches} batches", lambda: _consume(speaker, args.batches))
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB; "
          f"load average {load_average()}")


if __name__ == "__main__":
    main()
