"""Exporting an embedding model for serving: TensorFlow SavedModel, TFLite and (optionally) ONNX.

Every trained model the pipeline writes maps features ``(batch, frames, bands, 1)`` float32, any number of frames,
to an L2-normalised embedding ``(batch, D)``. Each export keeps that contract: batch AND length stay variable, so
one artifact embeds 37-frame crops and 20-second utterances alike, with no padding (padding would change the
time average, hence the embedding).

Formats
-------
* **SavedModel** (:func:`export_savedmodel`): signature ``embed(features: float32[None, None, bands, 1]) ->
  {"embedding": float32[None, D]}``, also aliased ``serving_default`` for TF-Serving. Written through Keras 3's
  ``keras.export.ExportArchive`` (what ``model.export(format="tf_saved_model")`` uses) so the signature can have
  our names; no Keras code is needed to load it.
* **TFLite** (:func:`export_tflite`): converted from that SavedModel with builtin ops only
  (``TFLITE_BUILTINS``); no ``SELECT_TF_OPS`` (which would need the Flex delegate at runtime) and no
  ``experimental_*`` converter flags are needed. The converter keeps the unknown dimensions as ``-1`` in the
  input's ``shape_signature``; the runtime resizes the input to each utterance's ``(1, T, bands, 1)``
  (``resize_tensor_input`` + ``allocate_tensors``). Float32, no quantisation. Runs on ``ai_edge_litert``'s
  interpreter where installed (checked: ai-edge-litert 2.3.0), else on TF's ``tf.lite.Interpreter`` (still in
  TF 2.21, though it warns it is deprecated; the warning is silenced). XNNPACK is applied by default.
* **ONNX** (:func:`export_onnx`): via ``tf2onnx`` (pinned in requirements.txt; imported only when used). Checked
  on: tensorflow-cpu 2.21.0, keras 3.15.1, tf2onnx 1.17.0, onnx 1.23.2,
  onnxruntime 1.32.0, numpy 2.4.6, protobuf 7.36.2 (``pip check`` clean): conversion at opset 17 works with
  dynamic batch and length, and onnxruntime matches Keras to ~2e-7 (cosine 1.0). Without those packages
  :func:`export_onnx` / :func:`load_onnx_embedder` raise a clear ImportError.

Loading: :func:`keras_embedder`, :func:`load_savedmodel_embedder`, :func:`load_tflite_embedder` and
:func:`load_onnx_embedder` all return an :class:`Embedder`, one callable interface
``(T, bands) -> (D,)`` or ``(B, T, bands, 1) -> (B, D)``, so tests and ``bench/export_speed.py`` treat the
formats alike.

All writes are atomic (:func:`voiceprint.core.outputs.atomic_path`): a killed export never leaves a half-written file
or directory that looks finished.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from voiceprint.core.outputs import atomic_path

SIGNATURE = "embed"          # serving signature / endpoint name
INPUT_NAME = "features"      # its input
OUTPUT_NAME = "embedding"    # its output key
ONNX_OPSET = 17


# ----------------------------------------------------------------------------------------------- helpers

def _num_bands(model) -> int:
    """Bands of a single-input (batch, frames, bands, 1) model; a clear error for anything else."""
    shape = model.input_shape
    if not isinstance(shape, tuple) or len(shape) != 4 or shape[2] is None or shape[3] != 1:
        raise ValueError(f"expected a model with one input of shape (batch, frames, bands, 1); "
                         f"{getattr(model, 'name', model)!r} has input shape {shape}")
    return int(shape[2])


def _input_spec(num_bands: int):
    import tensorflow as tf

    # None batch and None frames: the whole point of the export is one artifact for every utterance length.
    return tf.TensorSpec([None, None, num_bands, 1], tf.float32, name=INPUT_NAME)


def _ensure_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"cannot write {path}: a parent of it is a file, not a directory") from None


def _export_archive(model):
    """A Keras ExportArchive with the one ``embed`` endpoint (inference mode: BN statistics, no dropout)."""
    import keras

    spec = _input_spec(_num_bands(model))
    archive = keras.export.ExportArchive()
    archive.track(model)

    # The argument name becomes the signature's input name; the dict key its output name.
    def embed(features):
        return {OUTPUT_NAME: model(features, training=False)}

    archive.add_endpoint(SIGNATURE, embed, input_signature=[spec])
    return archive


# ------------------------------------------------------------------------------------------------ export

def export_savedmodel(model, directory: str | Path) -> Path:
    """Write ``model`` as a TensorFlow SavedModel directory with the ``embed`` signature; return the path.

    ``directory`` is replaced atomically if it already holds a SavedModel; any other existing file or non-empty
    directory is refused rather than deleted.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is a file; a SavedModel is a directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / "saved_model.pb").is_file():
        raise FileExistsError(f"{directory} is a non-empty directory that is not a SavedModel; "
                              f"refusing to replace it")
    _ensure_parent(directory)
    archive = _export_archive(model)
    with atomic_path(directory) as tmp:
        archive.write_out(str(tmp), verbose=False)
    return directory


