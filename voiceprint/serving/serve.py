"""``voiceprint serve``: the API's operations as an HTTP JSON service that keeps the model loaded.

Endpoints (JSON answers; the fields of each match the CLI's ``--json`` output)::

    GET    /health               model, scoring, limits
    POST   /embed                audio (one or more)                       -> embeddings
    POST   /verify               a, b [, threshold]                        -> score, threshold, same_speaker
    POST   /compare              probe, against (one or more) [, threshold] -> one score per reference
    POST   /identify             audio [, top, threshold]                  -> speaker or "unknown", candidates
    POST   /enroll               name, audio (one or more)                 -> added, already_enrolled, enrollments
    GET    /speakers             enrolled speakers
    DELETE /speakers/{name}      remove a speaker

A request is either ``multipart/form-data`` (audio as file parts named as above, WAV/FLAC/Ogg/MP3/...; other
fields as text) or ``application/json`` with each recording as base64 of the file's bytes (a string, or
``{"name": ..., "data": ...}``) and a list where several are allowed.

Errors are ``{"error": {"kind", "message", "status"[, "reason"]}}`` with the CLI's kinds (``usage`` 400,
``bad_audio`` 422 with the AudioError reason, ``registry`` 409, ``model`` and ``io`` 500), plus ``unauthorized``
401, ``not_found`` 404, ``method_not_allowed`` 405, ``too_large`` 413 and ``busy`` 503 (more requests waiting than
``max_pending``).

Concurrency: the event loop only parses requests; featurising and the model run in a pool of ``workers`` threads,
so requests overlap and a slow one never blocks ``/health``. Each registry call opens its own SQLite connection
in its worker thread (the registry is safe across threads and processes: WAL, one transaction per enrolment).

Bounds: the whole request body (``max_body_bytes``), each recording's duration by its header
(``max_audio_seconds``, reason ``too_long``) and the number of requests waiting for a worker (``max_pending``).
SIGTERM or SIGINT stops it (requests in progress are finished first).

Security: binds 127.0.0.1 by default. With a token (``--token`` or ``$VOICEPRINT_TOKEN``) every request must
carry ``Authorization: Bearer TOKEN``; a token is required to bind any non-loopback address. The service never
reads files named in a request: audio comes only in the request body.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# Light at import time: the CLI reads this module's defaults for `voiceprint --help` and every command, which must
# not pay for aiohttp, asyncio, numpy or the model code (seconds on a busy machine); each function imports its own.
if TYPE_CHECKING:
    from aiohttp import web

    from voiceprint.serving.api import Recognizer
    from voiceprint.data.audio import Audio

TOKEN_ENV_VAR = "VOICEPRINT_TOKEN"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8757
STATUS = {"usage": 400, "bad_audio": 422, "registry": 409, "model": 500, "io": 500}
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 * 1024 * 1024     # a few minutes of 16-bit WAV: room for an enrolment of several files
    max_audio_seconds: float = 120.0          # per recording, by its header
    workers: int = 2                          # threads running the model (the model itself uses every core)
    max_pending: int = 256                    # requests queued for a worker before answering 503


class ServiceError(Exception):
    """An error answer that is not one of the API's errors (auth, routing, size, load)."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind = status, kind


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False     # a host name: it may resolve to anything


def check_binding(host: str, token: str | None) -> None:
    """InputError when a non-loopback address would be served without a token."""
    from voiceprint.serving.api import InputError

    if not token and not is_loopback(host):
        raise InputError(f"serve: binding {host} exposes the service beyond this machine: set a token "
                         f"(--token or ${TOKEN_ENV_VAR}) or bind 127.0.0.1")


# ------------------------------------------------------------------------------------------------ request parsing

class _Form:
    """The fields of one request, multipart or JSON, as recordings (Audio) and text values."""

    def __init__(self, audio: dict[str, list[Audio]], values: dict[str, object]):
        self.audio, self.values = audio, values

    def recordings(self, field: str, *, many: bool = False) -> list[Audio]:
        from voiceprint.serving.api import InputError

        got = self.audio.get(field, [])
        if not got:
            raise InputError(f"missing audio field {field!r}")
        if len(got) > 1 and not many:
            raise InputError(f"field {field!r}: one recording expected, got {len(got)}")
        return got

    def text(self, field: str, default=None):
        return self.values.get(field, default)


