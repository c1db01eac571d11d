"""Read and write checkpoints of the ORIGINAL Deep Speaker implementation (Keras 2 / tf-keras HDF5).

The original (philipperemy/deep-speaker) saved its models with Keras 2, whose ``.h5`` weights Keras 3 cannot
read with its own loader. This module reads them with ``h5py`` directly (no Keras legacy loader, no pickle) and
copies the values into our Keras 3 model BY LAYER NAME -- the same contract as the original's
``load_weights(path, by_name=True)``. It also writes our weights back in the original layout.

Two HDF5 layouts hold the same weights:

``save_weights`` layout (``model.save_weights("x.h5")``; ``rescnn_reference_random.h5``)::

    /                                   attrs: layer_names = [every layer of model.layers, in order]
                                               backend = "tensorflow", keras_version = "2.x"
    /<layer>                            one group per layer, weightless ones too (input, add_*, clipped_relu_*,
                                        reshape, average, ln, dropout); attr weight_names = ["<layer>/kernel:0",
                                        "<layer>/bias:0"] (an empty float64 array for weightless layers)
    /<layer>/<layer>/kernel:0           the datasets: the weight name used as a path, hence the nesting
    /top_level_model_weights            tf-keras >= 2.13 only: an empty group (NOT listed in layer_names)

``model.save`` layout (full model; ModelCheckpoint without ``save_weights_only``; every published checkpoint,
``rescnn_reference_random_softmax5_fullmodel.h5``)::

    /                                   attrs: backend, keras_version, model_config (JSON), training_config
    /model_weights                      exactly the save_weights layout above, one level down
    /optimizer_weights                  optimizer slots -- ignored here

Weights are matched by layer name, then within a layer by the weight-name suffix (``kernel``, ``bias``;
``gamma``, ``beta``, ``moving_mean``, ``moving_variance``), not merely by position, so a file listing a layer's
weights in another order still loads correctly. Weightless layers are ignored when importing: their names
(``add_12``, ``reshape_1``) depend on how many models the original process had built before, so they carry
no meaning.

The softmax pre-training head is a Dense named ``dense`` (auto-named in the original, so ``dense_N`` in a file
written by a session that had built another Dense first). It is skipped and reported -- not an error -- when the
target model has no such layer (loading a softmax checkpoint into the embedding model, the original's own
flow) or when its speaker count differs.
"""
from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from voiceprint.core.errors import MissingFileError, VoiceprintError

__all__ = ["CLASSIFIER_LAYER", "CheckpointError", "FileLayer", "ImportReport", "export_original_weights",
           "import_original_weights", "read_original_layout"]

CLASSIFIER_LAYER = "dense"
_FILE_CLASSIFIER = re.compile(r"^dense(_\d+)?$")
# What the reference files carry. keras_version only labels the weight FORMAT for the reader: tf-keras converts
# weights solely for files whose version starts with "1", so any 2.x value loads identically.
ORIGINAL_BACKEND = "tensorflow"
ORIGINAL_KERAS_VERSION = "2.21.0"
_TOP_LEVEL_GROUP = "top_level_model_weights"
_HDF5_ATTR_LIMIT = 64512          # tf-keras splits string-list attrs above this many bytes into name0, name1, ...
_GZIP_MAGIC = b"\x1f\x8b"


class CheckpointError(VoiceprintError, ValueError):
    """A checkpoint that cannot be read, or does not fit the model; the message names the file."""


@dataclass(frozen=True)
class FileLayer:
    """One weighted layer group of an original file: names as stored, short names, shapes (no data read)."""

    name: str
    weight_names: tuple[str, ...]       # as stored, e.g. "conv64-s/kernel:0"
    shapes: tuple[tuple[int, ...], ...]

    @property
    def suffixes(self) -> tuple[str, ...]:
        return tuple(_suffix(n) for n in self.weight_names)


