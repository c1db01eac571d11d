"""Featurizing files: one file (:func:`featurize_file`; files longer than ``long_file_seconds`` are decoded and
featurized in chunks, with the same results as the whole-file path), a signal in memory
(:func:`featurize_signal`), and many files in a process pool (:func:`featurize_many`).

This module runs inside multiprocessing workers, before TF is imported anywhere.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator

import numpy as np

from voiceprint.data.audio import AudioError, ChunkedAudio, decode, open_audio
from voiceprint.core.errors import WorkerDiedError
from voiceprint.features.framing import FRAME_LEN, _FrameCutter, _frame_params, _select, num_frames
from voiceprint.features.kinds import FEATURE_KINDS, _check_kind
from voiceprint.features.mfcc import (MFCC_BANDS, MFCC_HOP, MFCC_N_FFT, MFCC_TOP_DB, _dct_ortho, _dct_rows,
                                      _MeanStd, _mfcc_db_of_frames, mfcc_stats)
from voiceprint.features.vad import (NoSpeechError, _BlockEnergy, _check_vad, _energy_segments, _StreamedTrim,
                                     _vad_block, apply_vad, trim_silence_original)

MIN_FRAMES = 2  # featurize_file rejects shorter results (see its docstring)
# Files longer than LONG_FILE_SECONDS are featurized in chunks of CHUNK_SECONDS.  Whole-file extraction of 5 min
# of audio peaks at 52 MB (tracemalloc: the decoded audio, float64 filterbank energies, the 8 MB of features) and
# grows with the length; in 20 s chunks it peaks at 16-19 MB, at half the speed (every pass decodes again).
# 5 min is above any utterance of the usual corpora, whose features so stay those of the whole-file path.
LONG_FILE_SECONDS = 300.0
CHUNK_SECONDS = 20.0


def _chunked_features(chunks: Iterable[np.ndarray], segments, kind: str, sample_rate: int, num_bands: int = 64,
                      with_mfcc_stats: bool = True):
    """Features and mfcc_stats of the ``segments`` of a signal, with one chunk in memory (plus the features).
    The features come from the registered kind's stream (:meth:`FeatureKind.stream`).

    ``chunks`` is iterated twice (each time giving the same chunks): features and the MFCC log-mel maximum
    (power_to_db's top_db reference), then the MFCC statistics. ``with_mfcc_stats=False``: features only, one
    pass, stats None.
    """
    total = sum(stop - start for start, stop in segments)
    frame_len, frame_step = _frame_params(sample_rate)
    count = num_frames(total, frame_len, frame_step)
    out = np.empty((count, num_bands), np.float32)
    cutter = _FrameCutter(frame_len, frame_step)
    mfcc_cutter = _FrameCutter(MFCC_N_FFT, MFCC_HOP, left_pad=MFCC_N_FFT // 2)  # librosa's centred frames
    mel_max = -np.inf
    stream = _check_kind(kind).stream(sample_rate, num_bands)
    filled = 0

    def features(cut):
        nonlocal filled
        if cut is None:
            return
        buf, rows = cut
        out[filled : filled + rows] = stream.frames(buf, 0, rows)
        filled += rows

    def mfcc_max(cut):
        nonlocal mel_max
        if cut is not None and with_mfcc_stats:
            buf, rows = cut
            mel_max = max(mel_max, float(_mfcc_db_of_frames(buf, 0, rows, sample_rate).max()))

    for piece in _select(chunks, segments):
        features(cutter.push(stream.prepare(piece)))
        mfcc_max(mfcc_cutter.push(piece))
    features(cutter.finish_zero_padded(count))
    mfcc_max(mfcc_cutter.push(np.zeros(MFCC_N_FFT // 2, np.float32)))
    out = stream.finish(out)
    if not with_mfcc_stats:
        return out, None

    stats = _MeanStd()
    floor_db = mel_max - MFCC_TOP_DB
    cutter = _FrameCutter(MFCC_N_FFT, MFCC_HOP, left_pad=MFCC_N_FFT // 2)

    def mfcc_add(cut):
        if cut is not None:
            buf, rows = cut
            db = np.maximum(_mfcc_db_of_frames(buf, 0, rows, sample_rate), floor_db)
            stats.add(_dct_rows(db, _dct_ortho(MFCC_BANDS, 20)))

    for piece in _select(chunks, segments):
        mfcc_add(cutter.push(piece))
    mfcc_add(cutter.push(np.zeros(MFCC_N_FFT // 2, np.float32)))
    return out, stats.result()


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _too_short(path, samples: int, vad: str, frame_len: int) -> AudioError:
    return AudioError(path, "too_short", f"{samples} samples left by the {vad!r} VAD, need > {frame_len}")


def _featurize_chunked(path, kind, sample_rate, min_seconds, vad, max_clipped_fraction, chunk_seconds,
                       with_mfcc_stats=True):
    audio = ChunkedAudio(path, sample_rate, chunk_seconds)
    frame_len, frame_step = _frame_params(sample_rate)
    if vad == "original":
        trim = _StreamedTrim()
        for chunk in audio:
            trim.push(chunk)
        audio.validate(min_seconds, max_clipped_fraction)
        segments = [trim.segment(audio)]
    else:
        energy = _BlockEnergy(_vad_block(sample_rate))
        for chunk in audio:
            energy.push(chunk)
        n = audio.validate(min_seconds, max_clipped_fraction)
        try:
            segments = _energy_segments(energy.energies_db(), n, sample_rate)
        except NoSpeechError as exc:
            raise AudioError(path, "no_speech", str(exc)) from None
    total = sum(stop - start for start, stop in segments)
    if total <= frame_len or num_frames(total, frame_len, frame_step) < MIN_FRAMES:
        raise _too_short(path, total, vad, frame_len)
    return _chunked_features(audio, segments, kind, sample_rate, with_mfcc_stats=with_mfcc_stats)


def featurize_file(
    path,
    kind: str,
    sample_rate: int = 16000,
    min_seconds: float = 0.0,
    *,
    vad: str = "original",
    max_clipped_fraction: float | None = None,
    long_file_seconds: float | None = None,
    chunk_seconds: float | None = None,
    with_mfcc_stats: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """File -> (features (frames, 64) float32 of ``kind``, mfcc_stats vector): the one way to make model input.

    load_audio -> VAD (``vad``: ``original`` = trim_silence_original, ``energy`` = vad_energy) ->
    (FEATURE_KINDS[kind], mfcc_stats).  ``min_seconds`` applies to the decoded audio, before the VAD;
    ``max_clipped_fraction`` as in :func:`voiceprint.data.audio.load_audio` (None: no check).

    A file longer than ``long_file_seconds`` (by its header; None: :data:`LONG_FILE_SECONDS`) is decoded and
    featurized in chunks of ``chunk_seconds`` (None: :data:`CHUNK_SECONDS`), never holding more than one chunk of
    audio, through the kind's :meth:`~voiceprint.features.kinds.FeatureKind.stream`: same features (bit-identical in tests), and
    the same mfcc_stats up to float rounding (merged per-chunk float64 sums instead of one mean and std).  Each
    pass over the chunks decodes the file again (4 passes with the ``original`` VAD, 3 with ``energy``).

    ``with_mfcc_stats=False`` (the runtime, which only embeds): the same features, mfcc_stats None, and neither
    their compute nor scipy's import (a cold start's ~0.3 s), nor the chunked path's extra pass.

    Raises:
        ValueError: unknown ``kind`` or ``vad`` (checked before decoding).
        AudioError: whatever :func:`voiceprint.data.audio.load_audio` rejects; reason ``no_speech`` when the energy
            VAD finds none; reason ``too_short`` when the VAD leaves fewer than 2 frames (<= 400 samples at
            16 kHz): a single, zero-padded frame is not a usable utterance (and the trim can shrink a file a lot).
    """
    fn = _check_kind(kind)
    _check_vad(vad)
    long_file_seconds = LONG_FILE_SECONDS if long_file_seconds is None else long_file_seconds
    chunk_seconds = CHUNK_SECONDS if chunk_seconds is None else chunk_seconds
    with open_audio(path) as fh:
        chunked = fh.frames / fh.samplerate > long_file_seconds
        if not chunked:
            y = decode(fh, path, sample_rate, min_seconds, max_clipped_fraction=max_clipped_fraction)
    if chunked:
        return _featurize_chunked(path, kind, sample_rate, min_seconds, vad, max_clipped_fraction, chunk_seconds,
                                  with_mfcc_stats=with_mfcc_stats)
    speech = _speech(y, path, sample_rate, vad)
    return fn(speech, sample_rate=sample_rate), (mfcc_stats(speech, sample_rate) if with_mfcc_stats else None)


def _speech(y: np.ndarray, path, sample_rate: int, vad: str) -> np.ndarray:
    """The VAD's output, refused (AudioError naming ``path``) when no speech or too little is left."""
    try:
        speech = apply_vad(y, vad, sample_rate)
    except NoSpeechError as exc:
        raise AudioError(path, "no_speech", str(exc)) from None
    frame_len, frame_step = _frame_params(sample_rate)
    n = num_frames(speech.shape[0], frame_len, frame_step)
    if speech.shape[0] <= frame_len or n < MIN_FRAMES:
        raise _too_short(path, speech.shape[0], vad, frame_len)
    return speech


