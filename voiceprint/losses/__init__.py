"""Training objectives, chosen by name, and the output layer each one trains through.

``softmax``: cross-entropy over training speakers (the classifier outputs logits).
``aam_softmax``: additive angular margin softmax (ArcFace, Deng et al. 2019): the classifier outputs cosines to
normalised class weights; the target class's angle gets ``+margin`` and all cosines are multiplied by ``scale``
before the cross-entropy, so speakers must be separated by an angular margin, which is what cosine scoring uses.
``triplet``: the Deep Speaker loss on cosine similarity, max(s_an - s_ap + alpha, 0), with in-batch mining: the
batch holds P speakers x K utterances; every (anchor, positive) pair of one speaker is matched with the anchor's
hardest negative, i.e. the most similar utterance of another speaker in the batch. Mining inside the batch costs
one similarity matrix instead of the original's separate embedding passes.

Adding a loss is one file in this package (a factory decorated with :func:`register_loss`, saying the output
layer it trains through and whether it classifies speakers) plus its import at the end of this file. The stages
offer every registered loss; its own settings come from ``tdnn.loss_args`` / ``softmax.loss_args``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import keras
from keras import layers, ops


@dataclass(frozen=True)
class Loss:
    """A registered loss: ``factory(**settings)`` gives ``loss(labels, outputs) -> scalar``; ``output(num_classes,
    name)`` the layer the model outputs through; ``classification``: over speaker classes (shuffled minibatches)
    rather than pairs within a P x K speaker batch."""
    factory: Callable
    output: Callable
    classification: bool

    def settings(self) -> list[str]:
        """The names of the settings the factory takes."""
        return list(inspect.signature(self.factory).parameters)


LOSSES: dict[str, Loss] = {}


def register_loss(name: str, *, output: Callable, classification: bool):
    """Decorator: register a loss factory under ``name`` (see :class:`Loss`)."""
    def register(factory):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered already")
        LOSSES[name] = Loss(factory, output, classification)
        return factory
    return register


def loss_spec(name: str) -> Loss:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}") from None


def is_classification(name: str) -> bool:
    """Does loss ``name`` train over speaker classes (vs. pairs within a batch)?"""
    return loss_spec(name).classification


def classification_losses() -> list[str]:
    return sorted(name for name, loss in LOSSES.items() if loss.classification)


def _logits(num_classes: int, name: str):
    return layers.Dense(num_classes, name=name)


def _cosines(num_classes: int, name: str):
    return CosineClassifier(num_classes, name=name)


def _normalised(num_classes: int, name: str):
    return layers.UnitNormalization(axis=-1, name=name)


@register_loss("softmax", output=_logits, classification=True)
def softmax_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@register_loss("aam_softmax", output=_cosines, classification=True)
def aam_softmax_loss(*, margin: float, scale: float):
    """Loss ``(speaker_labels, cosines (batch, classes)) -> scalar``."""
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    # Past theta = pi - margin, cos(theta + margin) would grow again; continue linearly instead (as ArcFace does).
    threshold, linear = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def aam_softmax(y_true, y_pred):
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        cos = ops.clip(ops.cast(y_pred, "float32"), -1.0 + 1e-7, 1.0 - 1e-7)
        sin = ops.sqrt(1.0 - ops.square(cos))
        with_margin = ops.where(cos > threshold, cos * cos_m - sin * sin_m, cos - linear)
        target = ops.one_hot(labels, ops.shape(cos)[-1], dtype="bool")
        return cross_entropy(labels, scale * ops.where(target, with_margin, cos))

    return aam_softmax


@register_loss("triplet", output=_normalised, classification=False)
def triplet_loss(*, alpha: float):
    """Loss ``(speaker_labels, embeddings) -> scalar``; embeddings are L2-normalised by the model."""

    def deep_speaker_triplet(y_true, y_pred):
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        emb = ops.normalize(ops.cast(y_pred, "float32"), axis=-1)
        sim = ops.matmul(emb, ops.transpose(emb))
        same = ops.equal(labels[:, None], labels[None, :])
        positive = ops.logical_and(same, ops.logical_not(ops.eye(ops.shape(labels)[0], dtype="bool")))
        # Cosine is >= -1, so -2 keeps same-speaker entries out of the max.
        hardest_negative = ops.max(ops.where(same, -2.0, sim), axis=1)
        per_pair = ops.relu(hardest_negative[:, None] - sim + alpha)
        weight = ops.cast(positive, "float32")
        return ops.sum(per_pair * weight) / ops.maximum(ops.sum(weight), 1.0)

    return deep_speaker_triplet


@keras.saving.register_keras_serializable(package="voiceprint")
class CosineClassifier(layers.Layer):
    """Cosine between the normalised input and each class's normalised weight vector (for ``aam_softmax``)."""

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.num_classes), initializer="glorot_uniform",
                                      name="kernel")

    def call(self, x):
        return ops.matmul(ops.normalize(x, axis=-1), ops.normalize(self.kernel, axis=0))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def output_layer(loss: str, num_classes: int, name: str = "head_classifier"):
    """What a model trained with ``loss`` outputs: logits, cosines to class weights, or the normalised embedding."""
    return loss_spec(loss).output(num_classes, name)


def get_loss(name: str, **settings):
    """The loss called ``name``, given the settings it takes (others are ignored: e.g. ``alpha`` for softmax)."""
    loss = loss_spec(name)
    accepted = loss.settings()
    return loss.factory(**{k: v for k, v in settings.items() if k in accepted})
