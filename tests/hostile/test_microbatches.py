"""The hostile suite, batch split side: bad train.microbatches and model.bn_group_size.

In-process rows run `train.train_and_evaluate` through `launch.main`'s one mapping of errors
to exit statuses (global batch 16, one device) and assert the exit status, the one `error:`
line naming the field, and that the user's workdir is unchanged. What depends on the number
of devices is checked by `plan.check_batch_split_over` directly, and once end to end on four
devices (slow).
"""

from __future__ import annotations

import pytest

from launch import plan
from launch.status import ExitStatus
from tests import helpers
from tests.hostile.harness import (
    assert_config_refused,
    assert_one_clear_line,
    tree_digest,
    user_workdir,
)

CASES = [
    # (overrides, the start of the error line)
    ({"train.microbatches": 0}, "config.train.microbatches=0: must be a whole number >= 1"),
    ({"train.microbatches": 3}, "config.train.microbatches=3: must divide train.global_batch_size"),
    ({"model.bn_group_size": -4}, "config.model.bn_group_size=-4: must be a whole number >= 0"),
    ({"model.bn_group_size": 3}, "config.model.bn_group_size=3: must divide the micro-batch of 16"),
    (
        {"train.microbatches": 4, "model.bn_group_size": 8},
        "config.model.bn_group_size=8: must divide the micro-batch of 4",
    ),
    (
        {"model.bn_group_size": 4, "model.batch_norm": "flax"},
        "config.model.bn_group_size=4: groups smaller than the micro-batch of 16 need "
        "model.batch_norm='fused'",
    ),
]


@pytest.mark.parametrize("overrides, message", CASES, ids=[str(c[0]) for c in CASES])
def test_bad_batch_splits_exit_2_with_one_line(data, tmp_path, capfd, overrides, message):
    assert_config_refused(data, tmp_path, capfd, overrides, message)


DEVICE_CASES = [
    # (overrides at global batch 16, devices, the start of the error, or None: accepted)
    ({"train.microbatches": 4}, 4, None),  # micro-batches of 4: one row of each device
    ({"train.microbatches": 8}, 4, "config.train.microbatches=8: a micro-batch of 2 examples"),
    ({"model.bn_group_size": 4}, 4, None),
    ({"model.bn_group_size": 2}, 4, "config.model.bn_group_size=2: must be a multiple of the 4"),
    ({"train.microbatches": 2}, 16, "config.train.microbatches=2: a micro-batch of 8 examples"),
    ({"model.bn_group_size": 8}, 8, None),
    ({"train.microbatches": 4, "model.batch_norm": "flax"}, 4, None),  # a group per micro-batch
    ({"train.microbatches": 4, "model.bn_group_size": 4, "model.batch_norm": "flax"}, 4, None),
]


@pytest.mark.parametrize("overrides, devices, message", DEVICE_CASES)
def test_micro_batches_and_groups_take_rows_from_every_device(overrides, devices, message):
    config = helpers.tiny_config("", "", **overrides)
    plan.check_config(config)  # valid on any topology
    if message is None:
        plan.check_batch_split_over(config, devices)
        return
    with pytest.raises(plan.ConfigError) as refused:
        plan.check_batch_split_over(config, devices)
    assert str(refused.value).startswith(message)


@pytest.mark.slow
def test_a_group_that_cannot_span_the_devices_is_refused_end_to_end(data, tmp_path):
    workdir = user_workdir(tmp_path)
    before = tree_digest(workdir)
    args = helpers.tiny_run_args(*data, workdir, **{"model.bn_group_size": 2})
    run = helpers.launch(args, devices=4, timeout=120)
    assert run.returncode == ExitStatus.BAD_INPUT, run.stderr[-3000:]
    assert_one_clear_line(run.stderr, "config.model.bn_group_size=2: must be a multiple of the 4")
    assert tree_digest(workdir) == before
