"""The ``voiceprint`` command: in-process for output formats and exit codes, and once by subprocess from a bare
interpreter (no packages), the way programs in other Python environments integrate through ``--json``."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

keras = pytest.importorskip("keras")

from voiceprint.serving import cli  # noqa: E402
from voiceprint.serving.api import Recognizer  # noqa: E402
from voiceprint.serving.bundle import save_bundle  # noqa: E402
from voiceprint.data.corpus.synthetic import generate  # noqa: E402
from voiceprint.models import build_rescnn  # noqa: E402
from voiceprint.serving.registry import Registry  # noqa: E402

FEATURES = {"kind": "logmel_cmn", "vad": "original", "sample_rate": 16000, "num_bands": 64, "min_seconds": 0.5,
            "window_frames": 0, "hop_frames": 80}
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    keras.utils.set_random_seed(0)
    model, _ = build_rescnn(filters=[4, 8, 8, 8], blocks=1, embedding_dim=16, num_bands=64, num_classes=3,
                            dropout=0.0)
    bundle = save_bundle(root / "voiceprint", model, system="head", features=FEATURES,
                         thresholds={"eer": THRESHOLD, "low_far": 0.9, "low_far_rate": 0.01},
                         evaluation={"eer": 0.1})
    manifest = generate(root / "audio", num_speakers=3, utterances_per_speaker=3, min_seconds=1.0,
                        max_seconds=1.5, seed=0)
    files = [str(root / "audio" / p) for p in manifest.path]
    import soundfile as sf

    sf.write(root / "short.wav", np.random.default_rng(0).normal(0, 0.1, 3000).astype(np.float32), 16000)
    rec = Recognizer(bundle)
    return {"root": root, "bundle": str(bundle), "files": files, "rec": rec, "emb": rec.embed_files(files)}


def _run(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_human_and_json(setup, capsys):
    a, b = setup["files"][:2]
    score = float(setup["emb"][0] @ setup["emb"][1])
    code, out, err = _run(capsys, "verify", a, b, "--model", setup["bundle"])
    verdict = "same speaker" if score >= THRESHOLD else "different speakers"
    assert (code, err) == (0, "")
    assert out.startswith(f"{verdict}: score {score:.4f}") and out.rstrip().endswith("threshold 0.5000 (eer)")
    code, out, _ = _run(capsys, "verify", a, b, "--model", setup["bundle"], "--threshold", "-1", "--json")
    result = json.loads(out)
    assert result["score"] == pytest.approx(score, abs=1e-6)
    assert (result["same_speaker"], result["threshold"], result["threshold_name"]) == (True, -1.0, "explicit")


def test_verify_reports_the_scoring(setup, capsys):
    from voiceprint.evaluation.score_norm import as_norm_matrix

    a, b = setup["files"][:2]
    _, out, _ = _run(capsys, "verify", a, b, "--model", setup["bundle"], "--json")
    assert json.loads(out)["score_norm"] == "none"
    cohort = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
    normed = save_bundle(setup["root"] / "normed", setup["rec"].bundle.model, system="head", features=FEATURES,
                         thresholds={"eer": 0.25, "low_far": 2.0, "low_far_rate": 0.01}, evaluation={"eer": 0.1},
                         score_norm="as_norm", cohort=cohort, cohort_top_n=3)
    expected = float(as_norm_matrix(setup["emb"][:1], setup["emb"][1:2], cohort, 3)[0, 0])
    code, out, _ = _run(capsys, "verify", a, b, "--model", normed, "--json")
    result = json.loads(out)
    assert (code, result["score_norm"], result["threshold"]) == (0, "as_norm", 0.25)
    assert result["score"] == pytest.approx(expected, abs=1e-5)
    code, out, _ = _run(capsys, "verify", a, b, "--model", normed, "--threshold", "-3")
    assert code == 0 and out.rstrip().endswith("threshold -3.0000 (explicit, AS-norm score)")


def test_compare_one_score_per_reference(setup, capsys):
    files, emb = setup["files"], setup["emb"]
    code, out, _ = _run(capsys, "compare", files[0], "--against", *files[3:6], "--model", setup["bundle"], "--json")
    result = json.loads(out)
    assert code == 0 and [r["reference"] for r in result["results"]] == files[3:6]
    np.testing.assert_allclose([r["score"] for r in result["results"]], emb[3:6] @ emb[0], atol=1e-6)
    assert [r["same_speaker"] for r in result["results"]] == [bool(s >= THRESHOLD) for s in emb[3:6] @ emb[0]]


def test_embed_npy_with_row_list_and_csv(setup, capsys):
    root, files = setup["root"], setup["files"]
    code, out, _ = _run(capsys, "embed", root / "audio", "-o", root / "out" / "emb.npy", "--model", setup["bundle"])
    assert code == 0 and "wrote 9 embeddings (16-d)" in out
    np.testing.assert_array_equal(np.load(root / "out" / "emb.npy", allow_pickle=False), setup["emb"])
    rows = pd.read_csv(root / "out" / "emb.paths.csv")
    assert rows.row.tolist() == list(range(9)) and rows.path.tolist() == files
    code, out, _ = _run(capsys, "embed", *files[:2], "-o", root / "out" / "emb.csv", "--model", setup["bundle"])
    table = pd.read_csv(root / "out" / "emb.csv")
    assert code == 0 and table.columns.tolist() == ["path", *[f"emb_{i}" for i in range(16)]]
    np.testing.assert_allclose(table.iloc[:, 1:].to_numpy(), setup["emb"][:2], rtol=1e-6)


def test_json_lists_the_files_a_directory_scan_skipped(setup, capsys):
    root = setup["root"]
    notes = root / "audio" / "notes.txt"
    notes.write_text("not audio")
    try:
        code, out, _ = _run(capsys, "embed", root / "audio", "--model", setup["bundle"], "--json")
    finally:
        notes.unlink()
    result = json.loads(out)
    assert code == 0 and result["files"] == 9 and result["skipped"] == [str(notes)]


def test_cluster_csv(setup, capsys):
    root, files = setup["root"], setup["files"]
    code, out, _ = _run(capsys, "cluster", root / "audio", "--speakers", 3, "--model", setup["bundle"])
    lines = out.strip().splitlines()
    expected = setup["rec"].cluster(files, num_speakers=3)
    assert code == 0 and lines[0] == "path,speaker"
    assert lines[1:] == [f"{f},{s}" for f, s in zip(files, expected)]
    code, out, _ = _run(capsys, "cluster", *files, "-o", root / "groups.csv", "--model", setup["bundle"])
    groups = pd.read_csv(root / "groups.csv")
    assert code == 0 and groups.speaker.tolist() == setup["rec"].cluster(files).tolist()


def test_enroll_identify_list_remove(setup, capsys, tmp_path):
    files, reg = setup["files"], tmp_path / "reg.sqlite"
    common = ["--model", setup["bundle"], "--registry", reg]
    code, out, _ = _run(capsys, "enroll", "alice", *files[:2], *common)
    assert code == 0 and out.startswith("enrolled alice: 2 new recording(s), 0 already enrolled, 2 in total")
    code, out, _ = _run(capsys, "enroll", "bob", *files[3:5], *common, "--json")
    assert json.loads(out)["enrollments"] == 2
    code, out, _ = _run(capsys, "identify", files[2], "--top", 2, "--threshold", "-1", *common, "--json")
    result = json.loads(out)
    expected = setup["rec"].identify(Registry(reg, create=False), files[2], top=2, threshold=-1.0)
    assert (code, result["speaker"], result["known"]) == (0, expected.speaker, True)
    assert [c["speaker"] for c in result["candidates"]] == [c.speaker for c in expected.candidates]
    code, out, _ = _run(capsys, "identify", files[2], "--threshold", "1", *common)
    assert code == 0 and out.startswith("unknown: best ")
    code, out, _ = _run(capsys, "speakers", "list", "--registry", reg, "--json")
    assert [(s["name"], s["enrollments"]) for s in json.loads(out)["speakers"]] == [("alice", 2), ("bob", 2)]
    code, out, _ = _run(capsys, "speakers", "remove", "bob", "--registry", reg)
    assert code == 0 and out.startswith("removed bob (2 enrolment(s))")


@pytest.mark.parametrize("case, code, message", [
    ("bad_audio", cli.EXIT_AUDIO, "short.wav: is too short"),
    ("missing_file", cli.EXIT_AUDIO, "absent.wav: file does not exist"),
    ("missing_model", cli.EXIT_MODEL, "not found"),
    ("bare_model_needs_number", cli.EXIT_USAGE, "give the threshold as a number"),
    ("bad_threshold", cli.EXIT_USAGE, "a cosine score must lie in"),
    ("unknown_speaker", cli.EXIT_REGISTRY, "unknown speaker 'carol'"),
    ("empty_registry", cli.EXIT_REGISTRY, "is empty"),
    ("missing_registry", cli.EXIT_REGISTRY, "does not exist"),
    ("bad_output", cli.EXIT_USAGE, "expected a file ending in .npy or .csv"),
])
def test_errors_one_line_and_exit_code(setup, capsys, tmp_path, case, code, message):
    files, bundle, root = setup["files"], setup["bundle"], setup["root"]
    Registry(tmp_path / "empty.sqlite").close()
    args = {
        "bad_audio": ["embed", files[0], root / "short.wav", "-o", tmp_path / "e.npy", "--model", bundle],
        "missing_file": ["verify", files[0], tmp_path / "absent.wav", "--model", bundle],
        "missing_model": ["verify", *files[:2], "--model", tmp_path / "none"],
        "bare_model_needs_number": ["verify", *files[:2], "--model", Path(bundle) / "model.keras"],
        "bad_threshold": ["verify", *files[:2], "--model", bundle, "--threshold", "2"],
        "unknown_speaker": ["speakers", "remove", "carol", "--registry", tmp_path / "empty.sqlite"],
        "empty_registry": ["identify", files[0], "--model", bundle, "--registry", tmp_path / "empty.sqlite"],
        "missing_registry": ["identify", files[0], "--model", bundle, "--registry", tmp_path / "none.sqlite"],
        "bad_output": ["embed", files[0], "-o", tmp_path / "e.txt", "--model", bundle],
    }[case]
    got, out, err = _run(capsys, *args, "--json")
    assert got == code
    assert len(err.strip().splitlines()) == 1 and message in err
    assert json.loads(out)["error"]["exit_code"] == code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.sqlite"]   # nothing else written


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["verify", "only-one-file"])
    assert info.value.code == cli.EXIT_USAGE


# Runs under ``python -I -S``: no site-packages, no PYTHON* variables, so nothing of our environment leaks in.
BARE_DRIVER = """
import json, subprocess, sys
exe, bundle, registry, a, b, c = sys.argv[1:]
try:
    import numpy
    sys.exit("numpy is importable: not a bare interpreter")