def export_tflite(model, path: str | Path) -> Path:
    """Write ``model`` as a float32 TFLite flatbuffer (builtin ops only, variable batch and length)."""
    import tensorflow as tf

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the .tflite file to write")
    _ensure_parent(path)
    archive = _export_archive(model)
    with atomic_path(path) as tmp:
        # SavedModel -> TFLite is TensorFlow's supported route for Keras 3; the intermediate lives in the same
        # temporary directory as the output, so it goes away with it.
        saved = tmp.parent / "savedmodel"
        archive.write_out(str(saved), verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=[SIGNATURE])
        # Builtins only: every op here (conv, BN folded to mul/add, clipped ReLU, dynamic reshape, mean, dense,
        # L2 norm) has a builtin kernel, and Flex ops would drag the TF runtime into the interpreter.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        tmp.write_bytes(converter.convert())
    return path


def export_onnx(model, path: str | Path, *, opset: int = ONNX_OPSET) -> Path:
    """Write ``model`` as ONNX (input ``features`` [N, T, bands, 1], output ``embedding``). Needs ``tf2onnx``
    (optional, not in requirements.txt; see the module docstring for the versions checked)."""
    import tensorflow as tf

    try:
        import tf2onnx
    except ImportError as exc:
        raise ImportError("export_onnx needs tf2onnx (and onnx): pip install tf2onnx onnx "
                          "(checked: tf2onnx 1.17.0, onnx 1.23.2 with tensorflow 2.21)") from exc
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the .onnx file to write")
    _ensure_parent(path)
    spec = _input_spec(_num_bands(model))
    fn = tf.function(lambda features: {OUTPUT_NAME: model(features, training=False)}, input_signature=[spec])
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=[spec], opset=opset)
    _canonical_names(proto.graph)
    with atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return path


# Lengths (frames) the ONNX export is checked at: not multiples of the model's 16x time reduction, a 1-frame edge,
# 1 s, 4 s and 12 s of audio; one batch of two, because the bundle's users batch equal-length utterances.
VERIFY_FRAMES = (1, 37, 98, 411, 1200)
MIN_ONNX_COSINE = 0.99999


class ExportMismatchError(ValueError):
    """An exported model whose embeddings differ from the Keras model's (the export is not written)."""


def check_onnx(model, path: str | Path, *, frames=VERIFY_FRAMES, min_cosine: float = MIN_ONNX_COSINE,
               seed: int = 0) -> float:
    """The smallest cosine between Keras and ONNX Runtime embeddings of random features at each of ``frames``
    (batches of 2); ExportMismatchError when it is below ``min_cosine``."""
    bands = _num_bands(model)
    onnx_embedder = load_onnx_embedder(path, num_threads=1)
    rng = np.random.default_rng(seed)
    worst = 1.0
    for n in frames:
        x = rng.normal(size=(2, n, bands, 1)).astype(np.float32)
        want = np.asarray(model(x, training=False), dtype=np.float64)
        got = onnx_embedder(x).astype(np.float64)
        cos = np.sum(want * got, -1) / np.maximum(np.linalg.norm(want, axis=-1) * np.linalg.norm(got, axis=-1),
                                                   1e-30)
        worst = min(worst, float(cos.min()))
        if not worst >= min_cosine:
            raise ExportMismatchError(f"{path}: ONNX embeddings differ from the Keras model's at {n} frames "
                                      f"(cosine {worst:.7f} < {min_cosine}); not using this export")
    return worst


