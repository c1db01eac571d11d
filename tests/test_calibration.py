"""voiceprint.evaluation.calibration: linear LLR calibration, Cllr, minCllr (PAV), actDCF, checked against closed
forms."""
import math

import numpy as np
import pytest

from voiceprint.evaluation import calibration as C
from voiceprint.evaluation import metrics
from voiceprint.core.errors import DataError

# Equal-variance Gaussian scores (cosine-like numbers): the ideal LLR is linear with a closed form.
MU_TARGET, MU_NONTARGET, SD = 0.6, 0.1, 0.15
VAR = SD ** 2
IDEAL_SCALE = (MU_TARGET - MU_NONTARGET) / VAR                       # 22.22...
IDEAL_OFFSET = -(MU_TARGET ** 2 - MU_NONTARGET ** 2) / (2 * VAR)    # -7.77...


def gaussian_trials(n_target, n_nontarget, seed):
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.normal(MU_TARGET, SD, n_target), rng.normal(MU_NONTARGET, SD, n_nontarget)])
    labels = np.concatenate([np.ones(n_target, int), np.zeros(n_nontarget, int)])
    return scores, labels


def ideal_cllr():
    """Cllr of the true LLR: with d = (mu1 - mu0) / sd, the LLR of a target trial is N(d^2/2, d^2), and by
    symmetry Cllr = E[log2(1 + exp(-L))] over it; the expectation by 200-point Gauss-Hermite quadrature."""
    d2 = ((MU_TARGET - MU_NONTARGET) / SD) ** 2
    x, w = np.polynomial.hermite.hermgauss(200)
    llr = d2 / 2 + math.sqrt(2 * d2) * x
    return float(w @ np.logaddexp(0, -llr) / math.sqrt(math.pi) / math.log(2))


def test_ideal_llr_closed_form_matches_the_gaussian_densities():
    s = np.array([-0.2, 0.3, 0.9])
    log_density = lambda mu: -(s - mu) ** 2 / (2 * VAR)   # noqa: E731 (the common normaliser cancels)
    np.testing.assert_allclose(IDEAL_SCALE * s + IDEAL_OFFSET, log_density(MU_TARGET) - log_density(MU_NONTARGET),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prior", [0.5, 0.01])
def test_fit_recovers_the_ideal_linear_llr_at_any_prior(prior):
    scores, labels = gaussian_trials(20_000, 40_000, seed=1)
    fitted = C.fit_llr_calibration(scores, labels, prior=prior)
    assert fitted.fit_prior == prior
    assert fitted.scale == pytest.approx(IDEAL_SCALE, rel=0.05)
    assert fitted.offset == pytest.approx(IDEAL_OFFSET, rel=0.05)


def test_fit_reaches_the_minimum_of_the_weighted_objective():
    scores, labels = gaussian_trials(300, 900, seed=2)
    fitted = C.fit_llr_calibration(scores, labels, prior=0.3)

    def objective(a, b):
        z = a * scores + b + C.logit(0.3)
        return (0.3 * np.mean(np.logaddexp(0, -z[labels == 1])) + 0.7 * np.mean(np.logaddexp(0, z[labels == 0])))

    best = objective(fitted.scale, fitted.offset)
    for da, db in [(0.01, 0), (-0.01, 0), (0, 0.01), (0, -0.01)]:
        assert objective(fitted.scale * (1 + da), fitted.offset + db) > best


def test_cllr_of_perfectly_calibrated_llrs_is_the_closed_form_ideal():
    scores, labels = gaussian_trials(50_000, 50_000, seed=3)
    ideal = ideal_cllr()
    assert 0.05 < ideal < 0.6       # a meaningful operating range, not a degenerate one
    true_llr = IDEAL_SCALE * scores + IDEAL_OFFSET
    assert C.cllr(true_llr, labels) == pytest.approx(ideal, rel=0.03)
    fitted = C.fit_llr_calibration(scores, labels)
    assert C.cllr(fitted.llr(scores), labels) == pytest.approx(ideal, rel=0.03)
    # PAV can only do better on the trials it is fitted to, and only a little for already calibrated LLRs.
    assert ideal * 0.9 < C.min_cllr(scores, labels) <= C.cllr(true_llr, labels)


def test_cllr_known_values():
    labels = np.array([1, 0])
    assert C.cllr(np.zeros(2), labels) == pytest.approx(1.0)             # LLR 0: uninformative, 1 bit
    assert C.cllr(np.array([1.0, -1.0]), labels) == pytest.approx(math.log2(1 + math.exp(-1)))


def test_pav_hand_example():
    # Sorted labels 0, 1, 0, 1: PAV pools the middle pair -> posteriors 0, 1/2, 1/2, 1 at data prior 1/2,
    # LLRs -inf, 0, 0, +inf, so Cllr = (log2(2) / 2 + log2(2) / 2) / 2 = 0.5.
    scores, labels = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0, 1, 0, 1])
    np.testing.assert_array_equal(C.pav_llrs(scores, labels), [-np.inf, 0.0, 0.0, np.inf])
    assert C.min_cllr(scores, labels) == pytest.approx(0.5)


