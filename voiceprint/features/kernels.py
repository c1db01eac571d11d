"""The compiled feature kernels and the engine switch: filterbank energies of frames (FFTs batched across frames),
the trim's order statistics, the per-frame normalisation; each with a numpy twin (:func:`engine`).

Two engines compute the same features: ``numba`` (the kernels below; what the pipeline uses, bit for bit as
ever) and ``numpy`` (numpy's FFT on framed blocks; numba is never imported). Loading numba and its cached kernels
costs ~1.2 s of CPU in every new process, most of a cold ``voiceprint verify``, so the ONNX runtime computes its
features with ``numpy``: the same values up to float64 round-off in the spectra (trim and normalisation
bit-identical), tests/test_runtime.py. The default (``auto``) is ``numba`` when it is installed.

Every ``@_njit`` kernel lives in this module: they call each other through its globals, which are replaced by
numba dispatchers together on first use. Other modules call them as ``kernels.<name>``, never through a
``from ... import`` copy of the lazy wrapper.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util

import numpy as np

from voiceprint.core import portable_math as pm

# ---------------------------------------------------------------------------
# Engines: numba kernels, compiled lazily, or numpy
# ---------------------------------------------------------------------------

ENGINES = ("auto", "numba", "numpy")
_ENGINE = contextvars.ContextVar("voiceprint_features_engine", default="auto")   # per thread / task
_KERNELS: list[str] = []       # the names of the numba kernels below, compiled together on first use


def _njit(fn):
    """``numba.njit(cache=True)``, applied on the first call of any kernel: importing this module does not import
    numba. All kernels are compiled together (``numba.njit`` is lazy itself), because kernels call each other
    through this module's globals, which must then be numba dispatchers."""
    _KERNELS.append(fn.__name__)

    @functools.wraps(fn)
    def first_call(*args):
        _compile_kernels()
        return globals()[fn.__name__](*args)

    first_call.py_func = fn
    return first_call


def _compile_kernels() -> None:
    import numba

    g = globals()
    for name in _KERNELS:
        if not hasattr(g[name], "signatures"):     # still the lazy wrapper, not a numba dispatcher
            g[name] = numba.njit(cache=True)(g[name].py_func)


@functools.lru_cache(maxsize=1)
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def _use_numba() -> bool:
    chosen = _ENGINE.get()
    return chosen == "numba" or (chosen == "auto" and _numba_installed())


@contextlib.contextmanager
def engine(name: str):
    """``with engine("numpy"): ...``: compute features in this thread with ``name`` (``auto``: numba when it is
    installed, ``numba``, ``numpy``); see the module docstring."""
    if name not in ENGINES:
        raise ValueError(f"feature engine {name!r}: expected one of {', '.join(ENGINES)}")
    token = _ENGINE.set(name)
    try:
        yield
    finally:
        _ENGINE.reset(token)


@_njit
def _order_statistics(bits, k):
    """(finite, |x|_(k), |x|_(k+1)) for float32 x given as its uint32 bit patterns; order statistics 0-based,
    returned as bit patterns, k + 1 clipped to the last one.  finite is False when x holds Inf or NaN.

    With the sign bit cleared, bit patterns sort like the magnitudes: a histogram of their top 16 bits finds the
    bins holding both statistics, and only those bins' values are sorted.
    """
    n = bits.shape[0]
    counts = np.zeros(1 << 16, np.int64)
    for i in range(n):
        counts[(bits[i] & 0x7FFFFFFF) >> 16] += 1
    if counts[0x7F80:].sum() > 0:  # exponent all ones: Inf or NaN
        return False, np.uint32(0), np.uint32(0)
    below, low = 0, 0
    while below + counts[low] <= k:
        below += counts[low]
        low += 1
    high = low
    if below + counts[low] == k + 1 and k + 1 < n:  # x_(k+1) is the smallest value of the next non-empty bin
        high = low + 1
        while counts[high] == 0:
            high += 1
    members = np.empty(counts[low] + (counts[high] if high != low else 0), np.uint32)
    m = 0
    for i in range(n):
        v = bits[i] & 0x7FFFFFFF
        if v >> 16 == low or v >> 16 == high:
            members[m] = v
            m += 1
    members.sort()  # a bin holds a small share of the samples (all of them only for a near-constant signal)
    r = k - below
    return True, members[r], members[min(r + 1, members.shape[0] - 1)]


