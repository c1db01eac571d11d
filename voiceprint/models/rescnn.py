"""The Deep Speaker ResCNN (Li et al. 2017), with the original implementation's layer names.

Per stage k (filters F): Conv2D 5x5 stride 2 'same' ``conv{F}-s`` -> BN ``conv{F}-s_bn`` -> clipped ReLU, then
``blocks`` identity blocks ``res{k}_{b}_branch_2a/2b`` (conv3x3-BN-clippedReLU twice, add the block input,
clipped ReLU; the original clips before the add as well). After the last stage the (time, freq, channels) map is
reshaped to (time, freq*channels), averaged over time, projected by Dense ``affine`` and L2-normalised (``ln``).
Time is left unspecified, so one model embeds crops and whole utterances alike.

Names matter: original checkpoints load by layer name (the names of the original's ``deep_speaker/conv_models.py``,
https://github.com/philipperemy/deep-speaker; ``voiceprint/training/original_h5.py`` reads them).
"""
from __future__ import annotations

from typing import Sequence

import keras
from keras import layers

from voiceprint.core.errors import DataError

CLIP_VALUE = 20.0          # clipped ReLU min(max(x, 0), 20)
CONV_L2 = 1e-4             # the original's kernel regulariser on every Conv2D


class _Namer:
    """Numbers the clipped ReLUs ``clipped_relu_0..`` and the adds ``add, add_1..`` in creation order, as the
    original's fresh session does (Keras would otherwise number them per process)."""

    def __init__(self):
        self.relu = 0
        self.adds = 0

    def add(self, tensors):
        name = "add" if self.adds == 0 else f"add_{self.adds}"
        self.adds += 1
        return layers.Add(name=name)(tensors)

    def clipped_relu(self, x):
        x = layers.ReLU(max_value=CLIP_VALUE, name=f"clipped_relu_{self.relu}")(x)
        self.relu += 1
        return x


def _conv(x, filters, kernel, strides, name):
    return layers.Conv2D(filters, kernel, strides=strides, padding="same", name=name,
                         kernel_initializer="glorot_uniform",
                         kernel_regularizer=keras.regularizers.L2(CONV_L2))(x)


def _bn(x, name):
    # Keras defaults (momentum 0.99, epsilon 1e-3) are the original's.
    return layers.BatchNormalization(momentum=0.99, epsilon=1e-3, name=name)(x)


def _identity_block(x, filters, stage, block, namer):
    prefix = f"res{stage}_{block}_branch"
    shortcut = x
    x = _conv(x, filters, 3, 1, f"{prefix}_2a")
    x = _bn(x, f"{prefix}_2a_bn")
    x = namer.clipped_relu(x)
    x = _conv(x, filters, 3, 1, f"{prefix}_2b")
    x = _bn(x, f"{prefix}_2b_bn")
    x = namer.clipped_relu(x)
    x = namer.add([x, shortcut])
    return namer.clipped_relu(x)


def build_frame_trunk(inputs, filters: Sequence[int], blocks: int):
    """Conv stages -> (batch, time/16, (bands/16) * filters[-1]) frame-level sequence."""
    namer = _Namer()
    x = inputs
    # The original names stage convs by width; repeated widths get the stage number too, to stay unique.
    distinct = len(set(filters)) == len(filters)
    for stage, f in enumerate(filters, start=1):
        name = f"conv{f}-s" if distinct else f"conv{f}-s{stage}"
        x = _conv(x, f, 5, 2, name)
        x = _bn(x, f"{name}_bn")
        x = namer.clipped_relu(x)
        for block in range(blocks):
            x = _identity_block(x, f, stage, block, namer)
    freq, channels = x.shape[2], x.shape[3]
    return layers.Reshape((-1, freq * channels), name="reshape")(x)


def build_rescnn(*, filters: Sequence[int] = (64, 128, 256, 512), blocks: int = 3, embedding_dim: int = 512,
                 num_bands: int = 64, num_classes: int | None = None, dropout: float = 0.5, classifier=None):
    """Return ``(embedding_model, classifier_model)``; they share every weight.

    The embedding model maps (batch, time, bands, 1) to L2-normalised ``embedding_dim`` vectors. The classifier
    (only when ``num_classes`` is given) is the original's softmax pre-training model: Dropout before ``affine``,
    no ``ln``, and a Dense ``dense`` over speakers that outputs logits (softmax lives in the loss, for stability).
    ``classifier``: another output layer over the speakers instead of that Dense (e.g. AAM-softmax's cosines).
    """
    if num_bands % (2 ** len(filters)):
        raise DataError(f"num_bands={num_bands} must be divisible by 2**{len(filters)} (one halving per stage)")
    inputs = keras.Input((None, num_bands, 1), name="input")
    frames = build_frame_trunk(inputs, filters, blocks)
    pooled = layers.GlobalAveragePooling1D(name="average")(frames)
    affine = layers.Dense(embedding_dim, name="affine")
    embedding = layers.UnitNormalization(axis=-1, name="ln")(affine(pooled))
    embedding_model = keras.Model(inputs, embedding, name="rescnn")
    if num_classes is None:
        return embedding_model, None
    x = layers.Dropout(dropout, name="dropout")(pooled)
    logits = (classifier or layers.Dense(num_classes, name="dense"))(affine(x))
    return embedding_model, keras.Model(inputs, logits, name="rescnn_softmax")
