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


def attach_head(base: keras.Model, head: keras.Model, tap: str = "embedding",
                name: str = "base_with_head") -> keras.Model:
    """One model from features to the L2-normalised head embedding: ``ln(head(tap(base)(x)))``."""
    inputs = keras.Input(base.input_shape[1:], name="input")
    x = head(tap_model(base, tap)(inputs))
    outputs = layers.UnitNormalization(axis=-1, name="head_ln")(x)
    return keras.Model(inputs, outputs, name=name)


def fuse_models(base: keras.Model, with_head: keras.Model, base_weight: float,
                name: str = "fused") -> keras.Model:
    """One model whose output is the fused embedding [sqrt(w) base(x), sqrt(1 - w) head(x)]: its cosine is
    w cos_base + (1 - w) cos_head (see ``voiceprint.evaluation.fuse``). ``with_head`` maps features to the
    normalised head embedding. Built from standard layers only, so it loads in Keras safe mode."""
    inputs = keras.Input(base.input_shape[1:], name="input")
    parts = [layers.Rescaling(base_weight ** 0.5, name="base_weight")(base(inputs)),
             layers.Rescaling((1.0 - base_weight) ** 0.5, name="head_weight")(with_head(inputs))]
    return keras.Model(inputs, layers.Concatenate(name="fused")(parts), name=name)