def featurize_signal(y: np.ndarray, kind: str, sample_rate: int = 16000, *, vad: str = "original",
                     name: str = "<array>", with_stats: bool = False):
    """Features of a signal already loaded and checked (:func:`voiceprint.data.audio.load_signal` / ``load_bytes``):
    the model-input half of :func:`featurize_file` (VAD, then ``kind``), with the same errors naming ``name``.
    ``with_stats``: ``(features, mfcc_stats)`` as :func:`featurize_file` returns (the statistics cost a second
    pass, so only callers that use them ask)."""
    fn = _check_kind(kind)
    _check_vad(vad)
    speech = _speech(y, name, sample_rate, vad)
    features = fn(speech, sample_rate=sample_rate)
    return (features, mfcc_stats(speech, sample_rate)) if with_stats else features


def _warm_up(kind: str, sample_rate: int) -> None:
    """Run every compiled kernel ``kind`` uses once, on a short noise signal of the dtypes and layouts real input
    has.  Numba compiles on first use (seconds; later processes load the cache)."""
    noise = np.random.default_rng(0).standard_normal(2 * FRAME_LEN).astype(np.float32)
    speech = trim_silence_original(noise)
    FEATURE_KINDS[kind](speech, sample_rate=sample_rate)
    mfcc_stats(speech, sample_rate)


