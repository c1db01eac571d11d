"""Standard trial lists (voiceprint.evaluation.trials) and ``voiceprint score``: both formats, missing entries counted
and
listed, scores as the evaluate stage computes them."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from voiceprint.evaluation import trials as T

KALDI = """u1 u2 target
u1 u3 nontarget

u2 u3 nontarget
"""
VOXCELEB = """1 a/x.wav a/y.wav
0 a/x.wav b/z.wav
0 a/y.wav b/z.wav
"""


def _write(tmp_path, text, name="trials.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_kaldi_and_voxceleb_lists(tmp_path):
    kaldi, fmt = T.read_trials(_write(tmp_path, KALDI, "kaldi"))
    assert fmt == "kaldi"
    assert kaldi.to_dict("list") == {"line": [1, 2, 4], "label": [1, 0, 0], "enroll": ["u1", "u1", "u2"],
                                     "test": ["u2", "u3", "u3"]}
    vox, fmt = T.read_trials(_write(tmp_path, VOXCELEB, "vox"))
    assert fmt == "voxceleb"
    assert vox.to_dict("list") == {"line": [1, 2, 3], "label": [1, 0, 0], "enroll": ["a/x.wav", "a/x.wav", "a/y.wav"],
                                   "test": ["a/y.wav", "b/z.wav", "b/z.wav"]}


@pytest.mark.parametrize("text, message", [
    ("u1 u2 target\nu1 u3\n", r"trials.txt:2: expected 3 fields \(<enroll> <test> target\|nontarget\), got 2"),
    ("u1 u2 target\nu1 u3 same\n", "trials.txt:2: expected target or nontarget"),
    ("1 a b\n0 a c\n2 a d\n", "trials.txt:3: expected 1 or 0 as the first field"),
    ("1 a b\nu1 u2 target\n", "trials.txt:2: expected 1 or 0"),            # formats cannot be mixed
    ("\nenroll test label\n", "trials.txt:2: not a trial line in Kaldi"),
    ("\n\n", "trials.txt: no trials"),
])
def test_malformed_lists_name_file_and_line(tmp_path, text, message):
    with pytest.raises(T.TrialListError, match=message):
        T.read_trials(_write(tmp_path, text))


def test_missing_or_binary_list(tmp_path):
    with pytest.raises(T.TrialListError, match="nowhere.txt: trial list not found"):
        T.read_trials(tmp_path / "nowhere.txt")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(T.TrialListError, match="bin: not a text file"):
        T.read_trials(tmp_path / "bin")


def test_missing_audio_paths_are_counted_and_listed(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a/x.wav").write_bytes(b"")
    (tmp_path / "a/y.wav").write_bytes(b"")
    listed, _ = T.read_trials(_write(tmp_path, VOXCELEB + "1 b/z.wav c/q.wav\n"))
    resolved = T.resolve_audio(listed, tmp_path)
    assert resolved.counts() == {"listed_trials": 4, "scored_trials": 1, "missing_trials": 3, "missing_entries": 2}
    assert resolved.trials.line.tolist() == [1]
    assert resolved.trials.enroll_key.tolist() == [str(tmp_path / "a/x.wav")]
    assert resolved.missing.line.tolist() == [2, 3, 4]
    assert set(resolved.missing_entries.entry) == {"b/z.wav", "c/q.wav"}
    assert resolved.missing.reason.str.startswith("no such file under").all()
    with pytest.raises(T.DataError, match="audio root is not a folder"):
        T.resolve_audio(listed, tmp_path / "nowhere")


def test_utterance_ids_resolve_against_the_feature_store():
    index = pd.DataFrame({"utterance": ["u1", "u2", "u3", "t1"], "path": ["s1/u1.flac", "s1/u2.flac", "s2/u3.flac",
                                                                         "s3/t1.flac"]})
    listed = pd.DataFrame({"line": [1, 2, 3, 4], "label": [1, 0, 0, 0], "enroll": ["u1", "s1/u2.flac", "u1", "zz"],
                           "test": ["u2", "u3", "t1", "u3"]})
    resolved = T.resolve_utterances(listed, index, usable=["u1", "u2", "u3"])
    assert resolved.trials[["line", "enroll_key", "test_key"]].values.tolist() == [[1, "u1", "u2"], [2, "u2", "u3"]]
    reasons = dict(zip(resolved.missing.line, resolved.missing.reason))
    assert reasons == {3: "not an evaluation utterance (its speaker was trained on, or it was excluded)",
                       4: "not in the feature store"}


# ------------------------------------------------------------------------------------------------ scoring

keras = pytest.importorskip("keras")


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """3 speakers x 3 synthetic utterances and one unusable (too short) file."""
    import soundfile as sf

    from voiceprint.data.corpus.synthetic import generate

    root = tmp_path_factory.mktemp("audio")
    manifest = generate(root, num_speakers=3, utterances_per_speaker=3, min_seconds=1.0, max_seconds=1.5, seed=0)
    sf.write(root / "short.wav", np.zeros(800, np.float32), 16000)
    return root, manifest


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from voiceprint.serving.bundle import save_bundle
    from voiceprint.evaluation.calibration import LlrCalibration
    from voiceprint.models import build_rescnn

    keras.utils.set_random_seed(0)
    model, _ = build_rescnn(filters=[4, 8, 8, 8], blocks=1, embedding_dim=16, num_bands=64, num_classes=3,
                            dropout=0.0)
    features = {"kind": "logmel_cmn", "vad": "original", "sample_rate": 16000, "num_bands": 64, "min_seconds": 0.5,
                "window_frames": 0, "hop_frames": 80}
    return save_bundle(tmp_path_factory.mktemp("bundle") / "voiceprint", model, system="head", features=features,
                       thresholds={"eer": 0.5, "low_far": 0.9, "low_far_rate": 0.01}, evaluation={"eer": 0.1},
                       llr_calibration=LlrCalibration(scale=20.0, offset=-15.0))


def _all_pairs(manifest):
    rows = []
    for i in range(len(manifest)):
        for j in range(i + 1, len(manifest)):
            a, b = manifest.iloc[i], manifest.iloc[j]
            rows.append((int(a.speaker == b.speaker), a.path, b.path))
    return rows


def test_score_trial_list_scores_as_evaluate_and_reports_missing(audio, bundle, tmp_path):
    from voiceprint.evaluation import metrics
    from voiceprint.serving.api import Recognizer
    from voiceprint.evaluation.calibration import cllr
    from voiceprint.evaluation.scoring import cosine_scores

    root, manifest = audio
    rows = _all_pairs(manifest)
    lines = [f"{label} {a} {b}" for label, a, b in rows] + [f"0 {manifest.path[0]} gone.wav",
                                                            f"1 short.wav {manifest.path[1]}"]
    rec = Recognizer(bundle)
    result = T.score_trial_list(rec, _write(tmp_path, "\n".join(lines) + "\n"), root, p_target=0.05)
    s = result.summary
    assert (s["listed_trials"], s["scored_trials"], s["missing_trials"], s["missing_entries"]) == (38, 36, 2, 2)
    assert result.table.line.tolist() == list(range(1, 39))          # every listed trial, in file order
    status = result.table.status.tolist()
    assert status[:36] == ["scored"] * 36
    assert status[36] == f"no such file under {root}"
    assert status[37].startswith("unusable audio:") and "short.wav" in status[37]
    assert result.table.score.iloc[36:].isna().all()

    emb = rec.embed_files([root / p for p in manifest.path])
    pairs = pd.DataFrame({"enroll": [a for _, a, _ in rows], "test": [b for _, _, b in rows]})
    expected = cosine_scores(emb, list(manifest.path), pairs)
    np.testing.assert_allclose(result.table.score.iloc[:36], expected, atol=1e-6)
    labels = np.array([label for label, _, _ in rows])
    assert s["eer"] == pytest.approx(metrics.eer(expected, labels)[0], abs=1e-9)
    assert s["calibrated"] is True
    np.testing.assert_allclose(result.table.llr.iloc[:36], 20.0 * result.table.score.iloc[:36].astype(float) - 15.0)
    assert s["cllr"] == pytest.approx(cllr(20.0 * result.table.score.iloc[:36].to_numpy(float) - 15.0, labels))


def test_cli_score_both_formats_json_and_tsv(audio, bundle, tmp_path, capsys):
    from voiceprint.serving import cli

    root, manifest = audio
    rows = _all_pairs(manifest)
    vox = _write(tmp_path, "".join(f"{label} {a} {b}\n" for label, a, b in rows) + "1 missing.wav x.wav\n", "vox")
    kaldi = _write(tmp_path, "".join(f"{a} {b} {'target' if label else 'nontarget'}\n" for label, a, b in rows)
                   + "missing.wav x.wav target\n", "kaldi")
    out = {}
    for name, path in (("vox", vox), ("kaldi", kaldi)):
        code = cli.main(["score", "--trials", str(path), "--audio-root", str(root), "--model", str(bundle), "--json",
                         "--out", str(tmp_path / f"{name}.tsv")])
        assert code == 0
        out[name] = json.loads(capsys.readouterr().out)
    for key in ("eer", "min_dcf", "cllr", "min_cllr", "act_dcf", "listed_trials", "missing_trials"):
        assert out["vox"][key] == out["kaldi"][key]
    assert out["vox"]["missing_trials"] == 1
    assert out["vox"]["missing"] == [{"entry": "missing.wav", "reason": f"no such file under {root}"},
                                     {"entry": "x.wav", "reason": f"no such file under {root}"}]
    table = pd.read_csv(tmp_path / "vox.tsv", sep="\t")
    assert list(table.columns) == ["line", "label", "enroll", "test", "score", "llr", "status"]
    assert len(table) == len(rows) + 1 and table.score.isna().sum() == 1
    code = cli.main(["score", "--trials", str(_write(tmp_path, "1 a\n", "bad")), "--audio-root", str(root),
                     "--model", str(bundle)])
    assert code == cli.EXIT_USAGE
    assert "bad:1: not a trial line" in capsys.readouterr().err


def test_cli_verify_and_identify_at_a_prior(audio, bundle, tmp_path, capsys):
    from voiceprint.serving import cli
    from voiceprint.serving.bundle import load_bundle

    root, manifest = audio
    a, b = str(root / manifest.path[0]), str(root / manifest.path[1])
    assert cli.main(["verify", a, b, "--model", str(bundle), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["llr"] == pytest.approx(20.0 * plain["score"] - 15.0) and "prior" not in plain
    for prior in (0.5, 0.01):
        assert cli.main(["verify", a, b, "--model", str(bundle), "--json", "--prior", str(prior)]) == 0
        out = json.loads(capsys.readouterr().out)
        bayes = -np.log(prior / (1 - prior))
        assert out["threshold_name"] == f"prior {prior:g}" and out["prior"] == prior
        assert out["threshold"] == pytest.approx((bayes + 15.0) / 20.0)
        assert out["same_speaker"] == (out["llr"] >= bayes)
    assert cli.main(["verify", a, b, "--model", str(bundle), "--prior", "0.5", "--threshold", "eer"]) == \
        cli.EXIT_USAGE
    assert cli.main(["verify", a, b, "--model", str(bundle), "--prior", "1.5"]) == cli.EXIT_USAGE
    capsys.readouterr()
    bare = str(load_bundle(bundle).path / "model.keras")
    assert cli.main(["verify", a, b, "--model", bare, "--prior", "0.5", "--json"]) == cli.EXIT_MODEL
    assert "no LLR calibration" in json.loads(capsys.readouterr().out)["error"]["message"]

    registry = str(tmp_path / "reg.sqlite")
    assert cli.main(["enroll", "s0", a, "--model", str(bundle), "--registry", registry]) == 0
    capsys.readouterr()
    assert cli.main(["identify", b, "--model", str(bundle), "--registry", registry, "--json", "--prior", "0.01"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["known"] == (out["llr"] >= np.log(99)) and out["prior"] == 0.01
    assert out["llr"] == pytest.approx(20.0 * out["score"] - 15.0)


def test_score_matches_evaluate_eer_on_librispeech_mini_pairs(shared_dir, tmp_path, capsys):
    """Acceptance: ``voiceprint score`` on a VoxCeleb-format list of librispeech-mini pairs gives the EER that the
    evaluate stage's path gives on the same pairs: features stored as the mfcc stage stores them (float16 feature
    store), embedded by ``embed_utterances``, scored by ``evaluation.cosine_scores`` / ``as_norm_scores`` and
    ``metrics.score_summary``. A subset (4 speakers x 3 files, 66 trials) keeps it fast; the pairs are the same."""
    from voiceprint.serving import cli
    from voiceprint.evaluation import metrics
    from voiceprint.serving.api import Recognizer
    from voiceprint.core.embedding import embed_utterances
    from voiceprint.evaluation.scoring import as_norm_scores, cosine_scores
    from voiceprint.features import featurize_file
    from voiceprint.serving.pretrained import SHIPPED
    from voiceprint.data.store import FeatureStore, StoreWriter

    root = shared_dir / "data/librispeech-mini/LibriSpeech"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    speakers = sorted(p for p in root.glob("*/*") if p.is_dir())[:4]
    files = [(s.name, f.relative_to(root).as_posix()) for s in speakers for f in sorted(s.rglob("*.flac"))[:3]]
    rows = [(int(files[i][0] == files[j][0]), files[i][1], files[j][1])
            for i in range(len(files)) for j in range(i + 1, len(files))]
    trials_file = _write(tmp_path, "".join(f"{label} {a} {b}\n" for label, a, b in rows), "veri_test.txt")
    assert cli.main(["score", "--trials", str(trials_file), "--audio-root", str(root), "--model", str(SHIPPED),
                     "--json", "--quiet"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["scored_trials"] == len(rows) == 66 and scored["missing_trials"] == 0

    bundle = Recognizer(SHIPPED).bundle
    settings = bundle.features
    writer = StoreWriter(tmp_path / "store", num_bands=settings.num_bands, kind=settings.kind)
    for speaker, rel in files:
        feats, stats = featurize_file(root / rel, settings.kind, sample_rate=settings.sample_rate,
                                      min_seconds=settings.min_seconds, vad=settings.vad, max_clipped_fraction=0.01)
        writer.add(rel, speaker, rel, feats, stats)
    writer.close()
    store = FeatureStore.open(tmp_path / "store")
    names = [rel for _, rel in files]
    positions = store.position(pd.Series(names))
    emb = embed_utterances(bundle.model, store, positions, window_frames=settings.window_frames,
                           hop_frames=settings.hop_frames)
    if bundle.stats_lda is not None:    # the served system joins the MFCC-statistics branch, as evaluate does
        emb = bundle.stats_lda.joint(emb, store.baseline[positions])
    pairs = pd.DataFrame({"label": [r[0] for r in rows], "enroll": [r[1] for r in rows],
                          "test": [r[2] for r in rows]})
    if bundle.score_norm == "as_norm":
        scores = as_norm_scores(emb, names, pairs, bundle.cohort, bundle.cohort_top_n)
    else:
        scores = cosine_scores(emb, names, pairs)
    expected = metrics.score_summary(scores, pairs.label.to_numpy(), p_target=0.01)
    assert scored["eer"] == expected["eer"]
    assert scored["min_dcf"] == expected["min_dcf"]
