"""Is the synthetic corpus an honest stand-in?  Speed, and how hard it is without training.

Generates the default-size corpus twice (with and without the per-utterance
recording channel) and reports:

* generation wall and CPU time and minutes of audio (the machine may be
  shared with other jobs, so the CPU time and the load average are printed too),
* a no-training baseline: per-utterance mean+std of 20 MFCCs (librosa, n_fft
  400, hop 160, 64 mels, on the signal trimmed with librosa.effects.trim at
  top_db=30), z-normalised with statistics of the training
  speakers, cosine scoring of all pairs of evaluation utterances -> EER,
  with and without channel.  The corpus should be hard for this (EER >= 20 %)
  and clearly easier without the channel (the channel is what hides the
  speaker from simple statistics);
  Speakers 0-199 train, 200-239 evaluate (all pairs of their utterances);
* a supervised sanity check that the speaker information is really there:
  LDA (shrinkage) trained on the training speakers (on the 40-d MFCC stats, and on a
  richer per-utterance feature: the MFCC stats plus the correlations between
  the MFCCs and the std of their deltas), cosine in the LDA space -> EER,
  which should be well below the baseline.

Usage:  python bench/synthetic_corpus_check.py --out /tmp/synth --workers 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voiceprint.data.corpus.synthetic import SAMPLE_RATE, generate  # noqa: E402

TRIM_TOP_DB = 30.0  # energy-based trimming of leading/trailing silence


def _features(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(baseline 40-d MFCC mean+std, richer 250-d per-utterance feature) of one file."""
    import librosa
    import soundfile as sf

    y, sr = sf.read(path, dtype="float32")
    assert sr == SAMPLE_RATE
    y, _ = librosa.effects.trim(y, top_db=TRIM_TOP_DB, frame_length=400, hop_length=160)
    mfcc = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=20, n_fft=400, hop_length=160, n_mels=64)
    base = np.concatenate([mfcc.mean(axis=1), mfcc.std(axis=1)])
    # Richer: also how the cepstra co-vary within the utterance (their correlation
    # matrix) and how fast they change (delta std).  A stationary channel only
    # shifts the cepstral means, so these keep the relative, within-utterance
    # structure (formant space, dynamics) that a trained network exploits.
    corr = np.corrcoef(mfcc)[np.triu_indices(mfcc.shape[0], k=1)]
    delta_std = librosa.feature.delta(mfcc).std(axis=1)
    rich = np.concatenate([base, corr, delta_std])
    return base, rich


def _one_thread() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _extract(out: Path, manifest, workers: int):
    paths = [str(out / p) for p in manifest["path"]]
    with multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread) as pool:
        feats = pool.map(_features, paths, chunksize=16)
    return np.array([f[0] for f in feats]), np.array([f[1] for f in feats])


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """Equal error rate: where the miss and false-alarm rates cross (interpolated)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1.0 - tpr
    i = int(np.nonzero(fnr <= fpr)[0][0])  # first threshold where misses drop below false alarms
    if i == 0:
        return float(fpr[0])
    # linear interpolation of (fpr - fnr) between points i-1 and i
    d0, d1 = fpr[i - 1] - fnr[i - 1], fpr[i] - fnr[i]
    w = d0 / (d0 - d1) if d0 != d1 else 0.0
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


def cosine_eer(emb: np.ndarray, speakers: np.ndarray) -> float:
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = emb @ emb.T
    iu = np.triu_indices(len(emb), k=1)
    same = speakers[:, None] == speakers[None, :]
    return eer(sim[iu], same[iu].astype(int))


def evaluate(base: np.ndarray, rich: np.ndarray, speakers: np.ndarray, train_mask: np.ndarray) -> dict:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    res = {}
    ev = ~train_mask
    for name, x in (("mfcc_stats", base), ("rich_stats", rich)):
        mu, sd = x[train_mask].mean(0), x[train_mask].std(0) + 1e-8
        z = (x - mu) / sd
        if name == "mfcc_stats":
            res["baseline_eer"] = cosine_eer(z[ev], speakers[ev])
        lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto")
        lda.fit(z[train_mask], speakers[train_mask])
        res[f"lda_{name}_eer"] = cosine_eer(lda.transform(z[ev]), speakers[ev])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/synth")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--speakers", type=int, default=240)
    ap.add_argument("--train-speakers", type=int, default=200)
    ap.add_argument("--utterances", type=int, default=20)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--max-seconds", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--channel", choices=("both", "on", "off"), default="both",
                    help="which corpora to generate and score (default both)")
    ap.add_argument("--keep", action="store_true", help="keep the generated corpora")
    args = ap.parse_args()

    results = {}
    for channel in {"both": (True, False), "on": (True,), "off": (False,)}[args.channel]:
        out = Path(args.out) / ("channel" if channel else "clean")
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]  # the machine may be shared: say how busy it was
        t0, c0 = time.perf_counter(), _cpu_seconds()
        manifest = generate(out, num_speakers=args.speakers, utterances_per_speaker=args.utterances,
                            min_seconds=args.min_seconds, max_seconds=args.max_seconds, seed=args.seed,
                            workers=args.workers, progress=False, channel=channel)
        gen_s, gen_cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        minutes = manifest["duration"].sum() / 60.0
        print(f"[channel={channel}] generated {len(manifest)} utterances, {minutes:.1f} min of audio "
              f"in {gen_s:.1f} s wall, {gen_cpu:.1f} s CPU (workers={args.workers}, "
              f"load average before: {load:.2f})", flush=True)
        t0 = time.perf_counter()
        base, rich = _extract(out, manifest, args.workers)
        speakers = manifest["speaker"].to_numpy()
        order = {s: i for i, s in enumerate(sorted(set(speakers)))}
        train_mask = np.array([order[s] < args.train_speakers for s in speakers])
        res = evaluate(base, rich, speakers, train_mask)
        print(f"[channel={channel}] features+scoring {time.perf_counter() - t0:.1f} s: "
              + ", ".join(f"{k}={100 * v:.1f}%" for k, v in res.items()), flush=True)
        results[channel] = (gen_s, gen_cpu, minutes, res)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    if len(results) < 2:
        return
    gen_s, gen_cpu, minutes, res = results[True]
    clean = results[False][3]
    print("\nsummary")
    print(f"  generation (channel on, workers={args.workers}): {gen_s:.1f} s wall, {gen_cpu:.1f} s CPU, "
          f"{minutes:.1f} min of audio")
    print(f"  baseline EER (MFCC mean+std, z-norm, cosine), channel on : {100 * res['baseline_eer']:.1f}%")
    print(f"  baseline EER, channel off                               : {100 * clean['baseline_eer']:.1f}%")
    print(f"  LDA EER on MFCC stats (channel on)                      : {100 * res['lda_mfcc_stats_eer']:.1f}%")
    print(f"  LDA EER on MFCC stats+correlations+delta (channel on)   : {100 * res['lda_rich_stats_eer']:.1f}%")


if __name__ == "__main__":
    main()
