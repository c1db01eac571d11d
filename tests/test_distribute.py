"""Strategies and precision: TF_CONFIG validation, mirrored training over two logical CPUs matching one device,
a two-worker run on localhost writing one model, mixed precision's float32 output."""
import json
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from tests.test_resume import stage_env, write_stage_params, write_tiny_inputs
from voiceprint.core.contracts import SoftmaxSettings
from voiceprint.training.distribute import (Distribution, cpu_flags, is_chief, make_distribution, read_tf_config,
                                            resolve_precision)
from voiceprint.core.runtime import configure_tensorflow

# --- TF_CONFIG and precision ---

CLUSTER = {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]}


def test_tf_config_is_validated_with_errors_naming_it():
    cluster, task_type, index = read_tf_config(
        {"TF_CONFIG": json.dumps({"cluster": CLUSTER, "task": {"type": "worker", "index": 1}})})
    assert (cluster, task_type, index) == (CLUSTER, "worker", 1)
    with pytest.raises(ValueError, match="multi_worker needs the TF_CONFIG environment variable"):
        read_tf_config({})
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        read_tf_config({"TF_CONFIG": "{cluster: 1}"})
    for bad_cluster in ({}, {"ps": ["h:1"]}, {"worker": []}, {"worker": ["no-port"]}, {"worker": "h:1"}):
        with pytest.raises(ValueError, match='TF_CONFIG "cluster" must map chief and/or worker'):
            read_tf_config({"TF_CONFIG": json.dumps({"cluster": bad_cluster, "task": {"type": "worker",
                                                                                      "index": 0}})})
    for bad_task in (None, {"type": "chief", "index": 0}, {"type": "worker", "index": 2},
                     {"type": "worker", "index": True}, {"type": "worker"}):
        with pytest.raises(ValueError, match='TF_CONFIG "task" must name a task of the cluster'):
            read_tf_config({"TF_CONFIG": json.dumps({"cluster": CLUSTER, "task": bad_task})})


def test_the_chief_writes():
    assert is_chief(CLUSTER, "worker", 0) and not is_chief(CLUSTER, "worker", 1)
    with_chief = {"chief": ["h:1"], **CLUSTER}
    assert is_chief(with_chief, "chief", 0) and not is_chief(with_chief, "worker", 0)


def test_precision_and_strategy_names(caplog):
    assert resolve_precision(False, gpus=1) == "float32"
    assert resolve_precision(True, gpus=1) == "mixed_float16"
    assert resolve_precision(True, gpus=1, flags={"avx512_bf16"}) == "mixed_float16"     # a GPU wins
    assert resolve_precision(True, gpus=0, flags={"avx512_bf16", "avx512f"}) == "mixed_bfloat16"
    assert resolve_precision(True, gpus=0, flags={"amx_bf16"}) == "mixed_bfloat16"
    assert resolve_precision(False, gpus=0, flags={"avx512_bf16"}) == "float32"
    assert resolve_precision(True, gpus=0, flags={"avx2", "fma"}) == "float32"
    assert "train.mixed_precision: true is ignored: no GPU and no CPU bfloat16 support" in caplog.text
    with pytest.raises(ValueError, match="train.strategy: must be one of auto, mirrored, multi_worker; got 'tpu'"):
        make_distribution("tpu")
    local = make_distribution("auto")
    assert (local.name, local.replicas, local.precision, local.is_chief, local.trains_a_copy) == \
        ("auto", 1, "float32", True, False)


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(str(cpuinfo)) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == set()


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_half_convolutions_and_saves_a_float32_model(tmp_path, monkeypatch, precision):
    """The mixed-precision paths (float16 is taken on GPUs only, but its kernels exist on CPU too, slowly):
    convolutions in half precision, everything from the pooling on in float32, loss scaling for float16 only,
    float32 file."""
    import keras
    import tensorflow as tf

    import voiceprint.training.fit as training

    store, split = write_tiny_inputs(tmp_path)
    configure_tensorflow(3)
    copies, make_copy = [], training._training_copy
    monkeypatch.setattr(training, "_training_copy", lambda *args: copies.append(make_copy(*args)) or copies[-1])
    mixed = Distribution(tf.distribute.get_strategy(), "auto", precision)
    trained = training.train_softmax(store, split, SoftmaxSettings(epochs=1, batch_size=4, lr=1e-3, seed=3,
                                                                   filters=[4, 8, 8, 8], blocks=1, embedding_dim=8,
                                                                   frames=32, dropout=0.1),
                                     verbose=0, distribution=mixed)
    trainer = copies[0]
    policies = {layer.name: layer.dtype_policy.name for layer in trainer.layers}
    assert policies["conv4-s1"] == policies["res1_0_branch_2a_bn"] == precision
    assert {policies[name] for name in training.FLOAT32_LAYERS if name in policies} == {"float32"}
    assert trainer.output.dtype == "float32"
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer) == (precision == "mixed_float16")
    assert np.isfinite(trained.history.loss).all()
    assert {layer.dtype_policy.name for layer in trained.model.layers} == {"float32"}     # what is saved
    np.testing.assert_array_equal(trained.model.get_weights()[0], trainer.get_weights()[0])


