"""Figures: PNG files of the expected size, the same bytes for the same input, clear errors for bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

pytest.importorskip("matplotlib")

from PIL import Image  # noqa: E402  (a matplotlib dependency)

from tests.conftest import REPO  # noqa: E402
from voiceprint.evaluation import plots  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scores(seed, separation):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(100, int), np.zeros(1000, int)]
    return np.r_[rng.normal(separation, 0.1, 100), rng.normal(0.0, 0.1, 1000)], labels


def _size(path):
    with Image.open(path) as image:
        return image.size


def test_det_curve_all_systems_deterministic(tmp_path):
    systems = {"base": _scores(0, 0.3), "head": _scores(1, 0.2)}
    first = plots.det_curve(systems, tmp_path / "det" / "a.png")
    second = plots.det_curve(systems, tmp_path / "b.png")
    assert first.read_bytes().startswith(PNG_MAGIC)
    assert first.read_bytes() == second.read_bytes()
    assert _size(first) == (600, 600)
    assert plots.det_curve({"base": systems["base"]}, tmp_path / "c.png").read_bytes() != first.read_bytes()
    with pytest.raises(ValueError, match="system 'bad'.*target trial"):
        plots.det_curve({"bad": (np.zeros(3), np.zeros(3, int))}, tmp_path / "d.png")
    with pytest.raises(ValueError, match="no systems"):
        plots.det_curve({}, tmp_path / "e.png")


def test_score_histograms_with_threshold(tmp_path):
    scores, labels = _scores(0, 0.3)
    with_line = plots.score_histograms(scores, labels, tmp_path / "h1.png", title="base", threshold=0.15)
    without = plots.score_histograms(scores, labels, tmp_path / "h2.png", title="base")
    again = plots.score_histograms(scores, labels, tmp_path / "h3.png", title="base", threshold=0.15)
    assert _size(with_line) == (700, 400)
    assert with_line.read_bytes() == again.read_bytes() != without.read_bytes()
    with pytest.raises(ValueError, match="labels 0 or 1"):
        plots.score_histograms([0.1, 0.2], [1, 2], tmp_path / "h4.png")


def test_training_curves_one_panel_per_metric(tmp_path):
    pd.DataFrame({"epoch": [1, 2, 3], "accuracy": [0.1, 0.4, 0.6], "loss": [3.0, 2.0, 1.5],
                  "val_accuracy": [0.1, 0.3, 0.5], "val_loss": [3.1, 2.2, 1.9]}).to_csv(tmp_path / "s.csv", index=False)
    pd.DataFrame({"epoch": [1, 2], "loss": [0.2, 0.1], "val_loss": [0.25, 0.2]}).to_csv(tmp_path / "t.csv",
                                                                                     index=False)
    both = plots.training_curves({"softmax": tmp_path / "s.csv", "triplet": tmp_path / "t.csv"}, tmp_path / "c.png")
    assert _size(both) == (1000, 400)          # loss and accuracy panels, 5 x 4 inches each at 100 dpi
    only_loss = plots.training_curves({"triplet": tmp_path / "t.csv"}, tmp_path / "d.png")
    assert _size(only_loss) == (500, 400)
    # a stage that trained no epochs (triplet.epochs: 0) writes its header only and draws no curve
    pd.DataFrame(columns=["epoch", "loss", "val_loss"]).to_csv(tmp_path / "none.csv", index=False)
    skipped = plots.training_curves({"softmax": tmp_path / "s.csv", "triplet": tmp_path / "none.csv"},
                                    tmp_path / "f.png")
    assert _size(skipped) == (1000, 400)
    pd.DataFrame({"step": [1], "loss": [1.0]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="bad.csv: expected an 'epoch' column"):
        plots.training_curves({"x": tmp_path / "bad.csv"}, tmp_path / "e.png")
    with pytest.raises(ValueError, match="absent.csv: cannot read"):
        plots.training_curves({"x": tmp_path / "absent.csv"}, tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()


def test_project_2d_pca_known_values():
    direction = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    points = np.outer([-2.0, -1.0, 1.0, 2.0], direction)       # all variance on one line through the origin
    xy = plots.project_2d(points, "pca")
    np.testing.assert_allclose(np.abs(xy[:, 0]), [2, 1, 1, 2], atol=1e-12)
    np.testing.assert_allclose(xy[:, 1], 0, atol=1e-12)
    with pytest.raises(ValueError, match="unknown method 'umap'"):
        plots.project_2d(points, "umap")


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_embedding_projection_deterministic(tmp_path, method):
    rng = np.random.default_rng(0)
    speakers = np.repeat(["a", "b", "c"], 15)
    emb = rng.normal(size=(45, 16)) + 3 * (speakers == "a")[:, None]
    first = plots.embedding_projection(emb, speakers, tmp_path / "p1.png", method=method)
    second = plots.embedding_projection(emb, speakers, tmp_path / "p2.png", method=method)
    assert first.read_bytes() == second.read_bytes() and _size(first) == (650, 600)
    with pytest.raises(ValueError, match="45 embeddings but 3 speaker labels"):
        plots.embedding_projection(emb, ["a", "b", "c"], tmp_path / "p3.png", method=method)


# --- DET points and the vega-lite template for `dvc plots` ---

def test_det_table_adds_the_normal_deviates_of_both_rates():
    from scipy.stats import norm

    from voiceprint.evaluation.plots import det_table

    scores = [0.9, 0.8, 0.3, 0.7, 0.2, 0.1]
    labels = [1, 1, 1, 0, 0, 0]
    table = det_table(scores, labels)
    assert list(table.columns) == ["threshold", "fpr", "fnr", "tpr", "fpr_deviate", "fnr_deviate"]
    # at threshold 0.8: one of three non-targets accepted (0.7 < 0.8: none), one of three targets missed (0.3)
    row = table[table.threshold == 0.8].iloc[0]
    assert (row.fpr, row.fnr) == (0.0, 1 / 3)
    assert row.fnr_deviate == pytest.approx(norm.ppf(1 / 3))
    # a rate of 0 sits at the finest rate three trials can show
    assert row.fpr_deviate == pytest.approx(norm.ppf(1 / 3))


def test_the_committed_det_template_is_the_generated_one():
    from voiceprint.evaluation.plots import DET_TEMPLATE, det_vega_template

    assert json.loads((REPO / DET_TEMPLATE).read_text()) == det_vega_template()


def test_dvc_yaml_draws_det_curves_on_deviates_and_shows_every_evaluation_figure():
    entries = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    by_name = {next(iter(p)) if isinstance(p, dict) else p: p for p in entries}
    det = by_name["DET (all systems)"]["DET (all systems)"]
    assert det["template"] == "det" and det["x"] == "fpr_deviate"
    assert set(det["y"].values()) == {"fnr_deviate"}
    assert "plots/eval" in by_name


def test_dvc_plots_diff_overlays_the_det_curves_of_two_revisions(tmp_path):
    """The DET plot of dvc.yaml with its template, in a repo whose DET points change between two revisions:
    `dvc plots diff` renders both revisions' curves, on the deviate columns, in one plot."""
    import os
    import shutil
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")

    def run(*cmd):
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    entries = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    det = next(p for p in entries if isinstance(p, dict) and "DET (all systems)" in p)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"plots": [det]}))
    (tmp_path / plots.DET_TEMPLATE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / plots.DET_TEMPLATE, tmp_path / plots.DET_TEMPLATE)
    labels = np.r_[np.ones(40), np.zeros(120)].astype(int)
    (tmp_path / "plots/det").mkdir(parents=True)
    for separation in (1.0, 2.0):
        rng = np.random.default_rng(0)
        for system in ("base", "head"):
            scores = np.r_[rng.normal(separation, 1, 40), rng.normal(0, 1, 120)]
            plots.det_table(scores, labels).to_csv(tmp_path / f"plots/det/{system}.csv", index=False)
        if separation == 1.0:
            run("git", "add", "-A")
            run("git", "commit", "-qm", "first")
    rendered = json.loads(run("dvc", "plots", "diff", "HEAD", "--json"))["data"]["DET (all systems)"][0]
    assert rendered["type"] == "vega" and rendered["revisions"] == ["workspace", "HEAD"]
    values = rendered["content"]["data"]["values"]
    assert {(v["rev"], v["filename"]) for v in values} == {(rev, f"{system}.csv") for rev in ("workspace", "HEAD")
                                                           for system in ("base", "head")}
    layer = rendered["content"]["layer"][0]["encoding"]
    assert (layer["x"]["field"], layer["y"]["field"]) == ("fpr_deviate", "fnr_deviate")
