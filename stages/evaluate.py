"""Stage evaluate: score the evaluation trials with every system and write metrics/eval.json
(evaluate.* params, and tdnn.fusion / tdnn.fusion_weight).

Systems: the softmax-only model, the base (triplet) model, base+head, their fusion (unless tdnn.fusion is none)
and the no-training MFCC baseline.
"""
from voiceprint.outputs import write_csv, write_metrics
from voiceprint.params import load_params
from voiceprint.runtime import configure_tensorflow, load_model
from voiceprint.stage import run_stage

MODELS = {"softmax": "models/softmax.keras", "base": "models/triplet.keras", "head": "models/tdnn_head.keras"}


def main() -> None:
    params = load_params()
    p = params.section("evaluate")
    window = p.int("window_frames", min=0)
    hop = p.int("hop_frames", min=1)
    p_target = p.float("p_target", min=0.0, max=1.0, min_exclusive=True)
    bootstrap = p.int("bootstrap", min=0)
    seed = p.int("seed", min=0)
    tdnn = params.section("tdnn")
    from voiceprint.evaluation import FUSIONS

    fusion = tdnn.str("fusion", choices=FUSIONS)
    fusion_weight = tdnn.float("fusion_weight", min=0.0, max=1.0)
    configure_tensorflow(seed)
    from voiceprint import metrics
    from voiceprint.embedding import embed_utterances
    from voiceprint.evaluation import cosine_scores, fuse, guard_against_base, report_system, znorm_baseline
    from voiceprint.splits import read_split
    from voiceprint.store import FeatureStore

    store = FeatureStore.open("data/features")
    split, trials = read_split("data/model_inputs")
    ev = split[split.role == "evaluation"]
    positions = store.position(ev.utterance)
    embeddings = {name: embed_utterances(load_model(path, what=f"{name} model"), store, positions,
                                         window_frames=window, hop_frames=hop, progress=True, desc=name)
                  for name, path in MODELS.items()}
    fused = fuse(embeddings["base"], embeddings["head"], fusion, fusion_weight)
    if fused is not None:
        embeddings["fused"] = fused
    train_rows = store.position(split[split.role == "train"].utterance)
    embeddings["mfcc_baseline"] = znorm_baseline(store.baseline, train_rows)[positions]

    report = {}
    labels = trials.label.to_numpy()
    for name, emb in embeddings.items():
        scores = cosine_scores(emb, ev.utterance.to_numpy(), trials)
        report[name] = report_system(scores, trials, emb, ev.speaker.to_numpy(), p_target=p_target,
                                     bootstrap=bootstrap, seed=seed)
        write_csv(f"plots/det/{name}.csv", metrics.det_points(scores, labels))
    deltas, warnings = guard_against_base(report)
    report.update(deltas)
    write_metrics("metrics/eval.json", report)
    for name in embeddings:
        r = report[name]
        ci = (f"  95% CI {100 * r['eer_ci95_low']:.1f}-{100 * r['eer_ci95_high']:.1f}"
              if "eer_ci95_low" in r else "")
        print(f"evaluate: {name:14s} EER {100 * r['eer']:5.2f}%{ci}  minDCF {r['min_dcf']:.3f}  "
              f"({r['target_trials']} target / {r['nontarget_trials']} non-target trials)")
    for line in warnings:
        print(line)


if __name__ == "__main__":
    run_stage(main)
