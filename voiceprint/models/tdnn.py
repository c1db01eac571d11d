"""``frame``: a real TDNN (x-vector, Snyder et al. 2018) on the ResCNN's frame-level sequence.

Input: the trunk's output before the temporal mean, (batch, steps, features) with one step per 16 input frames
(160 ms) and features = (bands / 16) x last-stage filters (512 at the default width, 2048 at the original's).
Frame layers: 1-D convolutions over *time* with the given contexts, then statistics pooling (mean and standard
deviation over time), ``layers`` segment layers of ``units`` and a linear embedding of ``output_dim``.

Contexts are in trunk steps. The x-vector's {-2..2}, {-2,0,2}, {-3,0,3}, {0}, {0} are in 10 ms frames and span
15 frames (150 ms), less than one trunk step; copied literally they would span 15 steps (2.4 s) and need crops
far longer than the 1.6 s used for training. The default keeps the x-vector's shape (three layers with context,
then two without) at the trunk's rate: {-1,0,1} x 3 (0.5 s per side of extra context on top of the ResCNN's own
receptive field), {0} x 2. Convolutions are zero-padded ('same') so any utterance length, even a single step,
gives an embedding; the last frame layer is 3 x ``units`` wide, as the x-vector's 1500 is to its 512.
"""
from __future__ import annotations

from typing import Sequence

import keras
from keras import layers, ops

X_VECTOR_CONTEXTS = [[-1, 0, 1], [-1, 0, 1], [-1, 0, 1], [0], [0]]


def context_to_conv(context: Sequence[int]) -> tuple[int, int]:
    """A TDNN context (symmetric arithmetic progression of offsets, e.g. [-3, 0, 3]) -> (kernel, dilation)."""
    offsets = sorted(int(c) for c in context)
    if not offsets or offsets != [-o for o in reversed(offsets)]:
        raise ValueError(f"context {list(context)} must be symmetric around 0 (e.g. [-2, 0, 2] or [0])")
    if len(offsets) == 1:
        return 1, 1
    steps = {b - a for a, b in zip(offsets, offsets[1:])}
    if len(steps) != 1:
        raise ValueError(f"context {list(context)} must be evenly spaced (e.g. [-2, -1, 0, 1, 2] or [-3, 0, 3])")
    return len(offsets), steps.pop()


@keras.saving.register_keras_serializable(package="voiceprint")
class StatisticsPooling(layers.Layer):
    """(batch, steps, features) -> (batch, 2 * features): mean and standard deviation over time."""

    def call(self, x):
        mean = ops.mean(x, axis=1)
        var = ops.mean(ops.square(x - mean[:, None, :]), axis=1)
        return ops.concatenate([mean, ops.sqrt(var + 1e-5)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2 * input_shape[-1])


def frame_tdnn(*, input_dim: int, units: int, layers_count: int, dropout: float, output_dim: int,
               contexts: Sequence[Sequence[int]] = X_VECTOR_CONTEXTS) -> keras.Model:
    """(batch, steps, input_dim) -> (batch, output_dim), not normalised."""
    if not contexts:
        raise ValueError("a frame TDNN needs at least one context")
    inputs = keras.Input((None, input_dim), name="frames")
    x = inputs
    for i, context in enumerate(contexts):
        kernel, dilation = context_to_conv(context)
        width = 3 * units if i == len(contexts) - 1 else units
        x = layers.Conv1D(width, kernel, dilation_rate=dilation, padding="same", activation="relu",
                          name=f"tdnn_frame_{i}")(x)
        x = layers.BatchNormalization(name=f"tdnn_frame_bn_{i}")(x)
    x = StatisticsPooling(name="statistics_pooling")(x)
    for i in range(layers_count):
        x = layers.Dense(units, activation="relu", name=f"tdnn_segment_{i}")(x)
        x = layers.BatchNormalization(name=f"tdnn_segment_bn_{i}")(x)
        x = layers.Dropout(dropout, name=f"tdnn_segment_dropout_{i}")(x)
    outputs = layers.Dense(output_dim, name="head_output")(x)
    return keras.Model(inputs, outputs, name="frame_tdnn")