# --- mirrored over two logical CPU devices vs one device ---

MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from voiceprint.training.distribute import make_distribution
    from voiceprint.core.runtime import configure_tensorflow
    from voiceprint.data.splits import read_split
    from voiceprint.data.store import FeatureStore
    from voiceprint.core.contracts import SoftmaxSettings, TripletSettings
    from voiceprint.training.fit import train_softmax, train_triplet

    softmax, triplet = SoftmaxSettings(**json.loads(sys.argv[1])), TripletSettings(**json.loads(sys.argv[2]))
    store = FeatureStore.open("data/features")
    split, _ = read_split("data/model_inputs")
    curves = {}
    for strategy in ("auto", "mirrored"):
        configure_tensorflow(5)
        distribution = make_distribution(strategy)
        pretrained = train_softmax(store, split, softmax, distribution=distribution, verbose=0)
        if strategy == "auto":      # the triplet stage of both starts from the same weights
            start = pretrained.model.get_weights()
        pretrained.model.set_weights(start)
        tuned = train_triplet(pretrained.model, store, split, triplet, distribution=distribution, verbose=0)
        curves[strategy] = {"replicas": distribution.replicas, "softmax": pretrained.history.to_dict("list"),
                            "triplet": tuned.history.to_dict("list")}
    print("CURVES" + json.dumps(curves))
""")


def test_mirrored_over_two_cpus_gives_the_loss_curves_of_one_device(tmp_path):
    """Same seed and data; dropout 0 (each replica draws its own dropout masks); the triplet stage of both
    starts from the same weights. BatchNormalization is synchronised and triplet negatives are mined over the
    gathered global batch, so only the float summation order differs, which Adam amplifies over the steps of a
    model this small: measured up to 9e-4 relative (1 or 2 threads), hence a tolerance of 2e-3 relative.
    Without the gathering (mining within each replica's half) the triplet loss differs by far more."""
    write_tiny_inputs(tmp_path)
    softmax = dict(filters=[4, 8, 8, 8], blocks=1, embedding_dim=8, frames=32, epochs=2, batch_size=4, lr=1e-3,
                   dropout=0.0, seed=5)
    triplet = dict(alpha=0.5, epochs=2, steps_per_epoch=2, speakers_per_batch=2, utterances_per_speaker=2,
                   frames=32, lr=1e-3, seed=1)
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, json.dumps(softmax), json.dumps(triplet)],
                          cwd=tmp_path, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curves = json.loads(proc.stdout.split("CURVES", 1)[1])
    one, two = curves["auto"], curves["mirrored"]
    assert (one["replicas"], two["replicas"]) == (1, 2)
    for stage in ("softmax", "triplet"):
        for column in ("loss", "val_loss"):
            np.testing.assert_allclose(two[stage][column], one[stage][column], rtol=2e-3, err_msg=f"{stage} {column}")
    assert two["softmax"]["accuracy"] == one["softmax"]["accuracy"]


