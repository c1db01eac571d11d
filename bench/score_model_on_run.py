"""Score any trained embedding model on another pipeline run's held-out trials (and, optionally, a cross-corpus
folder), exactly as the evaluate stage scores its own systems: e.g. the synthetic-only model on the real-speech
preset's 50 held-out speechocean762 speakers.

    python bench/score_model_on_run.py models/triplet.keras ../real --cross-corpus ../shared/data/librispeech-mini/LibriSpeech

Prints one JSON object: {"in_domain": {eer, ci, min_dcf, trials}, "cross_corpus": {...}}.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help=".keras embedding model")
    parser.add_argument("run", help="a repo copy whose data/features and data/model_inputs hold the trials")
    parser.add_argument("--cross-corpus", default="")
    parser.add_argument("--bootstrap", type=int, default=200)
    args = parser.parse_args()
    from voiceprint.core.runtime import configure_tensorflow, load_model

    configure_tensorflow(0)
    from voiceprint.data.cross_corpus import load_eval_set
    from voiceprint.core.embedding import embed_features, embed_utterances
    from voiceprint.evaluation.scoring import cosine_scores, report_system
    from voiceprint.core.runtime import default_workers
    from voiceprint.data.splits import read_split
    from voiceprint.data.store import FeatureStore

    run = Path(args.run)
    store = FeatureStore.open(run / "data/features")
    split, trials = read_split(run / "data/model_inputs")
    model = load_model(args.model, what="model")
    ev = split[split.role == "evaluation"]
    emb = embed_utterances(model, store, store.position(ev.utterance))
    keys = ("eer", "eer_ci95_low", "eer_ci95_high", "min_dcf", "target_trials", "nontarget_trials")
    settings = dict(p_target=0.01, bootstrap=args.bootstrap, seed=123)
    report = report_system(cosine_scores(emb, ev.utterance.to_numpy(), trials), trials, None, None, **settings)
    out = {"in_domain": {k: report[k] for k in keys}}
    if args.cross_corpus:
        meta = json.loads((store.directory / "store.json").read_text())     # features made as the run's
        s = load_eval_set(args.cross_corpus, kind=store.kind, vad=meta.get("vad", "original"),
                          sample_rate=int(meta.get("sample_rate", 16000)), min_seconds=meta.get("min_seconds", 0.0),
                          workers=default_workers())
        e = embed_features(model, s.features)
        r = report_system(cosine_scores(e, s.utterances, s.trials), s.trials, None, None, **settings)
        out["cross_corpus"] = {k: r[k] for k in keys}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