def test_pav_pools_tied_scores():
    # A tie of a target and a non-target cannot be split by any threshold: one block, posterior 1/2.
    scores, labels = np.array([0.0, 1.0, 1.0, 2.0]), np.array([0, 1, 0, 1])
    np.testing.assert_array_equal(C.pav_llrs(scores, labels), [-np.inf, 0.0, 0.0, np.inf])
    # With a target share of 1/4, LLR = posterior log-odds - log(1/3).
    llr = C.pav_llrs(np.array([0.0, 1.0, 1.0, 1.0]), np.array([0, 1, 0, 0]))
    np.testing.assert_allclose(llr[1:], math.log(1 / 2) + math.log(3))


def test_act_dcf_uses_the_bayes_threshold():
    assert C.bayes_threshold(0.01) == pytest.approx(math.log(99))
    assert C.bayes_threshold(0.5) == 0.0
    # p = 0.5, threshold 0: one target of two below it (miss 1/2), one non-target of two at or above (fa 1/2).
    llrs, labels = np.array([-1.0, 2.0, 0.0, -3.0]), np.array([1, 1, 0, 0])
    assert C.act_dcf(llrs, labels, 0.5) == pytest.approx((0.5 * 0.5 + 0.5 * 0.5) / 0.5)
    # p = 0.01 (threshold 4.6): everything rejected, miss 1: cost p / min(p, 1 - p) = 1.
    assert C.act_dcf(llrs, labels, 0.01) == pytest.approx(1.0)


def test_act_dcf_of_ideal_llrs_is_near_min_dcf():
    scores, labels = gaussian_trials(50_000, 50_000, seed=4)
    llr = IDEAL_SCALE * scores + IDEAL_OFFSET
    summary = C.llr_summary(llr, labels, p_target=0.05)
    assert summary["min_dcf"] <= summary["act_dcf"] <= summary["min_dcf"] + 0.02
    assert summary["min_dcf"] == metrics.min_dcf(scores, labels, 0.05)[0]    # minDCF is invariant to the map


def test_calibration_lowers_cllr_of_raw_cosines_on_held_out_trials():
    # Cosine-like raw scores are badly calibrated as LLRs (their range is 2 nats): a calibration fitted on
    # one set of trials must lower the Cllr on another drawn from the same distributions, at two priors.
    fit_scores, fit_labels = gaussian_trials(400, 8_000, seed=5)
    scores, labels = gaussian_trials(400, 8_000, seed=6)
    raw = C.cllr(scores, labels)
    for prior in (0.5, 0.05):
        fitted = C.fit_llr_calibration(fit_scores, fit_labels, prior=prior)
        calibrated = C.cllr(fitted.llr(scores), labels)
        assert calibrated < raw
        assert calibrated >= C.min_cllr(scores, labels) - 1e-12
        assert C.act_dcf(fitted.llr(scores), labels, 0.05) < C.act_dcf(scores, labels, 0.05)


def test_decisions_at_a_prior():
    cal = C.LlrCalibration(scale=10.0, offset=-5.0)
    np.testing.assert_array_equal(cal.accept([0.5, 0.9, 0.96], 0.01), [False, False, True])   # llr >= log 99
    np.testing.assert_array_equal(cal.accept([0.5, 0.49], 0.5), [True, False])


def test_separated_trials_have_no_finite_calibration():
    with pytest.raises(DataError, match="perfectly separated"):
        C.fit_llr_calibration([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0])


