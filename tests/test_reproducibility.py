"""Cross-CPU reproducibility: the synthetic corpus and its features are the same bytes on every x86-64 CPU.

The md5s in PINNED were computed once and committed.  A machine on which numpy, BLAS, numba or the FLAC
encoder takes a code path that changes one bit fails here, loudly, instead of silently making a different
data/raw and so different everything downstream (docs/reproducibility.md).  A second test recomputes them with
numpy's SIMD dispatch switched off (NPY_DISABLE_CPU_FEATURES: baseline SSE loops instead of AVX2/AVX-512 ones)
and another OpenBLAS kernel (OPENBLAS_CORETYPE), which is what another CPU would run.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from voiceprint import features
from voiceprint.core import portable_math as pm
from voiceprint.data.corpus import synthetic

# path -> md5 of (FLAC file, logmel_cmn features, mfcc_stats vector, fbank_norm features): 2 speakers x 2
# utterances of 1-1.5 s, seed 2017.  Changed deliberately only with the corpus or the features (say so in the
# commit); never to make a machine pass.
PINNED = {
    "spk0000/spk0000-0000.flac": ("7b2d716b1d2552402ca3a89df9448cfa", "c25637d77927c21da7e0fac7860c7aa2",
                                  "03c2579b2c4f783cfabc3e03bc271147", "9f5622db37d2929889f0ada878822904"),
    "spk0000/spk0000-0001.flac": ("43cd5e0bd7a2afd3b7cbbd89421710da", "a7dc8503034e2b7439906c776270362b",
                                  "630b4276ee08cb793df6ce79d38a56ce", "78090fe2512cc4ca33bb27d98635c63f"),
    "spk0001/spk0001-0000.flac": ("4441f48a69f1b99f196bd77a0e2e3c70", "5a28d09c50e6a9a75e5787c50e9155da",
                                  "ad363e7cddd6fcc1510b88a8b1341edb", "8ea369af2bffc60d43ffd38950d2c823"),
    "spk0001/spk0001-0001.flac": ("cba060262866cd6d962f8435bd51ff2a", "689200c20dca3a901c0f010d5c6d44fe",
                                  "1bf0ba4784bc8684902552b38ba1584c", "842bba1777a5d5ef015da6a1a44b75e8"),
}


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def corpus_digests(out_dir) -> dict[str, list[str]]:
    """Generate the small corpus into ``out_dir`` and return path -> [md5 of the file, of its logmel_cmn
    features, of its mfcc_stats vector, of its fbank_norm features]."""
    manifest = synthetic.generate(out_dir, num_speakers=2, utterances_per_speaker=2, min_seconds=1.0,
                                  max_seconds=1.5, seed=2017)
    digests = {}
    for rel in manifest.path:
        path = Path(out_dir) / rel
        logmel, stats = features.featurize_file(path, "logmel_cmn")
        fbank, _ = features.featurize_file(path, "fbank_norm")
        digests[rel] = [_md5(path.read_bytes()), _md5(logmel.tobytes()), _md5(stats.tobytes()),
                        _md5(fbank.tobytes())]
    return digests


def _pinned() -> dict[str, list[str]]:
    return {path: list(md5s) for path, md5s in PINNED.items()}


def test_small_corpus_and_its_features_have_the_pinned_md5s(tmp_path):
    assert corpus_digests(tmp_path) == _pinned()


_EMULATE_OTHER_CPU = """
import json, sys
import numpy._core._multiarray_umath as umath
sys.path.insert(0, sys.argv[2])
from tests.test_reproducibility import corpus_digests
print(json.dumps({"dispatch_left": [f for f in umath.__cpu_dispatch__ if umath.__cpu_features__.get(f)],
                  "digests": corpus_digests(sys.argv[1])}))
"""


def test_same_md5s_with_numpy_simd_dispatch_off_and_another_blas_kernel(tmp_path):
    from numpy._core._multiarray_umath import __cpu_dispatch__

    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=" ".join(__cpu_dispatch__), OPENBLAS_CORETYPE="Nehalem")
    proc = subprocess.run([sys.executable, "-c", _EMULATE_OTHER_CPU, str(tmp_path), str(REPO)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dispatch_left"] == []  # numpy did run its baseline loops only
    assert result["digests"] == _pinned()


def _ulps(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(got - expected) / np.spacing(np.abs(expected))))


@pytest.mark.parametrize("name, low, high, max_ulps", [
    ("exp", -700.0, 700.0, 2), ("exp2", -1000.0, 1000.0, 2), ("sin", -50.0, 50.0, 3), ("cos", -50.0, 50.0, 3),
])
def test_portable_functions_are_within_a_few_ulps_of_numpy(name, low, high, max_ulps):
    x = np.random.default_rng(3).uniform(low, high, 20000)
    assert _ulps(getattr(pm, name)(x), getattr(np, name)(x)) <= max_ulps


@pytest.mark.parametrize("name, max_ulps", [("log", 2), ("log2", 3), ("log10", 4)])
def test_portable_logarithms_are_within_a_few_ulps_of_numpy(name, max_ulps):
    x = pm.exp(np.random.default_rng(4).uniform(-700.0, 700.0, 20000))
    x = np.concatenate([x, np.random.default_rng(5).uniform(0.5, 2.0, 20000)])  # near 1: relative accuracy
    assert _ulps(getattr(pm, name)(x), getattr(np, name)(x)) <= max_ulps


def test_portable_power_and_special_values():
    x = np.random.default_rng(6).uniform(-40.0, 40.0, 5000)
    assert _ulps(pm.power(10.0, x / 20.0), 10.0 ** (x / 20.0)) <= 8
    np.testing.assert_array_equal(pm.exp([0.0, np.inf, -np.inf, 800.0, -800.0]), [1.0, np.inf, 0.0, np.inf, 0.0])
    assert np.isnan(pm.exp(np.nan)) and np.isnan(pm.log(-1.0)) and np.isnan(pm.log(np.nan))
    np.testing.assert_array_equal(pm.log([0.0, 1.0, np.inf]), [-np.inf, 0.0, np.inf])
    assert pm.cos(0.0) == 1.0 and pm.sin(0.0) == 0.0 and pm.exp(np.zeros((2, 3))).shape == (2, 3)


def test_expi_is_cos_plus_i_sin():
    x = np.random.default_rng(8).uniform(-50.0, 50.0, 5000)
    z = pm.expi(x)
    np.testing.assert_array_equal(z.real, pm.cos(x))
    np.testing.assert_array_equal(z.imag, pm.sin(x))
    np.testing.assert_allclose(z, np.exp(1j * x), rtol=0, atol=4e-16)


def test_complex_multiply_rounds_each_term():
    rng = np.random.default_rng(7)
    a = rng.standard_normal(1000) + 1j * rng.standard_normal(1000)
    b = rng.standard_normal(1000) + 1j * rng.standard_normal(1000)
    got = pm.complex_multiply(a, b)
    np.testing.assert_array_equal(got.real, a.real * b.real - a.imag * b.imag)
    np.testing.assert_array_equal(got.imag, a.real * b.imag + a.imag * b.real)
    real = rng.standard_normal(1000).astype(np.float32)
    assert pm.complex_multiply(a.astype(np.complex64), real).dtype == np.complex64
    np.testing.assert_array_equal(pm.complex_multiply(a, real.astype(np.float64)), a * real.astype(np.float64))
