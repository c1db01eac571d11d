"""``voiceprint serve``: a real server on 127.0.0.1 (ephemeral port) answering as the API does, under concurrent
clients, with bounded and authenticated requests and a registry that loses nothing under concurrent enrolment."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
aiohttp = pytest.importorskip("aiohttp")

from voiceprint.serving import api, cli  # noqa: E402
from voiceprint.serving.bundle import save_bundle  # noqa: E402
from voiceprint.data.corpus.synthetic import generate  # noqa: E402
from voiceprint.models import build_rescnn  # noqa: E402
from voiceprint.serving.registry import Registry  # noqa: E402
from voiceprint.serving.serve import BackgroundServer, Limits, check_binding, create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FEATURES = {"kind": "logmel_cmn", "vad": "original", "sample_rate": 16000, "num_bands": 64, "min_seconds": 0.5,
            "window_frames": 0, "hop_frames": 80}
LIMITS = Limits(max_body_bytes=400_000, max_audio_seconds=5.0, workers=2)
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    keras.utils.set_random_seed(0)
    model, _ = build_rescnn(filters=[4, 8, 8, 8], blocks=1, embedding_dim=16, num_bands=64, num_classes=3,
                            dropout=0.0)
    bundle = save_bundle(root / "voiceprint", model, system="head", features=FEATURES,
                         thresholds={"eer": 0.5, "low_far": 0.9, "low_far_rate": 0.01}, evaluation={"eer": 0.1})
    manifest = generate(root / "audio", num_speakers=3, utterances_per_speaker=3, min_seconds=1.0,
                        max_seconds=1.5, seed=0)
    files = [root / "audio" / p for p in manifest.path]
    rec = api.Recognizer(bundle)
    return {"root": root, "bundle": bundle, "files": files, "rec": rec, "emb": rec.embed_files(files)}


@pytest.fixture(scope="module")
def server(setup):
    app = create_app(setup["rec"], registry=setup["root"] / "registry.sqlite", limits=LIMITS)
    with BackgroundServer(app) as srv:
        yield srv


def _call(method: str, url: str, *, form: dict | None = None, json_body=None, data=None, headers=None):
    """(status, JSON answer) of one request."""
    async def go():
        async with aiohttp.ClientSession() as session:
            return await _request(session, method, url, form=form, json_body=json_body, data=data, headers=headers)
    return asyncio.run(go())


def _form(fields: dict):
    """multipart/form-data: Paths and bytes become uploaded files (lists: one part each), the rest text."""
    form = aiohttp.FormData()
    for key, values in fields.items():
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, Path):
                form.add_field(key, value.read_bytes(), filename=value.name, content_type="audio/wav")
            elif isinstance(value, bytes):
                form.add_field(key, value, filename=f"{key}.wav", content_type="audio/wav")
            else:
                form.add_field(key, str(value))
    return form


async def _request(session, method, url, *, form=None, json_body=None, data=None, headers=None):
    kwargs = {"headers": headers or {}}
    if form is not None:
        kwargs["data"] = _form(form)
    elif json_body is not None:
        kwargs["json"] = json_body
    elif data is not None:
        kwargs["data"] = data
    async with session.request(method, url, **kwargs) as resp:
        return resp.status, await resp.json()


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_health_names_the_model_and_limits(server, setup):
    status, body = _call("GET", server.url + "/health")
    assert status == 200 and body["status"] == "ok"
    assert (body["model_sha256"], body["embedding_dim"]) == (setup["rec"].model_sha256, 16)
    assert body["limits"] == {"max_body_bytes": 400_000, "max_audio_seconds": 5.0, "workers": 2}


def test_verify_upload_and_base64_answer_as_the_api(server, setup):
    a, b = setup["files"][:2]
    expected = setup["rec"].verify(a, b)
    status, body = _call("POST", server.url + "/verify", form={"a": a, "b": b})
    assert status == 200 and (body["a"], body["b"]) == (a.name, b.name)
    assert body["score"] == pytest.approx(expected.score, abs=1e-6)
    assert (body["threshold"], body["threshold_name"], body["same_speaker"]) == (0.5, "eer", expected.same_speaker)
    status, body = _call("POST", server.url + "/verify",
                         json_body={"a": _b64(a), "b": {"name": "bee.wav", "data": _b64(b)}, "threshold": -1})
    assert status == 200 and body["score"] == pytest.approx(expected.score, abs=1e-6)
    assert (body["a"], body["b"], body["threshold_name"], body["same_speaker"]) == ("a", "bee.wav", "explicit", True)


def test_embed_and_compare_answer_as_the_api(server, setup):
    files, emb = setup["files"], setup["emb"]
    status, body = _call("POST", server.url + "/embed", form={"audio": files[:3]})
    assert status == 200 and [e["name"] for e in body["embeddings"]] == [f.name for f in files[:3]]
    np.testing.assert_allclose([e["embedding"] for e in body["embeddings"]], emb[:3], atol=1e-6)
    status, body = _call("POST", server.url + "/compare",
                         json_body={"probe": _b64(files[0]), "against": [_b64(f) for f in files[3:6]]})
    assert status == 200 and [r["reference"] for r in body["results"]] == ["against", "against[1]", "against[2]"]
    np.testing.assert_allclose([r["score"] for r in body["results"]], emb[3:6] @ emb[0], atol=1e-6)
    assert [r["same_speaker"] for r in body["results"]] == [bool(s >= 0.5) for s in emb[3:6] @ emb[0]]


def test_enroll_identify_speakers_remove(setup, tmp_path):
    files, rec = setup["files"], setup["rec"]
    app = create_app(rec, registry=tmp_path / "reg.sqlite", limits=LIMITS, warm_up=False)
    with BackgroundServer(app) as srv:
        status, body = _call("POST", srv.url + "/identify", form={"audio": files[2]})
        assert (status, body["error"]["kind"]) == (409, "registry") and "does not exist" in body["error"]["message"]
        status, body = _call("POST", srv.url + "/enroll", form={"name": "alice", "audio": files[:2]})
        assert status == 200 and (body["speaker"], body["added"], body["enrollments"]) == ("alice", 2, 2)
        status, body = _call("POST", srv.url + "/enroll", json_body={"name": "bob", "audio": [_b64(f) for f in files[3:5]]})
        assert status == 200 and body["added"] == 2
        status, body = _call("POST", srv.url + "/identify", form={"audio": files[2], "top": 2, "threshold": -1})
        with Registry(tmp_path / "reg.sqlite", create=False) as reg:
            expected = rec.identify(reg, files[2], top=2, threshold=-1.0)
        assert (status, body["speaker"], body["known"]) == (200, expected.speaker, True)
        assert [c["speaker"] for c in body["candidates"]] == [c.speaker for c in expected.candidates]
        assert body["score"] == pytest.approx(expected.score, abs=1e-6)
        status, body = _call("GET", srv.url + "/speakers")
        assert [(s["name"], s["enrollments"]) for s in body["speakers"]] == [("alice", 2), ("bob", 2)]
        status, body = _call("DELETE", srv.url + "/speakers/bob")
        assert (status, body) == (200, {"removed": "bob", "enrollments": 2})
        status, body = _call("DELETE", srv.url + "/speakers/bob")
        assert (status, body["error"]["kind"]) == (409, "registry")


def test_twenty_four_concurrent_verify_clients_all_answered(server, setup):
    files, emb = setup["files"], setup["emb"]
    pairs = [(i % 9, (i * 4 + 1) % 9) for i in range(24)]

    async def go():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            return await asyncio.gather(*[
                _request(session, "POST", server.url + "/verify", form={"a": files[i], "b": files[j]})
                for i, j in pairs])

    answers = asyncio.run(go())
    assert [status for status, _ in answers] == [200] * 24
    for (i, j), (_, body) in zip(pairs, answers):
        assert body["score"] == pytest.approx(float(emb[i] @ emb[j]), abs=1e-5)


def test_registry_under_concurrent_enroll_and_identify_loses_nothing(setup, tmp_path):
    files, emb = setup["files"], setup["emb"]
    app = create_app(setup["rec"], registry=tmp_path / "reg.sqlite", limits=LIMITS, warm_up=False)
    with BackgroundServer(app) as srv:
        assert _call("POST", srv.url + "/enroll", form={"name": "first", "audio": files[0]})[0] == 200

        async def go():
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                enrols = [_request(session, "POST", srv.url + "/enroll",
                                   form={"name": f"spk{k:02d}", "audio": [files[k % 9], files[(k + 1) % 9]]})
                          for k in range(16)]
                identifies = [_request(session, "POST", srv.url + "/identify",
                                       form={"audio": files[k % 9], "threshold": -1}) for k in range(16)]
                return await asyncio.gather(*[x for pair in zip(enrols, identifies) for x in pair])

        answers = asyncio.run(go())
        assert [status for status, _ in answers] == [200] * 32, [b for s, b in answers if s != 200]
        assert all(body["known"] for _, body in answers[1::2])
        status, body = _call("GET", srv.url + "/speakers")
    assert sorted((s["name"], s["enrollments"]) for s in body["speakers"]) == \
        [("first", 1)] + [(f"spk{k:02d}", 2) for k in range(16)]
    with Registry(tmp_path / "reg.sqlite", create=False) as reg:       # the stored embeddings are the right ones
        names, means, _ = reg.speaker_means(setup["rec"].model_sha256, 16)
    k = names.index("spk05")
    mean = emb[[5, 6]].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(means[k], mean / np.linalg.norm(mean), atol=1e-6)


def _wav_bytes(seconds: float) -> bytes:
    import soundfile as sf

    out = io.BytesIO()
    sf.write(out, np.random.default_rng(0).normal(0, 0.1, int(seconds * 16000)).astype(np.float32), 16000,
             format="WAV", subtype="PCM_16")
    return out.getvalue()


@pytest.mark.parametrize("case, status, kind, message", [
    ("garbage_upload", 422, "bad_audio", "a.wav: cannot be decoded"),
    ("empty_upload", 422, "bad_audio", "a.wav: contains no samples"),
    ("too_short", 422, "bad_audio", "b.wav: is too short"),
    ("too_long", 422, "bad_audio", "is longer than allowed (6.0 s > 5 s"),
    ("missing_field", 400, "usage", "missing audio field 'b'"),
    ("two_recordings_for_a", 400, "usage", "field 'a': one recording expected, got 2"),
    ("text_for_audio", 400, "usage", "field 'a': expected an uploaded file"),
    ("bad_base64", 400, "usage", "field 'a': not valid base64"),
    ("bad_json", 400, "usage", "not valid JSON"),
    ("json_not_object", 400, "usage", "expected a JSON object"),
    ("wrong_content_type", 400, "usage", "send multipart/form-data or application/json"),
    ("malformed_multipart", 400, "usage", "malformed multipart/form-data"),
    ("bad_threshold", 400, "usage", "strict"),
    ("bad_top", 400, "usage", "top: expected a whole number >= 1, got '0'"),
    ("bad_name", 409, "registry", "reserved"),
    ("unknown_endpoint", 404, "not_found", "no endpoint /nothing"),
    ("wrong_method", 405, "method_not_allowed", "GET /verify"),
])
def test_bad_requests_get_a_json_error(server, setup, case, status, kind, message):
    a = setup["files"][0]
    url = server.url
    request = {
        "garbage_upload": ("POST", "/verify", {"form": {"a": b"RIFF....WAVEjunk" * 10, "b": a}}),
        "empty_upload": ("POST", "/verify", {"form": {"a": b"", "b": a}}),
        "too_short": ("POST", "/verify", {"form": {"a": a, "b": _wav_bytes(0.2)}}),
        "too_long": ("POST", "/verify", {"form": {"a": a, "b": _wav_bytes(6.0)}}),
        "missing_field": ("POST", "/verify", {"form": {"a": a}}),
        "two_recordings_for_a": ("POST", "/verify", {"form": {"a": [a, a], "b": a}}),
        "text_for_audio": ("POST", "/verify", {"form": {"a": "a.wav", "b": a}}),
        "bad_base64": ("POST", "/verify", {"json_body": {"a": "not base64!", "b": _b64(a)}}),
        "bad_json": ("POST", "/verify", {"data": b"{not json", "headers": {"Content-Type": "application/json"}}),
        "json_not_object": ("POST", "/verify", {"json_body": [1, 2]}),
        "malformed_multipart": ("POST", "/verify", {"data": b"no boundary here\r\n" * 10,
                                                    "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}}),
        "wrong_content_type": ("POST", "/verify", {"data": a.read_bytes(), "headers": {"Content-Type": "audio/wav"}}),
        "bad_threshold": ("POST", "/verify", {"form": {"a": a, "b": a, "threshold": "strict"}}),
        "bad_top": ("POST", "/identify", {"form": {"audio": a, "top": 0}}),
        "bad_name": ("POST", "/enroll", {"form": {"name": "unknown", "audio": a}}),
        "unknown_endpoint": ("POST", "/nothing", {"json_body": {}}),
        "wrong_method": ("GET", "/verify", {}),
    }[case]
    got, body = _call(request[0], url + request[1], **request[2])
    assert (got, body["error"]["kind"], body["error"]["status"]) == (status, kind, status), body
    assert message in body["error"]["message"]
    if kind == "bad_audio":
        assert body["error"]["reason"] in {"unreadable", "empty", "too_short", "too_long"}


def test_oversize_bodies_are_refused_with_413(server, setup):
    big = _wav_bytes(15.0)          # 480 kB > the 400 kB limit (and longer than allowed, which is not reached)
    status, body = _call("POST", server.url + "/verify", form={"a": big, "b": setup["files"][0]})
    assert (status, body["error"]["kind"]) == (413, "too_large")
    status, body = _call("POST", server.url + "/verify", json_body={"a": base64.b64encode(big).decode(), "b": ""})
    assert (status, body["error"]["kind"]) == (413, "too_large")

    async def chunked():       # no Content-Length: cut off while reading
        async def body_chunks():
            for _ in range(10):
                yield b"x" * 50_000
        async with aiohttp.ClientSession() as session:
            return await _request(session, "POST", server.url + "/verify", data=body_chunks(),
                                  headers={"Content-Type": "application/json"})
    status, body = asyncio.run(chunked())
    assert (status, body["error"]["kind"]) == (413, "too_large")
    assert _call("GET", server.url + "/health")[0] == 200        # and the server goes on


def test_token_is_required_when_set(setup):
    app = create_app(setup["rec"], registry=setup["root"] / "reg-token.sqlite", token=TOKEN, limits=LIMITS,
                     warm_up=False)
    with BackgroundServer(app) as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            status, body = _call("GET", srv.url + "/health", headers=headers)
            assert (status, body["error"]["kind"]) == (401, "unauthorized")
        status, body = _call("POST", srv.url + "/verify", form={"a": setup["files"][0], "b": setup["files"][1]},
                             headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and "score" in body


def test_non_loopback_binding_needs_a_token(capsys):
    check_binding("127.0.0.1", None), check_binding("::1", None), check_binding("localhost", None)
    check_binding("0.0.0.0", "t")
    with pytest.raises(api.InputError, match="binding 0.0.0.0 exposes the service"):
        check_binding("0.0.0.0", None)
    code = cli.main(["--json", "serve", "--host", "192.168.1.5", "--model", "/nonexistent-model"])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_USAGE and json.loads(out)["error"]["kind"] == "usage"   # before the model is looked at
    assert "binding 192.168.1.5" in err


def test_voiceprint_serve_command_answers_and_stops_on_sigterm(setup, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "VOICEPRINT_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "voiceprint.serving.cli", "serve", "--port", "0", "--json",
                             "--model", str(setup["bundle"]), "--registry", str(tmp_path / "reg.sqlite")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["url"].startswith("http://127.0.0.1:") and ready["model_sha256"] == setup["rec"].model_sha256
        status, body = _call("POST", ready["url"] + "/verify", form={"a": setup["files"][0], "b": setup["files"][1]},
                             headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200
        assert body["score"] == pytest.approx(float(setup["emb"][0] @ setup["emb"][1]), abs=1e-6)
    finally:
        proc.send_signal(signal.SIGTERM)      # what process managers send; Ctrl-C's SIGINT ends as KeyboardInterrupt
        code = proc.wait(timeout=180)   # TensorFlow's teardown takes seconds on a busy machine
    assert code == 0, proc.stderr.read()
