"""The runtime (ONNX Runtime, numpy features) against the TensorFlow path, side by side in one run:

1. ``voiceprint verify a.flac b.flac`` from a cold process to the answer, ``--backend onnx`` vs ``--backend keras``,
   with the shipped model: wall time, CPU time (user + sys) and peak memory of each subprocess; medians of
   ``--repeats`` runs, the two backends interleaved so that load from other processes hits both alike.
2. Embedding throughput of a warm :class:`voiceprint.Recognizer` (files in, embeddings out: decoding, features and
   model), onnx vs keras, on the default model (params.yaml: filters 16 32 64 128, 1 block) and the full-size one
   (the original Deep Speaker: filters 64 128 256 512, 3 blocks), random weights (speed does not depend on them),
   as x real time and utterances/s; best of ``--passes`` passes.

    python bench/cli_cold_start.py [--repeats 7] [--utterances 16] [--seconds 4] [--runtime-python PY]

``--runtime-python``: run the onnx CLI with another interpreter, e.g. a venv holding only ``pip install .`` (the
runtime without TensorFlow; bench/runtime_next_to_torch.sh makes one); the keras CLI always runs with this one.
Audio: synthetic speakers (voiceprint.data.corpus.synthetic), ``--seconds`` long, made in a temporary directory.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # this checkout's package, also where another one is installed in editable mode
DEFAULT = {"filters": [16, 32, 64, 128], "blocks": 1}
FULL = {"filters": [64, 128, 256, 512], "blocks": 3}
FEATURES = {"kind": "logmel_cmn", "vad": "original", "sample_rate": 16000, "num_bands": 64, "min_seconds": 0.5,
            "window_frames": 0, "hop_frames": 80}


def _audio(root: Path, utterances: int, seconds: float) -> list[Path]:
    from voiceprint.data.corpus.synthetic import generate

    manifest = generate(root, num_speakers=max(2, utterances // 4), utterances_per_speaker=4,
                        min_seconds=seconds, max_seconds=seconds, seed=0)
    return [root / p for p in manifest.path][:utterances]


def _cli_once(python: str, backend: str, a: Path, b: Path, cwd: Path) -> dict:
    """One cold ``voiceprint verify`` in a new process: wall, CPU (user + sys) and peak RSS of that child."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen([python, "-m", "voiceprint.serving.cli", "verify", str(a), str(b), "--backend",
                                  backend, "--json", "--quiet"], stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(child.pid, 0)     # this child's own rusage (peak RSS included)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"voiceprint verify --backend {backend} failed ({child.returncode}): {err.read()}")
        answer = json.loads(out.read())
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
            "score": answer["score"]}


