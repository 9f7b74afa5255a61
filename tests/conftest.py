"""Fixtures shared by the test modules that run the real launcher."""

import os

import pytest
from absl import flags

from tests import helpers

# Before JAX starts its backend (the first device use), which reads XLA_FLAGS.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {helpers.TEST_XLA_FLAGS}".strip()

# The test session is the program here: Grain's worker processes read absl flags, and their
# defaults are what the tests need (absl apps such as the launcher parse them themselves).
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session", autouse=True)
def _demo_data_cache(tmp_path_factory):
    """The embedded demo data is converted into a per-user cache outside every workdir; the
    tests (and the launchers they start, which inherit the environment) use their own."""

    from pipeline import demo_data  # pylint: disable=g-import-not-at-top

    before = os.environ.get(demo_data.CACHE_ENV)
    os.environ[demo_data.CACHE_ENV] = str(tmp_path_factory.mktemp("demo-data-cache"))
    yield
    if before is None:
        os.environ.pop(demo_data.CACHE_ENV, None)
    else:
        os.environ[demo_data.CACHE_ENV] = before


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """One persistent compilation cache for every program the tests compile, in this process
    and in the launchers they start (the environment wins over `train.compilation_cache_dir`):
    most tests build the same tiny train and eval steps, and a compile costs more than the
    run. Tests of the cache itself, and the tools that measure cold starts, set their own."""

    import jax  # pylint: disable=g-import-not-at-top

    folder = str(tmp_path_factory.mktemp("xla-cache"))
    settings = {
        "JAX_COMPILATION_CACHE_DIR": folder,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # the tiny programs too
    }
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    jax.config.update("jax_compilation_cache_dir", folder)
    yield
    jax.config.update("jax_compilation_cache_dir", None)
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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


def _finished_run(data, tmp_path_factory, name: str, **overrides) -> str:
    workdir = str(tmp_path_factory.mktemp(name) / "w")
    run = helpers.launch(helpers.tiny_run_args(*data, workdir, **overrides))
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return workdir


@pytest.fixture(scope="session")
def tiny_finished(data, tmp_path_factory):
    """The tiny run finished on 1 process x 4 devices: 8 steps, checkpoints at 4 and 8.

    Shared by several modules: read it, or copy it before changing anything in it.
    """
    return _finished_run(data, tmp_path_factory, "tiny_finished")


@pytest.fixture(scope="session")
def reference_16(data, tmp_path_factory):
    """16 steps uninterrupted on 1 process x 4 devices, checkpoints every 4 steps (crossing
    the epoch boundary at 12): what interrupted runs must end bit-identical (or close) to.

    Shared: read it, or copy it before changing anything in it.
    """
    every_4 = {"train.num_steps": 16, "checkpoint.every_steps": 4}
    return _finished_run(data, tmp_path_factory, "reference_16", **every_4)
