"""CLI errors that come before any model is loaded: with --json, every failure still gives one JSON document."""
from __future__ import annotations

import json

import pytest

from voiceprint import cli


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
