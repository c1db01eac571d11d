"""Fit loops: softmax pre-training, triplet fine-tuning, and heads on a frozen embedding model.

Each returns the trained embedding model (features -> L2-normalised vector) and a per-epoch history table.
Softmax and triplet training run under a tf.distribute strategy and precision (voiceprint/training/distribute.py) and
save
its training state after every epoch to resume from (voiceprint/training/resume.py); see the section "Strategies,
precision and
resume" below.
"""
from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd

from voiceprint.training.batching import ArrayBatches, ClassificationBatches, SpeakerBatches, VectorSpeakerBatches
from voiceprint.core.contracts import HeadSettings, SoftmaxSettings, TripletSettings
from voiceprint.training.distribute import Distribution, local
from voiceprint.core.embedding import embed_arrays
from voiceprint.core.errors import DataError
from voiceprint.training.live import EpochLog
from voiceprint.losses import get_loss, is_classification, output_layer
from voiceprint.models import build_head, build_rescnn, head_tap, tap_model
from voiceprint.models.trained_head import TrainedHead
from voiceprint.training.original_h5 import import_original_weights
from voiceprint.training.resume import RESUME_ROOT, ResumeState, Snapshot
from voiceprint.data.store import FeatureStore

logger = logging.getLogger(__name__)

@dataclass
class Trained:
    model: keras.Model
    history: pd.DataFrame
    head: TrainedHead | None = None     # train_head: the head alone, its tap and (when trained) its trunk


def _roles(store: FeatureStore, split: pd.DataFrame, role: str):
    rows = split[split.role == role]
    return store.position(rows.utterance), rows.label.to_numpy()


def train_softmax(store: FeatureStore, split: pd.DataFrame, settings: SoftmaxSettings, *,
                  crop_transform=None, init_checkpoint=None, distribution: Distribution | None = None,
                  resume_state: ResumeState | None = None, live_dir=None, verbose: int = 2) -> Trained:
    """Classification over the training speakers; validation = held-out utterances of the same speakers.

    ``settings`` (the softmax section; its ``init_checkpoint`` is not read here, see below):
    ``loss``: ``softmax`` (the original recipe: logits from a Dense ``dense``) or ``aam_softmax`` (cosines to
    normalised class weights with an angular ``margin`` and logit ``scale``; what cosine scoring rewards).
    ``lr_schedule``: ``constant`` (the original) or ``cosine`` (decay to 0 over all steps; small corpora
    converge lower). ``crop_transform``: applied to every training batch of crops (e.g. spectrogram masking).

    ``init_checkpoint``: an original-format Deep Speaker ``.h5`` to start from (its classifier is skipped when
    the speaker count differs). ``distribution``: strategy and precision (default: one device, float32);
    ``batch_size`` is the global batch. ``resume_state``: saved after every epoch and resumed from (resume.py).
    ``live_dir``: where each epoch's metrics are logged as it ends (voiceprint/training/live.py); None: not logged."""
    s = settings
    filters, blocks, embedding_dim, frames, epochs = s.filters, s.blocks, s.embedding_dim, s.frames, s.epochs
    batch_size, lr, dropout, seed, loss = s.batch_size, s.lr, s.dropout, s.seed, s.loss
    distribution = distribution or local()
    train_pos, train_lab = _roles(store, split, "train")
    val_pos, val_lab = _roles(store, split, "validation")
    num_classes = int(train_lab.max()) + 1
    embedding, classifier = build_rescnn(filters=filters, blocks=blocks, embedding_dim=embedding_dim,
                                         num_bands=store.num_bands, num_classes=num_classes, dropout=dropout,
                                         classifier=output_layer(loss, num_classes, name="dense"))
    if init_checkpoint is not None:
        logger.info("%s", import_original_weights(classifier, init_checkpoint).summary())
    trainer = _training_copy(classifier, distribution)
    train = ClassificationBatches(store, train_pos, train_lab, batch_size=batch_size, frames=frames, seed=seed,
                                  transform=crop_transform)
    with distribution.strategy.scope():
        trainer.compile(optimizer=_optimizer(_learning_rate(lr, s.lr_schedule, epochs * len(train)), distribution),
                        loss=get_loss(loss, **s.loss_settings()), metrics=["accuracy"], jit_compile=False)
    val = (ClassificationBatches(store, val_pos, val_lab, batch_size=batch_size, frames=frames, seed=seed,
                                 shuffle=False) if len(val_pos) else None)
    history = _fit(trainer, train, val, epochs=epochs, distribution=distribution, resume_state=resume_state,
                   live_dir=live_dir, verbose=verbose)
    _copy_weights(trainer, classifier)
    return Trained(embedding, history)


