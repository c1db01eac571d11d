"""Stage evaluate: score the evaluation trials with every system, write metrics/eval.json and figures, and
package the deployed system with its calibrated thresholds as models/voiceprint
(evaluate.* params: voiceprint.core.contracts.EvaluateSettings).

Systems: the softmax-only model, the base (triplet) model, base+head, their fusion (unless evaluate.fusion is none)
and the no-training MFCC baseline; with evaluate.stats_branch lda also the LDA-projected MFCC statistics
(``mfcc_lda``) and the deployed system joined with them (``<deployed>_mfcc_lda``, voiceprint.evaluation.stats_lda),
which is
then what the bundle serves; with evaluate.score_norm as_norm also that served system's AS-normalised scores
(``<served>_asnorm``), on which the bundle is then calibrated and which it carries the cohort for.

Trials: the list data/model_inputs generated (evaluate.trials ""), or a Kaldi/VoxCeleb list under data/trials/ of
utterance ids of the feature store (voiceprint.evaluation.trials); listed trials that cannot be scored are counted in
eval.json ``trials`` and named in the log. LLR calibration (voiceprint.evaluation.calibration): fitted on all trials
among a
seeded share (evaluate.calibration_speakers) of the evaluation speakers, judged on the listed trials among the
others (eval.json ``calibration``: Cllr, minCllr, actDCF, minDCF of the raw and the calibrated scores), stored in
the bundle as llr_calibration.json; the decision thresholds are measured on all trials as before.
"""
import dataclasses

from voiceprint.core.contracts import EvaluateSettings
from voiceprint.core.outputs import write_csv, write_metrics
from voiceprint.core.params import Params, load_params
from voiceprint.core.runtime import configure_tensorflow, load_model
from voiceprint.core.stage import run_stage

MODELS = {"softmax": "models/softmax.keras", "base": "models/triplet.keras"}
HEAD_DIR = "models/tdnn_head"    # the head alone (voiceprint.models.trained_head); systems:
                                 # voiceprint.evaluation.systems
TRAINING_CURVES = {"softmax": "plots/softmax.csv", "triplet": "plots/triplet.csv", "tdnn_head": "plots/tdnn_head.csv"}
FIGURES = "plots/eval"
BUNDLE = "models/voiceprint"


def read_settings(params: Params) -> EvaluateSettings:
    """Every param this stage reads (dvc.yaml lists the same; tests/test_contracts.py checks it)."""
    return EvaluateSettings.read(params)


