"""Where training runs: the tf.distribute strategy (``train.strategy``) and the precision (``train.mixed_precision``).

``auto``      one device, TensorFlow's default strategy: the default pipeline's results, bit for bit. Deliberately
              not "mirrored when several GPUs are present": a second GPU appearing would change results unasked.
``mirrored``  MirroredStrategy: synchronous data parallelism over all local GPUs, or over all logical CPU devices
              where there is no GPU (one CPU device unless the process split it, as the tests do).
``multi_worker`` MultiWorkerMirroredStrategy over the cluster in the ``TF_CONFIG`` environment variable; the chief
              (task type ``chief``, else worker 0) writes the outputs, the other workers write nothing.

The global batch stays the param (``softmax.batch_size``, P x K for the triplet loss) and is split across the
replicas. Create the distribution right after :func:`voiceprint.core.runtime.configure_tensorflow` and before any other
TensorFlow op: MultiWorkerMirroredStrategy configures the runtime and fails once it is initialised.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from voiceprint.core.errors import DataError

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "mirrored", "multi_worker")
TASK_TYPES = ("chief", "worker")        # the roles MultiWorkerMirroredStrategy knows (no parameter servers)
TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}')


@dataclass(frozen=True)
class Distribution:
    """A strategy with the precision training runs in and whether this process writes the outputs."""
    strategy: object                    # tf.distribute.Strategy
    name: str = "auto"
    precision: str = "float32"          # "float32" | "mixed_float16" | "mixed_bfloat16"
    is_chief: bool = True

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    @property
    def trains_a_copy(self) -> bool:
        """Whether training needs its own copy of the model, built in the strategy's scope in its precision
        (see voiceprint.training.fit); ``auto`` in float32 trains the model itself, exactly as before strategies."""
        return self.name != "auto" or self.precision != "float32"


def local() -> Distribution:
    """One device, float32: what training uses when no distribution is given."""
    import tensorflow as tf

    return Distribution(tf.distribute.get_strategy())


def read_tf_config(environ=None) -> tuple[dict, str, int]:
    """``(cluster, task type, task index)`` from the ``TF_CONFIG`` environment variable, validated."""
    raw = (os.environ if environ is None else environ).get("TF_CONFIG", "")
    if not raw.strip():
        raise DataError("train.strategy multi_worker needs the TF_CONFIG environment variable (JSON describing "
                        f"the cluster and this process's task), e.g. TF_CONFIG='{TF_CONFIG_EXAMPLE}'")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"TF_CONFIG is not valid JSON ({exc}); expected e.g. {TF_CONFIG_EXAMPLE}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    if (not isinstance(cluster, dict) or not cluster or set(cluster) - set(TASK_TYPES)
            or any(not isinstance(hosts, list) or not hosts
                   or any(not isinstance(h, str) or ":" not in h for h in hosts) for hosts in cluster.values())):
        raise DataError(f'TF_CONFIG "cluster" must map {" and/or ".join(TASK_TYPES)} to lists of "host:port" '
                        f"addresses; got {cluster!r}")
    if len(cluster.get("chief", [])) > 1:
        raise DataError(f'TF_CONFIG "cluster": at most one chief, got {cluster["chief"]!r}')
    task = config.get("task")
    kind = task.get("type") if isinstance(task, dict) else None
    index = task.get("index") if isinstance(task, dict) else None
    if kind not in cluster or isinstance(index, bool) or not isinstance(index, int) \
            or not 0 <= index < len(cluster[kind]):
        raise DataError(f'TF_CONFIG "task" must name a task of the cluster ({", ".join(cluster)}) and a valid '
                        f"index, e.g. {{\"type\": \"worker\", \"index\": 0}}; got {task!r}")
    return cluster, kind, index


def is_chief(cluster: dict, task_type: str, index: int) -> bool:
    """TensorFlow's convention: the chief task if the cluster has one, else worker 0."""
    return task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in cluster)


# CPU features with native bfloat16 arithmetic (x86 AVX512-BF16 / AMX, Arm BF16), as /proc/cpuinfo names them.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing: other systems get float32)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def resolve_precision(mixed_precision: bool, *, gpus: int, flags: set[str] | None = None) -> str:
    """The compute precision for ``train.mixed_precision``: ``mixed_float16`` on a GPU (with loss scaling);
    ``mixed_bfloat16`` on a CPU with native bfloat16 arithmetic (1.4x faster training steps here; bfloat16 has
    float32's range, so no loss scaling); elsewhere the request is ignored with a message (emulated half precision
    is slower than float32 on CPUs, so it would only cost time and accuracy)."""
    if not mixed_precision:
        return "float32"
    if gpus:
        return "mixed_float16"
    flags = cpu_flags() if flags is None else flags
    if flags & set(BF16_CPU_FLAGS):
        return "mixed_bfloat16"
    logger.warning("train.mixed_precision: true is ignored: no GPU and no CPU bfloat16 support here, training runs "
                   "in float32")
    return "float32"


def make_distribution(strategy: str, *, mixed_precision: bool = False) -> Distribution:
    """The distribution ``train.strategy`` names (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise DataError(f"train.strategy: must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    import tensorflow as tf

    precision = resolve_precision(mixed_precision, gpus=len(tf.config.list_physical_devices("GPU")))
    if strategy == "auto":
        distribution = Distribution(tf.distribute.get_strategy(), strategy, precision)
    elif strategy == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        distribution = Distribution(tf.distribute.MirroredStrategy(devices=[d.name for d in devices]), strategy,
                                    precision)
    else:
        cluster, task_type, index = read_tf_config()
        distribution = Distribution(tf.distribute.MultiWorkerMirroredStrategy(), strategy, precision,
                                    is_chief=is_chief(cluster, task_type, index))
    # Results depend on the precision actually used (mixed_precision resolves per machine): say it in the log.
    logger.info("training: strategy %s, %d replica(s), %s", strategy, distribution.replicas, precision)
    return distribution
