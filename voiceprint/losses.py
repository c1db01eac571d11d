"""Training objectives, chosen by name.

``softmax``: cross-entropy over training speakers (classifier outputs logits).
``triplet``: the Deep Speaker loss on cosine similarity, max(s_an - s_ap + alpha, 0), with in-batch mining: the
batch holds P speakers x K utterances; every (anchor, positive) pair of one speaker is matched with the anchor's
hardest negative, i.e. the most similar utterance of another speaker in the batch. Mining inside the batch costs
one similarity matrix instead of the original's separate embedding passes.
"""
from __future__ import annotations

import keras
from keras import ops


def softmax_loss(**_):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


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


LOSSES = {"softmax": softmax_loss, "triplet": triplet_loss}


def get_loss(name: str, **kwargs):
    try:
        factory = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}") from None
    return factory(**kwargs)
