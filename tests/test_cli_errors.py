"""CLI errors that come before any model is loaded: with --json, every failure still gives one JSON document."""
from __future__ import annotations

import json

import pytest

from voiceprint.serving import cli


def _run(capsys, *args):
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exc:       # argparse exits by itself
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_argparse_errors_give_a_json_document_with_json(capsys):
    code, out, err = _run(capsys, "verify", "a.wav", "--json")           # B is missing
    assert code == 2 and "the following arguments are required: B" in err
    assert json.loads(out) == {"error": {"kind": "usage", "exit_code": 2,
                                         "message": "the following arguments are required: B"}}
    code, out, _ = _run(capsys, "verify", "a.wav")                        # without --json: argparse as usual
    assert code == 2 and out == ""


def test_interrupt_gives_a_json_document_with_json(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_speakers_list", interrupted)
    code, out, err = _run(capsys, "speakers", "list", "--json")
    assert (code, err) == (130, "voiceprint speakers: interrupted\n")
    assert json.loads(out) == {"error": {"kind": "interrupted", "message": "interrupted", "exit_code": 130}}


@pytest.mark.parametrize("value", ["-1", "abc", "1.5"])
def test_bad_voiceprint_threads_is_a_usage_error(capsys, monkeypatch, tmp_path, value):
    monkeypatch.setenv("VOICEPRINT_THREADS", value)
    code, out, err = _run(capsys, "verify", "a.wav", "b.wav", "--model", tmp_path, "--json")
    assert code == 2 and f"VOICEPRINT_THREADS={value!r}: expected a whole number >= 0" in err
    assert json.loads(out)["error"]["kind"] == "usage"


def test_global_flags_go_before_or_after_the_command(capsys, tmp_path):
    registry = tmp_path / "none.sqlite"
    for args in (["--json", "speakers", "list", "--registry", registry],
                 ["speakers", "list", "--registry", registry, "--json"],
                 ["--quiet", "--json", "speakers", "list", "--registry", registry]):
        code, out, err = _run(capsys, *args)
        assert (code, err) == (0, "") and json.loads(out) == {"registry": str(registry), "speakers": []}
    code, out, _ = _run(capsys, "--quiet", "speakers", "list", "--registry", registry)
    assert code == 0 and out.startswith("no speakers enrolled")


@pytest.mark.parametrize("args, message", [
    (["--json", "verify", "a.wav"], "the following arguments are required: B"),
    (["--json"], "the following arguments are required: COMMAND"),
    (["--json", "bogus"], "argument COMMAND: invalid choice: 'bogus'"),
    (["--json", "identify", "a.wav", "--top", "0", "--model", "/no/such/model"],
     "argument --top: expected a whole number >= 1, got 0"),
    (["identify", "a.wav", "--top", "x", "--json"], "argument --top: expected a whole number >= 1, got 'x'"),
])
def test_usage_errors_are_json_documents_wherever_json_is(capsys, args, message):
    code, out, err = _run(capsys, *args)
    document = json.loads(out)
    assert code == 2 and document["error"]["kind"] == "usage" and message in document["error"]["message"]
    assert message in err


def test_top_zero_is_reported_before_a_missing_model(capsys, tmp_path):
    code, _, err = _run(capsys, "identify", "a.wav", "--top", "0", "--model", tmp_path / "absent")
    assert code == cli.EXIT_USAGE and "--top" in err and "not found" not in err


def test_error_lines_name_the_command_once(capsys, tmp_path):
    code, out, err = _run(capsys, "embed", tmp_path / "a.wav")
    assert code == cli.EXIT_USAGE
    assert err == "voiceprint embed: error: give -o OUT.npy or -o OUT.csv (or --json to print the embeddings)\n"
    code, out, err = _run(capsys, "--json", "cluster", "a.wav", "--speakers", "2", "--threshold", "0.5")
    assert err == "voiceprint cluster: error: give --speakers or --threshold, not both\n"
    assert json.loads(out)["error"]["message"] == "give --speakers or --threshold, not both"


def test_print_completion_completes_commands_and_flags_in_bash(capsys, tmp_path):
    import shutil
    import subprocess

    pytest.importorskip("shtab")
    code, out, _ = _run(capsys, "--print-completion", "zsh")
    assert code == 0 and out.startswith("#compdef voiceprint") and "serve" in out and "preset" in out
    code, out, _ = _run(capsys, "--print-completion", "bash")
    assert code == 0 and "complete -o bashdefault -F _shtab_voiceprint voiceprint" in out
    if shutil.which("bash") is None:
        pytest.skip("no bash to run the script")
    (tmp_path / "completion.sh").write_text(out)
    # What bash does on TAB: set the COMP_* variables, call the function, read COMPREPLY.
    script = """source "$1"
complete_line() { COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; read -ra COMP_WORDS <<< "$1"; \
  COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _shtab_voiceprint; echo "${COMPREPLY[*]}"; }
complete_line "voiceprint se"; complete_line "voiceprint verify --thr"; complete_line "voiceprint --js"
"""
    proc = subprocess.run(["bash", "-c", script, "bash", str(tmp_path / "completion.sh")], capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.splitlines() == ["serve", "--threshold", "--json"], proc.stderr


PARAMS = "features:\n  num_bands: 64\n  kind: logmel_cmn\ntrain:\n  epochs: 10\n"


def test_preset_prints_dvc_flags_like_python_m_voiceprint_params(capsys, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "params.yaml").write_text(PARAMS)
    (tmp_path / "fast.yaml").write_text("train:\n  epochs: 2\nfeatures:\n  kind: fbank_norm\n")
    code, out, _ = _run(capsys, "preset", tmp_path / "fast.yaml", "--base", tmp_path / "params.yaml")
    assert code == 0 and out == "-S train.epochs=2 -S features.kind=fbank_norm\n"
    code, out, _ = _run(capsys, "--json", "preset", tmp_path / "fast.yaml", "--base", tmp_path / "params.yaml")
    assert json.loads(out)["assignments"] == ["train.epochs=2", "features.kind=fbank_norm"]
    # the python -m form still works, and says the same (it reads params.yaml in the working directory)
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "voiceprint.core.params", "fast.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(repo)}, timeout=120)
    assert (proc.returncode, proc.stdout) == (0, "-S train.epochs=2 -S features.kind=fbank_norm\n")
    (tmp_path / "typo.yaml").write_text("train:\n  epoch: 2\n")
    code, out, err = _run(capsys, "--json", "preset", tmp_path / "typo.yaml", "--base", tmp_path / "params.yaml")
    assert code == cli.EXIT_USAGE and "train.epoch: not a key of" in json.loads(out)["error"]["message"]


def test_export_command_is_python_m_voiceprint_export(capsys):
    code, out, _ = _run(capsys, "export", "--help")
    assert code == 0 and out.startswith("usage: voiceprint export") and "--format" in out
    code, _, err = _run(capsys, "export", "model.keras")
    assert code == 2 and "the following arguments are required: --format, -o/--output" in err