def _decode_b64(field: str, index: int, value) -> Audio:
    import base64
    import binascii

    from voiceprint.serving.api import InputError
    from voiceprint.data.audio import Audio

    name = f"{field}[{index}]" if index else field
    if isinstance(value, dict):
        name, value = str(value.get("name") or name), value.get("data")
    if not isinstance(value, str):
        raise InputError(f"field {name!r}: expected base64 text of an audio file (or {{\"name\", \"data\"}})")
    try:
        return Audio(base64.b64decode(value, validate=True), name=name)
    except (binascii.Error, ValueError):
        raise InputError(f"field {name!r}: not valid base64") from None


async def _read_form(request: web.Request, audio_fields: tuple[str, ...]) -> _Form:
    import json

    from aiohttp import web

    from voiceprint.serving.api import InputError
    from voiceprint.data.audio import Audio

    audio: dict[str, list[Audio]] = {}
    values: dict[str, object] = {}
    ctype = request.content_type
    if ctype == "multipart/form-data":
        try:
            post = await request.post()       # bounded by client_max_size
        except (ValueError, AssertionError) as exc:      # aiohttp's multipart parser on a malformed body
            raise InputError(f"request body: malformed multipart/form-data ({exc})") from None
        for key, value in post.items():
            if isinstance(value, web.FileField):
                data = value.file.read()
                audio.setdefault(key, []).append(Audio(data, name=value.filename or key))
            elif key in audio_fields:
                raise InputError(f"field {key!r}: expected an uploaded file, got text")
            else:
                values[key] = value
    elif ctype == "application/json":
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"request body: not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise InputError("request body: expected a JSON object")
        for key, value in body.items():
            if key in audio_fields:
                items = value if isinstance(value, list) else [value]
                audio[key] = [_decode_b64(key, i, v) for i, v in enumerate(items)]
            else:
                values[key] = value
    else:
        raise InputError(f"content type {ctype or 'none'!r}: send multipart/form-data or application/json")
    return _Form(audio, values)


def _threshold(form: _Form):
    from voiceprint.serving.api import InputError

    value = form.text("threshold", "eer")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(f"threshold: expected eer, low_far or a number, got {value!r}")
    return value


def _top(form: _Form) -> int:
    from voiceprint.serving.api import InputError

    value = form.text("top", 1)
    try:
        top = None if isinstance(value, (bool, float)) else int(str(value))
    except ValueError:
        top = None
    if top is None or top < 1:
        raise InputError(f"top: expected a whole number >= 1, got {value!r}")
    return top


# ------------------------------------------------------------------------------------------------ the service