def test_round_trip_and_bad_calibration_files():
    cal = C.LlrCalibration(scale=12.5, offset=-3.25, fit_prior=0.5)
    assert C.parse_calibration(cal.to_dict(), "x.json") == cal
    with pytest.raises(DataError, match="x.json: kind"):
        C.parse_calibration({**cal.to_dict(), "kind": "platt"}, "x.json")
    with pytest.raises(DataError, match="x.json: scale: expected a finite number"):
        C.parse_calibration({**cal.to_dict(), "scale": float("nan")}, "x.json")
    with pytest.raises(DataError, match="x.json: fit_prior"):
        C.parse_calibration({**cal.to_dict(), "fit_prior": 1.0}, "x.json")


def _speaker_embeddings(speakers=8, per_speaker=5, dim=16, spread=0.8, seed=0):
    """Unit embeddings of ``speakers`` clusters (centroid + noise) and the split rows of their utterances."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(speakers, dim))
    rows, emb = [], []
    for s in range(speakers):
        for u in range(per_speaker):
            rows.append((f"s{s}-{u}", f"s{s}", "evaluation"))
            emb.append(centroids[s] + spread * rng.normal(size=dim) * np.linalg.norm(centroids[s]) / np.sqrt(dim))
    emb = np.array(emb, np.float32)
    return pd.DataFrame(rows, columns=["utterance", "speaker", "role"]), emb / np.linalg.norm(emb, axis=1,
                                                                                               keepdims=True)


def test_evaluate_fits_on_held_out_speakers_and_reports_on_the_others():
    from stages.evaluate import fit_llr_on_held_out_speakers
    from voiceprint.evaluation.scoring import cosine_scores
    from voiceprint.data.splits import make_trials

    ev, emb = _speaker_embeddings()
    trials = make_trials(ev, max_nontarget=10_000, seed=0)
    raw = cosine_scores(emb, ev.utterance.to_numpy(), trials)
    report = {}
    fitted, fit = fit_llr_on_held_out_speakers(report, "base", raw, ev, trials, emb, None, None, share=0.5,
                                               prior=0.5, p_target=0.01, seed=3)
    block = report["calibration"]
    held = C.calibration_speakers(ev.speaker, 0.5, 3)
    assert len(held) == 4 and block["fit_speakers"] == 4 and block["speakers"] == 4
    # fitted on every pair among the held-out speakers: 4 x C(5, 2) targets, C(20, 2) - 40 non-targets
    assert (block["fit_target_trials"], block["fit_nontarget_trials"]) == (40, 190 - 40)
    # reported on the trials among the other 4 only: disjoint from the fit, nothing counted twice
    touching = trials.enroll_speaker.isin(held) | trials.test_speaker.isin(held)
    assert block["left_out_trials"] == int(touching.sum())
    assert block["target_trials"] + block["nontarget_trials"] == int((~touching).sum())
    assert block["calibrated"]["cllr"] < block["raw"]["cllr"]
    assert block["calibrated"]["min_cllr"] == block["raw"]["min_cllr"]        # a monotone map: same PAV optimum
    assert fitted.scale > 0 and fit["held_out"]["cllr"] == block["calibrated"]["cllr"]
    # the same split and fit when run again (seeded)
    again = {}
    fit_llr_on_held_out_speakers(again, "base", raw, ev, trials, emb, None, None, share=0.5, prior=0.5,
                                 p_target=0.01, seed=3)
    assert again == report


def test_evaluate_skips_the_calibration_with_too_few_speakers(capsys):
    from stages.evaluate import fit_llr_on_held_out_speakers
    from voiceprint.evaluation.scoring import cosine_scores
    from voiceprint.data.splits import make_trials

    ev, emb = _speaker_embeddings(speakers=3)
    trials = make_trials(ev, max_nontarget=10_000, seed=0)
    report = {}
    assert fit_llr_on_held_out_speakers(report, "base", cosine_scores(emb, ev.utterance.to_numpy(), trials), ev,
                                        trials, emb, None, None, share=0.5, prior=0.5, p_target=0.01,
                                        seed=0) == (None, None)
    assert report == {} and "too few to hold out calibration speakers" in capsys.readouterr().out
