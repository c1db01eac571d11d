"""Fit loops: softmax pre-training, triplet fine-tuning, and heads on a frozen embedding model.

Each returns the trained embedding model (features -> L2-normalised vector) and a per-epoch history table.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd

from voiceprint.batching import ArrayBatches, ClassificationBatches, SpeakerBatches, VectorSpeakerBatches
from voiceprint.checkpoint import import_original_weights
from voiceprint.embedding import embed_arrays
from voiceprint.losses import CLASSIFICATION, get_loss, output_layer
from voiceprint.models import attach_head, build_head, build_rescnn, head_tap, tap_model
from voiceprint.store import FeatureStore


@dataclass
class Trained:
    model: keras.Model
    history: pd.DataFrame
    head: keras.Model | None = None     # train_head: the head alone (for its size)


def _roles(store: FeatureStore, split: pd.DataFrame, role: str):
    rows = split[split.role == role]
    return store.position(rows.utterance), rows.label.to_numpy()


def _history(hist: keras.callbacks.History) -> pd.DataFrame:
    frame = pd.DataFrame(hist.history)
    frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    return frame


def train_softmax(store: FeatureStore, split: pd.DataFrame, *, filters, blocks: int, embedding_dim: int,
                  frames: int, epochs: int, batch_size: int, lr: float, dropout: float, seed: int,
                  init_checkpoint=None, verbose: int = 2) -> Trained:
    """Softmax over the training speakers; validation = held-out utterances of the same speakers.

    ``init_checkpoint``: an original-format Deep Speaker ``.h5`` to start from (its classifier is skipped when
    the speaker count differs)."""
    train_pos, train_lab = _roles(store, split, "train")
    val_pos, val_lab = _roles(store, split, "validation")
    num_classes = int(train_lab.max()) + 1
    embedding, classifier = build_rescnn(filters=filters, blocks=blocks, embedding_dim=embedding_dim,
                                         num_bands=store.num_bands, num_classes=num_classes, dropout=dropout)
    if init_checkpoint is not None:
        print(import_original_weights(classifier, init_checkpoint).summary())
    classifier.compile(optimizer=keras.optimizers.Adam(lr), loss=get_loss("softmax"),
                       metrics=["accuracy"], jit_compile=False)
    train = ClassificationBatches(store, train_pos, train_lab, batch_size=batch_size, frames=frames, seed=seed)
    val = (ClassificationBatches(store, val_pos, val_lab, batch_size=batch_size, frames=frames, seed=seed,
                                 shuffle=False) if len(val_pos) else None)
    hist = classifier.fit(train, validation_data=val, epochs=epochs, verbose=verbose)
    return Trained(embedding, _history(hist))


def train_triplet(model: keras.Model, store: FeatureStore, split: pd.DataFrame, *, alpha: float, epochs: int,
                  steps_per_epoch: int, speakers_per_batch: int, utterances_per_speaker: int, frames: int,
                  lr: float, seed: int, verbose: int = 2) -> Trained:
    """Triplet loss on cosine similarity with hardest in-batch negatives; starts from ``model``'s weights.
    Validation loss: fixed P x K batches of the held-out utterances of training speakers.
    ``epochs=0`` returns ``model`` untouched (to evaluate a pretrained checkpoint as it is)."""
    if epochs == 0:
        return Trained(model, pd.DataFrame(columns=["epoch", "loss", "val_loss"]))
    train_pos, train_lab = _roles(store, split, "train")
    val_pos, val_lab = _roles(store, split, "validation")
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=get_loss("triplet", alpha=alpha), jit_compile=False)
    batches = dict(speakers_per_batch=speakers_per_batch, utterances_per_speaker=utterances_per_speaker,
                   frames=frames)
    train = SpeakerBatches(store, train_pos, train_lab, steps=steps_per_epoch, seed=seed, **batches)
    val = None
    if len(np.unique(val_lab)) >= 2:
        # Same seed every epoch (epoch counter never advances on validation data): a fixed validation set.
        val = SpeakerBatches(store, val_pos, val_lab, steps=max(1, steps_per_epoch // 5), seed=seed + 1,
                             **batches)
    hist = model.fit(train, validation_data=val, epochs=epochs, verbose=verbose)
    return Trained(model, _history(hist))


def crop_inputs(source: keras.Model, store: FeatureStore, positions, *, crops: int, frames: int,
                seed: int) -> np.ndarray:
    """``source`` applied to ``crops`` random crops per utterance, utterance-major: embeddings
    (n * crops, dim) or frame sequences (n * crops, steps, features)."""
    rng = np.random.default_rng(seed)
    arrays = np.stack([store.crop(int(p), frames, rng) for p in positions for _ in range(crops)])
    return embed_arrays(source, arrays)


def train_head(base: keras.Model, store: FeatureStore, split: pd.DataFrame, *, kind: str, units: int,
               layers_count: int, dropout: float, output_dim: int, contexts, loss: str, alpha: float,
               margin: float, scale: float, epochs: int, lr: float, batch_size: int, crops_per_utterance: int,
               utterances_per_speaker: int, frames: int, train_trunk: bool, trunk_lr: float, seed: int,
               verbose: int = 2) -> Trained:
    """Train head ``kind`` on the base model's tap (embedding or frame sequence) with ``loss``; return
    base+head as one model (features -> L2-normalised head embedding).

    Frozen trunk (default): the tap is computed once for ``crops_per_utterance`` random crops per utterance and
    the head trains on those arrays. ``train_trunk``: the trunk trains jointly, at ``trunk_lr``, on fresh crops
    every batch (much slower; the base model file itself is never changed).
    """
    tap = head_tap(kind)
    source = tap_model(base, tap)
    train_pos, train_lab = _roles(store, split, "train")
    val_pos, val_lab = _roles(store, split, "validation")
    head = build_head(kind, input_dim=source.output_shape[-1], units=units, layers_count=layers_count,
                      dropout=dropout, output_dim=output_dim, contexts=contexts)
    classify = loss in CLASSIFICATION
    has_val = len(np.unique(val_lab)) >= (1 if classify else 2)
    steps = max(1, len(train_pos) * crops_per_utterance // batch_size)
    batching = dict(loss=loss, batch_size=batch_size, utterances_per_speaker=utterances_per_speaker)
    if train_trunk:
        base.trainable = True
        train = crop_batches(store, np.repeat(train_pos, crops_per_utterance),
                             np.repeat(train_lab, crops_per_utterance), frames=frames, steps=steps, seed=seed,
                             **batching)
        val = (crop_batches(store, val_pos, val_lab, frames=frames, steps=max(1, steps // 5), seed=seed + 1,
                            shuffle=False, **batching) if has_val else None)
    else:
        base.trainable = False
        x_train = crop_inputs(source, store, train_pos, crops=crops_per_utterance, frames=frames, seed=seed)
        y_train = np.repeat(train_lab, crops_per_utterance)
        train = array_batches(x_train, y_train, steps=steps, seed=seed, **batching)
        val = None
        if has_val:
            x_val = crop_inputs(source, store, val_pos, crops=1, frames=frames, seed=seed + 1)
            val = array_batches(x_val, val_lab, steps=max(1, steps // 5), seed=seed + 1, shuffle=False, **batching)
    history = fit_head(head, train, val, loss=loss, num_classes=int(train_lab.max()) + 1, lr=lr, epochs=epochs,
                       trunk=source if train_trunk else None, trunk_lr=trunk_lr, verbose=verbose,
                       alpha=alpha, margin=margin, scale=scale)
    base.trainable = False
    return Trained(attach_head(base, head, tap), history, head)


def array_batches(x, y, *, loss: str, batch_size: int, utterances_per_speaker: int, steps: int, seed: int,
                  shuffle: bool = True):
    """Batches over in-memory inputs for ``loss``: shuffled minibatches for classification losses, P x K
    speaker batches for the triplet loss."""
    if loss in CLASSIFICATION:
        return ArrayBatches(x, y, batch_size=batch_size, seed=seed, shuffle=shuffle)
    return VectorSpeakerBatches(x, y, speakers_per_batch=max(2, batch_size // utterances_per_speaker),
                                utterances_per_speaker=utterances_per_speaker, steps=steps, seed=seed)


def crop_batches(store: FeatureStore, positions, labels, *, loss: str, batch_size: int,
                 utterances_per_speaker: int, frames: int, steps: int, seed: int, shuffle: bool = True):
    """The same over random crops read from the store at every batch (for training through the trunk)."""
    if loss in CLASSIFICATION:
        return ClassificationBatches(store, positions, labels, batch_size=batch_size, frames=frames, seed=seed,
                                     shuffle=shuffle)
    return SpeakerBatches(store, positions, labels, frames=frames, steps=steps, seed=seed,
                          speakers_per_batch=max(2, batch_size // utterances_per_speaker),
                          utterances_per_speaker=utterances_per_speaker)


def fit_head(head: keras.Model, train, val, *, loss: str, num_classes: int, lr: float, epochs: int,
             trunk: keras.Model | None = None, trunk_lr: float = 0.0, verbose: int = 2, **loss_settings):
    """Fit ``head`` (on ``trunk``'s output when given, trained jointly at ``trunk_lr``) through the output layer
    ``loss`` needs; returns the history table."""
    inputs = keras.Input(head.input_shape[1:] if trunk is None else trunk.input_shape[1:])
    features = inputs if trunk is None else trunk(inputs)
    trainer = keras.Model(inputs, output_layer(loss, num_classes)(head(features)), name="head_trainer")
    trunk_vars = list(trunk.trainable_variables) if trunk is not None else []
    head_vars = [v for v in trainer.trainable_variables if not any(v is t for t in trunk_vars)]
    return fit_two_rates(trainer, get_loss(loss, **loss_settings), train, val, epochs=epochs,
                         groups=[(head_vars, lr), (trunk_vars, trunk_lr)], accuracy=loss in CLASSIFICATION,
                         verbose=verbose)


def fit_two_rates(trainer: keras.Model, loss_fn, train, val, *, epochs: int, groups, accuracy: bool,
                  verbose: int = 2) -> pd.DataFrame:
    """A plain training loop with one Adam per variable group (e.g. head at ``lr``, trunk at ``trunk_lr``);
    Keras' ``fit`` has a single optimizer. ``train``/``val``: indexable batch sequences (x, y).
    Returns the per-epoch history: loss (+ accuracy), val_loss (+ val_accuracy)."""
    import tensorflow as tf

    groups = [(list(variables), keras.optimizers.Adam(rate)) for variables, rate in groups if variables]
    for variables, optimizer in groups:
        optimizer.build(variables)
    variables = [v for group, _ in groups for v in group]

    def correct(y, out):
        return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(out, -1, output_type=tf.int32), tf.cast(y, tf.int32)),
                                     tf.float32))

    @tf.function(reduce_retracing=True)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            out = trainer(x, training=True)
            loss = loss_fn(y, out)
            total = loss + tf.add_n(trainer.losses) if trainer.losses else loss
        grads = tape.gradient(total, variables)
        start = 0
        for group, optimizer in groups:
            optimizer.apply_gradients(zip(grads[start:start + len(group)], group))
            start += len(group)
        return loss, correct(y, out)

    @tf.function(reduce_retracing=True)
    def eval_step(x, y):
        out = trainer(x, training=False)
        return loss_fn(y, out), correct(y, out)

    def run(batches, step):
        loss_sum = hits = count = 0.0
        for i in range(len(batches)):
            x, y = batches[i]
            loss, ok = step(tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y))
            loss_sum += float(loss) * len(y)
            hits += float(ok)
            count += len(y)
        batches.on_epoch_end()
        return loss_sum / count, hits / count

    rows = []
    for epoch in range(1, epochs + 1):
        row = {"epoch": epoch}
        row["loss"], acc = run(train, train_step)
        if accuracy:
            row["accuracy"] = acc
        if val is not None:
            row["val_loss"], val_acc = run(val, eval_step)
            if accuracy:
                row["val_accuracy"] = val_acc
        rows.append(row)
        if verbose:
            print(f"epoch {epoch}/{epochs} " + " ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"),
                  flush=True)
    return pd.DataFrame(rows)
