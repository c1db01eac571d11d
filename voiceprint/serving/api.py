"""The public Python API: embed, verify, compare, cluster, enrol and identify with a trained model bundle.

    from voiceprint import Recognizer
    from voiceprint import Registry

    rec = Recognizer("models/voiceprint")           # or a bare .keras file (then pass thresholds as numbers)
    rec.verify("a.flac", "b.flac")                  # Verification(score=0.71, threshold=0.41, ..., same_speaker=True)
    rec.compare("converted.wav", ["source.wav", "target.wav"])   # one cosine score per reference
    rec.embed_signal(samples, 44100)                 # arrays too: (samples,) or (samples, channels), any rate
    rec.verify((samples, 8000), Audio(flac_bytes))   # any input: a path, (array, rate), Audio(...) or file bytes
    similarity(rec.embed("a.flac"), rec.embed("b.flac"))   # cosine of two embeddings
    with Registry() as reg:                          # VOICEPRINT_REGISTRY or ~/.local/share/voiceprint/registry.sqlite
        rec.enroll(reg, "alice", ["alice1.flac", "alice2.flac"])
        rec.identify(reg, "who.flac", top=3)        # Identification(speaker="alice" or "unknown", ...)

Scores are cosine similarities in [-1, 1], or, with a bundle that carries an AS-norm cohort (``score_norm: as_norm``,
written by the evaluate stage under ``evaluate.score_norm: as_norm``), those cosines normalised by AS-norm
(``voiceprint.evaluation.score_norm``), which is how that bundle's thresholds were calibrated; ``score_norm`` in each
result
says which. "Same speaker" means score >= threshold. Thresholds come from the bundle's thresholds.json (``"eer"``,
``"low_far"``) or are given as numbers; a bundle with llr_calibration.json also maps scores to log-likelihood
ratios (:meth:`Recognizer.llr`) and decides at a prior of a target (``verify_at_prior``, ``identify_at_prior``). Files are processed exactly as the
pipeline processed its training and evaluation audio (the bundle's feature settings, then the feature store's
float16 rounding), so a file embeds here as in the evaluate stage and the calibration applies: bit-identical, or
within float32 round-off (~1e-7) where files of equal frame count share a batch.

Audio in memory goes wherever a file path goes: an ``(array, rate)`` tuple, ``Audio(array, rate)``, or the
encoded bytes of a file (``bytes`` or ``Audio(data)``); see :class:`voiceprint.data.audio.Audio` for the array layout
(``(samples,)`` or ``(samples, channels)``, integers scaled by their type's range). It is decoded, mixed down,
resampled and checked exactly as a file is, so the same samples embed the same either way.

The CLI (``voiceprint.serving.cli``) and the HTTP service (``voiceprint.serving.serve``) are thin layers over this
module.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from voiceprint.data.audio import AUDIO_EXTENSIONS, Audio
from voiceprint.serving.bundle import Bundle, BundleError, file_sha256, load_bundle
from voiceprint.core.embedding import unit_rows
from voiceprint.core.errors import VoiceprintError
from voiceprint.serving.registry import EnrollResult, Registry, SpeakerScore, rank_scores, rank_speakers
from voiceprint.evaluation.score_norm import as_norm_matrix

MODEL_ENV_VAR = "VOICEPRINT_MODEL"
DEFAULT_MODEL = Path("models/voiceprint")
AUDIO_SUFFIXES = tuple(sorted(AUDIO_EXTENSIONS))   # what a directory is searched for: what the pipeline decodes
UNKNOWN = "unknown"
FILES_PER_CHUNK = 64   # featurise and embed this many files at a time: bounded memory, batched model calls


class InputError(VoiceprintError, ValueError):
    """The inputs name nothing usable (e.g. a directory without audio files)."""


# What every operation takes as one recording: a file path, Audio (samples + rate, or encoded bytes), an
# (array, rate) tuple, or the encoded bytes of a file.
AudioInput = "str | os.PathLike | Audio | tuple[np.ndarray, int] | bytes"


def as_audio(item, index: int = 0) -> Path | Audio:
    """One input as a :class:`~pathlib.Path` (a file) or an :class:`Audio` (in memory, named ``<array i>`` or
    ``<bytes i>`` after its position when it has no name). InputError for anything else, e.g. an array without
    its sample rate."""
    if isinstance(item, (str, os.PathLike)):
        return Path(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        item = Audio(item)
    elif isinstance(item, tuple) and len(item) == 2 and not isinstance(item[0], (str, os.PathLike)):
        item = Audio(*item)
    elif isinstance(item, np.ndarray):
        raise InputError(f"input {index}: an array needs its sample rate: pass (array, rate) or Audio(array, rate)")
    elif not isinstance(item, Audio):
        raise InputError(f"input {index}: {type(item).__name__} is not audio: give a file path, (array, rate), "
                         "Audio(...) or the bytes of an audio file")
    if item.name is None:
        kind = "bytes" if isinstance(item.samples, (bytes, bytearray, memoryview)) else "array"
        item = dataclasses.replace(item, name=f"<{kind} {index}>")
    return item


def source_of(item: Path | Audio) -> tuple[str, str]:
    """(what the registry records as the source, sha256 of its content): a file's resolved path and bytes; in-memory
    audio's name and the hash of its bytes (encoded content hashes as the same file would), so enrolling the same
    recording twice stores it once."""
    if isinstance(item, Path):
        return str(item.resolve()), file_sha256(item)
    if isinstance(item.samples, (bytes, bytearray, memoryview)):
        return item.name, hashlib.sha256(item.samples).hexdigest()
    samples = np.ascontiguousarray(item.samples)
    digest = hashlib.sha256(f"{samples.dtype.str} {samples.shape} {item.sample_rate}\n".encode())
    digest.update(samples.tobytes())
    return item.name, digest.hexdigest()


def default_model_path() -> Path:
    """$VOICEPRINT_MODEL, else models/voiceprint when a pipeline run wrote one here, else the real-speech model
    shipped with the package (voiceprint.serving.pretrained)."""
    if os.environ.get(MODEL_ENV_VAR):
        return Path(os.environ[MODEL_ENV_VAR])
    if DEFAULT_MODEL.exists():
        return DEFAULT_MODEL
    from voiceprint.serving.pretrained import SHIPPED

    return SHIPPED


def checked_model_path(model: str | Path | None = None) -> Path:
    """``model`` (or the default), with the shipped model's files checked against their sha256 first."""
    from voiceprint.serving.pretrained import SHIPPED, shipped_model

    path = Path(model) if model is not None else default_model_path()
    return shipped_model(path) if path.resolve() == SHIPPED else path