def main() -> None:
    settings = read_settings(load_params())
    window, hop = settings.window_frames, settings.hop_frames
    p_target, low_far, bootstrap, seed = settings.p_target, settings.low_far, settings.bootstrap, settings.seed
    deploy, cross_corpus, trials_file = settings.deploy, settings.cross_corpus, settings.trials
    score_norm, cohort_top_n, cohort_utterances = settings.score_norm, settings.cohort_top_n, settings.cohort_utterances
    stats_branch, stats_weight = settings.stats_branch, settings.stats_weight
    calibration_share, calibration_prior = settings.calibration_speakers, settings.calibration_prior
    base_weight = settings.base_weight()     # evaluate.fusion and fusion_weight: None for no fused system
    configure_tensorflow(seed)
    from voiceprint.evaluation import metrics, plots
    from voiceprint.serving.bundle import save_bundle
    from voiceprint.core.embedding import embed_utterances
    from voiceprint.evaluation.scoring import cosine_scores, guard_against_base, report_system, znorm_baseline
    from voiceprint.models.trained_head import load_head
    from voiceprint.data.splits import read_split
    from voiceprint.evaluation.systems import Systems
    from voiceprint.data.store import FeatureStore

    store = FeatureStore.open("data/features")
    split, trials = read_split("data/model_inputs")
    listed = None
    if trials_file:
        from voiceprint.evaluation.trials import evaluation_trials

        trials, listed = evaluation_trials(trials_file, store.index, split)
        report_listed_trials(trials_file, listed)
    if score_norm == "as_norm":   # before any embedding: can the training speakers supply the top N?
        from voiceprint.evaluation.score_norm import check_top_n

        check_top_n(cohort_top_n, split[split.role == "train"].speaker.nunique())
    ev = split[split.role == "evaluation"]
    positions = store.position(ev.utterance)
    systems = Systems(*(load_model(path, what=f"{name} model") for name, path in MODELS.items()),
                      load_head(HEAD_DIR), base_weight)
    embeddings = systems.embed(lambda model, desc: embed_utterances(
        model, store, positions, window_frames=window, hop_frames=hop, progress=True, desc=desc))
    train = split[split.role == "train"]
    train_rows = store.position(train.utterance)
    embeddings["mfcc_baseline"] = znorm_baseline(store.baseline, train_rows)[positions]
    served, stats_lda = deploy, None
    if stats_branch == "lda":
        from voiceprint.evaluation.stats_lda import fit_stats_lda

        stats_lda = fit_stats_lda(store.baseline[train_rows], train.speaker.to_numpy(), weight=stats_weight)
        embeddings["mfcc_lda"] = stats_lda.project(store.baseline[positions])
        served = f"{deploy}_mfcc_lda"
        embeddings[served] = stats_lda.joint(embeddings[deploy], store.baseline[positions])

    report, scores = ({"trials": listed.counts()} if listed is not None else {}), {}
    labels = trials.label.to_numpy()
    for name, emb in embeddings.items():
        scores[name] = cosine_scores(emb, ev.utterance.to_numpy(), trials)
        report[name] = report_system(scores[name], trials, emb, ev.speaker.to_numpy(), p_target=p_target,
                                     bootstrap=bootstrap, seed=seed)
        write_csv(f"plots/det/{name}.csv", plots.det_table(scores[name], labels))
    deltas, verdicts = guard_against_base(report, scores=scores, trials=trials, bootstrap=bootstrap, seed=seed)
    report.update(deltas)
    report["deployed"] = deploy

    calibrated, cohort = served, None
    if score_norm == "as_norm":
        cohort = training_cohort(systems, store, split, deploy=deploy, per_speaker=cohort_utterances, seed=seed,
                                 window=window, hop=hop, stats_lda=stats_lda)
        calibrated = f"{served}_asnorm"
        verdicts.append(add_as_norm_system(report, scores, calibrated, served, embeddings[served], cohort,
                                           cohort_top_n, ev.utterance.to_numpy(), trials, p_target=p_target,
                                           bootstrap=bootstrap, seed=seed))

    thresholds = {"eer": report[calibrated]["eer_threshold"], "low_far_rate": low_far,
                  "low_far": metrics.threshold_at_far(scores[calibrated], labels, low_far)}
    llr_calibration, llr_fit = fit_llr_on_held_out_speakers(
        report, calibrated, scores[calibrated], ev, trials, embeddings[served], cohort, cohort_top_n,
        share=calibration_share, prior=calibration_prior, p_target=p_target, seed=seed)
    features = dataclasses.replace(store.features, window_frames=window, hop_frames=hop).to_dict()
    save_bundle(BUNDLE, systems.model(deploy), system=served, features=features, thresholds=thresholds,
                evaluation={k: report[calibrated][k] for k in ("eer", "min_dcf", "target_trials", "nontarget_trials")},
                score_norm=score_norm, cohort=cohort, cohort_top_n=cohort_top_n if cohort is not None else None,
                llr_calibration=llr_calibration, llr_fit=llr_fit, stats_lda=stats_lda,
                onnx=True)   # model.onnx for the TensorFlow-free runtime, checked against the Keras model

    from voiceprint.data.cross_corpus import has_recordings
    if has_recordings(cross_corpus):
        report["cross_corpus"] = score_cross_corpus(
            cross_corpus, systems, store, features, train_rows, deploy=deploy, cohort=cohort,
            top_n=cohort_top_n, stats_lda=stats_lda, p_target=p_target, bootstrap=bootstrap, seed=seed)
    else:
        print(f"evaluate: evaluate.cross_corpus {cross_corpus!r} holds no recordings: no cross-corpus evaluation")

    plots.det_curve({name: (scores[name], labels) for name in scores}, f"{FIGURES}/det.png",
                    title=f"DET, {report['base']['target_trials']} target / "
                          f"{report['base']['nontarget_trials']} non-target trials")
    for name in scores:
        if name in ("base", "head", "fused", served):
            plots.score_histograms(scores[name], labels, f"{FIGURES}/scores_{name}.png", title=f"{name} scores",
                                   threshold=report[name]["eer_threshold"], threshold_label="EER threshold")
    plots.embedding_projection(embeddings[served], ev.speaker.to_numpy(), f"{FIGURES}/projection.png",
                               method="tsne", seed=seed, title=f"{served}: evaluation speakers (t-SNE)")
    plots.training_curves(TRAINING_CURVES, f"{FIGURES}/training.png")
    write_metrics("metrics/eval.json", report)

    systems = [(name, report[name]) for name in scores]
    systems += [(f"{name} (cross-corpus)", r) for name, r in report.get("cross_corpus", {}).items()
                if isinstance(r, dict)]
    for name, r in systems:
        ci = (f"  95% CI {100 * r['eer_ci95_low']:.1f}-{100 * r['eer_ci95_high']:.1f}"
              if "eer_ci95_low" in r else "")
        print(f"evaluate: {name:28s} EER {100 * r['eer']:5.2f}%{ci}  minDCF {r['min_dcf']:.3f}  "
              f"({r['target_trials']} target / {r['nontarget_trials']} non-target trials)")
    print(f"evaluate: deployed {calibrated} -> {BUNDLE} (EER threshold {thresholds['eer']:.4f}, "
          f"{100 * low_far:g}% false-accept threshold {thresholds['low_far']:.4f})")
    for line in verdicts:
        print(line)