def cold_start(files: list[Path], repeats: int, runtime_python: str, cwd: Path) -> dict:
    a, b = files[0], files[1]
    pythons = {"onnx": runtime_python, "keras": sys.executable}
    for backend, python in pythons.items():      # once each untimed: numba/OS file caches, as a user's 2nd call
        _cli_once(python, backend, a, b, cwd)
    runs = {backend: [] for backend in pythons}
    for _ in range(repeats):
        for backend, python in pythons.items():
            runs[backend].append(_cli_once(python, backend, a, b, cwd))
    out = {}
    for backend, rs in runs.items():
        out[backend] = {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu")}
        out[backend]["wall_min"] = min(r["wall"] for r in rs)
        out[backend]["rss_mb"] = statistics.median(r["rss_mb"] for r in rs)
        out[backend]["score"] = rs[0]["score"]
    return out


def _bundle(arch: dict, root: Path) -> Path:
    import keras

    from voiceprint.serving.bundle import save_bundle
    from voiceprint.models import build_rescnn

    keras.utils.set_random_seed(0)
    model, _ = build_rescnn(filters=arch["filters"], blocks=arch["blocks"], embedding_dim=512, num_bands=64,
                            num_classes=10, dropout=0.0)
    return save_bundle(root, model, system="base", features=FEATURES,
                       thresholds={"eer": 0.5, "low_far": 0.9, "low_far_rate": 0.01}, evaluation={"eer": 0.1},
                       onnx=True)


def throughput(files: list[Path], seconds: float, passes: int, root: Path) -> dict:
    from voiceprint.serving.api import Recognizer
    from voiceprint.core.runtime import configure_tensorflow

    configure_tensorflow(0)
    out = {}
    for name, arch in (("default", DEFAULT), ("full", FULL)):
        t = time.perf_counter()
        bundle = _bundle(arch, root / name)
        print(f"  {name} model ({arch['filters']}, {arch['blocks']} block(s)): bundle + checked ONNX export in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        recs = {backend: Recognizer(bundle, backend=backend) for backend in ("onnx", "keras")}
        embeddings = {backend: rec.embed_files(files[:2]) for backend, rec in recs.items()}   # warm-up
        best = {backend: float("inf") for backend in recs}
        for _ in range(passes):
            for backend, rec in recs.items():
                t = time.perf_counter()
                embeddings[backend] = rec.embed_files(files)
                best[backend] = min(best[backend], time.perf_counter() - t)
        a, b = (embeddings[k].astype(np.float64) for k in ("onnx", "keras"))
        cos = float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
        out[name] = {backend: {"seconds": s, "x_real_time": len(files) * seconds / s,
                               "utterances_per_s": len(files) / s} for backend, s in best.items()}
        out[name]["min_cosine"] = cos
    return out


def _report_cold(cold: dict, args) -> None:
    print(f"\nvoiceprint verify a.flac b.flac ({args.seconds:g}-s files, shipped model), cold process to answer, "
          f"median of {args.repeats}:")
    print(f"  {'backend':8s} {'wall s':>8s} {'(min)':>7s} {'CPU s':>7s} {'peak MB':>8s}  score")
    for backend, r in cold.items():
        print(f"  {backend:8s} {r['wall']:8.2f} {r['wall_min']:7.2f} {r['cpu']:7.2f} {r['rss_mb']:8.0f}  "
              f"{r['score']:.4f}")
    print(f"  keras / onnx: wall {cold['keras']['wall'] / cold['onnx']['wall']:.1f}x, "
          f"CPU {cold['keras']['cpu'] / cold['onnx']['cpu']:.1f}x, "
          f"memory {cold['keras']['rss_mb'] / cold['onnx']['rss_mb']:.1f}x")


def _report_throughput(files, args, tmp: Path) -> None:
    print(f"\nembedding throughput, warm Recognizer, {len(files)} files of {args.seconds:g} s "
          f"(decode + features + model), best of {args.passes}:", flush=True)
    result = throughput(files, args.seconds, args.passes, tmp / "bundles")
    print(f"  {'model':8s} {'backend':8s} {'x real time':>12s} {'utt/s':>8s}")
    for name in ("default", "full"):
        for backend in ("onnx", "keras"):
            r = result[name][backend]
            print(f"  {name:8s} {backend:8s} {r['x_real_time']:12.1f} {r['utterances_per_s']:8.2f}")
        ratio = result[name]["onnx"]["x_real_time"] / result[name]["keras"]["x_real_time"]
        print(f"  {name:8s} onnx / keras: {ratio:.2f}x; lowest cosine onnx vs keras "
              f"{result[name]['min_cosine']:.7f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="cold CLI runs per backend (median reported)")
    ap.add_argument("--utterances", type=int, default=16, help="files embedded per throughput pass")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each file")
    ap.add_argument("--passes", type=int, default=3, help="throughput passes per backend (best reported)")
    ap.add_argument("--runtime-python", default=sys.executable,
                    help="interpreter for the onnx CLI (default: this one)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-cold", action="store_true")
    args = ap.parse_args()

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; onnx CLI: {args.runtime_python}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = _audio(tmp / "audio", args.utterances, args.seconds)
        if not args.skip_cold:
            _report_cold(cold_start(files, args.repeats, args.runtime_python, tmp), args)   # cwd tmp: shipped model
        if not args.skip_throughput:
            _report_throughput(files, args, tmp)


if __name__ == "__main__":
    main()
