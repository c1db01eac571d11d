"""Stage evaluate: score the evaluation trials with every system, write metrics/eval.json and figures, and
package the deployed system with its calibrated thresholds as models/voiceprint
(evaluate.* params, and tdnn.fusion / tdnn.fusion_weight).

Systems: the softmax-only model, the base (triplet) model, base+head, their fusion (unless tdnn.fusion is none)
and the no-training MFCC baseline.
"""
import json

from voiceprint.outputs import write_csv, write_metrics
from voiceprint.params import ParamsError, load_params
from voiceprint.runtime import configure_tensorflow, load_model
from voiceprint.stage import run_stage

MODELS = {"softmax": "models/softmax.keras", "base": "models/triplet.keras", "head": "models/tdnn_head.keras"}
TRAINING_CURVES = {"softmax": "plots/softmax.csv", "triplet": "plots/triplet.csv", "tdnn_head": "plots/tdnn_head.csv"}
FIGURES = "plots/eval"
BUNDLE = "models/voiceprint"


def main() -> None:
    params = load_params()
    p = params.section("evaluate")
    window = p.int("window_frames", min=0)
    hop = p.int("hop_frames", min=1)
    p_target = p.float("p_target", min=0.0, max=1.0, min_exclusive=True)
    low_far = p.float("low_far", min=0.0, max=1.0, min_exclusive=True)
    bootstrap = p.int("bootstrap", min=0)
    seed = p.int("seed", min=0)
    deploy = p.str("deploy", choices=["base", "head", "fused"])
    cross_corpus = p.str("cross_corpus")
    tdnn = params.section("tdnn")
    from voiceprint.evaluation import FUSIONS, fusion_base_weight

    fusion = tdnn.str("fusion", choices=FUSIONS)
    base_weight = fusion_base_weight(fusion, tdnn.float("fusion_weight", min=0.0, max=1.0))
    if deploy == "fused" and base_weight is None:
        raise ParamsError("params.yaml: evaluate.deploy: 'fused' needs tdnn.fusion concat or score, not none")
    configure_tensorflow(seed)
    from voiceprint import metrics, plots
    from voiceprint.bundle import save_bundle
    from voiceprint.embedding import embed_utterances
    from voiceprint.evaluation import cosine_scores, fuse, guard_against_base, report_system, znorm_baseline
    from voiceprint.models import fuse_models
    from voiceprint.splits import read_split
    from voiceprint.store import META_FILE, FeatureStore

    store = FeatureStore.open("data/features")
    split, trials = read_split("data/model_inputs")
    ev = split[split.role == "evaluation"]
    positions = store.position(ev.utterance)
    models = {name: load_model(path, what=f"{name} model") for name, path in MODELS.items()}
    embeddings = {name: embed_utterances(model, store, positions, window_frames=window, hop_frames=hop,
                                         progress=True, desc=name) for name, model in models.items()}
    if base_weight is not None:
        embeddings["fused"] = fuse(embeddings["base"], embeddings["head"], fusion, base_weight)
        models["fused"] = fuse_models(models["base"], models["head"], base_weight)
    train_rows = store.position(split[split.role == "train"].utterance)
    embeddings["mfcc_baseline"] = znorm_baseline(store.baseline, train_rows)[positions]

    report, scores = {}, {}
    labels = trials.label.to_numpy()
    for name, emb in embeddings.items():
        scores[name] = cosine_scores(emb, ev.utterance.to_numpy(), trials)
        report[name] = report_system(scores[name], trials, emb, ev.speaker.to_numpy(), p_target=p_target,
                                     bootstrap=bootstrap, seed=seed)
        write_csv(f"plots/det/{name}.csv", metrics.det_points(scores[name], labels))
    deltas, verdicts = guard_against_base(report, scores=scores, trials=trials, bootstrap=bootstrap, seed=seed)
    report.update(deltas)
    report["deployed"] = deploy

    thresholds = {"eer": report[deploy]["eer_threshold"], "low_far_rate": low_far,
                  "low_far": metrics.threshold_at_far(scores[deploy], labels, low_far)}
    meta = json.loads((store.directory / META_FILE).read_text())
    features = {"kind": store.kind, "vad": meta.get("vad", "original"), "num_bands": store.num_bands,
                "sample_rate": meta.get("sample_rate", 16000), "min_seconds": meta.get("min_seconds", 0.0),
                "window_frames": window, "hop_frames": hop}
    save_bundle(BUNDLE, models[deploy], system=deploy, features=features, thresholds=thresholds,
                evaluation={k: report[deploy][k] for k in ("eer", "min_dcf", "target_trials", "nontarget_trials")})

    from voiceprint.cross_corpus import has_recordings
    if has_recordings(cross_corpus):
        report["cross_corpus"] = score_cross_corpus(cross_corpus, models, store, features, train_rows, base_weight,
                                                    fusion, p_target=p_target, bootstrap=bootstrap, seed=seed)
    else:
        print(f"evaluate: evaluate.cross_corpus {cross_corpus!r} holds no recordings: no cross-corpus evaluation")

    plots.det_curve({name: (scores[name], labels) for name in scores}, f"{FIGURES}/det.png",
                    title=f"DET, {report['base']['target_trials']} target / "
                          f"{report['base']['nontarget_trials']} non-target trials")
    for name in scores:
        if name in ("base", "head", "fused"):
            plots.score_histograms(scores[name], labels, f"{FIGURES}/scores_{name}.png", title=f"{name} scores",
                                   threshold=report[name]["eer_threshold"], threshold_label="EER threshold")
    plots.embedding_projection(embeddings[deploy], ev.speaker.to_numpy(), f"{FIGURES}/projection.png",
                               method="tsne", seed=seed, title=f"{deploy}: evaluation speakers (t-SNE)")
    plots.training_curves(TRAINING_CURVES, f"{FIGURES}/training.png")
    write_metrics("metrics/eval.json", report)

    systems = [(name, report[name]) for name in embeddings]
    systems += [(f"{name} (cross-corpus)", r) for name, r in report.get("cross_corpus", {}).items()
                if isinstance(r, dict)]
    for name, r in systems:
        ci = (f"  95% CI {100 * r['eer_ci95_low']:.1f}-{100 * r['eer_ci95_high']:.1f}"
              if "eer_ci95_low" in r else "")
        print(f"evaluate: {name:28s} EER {100 * r['eer']:5.2f}%{ci}  minDCF {r['min_dcf']:.3f}  "
              f"({r['target_trials']} target / {r['nontarget_trials']} non-target trials)")
    print(f"evaluate: deployed {deploy} -> {BUNDLE} (EER threshold {thresholds['eer']:.4f}, "
          f"{100 * low_far:g}% false-accept threshold {thresholds['low_far']:.4f})")
    for line in verdicts:
        print(line)