def audio_files(inputs: Iterable[str | Path], *, skipped: list[Path] | None = None) -> list[Path]:
    """Files as given, and for a directory every audio file below it (sorted), following linked folders once.
    Nothing is de-duplicated; the other files found in directories are appended to ``skipped`` when given.

    Raises AudioError (reason ``missing``) for a path that does not exist, InputError for a directory without
    audio files or an empty list.
    """
    from voiceprint.data.audio import AudioError

    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found, others = _walk_files(path)
            if skipped is not None:
                skipped.extend(others)
            if not found:
                raise InputError(f"{path}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in this directory")
            out.extend(found)
        elif path.exists():
            out.append(path)
        else:
            raise AudioError(path, "missing")
    if not out:
        raise InputError("no audio files given")
    return out


def _walk_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(audio files, other files) below ``root``, sorted; linked folders are followed, each real folder once
    (a link back up would loop)."""
    audio, others, seen = [], [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        if os.path.realpath(folder) in seen:
            dirs[:] = []
            continue
        seen.add(os.path.realpath(folder))
        for name in files:
            path = Path(folder, name)
            if path.is_file():      # fifos and devices are neither
                (audio if path.suffix.lower() in AUDIO_EXTENSIONS else others).append(path)
    return sorted(audio), sorted(others)


def similarity(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
    """Cosine similarity of two embeddings (a float), or of the rows of two (n, D) / (m, D) arrays ((n, m)).
    :meth:`Recognizer.similarity` scores with the model's own scoring (AS-norm where its bundle has a cohort)."""
    scores = cosine(a, b)
    return float(scores[0, 0]) if np.ndim(a) == 1 and np.ndim(b) == 1 else scores


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of the rows of ``a`` with the rows of ``b``: (len(a), len(b)), float64."""
    return unit_rows(a, np.float64) @ unit_rows(b, np.float64).T


def cluster_embeddings(embeddings: np.ndarray, *, threshold: float | None = None,
                       num_speakers: int | None = None, scores: np.ndarray | None = None) -> np.ndarray:
    """Speaker labels 1..k (numbered in order of first appearance) by agglomerative clustering on cosine distance
    with average linkage: groups merge while the mean cosine score between them is above ``threshold``, or until
    ``num_speakers`` groups remain. Give exactly one of the two. ``scores``: a symmetric (n, n) matrix of pair
    scores (e.g. AS-norm) to use instead of the embeddings' cosines, with the same merge rule."""
    from sklearn.cluster import AgglomerativeClustering

    if (threshold is None) == (num_speakers is None):
        raise ValueError("cluster: give exactly one of threshold and num_speakers")
    n = len(embeddings)
    if num_speakers is not None and not 1 <= num_speakers <= n:
        raise InputError(f"cluster: --speakers {num_speakers} must lie in [1, {n}] (the number of files)")
    if n == 1:
        return np.ones(1, dtype=int)
    data = np.asarray(embeddings, dtype=np.float64)
    if scores is not None:
        # Average linkage commutes with a shift, so distances = top - score merge exactly while the mean score
        # between two groups exceeds the threshold; `top` keeps every distance (and the cut) non-negative.
        top = float(np.max(scores)) if threshold is None else max(float(np.max(scores)), threshold)
        distances = top - np.asarray(scores, dtype=np.float64)
        np.fill_diagonal(distances, 0.0)
        algo = AgglomerativeClustering(n_clusters=num_speakers, metric="precomputed", linkage="average",
                                       distance_threshold=None if threshold is None else top - threshold)
        data = distances
    elif num_speakers is not None:
        algo = AgglomerativeClustering(n_clusters=num_speakers, metric="cosine", linkage="average")
    else:
        # Cosine distance = 1 - score; sklearn merges while the linkage distance is below distance_threshold.
        algo = AgglomerativeClustering(n_clusters=None, distance_threshold=1.0 - threshold, metric="cosine",
                                       linkage="average")
    raw = algo.fit_predict(data)
    first_seen: dict[int, int] = {}
    for label in raw:
        first_seen.setdefault(int(label), len(first_seen) + 1)
    return np.array([first_seen[int(label)] for label in raw])