_BLAS_LIMITER = None  # keeps the worker's threadpool limit alive
# In a worker: the shared array holding, per worker, the index of the file it is on (-1: none), and its slot.
_SLOTS, _SLOT = None, -1


def _init_worker(slots=None, counter=None) -> None:
    # One BLAS/OpenMP thread per worker: N processes x N threads would
    # oversubscribe the cores.  The env vars cover libraries loaded later; the
    # already-loaded ones (numpy's OpenBLAS, inherited via fork) need threadpoolctl.
    global _BLAS_LIMITER, _SLOTS, _SLOT
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    from threadpoolctl import threadpool_limits

    _BLAS_LIMITER = threadpool_limits(limits=1)
    if slots is not None:
        with counter.get_lock():
            _SLOT, counter.value = counter.value, counter.value + 1
        _SLOTS = slots
        # When one worker dies, the executor stops the others with SIGTERM: they clear their slot first, so only
        # the one that died on its own (kill -9, the OOM killer, a crash) still names its file.
        signal.signal(signal.SIGTERM, _stop_worker)


def _stop_worker(signum, frame):
    _SLOTS[_SLOT] = -1
    os._exit(128 + signum)


def _featurize_tracked(task):
    _SLOTS[_SLOT] = task[0]
    result = _featurize_one(task)
    _SLOTS[_SLOT] = -1
    return result


