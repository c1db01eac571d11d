"""Stage evaluate: score the evaluation trials with every system and write metrics/eval.json (evaluate.* params).

Systems: the softmax-only model, the base (triplet) model, base+head, and the no-training MFCC baseline.
"""
from voiceprint.outputs import write_csv, write_metrics
from voiceprint.params import load_params
from voiceprint.runtime import configure_tensorflow, load_model
from voiceprint.stage import run_stage

MODELS = {"softmax": "models/softmax.keras", "base": "models/triplet.keras", "head": "models/tdnn_head.keras"}


def main() -> None:
    p = load_params().section("evaluate")
    window = p.int("window_frames", min=0)
    hop = p.int("hop_frames", min=1)
    p_target = p.float("p_target", min=0.0, max=1.0, min_exclusive=True)
    bootstrap = p.int("bootstrap", min=0)
    seed = p.int("seed", min=0)
    configure_tensorflow(seed)
    from voiceprint import metrics
    from voiceprint.embedding import embed_utterances
    from voiceprint.evaluation import cosine_scores, report_system, znorm_baseline
    from voiceprint.splits import read_split
    from voiceprint.store import FeatureStore

    store = FeatureStore.open("data/features")
    split, trials = read_split("data/model_inputs")
    ev = split[split.role == "evaluation"]
    positions = store.position(ev.utterance)
    embeddings = {name: embed_utterances(load_model(path, what=f"{name} model"), store, positions,
                                         window_frames=window, hop_frames=hop, progress=True, desc=name)
                  for name, path in MODELS.items()}
    train_rows = store.position(split[split.role == "train"].utterance)
    embeddings["mfcc_baseline"] = znorm_baseline(store.baseline, train_rows)[positions]

    report = {}
    labels = trials.label.to_numpy()
    for name, emb in embeddings.items():
        scores = cosine_scores(emb, ev.utterance.to_numpy(), trials)
        report[name] = report_system(scores, trials, emb, ev.speaker.to_numpy(), p_target=p_target,
                                     bootstrap=bootstrap, seed=seed)
        write_csv(f"plots/det/{name}.csv", metrics.det_points(scores, labels))
    report["head_minus_base_eer"] = report["head"]["eer"] - report["base"]["eer"]
    write_metrics("metrics/eval.json", report)
    for name in embeddings:
        r = report[name]
        print(f"evaluate: {name:14s} EER {100 * r['eer']:5.2f}%  minDCF {r['min_dcf']:.3f}  "
              f"({r['target_trials']} target / {r['nontarget_trials']} non-target trials)")
    if report["head_minus_base_eer"] > 0:
        print(f"WARNING: the head is WORSE than the base model: EER +{100 * report['head_minus_base_eer']:.2f} "
              "points. A head must never cost recognition; check tdnn.* before using it.")


if __name__ == "__main__":
    run_stage(main)
