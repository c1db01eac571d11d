"""Does the raw-PCM model (features in the graph) embed every LibriSpeech-mini file as the package does?

    python bench/pcm_model_check.py [--data DIR] [--model voiceprint/serving/pretrained/real-speech] [--formats onnx
    tflite]
                                    [--limit N] [--long N --long-seconds 60]

Exports ``--model`` (default: the shipped bundle) with :mod:`voiceprint.serving.pcm_export` to a temporary directory,
then for every audio file under ``--data`` (default ../shared/data/librispeech-mini) compares, in one process:

* the package: ``Recognizer(model).embed(path)`` (decode -> the bundle's VAD -> numpy/numba features ->
  float16 rounding -> Keras model);
* the PCM model: ``load_audio(path)`` -> the same VAD (outside the graph, by contract) -> the exported model
  on onnxruntime (``pcm-onnx``) or the TFLite interpreter (``pcm-tflite``).

Prints per format the number of files, their duration range after the VAD, and the minimum / mean cosine; exits 1
if any cosine is below --min-cosine (0.9999, the acceptance bar of issue 13).
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared_data import default_data, load_average  # noqa: E402

AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".mp3")


def _joined_files(corpus, count: int, seconds: float, rate: int, directory: Path) -> list[Path]:
    """``count`` float WAV files (read back bit-exactly) of consecutive corpus files joined to >= ``seconds``:
    LibriSpeech-mini utterances last at most ~30 s."""
    import soundfile as sf

    from voiceprint.data.audio import load_audio

    out, parts, total, it = [], [], 0, iter(corpus)
    while len(out) < count:
        signal = load_audio(next(it), rate)
        parts.append(signal)
        total += signal.shape[0]
        if total >= seconds * rate:
            path = directory / f"joined_{len(out)}.wav"
            sf.write(path, np.concatenate(parts), rate, subtype="FLOAT")
            out.append(path)
            parts, total = [], 0
    return out


def main() -> int:
    from voiceprint.serving.pretrained import SHIPPED

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--model", type=Path, default=SHIPPED)
    ap.add_argument("--formats", nargs="+", choices=("onnx", "tflite"), default=["onnx", "tflite"])
    ap.add_argument("--min-cosine", type=float, default=0.9999)
    ap.add_argument("--limit", type=int, default=0, help="check only the first N files (0: all)")
    ap.add_argument("--long", type=int, default=0,
                    help="also check N files of ~--long-seconds made by joining consecutive corpus files")
    ap.add_argument("--long-seconds", type=float, default=60.0)
    args = ap.parse_args()

    corpus = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    files = corpus[:args.limit] if args.limit else list(corpus)
    if not files:
        print(f"no audio files under {args.data}", file=sys.stderr)
        return 2

    from voiceprint.serving import pcm_export as P
    from voiceprint.serving.api import Recognizer
    from voiceprint.data.audio import AudioError, load_audio
    from voiceprint.features import apply_vad

    rec = Recognizer(args.model, backend="keras")   # the graph is built around the Keras model
    settings = rec.bundle.features
    print(f"model {args.model} (kind {settings.kind}, vad {settings.vad}, window_frames {settings.window_frames}); "
          f"{len(files)} files under {args.data}"
          + (f" + {args.long} made by joining consecutive files to >= {args.long_seconds:g} s"
             if args.long else "")
          + f"; load {load_average()}")
    embedders = {}
    with tempfile.TemporaryDirectory() as tmp:
        files += _joined_files(corpus, args.long, args.long_seconds, settings.sample_rate, Path(tmp))
        for fmt in args.formats:
            t0 = time.perf_counter()
            if fmt == "onnx":
                out = P.export_pcm_onnx(rec.bundle.model, settings, Path(tmp) / "model_pcm.onnx",
                                        stats_lda=rec.bundle.stats_lda)
                embedders[fmt] = P.load_pcm_onnx(out)
            else:
                out = P.export_pcm_tflite(rec.bundle.model, settings, Path(tmp) / "model_pcm.tflite",
                                          stats_lda=rec.bundle.stats_lda)
                embedders[fmt] = P.load_pcm_tflite(out)
            print(f"exported pcm-{fmt}: {out.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.0f} s")

        cosines = {fmt: [] for fmt in embedders}
        seconds, rejected, compared = [], [], []
        vad = settings.vad or "original"
        for path in files:
            try:
                reference = rec.embed(path)
            except AudioError as exc:       # the package refuses it: nothing to compare
                rejected.append(f"{path}: {exc.reason}")
                continue
            speech = apply_vad(load_audio(path, settings.sample_rate), vad, settings.sample_rate)
            seconds.append(speech.shape[0] / settings.sample_rate)
            compared.append(path)
            for fmt, embed in embedders.items():
                cosines[fmt].append(float(np.dot(embed(speech), reference)))
    if rejected:
        print(f"{len(rejected)} files refused by the package (not compared): " + "; ".join(rejected))
    print(f"{len(seconds)} files compared, {min(seconds):.2f}-{max(seconds):.2f} s of audio after the VAD")
    failed = False
    for fmt, values in cosines.items():
        values = np.array(values)
        worst = compared[int(np.argmin(values))]
        print(f"pcm-{fmt}: min cosine {values.min():.7f}  mean {values.mean():.7f}  "
              f"files below {args.min_cosine}: {int((values < args.min_cosine).sum())}  (worst: {worst})")
        failed |= bool((values < args.min_cosine).any())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