def train_triplet(model: keras.Model, store: FeatureStore, split: pd.DataFrame, settings: TripletSettings, *,
                  distribution: Distribution | None = None, resume_state: ResumeState | None = None, live_dir=None,
                  verbose: int = 2) -> Trained:
    """Triplet loss on cosine similarity with hardest in-batch negatives; starts from ``model``'s weights.
    Validation loss: P x K batches of the held-out utterances of training speakers, the same every epoch.
    ``epochs=0`` returns ``model`` untouched (to evaluate a pretrained checkpoint as it is).
    With several replicas each holds a slice of the P x K batch, and the embeddings are gathered from all replicas
    before mining, so negatives come from the whole global batch exactly as on one device.
    ``settings``: the triplet section (its ``init_checkpoint`` is the caller's: ``model`` is where it starts)."""
    alpha, epochs, steps_per_epoch, lr, seed = settings.alpha, settings.epochs, settings.steps_per_epoch, \
        settings.lr, settings.seed
    if epochs == 0:
        if live_dir is not None:
            EpochLog(live_dir).close()      # an empty log: the stage's declared outputs exist
        return Trained(model, pd.DataFrame(columns=["epoch", "loss", "val_loss"]))
    distribution = distribution or local()
    train_pos, train_lab = _roles(store, split, "train")
    val_pos, val_lab = _roles(store, split, "validation")
    trainer = _training_copy(model, distribution)
    with distribution.strategy.scope():
        trainer.compile(optimizer=_optimizer(lr, distribution),
                        loss=_mined_over_all_replicas(get_loss("triplet", alpha=alpha), distribution),
                        jit_compile=False)
    batches = dict(speakers_per_batch=settings.speakers_per_batch,
                   utterances_per_speaker=settings.utterances_per_speaker, frames=settings.frames)
    train = SpeakerBatches(store, train_pos, train_lab, steps=steps_per_epoch, seed=seed, **batches)
    val = None
    if len(np.unique(val_lab)) >= 2:
        val = SpeakerBatches(store, val_pos, val_lab, steps=max(1, steps_per_epoch // 5), seed=seed + 1,
                             shuffle=False, **batches)
    history = _fit(trainer, train, val, epochs=epochs, distribution=distribution, resume_state=resume_state,
                   live_dir=live_dir, verbose=verbose)
    _copy_weights(trainer, model)
    return Trained(model, history)


# --- Strategies, precision and resume (train_softmax, train_triplet) ---

# Everything from the time pooling on runs in float32 under mixed precision: the pooled statistics, the embedding,
# its normalisation and the logits (the losses cast to float32 themselves).
FLOAT32_LAYERS = ("average", "dropout", "affine", "ln", "dense")


def _training_copy(model: keras.Model, distribution: Distribution) -> keras.Model:
    """The model training updates: ``model`` itself on one device in float32 (results as before strategies);
    otherwise a copy with the same weights built in the strategy's scope, its convolutions in the
    distribution's precision, and BatchNormalization synchronised across replicas (statistics of the global
    batch, as on one device). ``_copy_weights`` brings the trained weights back into ``model``, so what is saved
    is always a plain float32 model."""
    if not distribution.trains_a_copy:
        return model

    def rebuild(layer):
        config = layer.get_config()
        if distribution.replicas > 1 and isinstance(layer, keras.layers.BatchNormalization):
            config["synchronized"] = True
        if layer.name not in FLOAT32_LAYERS:
            config["dtype"] = distribution.precision
        return layer.__class__.from_config(config)

    # Building layers draws their default seeds from Python's random, which also orders the epochs' batches
    # (_EpochMajor): restore it, so every strategy reads the batches in the same order.
    draws = random.getstate()
    with distribution.strategy.scope():
        trainer = keras.models.clone_model(model, clone_function=rebuild)
    random.setstate(draws)
    for source, target in zip(model.variables, trainer.variables):     # weights and dropout seed state
        target.assign(source)
    return trainer


def _copy_weights(trainer: keras.Model, model: keras.Model) -> None:
    if trainer is not model:
        model.set_weights(trainer.get_weights())


LR_SCHEDULES = ("constant", "cosine")


def _learning_rate(lr: float, schedule: str, steps: int):
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
    return lr if schedule == "constant" else keras.optimizers.schedules.CosineDecay(lr, max(1, steps))


def _optimizer(lr, distribution: Distribution):
    adam = keras.optimizers.Adam(lr)
    # float16 gradients underflow without loss scaling; the wrapper scales the loss and skips overflowing steps.
    return keras.optimizers.LossScaleOptimizer(adam) if distribution.precision == "mixed_float16" else adam


def _mined_over_all_replicas(loss_fn, distribution: Distribution):
    """``loss_fn`` (labels, embeddings of the whole batch -> scalar) on the embeddings of all replicas.

    all_gather's gradient sums what every replica sends back to this replica's slice, so each replica's
    embeddings get the gradient of the global-batch loss. Keras divides per-sample losses by the replica count
    before summing gradients over replicas but passes scalar losses through, hence the explicit division."""
    if distribution.replicas == 1:
        return loss_fn
    import tensorflow as tf

    def over_all_replicas(y_true, y_pred):
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return loss_fn(y_true, y_pred)
        labels = context.all_gather(tf.reshape(y_true, (-1,)), axis=0)
        embeddings = context.all_gather(y_pred, axis=0)
        return loss_fn(labels, embeddings) / context.num_replicas_in_sync

    return over_all_replicas


# The epoch counter each batch sequence had in Keras 3's fit before resume existed (fit calls on_epoch_end once
# when it starts, then once per pass; evaluate adds one more per pass). Batches are drawn from (seed, counter,
# batch), so keeping these counters keeps the default results bit-identical.
def _train_counter(epoch: int) -> int:
    return epoch + 1


def _validation_counter(epoch: int) -> int:
    return 2 * epoch + 1


class _EpochMajor(keras.utils.PyDataset):
    """The training batches of epochs ``first_epoch`` .. ``epochs - 1`` as one sequence (read unshuffled):
    item i is the ``i % n``-th batch of epoch ``first_epoch + i // n`` in that epoch's order. Epoch and order come
    from the index, not from when Keras calls ``on_epoch_end``, so pipelines that prefetch across the epoch boundary
    (distributed ones) and resumed runs read exactly the batches of an uninterrupted single-device run.

    The per-epoch orders are the ones Keras' ``fit(shuffle=True)`` drew before: one ``random.shuffle`` per epoch
    from Python's global ``random``, whose state when training starts is set by the seed (so a resumed run draws
    the finished epochs' orders again, and leaves the state where an uninterrupted run would)."""

    def __init__(self, batches, *, first_epoch: int, epochs: int):
        super().__init__(workers=1, use_multiprocessing=False)
        self.batches, self.first_epoch, self.epochs = batches, first_epoch, epochs
        self.orders = []
        for _ in range(epochs):
            order = list(range(len(batches)))
            random.shuffle(order)
            self.orders.append(order)

    def __len__(self):
        return (self.epochs - self.first_epoch) * len(self.batches)

    def __getitem__(self, i):
        epoch, position = divmod(i, len(self.batches))
        epoch += self.first_epoch
        return _at_counter(self.batches, _train_counter(epoch))[self.orders[epoch][position]]


class _ValidationOf(keras.utils.PyDataset):
    """The validation batches of epoch ``self.epoch`` (set by ``_EpochEnds`` when an epoch begins)."""

    def __init__(self, batches):
        super().__init__(workers=1, use_multiprocessing=False)
        self.batches, self.epoch = batches, 0

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return _at_counter(self.batches, _validation_counter(self.epoch))[i]


def _at_counter(batches, counter: int):
    """A shallow copy of ``batches`` with its epoch counter set: reads from several threads (a prefetching
    pipeline, a discarded one still running) never change each other's epoch."""
    view = copy.copy(batches)
    view.epoch = counter
    return view


class _EpochEnds(keras.callbacks.Callback):
    """Per epoch: points the validation batches at it, records the history row, saves the resume state (every
    worker reads the variables, a collective step under multi-worker training; only the chief writes) and then
    logs the row to the live log (live.py relies on that order to repair a kill between the two)."""

    def __init__(self, validation: _ValidationOf | None, history: list[dict], resume_state: ResumeState | None,
                 state: list, live: EpochLog | None = None):
        super().__init__()
        self.validation, self.history, self.resume_state, self.state = validation, history, resume_state, state
        self.live = live

    def on_epoch_begin(self, epoch, logs=None):
        if self.validation is not None:
            self.validation.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.history.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})
        if self.resume_state is not None:
            self.resume_state.save(Snapshot(epoch + 1, list(self.history), [v.value.numpy() for v in self.state]))
        if self.live is not None:
            self.live.log_epoch(self.history[-1])