@_njit
def _loud_bounds(signal, threshold):
    """(first, last) indices with |x| > threshold; last <= first when fewer than 2 samples are that loud."""
    n = signal.shape[0]
    first = 0
    while first < n and not abs(signal[first]) > threshold:
        first += 1
    last = n - 1
    while last > first and not abs(signal[last]) > threshold:
        last -= 1
    return first, last


# ---------------------------------------------------------------------------
# Filterbank energies of frames: one compiled kernel, FFTs batched across frames
# ---------------------------------------------------------------------------
#
# fbank_norm, logmel_cmn and the MFCC baseline all compute "frames x window -> |rfft|^2 -> triangular
# filterbank".  numpy/scipy transform one frame at a time, which was most of the feature time; this kernel
# transforms FFT_LANES frames together, the frames being the innermost axis of every butterfly (so the compiler
# vectorises across frames), and sums only each filter's non-zero weights.  Everything is float64: fbank_norm's
# float32 result is the original float64 computation's (zero differing values over LibriSpeech-mini, tested).

FFT_LANES = 64  # frames per batch (measured best of 16-128): 2 work arrays of (nfft/2, 64) complex = 512 KiB in L2


@functools.lru_cache(maxsize=8)
def _fft_plan(nfft: int) -> tuple[np.ndarray, ...]:
    """Stockham plan of the complex FFT of nfft/2 points, plus the twiddles unpacking it into an nfft-point rfft.

    (radices, offsets, twiddles, unpack twiddles): stage s (radix p, after sub-transforms of size l) multiplies
    input t of butterfly j by w_(l p)^(j t), stored at offsets[s] + j p + t.
    """
    half, radices = nfft // 2, []
    rest = half
    for radix in (4, 2, 5):
        while rest > 1 and rest % radix == 0:
            radices.append(radix)
            rest //= radix
    if nfft < 2 or nfft % 2 or rest != 1:
        raise ValueError(f"FFT size {nfft} is not supported (the kernel needs 2 x 2^a x 5^b)")
    twiddles, offsets, size = [np.zeros(0, complex)], [0], 1
    for radix in radices:
        j, t = np.meshgrid(np.arange(size), np.arange(radix), indexing="ij")
        twiddles.append(pm.expi(-2.0 * np.pi * (j * t) / (size * radix)).ravel())  # portable: CPU-independent
        offsets.append(offsets[-1] + j.size)
        size *= radix
    plan = (np.array(radices, np.int64), np.array(offsets, np.int64), np.concatenate(twiddles),
            pm.expi(-2.0 * np.pi * np.arange(half + 1) / nfft))
    for array in plan:
        array.setflags(write=False)
    return plan