def _featurize_one(task):
    """Worker body: never raises; returns (index, feats, baseline, reason, message)."""
    index, path, kind, sample_rate, min_seconds, vad, max_clipped_fraction = task
    try:
        feats, base = featurize_file(path, kind, sample_rate=sample_rate, min_seconds=min_seconds, vad=vad,
                                     max_clipped_fraction=max_clipped_fraction)
        return index, feats, base, None, None
    except AudioError as exc:
        return index, None, None, exc.reason, str(exc)
    except Exception as exc:  # noqa: BLE001 -- one bad file must not stop a corpus
        return index, None, None, "error", f"{path}: {type(exc).__name__}: {exc}"


def featurize_many(
    paths: Iterable,
    kind: str,
    *,
    workers: int,
    sample_rate: int = 16000,
    min_seconds: float = 0.0,
    vad: str = "original",
    max_clipped_fraction: float | None = None,
    progress: bool = True,
    start_method: str | None = None,
) -> Iterator[tuple[int, np.ndarray | None, np.ndarray | None, str | None, str | None]]:
    """Featurize many files, yielding ``(index, features, baseline, reason, message)`` in input order.

    Good files give ``(i, feats, baseline_vec, None, None)``; a rejected file gives
    ``(i, None, None, reason, message)`` with the AudioError reason code, or
    ``'error'`` for an unexpected exception (message names the file).  One bad
    file never stops the run.  ``vad`` and ``max_clipped_fraction`` as in :func:`featurize_file`.

    ``workers <= 1`` computes in this process (with the same 1-thread BLAS
    limit); otherwise a process pool of ``workers`` processes
    (``start_method``: None = the platform default context, or 'fork',
    'spawn', 'forkserver').  ``kind`` and ``vad`` are validated up front (ValueError).
    A worker that dies (kill -9, the out-of-memory killer, a crash) raises WorkerDiedError naming the file it
    was on: a concurrent.futures pool reports a lost worker, where multiprocessing.Pool waited forever.
    """
    _check_kind(kind)
    _check_vad(vad)
    paths = [str(p) for p in paths]
    tasks = [(i, p, kind, sample_rate, min_seconds, vad, max_clipped_fraction) for i, p in enumerate(paths)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc=f"features[{kind}]", unit="file")
    try:
        if workers <= 1 or len(tasks) <= 1:
            from threadpoolctl import ThreadpoolController

            # Limit BLAS only while computing, not while the consumer runs
            # between yields (a generator must not leak a process-wide setting).
            controller = ThreadpoolController()
            for task in tasks:
                with controller.limit(limits=1):
                    result = _featurize_one(task)
                if bar is not None:
                    bar.update(1)
                yield result
            return
        _warm_up(kind, sample_rate)  # compile (or load) the kernels once here: forked workers inherit them
        ctx = multiprocessing.get_context(start_method)
        # Chunks amortise IPC but keep ordering latency / load balance reasonable.
        chunksize = max(1, min(32, len(tasks) // (workers * 8)))
        slots = ctx.Array("q", [-1] * workers, lock=False)
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(slots, ctx.Value("i", 0)))
        try:
            for result in pool.map(_featurize_tracked, tasks, chunksize=chunksize):
                if bar is not None:
                    bar.update(1)
                yield result
        except BrokenProcessPool:
            pool.shutdown(wait=True, cancel_futures=True)   # every worker has exited: the slots are final
            lost = ", ".join(paths[i] for i in slots if i >= 0) or "(none: it died between files)"
            raise WorkerDiedError(f"a features worker process died (killed: out of memory, kill -9, or a "
                                    f"crash) while processing {lost}") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if bar is not None:
            bar.close()