@dataclass(frozen=True)
class Verification:
    score: float
    threshold: float
    threshold_name: str      # "eer", "low_far" or "explicit"
    same_speaker: bool       # score >= threshold
    score_norm: str = "none"   # "none" (cosine) or "as_norm"
    llr: float | None = None     # verify_at_prior: the score's log-likelihood ratio (llr_calibration.json)
    prior: float | None = None   # verify_at_prior: the prior of a target the decision was made at


@dataclass(frozen=True)
class Identification:
    speaker: str                      # the best speaker, or "unknown" when their score is below the threshold
    score: float                      # the best speaker's score (even when the answer is "unknown")
    threshold: float
    threshold_name: str
    candidates: list[SpeakerScore]    # the top speakers, best first
    score_norm: str = "none"          # "none" (cosine) or "as_norm"
    llr: float | None = None          # identify_at_prior: the best speaker's log-likelihood ratio
    prior: float | None = None        # identify_at_prior: the prior the decision was made at

    @property
    def known(self) -> bool:
        return self.speaker != UNKNOWN


class Recognizer:
    """A loaded model bundle and the operations on audio files. ``model``: a bundle directory, a ``.keras`` file
    or an already loaded :class:`~voiceprint.serving.bundle.Bundle`; default ``$VOICEPRINT_MODEL`` or
    models/voiceprint."""

    def __init__(self, model: str | Path | Bundle | None = None, *, features: dict | None = None,
                 backend: str = "auto"):
        # backend: "onnx" (ONNX Runtime, no TensorFlow), "keras", or "auto": onnx when the bundle has model.onnx
        # and onnxruntime is installed, else keras (voiceprint.serving.bundle explains why onnx is preferred).
        self.bundle = model if isinstance(model, Bundle) else load_bundle(checked_model_path(model),
                                                                          features=features, backend=backend)
        from voiceprint.features import engine, featurize_file

        self._featurize = featurize_file
        self._engine = engine
        # ONNX: numpy features (the same values; numba's load would be most of a cold start, and the runtime
        # install has no numba). Keras: the pipeline's own engine, so files embed bit for bit as in evaluate.
        self.feature_engine = "numpy" if self.bundle.backend == "onnx" else "auto"
        # vad: a bundle without one predates the option (featurize_file's default); max_clipped_fraction: the
        # pipeline's intake rule, so a clipped file is refused here too instead of scored as the calibration never saw.
        self._featurize_kwargs = self.bundle.features.featurize_kwargs()

    @property
    def model_sha256(self) -> str:
        """What the embeddings depend on (the registry keys enrolments by it): the model file's sha256, combined
        with the MFCC-statistics branch's in a bundle that has one."""
        return self.bundle.scoring_sha256

    @property
    def backend(self) -> str:
        """What runs the model: ``onnx`` (ONNX Runtime) or ``keras`` (TensorFlow)."""
        return self.bundle.backend

    @property
    def shipped(self) -> dict | None:
        """The shipped model's description (name, trained_on, not_for, evaluation) when that is the model used."""
        from voiceprint.serving.pretrained import SHIPPED, describe

        return describe() if Path(self.bundle.path).resolve() == SHIPPED else None

    @property
    def score_norm(self) -> str:
        """How scores are computed: ``none`` (cosine) or ``as_norm`` (the bundle has a cohort)."""
        return self.bundle.score_norm

    def scores(self, enroll: np.ndarray, test: np.ndarray) -> np.ndarray:
        """(len(enroll), len(test)) scores of embeddings, with the scoring the bundle was calibrated on."""
        if self.score_norm == "as_norm":
            return as_norm_matrix(enroll, test, self.bundle.cohort, self.bundle.cohort_top_n)
        return cosine(enroll, test)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """Score of two embeddings with the scoring the thresholds were calibrated on (see :attr:`score_norm`)."""
        return float(self.scores(np.reshape(a, (1, -1)), np.reshape(b, (1, -1)))[0, 0])

    def threshold(self, which: str | float = "eer") -> tuple[str, float]:
        """``(name, value)``; see :meth:`voiceprint.serving.bundle.Bundle.threshold`."""
        return self.bundle.threshold(which)

    # ----------------------------------------------------------------------------------------- embedding

    def features(self, path: AudioInput) -> np.ndarray:
        """(frames, bands) float32 features of one recording (a file or in memory, see :func:`as_audio`).
        AudioError for unusable audio (too short included)."""
        return self.features_and_stats(path, with_stats=False)[0]

    def features_and_stats(self, path: AudioInput, *, with_stats: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`features` and, with ``with_stats``, the recording's MFCC statistics (what a bundle's statistics
        branch needs; None without)."""
        item = as_audio(path)
        if isinstance(item, Path):
            with self._engine(self.feature_engine):
                feats, stats = self._featurize(item, self.bundle.features.kind, with_mfcc_stats=with_stats,
                                               **self._featurize_kwargs)
        else:
            from voiceprint.features import featurize_signal

            kwargs = dict(self._featurize_kwargs)
            signal = item.load(kwargs.pop("sample_rate"), kwargs.pop("min_seconds"),
                               max_clipped_fraction=kwargs.pop("max_clipped_fraction"))
            with self._engine(self.feature_engine):
                made = featurize_signal(signal, self.bundle.features.kind, self.bundle.features.sample_rate,
                                        name=item.name, with_stats=with_stats, **kwargs)
            feats, stats = made if with_stats else (made, None)
        # The feature store keeps float16, so the model was trained and calibrated on float16-rounded features.
        return feats.astype(np.float16).astype(np.float32), stats

    def embed_files(self, paths: Sequence[AudioInput], *, progress: bool = False) -> np.ndarray:
        """(len(paths), D) float32 L2-normalised embeddings, one per input in order: files, or audio in memory
        (see :func:`as_audio`). Any bad input raises AudioError (naming it) before anything is returned."""
        from voiceprint.core.embedding import tqdm   # imported only for a shown bar

        paths = [as_audio(p, i) for i, p in enumerate(paths)]
        out = []
        with tqdm(total=len(paths), desc="embed", unit="file", disable=not progress, mininterval=1) as bar:
            for start in range(0, len(paths), FILES_PER_CHUNK):
                feats, stats = [], []
                for path in paths[start:start + FILES_PER_CHUNK]:
                    f, s = self.features_and_stats(path, with_stats=self.bundle.stats_lda is not None)
                    feats.append(f)
                    stats.append(s)
                    bar.update()
                out.append(self.embed_features(feats, stats))
        if not out:
            return np.zeros((0, self.bundle.embedding_dim), np.float32)
        return np.concatenate(out)

    def embed_features(self, features: Sequence[np.ndarray], stats: Sequence[np.ndarray | None]) -> np.ndarray:
        """The bundle's embeddings of :meth:`features_and_stats` results: the model (whole utterance or windows),
        joined with the MFCC-statistics branch when the bundle has one (``stats`` are then needed, else ignored)."""
        from voiceprint.core.embedding import embed_features

        settings = self.bundle.features
        emb = embed_features(self.bundle.model, list(features), window_frames=settings.window_frames,
                             hop_frames=settings.hop_frames)
        if self.bundle.stats_lda is None:
            return emb
        # The store keeps MFCC statistics as float32: the statistics branch was fitted on those.
        return self.bundle.stats_lda.joint(emb, np.asarray(list(stats), np.float32))

    def embed(self, path: AudioInput) -> np.ndarray:
        return self.embed_files([path])[0]

    def embed_signal(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        """The embedding of samples in memory: ``(samples,)`` or ``(samples, channels)`` (soundfile's layout, mixed
        down by the channel mean), any rate (resampled as files are), float or integer (scaled by the type's
        range). The same samples give the same embedding as the file they came from."""
        return self.embed_files([Audio(wav, sample_rate, "<signal>")])[0]

    # ----------------------------------------------------------------------------------------- pairs

    def verify(self, a: AudioInput, b: AudioInput, *, threshold: str | float = "eer") -> Verification:
        name, value = self.threshold(threshold)
        emb = self.embed_files([a, b])
        score = float(self.scores(emb[:1], emb[1:])[0, 0])
        return Verification(score, value, name, score >= value, self.score_norm)

    def compare(self, probe: AudioInput, references: Sequence[AudioInput]) -> np.ndarray:
        """Score of ``probe`` against each reference, in order (e.g. a voice-converted file against its source and
        its target speaker); the bundle's scoring (see :attr:`score_norm`)."""
        if not references:
            raise InputError("compare: give at least one reference file")
        emb = self.embed_files([probe, *references])
        return self.scores(emb[:1], emb[1:])[0]

    def cluster(self, paths: Sequence[str | Path], *, threshold: str | float = "eer",
                num_speakers: int | None = None, progress: bool = False) -> np.ndarray:
        """Speaker labels 1..k per file (see :func:`cluster_embeddings`); ``num_speakers`` overrides the threshold."""
        value = None if num_speakers is not None else self.threshold(threshold)[1]
        emb = self.embed_files(paths, progress=progress)
        pair_scores = self.scores(emb, emb) if self.score_norm != "none" else None
        return cluster_embeddings(emb, threshold=value, num_speakers=num_speakers, scores=pair_scores)

    # ----------------------------------------------------------------------------------------- registry

    def enroll(self, registry: Registry, speaker: str, paths: Sequence[AudioInput], *,
               progress: bool = False) -> EnrollResult:
        """Embed ``paths`` and store them under ``speaker`` in one transaction (all or nothing)."""
        from voiceprint.serving.registry import check_speaker_name

        speaker = check_speaker_name(speaker)   # before the expensive part
        paths = [as_audio(p, i) for i, p in enumerate(paths)]
        embeddings = self.embed_files(paths, progress=progress)
        sources = [source_of(p) for p in paths]
        return registry.enroll(speaker, embeddings, model_sha256=self.model_sha256, sources=sources)

    def identify(self, registry: Registry, path: AudioInput, *, top: int = 1,
                 threshold: str | float = "eer") -> Identification:
        """Open-set identification: the enrolled speaker whose mean enrolment embedding scores highest, or
        ``"unknown"`` when even that score is below the threshold. ``candidates`` holds the best ``top``. With AS-norm
        each speaker's score is normalised with the cohort statistics of the probe and of that speaker's mean."""
        if top < 1:
            raise InputError(f"identify: --top must be >= 1, got {top}")
        name, value = self.threshold(threshold)
        # Read the registry before embedding: an empty or other-model registry fails fast.
        names, means, counts = registry.speaker_means(self.model_sha256, self.bundle.embedding_dim)
        probe = self.embed(path)
        if self.score_norm == "none":
            scores = rank_speakers(probe, names, means, counts)
        else:
            scores = rank_scores(names, self.scores(means, probe[None])[:, 0], counts)
        best = scores[0]
        return Identification(best.speaker if best.score >= value else UNKNOWN, best.score, value, name,
                              scores[:top], self.score_norm)

    # ----------------------------------------------------------------------------------------- LLRs

    def llr(self, scores) -> np.ndarray:
        """Scores as log-likelihood ratios (the bundle's llr_calibration.json; NoLlrCalibrationError without)."""
        return self.bundle.llr(scores)

    def verify_at_prior(self, a: str | Path, b: str | Path, *, prior: float) -> Verification:
        """:meth:`verify` with the Bayes decision at ``prior`` (the share of same-speaker pairs expected):
        same speaker iff the LLR >= -log(prior / (1 - prior)); ``threshold`` is the score where that happens."""
        import dataclasses

        name, value = self.bundle.prior_threshold(prior)
        result = self.verify(a, b)      # at the EER threshold (a bundle with an LLR calibration has one) ...
        # ... then decided again at the prior: score >= value is llr >= -logit(prior), the scale being positive
        llr = float(self.llr(result.score))
        return dataclasses.replace(result, threshold=value, threshold_name=name, same_speaker=result.score >= value,
                                   llr=llr, prior=float(prior))

    def identify_at_prior(self, registry: Registry, path: str | Path, *, prior: float,
                          top: int = 1) -> Identification:
        """:meth:`identify` with the Bayes decision at ``prior`` for the best speaker (see :meth:`verify_at_prior`)."""
        import dataclasses

        name, value = self.bundle.prior_threshold(prior)
        result = self.identify(registry, path, top=top)     # then decided again at the prior, as verify_at_prior
        best = result.candidates[0]
        return dataclasses.replace(result, speaker=best.speaker if best.score >= value else UNKNOWN, threshold=value,
                                   threshold_name=name, llr=float(self.llr(best.score)), prior=float(prior))