def report_listed_trials(trials_file: str, listed) -> None:
    """Every listed trial that cannot be scored is counted and its entries named: never dropped silently."""
    counts = listed.counts()
    print(f"evaluate: {trials_file}: {counts['scored_trials']} of {counts['listed_trials']} trials scored")
    if counts["missing_trials"]:
        print(f"evaluate: {counts['missing_trials']} trial(s) not scored, {counts['missing_entries']} entries: "
              + "; ".join(f"{e} ({r})" for e, r in listed.missing_entries.head(5).itertuples(index=False))
              + ("; ..." if counts["missing_entries"] > 5 else ""))


# Non-target trials among the calibration speakers fitted on at most (a seeded sample, as splits.make_trials).
MAX_CALIBRATION_NONTARGETS = 200_000


def fit_llr_on_held_out_speakers(report, system, raw_scores, ev, trials, embeddings, cohort, top_n, *, share,
                                 prior, p_target, seed):
    """The LLR calibration of ``system`` (``report["calibration"]`` and the bundle's llr_calibration.json).

    Honest by construction: it is fitted on the trials among a seeded share of the evaluation speakers (all their
    target pairs and up to MAX_CALIBRATION_NONTARGETS non-target pairs, scored as ``system``: cosine, or AS-norm
    with ``cohort``) and reported on the evaluation trials among the other speakers only; trials touching a
    calibration speaker are left out of that report (``left_out_trials``). Held-out *evaluation* speakers, not
    the training speakers' validation utterances: the model was trained on those speakers, so their scores are
    better separated than an unseen speaker's and a calibration fitted there would be over-confident.
    Returns (LlrCalibration or None, fit numbers for the bundle); None, with the reason printed, when there are
    too few speakers or the fit is impossible."""
    import numpy as np

    from voiceprint.evaluation.calibration import calibration_speakers, held_out_report
    from voiceprint.core.errors import DataError
    from voiceprint.evaluation.scoring import as_norm_scores, cosine_scores
    from voiceprint.data.splits import make_trials

    held = calibration_speakers(ev.speaker, share, seed)
    if held is None:
        print(f"evaluate: {ev.speaker.nunique()} evaluation speakers are too few to hold out calibration speakers "
              "(needs 2 on each side): no LLR calibration")
        return None, None
    fit_trials = make_trials(ev[ev.speaker.isin(held)], max_nontarget=MAX_CALIBRATION_NONTARGETS, seed=seed)
    utterances = ev.utterance.to_numpy()
    fit_scores = (as_norm_scores(embeddings, utterances, fit_trials, cohort, top_n) if cohort is not None
                  else cosine_scores(embeddings, utterances, fit_trials))
    reported = ~(trials.enroll_speaker.isin(held) | trials.test_speaker.isin(held)).to_numpy()
    labels = trials.label.to_numpy()
    try:
        fitted, block = held_out_report(fit_scores, fit_trials.label.to_numpy(), raw_scores[reported],
                                        labels[reported], prior=prior, p_target=p_target)
    except (DataError, ValueError) as exc:   # separable fit trials, or one class missing from the reported ones
        print(f"evaluate: no LLR calibration of {system}: {exc}")
        return None, None
    block.update(fit_speakers=len(held), speakers=int(ev.speaker.nunique()) - len(held),
                 left_out_trials=int(np.count_nonzero(~reported)))
    report["calibration"] = block
    raw, cal = block["raw"], block["calibrated"]
    print(f"evaluate: LLR calibration of {system} (fitted on {len(held)} speakers, {block['fit_target_trials']} / "
          f"{block['fit_nontarget_trials']} trials; reported on the {block['speakers']} others, "
          f"{block['target_trials']} / {block['nontarget_trials']} trials): Cllr raw {raw['cllr']:.3f} -> "
          f"calibrated {cal['cllr']:.3f} (minCllr {cal['min_cllr']:.3f}), actDCF {raw['act_dcf']:.3f} -> "
          f"{cal['act_dcf']:.3f} (minDCF {cal['min_dcf']:.3f}, prior {p_target:g})")
    if fitted.scale <= 0:
        print(f"WARNING: the LLR calibration of {system} has a scale of {fitted.scale:.3g} <= 0 (its scores are not "
              "higher for same-speaker trials): not stored in the bundle")
        return None, None
    fit = {k: block[k] for k in ("fit_speakers", "fit_target_trials", "fit_nontarget_trials")}
    fit.update(held_out={"speakers": block["speakers"], "target_trials": block["target_trials"],
                         "nontarget_trials": block["nontarget_trials"], "p_target": p_target,
                         **{k: cal[k] for k in ("cllr", "min_cllr", "act_dcf", "min_dcf")}})
    return fitted, fit


