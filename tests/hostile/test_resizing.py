"""The hostile suite, progressive resizing: a ramp that cannot run is refused before anything
is set up.

Each row runs `train.train_and_evaluate` in-process through `launch.main`'s one mapping of
errors to exit statuses, and asserts the exit status, the one `error:` line naming the field,
and that the user's workdir is unchanged.
"""

from __future__ import annotations

import pytest

from tests.hostile.harness import (
    assert_config_refused,
)

RAMP = {"data.min_image_size": 16, "data.max_image_size": 24, "data.resize_end_epoch": 2.0}

CASES = [
    # (overrides, the start of the error line)
    (
        {"data.max_image_size": 24},
        "config.data.max_image_size=24 needs data.min_image_size (the ramp's first size)",
    ),
    (
        {**RAMP, "data.max_image_size": 0},
        "config.data.max_image_size=0: must be >= data.min_image_size=16",
    ),
    (
        {**RAMP, "data.max_image_size": 12},
        "config.data.max_image_size=12: must be >= data.min_image_size=16",
    ),
    (
        {**RAMP, "data.resize_start_epoch": 3.0},
        "config.data.resize_end_epoch=2.0: must be >= data.resize_start_epoch=3.0",
    ),
    ({**RAMP, "data.min_image_size": -16}, "config.data.min_image_size=-16: must be a whole"),
    ({**RAMP, "data.max_image_size": 10_000}, "config.data.max_image_size=10000: must be a"),
    ({**RAMP, "data.resize_multiple": 0}, "config.data.resize_multiple=0: must be a whole"),
    ({**RAMP, "data.resize_start_epoch": -1.0}, "config.data.resize_start_epoch=-1.0: must be"),
    ({**RAMP, "data.resize_end_epoch": float("inf")}, "config.data.resize_end_epoch=inf: must"),
    (
        {**RAMP, "data.augment_on_device": True, "data.image_size": 28},
        "config.data.min_image_size=16: progressive resizing needs the host's random-resized "
        "crop, but data.augment_on_device=True crops back to the stored size",
    ),
]


@pytest.mark.parametrize("overrides, message", CASES, ids=[str(c[0]) for c in CASES])
def test_bad_resizing_ramps_exit_2_with_one_line(data, tmp_path, capfd, overrides, message):
    assert_config_refused(data, tmp_path, capfd, overrides, message)
