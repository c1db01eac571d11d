"""The pretrained real-speech model shipped inside the package, used when no model of the user's own exists.

``voiceprint/serving/pretrained/real-speech/`` is a bundle (voiceprint.serving.bundle) written by the ``evaluate``
stage of the
``params-real.yaml`` preset, plus ``pretrained.json``: its name, what it was trained on, what it is not good for,
its evaluation numbers, and the sha256 of every file. :func:`shipped_model` checks those hashes before the model is
used, so a damaged install fails with a clear "reinstall" message instead of giving wrong scores.

Package a new one (after ``python -m voiceprint.core.params params-real.yaml | xargs dvc exp run``)::

    python -m voiceprint.serving.pretrained models/voiceprint metrics/eval.json --trained-on "..."

Give the shipped bundle a model.onnx (exported from its model.keras, checked, hashes in pretrained.json updated)::

    python -m voiceprint.serving.pretrained --add-onnx
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from voiceprint.serving.bundle import LEGACY_THRESHOLDS_FILE, THRESHOLDS_FILE, BundleError, file_sha256

SHIPPED = Path(__file__).resolve().parent / "pretrained" / "real-speech"
MANIFEST = "pretrained.json"
REINSTALL = "reinstall voiceprint (pip install --force-reinstall <the voiceprint package or checkout>)"


class ShippedModelError(BundleError):
    """The shipped model is missing or damaged; the message says how to reinstall."""


def shipped_model(directory: str | Path | None = None) -> Path:
    """The shipped bundle's directory, after checking every file against ``pretrained.json``."""
    directory = Path(directory or SHIPPED)
    manifest_file = directory / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["sha256"]
    except FileNotFoundError:
        raise ShippedModelError(f"the model shipped with voiceprint is missing ({manifest_file}); {REINSTALL}") \
            from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ShippedModelError(f"{manifest_file}: damaged ({type(exc).__name__}: {exc}); {REINSTALL}") from None
    for name, expected in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            raise ShippedModelError(f"the shipped model's {name} is missing ({path}); {REINSTALL}")
        if file_sha256(path) != expected:
            raise ShippedModelError(f"the shipped model's {name} does not match its sha256 ({path}); {REINSTALL}")
    return directory


def describe(directory: str | Path | None = None) -> dict:
    """``pretrained.json`` of the shipped model (name, trained_on, not_for, evaluation)."""
    return json.loads((Path(directory or SHIPPED) / MANIFEST).read_text())


def package(bundle: str | Path, eval_json: str | Path, out: str | Path, *, name: str, trained_on: str,
            not_for: str) -> dict:
    """Copy ``bundle`` to ``out`` with a ``pretrained.json`` holding the provenance, the in-domain and
    cross-corpus evaluation of the deployed system (from ``eval_json``) and every file's sha256."""
    bundle, out = Path(bundle), Path(out)
    report = json.loads(Path(eval_json).read_text())
    calibration = json.loads(next(f for f in (bundle / THRESHOLDS_FILE, bundle / LEGACY_THRESHOLDS_FILE)
                                  if f.is_file()).read_text())
    # the served system (e.g. fused_mfcc_lda), and its AS-normalised scores when the bundle normalises
    deployed = calibration["system"] + ("_asnorm" if calibration.get("score_norm") == "as_norm" else "")
    keys = ("eer", "eer_ci95_low", "eer_ci95_high", "min_dcf", "target_trials", "nontarget_trials")
    evaluation = {"in_domain": {k: report[deployed][k] for k in keys if k in report[deployed]},
                  "in_domain_mfcc_baseline": report["mfcc_baseline"]["eer"]}
    cross = report.get("cross_corpus", {})
    if deployed in cross:
        evaluation["cross_corpus"] = {k: cross[deployed][k] for k in keys if k in cross[deployed]}
        evaluation["cross_corpus_mfcc_baseline"] = cross["mfcc_baseline"]["eer"]
    files = sorted(p.name for p in bundle.iterdir() if p.is_file())
    manifest = {"name": name, "system": deployed, "trained_on": trained_on, "not_for": not_for,
                "evaluation": evaluation, "sha256": {f: file_sha256(bundle / f) for f in files}}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    for f in files:
        shutil.copy2(bundle / f, staging / f)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return manifest


def add_onnx(directory: str | Path | None = None) -> dict:
    """Add model.onnx to the shipped bundle (voiceprint.serving.bundle.add_onnx) and rewrite ``pretrained.json``'s
    sha256 list for the files now there; the rest of the manifest stays as it is."""
    from voiceprint.serving.bundle import add_onnx as add_to_bundle

    return _rewrite(directory, add_to_bundle)


def one_trunk(directory: str | Path | None = None) -> dict:
    """Rewrite the shipped bundle's two-trunk fused model as one trunk pass
    (voiceprint.serving.bundle.rewrite_one_trunk)
    and ``pretrained.json``'s sha256 list; the rest of the manifest stays as it is."""
    from voiceprint.serving.bundle import rewrite_one_trunk

    return _rewrite(directory, rewrite_one_trunk)


def _rewrite(directory, change) -> dict:
    directory = Path(shipped_model(directory))      # every file checked before anything changes
    change(directory)
    manifest = describe(directory)
    manifest["sha256"] = {p.name: file_sha256(p) for p in sorted(directory.iterdir())
                          if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m voiceprint.serving.pretrained",
                                     description="package a trained bundle as the shipped pretrained model")
    args = sys.argv[1:] if argv is None else list(argv)
    rewrites = {"--add-onnx": add_onnx, "--one-trunk": one_trunk}
    if args[:1] and args[0] in rewrites:
        print(json.dumps(rewrites[args[0]](args[1] if len(args) > 1 else None)["sha256"], indent=2))
        return
    parser.add_argument("bundle", help="bundle directory written by the evaluate stage (models/voiceprint); "
                                       "or --add-onnx [DIR] to give the shipped bundle its model.onnx, or --one-trunk [DIR] "
                                       "to rewrite its two-trunk fused model as one trunk")
    parser.add_argument("eval_json", help="its metrics/eval.json")
    parser.add_argument("--out", default=None, help=f"default: {SHIPPED}")
    parser.add_argument("--name", default="real-speech")
    parser.add_argument("--trained-on", required=True)
    parser.add_argument("--not-for", default="")
    args = parser.parse_args(argv)
    manifest = package(args.bundle, args.eval_json, args.out or SHIPPED, name=args.name, trained_on=args.trained_on,
                       not_for=args.not_for)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
