#!/usr/bin/env bash
# The seed's scenario: the voiceprint runtime (`pip install .`, no extras) installed into an environment that
# already holds PyTorch, once with numpy 1.26 and once with numpy 2.x. For each: a fresh venv, torch==2.13.0 and
# numpy first, then the runtime; `pip check`; torch and numpy untouched by the runtime's install; torch and
# voiceprint used in one process; `voiceprint verify` of two files with the shipped model on ONNX Runtime.
#
#   bench/runtime_next_to_torch.sh [WORKDIR]        (PYTHON=python3.11 by default; takes minutes: it installs torch)
#
# torch==2.13.0 exactly: on these machines that spec resolves to a CPU wheel on local disk; any other torch spec
# downloads a CUDA build of several GB. A check script, not a CI test (it installs torch).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d -t voiceprint-torch.XXXXXX)}
PYTHON=${PYTHON:-python3.11}
SHARED=${VOICEPRINT_SHARED:-$REPO/../shared}
mkdir -p "$WORK"
echo "repo $REPO (commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')), work dir $WORK, $($PYTHON --version)"

run_case() {
    local tag=$1 numpy_spec=$2 venv="$WORK/venv-$1"
    echo
    echo "=== $tag: torch==2.13.0 + $numpy_spec, then pip install . (no extras)"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    local pip="$venv/bin/pip" py="$venv/bin/python"
    "$pip" install -q --disable-pip-version-check "torch==2.13.0" "$numpy_spec"
    local before after
    before=$("$pip" freeze | grep -iE '^(torch|numpy)==')
    "$pip" install -q --disable-pip-version-check "$REPO"
    after=$("$pip" freeze | grep -iE '^(torch|numpy)==')
    echo "torch/numpy before the runtime: $(echo $before); after: $(echo $after)"
    if [ "$before" != "$after" ]; then echo "FAIL: installing the runtime changed torch or numpy"; return 1; fi
    echo "--- pip check"
    "$pip" check
    echo "--- installed: $("$pip" freeze | grep -iE '^(numpy|torch|onnxruntime|numba|llvmlite|soundfile|soxr|scikit-learn|pandas|voiceprint)[=@ ]' | tr '\n' ' ')"
    if "$pip" freeze | grep -iqE '^(tensorflow|tensorflow-cpu|keras|dvc|numba|pandas)=='; then
        echo "FAIL: a pipeline package came with the runtime"; return 1
    fi
    echo "--- three files: real speech from ../shared when present, else voiced synthetic tones (numpy + soundfile)"
    (cd "$WORK" && "$py" - "$SHARED" <<'PY'
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

out = Path("audio")
out.mkdir(exist_ok=True)
root = Path(sys.argv[1]) / "data/librispeech-mini/LibriSpeech"
speakers = sorted(p for p in root.glob("*/*") if p.is_dir())[:2] if root.is_dir() else []
if len(speakers) == 2:
    first, second = (sorted(s.rglob("*.flac")) for s in speakers)
    picks = [first[0], first[1], second[0]]
    for name, src in zip(("a", "b", "c"), picks):
        (out / f"{name}.flac").write_bytes(src.read_bytes())
    print("real speech:", ", ".join(str(p.relative_to(root)) for p in picks))
else:
    rng = np.random.default_rng(0)
    t = np.arange(4 * 16000) / 16000
    for name, f0 in (("a", 120.0), ("b", 125.0), ("c", 210.0)):
        pitch = f0 * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)))
        phase = 2 * np.pi * np.cumsum(pitch) / 16000
        voice = sum(np.sin(k * phase) / k for k in range(1, 20))
        envelope = np.clip(np.sin(2 * np.pi * 1.5 * t), 0, None) ** 0.5
        y = 0.1 * voice * envelope + 0.003 * rng.normal(size=t.size)
        sf.write(out / f"{name}.flac", y.astype(np.float32), 16000)
    print("synthetic tones (no ../shared here)")
PY
    )
    local a="$WORK/audio/a.flac" b="$WORK/audio/b.flac" c="$WORK/audio/c.flac"
    echo "--- voiceprint verify a b (same speaker), a c (another), first calls in this venv"
    (cd "$WORK" && time "$venv/bin/voiceprint" verify "$a" "$b" --quiet)
    (cd "$WORK" && time "$venv/bin/voiceprint" verify "$a" "$c" --quiet --json)
    echo "--- torch and the runtime in one process"
    (cd "$WORK" && "$py" - "$a" "$b" <<'PY'
import sys

import numpy as np
import torch

from voiceprint import Recognizer

rec = Recognizer(backend="auto")
emb = torch.from_numpy(rec.embed_files(sys.argv[1:3]))
score = torch.nn.functional.cosine_similarity(emb[0:1], emb[1:2]).item()
heavy = sorted(m for m in ("tensorflow", "keras", "dvc", "numba") if m in sys.modules)
print(f"torch {torch.__version__}, numpy {np.__version__}, backend {rec.backend}, embeddings {tuple(emb.shape)}, "
      f"cosine via torch {score:.4f}, tensorflow/keras/dvc/numba imported: {heavy or 'none'}")
assert rec.backend == "onnx" and not heavy
PY
    )
    echo "=== $tag: OK"
}

run_case numpy1 "numpy==1.26.4"
run_case numpy2 "numpy>=2,<3"
echo
echo "ALL OK"