class Service:
    """The operations, run in worker threads, on one warm :class:`Recognizer`."""

    def __init__(self, rec: Recognizer, *, registry: str | Path | None = None, limits: Limits = Limits()):
        from concurrent.futures import ThreadPoolExecutor

        from voiceprint.serving.registry import default_registry_path

        self.rec, self.limits = rec, limits
        self.registry_path = Path(registry) if registry is not None else default_registry_path()
        self.pool = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="voiceprint-serve")
        self.pending = 0

    def model_info(self, *, scores: bool = True) -> dict:
        from voiceprint.serving.cli import _model_info

        return _model_info(self.rec, scores=scores)

    def checked(self, recordings: list[Audio]) -> list[Audio]:
        """The recordings, after their headers say each is decodable and not longer than the limit."""
        import io

        import soundfile as sf

        from voiceprint.data.audio import AudioError

        for item in recordings:
            try:
                with sf.SoundFile(io.BytesIO(item.samples)) as fh:
                    seconds = fh.frames / fh.samplerate
            except Exception:       # undecodable: the API names the reason when it decodes
                continue
            if seconds > self.limits.max_audio_seconds:
                raise AudioError(item.name, "too_long", f"{seconds:.1f} s > {self.limits.max_audio_seconds:g} s "
                                                        "allowed by this service")
        return recordings

    def registry(self, *, create: bool):
        from voiceprint.serving.registry import Registry

        return Registry(self.registry_path, create=create)

    # Each runs in a worker thread.

    def embed(self, form: _Form) -> dict:
        items = self.checked(form.recordings("audio", many=True))
        emb = self.rec.embed_files(items)
        return {**self.model_info(scores=False), "files": len(items), "embedding_dim": int(emb.shape[1]),
                "embeddings": [{"name": a.name, "embedding": e.tolist()} for a, e in zip(items, emb)]}

    def verify(self, form: _Form) -> dict:
        (a,), (b,) = self.checked(form.recordings("a")), self.checked(form.recordings("b"))
        result = self.rec.verify(a, b, threshold=_threshold(form))
        return {**self.model_info(), "a": a.name, "b": b.name, "score": result.score,
                "threshold": result.threshold, "threshold_name": result.threshold_name,
                "same_speaker": result.same_speaker}

    def compare(self, form: _Form) -> dict:
        from voiceprint.serving.bundle import ThresholdError

        (probe,) = self.checked(form.recordings("probe"))
        refs = self.checked(form.recordings("against", many=True))
        try:
            name, value = self.rec.threshold(_threshold(form))
        except ThresholdError:
            if form.text("threshold") is not None:
                raise
            name, value = None, None     # a bare model and no threshold: scores only, as the CLI does
        scores = self.rec.compare(probe, refs)
        results = [{"reference": ref.name, "score": float(s)} for ref, s in zip(refs, scores)]
        if value is not None:
            for r in results:
                r["same_speaker"] = bool(r["score"] >= value)
        return {**self.model_info(), "probe": probe.name, "threshold": value, "threshold_name": name,
                "results": results}

    def identify(self, form: _Form) -> dict:
        top, threshold = _top(form), _threshold(form)
        (probe,) = self.checked(form.recordings("audio"))
        with self.registry(create=False) as reg:
            result = self.rec.identify(reg, probe, top=top, threshold=threshold)
        return {**self.model_info(), "file": probe.name, "speaker": result.speaker, "known": result.known,
                "score": result.score, "threshold": result.threshold, "threshold_name": result.threshold_name,
                "candidates": [{"speaker": c.speaker, "score": c.score, "enrollments": c.enrollments}
                               for c in result.candidates]}

    def enroll(self, form: _Form) -> dict:
        from voiceprint.serving.api import InputError
        from voiceprint.serving.registry import check_speaker_name

        name = form.text("name")
        if not isinstance(name, str):
            raise InputError("missing field 'name' (the speaker's name)")
        name = check_speaker_name(name)
        items = self.checked(form.recordings("audio", many=True))
        with self.registry(create=True) as reg:
            result = self.rec.enroll(reg, name, items)
        return {**self.model_info(scores=False), "speaker": result.speaker, "added": result.added,
                "already_enrolled": result.already_enrolled, "enrollments": result.enrollments}

    def speakers(self, form: _Form | None = None) -> dict:
        speakers = []
        if self.registry_path.exists():     # listing never creates the registry
            with self.registry(create=False) as reg:
                speakers = reg.speakers()
        return {"speakers": [{"name": s.name, "enrollments": s.enrollments, "model_sha256": s.model_sha256,
                              "first_enrolled": s.first_enrolled, "last_enrolled": s.last_enrolled}
                             for s in speakers]}

    def remove(self, name: str) -> dict:
        with self.registry(create=False) as reg:
            removed = reg.remove(name)
        return {"removed": name, "enrollments": removed}

    def health(self) -> dict:
        return {"status": "ok", **self.model_info(), "embedding_dim": int(self.rec.bundle.embedding_dim),
                "limits": {"max_body_bytes": self.limits.max_body_bytes,
                           "max_audio_seconds": self.limits.max_audio_seconds, "workers": self.limits.workers}}

    def warm_up(self) -> None:
        """Trace the model and compile the feature code before the first request (tracing takes seconds)."""
        import numpy as np

        from voiceprint.core.errors import VoiceprintError

        rate = self.rec.bundle.features.sample_rate
        t = np.arange(2 * rate) / rate
        # Voiced-speech-like: harmonics of 150 Hz in 4 Hz syllables with pauses, so either VAD keeps some of it.
        syllables = np.maximum(np.sin(2 * np.pi * 4 * t), 0) ** 2
        voiced = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 8))
        try:
            self.rec.embed_signal((0.1 * syllables * voiced).astype(np.float32), rate)
        except VoiceprintError as exc:     # a cold first request is slower, nothing worse
            logger.warning("warm-up skipped: %s", exc)


def _error(status: int, kind: str, message: str, **extra) -> web.Response:
    from aiohttp import web

    return web.json_response({"error": {"kind": kind, "message": message, "status": status, **extra}},
                             status=status)