def _sparse_bands(filterbank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first bin, weight offsets, weights) of each column of a (bins, bands) filterbank: its weights from the
    first to the last non-zero one.  Skipping zero weights leaves the sums unchanged (powers are finite)."""
    starts, offsets, weights = [], [0], []
    for band in np.asarray(filterbank, dtype=np.float64).T:
        nonzero = np.flatnonzero(band)
        lo, hi = (nonzero[0], nonzero[-1] + 1) if nonzero.size else (0, 0)
        starts.append(lo)
        weights.append(band[lo:hi])
        offsets.append(offsets[-1] + hi - lo)
    sparse = (np.array(starts, np.int64), np.array(offsets, np.int64), np.concatenate(weights))
    for array in sparse:
        array.setflags(write=False)
    return sparse


# The butterflies take rows of lanes (one complex value per frame) and loop over the lanes: loops the compiler
# vectorises.  Complex (interleaved) rows, not separate real and imaginary ones: with half the pointers, LLVM
# vectorises the radix-5 loop too (3.5x faster than the scalar loop it made of the split version).


@_njit
def _radix2(x0, x1, y0, y1, w1):
    for b in range(x0.shape[0]):
        a1 = x1[b] * w1
        y0[b] = x0[b] + a1
        y1[b] = x0[b] - a1


@_njit
def _radix4(x0, x1, x2, x3, y0, y1, y2, y3, w1, w2, w3):
    for b in range(x0.shape[0]):
        a0, a1, a2, a3 = x0[b], x1[b] * w1, x2[b] * w2, x3[b] * w3
        s02, d02, s13, d13 = a0 + a2, a0 - a2, a1 + a3, a1 - a3
        y0[b] = s02 + s13
        y1[b] = complex(d02.real + d13.imag, d02.imag - d13.real)  # d02 - i d13
        y2[b] = s02 - s13
        y3[b] = complex(d02.real - d13.imag, d02.imag + d13.real)  # d02 + i d13


# portable_math, not numpy: numpy's float64 sin/cos differ in the last bit between CPUs (docs/reproducibility.md)
_COS1, _COS2 = float(pm.cos(2 * np.pi / 5)), float(pm.cos(4 * np.pi / 5))
_SIN1, _SIN2 = float(pm.sin(2 * np.pi / 5)), float(pm.sin(4 * np.pi / 5))


@_njit
def _radix5(x0, x1, x2, x3, x4, y0, y1, y2, y3, y4, w1, w2, w3, w4):
    for b in range(x0.shape[0]):
        a0, a1, a2, a3, a4 = x0[b], x1[b] * w1, x2[b] * w2, x3[b] * w3, x4[b] * w4
        p14, m14, p23, m23 = a1 + a4, a1 - a4, a2 + a3, a2 - a3
        c1 = a0 + _COS1 * p14 + _COS2 * p23
        c2 = a0 + _COS2 * p14 + _COS1 * p23
        s1 = _SIN1 * m14 + _SIN2 * m23
        s2 = _SIN2 * m14 - _SIN1 * m23
        y0[b] = a0 + p14 + p23
        y1[b] = complex(c1.real + s1.imag, c1.imag - s1.real)  # c1 - i s1
        y2[b] = complex(c2.real + s2.imag, c2.imag - s2.real)
        y3[b] = complex(c2.real - s2.imag, c2.imag + s2.real)  # c2 + i s2
        y4[b] = complex(c1.real - s1.imag, c1.imag + s1.real)


@_njit
def _fft_lanes(z, work, radices, offsets, twiddles):
    """Complex FFT along axis 0 of an (n, lanes) array, one transform per lane (column); Stockham autosort, so the
    two buffers alternate and no bit reversal is needed.  Returns the buffer holding the result.

    Stage s combines `radix` transforms of `size` points into one of size * radix: output point j + q size of
    transform k is sum_t w_radix^(q t) w_(size radix)^(j t) x_t, x_t = point j of input transform k + t count.
    """
    size, count = 1, z.shape[0]
    src, dst = z, work
    for s in range(radices.shape[0]):
        radix = radices[s]
        count //= radix
        span = count * size  # between the inputs of one butterfly
        for j in range(size):
            w = offsets[s] + j * radix
            for k in range(count):
                i, q = j + k * size, j + k * size * radix
                if radix == 4:
                    _radix4(src[i], src[i + span], src[i + 2 * span], src[i + 3 * span],
                            dst[q], dst[q + size], dst[q + 2 * size], dst[q + 3 * size],
                            twiddles[w + 1], twiddles[w + 2], twiddles[w + 3])
                elif radix == 2:
                    _radix2(src[i], src[i + span], dst[q], dst[q + size], twiddles[w + 1])
                else:
                    _radix5(src[i], src[i + span], src[i + 2 * span], src[i + 3 * span], src[i + 4 * span],
                            dst[q], dst[q + size], dst[q + 2 * size], dst[q + 3 * size], dst[q + 4 * size],
                            twiddles[w + 1], twiddles[w + 2], twiddles[w + 3], twiddles[w + 4])
        size *= radix
        src, dst = dst, src
    return src


@_njit
def _sample(signal, i, emphasis):
    """signal[i], or its pre-emphasis (python_speech_features': the first sample unchanged) if emphasis != 0."""
    if emphasis == 0 or i == 0:
        return signal[i]
    return signal[i] - emphasis * signal[i - 1]


@_njit
def _band_energies_kernel(signal, emphasis, start, step, frame_len, window, nfft, radices, offsets, twiddles,
                          unpack, starts, woffsets, weights, out):
    """out[t, j] = sum_k weights_j[k] |rfft(frame_t * window, nfft)[k]|^2, frame t = x[start + t step :][:
    frame_len], samples outside the signal being zeros (frames longer than nfft are cut, as rfft does).
    x = the signal, or its pre-emphasis x[i] - emphasis x[i - 1] (in the signal's dtype) if emphasis != 0.
    Each frame's arithmetic is the same wherever it sits in a batch, so results never depend on how a signal was
    split into calls."""
    count, n = out.shape[0], signal.shape[0]
    used = min(frame_len, nfft)
    half = nfft // 2
    lanes = FFT_LANES
    z = np.empty((half, lanes), np.complex128)
    work = np.empty((half, lanes), np.complex128)
    power = np.empty((half + 1, lanes))
    acc = np.empty(lanes)
    for first in range(0, count, lanes):
        rows = min(lanes, count - first)
        z[used // 2:] = 0.0  # zero padding to nfft (the FFT used z as a buffer): rows the frames never fill
        if rows < lanes:
            z[:, rows:] = 0.0  # the unused lanes of the last batch
        for b in range(rows):  # rfft of n real points = FFT of n/2 complex ones (even + i odd samples)
            base = start + (first + b) * step
            if base >= 0 and base + used <= n:
                for i in range(used // 2):
                    z[i, b] = complex(np.float64(_sample(signal, base + 2 * i, emphasis)) * window[2 * i],
                                      np.float64(_sample(signal, base + 2 * i + 1, emphasis)) * window[2 * i + 1])
                if used & 1:
                    z[used // 2, b] = np.float64(_sample(signal, base + used - 1, emphasis)) * window[used - 1]
            else:  # a frame reaching past either end: zeros there
                z[: (used + 1) // 2, b] = 0.0
                for i in range(max(0, -base), min(used, n - base)):
                    v = np.float64(_sample(signal, base + i, emphasis)) * window[i]
                    old = z[i >> 1, b]
                    z[i >> 1, b] = complex(old.real, v) if i & 1 else complex(v, old.imag)
        spectrum = _fft_lanes(z, work, radices, offsets, twiddles)
        for k in range(half + 1):  # rfft bin k = E + w^k O from bins k and half - k (E, O: even, odd samples)
            za, zc, w = spectrum[k % half], spectrum[(half - k) % half], unpack[k]
            for b in range(lanes):
                er = 0.5 * (za[b].real + zc[b].real)
                ei = 0.5 * (za[b].imag - zc[b].imag)
                orr = 0.5 * (za[b].imag + zc[b].imag)
                oi = -0.5 * (za[b].real - zc[b].real)
                xr = er + (orr * w.real - oi * w.imag)
                xi = ei + (orr * w.imag + oi * w.real)
                power[k, b] = xr * xr + xi * xi
        for j in range(starts.shape[0]):
            acc[:] = 0.0
            for q in range(woffsets[j], woffsets[j + 1]):
                k = starts[j] + q - woffsets[j]
                w = weights[q]
                for b in range(lanes):
                    acc[b] += w * power[k, b]
            for b in range(rows):
                out[first + b, j] = acc[b]


def _band_energies(signal: np.ndarray, start: int, count: int, step: int, window: np.ndarray, nfft: int,
                   bands, emphasis: float = 0.0) -> np.ndarray:
    """(count, bands) float64 filterbank energies (``bands``: _sparse_bands) of |rfft(frame * window, nfft)|^2 for
    the frames of len(window) samples every ``step`` from ``start`` (negative: zeros before the signal), zero-padded
    past its end, of the signal or (``emphasis`` != 0) its pre-emphasis.  No frame matrix is built."""
    out = np.empty((count, bands[0].shape[0]))
    if not _use_numba():
        return _band_energies_numpy(signal, signal.dtype.type(emphasis), start, step, window, nfft, bands, out)
    _band_energies_kernel(signal, signal.dtype.type(emphasis), start, step, window.shape[0], window, nfft,
                          *_fft_plan(nfft), *bands, out)
    return out


NUMPY_BLOCK_FRAMES = 2048   # frames per numpy FFT block: (2048, 512) float64 frames = 8 MiB


@functools.lru_cache(maxsize=16)
def _dense_bands(bands_key: tuple, nbins: int) -> np.ndarray:
    starts, offsets, weights = (np.frombuffer(b, dtype) for b, dtype in zip(bands_key, (np.int64, np.int64, float)))
    dense = np.zeros((nbins, starts.shape[0]))
    for j in range(starts.shape[0]):
        dense[starts[j]:starts[j] + offsets[j + 1] - offsets[j], j] = weights[offsets[j]:offsets[j + 1]]
    dense.setflags(write=False)
    return dense


def _band_energies_numpy(signal, emphasis, start, step, window, nfft, bands, out) -> np.ndarray:
    """What _band_energies_kernel computes, with numpy: frames (zeros outside the signal; pre-emphasis in the
    signal's dtype, the first sample unchanged) x window in float64, |rfft|^2, dense filterbank product."""
    frame_len, n = window.shape[0], signal.shape[0]
    used = min(frame_len, nfft)
    if emphasis != 0:
        x = np.empty_like(signal)
        if n:
            x[0] = signal[0]
            np.subtract(signal[1:], emphasis * signal[:-1], out=x[1:])
    else:
        x = signal
    # Pad so that every frame lies inside: `before` zeros for a negative start, enough after for the last frame.
    before = max(0, -start)
    after = max(0, start + (out.shape[0] - 1) * step + used - n)
    padded = np.concatenate([np.zeros(before, x.dtype), x, np.zeros(after, x.dtype)]) if before or after else x
    dense = _dense_bands(tuple(np.ascontiguousarray(b).tobytes() for b in bands), nfft // 2 + 1)
    win = np.asarray(window[:used], dtype=np.float64)
    for first in range(0, out.shape[0], NUMPY_BLOCK_FRAMES):
        count = min(NUMPY_BLOCK_FRAMES, out.shape[0] - first)
        offsets = before + start + (first + np.arange(count)) * step
        frames = padded[offsets[:, None] + np.arange(used)].astype(np.float64) * win
        spectrum = np.fft.rfft(frames, nfft)
        power = spectrum.real ** 2 + spectrum.imag ** 2
        np.matmul(power, dense, out=out[first:first + count])
    return out


_EPS = float(np.finfo(np.float64).eps)  # python_speech_features' stand-in for zero energies
_PAIRWISE_BLOCK = 128  # numpy sums up to 128 values with 8 interleaved partial sums (PW_BLOCKSIZE)


@_njit
def _pairwise_sum(x, n):
    """sum(x[:n]) for n <= 128 in numpy's order (np.sum / np.mean of a short row), so results are bit-equal."""
    if n < 8:
        total = 0.0
        for i in range(n):
            total += x[i]
        return total
    r0, r1, r2, r3, r4, r5, r6, r7 = x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]
    i = 8
    while i < n - n % 8:
        r0, r1, r2, r3 = r0 + x[i], r1 + x[i + 1], r2 + x[i + 2], r3 + x[i + 3]
        r4, r5, r6, r7 = r4 + x[i + 4], r5 + x[i + 5], r6 + x[i + 6], r7 + x[i + 7]
        i += 8
    total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        total += x[i]
        i += 1
    return total


@_njit
def _normalize_rows_kernel(feat, out):
    """out = float32 of each row's (v - mean) / max(std, 1e-12), zeros replaced by float64 eps first: the original
    per-frame loop (np.mean, np.std) with numpy's exact operations and summation order."""
    n = feat.shape[1]
    squares = np.empty(n)
    for t in range(feat.shape[0]):
        row = feat[t]
        for i in range(n):
            if row[i] == 0.0:
                row[i] = _EPS
        mean = _pairwise_sum(row, n) / n
        for i in range(n):
            d = row[i] - mean
            squares[i] = d * d
        std = max(np.sqrt(_pairwise_sum(squares, n) / n), 1e-12)
        for i in range(n):
            out[t, i] = (row[i] - mean) / std