def _prepare_for_strategy(trainer: keras.Model, batch, distribution: Distribution) -> None:
    """Work around Keras 3's ``fit`` under tf.distribute strategies (keras-team/keras#20585), on this trainer only.

    1. ``fit`` builds the compiled loss and metrics from a batch it peeks at and averages across replicas, which
       fails when replicas hold slices of different sizes (a global batch not divisible by the replica count),
       and always under MultiWorkerMirroredStrategy: build them from a host batch instead (only the shapes
       matter) and skip that step.
    2. Under MultiWorkerMirroredStrategy ``fit`` averages each step's logs along axis 0, which fails on scalars:
       the steps return them as 1-vectors. The epoch history is unaffected: Keras reads it from the metrics,
       aggregated over all replicas."""
    import tensorflow as tf

    with distribution.strategy.scope():
        trainer._symbolic_build(data_batch=batch)
    trainer._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    if distribution.name == "multi_worker":
        for name in ("train_step", "test_step"):
            step = getattr(trainer, name)
            setattr(trainer, name, lambda data, step=step: {k: tf.reshape(v, (1,)) for k, v in step(data).items()})


def _check_same_start(distribution: Distribution, epochs_done: int) -> None:
    """Every worker must resume from the same epoch (else their collective steps would not match): the sum of
    the epochs done over all replicas is ``replicas x epochs_done`` on every worker exactly when they agree."""
    import tensorflow as tf

    strategy = distribution.strategy
    per_replica = strategy.experimental_distribute_values_from_function(lambda _: tf.constant(epochs_done))
    total = int(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))
    if total != epochs_done * distribution.replicas:
        raise DataError(f"multi-worker training: the workers found different resume states (this one: "
                        f"{epochs_done} epoch(s) done); keep {RESUME_ROOT} on a filesystem all workers "
                        "share, or set VOICEPRINT_RESUME=0")