def score_cross_corpus(source, models, store, features, train_rows, base_weight, fusion, **report_args) -> dict:
    """Every system (and the MFCC baseline) on all pairs of a corpus never trained on (evaluate.cross_corpus)."""
    from voiceprint.cross_corpus import load_eval_set
    from voiceprint.embedding import embed_features
    from voiceprint.evaluation import cosine_scores, fuse, report_system, znorm_baseline
    from voiceprint.runtime import default_workers

    eval_set = load_eval_set(source, kind=features["kind"], vad=features["vad"], sample_rate=features["sample_rate"],
                             min_seconds=features["min_seconds"], workers=default_workers(), seed=report_args["seed"])
    for row in eval_set.rejected.itertuples():
        print(f"  cross-corpus: left out {row.path}: {row.reason}: {row.message}")
    embeddings = {name: embed_features(model, eval_set.features, window_frames=features["window_frames"],
                                       hop_frames=features["hop_frames"], desc=f"{name} (cross-corpus)")
                  for name, model in models.items() if name != "fused"}
    if base_weight is not None:
        embeddings["fused"] = fuse(embeddings["base"], embeddings["head"], fusion, base_weight)
    embeddings["mfcc_baseline"] = znorm_baseline(store.baseline, train_rows, apply_to=eval_set.baseline)
    out = {name: report_system(cosine_scores(emb, eval_set.utterances, eval_set.trials), eval_set.trials, emb,
                               eval_set.speakers, **report_args) for name, emb in embeddings.items()}
    out.update(speakers=int(len(set(eval_set.speakers))), utterances=len(eval_set.utterances),
               left_out=len(eval_set.rejected))
    return out


if __name__ == "__main__":
    run_stage(main)