def export_checked_onnx(model, path: str | Path, *, min_cosine: float = MIN_ONNX_COSINE) -> float:
    """:func:`export_onnx`, then :func:`check_onnx` before the file appears at ``path``: a failed check leaves
    nothing there. Returns the smallest cosine seen."""
    path = Path(path)
    _ensure_parent(path)
    with atomic_path(path) as tmp:
        export_onnx(model, tmp)
        return check_onnx(model, tmp, min_cosine=min_cosine)


def _canonical_names(graph) -> None:
    """Rename the graph's nodes and inner tensors by position (``Conv_12``, ``t34``), in place, and order its
    initializers by the new names. tf2onnx names what it creates from a process-wide counter and emits the
    initializers in set order, so the same weights gave different bytes from one export to the next; the node
    order and connections are the same each time, so after this the bytes are too (the bundle's sha256 is
    reproducible). Graph inputs and outputs keep their names (the contract)."""
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    renamed: dict[str, str] = {}

    def new(name: str) -> str:
        if not name or name in keep:
            return name
        return renamed.setdefault(name, f"t{len(renamed)}")

    for i, node in enumerate(graph.node):
        node.name = f"{node.op_type}_{i}"
        for field in (node.input, node.output):
            for k, name in enumerate(field):
                field[k] = new(name)
    initializers = sorted(graph.initializer, key=lambda t: int(new(t.name)[1:]) if new(t.name)[1:].isdigit()
                          else -1)
    for tensor in initializers:
        tensor.name = new(tensor.name)
    copies = [type(t)() for t in initializers]
    for copy, tensor in zip(copies, initializers):
        copy.CopyFrom(tensor)
    del graph.initializer[:]
    graph.initializer.extend(copies)
    infos = []
    for info in graph.value_info:
        copy = type(info)()
        copy.CopyFrom(info)
        copy.name = new(copy.name)
        infos.append(copy)
    del graph.value_info[:]
    graph.value_info.extend(sorted(infos, key=lambda v: v.name))
    # Symbolic dimensions: tf2onnx's are counter-numbered too ("unk__513"); the contract's get names.
    dims: dict[str, str] = {}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        for d in info.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = dims.setdefault(d.dim_param, f"d{len(dims)}")
    for info, names in ((graph.input[0], ("batch", "frames")), (graph.output[0], ("batch",))):
        for d, name in zip(info.type.tensor_type.shape.dim, names):
            if d.dim_param:
                d.dim_param = name
    graph.doc_string = "voiceprint embedding: features (batch, frames, bands, 1) -> L2-normalised (batch, D)"


# ------------------------------------------------------------------------------------------------ load

