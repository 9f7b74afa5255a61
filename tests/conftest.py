"""Fixtures shared by the test modules that run the real launcher."""

import pytest

from tests import helpers


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
