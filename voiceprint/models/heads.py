"""Heads trained on top of a (frozen) embedding model, and how they attach to it.

``dense``: the head the original author settled on, made trainable with a speaker-discriminative objective:
``layers`` x (Dense ``units`` ReLU -> BatchNorm -> Dropout), then Dense ``output_dim``. Their version was fitted
with an MSE to nothing, which cannot separate speakers; here the loss comes from ``voiceprint.losses``.

A head reads one of two taps of the base model: ``embedding`` (the L2-normalised base embedding) or ``frames``
(the trunk's frame-level sequence before the temporal mean, layer ``reshape``).
"""
from __future__ import annotations

import keras
from keras import layers

TAPS = ("embedding", "frames")


def dense_head(*, input_dim: int, units: int, layers_count: int, dropout: float, output_dim: int) -> keras.Model:
    """(batch, input_dim) -> (batch, output_dim), not normalised (the loss or ``attach_head`` normalises)."""
    inputs = keras.Input((input_dim,), name="head_input")
    x = inputs
    for i in range(layers_count):
        x = layers.Dense(units, activation="relu", name=f"head_dense_{i}")(x)
        x = layers.BatchNormalization(name=f"head_bn_{i}")(x)
        x = layers.Dropout(dropout, name=f"head_dropout_{i}")(x)
    outputs = layers.Dense(output_dim, name="head_output")(x)
    return keras.Model(inputs, outputs, name="dense_head")


def tap_model(base: keras.Model, tap: str) -> keras.Model:
    """The part of ``base`` a head reads: the whole embedding model, or features -> frame sequence."""
    if tap == "embedding":
        return base
    if tap == "frames":
        return keras.Model(base.inputs, base.get_layer("reshape").output, name="rescnn_frames")
    raise ValueError(f"unknown tap {tap!r}; valid: {', '.join(TAPS)}")


def _trunk_pass(base: keras.Model, tap: str, inputs):
    """``(base embedding, tap output)`` of ``inputs`` from ONE pass through the trunk: the frame tap is read off
    the way to the embedding, not computed a second time."""
    if tap == "embedding":
        embedding = base(inputs)
        return embedding, embedding
    if tap == "frames":
        both = keras.Model(base.inputs, [base.output, base.get_layer("reshape").output], name="rescnn_and_frames")
        embedding, frames = both(inputs)
        return embedding, frames
    raise ValueError(f"unknown tap {tap!r}; valid: {', '.join(TAPS)}")


def _head_embedding(base, head, tap, inputs, head_trunk=None):
    """(base embedding, L2-normalised head embedding): one trunk pass, or two when the head has its own
    (trained) trunk."""
    embedding, tapped = _trunk_pass(base, tap, inputs)
    if head_trunk is not None:
        tapped = tap_model(head_trunk, tap)(inputs)
    return embedding, layers.UnitNormalization(axis=-1, name="head_ln")(head(tapped))


def attach_head(base: keras.Model, head: keras.Model, tap: str = "embedding",
                name: str = "base_with_head") -> keras.Model:
    """One model from features to the L2-normalised head embedding: ``ln(head(tap(base)(x)))``."""
    inputs = keras.Input(base.input_shape[1:], name="input")
    x = head(tap_model(base, tap)(inputs))
    outputs = layers.UnitNormalization(axis=-1, name="head_ln")(x)
    return keras.Model(inputs, outputs, name=name)


def base_and_head(base: keras.Model, head: keras.Model, tap: str = "embedding", *, head_trunk=None,
                  name: str = "base_and_head") -> keras.Model:
    """One model, one trunk pass: features -> ``[base embedding, head embedding]`` side by side (each
    L2-normalised; :func:`split_base_and_head` takes them apart). ``head_trunk``: the trunk the head was trained
    with, when it was trained (``tdnn.train_trunk``); None: the head reads ``base``."""
    inputs = keras.Input(base.input_shape[1:], name="input")
    embedding, head_embedding = _head_embedding(base, head, tap, inputs, head_trunk)
    return keras.Model(inputs, layers.Concatenate(name="base_and_head")([embedding, head_embedding]), name=name)


def split_base_and_head(embeddings, base_dim: int):
    """The base and head parts of :func:`base_and_head` rows (also after averaging windows), each re-normalised."""
    import numpy as np

    from voiceprint.core.embedding import unit_rows

    return tuple(unit_rows(p).astype(np.float32) for p in (embeddings[:, :base_dim], embeddings[:, base_dim:]))


def fuse_models(base: keras.Model, head: keras.Model, base_weight: float, tap: str = "embedding", *,
                head_trunk=None, name: str = "fused") -> keras.Model:
    """One model whose output is the fused embedding [sqrt(w) base(x), sqrt(1 - w) ln(head(tap(x)))]: its cosine
    is w cos_base + (1 - w) cos_head (see ``voiceprint.evaluation.scoring.fuse``). One trunk pass feeds both parts
    (two only when the head has its own trained ``head_trunk``). Built from standard layers only, so it loads in
    Keras safe mode."""
    inputs = keras.Input(base.input_shape[1:], name="input")
    embedding, head_embedding = _head_embedding(base, head, tap, inputs, head_trunk)
    parts = [layers.Rescaling(base_weight ** 0.5, name="base_weight")(embedding),
             layers.Rescaling((1.0 - base_weight) ** 0.5, name="head_weight")(head_embedding)]
    return keras.Model(inputs, layers.Concatenate(name="fused")(parts), name=name)
