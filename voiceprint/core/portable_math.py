"""exp, log, sin, cos and friends in float64 that give the same bits on every x86-64 CPU.

numpy picks the loop of a transcendental ufunc at run time from the CPU's SIMD extensions: on a CPU with
AVX-512, float64 ``exp``, ``log``, ``log2``, ``log10``, ``sin``, ``cos`` and ``power`` run Intel's SVML
kernels, elsewhere the C library's scalar functions; float32 ``exp``/``log``/``sin``/``cos`` and complex
multiplication and ``abs`` differ between AVX2 (with FMA) and plain SSE loops.  The results agree to 1-4 ulp,
not to the bit, so data synthesised from them differs from machine to machine (see docs/reproducibility.md).

These functions use only the operations IEEE 754 rounds exactly (``+ - * /``, ``floor``/``rint``,
``frexp``/``ldexp``), one numpy ufunc call each, so no SIMD width or fused multiply-add can change a bit:
range reduction and a fixed polynomial, evaluated in a fixed order.  Accuracy is within a few ulp of the
correctly rounded result (tests/test_reproducibility.py).  They take a dozen passes over the array where numpy
takes one, so they are many times slower per call; in the synthetic generator and the features that costs
1.3-1.7x the time per utterance (bench/portable_math_cost.py, docs/reproducibility.md).

Inputs are array-likes of real numbers; outputs are float64 arrays (0-d for scalars: use ``float(...)``).
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["complex_multiply", "cos", "exp", "exp2", "expi", "log", "log2", "log10", "power", "sin"]

# ln 2 split so that k * _LN2_HI is exact for |k| < 2^20 (fdlibm's constants).
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
# pi/2 in three parts of 33 bits each (fdlibm's pio2_1, pio2_2, pio2_3): k * part is exact for |k| < 2^20.
_PIO2_1 = 1.57079632673412561417e00
_PIO2_2 = 6.07710050630396597660e-11
_PIO2_3 = 2.02226624871116645580e-21
_TWO_OVER_PI = 6.36619772367581382433e-01
_SQRT_HALF = 0.70710678118654752440

# Taylor coefficients 1/n!, highest first (Horner): on the reduced ranges the truncation error is < 1e-17.
_EXP_COEFFS = tuple(1.0 / math.factorial(n) for n in range(14, -1, -1))  # |r| <= ln2/2
_SIN_COEFFS = tuple((-1.0) ** k / math.factorial(2 * k + 1) for k in range(10, -1, -1))  # in r^2, times r
_COS_COEFFS = tuple((-1.0) ** k / math.factorial(2 * k) for k in range(10, -1, -1))  # in r^2
# log(1 + f) = 2 atanh(s), s = f / (2 + f), |s| <= 0.1716: f - f^2/2 + s (f^2/2 + R), R = sum_k>=1 2 s^2k / (2k+1)
# (fdlibm's arrangement, which keeps the large terms exact).
_LOG_R_COEFFS = tuple(2.0 / (2 * k + 1) for k in range(13, 0, -1))  # in s^2, times s^2


def _horner(coeffs: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    result = np.full_like(x, coeffs[0])
    for c in coeffs[1:]:
        result *= x
        result += c
    return result


def _as_float64(x) -> np.ndarray:
    return np.array(x, dtype=np.float64)  # always a copy: the functions work in place on it


def _elementwise(fn):
    """Run ``fn`` on a 1-d copy of its float64 input (numpy's frexp and masks need at least one dimension) and
    give the result the input's shape."""
    @functools.wraps(fn)
    def wrapper(x):
        x = _as_float64(x)
        return fn(x.reshape(-1)).reshape(x.shape)
    return wrapper


@_elementwise
def exp(x) -> np.ndarray:
    """e**x: x = k ln2 + r, |r| <= ln2/2, e**r by its Taylor polynomial, times 2**k (exact)."""
    nan = np.isnan(x)
    clipped = np.clip(np.where(nan, 0.0, x), -746.0, 710.0)  # beyond: 0 or inf, which ldexp gives for the clipped k
    k = np.rint(clipped * _INV_LN2)
    r = clipped - k * _LN2_HI
    r -= k * _LN2_LO
    with np.errstate(over="ignore"):
        result = np.ldexp(_horner(_EXP_COEFFS, r), k.astype(np.int32))
    result[nan] = np.nan
    return result


@_elementwise
def exp2(x) -> np.ndarray:
    """2**x."""
    nan = np.isnan(x)
    clipped = np.clip(np.where(nan, 0.0, x), -1076.0, 1025.0)
    k = np.rint(clipped)
    r = (clipped - k) * _LN2_HI  # |clipped - k| <= 1/2 is exact; ln2 in two parts keeps the product accurate
    r += (clipped - k) * _LN2_LO
    with np.errstate(over="ignore"):
        result = np.ldexp(_horner(_EXP_COEFFS, r), k.astype(np.int32))
    result[nan] = np.nan
    return result


@_elementwise
def log(x) -> np.ndarray:
    """Natural logarithm: x = m 2**e with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh((m - 1) / (m + 1)).
    log(0) = -inf, log(negative) = nan, log(inf) = inf (no warnings)."""
    m, e = np.frexp(x)
    small = m < _SQRT_HALF
    m[small] *= 2.0
    e = e.astype(np.float64)
    e[small] -= 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        f = m - 1.0  # exact (Sterbenz)
        s = f / (2.0 + f)
        z = s * s
        r = _horner(_LOG_R_COEFFS, z) * z
        half_f2 = 0.5 * f * f
        result = e * _LN2_HI - ((half_f2 - (s * (half_f2 + r) + e * _LN2_LO)) - f)
    result[x == 0.0] = -np.inf
    result[x < 0.0] = np.nan
    result[np.isnan(x)] = np.nan
    result[x == np.inf] = np.inf
    return result


def log2(x) -> np.ndarray:
    return log(x) * _INV_LN2


def log10(x) -> np.ndarray:
    return log(x) * (1.0 / math.log(10.0))  # a constant folded at import: math.log(10) is the same everywhere


def power(base, exponent) -> np.ndarray:
    """base**exponent for base > 0 (as exp(exponent log base); relative error ~ 1e-16 |exponent log base|)."""
    return exp(_as_float64(exponent) * log(base))


def _reduce_quarter_pi(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(r, quadrant): x = r + quadrant pi/2, |r| <= pi/4 (Cody-Waite: accurate for |x| < 2^20 pi/2)."""
    k = np.rint(x * _TWO_OVER_PI)
    r = x - k * _PIO2_1
    r -= k * _PIO2_2
    r -= k * _PIO2_3
    return r, np.mod(k, 4.0).astype(np.int8)


def _sin_cos_reduced(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r2 = r * r
    return _horner(_SIN_COEFFS, r2) * r, _horner(_COS_COEFFS, r2)


@_elementwise
def sin(x) -> np.ndarray:
    r, quadrant = _reduce_quarter_pi(x)
    s, c = _sin_cos_reduced(r)
    return np.choose(quadrant, (s, c, -s, -c))


@_elementwise
def cos(x) -> np.ndarray:
    r, quadrant = _reduce_quarter_pi(x)
    s, c = _sin_cos_reduced(r)
    return np.choose(quadrant, (c, -s, -c, s))


def expi(x) -> np.ndarray:
    """exp(i x) = cos x + i sin x, complex128 (numpy's complex exp calls the C library, whose sin/cos have FMA
    and non-FMA variants)."""
    x = _as_float64(x)
    r, quadrant = _reduce_quarter_pi(x.reshape(-1))
    s, c = _sin_cos_reduced(r)
    out = np.empty(x.shape, np.complex128)
    out.real = np.choose(quadrant, (c, -s, -c, s)).reshape(x.shape)
    out.imag = np.choose(quadrant, (s, c, -s, -c)).reshape(x.shape)
    return out


def complex_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a * b for complex arrays (b may be real), rounded after each real product and sum: numpy's complex
    multiply fuses them (FMA) on CPUs with AVX2, so its last bit depends on the CPU.  Result in a's and b's
    common type."""
    a, b = np.asarray(a), np.asarray(b)
    out = np.empty(np.broadcast_shapes(a.shape, b.shape), np.result_type(a, b))
    if not np.iscomplexobj(b):  # (x + iy) b = xb + iyb: no sums to fuse
        out.real = a.real * b
        out.imag = a.imag * b
        return out
    real = a.real * b.real
    real -= a.imag * b.imag
    imag = a.real * b.imag
    imag += a.imag * b.real
    out.real, out.imag = real, imag
    return out