def _fit(trainer: keras.Model, train, val, *, epochs: int, distribution: Distribution,
         resume_state: ResumeState | None, verbose: int, live_dir=None) -> pd.DataFrame:
    """``trainer.fit`` over the batch sequences; with a resume state, resumed from it and saved every epoch;
    with ``live_dir``, every epoch logged there (only by the chief), a resumed run continuing the log.
    Returns the per-epoch history (restored epochs included)."""
    history, state = [], []
    if resume_state is not None:
        with distribution.strategy.scope():
            trainer.optimizer.build(trainer.trainable_variables)    # its variables are part of the state
        # Model variables include the dropout seed state, not the metrics (reset every epoch).
        state = list(trainer.variables) + list(trainer.optimizer.variables)
        snapshot = resume_state.load([tuple(v.shape) for v in state])
        if snapshot is not None:
            for variable, value in zip(state, snapshot.arrays):
                variable.assign(value)
            history = list(snapshot.history)
        if distribution.name == "multi_worker":
            _check_same_start(distribution, len(history))
    live = EpochLog(live_dir, history) if live_dir is not None and distribution.is_chief else None
    if len(history) < epochs:       # else: killed after the last epoch's state was saved, before the outputs
        validation = _ValidationOf(val) if val is not None else None
        if distribution.name != "auto":
            _prepare_for_strategy(trainer, train[0], distribution)
        # Under a strategy Keras splits every global batch across the replicas (and workers).
        trainer.fit(_EpochMajor(train, first_epoch=len(history), epochs=epochs),
                    steps_per_epoch=len(train), shuffle=False, epochs=epochs, initial_epoch=len(history),
                    validation_data=validation, verbose=verbose,
                    callbacks=[_EpochEnds(validation, history, resume_state, state, live)])
    if live is not None:
        live.close()
    return pd.DataFrame(history)


