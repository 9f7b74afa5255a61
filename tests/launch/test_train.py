"""The training function in-process (flax's train_test style): the loop, its structured
output, the plan's durations, configuration errors, and a hot loop with no hidden transfers.
These run in the pytest process (one CPU device); multi-device and multi-process behaviour is
in test_launcher.py and test_checkpointing.py."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import resnet50_imagenet
from launch import distributed, train
from launch import plan as plan_lib
from launch import program as program_lib
from launch.plan import ConfigError
from pipeline import dataset as dataset_lib
from resnet import steps as steps_lib
from tests import helpers


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_and_evaluate_runs_resumes_and_reports(data, tmp_path):
    workdir = str(tmp_path / "w")
    result = train.train_and_evaluate(helpers.tiny_config(*data), workdir)
    assert (result.outcome, result.step) == ("finished", 8)
    assert result.eval["eval/count"] == 37 and 0 <= result.eval["eval/top1"] <= 1
    records = _records(workdir)
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [8]
    startup = next(r for r in records if r["kind"] == "startup")
    # A fresh run builds its state ("init"); it restores nothing.
    assert {"startup/data_s", "startup/init_s", "startup/compile_s"} <= set(startup)
    assert "startup/restore_s" not in startup
    # Training began at the first step's dispatch; start-up ends when that step was done.
    with open(os.path.join(workdir, "events", "p0.jsonl")) as f:
        (event,) = [e for e in map(json.loads, f) if e["event"] == "startup"]
    assert event["training_since"] < event["first_step_done"] <= event["t"]
    assert event["figures"]["startup/first_step_s"] > 0
    finished = json.load(open(os.path.join(workdir, train.FINISHED_MARKER)))
    assert finished["eval"] == result.eval
    assert finished["data"]["train"] == {"path": data[0], "examples": 200, "classes": 10}
    again = train.train_and_evaluate(helpers.tiny_config(*data), workdir)
    assert again == result  # a finished run is recognised, not trained again
    assert _records(workdir) == records  # ... before compiling or logging anything


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.name": "resnet7"}, "config.model: unknown model 'resnet7'"),
        ({"model.max_pool": "scatter"}, "config.model: unknown max_pool 'scatter'"),
        ({"model.dtype": "float8"}, "config.model.dtype='float8': use one of float32"),
        ({"model.num_classes": 12}, "config.model.num_classes=12 but the training data"),
        ({"data.mean": (1.0, 2.0, 3.0)}, "config.data.mean has 3 values for images with 1"),
        ({"eval.every_steps": -1}, "config.eval.every_steps=-1: must be a whole number >= 0"),
        ({"train.stall_timeout_seconds": -1}, "config.train.stall_timeout_seconds=-1"),
    ],
)
def test_config_errors_name_the_field(data, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        train.train_and_evaluate(helpers.tiny_config(*data, **overrides), str(tmp_path / "w"))
    assert message in str(error.value)
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_train_and_eval_class_names_must_agree(data, tmp_path):
    renamed = str(tmp_path / "eval")
    import shutil  # pylint: disable=g-import-not-at-top

    shutil.copytree(data[1], renamed)
    path = os.path.join(renamed, "metadata.json")
    metadata = json.load(open(path))
    metadata["class_names"] = [f"digit {n}" for n in metadata["class_names"]]
    json.dump(metadata, open(path, "w"))
    with pytest.raises(ConfigError, match="class 0 is '0' in .* and 'digit 0' in"):
        train.train_and_evaluate(helpers.tiny_config(data[0], renamed), str(tmp_path / "w"))


def _info(num_examples: int) -> dataset_lib.DatasetInfo:
    return dataset_lib.DatasetInfo("/imagenet", num_examples, 1000, (), 3, ())


@pytest.mark.parametrize("batch, eval_every, save_every", [(1024, 6255, 1251), (2048, 3125, 625)])
def test_intervals_in_epochs_follow_the_batch_size(batch, eval_every, save_every):
    config = resnet50_imagenet.get_config()
    config.train.global_batch_size = batch
    assert plan_lib.make_plan(config, _info(1_281_167), None).save_every == plan_lib.AUTO_SAVES
    config.checkpoint.every_epochs = 1.0  # a fixed interval instead of the shipped "auto"
    plan = plan_lib.make_plan(config, _info(1_281_167), None)
    assert (plan.eval_every, plan.save_every) == (eval_every, save_every)
    config.eval.every_steps = 100  # steps, when given, win
    assert plan_lib.make_plan(config, _info(1_281_167), None).eval_every == 100


def test_the_hot_loop_makes_no_hidden_transfers(data):
    config = helpers.tiny_config(*data)
    program = program_lib.build_program(
        config, distributed.make_mesh(), channels=1, steps_per_epoch=12, num_steps=8
    )
    train_step = program.compile_train_step(16, 16)
    eval_step = program.compile_eval_step(16, 16)
    state = program.init()
    batch = jax.device_put(
        {"image": np.zeros((16, 16, 16, 1), np.uint8), "label": np.zeros(16, np.int32)},
        program.batch_sharding,
    )
    eval_batch = dict(batch, mask=jax.device_put(np.ones(16, np.float32), program.batch_sharding))
    votes, totals = program.stop_votes(False), program.zero_eval_totals()
    with jax.transfer_guard("disallow"):
        for _ in range(2):
            state, metrics = train_step(state, batch, votes)
        totals, stop = eval_step(state, eval_batch, totals, votes)
    assert int(metrics["stop"]) == 0 and float(totals["count"]) == 16


def test_the_program_traces_the_model_once_for_its_structure_and_state(data, monkeypatch):
    """build_program gets the graph definition from the same trace as the abstract state: it
    is the one nnx gives the model, and the model is built once."""
    config = helpers.tiny_config(*data)
    built = []
    make = program_lib.build_model
    monkeypatch.setattr(program_lib, "build_model", lambda *a: built.append(1) or make(*a))
    # Without a cache folder: nothing is read back (launch.executables.load_or_build).
    monkeypatch.setattr(program_lib.executables, "cache_folder", lambda: None)
    program = program_lib.build_program(config, distributed.make_mesh(), channels=1)
    assert len(built) == 1
    model = nnx.eval_shape(lambda: make(config, 1))
    assert program.graphdef == nnx.graphdef(model)
    params = nnx.state(model, nnx.Param)
    assert jax.tree.map(lambda x: x.shape, program.abstract_state.params) == jax.tree.map(
        lambda x: x.shape, params
    )


def test_nonfinite_update_is_skipped_and_counted():
    model = helpers.tiny_resnet(in_channels=1)
    schedule = steps_lib.learning_rate_schedule(0.1, 1, 10)
    tx = steps_lib.sgd_optimizer(schedule, momentum=0.9, nesterov=True, weight_decay=1e-4)
    graphdef, state = steps_lib.init_state(model, tx)
    step = jax.jit(
        steps_lib.make_train_step(
            graphdef,
            tx,
            schedule,
            mean=(0.0,),
            std=(0.0,),
            compute_dtype=jnp.float32,
            label_smoothing=0.0,
        )
    )
    batch = {"image": jnp.ones((4, 8, 8, 1), jnp.uint8), "label": jnp.arange(4)}
    new, metrics = step(state, batch)  # std 0: inf inputs, inf loss
    assert not np.isfinite(metrics["loss"])
    assert int(new.nonfinite_in_a_row) == 1 and int(new.nonfinite_total) == 1
    assert int(new.step) == 1
    for old_leaf, new_leaf in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(old_leaf, new_leaf)
