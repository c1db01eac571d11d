"""``voiceprint serve`` under load: requests/s and p50/p99 latency of ``POST /verify`` with two 4-s files, against
calling ``Recognizer.verify`` on the same two files in-process (the baseline), side by side in one run.

    python bench/serve_load.py [--requests 200] [--concurrency 1 4 20] [--cores 2] [--workers 2] [--model M]

The model is the shipped real-speech one unless --model names another. The files are two synthetic 4-s FLAC
recordings (voiceprint.data.corpus.synthetic; 16 kHz mono). The server is the real command
(``python -m voiceprint.serving.cli serve --port 0``) in a child process; the clients are aiohttp coroutines in this
process,
each uploading both files (multipart) per request. Everything is pinned to the first --cores CPUs (the child
inherits the pinning). The baseline calls ``rec.verify(a, b)`` back to back from one thread (files decoded, featurised
and embedded each call, as the server does); a second baseline passes the files' bytes, as the server receives
them (in-memory audio skips the MFCC statistics that the file path computes for the pipeline and the API discards,
so it is the fairer measure of what HTTP adds). Latency percentiles are over all requests of a level after 5 warm-up
requests; the load average is printed because the machine may be shared.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from _shared_data import load_average  # noqa: E402  (bench/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
WARM_UP = 5


class Tally:
    """Latencies and wall time of one mode, pooled over rounds."""

    def __init__(self):
        self.latencies, self.wall, self.errors, self.score = [], 0.0, 0, None

    def add(self, latencies, wall, errors=0, score=None):
        self.latencies += latencies
        self.wall += wall
        self.errors += errors
        self.score = score

    def stats(self) -> dict:
        ms = np.asarray(self.latencies) * 1000
        return {"requests_per_s": len(ms) / self.wall, "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99))}


def in_process(rec, a, b, n: int) -> tuple[list[float], float, int, float]:
    for _ in range(WARM_UP):
        score = rec.verify(a, b).score
    latencies = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        rec.verify(a, b)
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - start, 0, score


async def load(url: str, a: Path, b: Path, n: int, concurrency: int) -> tuple[list[float], float, int, float]:
    import aiohttp

    files = {"a": (a.name, a.read_bytes()), "b": (b.name, b.read_bytes())}

    async def one(session) -> tuple[float, int, float | None]:
        form = aiohttp.FormData()
        for field, (name, data) in files.items():
            form.add_field(field, data, filename=name, content_type="audio/flac")
        t = time.perf_counter()
        async with session.post(url + "/verify", data=form) as resp:
            body = await resp.json()
        return time.perf_counter() - t, resp.status, body.get("score")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _ in range(WARM_UP):
            _, _, score = await one(session)
        todo = iter(range(n))
        results = []

        async def client():
            for _ in todo:
                results.append(await one(session))

        start = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(concurrency)])
        wall = time.perf_counter() - start
    errors = sum(status != 200 for _, status, _ in results)
    return [lat for lat, _, _ in results], wall, errors, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level (and baseline "
                                                                  "calls), split over the rounds")
    parser.add_argument("--rounds", type=int, default=2, help="alternate baseline and server levels this many times "
                                                              "(a shared machine's load drifts)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 20])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="the server's model threads")
    parser.add_argument("--model", help="bundle (default: the shipped model)")
    args = parser.parse_args()

    cpus = sorted(os.sched_getaffinity(0))[:args.cores]
    os.sched_setaffinity(0, cpus)
    from voiceprint.serving.api import Recognizer, checked_model_path
    from voiceprint.data.corpus.synthetic import generate
    from voiceprint.serving.pretrained import SHIPPED
    from voiceprint.core.runtime import configure_tensorflow

    configure_tensorflow(0)
    model = str(checked_model_path(args.model or SHIPPED))
    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate(Path(tmp) / "audio", num_speakers=2, utterances_per_speaker=2, min_seconds=4.0,
                            max_seconds=4.0, seed=0)
        a, b = (Path(tmp) / "audio" / p for p in manifest.path[::2])     # two speakers' first recordings
        print(f"model {model}; files {a.name}, {b.name} (4.0 s each); cores {cpus}; server workers {args.workers}; "
              f"load average {load_average()}")
        rec = Recognizer(model)
        base, base_bytes = Tally(), Tally()
        served = {c: Tally() for c in args.concurrency}
        per_round = max(1, args.requests // args.rounds)
        proc = subprocess.Popen(
            [sys.executable, "-m", "voiceprint.serving.cli", "serve", "--port", "0", "--json", "--quiet", "--model",
             model, "--workers", str(args.workers), "--registry", str(Path(tmp) / "registry.sqlite")],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            url = json.loads(proc.stdout.readline())["url"]
            for _ in range(args.rounds):
                base.add(*in_process(rec, a, b, per_round))
                base_bytes.add(*in_process(rec, a.read_bytes(), b.read_bytes(), per_round))
                for c in args.concurrency:
                    served[c].add(*asyncio.run(load(url, a, b, per_round, c)))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:   # TensorFlow's teardown on a loaded machine: not what is measured
                proc.kill()

    print(f"\n{'':32s}{'requests/s':>11s}{'p50 ms':>9s}{'p99 ms':>9s}{'errors':>8s}   vs in-process "
          "(throughput, p50)")
    ref = base.stats()
    print(f"{'in-process Recognizer.verify':32s}{ref['requests_per_s']:11.2f}{ref['p50_ms']:9.1f}"
          f"{ref['p99_ms']:9.1f}{'':>8s}")
    other = base_bytes.stats()
    print(f"{'in-process, the files as bytes':32s}{other['requests_per_s']:11.2f}{other['p50_ms']:9.1f}"
          f"{other['p99_ms']:9.1f}{'':>8s}   {other['requests_per_s'] / ref['requests_per_s']:.2f}x, "
          f"{other['p50_ms'] / ref['p50_ms']:.2f}x")
    for c, tally in served.items():
        stats = tally.stats()
        print(f"{f'serve, {c} concurrent client(s)':32s}{stats['requests_per_s']:11.2f}{stats['p50_ms']:9.1f}"
              f"{stats['p99_ms']:9.1f}{tally.errors:8d}   {stats['requests_per_s'] / ref['requests_per_s']:.2f}x, "
              f"{stats['p50_ms'] / ref['p50_ms']:.2f}x")
        assert abs(tally.score - base.score) < 1e-5, (tally.score, base.score)    # the same answer every way
    assert abs(base_bytes.score - base.score) < 1e-5, (base_bytes.score, base.score)
    print(f"\nscore {base.score:.6f} every way; {per_round} requests per mode per round, {args.rounds} rounds; "
          f"load average {load_average()}")


if __name__ == "__main__":
    main()
