"""Score calibration: mapping verification scores to log-likelihood ratios, and the metrics that judge LLRs.

A *calibrated* score is a log-likelihood ratio, ``LLR = log p(score | target) / p(score | non-target)``: at any
prior ``P`` of a target, the Bayes decision is "accept iff ``LLR >= -log(P / (1 - P))``", with no threshold to
tune. The calibration here is the linear one of the BOSARIS toolkit (Brümmer & de Villiers): ``LLR = a * s + b``,
fitted by prior-weighted logistic regression at an effective prior ``P``: minimise

    P / N_t * sum_targets log(1 + exp(-(a s + b + logit P)))
    + (1 - P) / N_n * sum_nontargets log(1 + exp(a s + b + logit P))

The logistic regression gives posterior log-odds; the prior log-odds ``logit P`` is subtracted so that ``a s + b``
is an LLR, independent of the prior it was fitted at (for scores whose true LLR is linear, any ``P`` finds it).

Metrics (natural logs inside, reported in bits as BOSARIS does):

* ``cllr``: ``1 / (2 log 2) * (mean_t log(1 + exp(-LLR)) + mean_n log(1 + exp(LLR)))``: the cost of the LLRs as
  decisions at every prior; 0 perfect, 1 = an uninformative system that always says ``LLR = 0``.
* ``min_cllr``: the Cllr after the best monotone recalibration on the same trials (PAV: pool-adjacent-violators,
  the ROC convex hull); ``cllr - min_cllr`` is the calibration loss.
* ``act_dcf``: the normalised detection cost of the Bayes decision at ``p_target``; ``min_dcf``
  (``voiceprint.evaluation.metrics``) is the same cost at the best threshold, so ``act_dcf >= min_dcf`` up to ties.

Decisions follow ``voiceprint.evaluation.metrics``: accept iff ``llr >= threshold``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from voiceprint.evaluation import metrics
from voiceprint.core.errors import DataError

KIND = "linear_logistic_regression"
LOG2 = math.log(2.0)


def logit(p: float) -> float:
    """``log(p / (1 - p))`` for ``p`` in (0, 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a prior must lie in (0, 1), got {p}")
    return math.log(p) - math.log1p(-p)


def bayes_threshold(p_target: float) -> float:
    """The LLR threshold of the Bayes decision at prior ``p_target`` (equal costs): ``-logit(p_target)``."""
    return -logit(p_target)


@dataclass(frozen=True)
class LlrCalibration:
    """``llr = scale * score + offset``; ``fit_prior``: the effective prior of the logistic regression."""

    scale: float
    offset: float
    fit_prior: float = 0.5

    def llr(self, scores) -> np.ndarray:
        return self.scale * np.asarray(scores, dtype=np.float64) + self.offset

    def accept(self, scores, p_target: float) -> np.ndarray:
        """Bayes decisions at ``p_target``: accept iff ``llr >= -logit(p_target)``."""
        return self.llr(scores) >= bayes_threshold(p_target)

    def to_dict(self) -> dict:
        return {"kind": KIND, "scale": float(self.scale), "offset": float(self.offset),
                "fit_prior": float(self.fit_prior)}


def _split(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(target scores, non-target scores) after the checks of ``voiceprint.evaluation.metrics``."""
    s, y, _ = metrics._check_trials(scores, labels)
    return s[y], s[~y]


def _split_llrs(llrs: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_split` allowing infinite LLRs (the checks run on finite stand-ins)."""
    _, y, _ = metrics._check_trials(np.nan_to_num(llrs, posinf=0.0, neginf=0.0), labels)
    flat = llrs.ravel()
    return flat[y], flat[~y]


def _softplus(x: np.ndarray) -> np.ndarray:
    """``log(1 + exp(x))`` without overflow."""
    return np.logaddexp(0.0, x)


def fit_llr_calibration(scores, labels, *, prior: float = 0.5, max_iter: int = 100,
                        tol: float = 1e-12) -> LlrCalibration:
    """Prior-weighted linear logistic regression (module docstring) by Newton's method with step halving: the
    objective is convex in (a, b), so this finds its minimum. Raises DataError when the scores separate the two
    classes completely (no finite minimum: the scale would grow without bound)."""
    tar, non = _split(scores, labels)
    if tar.min() > non.max():
        raise DataError(f"calibration: every target score ({len(tar)}) is above every non-target score "
                        f"({len(non)}): perfectly separated trials have no finite linear calibration")
    x = np.concatenate([tar, non])
    sign = np.concatenate([np.ones(len(tar)), -np.ones(len(non))])       # +1 target, -1 non-target
    weight = np.concatenate([np.full(len(tar), prior / len(tar)), np.full(len(non), (1 - prior) / len(non))])
    shift = logit(prior)
    # Centre and scale the scores for the Newton steps (cosines and AS-norm scores have very different ranges).
    centre, spread = float(x.mean()), float(x.std()) or 1.0
    u = (x - centre) / spread
    design = np.stack([u, np.ones_like(u)], axis=1)

    def objective(w):
        return float(weight @ _softplus(-sign * (design @ w + shift)))

    w = np.zeros(2)
    value = objective(w)
    for _ in range(max_iter):
        z = design @ w + shift
        p = 1.0 / (1.0 + np.exp(sign * z))           # sigma(-sign * z): the gradient factor
        gradient = design.T @ (-weight * sign * p)
        curvature = weight * p * (1.0 - p)
        hessian = design.T @ (design * curvature[:, None]) + 1e-15 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        t, improved = 1.0, False
        while t > 1e-10:
            candidate = w - t * step
            new_value = objective(candidate)
            if new_value <= value:
                improved = True
                break
            t /= 2
        if not improved:
            break
        w, done = candidate, value - new_value <= tol * max(1.0, abs(value))
        value = new_value
        if done:
            break
    scale = w[0] / spread
    return LlrCalibration(scale=float(scale), offset=float(w[1] - scale * centre), fit_prior=float(prior))


def cllr(llrs, labels) -> float:
    """Cllr in bits of ``llrs`` taken as log-likelihood ratios (module docstring); infinite LLRs are allowed
    (PAV gives them), NaN is not."""
    llrs = np.asarray(llrs, dtype=np.float64)
    if np.isnan(llrs).any():
        raise ValueError("LLRs must not be NaN")
    tar, non = _split_llrs(llrs, labels)
    return float((_softplus(-tar).mean() + _softplus(non).mean()) / (2 * LOG2))


def pav_llrs(scores, labels) -> np.ndarray:
    """The optimal monotone (non-decreasing in score) LLRs of the trials, by pool-adjacent-violators: the
    target share of each pooled block of sorted scores is its posterior, converted to an LLR by subtracting the
    log-odds of the target share of all trials. Equal scores are pooled first (no monotone map can split them).
    Blocks without a target give -inf, blocks without a non-target +inf."""
    from sklearn.isotonic import isotonic_regression

    s, y, _ = metrics._check_trials(scores, labels)
    values, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    targets = np.bincount(inverse.ravel(), weights=y.astype(np.float64), minlength=len(values))
    posterior = isotonic_regression(targets / counts, sample_weight=counts.astype(np.float64), increasing=True)
    posterior = np.clip(posterior, 0.0, 1.0)[inverse.ravel()]
    with np.errstate(divide="ignore"):
        log_odds = np.log(posterior) - np.log1p(-posterior)
    return log_odds - logit(float(y.mean()))


def min_cllr(scores, labels) -> float:
    """Cllr of the PAV LLRs (:func:`pav_llrs`): the lowest Cllr any monotone map of ``scores`` reaches."""
    return cllr(pav_llrs(scores, labels), labels)


def act_dcf(llrs, labels, p_target: float = 0.01) -> float:
    """Normalised DCF of the Bayes decisions of ``llrs`` at ``p_target`` (``min_dcf``'s normalisation)."""
    tar, non = _split(llrs, labels)
    threshold = bayes_threshold(p_target)
    miss, false_alarm = float(np.mean(tar < threshold)), float(np.mean(non >= threshold))
    return (p_target * miss + (1 - p_target) * false_alarm) / min(p_target, 1 - p_target)


def llr_summary(llrs, labels, p_target: float = 0.01) -> dict:
    """``cllr``, ``min_cllr``, ``act_dcf`` and ``min_dcf`` (at ``p_target``) of scores taken as LLRs."""
    return {"cllr": cllr(llrs, labels), "min_cllr": min_cllr(llrs, labels),
            "act_dcf": act_dcf(llrs, labels, p_target), "min_dcf": metrics.min_dcf(llrs, labels, p_target)[0]}


def parse_calibration(data, source: str) -> LlrCalibration:
    """An :class:`LlrCalibration` from its ``to_dict`` form; DataError naming ``source`` and the key."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected an object, got {data!r}")
    if data.get("kind") != KIND:
        raise DataError(f"{source}: kind: expected {KIND!r}, got {data.get('kind')!r}")
    values = {}
    for key in ("scale", "offset", "fit_prior"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"{source}: {key}: expected a finite number, got {value!r}")
        values[key] = float(value)
    if values["scale"] <= 0:
        raise DataError(f"{source}: scale: must be positive (higher scores mean more likely the same speaker), "
                        f"got {values['scale']}")
    if not 0.0 < values["fit_prior"] < 1.0:
        raise DataError(f"{source}: fit_prior: must lie in (0, 1), got {values['fit_prior']}")
    return LlrCalibration(**values)


# ------------------------------------------------------------------------------------------------ held-out fit

def calibration_speakers(speakers, share: float, seed: int) -> set | None:
    """A seeded ``share`` of the distinct ``speakers`` to fit a calibration on, the rest to report it on; None when
    either side would have fewer than 2 speakers (no non-target trial within it)."""
    distinct = sorted(set(speakers))
    count = int(round(share * len(distinct)))
    if count < 2 or len(distinct) - count < 2:
        return None
    return set(np.random.default_rng(seed).choice(distinct, size=count, replace=False).tolist())


def held_out_report(fit_scores, fit_labels, scores, labels, *, prior: float,
                    p_target: float) -> tuple[LlrCalibration, dict]:
    """Fit on (``fit_scores``, ``fit_labels``), judge on the disjoint (``scores``, ``labels``): the calibration and
    ``{"raw": ..., "calibrated": ...}`` (:func:`llr_summary` of the raw scores taken as LLRs and of the
    calibrated LLRs, plus ``eer``), the calibration's numbers and the trial counts of both sets."""
    fitted = fit_llr_calibration(fit_scores, fit_labels, prior=prior)
    labels = np.asarray(labels)
    eer = metrics.eer(scores, labels)[0]
    fit_labels = np.asarray(fit_labels)
    report = {"raw": {**llr_summary(scores, labels, p_target), "eer": eer},
              "calibrated": {**llr_summary(fitted.llr(scores), labels, p_target), "eer": eer},
              "scale": fitted.scale, "offset": fitted.offset, "fit_prior": prior, "p_target": p_target,
              "fit_target_trials": int(fit_labels.sum()), "fit_nontarget_trials": int((fit_labels == 0).sum()),
              "target_trials": int(labels.sum()), "nontarget_trials": int((labels == 0).sum())}
    return fitted, report