def crop_inputs(source: keras.Model, store: FeatureStore, positions, *, crops: int, frames: int,
                seed: int) -> np.ndarray:
    """``source`` applied to ``crops`` random crops per utterance, utterance-major: embeddings
    (n * crops, dim) or frame sequences (n * crops, steps, features)."""
    rng = np.random.default_rng(seed)
    arrays = np.stack([store.crop(int(p), frames, rng) for p in positions for _ in range(crops)])
    return embed_arrays(source, arrays)


def train_head(base: keras.Model, store: FeatureStore, split: pd.DataFrame, settings: HeadSettings, *,
               live_dir=None, verbose: int = 2) -> Trained:
    """Train head ``settings.kind`` on the base model's tap (embedding or frame sequence) with ``settings.loss``;
    return base+head as one model (features -> L2-normalised head embedding) and the head on its own
    (``Trained.head``, :class:`voiceprint.models.trained_head.TrainedHead`: what the stage saves). ``settings``: the
    tdnn section
    (its ``head_args`` and ``loss_args`` reach the head's builder and the loss as they are).

    Frozen trunk (default): the tap is computed once for ``crops_per_utterance`` random crops per utterance and
    the head trains on those arrays; the returned model holds ``base`` itself, frozen. ``train_trunk``: a copy of
    the trunk trains jointly, at ``trunk_lr``, on fresh crops every batch (much slower); ``base`` is left as it was
    and the trained copy is the head's ``trunk``.
    ``live_dir``: where each epoch's metrics are logged as it ends (voiceprint/training/live.py).
    """
    s = settings
    kind, loss, epochs, lr, batch_size, frames, seed = s.kind, s.loss, s.epochs, s.lr, s.batch_size, s.frames, s.seed
    crops_per_utterance, utterances_per_speaker, train_trunk = s.crops_per_utterance, s.utterances_per_speaker, \
        s.train_trunk
    if train_trunk:
        base = _trainable_copy(base)
    tap = head_tap(kind)
    source = tap_model(base, tap)
    train_pos, train_lab = _roles(store, split, "train")
    val_pos, val_lab = _roles(store, split, "validation")
    head = build_head(kind, input_dim=source.output_shape[-1], **s.head_builder_settings())
    classify = is_classification(loss)
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
                       trunk=source if train_trunk else None, trunk_lr=s.trunk_lr, verbose=verbose, live_dir=live_dir,
                       **s.loss_settings())
    base.trainable = False
    trained = TrainedHead(head, kind, tap, trunk=base if train_trunk else None)
    return Trained(trained.system(base), history, trained)