# --- two workers on localhost ---

def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run_workers(stage: str, roots, ports) -> None:
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    procs = [subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=stage_env(TF_CONFIG=json.dumps({"cluster": cluster,
                                                                   "task": {"type": "worker", "index": i}})))
             for i, root in enumerate(roots)]
    try:
        outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for i, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"worker {i} of stage {stage}:\n{output[-3000:]}"


def test_two_workers_on_localhost_train_and_only_the_chief_writes(tmp_path):
    """Two processes with TF_CONFIG, each in its own directory (two machines without a shared filesystem;
    the softmax model is copied to the second for the triplet stage). Dropout 0, so the chief's curve is the
    one-device curve up to float summation order (tolerance as in the mirrored test)."""
    softmax = dict(filters=[4, 8, 8, 8], blocks=1, embedding_dim=8, frames=32, epochs=2, batch_size=4,
                   dropout=0.0, seed=5)
    triplet = dict(epochs=1, steps_per_epoch=2, speakers_per_batch=2, utterances_per_speaker=2, frames=32)
    roots = [tmp_path / "chief", tmp_path / "worker"]
    for root in roots:
        store, split = write_tiny_inputs(root)
        write_stage_params(root, softmax=softmax, triplet=triplet, train={"strategy": "multi_worker"})

    _run_workers("softmax", roots, _free_ports(2))
    chief, worker = roots
    assert (chief / "models/softmax.keras").is_file() and (chief / "metrics/softmax.json").is_file()
    assert not any((worker / name).exists() for name in ("models", "plots", "metrics"))
    assert not (chief / "models/resume").exists()
    history = pd.read_csv(chief / "plots/softmax.csv")
    assert list(history.epoch) == [1, 2]

    from voiceprint.training.fit import train_softmax

    configure_tensorflow(5)
    one_device = train_softmax(store, split, SoftmaxSettings(lr=1e-3, **softmax), verbose=0).history
    np.testing.assert_allclose(history.loss, one_device.loss, rtol=2e-3)     # as mirrored vs one device

    (worker / "models").mkdir()
    (worker / "models/softmax.keras").write_bytes((chief / "models/softmax.keras").read_bytes())
    _run_workers("triplet", roots, _free_ports(2))
    assert (chief / "models/triplet.keras").is_file() and not (worker / "models/triplet.keras").exists()
    assert len(pd.read_csv(chief / "plots/triplet.csv")) == 1


def test_multi_worker_without_tf_config_fails_naming_it(tmp_path):
    write_tiny_inputs(tmp_path)
    write_stage_params(tmp_path, train={"strategy": "multi_worker"})
    env = stage_env()
    env.pop("TF_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "stages.softmax"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert "error: stage softmax: train.strategy multi_worker needs the TF_CONFIG environment variable" in \
        proc.stderr


def _gpus() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


@pytest.mark.skipif(_gpus() == 0, reason="needs a GPU (the stage uses mixed precision on GPUs only)")
def test_on_a_gpu_mixed_precision_trains_and_saves_float32(tmp_path):
    from voiceprint.training.fit import train_softmax

    store, split = write_tiny_inputs(tmp_path)
    configure_tensorflow(3)
    distribution = make_distribution("auto", mixed_precision=True)
    assert distribution.precision == "mixed_float16"
    trained = train_softmax(store, split, SoftmaxSettings(epochs=2, batch_size=4, lr=1e-3, seed=3,
                                                          filters=[4, 8, 8, 8], blocks=1, embedding_dim=8, frames=32,
                                                          dropout=0.1), verbose=0, distribution=distribution)
    assert np.isfinite(trained.history.loss).all()
    assert {layer.dtype_policy.name for layer in trained.model.layers} == {"float32"}
    assert make_distribution("mirrored").replicas == _gpus()
