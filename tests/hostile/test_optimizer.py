"""The hostile suite, optimizer side: bad LARS, learning-rate-schedule and EMA settings.

Each row runs `train.train_and_evaluate` in-process through `launch.main`'s one mapping of
errors to exit statuses, and asserts the exit status, the one `error:` line naming the field,
and that the user's workdir is unchanged.
"""

from __future__ import annotations

import pytest

from tests.hostile.harness import (
    assert_config_refused,
)

CASES = [
    # (overrides, the start of the error line)
    ({"train.optimizer": "adam"}, "config.train.optimizer='adam': use one of sgd, lars"),
    ({"train.optimizer": "LARS"}, "config.train.optimizer='LARS': use one of sgd, lars"),
    ({"train.lr_schedule": "step"}, "config.train.lr_schedule='step': use one of cosine"),
    ({"train.ema_decay": -0.1}, "config.train.ema_decay=-0.1: must be a number >= 0 and < 1"),
    ({"train.ema_decay": 1.0}, "config.train.ema_decay=1.0: must be a number >= 0 and < 1"),
    ({"train.ema_decay": float("nan")}, "config.train.ema_decay=nan: must be a number"),
    ({"eval.use_ema": True}, "config.eval.use_ema=True: the run keeps no average to evaluate"),
    ({"train.lars_trust_coefficient": 0.0}, "config.train.lars_trust_coefficient=0.0: must be"),
    ({"train.lars_trust_coefficient": float("nan")}, "config.train.lars_trust_coefficient=nan"),
    ({"train.lars_epsilon": -1e-9}, "config.train.lars_epsilon=-1e-09: must be a number >= 0"),
    ({"train.polynomial_power": 0.0}, "config.train.polynomial_power=0.0: must be a number > 0"),
    ({"train.end_learning_rate": -0.1}, "config.train.end_learning_rate=-0.1: must be"),
    (
        {"train.end_learning_rate": 5.0, "train.lr_schedule": "polynomial"},
        "config.train.end_learning_rate=5.0: must not exceed the peak learning rate",
    ),
]


@pytest.mark.parametrize("overrides, message", CASES, ids=[str(c[0]) for c in CASES])
def test_bad_optimizer_settings_exit_2_with_one_line(data, tmp_path, capfd, overrides, message):
    assert_config_refused(data, tmp_path, capfd, overrides, message)
