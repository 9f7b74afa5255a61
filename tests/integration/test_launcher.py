"""The real launcher end to end: topology invariance, determinism, exact eval, TensorBoard,
and configuration errors. Runs are tiny (ResNet-8, 16 px, 8 steps of 16 images)."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing import event_accumulator

from launch import program as program_lib
from launch import train
from launch.status import ExitStatus
from pipeline import dataset as dataset_lib
from pipeline import records, transforms
from resnet import steps as steps_lib
from tests import helpers

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="module")
def runs(data, tiny_finished, tmp_path_factory):
    """The same config trained as 1 process x 4 devices (twice) and 2 processes x 2 devices."""
    root = tmp_path_factory.mktemp("runs")
    workdirs = {"a": tiny_finished}
    for name, processes, devices in [("b", 1, 4), ("c", 2, 2)]:
        workdir = str(root / name)
        run = helpers.launch(
            helpers.tiny_run_args(*data, workdir), processes=processes, devices=devices
        )
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        workdirs[name] = workdir
    return workdirs


def _scalars(workdir: str) -> event_accumulator.EventAccumulator:
    accumulator = event_accumulator.EventAccumulator(
        os.path.join(workdir, "tensorboard"),
        size_guidance={"scalars": 0, "images": 0, "tensors": 0},
    )
    accumulator.Reload()
    return accumulator


def test_same_config_and_seed_is_bit_identical(runs):
    a = helpers.flat_arrays(helpers.load_state(runs["a"], STEPS))
    b = helpers.flat_arrays(helpers.load_state(runs["b"], STEPS))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_two_hosts_match_one_host_with_the_same_devices(runs):
    """Same global batches, so the same training up to float summation order.

    The cross-process (gloo) all-reduce adds in another order than the in-process one: after
    one step parameters differ by about one ulp; small-batch BatchNorm training amplifies that
    to ~3e-4 (absolute, for parameters of order 1) by step 8. They are not bit-identical.
    """
    one = helpers.flat_arrays(helpers.load_state(runs["a"], STEPS))
    two = helpers.flat_arrays(helpers.load_state(runs["c"], STEPS))
    assert one.keys() == two.keys()
    for key in one:
        if not key.startswith("['opt_state']"):  # momentum of noisy gradients: looser still
            np.testing.assert_allclose(one[key], two[key], atol=3e-3, err_msg=key)
    loss = lambda w: [e.value for e in _scalars(w).Scalars("train/loss")]
    np.testing.assert_allclose(loss(runs["a"]), loss(runs["c"]), rtol=1e-3)
    assert len(loss(runs["a"])) == STEPS // 2


def test_tensorboard_has_every_tag(runs):
    tags = _scalars(runs["a"]).Tags()
    for tag in [
        "train/loss",
        "train/top1",
        "train/learning_rate",
        "train/images_per_second",
        "train/step_time",
        "train/data_wait_fraction",
        "eval/loss",
        "eval/top1",
        "eval/top5",
    ]:
        assert tag in tags["scalars"], tag
    assert "train/augmented_inputs" in tags["images"]
    assert any(t.startswith("config") for t in tags["tensors"])
    # Only process 0 writes events.
    files = os.listdir(os.path.join(runs["c"], "tensorboard"))
    assert len([f for f in files if "tfevents" in f]) == 1


def _direct_eval(workdir: str, eval_dir: str) -> dict:
    """Eval metrics computed the plain way: every image in one unpadded batch, numpy maths."""
    config = helpers.tiny_config("", "", **{"train.num_steps": STEPS})  # the runs' config
    make_model = lambda: program_lib.build_model(config, channels=1)
    tx, _ = program_lib.make_optimizer(config, steps_per_epoch=12, num_steps=STEPS)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        jax.eval_shape(lambda: steps_lib.init_state(make_model(), tx)[1]),
    )
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(
            os.path.join(workdir, "checkpoints", str(STEPS), "state"), abstract
        )
    info = dataset_lib.load_info(eval_dir)
    source = dataset_lib.grain.sources.ArrayRecordDataSource(list(info.shard_paths))
    examples = [records.decode_example(source[i]) for i in range(len(source))]
    images = np.stack(
        [transforms.center_crop(transforms.decode_image(e.image, 1), 16, 1, 1.0) for e in examples]
    )
    labels = np.array([e.label for e in examples])
    model = steps_lib.merge(nnx_graphdef(make_model), state.params, state.batch_stats)
    logits = np.asarray(
        model(
            steps_lib.normalize(
                jnp.asarray(images), config.data.mean, config.data.std, jnp.float32
            ),
            training=False,
        ),
        np.float64,
    )
    log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
    log_probs -= logits.max(1, keepdims=True)
    rank = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(1)
    return {
        "eval/loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
        "eval/top1": float((rank < 1).mean()),
        "eval/top5": float((rank < 5).mean()),
        "eval/count": float(len(labels)),
    }


def nnx_graphdef(make_model):
    from flax import nnx  # pylint: disable=g-import-not-at-top

    return nnx.graphdef(nnx.eval_shape(make_model))


@pytest.mark.parametrize("run", ["a", "c"])
def test_eval_counts_every_example_exactly_once(runs, data, run):
    reported = json.load(open(os.path.join(runs[run], train.FINISHED_MARKER)))["eval"]
    direct = _direct_eval(runs[run], data[1])
    assert reported["eval/count"] == direct["eval/count"] == 37
    for key in ["eval/loss", "eval/top1", "eval/top5"]:
        assert reported[key] == pytest.approx(direct[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.global_batch_size=18", "multiple of the number of devices, 4 (1 processes x"),
        ("train.global_batch_size=18", "nearest valid: 16 or 20"),
        ("train.global_batch_size=2", "nearest valid: 4"),
        ("train.foo=1", "--config.train.foo=1: the config has no field 'foo'"),
        ("train.num_epochs=abc", "num_epochs"),
        ("data.image_size=0", "config.data.image_size=0: must be a whole number >= 1"),
        ("data.train_dir=/nonexistent/train", "does not exist"),
    ],
)
def test_config_errors_are_clear_and_early(data, tmp_path, override, message):
    args = helpers.tiny_run_args(*data, str(tmp_path / "w")) + [f"--config.{override}"]
    run = helpers.launch(args, timeout=120)
    assert run.returncode == 2, run.stderr[-3000:]
    assert message in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) < 40
    assert not os.path.exists(tmp_path / "w" / "checkpoints")  # stopped before any set-up


def test_local_cluster_turns_ctrl_c_into_a_coordinated_stop(data, tmp_path):
    args = helpers.tiny_run_args(*data, str(tmp_path / "w"), **{"train.num_steps": 400})
    proc = helpers.start(args, processes=2, devices=2)
    seen = []
    assert helpers.wait_for_line(proc, "step 2/400", seen), "".join(seen)[-3000:]
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal delivers
    seen += proc.stdout.readlines()
    proc.wait(timeout=120)
    log = "".join(seen)
    assert proc.returncode == ExitStatus.PREEMPTED, log[-3000:]
    assert "exit statuses [75, 75]" in log and "Traceback" not in log