def create_app(rec: Recognizer, *, registry: str | Path | None = None, token: str | None = None,
               limits: Limits = Limits(), warm_up: bool = True) -> web.Application:
    """The aiohttp application (run it with :func:`serve` or :class:`BackgroundServer`)."""
    import asyncio
    import hmac

    from aiohttp import web

    from voiceprint.data.audio import AudioError
    from voiceprint.serving.cli import _error_kinds

    service = Service(rec, registry=registry, limits=limits)
    if warm_up:
        service.warm_up()
    kinds = _error_kinds()
    expected = b"Bearer " + token.encode() if token else None

    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            if expected is not None and not hmac.compare_digest(
                    request.headers.get("Authorization", "").encode(), expected):
                raise ServiceError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer ...)")
            if (request.content_length or 0) > limits.max_body_bytes:   # refused before reading it
                raise web.HTTPRequestEntityTooLarge(limits.max_body_bytes, request.content_length)
            return await handler(request)
        except ServiceError as exc:
            return _error(exc.status, exc.kind, str(exc))
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "too_large", f"request body larger than {limits.max_body_bytes} bytes")
        except web.HTTPNotFound:
            return _error(404, "not_found", f"no endpoint {request.path}")
        except web.HTTPMethodNotAllowed as exc:
            return _error(405, "method_not_allowed", f"{request.method} {request.path}: allowed "
                                                     f"{', '.join(sorted(exc.allowed_methods))}")
        except tuple(cls for cls, _, _ in kinds) as exc:
            kind = next(k for cls, k, _ in kinds if isinstance(exc, cls))
            extra = {"reason": exc.reason} if isinstance(exc, AudioError) else {}
            return _error(STATUS[kind], kind, str(exc), **extra)
        except web.HTTPException as exc:    # aiohttp's own refusals (e.g. a malformed multipart body), as JSON
            if exc.status < 400:
                raise
            return _error(exc.status, "usage" if exc.status == 400 else "http", exc.text or exc.reason)
        except Exception:
            logger.exception("%s %s failed", request.method, request.path)
            return _error(500, "error", "internal error (logged by the server)")

    async def run(fn, *args) -> web.Response:
        if service.pending >= limits.max_pending:
            raise ServiceError(503, "busy", f"{service.pending} requests already waiting; retry later")
        service.pending += 1      # only the event loop thread touches the counter
        try:
            result = await asyncio.get_running_loop().run_in_executor(service.pool, fn, *args)
        finally:
            service.pending -= 1
        return web.json_response(result)

    def operation(fn, audio_fields: tuple[str, ...]):
        async def handler(request: web.Request) -> web.Response:
            form = await _read_form(request, audio_fields)
            return await run(fn, form)
        return handler

    async def health(request):
        return web.json_response(service.health())

    async def speakers(request):
        return await run(service.speakers)

    async def remove(request):
        return await run(service.remove, request.match_info["name"])

    app = web.Application(client_max_size=limits.max_body_bytes, middlewares=[errors])
    app.add_routes([
        web.get("/health", health),
        web.post("/embed", operation(service.embed, ("audio",))),
        web.post("/verify", operation(service.verify, ("a", "b"))),
        web.post("/compare", operation(service.compare, ("probe", "against"))),
        web.post("/identify", operation(service.identify, ("audio",))),
        web.post("/enroll", operation(service.enroll, ("audio",))),
        web.get("/speakers", speakers),
        web.delete("/speakers/{name}", remove),
    ])

    async def shutdown(app):
        service.pool.shutdown(wait=True, cancel_futures=True)

    app.on_cleanup.append(shutdown)
    app["service"] = service
    return app


async def _start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, runner.addresses[0][1]     # the bound port (port 0: the one the OS chose)


def serve(app: web.Application, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, on_ready=None) -> None:
    """Serve until SIGTERM (returns) or SIGINT (KeyboardInterrupt); ``on_ready(port)`` once listening."""
    import asyncio
    import signal

    async def main():
        stop = asyncio.Event()
        # SIGTERM is how process managers (systemd, docker, kill) stop a service; SIGINT stays Ctrl-C's
        # KeyboardInterrupt (a process started in the background by a shell may have it ignored).
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        runner, bound = await _start(app, host, port)
        if on_ready is not None:
            on_ready(bound)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())


class BackgroundServer:
    """The service on ``host`` in a thread of this process (for tests, benchmarks and programs that embed it)::

        with BackgroundServer(create_app(rec)) as server:
            requests.post(server.url + "/verify", ...)
    """

    def __init__(self, app: web.Application, host: str = DEFAULT_HOST, port: int = 0):
        import asyncio
        import threading

        self.app, self.host, self.port = app, host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="voiceprint-serve-loop", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        import asyncio

        self._thread.start()
        self._runner, self.port = asyncio.run_coroutine_threadsafe(
            _start(self.app, self.host, self.port), self._loop).result()
        return self

    def __exit__(self, *exc) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