def score_cross_corpus(source, systems, store, features, train_rows, *, deploy, cohort, top_n, stats_lda=None,
                       **report_args) -> dict:
    """Every system (and the MFCC baseline; with a statistics branch, mfcc_lda and the served joint system; with a
    cohort, the served system with AS-norm too) on all pairs of a corpus never trained on (evaluate.cross_corpus)."""
    from voiceprint.data.cross_corpus import load_eval_set
    from voiceprint.core.embedding import embed_features
    from voiceprint.evaluation.scoring import as_norm_scores, cosine_scores, report_system, znorm_baseline
    from voiceprint.core.runtime import default_workers

    eval_set = load_eval_set(source, kind=features["kind"], vad=features["vad"], sample_rate=features["sample_rate"],
                             min_seconds=features["min_seconds"], workers=default_workers(), seed=report_args["seed"])
    if len(eval_set.rejected):     # every file is listed in the stage log by reason, never dropped silently
        for reason, rows in eval_set.rejected.groupby("reason"):
            print(f"  cross-corpus: left out {len(rows)} file(s), {reason}: " + ", ".join(rows.path.head(3))
                  + (", ..." if len(rows) > 3 else ""))
    embeddings = systems.embed(lambda model, desc: embed_features(
        model, eval_set.features, window_frames=features["window_frames"], hop_frames=features["hop_frames"],
        desc=f"{desc} (cross-corpus)"))
    embeddings["mfcc_baseline"] = znorm_baseline(store.baseline, train_rows, apply_to=eval_set.baseline)
    served = deploy
    if stats_lda is not None:
        embeddings["mfcc_lda"] = stats_lda.project(eval_set.baseline)
        served = f"{deploy}_mfcc_lda"
        embeddings[served] = stats_lda.joint(embeddings[deploy], eval_set.baseline)
    out = {name: report_system(cosine_scores(emb, eval_set.utterances, eval_set.trials), eval_set.trials, emb,
                               eval_set.speakers, **report_args) for name, emb in embeddings.items()}
    if cohort is not None:
        normalised = as_norm_scores(embeddings[served], eval_set.utterances, eval_set.trials, cohort, top_n)
        out[f"{served}_asnorm"] = report_system(normalised, eval_set.trials, None, None, **report_args)
    out.update(speakers=int(len(set(eval_set.speakers))), utterances=len(eval_set.utterances),
               left_out=len(eval_set.rejected))
    return out