class Embedder:
    """Embeds features with one exported format.

    ``embedder(features)``: ``(T, bands)`` -> ``(D,)`` for one utterance, or ``(B, T, bands, 1)`` -> ``(B, D)``
    for a batch of equal-length utterances; float32 numpy in and out. Not thread-safe (a TFLite interpreter
    holds per-call state).
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], *, num_bands: int, fmt: str, source: str,
                 backend=None):
        self._run = run
        self.num_bands = num_bands
        self.format = fmt
        self.source = source
        # The loaded runtime object (SavedModel, Interpreter, InferenceSession): kept here because a SavedModel's
        # signature functions do not own its variables, and exposed for inspection (e.g. TFLite details).
        self.backend = backend

    def __repr__(self):
        return f"Embedder(format={self.format!r}, source={self.source!r}, num_bands={self.num_bands})"

    @property
    def input_shape(self) -> tuple:
        """Keras-style ``(None, None, bands, 1)``, so code that reads a Keras model's shapes takes an Embedder."""
        return (None, None, self.num_bands, 1)

    def __call__(self, features) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32)
        single = x.ndim == 2
        if single:
            x = x[None, :, :, None]
        if x.ndim != 4 or x.shape[2:] != (self.num_bands, 1):
            raise ValueError(f"features must be (T, {self.num_bands}) or (B, T, {self.num_bands}, 1); "
                             f"got shape {np.shape(features)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"empty input {x.shape}: need at least one utterance of at least one frame")
        out = np.asarray(self._run(np.ascontiguousarray(x)), dtype=np.float32)
        return out[0] if single else out


def keras_embedder(model) -> Embedder:
    """The in-process Keras model behind the same interface (one tf.function trace for every length, as
    :mod:`voiceprint.core.embedding` runs it)."""
    import tensorflow as tf

    bands = _num_bands(model)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[_input_spec(bands)],
                     reduce_retracing=True)
    return Embedder(lambda x: fn(x).numpy(), num_bands=bands, fmt="keras",
                    source=getattr(model, "name", "model"), backend=model)


def load_savedmodel_embedder(directory: str | Path) -> Embedder:
    """Load a SavedModel written by :func:`export_savedmodel` and return its ``embed`` signature as an
    :class:`Embedder`. Needs TensorFlow only (no Keras, no voiceprint model code)."""
    import tensorflow as tf

    directory = Path(directory)
    if directory.is_file():
        raise NotADirectoryError(f"{directory} is a file; a SavedModel is a directory")
    if not directory.is_dir():
        raise FileNotFoundError(f"SavedModel directory {directory} not found")
    if not (directory / "saved_model.pb").is_file():
        raise ValueError(f"{directory} is not a SavedModel (no saved_model.pb in it)")
    loaded = tf.saved_model.load(str(directory))
    if SIGNATURE not in loaded.signatures:
        raise ValueError(f"{directory}: no {SIGNATURE!r} signature (has: {', '.join(loaded.signatures) or 'none'})")
    fn = loaded.signatures[SIGNATURE]
    spec = fn.structured_input_signature[1][INPUT_NAME]
    bands = int(spec.shape[2])
    return Embedder(lambda x: fn(**{INPUT_NAME: tf.constant(x)})[OUTPUT_NAME].numpy(), num_bands=bands,
                    fmt="savedmodel", source=str(directory), backend=loaded)


def _tflite_interpreter_class():
    # TF 2.21 still ships tf.lite.Interpreter but warns it is deprecated in favour of ai_edge_litert; use that
    # package where it is installed (same API), otherwise TF's copy without the noise.
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter
    except ImportError:
        import tensorflow as tf
        return tf.lite.Interpreter


def load_tflite_embedder(path: str | Path, *, num_threads: int | None = None) -> Embedder:
    """Load a flatbuffer written by :func:`export_tflite` as an :class:`Embedder`.

    The input is resized to each call's shape (only when it changes: resizing re-plans memory).
    ``num_threads`` defaults to all cores, like TensorFlow's intra-op pool.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a TFLite file")
    if not path.is_file():
        raise FileNotFoundError(f"TFLite file {path} not found")
    interpreter_cls = _tflite_interpreter_class()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        try:
            interp = interpreter_cls(model_path=str(path), num_threads=num_threads or os.cpu_count() or 1)
        except ValueError as exc:
            raise ValueError(f"{path}: not a valid TFLite model: {exc}") from exc
    inputs, outputs = interp.get_input_details(), interp.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"{path}: expected one input and one output, got {len(inputs)} and {len(outputs)}")
    inp, out = inputs[0], outputs[0]
    signature = tuple(int(d) for d in inp.get("shape_signature", inp["shape"]))
    if len(signature) != 4 or signature[3] != 1 or inp["dtype"] != np.float32:
        raise ValueError(f"{path}: input must be float32 (batch, frames, bands, 1); got {signature} {inp['dtype']}")
    state = {"shape": None}

    def run(x: np.ndarray) -> np.ndarray:
        if x.shape != state["shape"]:
            # strict: only dims the converter left as -1 may change, so a fixed-shape model fails loudly here.
            interp.resize_tensor_input(inp["index"], x.shape, strict=True)
            interp.allocate_tensors()
            state["shape"] = x.shape
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        return interp.get_tensor(out["index"]).copy()  # copy: the buffer is reused by the next invoke

    return Embedder(run, num_bands=signature[2], fmt="tflite", source=str(path), backend=interp)


def onnx_session(ort, path: Path, num_threads: int | None, *, error: type[Exception] = ValueError):
    """A CPU InferenceSession of ``path`` with ``num_threads`` intra-op threads (default: every core); ``error``
    (naming the file) for a file onnxruntime cannot load."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for a bad file
        raise error(f"{path}: not a valid ONNX model: {exc}") from exc


