"""Fit loops: softmax pre-training, triplet fine-tuning, and heads on a frozen embedding model.

Each returns the trained embedding model (features -> L2-normalised vector) and a per-epoch history table.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd

from voiceprint.batching import ClassificationBatches, SpeakerBatches, VectorSpeakerBatches
from voiceprint.checkpoint import import_original_weights
from voiceprint.embedding import embed_arrays
from voiceprint.losses import get_loss
from voiceprint.models import attach_head, build_head, build_rescnn
from voiceprint.store import FeatureStore


@dataclass
class Trained:
    model: keras.Model
    history: pd.DataFrame


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


def crop_vectors(base: keras.Model, store: FeatureStore, positions, *, crops: int, frames: int,
                 seed: int) -> np.ndarray:
    """Embeddings of ``crops`` random crops per utterance, (len(positions) * crops, dim), utterance-major."""
    rng = np.random.default_rng(seed)
    arrays = np.stack([store.crop(int(p), frames, rng) for p in positions for _ in range(crops)])
    return embed_arrays(base, arrays)


def train_head(base: keras.Model, store: FeatureStore, split: pd.DataFrame, *, kind: str, units: int,
               layers_count: int, dropout: float, output_dim: int, loss: str, epochs: int, lr: float,
               batch_size: int, crops_per_utterance: int, frames: int, alpha: float, seed: int,
               verbose: int = 2) -> Trained:
    """Train a head on the frozen base's embeddings of random crops; return base+head as one model."""
    base.trainable = False
    train_pos, train_lab = _roles(store, split, "train")
    val_pos, val_lab = _roles(store, split, "validation")
    x_train = crop_vectors(base, store, train_pos, crops=crops_per_utterance, frames=frames, seed=seed)
    y_train = np.repeat(train_lab, crops_per_utterance)
    x_val = crop_vectors(base, store, val_pos, crops=1, frames=frames, seed=seed + 1) if len(val_pos) else None
    head = build_head(kind, input_dim=base.output_shape[-1], units=units, layers_count=layers_count,
                      dropout=dropout, output_dim=output_dim)
    inputs = keras.Input(head.input_shape[1:])
    if loss == "softmax":
        logits = keras.layers.Dense(int(train_lab.max()) + 1, name="head_classifier")(head(inputs))
        trainer = keras.Model(inputs, logits)
        trainer.compile(optimizer=keras.optimizers.Adam(lr), loss=get_loss("softmax"), metrics=["accuracy"],
                        jit_compile=False)
        val = (x_val, val_lab) if x_val is not None else None
        hist = trainer.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, validation_data=val,
                           shuffle=True, verbose=verbose)
    elif loss == "triplet":
        trainer = keras.Model(inputs, keras.layers.UnitNormalization(axis=-1)(head(inputs)))
        trainer.compile(optimizer=keras.optimizers.Adam(lr), loss=get_loss("triplet", alpha=alpha),
                        jit_compile=False)
        k = 4
        steps = max(1, len(x_train) // batch_size)
        train = VectorSpeakerBatches(x_train, y_train, speakers_per_batch=max(2, batch_size // k),
                                     utterances_per_speaker=k, steps=steps, seed=seed)
        hist = trainer.fit(train, epochs=epochs, verbose=verbose)
    else:
        raise ValueError(f"unknown head loss {loss!r}; valid: softmax, triplet")
    return Trained(attach_head(base, head), _history(hist))