@dataclass
class ImportReport:
    """What :func:`import_original_weights` did."""

    path: str
    layout: str                                          # "save_weights" or "model.save"
    keras_version: str                                   # as recorded in the file
    loaded: list[str] = field(default_factory=list)      # our layer names that received weights, model order
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> reason (file or model side)
    num_values: int = 0                                  # scalars copied

    def summary(self) -> str:
        lines = [f"{self.path}: loaded {len(self.loaded)} layers ({self.num_values:,} values) "
                 f"from a {self.layout} file (keras {self.keras_version})"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- read

def _suffix(weight_name: str) -> str:
    """``conv64-s/kernel:0`` -> ``kernel``. The prefix may carry a scope suffix (``conv64-s_1/``) in files written
    after a model was built twice in one TF1 graph, so only the last path component counts."""
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _decode(value) -> str:
    return value.decode("utf8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _read_str_list(group, name: str) -> list[str] | None:
    """A string-list attr as tf-keras writes it: whole, or split into ``name0``, ``name1``, ... when large."""
    if name in group.attrs:
        return [_decode(v) for v in np.atleast_1d(group.attrs[name])]
    if f"{name}0" not in group.attrs:
        return None
    values, i = [], 0
    while f"{name}{i}" in group.attrs:
        values += [_decode(v) for v in np.atleast_1d(group.attrs[f"{name}{i}"])]
        i += 1
    return values


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} not found")
    with open(path, "rb") as fh:
        if fh.read(2) == _GZIP_MAGIC:
            raise CheckpointError(f"{path}: gzip-compressed; gunzip it first")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(f"{path}: not an HDF5 file ({exc})") from exc


def _weights_root(f: h5py.File, path: Path) -> tuple[h5py.Group, str]:
    if _read_str_list(f, "layer_names") is not None:
        return f, "save_weights"
    if "model_weights" in f and _read_str_list(f["model_weights"], "layer_names") is not None:
        return f["model_weights"], "model.save"
    if "layers" in f and "vars" in f:
        raise CheckpointError(f"{path}: a Keras 3 '.weights.h5' file, not an original (Keras 2) checkpoint; "
                              "load it with model.load_weights")
    raise CheckpointError(f"{path}: no 'layer_names' attribute at the root or under 'model_weights'; "
                          "not a Keras 2 weights or model file")


def read_original_layout(path) -> tuple[str, str, list[str], dict[str, FileLayer]]:
    """Describe an original checkpoint without reading weight data.

    Returns ``(layout, keras_version, layer_names, weighted)``: ``layout`` is ``"save_weights"`` or
    ``"model.save"``, ``layer_names`` every layer listed (weightless too, file order), and ``weighted`` the
    layers that hold weights, by name, in file order.
    """
    path = Path(path)
    with _open(path) as f:
        root, layout = _weights_root(f, path)
        names = _read_str_list(root, "layer_names")
        version = _decode(root.attrs.get("keras_version", f.attrs.get("keras_version", "unknown")))
        weighted = {}
        for name in names:
            if name not in root:
                raise CheckpointError(f"{path}: layer_names lists {name!r} but the file has no such group")
            group = root[name]
            weight_names = _read_str_list(group, "weight_names") or []
            missing = [w for w in weight_names if w not in group]
            if missing:
                raise CheckpointError(f"{path}: layer {name!r} lists weights {missing} that are not stored")
            if weight_names:
                weighted[name] = FileLayer(name, tuple(weight_names), tuple(group[w].shape for w in weight_names))
        return layout, version, names, weighted


# -------------------------------------------------------------------------------------------------------- import

def _model_weighted_layers(model) -> dict:
    return {layer.name: layer for layer in model.layers if layer.weights}


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def import_original_weights(model, path, *, skip_mismatched_classifier: bool = True) -> ImportReport:
    """Load an original Keras 2 checkpoint (either layout) into ``model`` by layer name.

    Every layer of ``model`` that has weights must be in the file with the same weight names and shapes, and
    every weighted layer of the file must be in the model -- except the softmax classifier ``dense``, which is
    skipped and reported when the model has no such layer, when the file has none, or (with
    ``skip_mismatched_classifier``) when the speaker counts differ. Anything else raises one
    :class:`CheckpointError` listing the missing layers, extra layers and mis-shaped weights; the model is left
    untouched in that case (everything is checked before any value is assigned).
    """
    path = Path(path)
    layout, version, _, file_layers = read_original_layout(path)
    ours = _model_weighted_layers(model)
    report = ImportReport(str(path), layout, version)

    # The classifier may be auto-named dense_N in the file; pair it with our `dense` when unambiguous.
    file_classifiers = [n for n in file_layers if _FILE_CLASSIFIER.match(n)]
    source = {name: name for name in ours if name in file_layers}
    if CLASSIFIER_LAYER in ours and CLASSIFIER_LAYER not in file_layers and len(file_classifiers) == 1:
        source[CLASSIFIER_LAYER] = file_classifiers[0]

    missing, misshaped, plan = [], [], []     # plan: (our layer, file layer, [(variable, stored weight name)])
    for name, layer in ours.items():
        if name not in source:
            if name == CLASSIFIER_LAYER and skip_mismatched_classifier:
                report.skipped[name] = "classifier head not in the file; left as initialised"
            else:
                missing.append(name)
            continue
        fl = file_layers[source[name]]
        variables = list(layer.weights)
        by_suffix = dict(zip(fl.suffixes, zip(fl.weight_names, fl.shapes)))
        wanted = [v.name for v in variables]
        if len(by_suffix) != len(fl.weight_names) or sorted(by_suffix) != sorted(wanted):
            misshaped.append(f"{name}: file weights {list(fl.suffixes)} vs model weights {wanted}")
            continue
        pairs, bad = [], []
        for v in variables:
            stored, shape = by_suffix[v.name]
            pairs.append((v, stored))
            if tuple(shape) != tuple(v.shape):
                bad.append(f"{name}/{v.name}: file {_fmt_shape(shape)} vs model {_fmt_shape(v.shape)}")
        # Only a different number of speakers (output width) is the classifier's business; a different input
        # width means the trunk differs, which stays an error.
        kernel_file = tuple(by_suffix["kernel"][1]) if "kernel" in by_suffix else ()
        kernel_model = next((tuple(v.shape) for v in variables if v.name == "kernel"), ())
        if (bad and name == CLASSIFIER_LAYER and skip_mismatched_classifier
                and len(kernel_file) == len(kernel_model) == 2 and kernel_file[0] == kernel_model[0]):
            n_file, n_model = kernel_file[1], kernel_model[1]
            report.skipped[name] = (f"speaker count differs (file {source[name]!r} has {n_file}, model has "
                                    f"{n_model}); left as initialised")
            continue
        misshaped += bad
        if not bad:
            plan.append((name, fl.name, pairs))

    used = set(source.values())
    extra = []
    for name, fl in file_layers.items():
        if name in used:
            continue
        if _FILE_CLASSIFIER.match(name):
            # The original's own flow: a softmax checkpoint into the embedding model (by_name skips the head).
            report.skipped[name] = f"classifier head ({fl.shapes[0][-1]} speakers) in the file; model has no {name!r}"
        else:
            extra.append(name)

    if missing or extra or misshaped:
        parts = [f"{path}: checkpoint does not fit the model ({layout} file, keras {version})"]
        if missing:
            parts.append(f"missing layers (in the model, not in the file): {', '.join(missing)}")
        if extra:
            parts.append(f"extra layers (in the file, not in the model): {', '.join(extra)}")
        if misshaped:
            parts.append("mis-shaped weights (layer/weight: file shape vs model shape):\n    "
                         + "\n    ".join(misshaped))
        raise CheckpointError("\n  ".join(parts))

    with h5py.File(path, "r") as f:
        root = f["model_weights"] if layout == "model.save" else f
        for name, file_name, pairs in plan:
            group = root[file_name]
            for v, stored in pairs:
                value = np.asarray(group[stored][()], dtype=v.dtype)
                v.assign(value)
                report.num_values += value.size
            report.loaded.append(name)
    return report


# -------------------------------------------------------------------------------------------------------- export

def _write_str_list(group, name: str, values: list[str]):
    """As tf-keras's save_attributes_to_hdf5_group: one attr (vlen ASCII strings, as h5py stores the bytes
    tf-keras passes), split into ``name0``, ``name1``, ... only past the HDF5 object-header limit."""
    if not values:
        group.attrs.create(name, np.zeros(0, np.float64))   # what h5py makes of tf-keras's empty list
        return
    encoding = "ascii" if all(v.isascii() for v in values) else "utf-8"
    dtype = h5py.string_dtype(encoding)
    data = np.array([v.encode("utf8") for v in values], dtype=object)
    fixed_bytes = len(values) * max(len(v.encode("utf8")) for v in values)   # tf-keras measures the 'S' array
    chunks = 1
    while fixed_bytes / chunks > _HDF5_ATTR_LIMIT and chunks < len(values):
        chunks += 1
    if chunks == 1:
        group.attrs.create(name, data, dtype=dtype)
    else:
        for i, part in enumerate(np.array_split(data, chunks)):
            group.attrs.create(f"{name}{i}", part, dtype=dtype)


def export_original_weights(model, path, *, keras_version: str = ORIGINAL_KERAS_VERSION) -> Path:
    """Write ``model``'s weights as the original's ``save_weights`` ``.h5`` (see the module docstring).

    The original code accepts the file with ``model.load_weights(path, by_name=True)``, and
    :func:`import_original_weights` reads it back. Layer groups are created in name order, as tf-keras does;
    the file is written to a temporary file beside ``path`` and moved into place, so a crash never leaves a
    truncated checkpoint. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [layer.name for layer in model.layers]   # rescnn.py names every layer as the original
    string = h5py.string_dtype("ascii")
    # Unique name beside the target (same filesystem, so os.replace is atomic); h5py creates it with the
    # usual umask permissions, which mkstemp's 0600 would not give.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with h5py.File(tmp, "w-") as f:
            _write_str_list(f, "layer_names", names)
            f.attrs.create("backend", ORIGINAL_BACKEND.encode(), dtype=string)
            f.attrs.create("keras_version", keras_version.encode(), dtype=string)
            # tf-keras creates the groups sorted by layer name ("to avoid prefix issues")
            for name, layer in sorted(zip(names, model.layers), key=lambda item: item[0]):
                group = f.create_group(name)
                weight_names = [f"{name}/{v.name}:0" for v in layer.weights]
                _write_str_list(group, "weight_names", weight_names)
                for weight_name, v in zip(weight_names, layer.weights):
                    value = np.asarray(v.numpy())
                    group.create_dataset(weight_name, data=value)  # "a/b:0" -> nested group a, dataset b:0
            _write_str_list(f.create_group(_TOP_LEVEL_GROUP), "weight_names", [])
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------- architecture

_STAGE_CONV = re.compile(r"^conv(\d+)-s(\d*)$")
_BLOCK = re.compile(r"^res1_(\d+)_branch_2a$")


def architecture_of(path) -> dict:
    """The ResCNN size an original-format checkpoint holds: ``{"filters", "blocks", "embedding_dim"}``, read from
    its layer names and shapes (stage convs ``conv{F}-s``, blocks ``res1_{b}_branch_2a``, Dense ``affine``)."""
    path = Path(path)
    _, _, _, weighted = read_original_layout(path)      # in layer_names order = model order
    filters = [int(m.group(1)) for name in weighted if (m := _STAGE_CONV.match(name))]
    blocks = sum(1 for name in weighted if _BLOCK.match(name))
    if not filters or "affine" not in weighted:
        raise CheckpointError(f"{path}: not a Deep Speaker ResCNN checkpoint (no conv*-s / affine layers)")
    return {"filters": filters, "blocks": blocks, "embedding_dim": int(weighted["affine"].shapes[0][1])}


CHECKPOINT_DIR = Path("checkpoints")
# The value of an ``*.init_checkpoint`` param that means "no checkpoint". dvc.yaml declares the param's file as
# the stage's dependency (``${softmax.init_checkpoint}``), and a dependency must be an existing path, so "none"
# is a file too: a tracked placeholder nobody edits.
NO_CHECKPOINT = CHECKPOINT_DIR / "none"


def init_checkpoint_path(value: str, key: str) -> Path | None:
    """Validate an ``*.init_checkpoint`` param: ``checkpoints/none`` (or empty) = no checkpoint; otherwise an
    existing file under ``checkpoints/`` (declared in dvc.yaml as the stage's dependency, so replacing the file
    reruns the stage, and nothing else in that folder does)."""
    if not value or Path(value) == NO_CHECKPOINT:
        return None
    path = Path(value)
    if path.is_absolute() or CHECKPOINT_DIR not in path.parents:
        raise CheckpointError(f"{key}: {value!r} must be a relative path inside {CHECKPOINT_DIR}/ "
                              "(copy the file there so DVC tracks it)")
    if not path.is_file():
        raise MissingFileError(f"{key}: checkpoint file {value} not found")
    return path


def check_architecture(path: Path, key: str, *, filters, blocks: int, embedding_dim: int) -> None:
    """Fail, naming the params, when a checkpoint's ResCNN size differs from the configured one."""
    found = architecture_of(path)
    wanted = {"filters": list(filters), "blocks": blocks, "embedding_dim": embedding_dim}
    if found != wanted:
        raise CheckpointError(f"{key}: {path} holds a ResCNN with {found}, but params.yaml configures {wanted}; "
                              "set softmax.filters/blocks/embedding_dim to the checkpoint's size")