def _trainable_copy(model: keras.Model) -> keras.Model:
    """A trainable copy of ``model`` with its weights (and dropout seed state), to train without touching it.
    Its layers are built trainable even where ``model``'s are frozen: a variable created frozen never trains."""

    def rebuild(layer):
        config = layer.get_config()
        config["trainable"] = True
        return layer.__class__.from_config(config)

    draws = random.getstate()       # building layers draws default seeds from Python's random: leave it as it was
    copy_ = keras.models.clone_model(model, clone_function=rebuild)
    random.setstate(draws)
    for source, target in zip(model.variables, copy_.variables):
        target.assign(source)
    return copy_


def array_batches(x, y, *, loss: str, batch_size: int, utterances_per_speaker: int, steps: int, seed: int,
                  shuffle: bool = True):
    """Batches over in-memory inputs for ``loss``: shuffled minibatches for classification losses, P x K
    speaker batches for the triplet loss."""
    if is_classification(loss):
        return ArrayBatches(x, y, batch_size=batch_size, seed=seed, shuffle=shuffle)
    return VectorSpeakerBatches(x, y, speakers_per_batch=max(2, batch_size // utterances_per_speaker),
                                utterances_per_speaker=utterances_per_speaker, steps=steps, seed=seed,
                                shuffle=shuffle)


def crop_batches(store: FeatureStore, positions, labels, *, loss: str, batch_size: int,
                 utterances_per_speaker: int, frames: int, steps: int, seed: int, shuffle: bool = True):
    """The same over random crops read from the store at every batch (for training through the trunk)."""
    if is_classification(loss):
        return ClassificationBatches(store, positions, labels, batch_size=batch_size, frames=frames, seed=seed,
                                     shuffle=shuffle)
    return SpeakerBatches(store, positions, labels, frames=frames, steps=steps, seed=seed,
                          speakers_per_batch=max(2, batch_size // utterances_per_speaker),
                          utterances_per_speaker=utterances_per_speaker, shuffle=shuffle)


def fit_head(head: keras.Model, train, val, *, loss: str, num_classes: int, lr: float, epochs: int,
             trunk: keras.Model | None = None, trunk_lr: float = 0.0, verbose: int = 2, live_dir=None,
             **loss_settings):
    """Fit ``head`` (on ``trunk``'s output when given, trained jointly at ``trunk_lr``) through the output layer
    ``loss`` needs; returns the history table."""
    inputs = keras.Input(head.input_shape[1:] if trunk is None else trunk.input_shape[1:])
    features = inputs if trunk is None else trunk(inputs)
    trainer = keras.Model(inputs, output_layer(loss, num_classes)(head(features)), name="head_trainer")
    trunk_vars = list(trunk.trainable_variables) if trunk is not None else []
    head_vars = [v for v in trainer.trainable_variables if not any(v is t for t in trunk_vars)]
    return fit_two_rates(trainer, get_loss(loss, **loss_settings), train, val, epochs=epochs,
                         groups=[(head_vars, lr), (trunk_vars, trunk_lr)], accuracy=is_classification(loss),
                         verbose=verbose, live_dir=live_dir)


def fit_two_rates(trainer: keras.Model, loss_fn, train, val, *, epochs: int, groups, accuracy: bool,
                  verbose: int = 2, live_dir=None) -> pd.DataFrame:
    """A plain training loop with one Adam per variable group (e.g. head at ``lr``, trunk at ``trunk_lr``);
    Keras' ``fit`` has a single optimizer. ``train``/``val``: indexable batch sequences (x, y).
    Returns the per-epoch history: loss (+ accuracy), val_loss (+ val_accuracy), each epoch logged to
    ``live_dir`` as it ends (voiceprint/training/live.py) when given."""
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
    live = EpochLog(live_dir) if live_dir is not None else None
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
        if live is not None:
            live.log_epoch(row)
        if verbose:
            logger.info("epoch %d/%d %s", epoch, epochs,
                        " ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"))
    if live is not None:
        live.close()
    return pd.DataFrame(rows)
