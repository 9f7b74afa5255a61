"""Fixtures shared by the test modules that run the real launcher."""

import pytest
from absl import flags

from tests import helpers

# The test session is the program here: Grain's worker processes read absl flags, and their
# defaults are what the tests need (absl apps such as the launcher parse them themselves).
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Shipped MNIST digits as (train_dir, eval_dir) for tiny launcher runs.

    200 train examples: 12 steps of 16 per epoch, 8 dropped. 37 eval examples: not a multiple
    of the global batch, so the last eval batch is padded.
    """
    root = tmp_path_factory.mktemp("data")
    return (
        helpers.make_mnist_subset(str(root / "train"), 0, 200),
        helpers.make_mnist_subset(str(root / "eval"), 200, 37),
    )
