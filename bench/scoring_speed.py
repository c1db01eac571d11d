"""Scoring and embedding speed: score_summary on a million trials, and batched vs one-by-one embedding.

    python bench/scoring_speed.py [--trials 1000000] [--utterances 200] [--repeat 5] [--threads 0]

1. EER + minDCF (``metrics.score_summary``) on --trials synthetic trials (5% targets, float32-rounded cosine-like
   scores, so ties occur), against the previous implementation (validated and sorted the trials twice, with a
   stable sort, once for the EER and once for minDCF) reconstructed here; the two must agree exactly.
2. Embeddings of --utterances feature arrays of LibriSpeech-like lengths (200-1,600 frames) with the default
   CPU-sized ResCNN (random weights: speed does not depend on them): ``embedding.embed_utterances`` (one utterance
   per model call, what the evaluate stage does) vs ``embedding.embed_features`` (equal-length inputs batched),
   for whole utterances and for 160-frame windows every 80 frames.  Same features (float16-rounded, as stored).
Times are the best of --repeat passes; the load average is printed.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from _shared_data import load_average  # noqa: E402  (bench/ is on sys.path)

from voiceprint.evaluation import metrics as M  # noqa: E402


def previous_score_summary(scores, labels, p_target=0.01):
    """score_summary as it was: eer() and min_dcf() each validated and stable-sorted the trials."""
    def curve():
        s, y, _ = M._check_trials(scores, labels)
        order, starts, thresholds = M._sort_trials(s, stable=True)
        return (*M._rates_sorted(y[order], None, starts), thresholds)

    e, et = M._eer_from_curve(*curve())
    c, ct = M._min_dcf_from_curve(*curve(), p_target)
    return e, et, c, ct


def _best(fn, repeat):
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def scoring(trials: int, repeat: int) -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(trials) < 0.05).astype(np.int64)
    scores = (0.1 * rng.standard_normal(trials) + 0.4 * labels).astype(np.float32).astype(np.float64)
    ours_s, summary = _best(lambda: M.score_summary(scores, labels), repeat)
    prev_s, previous = _best(lambda: previous_score_summary(scores, labels), repeat)
    same = previous == (summary["eer"], summary["eer_threshold"], summary["min_dcf"], summary["min_dcf_threshold"])
    print(f"score_summary, {trials:,} trials ({labels.sum():,} targets, {np.unique(scores).size:,} distinct "
          f"scores): {ours_s:.3f} s; previous (2 stable sorts) {prev_s:.3f} s: {prev_s / ours_s:.2f}x; "
          f"identical results: {same}; EER {summary['eer']:.4f}, minDCF {summary['min_dcf']:.4f}")


def embedding(utterances: int, repeat: int, threads: int) -> None:
    from voiceprint.core.embedding import embed_features, embed_utterances
    from voiceprint.models.rescnn import build_rescnn
    from voiceprint.core.runtime import configure_tensorflow
    from voiceprint.data.store import FeatureStore, StoreWriter

    configure_tensorflow(0, threads)
    model, _ = build_rescnn(filters=(16, 32, 64, 128), blocks=1)
    rng = np.random.default_rng(1)
    lengths = rng.integers(200, 1601, utterances)
    with tempfile.TemporaryDirectory(prefix="scoring_speed_") as tmp:
        writer = StoreWriter(tmp, num_bands=64, kind="bench")
        for i, n in enumerate(lengths):
            writer.add(f"u{i}", "s", f"u{i}", rng.standard_normal((n, 64)).astype(np.float32), np.zeros(40))
        writer.close()
        store = FeatureStore.open(tmp)
        features = [store[i] for i in range(len(store))]  # the float16-rounded values embed_utterances reads
        positions = np.arange(len(store))
        print(f"embedding {utterances} utterances of {lengths.min()}-{lengths.max()} frames "
              f"({lengths.sum() / 100:.0f} s of audio), ResCNN 16/32/64/128 x 1 block, {threads or 'all'} threads")
        for window, hop in ((0, 0), (160, 80)):
            # warm up tracing for every shape outside the timing
            embed_utterances(model, store, positions[:3], window_frames=window, hop_frames=hop)
            embed_features(model, features[:3], window_frames=window, hop_frames=hop)
            one_s, one = _best(lambda: embed_utterances(model, store, positions, window_frames=window,
                                                        hop_frames=hop), repeat)
            batch_s, batched = _best(lambda: embed_features(model, features, window_frames=window,
                                                            hop_frames=hop), repeat)
            mode = "whole utterances" if window == 0 else f"{window}-frame windows, hop {hop}"
            print(f"  {mode:28s} one by one {one_s:7.2f} s, batched {batch_s:7.2f} s: "
                  f"{one_s / batch_s:5.2f}x; max |difference| {np.abs(one - batched).max():.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=1_000_000)
    ap.add_argument("--utterances", type=int, default=200, help="0: skip the embedding part")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="TensorFlow threads (0: all cores)")
    args = ap.parse_args()
    print(f"load average: {load_average()} ({os.cpu_count()} cores)")
    scoring(args.trials, args.repeat)
    if args.utterances:
        embedding(args.utterances, max(1, args.repeat // 2), args.threads)
    print(f"load average: {load_average()}")


if __name__ == "__main__":
    main()
