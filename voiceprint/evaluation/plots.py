"""Figures as PNG files: DET curves, score histograms, training curves, 2-D embedding maps.

Each function draws one figure with matplotlib's object API on the Agg canvas (no pyplot state, no display
needed) and writes it atomically. The same input gives the same bytes with the same matplotlib: fixed size and
DPI, no timestamp in matplotlib's PNGs, seeded t-SNE.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from voiceprint.core.outputs import atomic_path

DPI = 100
DET_TICKS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95)
DET_MAX_RATE = 0.95   # DET axes end here: the region above says little and the normal deviate runs off to inf


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _percent(rate: float) -> str:
    return f"{100 * rate:g}%"


def det_curve(systems: Mapping[str, tuple[Sequence[float], Sequence[int]]], path: str | Path, *,
              title: str = "DET curves") -> Path:
    """All systems' DET curves (miss rate against false-alarm rate, both on normal-deviate axes) on one figure,
    each labelled with its EER, the EER point marked. ``systems``: name -> (scores, labels 1=target 0=non-target)."""
    from scipy.stats import norm

    from voiceprint.evaluation.metrics import det_points, eer

    if not systems:
        raise ValueError("det_curve: no systems given")
    fig = _figure(6.0, 6.0)
    ax = fig.add_subplot()
    lowest = 0.5
    for name, (scores, labels) in systems.items():
        try:
            points = det_points(scores, labels, max_points=2000)
            rate, _ = eer(scores, labels)
        except ValueError as exc:
            raise ValueError(f"det_curve: system {name!r}: {exc}") from None
        labels = np.asarray(labels)
        # A rate of 0 (or 1) has no normal deviate: draw it at the finest rate the larger class can show.
        floor = 1.0 / max(np.count_nonzero(labels == 1), np.count_nonzero(labels == 0))
        lowest = min(lowest, floor)
        fpr = np.clip(points.fpr.to_numpy(), floor, 1 - floor)
        fnr = np.clip(points.fnr.to_numpy(), floor, 1 - floor)
        line, = ax.plot(norm.ppf(fpr), norm.ppf(fnr), label=f"{name} (EER {100 * rate:.1f}%)")
        ax.plot(norm.ppf(rate), norm.ppf(rate), "o", color=line.get_color(), markersize=4)
    lo = max(min(DET_TICKS), lowest)
    ticks = [t for t in DET_TICKS if lo <= t <= DET_MAX_RATE]
    limits = (norm.ppf(lo), norm.ppf(DET_MAX_RATE))
    for axis_ticks, axis_labels, axis_lim in ((ax.set_xticks, ax.set_xticklabels, ax.set_xlim),
                                              (ax.set_yticks, ax.set_yticklabels, ax.set_ylim)):
        axis_ticks(norm.ppf(ticks))
        axis_labels([_percent(t) for t in ticks], fontsize=7)
        axis_lim(*limits)
    ax.plot(limits, limits, color="0.8", linewidth=0.8, zorder=0)   # the EER diagonal
    ax.set_xlabel("false-alarm rate")
    ax.set_ylabel("miss rate")
    ax.set_title(title)
    ax.grid(True, linewidth=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# --- DET points for `dvc plots` (plots/det/*.csv and the vega-lite template .dvc/plots/det.json) ---

DET_TEMPLATE = Path(".dvc/plots/det.json")


def det_table(scores: Sequence[float], labels: Sequence[int]):
    """The downsampled DET points (``threshold, fpr, fnr, tpr``, voiceprint.evaluation.metrics.det_points) plus their
    normal
    deviates ``fpr_deviate, fnr_deviate``: the coordinates of a DET plot, so ``dvc plots`` draws a real DET curve
    (straight lines for Gaussian scores) with any template, and with the ``det`` template labelled in percent."""
    from voiceprint.evaluation.metrics import det_points

    labels = np.asarray(labels)
    return with_deviates(det_points(scores, labels), targets=int(np.count_nonzero(labels == 1)),
                         nontargets=int(np.count_nonzero(labels == 0)))


def with_deviates(points, *, targets: int, nontargets: int):
    """``points`` (fpr, fnr columns) with ``fpr_deviate, fnr_deviate`` = probit of the rates. A rate of 0 or 1 has
    no normal deviate: it is drawn at the finest rate the larger class can show (as det_curve does)."""
    from scipy.stats import norm

    if min(targets, nontargets) < 1:
        raise ValueError(f"DET points need target and non-target trials, got {targets} and {nontargets}")
    floor = 1.0 / max(targets, nontargets)
    table = points.copy()
    for rate in ("fpr", "fnr"):
        table[f"{rate}_deviate"] = norm.ppf(np.clip(table[rate].to_numpy(dtype=np.float64), floor, 1 - floor))
    return table


def _tick_label_expression(ticks) -> str:
    """A vega expression naming each tick value (a normal deviate) by its rate in percent."""
    from scipy.stats import norm

    expression = "''"
    for tick in reversed(ticks):
        expression = f"abs(datum.value - {norm.ppf(tick):.6f}) < 1e-4 ? '{_percent(tick)}' : {expression}"
    return expression


def det_vega_template() -> dict:
    """The vega-lite template (``.dvc/plots/det.json``, ``template: det`` in dvc.yaml) for the deviate columns of
    plots/det/*.csv: normal-deviate axes ticked and labelled in percent like det_curve's, the EER diagonal, one
    line per system and revision (``dvc plots diff`` overlays experiments), rates above 95% cut off."""
    from scipy.stats import norm

    ticks = [t for t in DET_TICKS if t <= DET_MAX_RATE]
    values = [round(float(norm.ppf(t)), 6) for t in ticks]
    top = round(float(norm.ppf(DET_MAX_RATE)), 6)

    def axis(title_anchor: str, field_anchor: str) -> dict:
        return {"field": field_anchor, "type": "quantitative", "title": title_anchor,
                "scale": {"zero": False, "domainMax": top, "nice": False},
                "axis": {"values": values, "labelExpr": _tick_label_expression(ticks), "grid": True,
                         "labelOverlap": True}}

    x = axis("false-alarm rate (normal deviate scale)", "<DVC_METRIC_X>")
    y = axis("miss rate (normal deviate scale)", "<DVC_METRIC_Y>")
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "data": {"values": "<DVC_METRIC_DATA>"},
        "title": {"text": "<DVC_METRIC_TITLE>", "anchor": "middle"},
        "width": 400, "height": 400,
        "layer": [
            {"mark": {"type": "line", "clip": True, "tooltip": {"content": "data"}},
             "encoding": {"x": x, "y": y, "color": "<DVC_METRIC_COLOR>", "strokeDash": "<DVC_METRIC_STROKE_DASH>",
                          "tooltip": "<DVC_METRIC_TOOLTIP>"}},
            # The EER diagonal, from the lowest deviate drawn (so it does not widen the axes) to the 95% corner.
            {"mark": {"type": "rule", "color": "#bbbbbb", "strokeWidth": 0.8},
             "transform": [{"aggregate": [{"op": "min", "field": "<DVC_METRIC_X>", "as": "lo_x"},
                                          {"op": "min", "field": "<DVC_METRIC_Y>", "as": "lo_y"}]},
                           {"calculate": "min(datum.lo_x, datum.lo_y)", "as": "lo"},
                           {"calculate": str(top), "as": "hi"}],
             "encoding": {"x": {"field": "lo", "type": "quantitative"}, "y": {"field": "lo", "type": "quantitative"},
                          "x2": {"field": "hi"}, "y2": {"field": "hi"}}},
        ],
    }


def score_histograms(scores: Sequence[float], labels: Sequence[int], path: str | Path, *,
                     title: str = "scores", threshold: float | None = None,
                     threshold_label: str = "threshold") -> Path:
    """Target and non-target score distributions (densities over shared bins), optionally a threshold line."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape or scores.size == 0:
        raise ValueError(f"score_histograms: need equal, non-zero numbers of scores and labels, "
                         f"got {scores.size} and {labels.size}")
    if not np.isfinite(scores).all() or not np.isin(labels, (0, 1)).all():
        raise ValueError("score_histograms: scores must be finite and labels 0 or 1")
    bins = np.histogram_bin_edges(scores, bins=60)
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    for value, name, colour in ((1, "target", "tab:blue"), (0, "non-target", "tab:red")):
        part = scores[labels == value]
        if part.size:
            ax.hist(part, bins=bins, density=True, alpha=0.5, color=colour, label=f"{name} ({part.size})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1,
                   label=f"{threshold_label} {threshold:.3f}")
    ax.set_xlabel("cosine score")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def training_curves(csv_paths: Mapping[str, str | Path], path: str | Path, *, title: str = "training") -> Path:
    """One panel per metric (loss, accuracy, ...) over epochs, one colour per run, validation dashed.

    Each CSV (the stages' plots/*.csv) has an ``epoch`` column plus metric columns; ``val_<m>`` is drawn in the
    panel of ``<m>``. A log with its header and no rows is a stage that trained no epochs (``triplet.epochs: 0``):
    it draws no curve.
    """
    import pandas as pd

    if not csv_paths:
        raise ValueError("training_curves: no CSV files given")
    runs = {}
    for name, csv in csv_paths.items():
        try:
            table = pd.read_csv(csv)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{csv}: cannot read training log: {exc}") from None
        metrics = [c for c in table.columns if c != "epoch"]
        if "epoch" in table.columns and table.empty:
            continue
        if "epoch" not in table.columns or not metrics:
            raise ValueError(f"{csv}: expected an 'epoch' column, metric columns and at least one row")
        bad = [c for c in metrics if not pd.api.types.is_numeric_dtype(table[c])]
        if bad:
            raise ValueError(f"{csv}: column {bad[0]!r} is not numeric")
        runs[name] = table
    panels = sorted({c.removeprefix("val_") for t in runs.values() for c in t.columns if c != "epoch"},
                    key=lambda m: (m != "loss", m))   # loss first, then the rest by name
    fig = _figure(5.0 * len(panels), 4.0)
    axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for (name, table), colour in zip(runs.items(), colours):
        for ax, metric in zip(axes, panels):
            for column, style, suffix in ((metric, "-", ""), (f"val_{metric}", "--", " (validation)")):
                if column in table.columns:
                    ax.plot(table["epoch"], table[column], style, color=colour, marker=".", label=name + suffix)
    for ax, metric in zip(axes, panels):
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(True, linewidth=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def project_2d(embeddings: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(n, 2) coordinates: PCA, or t-SNE on cosine distance (seeded, PCA initialisation)."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) < 3:
        raise ValueError(f"embedding_projection: need an (n >= 3, dim) array, got shape {x.shape}")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, svd_solver="full").fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, (len(x) - 1) / 3))
        return TSNE(n_components=2, metric="cosine", init="pca", perplexity=perplexity,
                    random_state=seed).fit_transform(x)
    raise ValueError(f"embedding_projection: unknown method {method!r}; valid: pca, tsne")


def embedding_projection(embeddings: np.ndarray, speakers: Sequence[str], path: str | Path, *,
                         method: str = "pca", title: str | None = None, seed: int = 0) -> Path:
    """Embeddings mapped to 2-D (``pca`` or ``tsne``), one colour per speaker (legend up to 20 speakers)."""
    speakers = np.asarray([str(s) for s in speakers])
    if len(speakers) != len(embeddings):
        raise ValueError(f"embedding_projection: {len(embeddings)} embeddings but {len(speakers)} speaker labels")
    xy = project_2d(embeddings, method, seed)
    names = sorted(set(speakers))
    fig = _figure(6.5, 6.0)
    ax = fig.add_subplot()
    import matplotlib

    # Qualitative palettes while they have a colour per speaker, then a continuous map.
    palette = "tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "turbo"
    cmap = matplotlib.colormaps[palette]
    for i, name in enumerate(names):
        mask = speakers == name
        colour = cmap(i if len(names) <= 20 else i / max(len(names) - 1, 1))
        ax.scatter(xy[mask, 0], xy[mask, 1], s=12, color=colour, label=name)
    if len(names) <= 20:
        ax.legend(fontsize=7, markerscale=1.5, loc="best")
    method_name = {"pca": "PCA", "tsne": "t-SNE"}[method]
    ax.set_title(title or f"embeddings ({method_name}, {len(names)} speakers, {len(speakers)} utterances)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path)