except ImportError:
    pass

def voiceprint(*args):
    p = subprocess.run([exe, *args, "--json"], capture_output=True, text=True)
    return {"code": p.returncode, "result": json.loads(p.stdout), "stderr": p.stderr}

print(json.dumps({
    "enroll": voiceprint("enroll", "alice", a, b, "--model", bundle, "--registry", registry),
    "identify": voiceprint("identify", c, "--model", bundle, "--registry", registry, "--threshold", "-1"),
    "embed": voiceprint("embed", a, c, "--model", bundle, "--quiet"),
    "list": voiceprint("speakers", "list", "--registry", registry),
    "remove_unknown": voiceprint("speakers", "remove", "carol", "--registry", registry),
    "missing_model": voiceprint("verify", a, b, "--model", bundle + "-missing"),
}))
"""


def test_json_integration_from_a_bare_interpreter(setup, tmp_path):
    exe = Path(sys.executable).parent / "voiceprint"
    assert exe.is_file(), f"{exe} missing: install the package (pip install -e .)"
    files, emb = setup["files"], setup["emb"]
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(BARE_DRIVER))
    proc = subprocess.run([sys.executable, "-I", "-S", driver, exe, setup["bundle"], tmp_path / "reg.sqlite",
                           files[0], files[1], files[2]], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert (r["enroll"]["code"], r["enroll"]["result"]["added"], r["enroll"]["stderr"]) == (0, 2, "")
    assert (r["identify"]["code"], r["identify"]["result"]["speaker"]) == (0, "alice")
    expected = float(emb[2] @ emb[:2].astype(np.float64).mean(axis=0) / np.linalg.norm(emb[:2].mean(axis=0)))
    assert r["identify"]["result"]["score"] == pytest.approx(expected, abs=1e-5)
    got = np.array([row["embedding"] for row in r["embed"]["result"]["embeddings"]])
    np.testing.assert_allclose(got, emb[[0, 2]], atol=1e-7)
    assert [s["name"] for s in r["list"]["result"]["speakers"]] == ["alice"]
    assert (r["remove_unknown"]["code"], r["remove_unknown"]["result"]["error"]["kind"]) == (5, "registry")
    assert (r["missing_model"]["code"], r["missing_model"]["result"]["error"]["kind"]) == (3, "model")
    assert len(r["missing_model"]["stderr"].strip().splitlines()) == 1


def test_json_before_the_command_gives_the_same_document(setup, capsys):
    a, b = setup["files"][:2]
    code, before, err = _run(capsys, "--json", "verify", a, b, "--model", setup["bundle"])
    assert (code, err) == (0, "")
    assert json.loads(before) == json.loads(_run(capsys, "verify", a, b, "--model", setup["bundle"], "--json")[1])


def test_api_error_messages_are_not_prefixed_twice(setup, capsys):
    code, out, err = _run(capsys, "cluster", *setup["files"][:2], "--speakers", 5, "--model", setup["bundle"])
    assert code == cli.EXIT_USAGE
    assert err == "voiceprint cluster: error: --speakers 5 must lie in [1, 2] (the number of files)\n"


def test_a_model_found_in_the_working_directory_is_named(setup, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("VOICEPRINT_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "voiceprint").symlink_to(setup["bundle"])
    code, out, err = _run(capsys, "verify", *setup["files"][:2], "--json")
    assert code == 0 and json.loads(out)["model"] == "models/voiceprint"
    assert f"using the model at {tmp_path}/models/voiceprint (./models/voiceprint in the current directory)" in err
    code, out, err = _run(capsys, "verify", *setup["files"][:2], "--model", setup["bundle"])   # chosen: no notice
    assert (code, err) == (0, "")


def test_export_command_writes_the_model(setup, capsys, tmp_path):
    import h5py

    code, out, err = _run(capsys, "export", Path(setup["bundle"]) / "model.keras", "--format", "original_h5",
                          "-o", tmp_path / "weights.h5")
    assert code == 0, err
    assert out.startswith("wrote ") and h5py.is_hdf5(tmp_path / "weights.h5")
