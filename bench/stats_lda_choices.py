"""The statistics branch's choices on a pipeline run's held-out trials: LDA dimension, branch weight and AS-norm
top-N, one table (EER), each row scored as the evaluate stage scores ``<deployed>_mfcc_lda[_asnorm]``.

    python bench/stats_lda_choices.py ../real          # a run of params-real.yaml (data/, models/ present)

The network half is the run's deployed model (models/voiceprint/model.keras: the fused model), embedded once.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a repo copy whose data/ and models/voiceprint hold a finished run")
    parser.add_argument("--dims", default="10,20,30,0", help="LDA dimensions (0: all)")
    parser.add_argument("--weights", default="0.3,0.5,0.7")
    parser.add_argument("--top-n", default="20,50,100")
    args = parser.parse_args()
    from voiceprint.core.runtime import configure_tensorflow, load_model

    configure_tensorflow(0)
    from voiceprint.core.embedding import embed_utterances
    from voiceprint.evaluation.scoring import as_norm_scores, cosine_scores
    from voiceprint.evaluation.metrics import eer
    from voiceprint.evaluation.score_norm import pick_cohort_utterances, speaker_cohort
    from voiceprint.data.splits import read_split
    from voiceprint.evaluation.stats_lda import fit_stats_lda
    from voiceprint.data.store import FeatureStore

    run = Path(args.run)
    store = FeatureStore.open(run / "data/features")
    split, trials = read_split(run / "data/model_inputs")
    model = load_model(run / "models/voiceprint/model.keras", what="model")
    ev, train = split[split.role == "evaluation"], split[split.role == "train"]
    picked = pick_cohort_utterances(split, 3, 123)
    rows = {"ev": store.position(ev.utterance), "cohort": store.position(picked.utterance)}
    network = {k: embed_utterances(model, store, r) for k, r in rows.items()}
    labels = trials.label.to_numpy()
    utts = ev.utterance.to_numpy()

    def rate(scores):
        value = eer(scores, labels)
        return 100 * float(value[0] if isinstance(value, tuple) else value)

    print(f"network alone: {rate(cosine_scores(network['ev'], utts, trials)):.2f}%  "
          f"({int(labels.sum())} target / {int((labels == 0).sum())} non-target trials)")
    print("dim  weight  raw EER  " + "  ".join(f"AS-norm top {n}" for n in args.top_n.split(",")))
    train_rows = store.position(train.utterance)
    for dim in (int(d) for d in args.dims.split(",")):
        for weight in (float(w) for w in args.weights.split(",")):
            lda = fit_stats_lda(store.baseline[train_rows], train.speaker.to_numpy(), weight=weight, dim=dim)
            joint = {k: lda.joint(network[k], store.baseline[r]) for k, r in rows.items()}
            cohort = speaker_cohort(joint["cohort"], picked.speaker.to_numpy())
            normed = [rate(as_norm_scores(joint["ev"], utts, trials, cohort, int(n)))
                      for n in args.top_n.split(",")]
            print(f"{lda.output_dim:3d}  {weight:6.2f}  {rate(cosine_scores(joint['ev'], utts, trials)):6.2f}%  "
                  + "  ".join(f"{v:12.2f}%" for v in normed))


if __name__ == "__main__":
    main()