def training_cohort(systems, store, split, *, deploy, per_speaker, seed, window, hop, stats_lda=None):
    """The AS-norm cohort: one mean embedding per training speaker (``score_norm.speaker_cohort``), embedded by the
    served system exactly as the evaluation utterances are (fused: base and head embeddings, then ``fuse``; with a
    statistics branch, joined with the LDA-projected MFCC statistics), from at most ``per_speaker`` training
    utterances each: a speaker mean needs few, and this bounds the cost."""
    from voiceprint.core.embedding import embed_utterances
    from voiceprint.evaluation.score_norm import pick_cohort_utterances, speaker_cohort

    picked = pick_cohort_utterances(split, per_speaker, seed)
    positions = store.position(picked.utterance)
    emb = systems.embed(lambda model, desc: embed_utterances(
        model, store, positions, window_frames=window, hop_frames=hop, progress=True, desc=f"cohort {desc}"),
        names=(deploy,))[deploy]
    if stats_lda is not None:
        emb = stats_lda.joint(emb, store.baseline[positions])
    return speaker_cohort(emb, picked.speaker.to_numpy())


def add_as_norm_system(report, scores, name, raw, embeddings, cohort, top_n, utterances, trials, *, p_target,
                       bootstrap, seed) -> str:
    """Score the trials of system ``raw`` with AS-norm as system ``name`` (into ``report`` and ``scores``, with its
    DET points), and ``<name>_minus_<raw>_eer`` with its paired interval: does the normalisation help?
    Returns the line to print."""
    from voiceprint.evaluation import plots
    from voiceprint.evaluation.scoring import as_norm_scores, paired_eer_difference_ci, report_system
    from voiceprint.core.outputs import write_csv

    scores[name] = as_norm_scores(embeddings, utterances, trials, cohort, top_n)
    # No original_protocol: it scores raw cosines, so it would repeat the raw system's numbers.
    report[name] = report_system(scores[name], trials, None, None, p_target=p_target, bootstrap=bootstrap,
                                 seed=seed)
    report[name].update(cohort_speakers=len(cohort), cohort_top_n=top_n)
    write_csv(f"plots/det/{name}.csv", plots.det_table(scores[name], trials.label.to_numpy()))
    key = f"{name}_minus_{raw}_eer"
    report[key] = report[name]["eer"] - report[raw]["eer"]
    line = f"{name} vs {raw}: EER {100 * report[key]:+.2f} points"
    if bootstrap > 0:
        low, high = paired_eer_difference_ci(scores[name], scores[raw], trials, n_boot=bootstrap, seed=seed)
        report[f"{key}_ci95_low"], report[f"{key}_ci95_high"] = low, high
        line += f" (paired 95% CI {100 * low:+.2f} to {100 * high:+.2f} points)"
    return line


if __name__ == "__main__":
    run_stage(main)
