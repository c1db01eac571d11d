"""The ``voiceprint`` console command: embed, verify, compare, enroll, identify, speakers, cluster, score (a trial
list), serve (an HTTP service), export (model formats) and preset (params presets as dvc flags).

Human-readable output by default, one JSON document on stdout with ``--json`` (for other programs, which can drive
this command by subprocess from any Python environment). Errors: one line on stderr (and, with ``--json``, an
``{"error": {...}}`` document on stdout) and a non-zero exit code:

    0  success                      3  model missing or invalid      5  registry error (missing or empty registry,
    1  unexpected error (I/O ...)   4  bad audio (missing, unreadable,  unknown speaker, another model's embeddings,
    2  usage (bad arguments,           silent, too short ...)           bad speaker name)
       threshold, no audio files,
       bad trial list)

Output files are written atomically: on any error nothing is left half-written. ``--json`` and ``--quiet`` go
before or after the command; ``voiceprint --print-completion bash|zsh`` prints a shell completion script.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_MODEL, EXIT_AUDIO, EXIT_REGISTRY = 0, 1, 2, 3, 4, 5


# ------------------------------------------------------------------------------------------------ helpers

def _import_tensorflow_quietly() -> None:
    """TensorFlow prints start-up notices on stderr (oneDNN, absl) that no log level silences; they would bury
    the one-line errors callers parse. Capture stderr while importing and replay it only if the import fails."""
    import tempfile

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _recognizer(args):
    from voiceprint.serving.api import InputError, Recognizer, checked_model_path
    from voiceprint.serving.bundle import require_model
    from voiceprint.core.runtime import env_count

    try:
        env_count("VOICEPRINT_THREADS")     # a usage error, before TensorFlow could abort on it
    except ValueError as exc:
        raise InputError(str(exc)) from None
    model = require_model(checked_model_path(args.model))   # fail fast, before the slow TensorFlow import
    _say_which_model(args, model)
    backend = getattr(args, "backend", "auto")
    if backend == "keras" or (backend == "auto" and not _has_onnx(model)):
        # Only the keras backend pays for TensorFlow; the onnx one never imports it (tests/test_runtime.py).
        try:
            _import_tensorflow_quietly()
        except ImportError:
            pass    # Recognizer reports the missing package as a model error naming it
        else:
            from voiceprint.core.runtime import configure_tensorflow

            configure_tensorflow(0)   # threads (VOICEPRINT_THREADS); inference draws no random numbers
    features = {"kind": args.feature_kind} if args.feature_kind else None
    rec = Recognizer(model, features=features, backend=backend)
    if rec.shipped is not None and not getattr(args, "quiet", False):
        print(f"voiceprint: using the model shipped with the package ({rec.shipped['name']}: "
              f"{rec.shipped['trained_on']}); pass --model or set VOICEPRINT_MODEL for another", file=sys.stderr)
    return rec


def _has_onnx(model: Path) -> bool:
    """Would ``auto`` pick ONNX Runtime for this model? (voiceprint.serving.bundle decides; this only avoids importing
    TensorFlow before it when it will not be used.)"""
    from voiceprint.serving.bundle import _onnx_runtime_available, thresholds_file

    if model.suffix == ".onnx":
        return True
    try:
        has = model.is_dir() and "onnx_sha256" in json.loads(thresholds_file(model).read_text())
    except (OSError, ValueError):
        return False    # load_bundle reports what is wrong with it
    return has and _onnx_runtime_available()
def _say_which_model(args, model) -> None:
    """A model picked by default from the working directory is named (the shipped one is named by _recognizer):
    the same command run elsewhere would use another model."""
    from voiceprint.serving.api import DEFAULT_MODEL, MODEL_ENV_VAR

    if args.model is None and not os.environ.get(MODEL_ENV_VAR) and Path(model) == DEFAULT_MODEL \
            and not getattr(args, "quiet", False):
        print(f"voiceprint: using the model at {Path(model).absolute()} (./{DEFAULT_MODEL} in the current "
              "directory); pass --model or set VOICEPRINT_MODEL for another", file=sys.stderr)


def _progress(args) -> bool:
    # Only on a terminal: a caller reading stderr through a pipe gets the error line alone.
    return not args.quiet and not args.json and sys.stderr.isatty()


def _emit(args, payload: dict, human: str) -> int:
    print(json.dumps(payload) if args.json else human)
    return EXIT_OK


def _model_info(rec, *, scores: bool = True) -> dict:
    """The model, and for commands that score, how: ``score_norm`` none (cosine) or as_norm."""
    info = {"model": str(rec.bundle.path), "model_sha256": rec.model_sha256}
    shipped = rec.shipped
    if shipped is not None:     # say plainly which model answered: the one shipped with the package
        info.update(model_name=shipped["name"], trained_on=shipped["trained_on"])
    return {**info, "score_norm": rec.score_norm} if scores else info


def _threshold_label(name: str, rec) -> str:
    # Cosine output reads as before; normalised scores say so, since their scale is not a cosine's.
    return name if rec.score_norm == "none" else f"{name}, AS-norm score"


def _registry(args, *, create: bool):
    from voiceprint.serving.registry import Registry

    return Registry(args.registry, create=create)


def _check_not_directory(*paths) -> None:
    from voiceprint.serving.api import InputError

    # Checked before any work: an output is replaced whole, and a directory is never ours to replace.
    for path in paths:
        if Path(path).is_dir():
            raise InputError(f"output {path}: is a directory; give a file name")


def _output_suffix(path: str | None, allowed: tuple[str, ...]) -> str | None:
    from voiceprint.serving.api import InputError

    if path is None:
        return None
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        raise InputError(f"output {path}: expected a file ending in {' or '.join(allowed)}")
    _check_not_directory(path, *([Path(path).with_suffix(".paths.csv")] if suffix == ".npy" else []))
    return suffix


# ------------------------------------------------------------------------------------------------ commands

def cmd_embed(args) -> int:
    import numpy as np

    from voiceprint.serving.api import InputError, audio_files
    from voiceprint.core.outputs import atomic_path, write_rows

    suffix = _output_suffix(args.output, (".npy", ".csv"))
    if suffix is None and not args.json:
        raise InputError("give -o OUT.npy or -o OUT.csv (or --json to print the embeddings)")
    skipped = []
    paths = audio_files(args.inputs, skipped=skipped)
    rec = _recognizer(args)
    emb = rec.embed_files(paths, progress=_progress(args))
    names = [str(p) for p in paths]
    payload = {**_model_info(rec, scores=False), "files": len(names), "embedding_dim": int(emb.shape[1]),
               "skipped": [str(p) for p in skipped]}
    if suffix is None:
        payload["embeddings"] = [{"path": n, "embedding": e.tolist()} for n, e in zip(names, emb)]
        return _emit(args, payload, "")
    if suffix == ".npy":
        rows = Path(args.output).with_suffix(".paths.csv")
        # The row list first: a finished .npy always has its row list beside it.
        write_rows(rows, ["row", "path"], enumerate(names))
        with atomic_path(args.output) as tmp, open(tmp, "wb") as fh:
            np.save(fh, emb)
        payload.update(output=str(args.output), paths_file=str(rows))
        human = (f"wrote {len(names)} embeddings ({emb.shape[1]}-d) to {args.output}; "
                 f"row i is the file in row i of {rows}")
    else:
        write_rows(args.output, ["path", *(f"emb_{i}" for i in range(emb.shape[1]))],
                   ([name, *map(float, row)] for name, row in zip(names, emb)))
        payload.update(output=str(args.output))
        human = f"wrote {len(names)} embeddings ({emb.shape[1]}-d) to {args.output}"
    return _emit(args, payload, human)


def cmd_verify(args) -> int:
    _check_prior_or_threshold(args)
    rec = _recognizer(args)
    if args.prior is not None:
        result = rec.verify_at_prior(args.a, args.b, prior=args.prior)
    else:
        result = rec.verify(args.a, args.b, threshold=args.threshold or "eer")
    verdict = "same speaker" if result.same_speaker else "different speakers"
    relation = ">=" if result.same_speaker else "<"
    llr = _llr_fields(rec, result)
    return _emit(args, {**_model_info(rec), "a": args.a, "b": args.b, "score": result.score,
                        "threshold": result.threshold, "threshold_name": result.threshold_name,
                        "same_speaker": result.same_speaker, **llr},
                 f"{verdict}: score {result.score:.4f} {relation} threshold {result.threshold:.4f} "
                 f"({_threshold_label(result.threshold_name, rec)})" + _llr_text(llr))


def cmd_compare(args) -> int:
    from voiceprint.serving.bundle import ThresholdError

    rec = _recognizer(args)
    try:
        name, value = rec.threshold(args.threshold or "eer")
    except ThresholdError:
        if args.threshold:
            raise
        name, value = None, None   # a bare model and no --threshold: scores only
    scores = rec.compare(args.probe, args.against)
    results = [{"reference": ref, "score": float(s)} for ref, s in zip(args.against, scores)]
    lines = []
    for r in results:
        if value is not None:
            r["same_speaker"] = bool(r["score"] >= value)
        verdict = "" if value is None else ("  same" if r["same_speaker"] else "  different")
        lines.append(f"{r['score']:8.4f}{verdict}  {r['reference']}")
    header = f"{args.probe} against:" + (
        "" if value is None else f" (threshold {value:.4f}, {_threshold_label(name, rec)})")
    return _emit(args, {**_model_info(rec), "probe": args.probe, "threshold": value, "threshold_name": name,
                        "results": results}, "\n".join([header, *lines]))


def cmd_enroll(args) -> int:
    from voiceprint.serving.api import audio_files
    from voiceprint.serving.registry import check_speaker_name

    name = check_speaker_name(args.name)   # fail before loading the model
    skipped = []
    paths = audio_files(args.files, skipped=skipped)
    rec = _recognizer(args)
    with _registry(args, create=True) as reg:
        result = rec.enroll(reg, name, paths, progress=_progress(args))
        where = str(reg.path)
    return _emit(args, {**_model_info(rec, scores=False), "registry": where, "speaker": result.speaker,
                        "added": result.added, "already_enrolled": result.already_enrolled,
                        "enrollments": result.enrollments, "skipped": [str(p) for p in skipped]},
                 f"enrolled {result.speaker}: {result.added} new recording(s), {result.already_enrolled} already "
                 f"enrolled, {result.enrollments} in total (registry {where})")


def cmd_identify(args) -> int:
    _check_prior_or_threshold(args)
    rec = _recognizer(args)
    with _registry(args, create=False) as reg:
        if args.prior is not None:
            result = rec.identify_at_prior(reg, args.file, top=args.top, prior=args.prior)
        else:
            result = rec.identify(reg, args.file, top=args.top, threshold=args.threshold or "eer")
    best = result.candidates[0]
    label = _threshold_label(result.threshold_name, rec)
    if result.known:
        human = [f"{result.speaker}: score {result.score:.4f} >= threshold {result.threshold:.4f} ({label})"]
    else:
        human = [f"unknown: best {best.speaker} scores {best.score:.4f} < threshold {result.threshold:.4f} "
                 f"({label})"]
    llr = _llr_fields(rec, result)
    human[0] += _llr_text(llr)
    if args.top > 1:
        human += [f"  {c.score:8.4f}  {c.speaker} ({c.enrollments} enrolment(s))" for c in result.candidates]
    return _emit(args, {**_model_info(rec), "file": args.file, "speaker": result.speaker, "known": result.known,
                        "score": result.score, "threshold": result.threshold,
                        "threshold_name": result.threshold_name,
                        "candidates": [{"speaker": c.speaker, "score": c.score, "enrollments": c.enrollments}
                                       for c in result.candidates], **llr},
                 "\n".join(human))


def cmd_speakers_list(args) -> int:
    from voiceprint.serving.registry import default_registry_path

    path = Path(args.registry) if args.registry else default_registry_path()
    speakers = []
    if path.exists():   # listing must not create a registry file
        with _registry(args, create=False) as reg:
            speakers = reg.speakers()
    rows = [{"name": s.name, "enrollments": s.enrollments, "model_sha256": s.model_sha256,
             "first_enrolled": s.first_enrolled, "last_enrolled": s.last_enrolled} for s in speakers]
    human = [f"{s.name}\t{s.enrollments} enrolment(s)\tmodel {s.model_sha256[:12]}\tlast {s.last_enrolled}"
             for s in speakers] or [f"no speakers enrolled (registry {path})"]
    return _emit(args, {"registry": str(path), "speakers": rows}, "\n".join(human))


def cmd_speakers_remove(args) -> int:
    with _registry(args, create=False) as reg:
        removed = reg.remove(args.name)
        where = str(reg.path)
    return _emit(args, {"registry": where, "removed": args.name, "enrollments": removed},
                 f"removed {args.name} ({removed} enrolment(s)) from {where}")


def cmd_cluster(args) -> int:
    import csv
    import io

    from voiceprint.serving.api import InputError, audio_files
    from voiceprint.core.outputs import write_rows

    _output_suffix(args.output, (".csv",))
    if args.speakers is not None and args.threshold is not None:
        raise InputError("give --speakers or --threshold, not both")
    skipped = []
    paths = audio_files(args.inputs, skipped=skipped)
    rec = _recognizer(args)
    name, value = (None, None) if args.speakers is not None else rec.threshold(args.threshold or "eer")
    labels = rec.cluster(paths, threshold=args.threshold or "eer", num_speakers=args.speakers,
                         progress=_progress(args))
    table = [(str(p), int(label)) for p, label in zip(paths, labels)]
    groups = int(labels.max())
    payload = {**_model_info(rec), "threshold": value, "threshold_name": name, "speakers": groups,
               "files": [{"path": p, "speaker": label} for p, label in table], "skipped": [str(p) for p in skipped]}
    if args.output:
        write_rows(args.output, ["path", "speaker"], table)
        payload["output"] = str(args.output)
        human = f"{len(table)} files in {groups} speaker group(s), written to {args.output}"
    else:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([("path", "speaker"), *table])
        human = text.getvalue().rstrip("\n")
    return _emit(args, payload, human)


def cmd_serve(args) -> int:
    from voiceprint.serving.serve import Limits, check_binding, create_app, serve

    import importlib.util

    from voiceprint.serving.api import InputError

    check_binding(args.host, args.token)    # before loading the model
    if args.workers < 1 or args.max_body_mb <= 0 or args.max_seconds <= 0:
        raise InputError("--workers, --max-body-mb and --max-seconds must be > 0")
    if importlib.util.find_spec("aiohttp") is None:
        raise InputError("serve needs the aiohttp package: pip install aiohttp")
    rec = _recognizer(args)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_audio_seconds=args.max_seconds,
                    workers=args.workers)
    app = create_app(rec, registry=args.registry, token=args.token, limits=limits)

    def ready(port):
        url = f"http://{args.host}:{port}"
        _emit(args, {**_model_info(rec), "url": url, "registry": str(app["service"].registry_path)},
              f"voiceprint serve: listening on {url} (model {rec.bundle.path}); Ctrl-C stops")
        sys.stdout.flush()

    try:
        serve(app, args.host, args.port, on_ready=ready)
    except KeyboardInterrupt:   # the way to stop a server: not an error
        pass
    return EXIT_OK


def cmd_preset(args) -> int:
    import shlex

    from voiceprint.core.params import preset_assignments

    assignments = preset_assignments(args.preset, args.base)
    flags = " ".join(f"-S {shlex.quote(a)}" for a in assignments)
    return _emit(args, {"preset": args.preset, "base": args.base, "assignments": assignments, "flags": flags},
                 flags)


def cmd_export(argv: list[str]) -> int:
    from voiceprint.serving.export import main as export_main

    return export_main(argv, prog="voiceprint export")


# Commands whose arguments another module's parser reads as they are (its own --help).
PASSTHROUGH = {"export": cmd_export}
def _check_prior_or_threshold(args) -> None:
    from voiceprint.serving.api import InputError

    if args.prior is not None and args.threshold is not None:
        raise InputError("give --threshold or --prior, not both")


def _llr_fields(rec, result) -> dict:
    """``llr`` (and ``prior`` when the decision was made at one) for a bundle with an LLR calibration."""
    if result.llr is not None:
        return {"llr": result.llr, "prior": result.prior}
    if rec.bundle.llr_calibration is None:
        return {}
    return {"llr": float(rec.llr(result.score))}


def _llr_text(llr: dict) -> str:
    if not llr:
        return ""
    if llr.get("prior") is None:
        return f"; LLR {llr['llr']:+.3f}"
    from voiceprint.evaluation.calibration import bayes_threshold

    bayes = bayes_threshold(llr["prior"])
    return f"; LLR {llr['llr']:+.3f} {'>=' if llr['llr'] >= bayes else '<'} {bayes:.3f} (the Bayes threshold)"


def cmd_score(args) -> int:
    from voiceprint.serving.api import InputError
    from voiceprint.core.outputs import atomic_path
    from voiceprint.evaluation.trials import read_trials, score_trial_list

    if not 0.0 < args.prior < 1.0:
        raise InputError(f"score: --prior {args.prior}: expected a probability in (0, 1)")
    if args.out:
        _check_not_directory(args.out)
    read_trials(args.trials)        # a malformed list or a wrong folder fails before the slow model load
    if not Path(args.audio_root).is_dir():
        raise InputError(f"score: --audio-root {args.audio_root}: not a folder")
    rec = _recognizer(args)
    result = score_trial_list(rec, args.trials, args.audio_root, p_target=args.prior, progress=_progress(args))
    s = result.summary
    missing = list(result.resolved.missing_entries.itertuples(index=False))
    payload = {**_model_info(rec), "trials": str(args.trials), "audio_root": str(args.audio_root), **s,
               "missing": [{"entry": e, "reason": r} for e, r in missing]}
    if args.out:
        with atomic_path(args.out) as tmp:
            result.table.to_csv(tmp, sep="\t", index=False, lineterminator="\n", na_rep="")
        payload["output"] = str(args.out)
    what = "calibrated LLRs" if s["calibrated"] else "raw scores taken as LLRs (the bundle has no LLR calibration)"
    human = [f"{s['scored_trials']} of {s['listed_trials']} trials scored ({s['target_trials']} target, "
             f"{s['nontarget_trials']} non-target); {s['missing_trials']} not scored: {s['missing_entries']} "
             "entries missing or unusable",
             f"EER {100 * s['eer']:.2f}%  minDCF {s['min_dcf']:.3f}  actDCF {s['act_dcf']:.3f}  "
             f"Cllr {s['cllr']:.3f}  minCllr {s['min_cllr']:.3f}  (prior {args.prior:g}; Cllr/actDCF of {what})"]
    human += [f"  not scored: {e} ({r})" for e, r in missing[:10]]
    if s["missing_entries"] > 10:
        human.append(f"  ... and {s['missing_entries'] - 10} more" + (f" (all in {args.out})" if args.out else ""))
    if args.out:
        human.append(f"scores of every listed trial written to {args.out}")
    return _emit(args, payload, "\n".join(human))


# ------------------------------------------------------------------------------------------------ parser

class _Parser(argparse.ArgumentParser):
    """argparse, plus the JSON error document that --json promises (argparse itself only prints usage)."""
    json_errors = False

    def error(self, message):
        if _Parser.json_errors:
            print(json.dumps({"error": {"kind": "usage", "message": message, "exit_code": EXIT_USAGE}}))
        super().error(message)


PRIOR_HELP = ("decide at this prior of a same-speaker pair (e.g. 0.01) from the LLR of the bundle's "
              "llr_calibration.json, instead of at a threshold")


def build_parser() -> argparse.ArgumentParser:
    import voiceprint

    common = _global_flags(argparse.ArgumentParser(add_help=False), default=argparse.SUPPRESS)
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", help="bundle directory or .keras file (default: $VOICEPRINT_MODEL, else "
                                       "models/voiceprint in the working directory, else the shipped model)")
    model.add_argument("--feature-kind", help="feature kind of a bare .keras model (default logmel_cmn)")
    model.add_argument("--backend", choices=("auto", "onnx", "keras"), default="auto",
                       help="onnx: ONNX Runtime, no TensorFlow (the bundle's model.onnx); keras: TensorFlow; auto "
                            "(default): onnx when the bundle has model.onnx and onnxruntime is installed")
    threshold = argparse.ArgumentParser(add_help=False)
    threshold.add_argument("--threshold", help="eer (default), low_far, or a score: a cosine in [-1, 1], or an "
                                               "AS-norm score for a bundle with a cohort (score_norm as_norm)")
    registry = argparse.ArgumentParser(add_help=False)
    registry.add_argument("--registry", help="SQLite registry file (default: $VOICEPRINT_REGISTRY, else "
                                             "~/.local/share/voiceprint/registry.sqlite)")

    parser = _Parser(prog="voiceprint", description="Speaker recognition with a trained "
                                     "voiceprint model bundle. Exit codes: 0 ok, 1 unexpected error, 2 usage, "
                                     "3 model, 4 bad audio, 5 registry.")
    parser.add_argument("--version", action="version", version=f"voiceprint {voiceprint.__version__}")
    _global_flags(parser, default=False)
    _completion_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("embed", parents=[common, model], help="embeddings of audio files")
    p.add_argument("inputs", nargs="+", metavar="FILE|DIR")
    p.add_argument("-o", "--output", help="OUT.npy (+ OUT.paths.csv naming each row's file) or OUT.csv "
                                          "(path column + one column per dimension)")
    p.set_defaults(handler=cmd_embed)

    p = sub.add_parser("verify", parents=[common, model, threshold], help="are two recordings the same speaker?")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--prior", type=float, metavar="P", help=PRIOR_HELP)
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("compare", parents=[common, model, threshold],
                       help="score one recording against several references")
    p.add_argument("probe", metavar="X")
    p.add_argument("--against", nargs="+", required=True, metavar="REF")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("enroll", parents=[common, model, registry], help="add recordings of a speaker")
    p.add_argument("name", metavar="NAME")
    p.add_argument("files", nargs="+", metavar="FILE|DIR")
    p.set_defaults(handler=cmd_enroll)

    p = sub.add_parser("identify", parents=[common, model, threshold, registry],
                       help="which enrolled speaker is this (or unknown)?")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--top", type=_positive_int, default=1, metavar="K", help="also list the K best speakers")
    p.add_argument("--prior", type=float, metavar="P", help=PRIOR_HELP)
    p.set_defaults(handler=cmd_identify)

    p = sub.add_parser("speakers", help="list or remove enrolled speakers")
    speakers = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = speakers.add_parser("list", parents=[common, registry], help="enrolled speakers")
    q.set_defaults(handler=cmd_speakers_list)
    q = speakers.add_parser("remove", parents=[common, registry], help="delete a speaker's enrolments")
    q.add_argument("name", metavar="NAME")
    q.set_defaults(handler=cmd_speakers_remove)

    p = sub.add_parser("cluster", parents=[common, model, threshold],
                       help="group recordings by speaker (CSV: path, speaker)")
    p.add_argument("inputs", nargs="+", metavar="FILE|DIR")
    p.add_argument("--speakers", type=int, metavar="N", help="exactly N groups (instead of the threshold)")
    p.add_argument("-o", "--output", help="write the CSV here instead of stdout")
    p.set_defaults(handler=cmd_cluster)

    from voiceprint.serving.serve import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV_VAR, Limits

    p = sub.add_parser("serve", parents=[common, model, registry],
                       help="HTTP JSON service: embed, verify, compare, identify, enroll, speakers, health")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s; any other needs a "
                                                        "token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="default %(default)s; 0 = any free port")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV_VAR) or None,
                   help=f"require 'Authorization: Bearer TOKEN' (default ${TOKEN_ENV_VAR})")
    p.add_argument("--workers", type=int, default=Limits.workers, help="threads running the model "
                                                                       "(default %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=Limits.max_body_bytes / 2**20,
                   help="largest request body in MiB (default %(default)g)")
    p.add_argument("--max-seconds", type=float, default=Limits.max_audio_seconds,
                   help="longest recording in seconds (default %(default)g)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("export", add_help=False, help="convert a trained .keras model (savedmodel, tflite, onnx, "
                                                      "original_h5); voiceprint export --help")
    p.add_argument("args", nargs=argparse.REMAINDER, help="as python -m voiceprint.serving.export")

    p = sub.add_parser("preset", parents=[common], help="a params preset as -S flags for dvc exp run")
    p.add_argument("preset", metavar="PRESET.yaml", help="a partial params.yaml (every key must exist in --base)")
    p.add_argument("--base", default="params.yaml", help="the full params file (default %(default)s)")
    p.set_defaults(handler=cmd_preset)
    p = sub.add_parser("score", parents=[common, model],
                       help="score a trial list (Kaldi or VoxCeleb format): EER, minDCF, Cllr, actDCF")
    p.add_argument("--trials", required=True, metavar="FILE", help="'<enroll> <test> target|nontarget' (Kaldi) or "
                                                                   "'1|0 <enroll> <test>' (VoxCeleb) lines")
    p.add_argument("--audio-root", required=True, metavar="DIR", help="folder the list's audio paths are under")
    p.add_argument("--out", metavar="SCORES.tsv", help="write every listed trial with its score (and LLR) here")
    p.add_argument("--prior", type=float, default=0.01, metavar="P",
                   help="prior of a target trial for minDCF and actDCF (default 0.01)")
    p.set_defaults(handler=cmd_score)
    return parser


GLOBAL_FLAGS = ("--json", "-q", "--quiet", "-v", "--verbose")


def _global_flags(parser, *, default):
    # On the main parser (default False) and on each command (default SUPPRESS, so a command's parser does not
    # reset a flag given before the command name): `voiceprint --json verify` = `voiceprint verify --json`.
    parser.add_argument("--json", action="store_true", default=default, help="print one JSON document on stdout")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress bar, notices or info messages on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug messages on stderr")
    return parser


def _completion_flag(parser) -> None:
    try:
        import shtab
    except ImportError:     # an install without shtab: say what is missing instead of an unknown flag
        parser.add_argument("--print-completion", choices=["bash", "zsh", "tcsh"],
                            action=_NoShtab, help="print a shell completion script (needs shtab)")
        return
    shtab.add_argument_to(parser, ["--print-completion"], help="print a shell completion script "
                                                               "(e.g. voiceprint --print-completion bash "
                                                               "> ~/.local/share/bash-completion/completions/"
                                                               "voiceprint)")


class _NoShtab(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("--print-completion needs the shtab package: pip install shtab")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _error_kinds():
    from voiceprint.serving.api import InputError
    from voiceprint.data.audio import AudioError
    from voiceprint.serving.bundle import BundleError, ModelNotFoundError, ThresholdError
    from voiceprint.core.params import ParamsError
    from voiceprint.core.errors import DataError
    from voiceprint.serving.registry import RegistryError

    # Order matters: AudioError, InputError and the bundle errors are ValueErrors; the first match wins.
    return [(AudioError, "bad_audio", EXIT_AUDIO), (ModelNotFoundError, "model", EXIT_MODEL),
            (BundleError, "model", EXIT_MODEL), (RegistryError, "registry", EXIT_REGISTRY),
            (ThresholdError, "usage", EXIT_USAGE), (InputError, "usage", EXIT_USAGE),
            (ParamsError, "usage", EXIT_USAGE),
            (DataError, "usage", EXIT_USAGE),     # a bad trial list, or one with nothing to score
            (OSError, "io", EXIT_ERROR)]


def _command_position(argv: list[str]) -> int | None:
    """Index of the command name: the first argument that is not a global flag."""
    for i, arg in enumerate(argv):
        if arg not in GLOBAL_FLAGS:
            return i if not arg.startswith("-") else None
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_errors = "--json" in argv
    at = _command_position(argv)
    if at is not None and argv[at] in PASSTHROUGH:
        return PASSTHROUGH[argv[at]](argv[at + 1:])
    args = build_parser().parse_args(argv)
    from voiceprint.core import log

    try:
        log.configure(log.level_for(getattr(args, "verbose", False), getattr(args, "quiet", False)))
    except ValueError as exc:
        build_parser().error(str(exc))
    kinds = _error_kinds()
    try:
        return args.handler(args)
    except tuple(cls for cls, _, _ in kinds) as exc:
        kind, code = next((k, c) for cls, k, c in kinds if isinstance(exc, cls))
        # API messages start with the operation's name ("compare: ..."); the line already says which command.
        message = str(exc).removeprefix(f"{args.command}: ")
        print(f"voiceprint {args.command}: error: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"kind": kind, "message": message, "exit_code": code}}))
        return code
    except KeyboardInterrupt:
        print(f"voiceprint {args.command}: interrupted", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"kind": "interrupted", "message": "interrupted", "exit_code": 130}}))
        return 130


if __name__ == "__main__":
    sys.exit(main())
