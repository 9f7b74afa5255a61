"""Compiled steps kept per process (launch.executables): loaded on a match, never in place of
another program, and a damaged entry is compiled again. In-process, one tiny program."""

import os

import jax
import numpy as np
import pytest

from launch import distributed, executables
from launch import program as program_lib
from tests import helpers


@pytest.fixture
def cache_dir(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "cache"))
    yield tmp_path / "cache" / "executables"
    jax.config.update("jax_compilation_cache_dir", before)


def _program(data, **train):
    config = helpers.tiny_config(*data)
    for key, value in train.items():
        config.train[key] = value
    return program_lib.build_program(
        config, distributed.make_mesh(), channels=1, steps_per_epoch=12, num_steps=8
    )


def _step_once(program, compiled):
    batch = jax.device_put(
        {"image": np.full((16, 16, 16, 1), 7, np.uint8), "label": np.arange(16, dtype=np.int32)},
        program.batch_sharding,
    )
    state, metrics = compiled(program.init(), batch, program.stop_votes(False))
    return [np.asarray(x) for x in jax.tree.leaves((state.params, metrics["loss"]))]


def _train_args(program):
    votes = jax.ShapeDtypeStruct(
        (program.mesh.devices.size,), np.int32, sharding=program.batch_sharding
    )
    return (program.abstract_state, program.abstract_batch(16, 16), votes)


def _never_lower():
    raise AssertionError("a cached program was traced and lowered again")


def test_a_restart_loads_the_same_executable_without_lowering(data, cache_dir):
    first = _program(data)
    fresh = first.compile_train_step(16, 16)
    (entry,) = os.listdir(cache_dir)
    assert entry.startswith(f"train_step-p{jax.process_index()}-")

    again = _program(data)  # a restart builds the program anew
    args = _train_args(again)
    loaded = executables.load_or_compile("train_step", _never_lower, again.executable_key, args)
    np.testing.assert_equal(_step_once(again, loaded), _step_once(first, fresh))


def test_another_program_is_compiled_not_loaded(data, cache_dir):
    _program(data).compile_train_step(16, 16)
    other = _program(data, weight_decay=0.5)
    with pytest.raises(AssertionError, match="traced and lowered again"):
        executables.load_or_compile(
            "train_step", _never_lower, other.executable_key, _train_args(other)
        )
    other.compile_train_step(16, 16)
    assert len(os.listdir(cache_dir)) == 2
    # Another batch shape is another program, too.
    bigger = _program(data)
    with pytest.raises(AssertionError, match="traced and lowered again"):
        args = (bigger.abstract_state, bigger.abstract_batch(32, 16), _train_args(bigger)[2])
        executables.load_or_compile("train_step", _never_lower, bigger.executable_key, args)


def test_a_damaged_entry_is_compiled_again(data, cache_dir):
    program = _program(data)
    expected = _step_once(program, program.compile_train_step(16, 16))
    (entry,) = os.listdir(cache_dir)
    (cache_dir / entry).write_bytes(b"not an executable")
    again = _program(data)
    np.testing.assert_equal(_step_once(again, again.compile_train_step(16, 16)), expected)
    # JAX's own cache answered that compile, and its copy does not serialize whole on CPU:
    # the damaged entry is gone and nothing was written in its place.
    assert os.listdir(cache_dir) == []


def test_without_a_cache_folder_nothing_is_written(data, tmp_path):
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert executables.cache_folder() is None
        program = _program(data)
        program.compile_train_step(16, 16)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert os.listdir(tmp_path) == []