def load_onnx_embedder(path: str | Path, *, num_threads: int | None = None) -> Embedder:
    """Load a file written by :func:`export_onnx` with onnxruntime (optional dependency) as an :class:`Embedder`."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("load_onnx_embedder needs onnxruntime: pip install onnxruntime") from exc
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not an ONNX file")
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} not found")
    session = onnx_session(ort, path, num_threads)
    inp = session.get_inputs()[0]
    bands = inp.shape[2]
    if len(inp.shape) != 4 or not isinstance(bands, int):
        raise ValueError(f"{path}: input must be (batch, frames, bands, 1); got {inp.shape}")
    return Embedder(lambda x: session.run([OUTPUT_NAME], {inp.name: x})[0], num_bands=bands, fmt="onnx",
                    source=str(path), backend=session)


FORMATS = ("savedmodel", "tflite", "onnx", "original_h5")
PCM_FORMATS = ("pcm-onnx", "pcm-tflite")   # raw PCM in, features in the graph: voiceprint.serving.pcm_export


def main(argv=None, *, prog: str = "python -m voiceprint.serving.export") -> int:
    """``voiceprint export MODEL.keras --format tflite -o OUT`` (or ``python -m voiceprint.serving.export ...``):
    convert a
    trained model."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    parser.add_argument("model", help="a .keras file written by the pipeline (loaded in Keras safe mode); for "
                                      "pcm-* also a bundle directory, whose features the graph computes")
    parser.add_argument("--format", required=True, choices=FORMATS + PCM_FORMATS,
                        help="original_h5 = the original Deep Speaker save_weights layout; pcm-onnx / pcm-tflite "
                             "= 16 kHz PCM in, embedding out (docs/pcm-model.md)")
    parser.add_argument("-o", "--output", required=True, help="output file (directory for savedmodel)")
    args = parser.parse_args(argv)
    from voiceprint.core.runtime import configure_tensorflow, load_model

    configure_tensorflow(0)
    try:
        if args.format in PCM_FORMATS:
            from voiceprint.serving import pcm_export
            from voiceprint.serving.bundle import load_bundle

            bundle = load_bundle(args.model)   # a bare .keras file gets the default features (params.yaml)
            write = pcm_export.export_pcm_onnx if args.format == "pcm-onnx" else pcm_export.export_pcm_tflite
            print(f"wrote {write(bundle.model, bundle.features, args.output, stats_lda=bundle.stats_lda)}")
            return 0
        model = load_model(args.model)
        if args.format == "original_h5":
            from voiceprint.training.original_h5 import export_original_weights

            out = export_original_weights(model, args.output)
        else:
            out = {"savedmodel": export_savedmodel, "tflite": export_tflite, "onnx": export_onnx}[args.format](
                model, args.output)
    except (ValueError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


__all__ = ["FORMATS", "main", "Embedder", "ExportMismatchError", "check_onnx", "export_checked_onnx", "SIGNATURE", "INPUT_NAME", "OUTPUT_NAME", "export_savedmodel", "export_tflite",
           "export_onnx", "keras_embedder", "load_savedmodel_embedder", "load_tflite_embedder",
           "load_onnx_embedder"]


if __name__ == "__main__":
    raise SystemExit(main())
