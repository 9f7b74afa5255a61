"""Compiled steps kept across restarts (launch.executables): loaded on a match, never in place of
another program, and a damaged entry is compiled again.

The rules are shown in-process on a small sharded program that compiles in milliseconds; one
slow test runs them on the real train step of `launch.program`."""

import json
import os
import pickle
import re
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from launch import distributed, executables
from launch import program as program_lib
from tests import helpers


@pytest.fixture
def cache_dir(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "cache"))
    yield tmp_path / "cache" / "executables"
    jax.config.update("jax_compilation_cache_dir", before)


def _never_lower():
    raise AssertionError("a cached program was traced and lowered again")


class _Small:
    """A jitted, batch-sharded program: a stand-in for a step (same kind of arguments)."""

    def __init__(self, scale: float = 2.0, rows: int = 8):
        self.mesh = distributed.make_mesh()
        self.sharding = NamedSharding(self.mesh, P("batch"))
        self.fn = jax.jit(lambda x, w: (x * w * scale).sum(), in_shardings=(self.sharding, None))
        self.args = (
            jax.ShapeDtypeStruct((rows, 4), jnp.float32, sharding=self.sharding),
            jax.ShapeDtypeStruct((4,), jnp.float32),
        )
        self.key = {"scale": scale, **executables.environment_key(self.mesh)}

    def compile(self, lower=None):
        lower = lower or (lambda: self.fn.lower(*self.args))
        return executables.load_or_compile("small", lower, self.key, self.args)

    def run(self, compiled) -> float:
        x = jax.device_put(np.arange(32, dtype=np.float32).reshape(8, 4), self.sharding)
        return float(compiled(x, jnp.ones(4)))


def test_a_restart_loads_the_same_executable_without_lowering(cache_dir):
    first = _Small()
    expected = first.run(first.compile())
    (entry,) = os.listdir(cache_dir)
    assert entry.startswith("small-")  # one file for every process of the run
    again = _Small()  # a restart builds everything anew
    assert again.run(again.compile(_never_lower)) == expected


def test_another_program_or_shape_is_compiled_not_loaded(cache_dir):
    _Small().compile()
    for other in (_Small(scale=3.0), _Small(rows=16)):
        with pytest.raises(AssertionError, match="traced and lowered again"):
            other.compile(_never_lower)
        other.compile()
    assert len(os.listdir(cache_dir)) == 3


def test_the_key_covers_sources_versions_devices_and_flags():
    key = executables.environment_key(distributed.make_mesh())
    assert {"sources", "versions", "platform", "mesh", "devices", "env"} <= set(key)
    assert "process" not in key  # every process runs the same executable
    assert key["versions"]["jax"] == jax.__version__
    assert len(key["devices"]) == jax.device_count()


def test_the_programs_key_holds_every_config_section_but_the_host_only_ones():
    from configs import demo  # pylint: disable=g-import-not-at-top

    def key(**changes):
        config = demo.get_config()
        for field, value in changes.items():
            section, name = field.split("__")
            config[section][name] = value
        return program_lib.build_program(config, distributed.make_mesh(), channels=1).executable_key

    same = key()
    # When to save and how long to wait for the other hosts: the same programs, loaded.
    assert key(checkpoint__every_steps=7, distributed__heartbeat_timeout_seconds=5) == same
    # Anything that could reach a compiled program: another key, compiled.
    for change in ({"train__label_smoothing": 0.1}, {"model__bn_epsilon": 1e-3},
                   {"data__image_size": 32}, {"eval__use_ema": True}):  # fmt: skip
        assert key(**change) != same, change


def test_a_restart_reads_the_model_back_instead_of_building_it(cache_dir, monkeypatch):
    from configs import demo  # pylint: disable=g-import-not-at-top

    build = lambda config: program_lib.build_program(config, distributed.make_mesh(), channels=1)
    first = build(demo.get_config())
    model_builds = []
    real = program_lib.build_model
    monkeypatch.setattr(program_lib, "build_model", lambda *a: model_builds.append(a) or real(*a))
    again = build(demo.get_config())
    assert not model_builds  # read back: nothing traced
    assert again.graphdef == first.graphdef
    assert executables.abstract_signature(again.abstract_state) == executables.abstract_signature(
        first.abstract_state
    )
    other = demo.get_config()
    other.model.num_classes = 7  # another model: built, with its own shapes
    assert build(other).abstract_state.params["head"]["bias"].shape == (7,)
    assert model_builds
    # An unreadable file is built again, and replaced.
    kept = [
        p
        for p in cache_dir.glob("program-*.pkl")
        if pickle.loads(p.read_bytes())[0] == first.graphdef
    ]
    assert len(kept) == 1
    kept[0].write_bytes(b"not a pickle")
    model_builds.clear()
    assert build(demo.get_config()).graphdef == first.graphdef and model_builds
    assert pickle.loads(kept[0].read_bytes())[0] == first.graphdef


def test_a_damaged_entry_is_compiled_again(cache_dir):
    program = _Small()
    expected = program.run(program.compile())
    (entry,) = os.listdir(cache_dir)
    (cache_dir / entry).write_bytes(b"not an executable")
    again = _Small()
    assert again.run(again.compile()) == expected
    # A fresh compile replaced the entry (JAX's own cache keeps nothing that compiles in under
    # a second; when it does answer, nothing is written: its copy does not serialize whole).
    (replaced,) = os.listdir(cache_dir)
    assert (cache_dir / replaced).read_bytes() != b"not an executable"
    assert _Small().run(_Small().compile(_never_lower)) == expected


def test_without_a_cache_folder_nothing_is_written(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert executables.cache_folder() is None
        program = _Small()
        assert program.run(program.compile()) == float(np.arange(32).sum() * 2)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert os.listdir(tmp_path) == []


@pytest.fixture
def new_process(monkeypatch):
    """Resets what launch.executables keeps per process (nothing used, nothing read ahead),
    as a restart starts; call it again for the next restart."""

    def restart():
        monkeypatch.setattr(executables, "_ahead", None)
        monkeypatch.setattr(executables, "_used", [])

    restart()
    return restart


RUN = "/runs/a"  # the run's identity (the launcher passes its workdir)


def _recorded(cache_dir, run: str = RUN) -> list[str]:
    (record,) = [n for n in os.listdir(cache_dir) if n.startswith("last-used-")]
    assert record == executables._record(str(cache_dir), run).name
    return json.loads((cache_dir / record).read_text())


def _how() -> list[str]:
    return [how for _, how in executables.programs()]


def test_a_restart_loads_ahead_what_the_last_start_used(cache_dir, new_process):
    first = _Small()
    expected = first.run(first.compile())
    executables.preload(RUN)  # a first start: nothing recorded, nothing read ahead
    executables.record_used(RUN)
    assert _how() == ["compiled"]
    (entry,) = _recorded(cache_dir)
    assert (cache_dir / f"{entry}.jaxexe").exists()

    new_process()
    executables.preload(RUN)  # before the program exists
    again = _Small()
    assert again.run(again.compile(_never_lower)) == expected
    assert executables.programs() == [["small", "read ahead"]]
    record = executables._record(str(cache_dir), RUN)
    before = record.stat().mtime
    executables.record_used(RUN)  # the same entries: the record is left as it is
    assert record.stat().mtime == before
    assert executables._ahead is None  # what was read ahead and not taken is let go

    new_process()
    executables.preload("/runs/b")  # another run, sharing the cache folder: nothing ahead
    assert _Small().run(_Small().compile(_never_lower)) == expected
    assert _how() == ["loaded"]


def test_a_changed_program_never_takes_what_was_read_ahead(cache_dir, new_process):
    _Small(scale=2.0).compile()
    executables.record_used(RUN)
    (old,) = _recorded(cache_dir)
    new_process()
    executables.preload(RUN)
    changed = _Small(scale=3.0)
    with pytest.raises(AssertionError, match="traced and lowered again"):
        changed.compile(_never_lower)
    assert changed.run(changed.compile()) == float(np.arange(32).sum() * 3)
    assert _how() == ["compiled"]
    executables.record_used(RUN)  # the next start reads ahead what this one used
    (new,) = _recorded(cache_dir)
    assert new != old and (cache_dir / f"{new}.jaxexe").exists()


def test_a_damaged_entry_read_ahead_is_compiled_again(cache_dir, new_process):
    program = _Small()
    expected = program.run(program.compile())
    executables.record_used(RUN)
    (entry,) = _recorded(cache_dir)
    (cache_dir / f"{entry}.jaxexe").write_bytes(b"not an executable")
    new_process()
    executables.preload(RUN)
    again = _Small()
    assert again.run(again.compile()) == expected
    assert _how() == ["compiled"]
    assert (cache_dir / f"{entry}.jaxexe").read_bytes() != b"not an executable"


def test_a_record_that_is_not_a_list_of_entries_is_ignored(cache_dir, new_process):
    program = _Small()
    expected = program.run(program.compile())
    record = executables._record(str(cache_dir), RUN)
    # "[" x 10**5 makes json raise RecursionError, not ValueError: whatever reading the
    # record raises, the load goes on without it (it once waited forever).
    for text in ("{not json", '{"small": 1}', '["../../etc/passwd", 3]', "[" * 10**5):
        record.write_text(text)
        new_process()
        executables.preload(RUN)
        compiled: list = []
        loading = threading.Thread(
            target=lambda out=compiled: out.append(program.compile(_never_lower)), daemon=True
        )
        loading.start()
        loading.join(timeout=60)
        assert compiled, f"no executable after a record of {text[:20]!r}"
        assert program.run(compiled[0]) == expected
        assert _how() == ["loaded"]


# A program that takes a good part of a second to load (1,500 fused operations), compiled
# and recorded by one process, then read ahead by others that exit at once.
_SLOW_TO_LOAD = """
import sys, time
import jax, jax.numpy as jnp
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
from launch import executables

def chain(x):
    for i in range(1500):
        x = jnp.sin(x) * (i + 1.0) + jnp.cos(x[::-1])
    return x

x = jax.ShapeDtypeStruct((64,), jnp.float32)
if sys.argv[2] == "compile":
    executables.load_or_compile("chain", lambda: jax.jit(chain).lower(x), {}, (x,))
    executables.record_used("run")
else:
    executables.preload("run")
    time.sleep(float(sys.argv[2]))
    sys.exit(2)
"""


@pytest.mark.slow  # four processes, one compiling 1,500 operations
def test_a_process_that_exits_while_reading_ahead_exits_with_its_own_status(tmp_path):
    """An exit (a refused config, a signal during start-up) while XLA is deserializing in the
    background waits for that load: a daemon thread there aborted the process (SIGABRT)."""

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", _SLOW_TO_LOAD, str(tmp_path / "cache"), *args],
            cwd=helpers.REPO, env=helpers.child_env(1), capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip

    compiled = run("compile")
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    for delay in ("0", "0.05", "0.15"):
        early = run(delay)
        assert early.returncode == 2, (delay, early.stderr[-3000:])


@pytest.mark.slow  # compiles the real train step twice
def test_the_real_train_step_is_loaded_on_a_restart(data, cache_dir):
    def build():
        config = helpers.tiny_config(*data)
        return program_lib.build_program(
            config, distributed.make_mesh(), channels=1, steps_per_epoch=12, num_steps=8
        )

    def step_once(program, compiled):
        batch = jax.device_put(
            {
                "image": np.full((16, 16, 16, 1), 7, np.uint8),
                "label": (np.arange(16) % 10).astype(np.int32),
            },
            program.batch_sharding,
        )
        state, metrics = compiled(program.init(), batch, program.stop_votes(False))
        return [np.asarray(x) for x in jax.tree.leaves((state.params, metrics["loss"]))]

    first = build()
    expected = step_once(first, first.compile_train_step(16, 16))
    for kept in cache_dir.glob("program-*.pkl"):  # traced again: the key from a fresh trace
        kept.unlink()
    again = build()
    votes = jax.ShapeDtypeStruct(
        (again.mesh.devices.size,), np.int32, sharding=again.batch_sharding
    )
    args = (again.abstract_state, again.abstract_batch(16, 16), votes)
    loaded = executables.load_or_compile("train_step", _never_lower, again.executable_key, args)
    np.testing.assert_equal(step_once(again, loaded), expected)


def _probe(cache: str, compiled_by: int, processes: int = 2) -> dict[int, tuple]:
    """Runs tests/executables_probe.py in `processes` launcher-like processes; each one's
    (whether it compiled, how the executable came, its result)."""
    cmd = [
        sys.executable, "-m", "launch.local_cluster", f"--num_processes={processes}",
        "--devices_per_process=2", "--module=tests.executables_probe", "--",
        f"--cache={cache}", f"--compiled_by={compiled_by}",
    ]  # fmt: skip
    run = subprocess.run(
        cmd, cwd=helpers.REPO, env=helpers.child_env(2), capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    found = re.findall(
        r"process (\d+): compiled=(True|False) how=([\w ]+) result=([\d.]+)", run.stdout
    )
    assert len(found) == processes, run.stdout[-3000:]
    return {int(p): (c == "True", how, float(r)) for p, c, how, r in found}


@pytest.mark.slow  # two runs of 3 processes
def test_one_process_compiles_and_hands_the_executable_to_the_others(tmp_path):
    """A cluster compiles a program once: the process it names compiles it (the last one
    here) and the others load what it hands over; a restart loads it everywhere. Across real
    processes joined by jax.distributed."""
    cache = str(tmp_path / "cache")
    expected = float((np.arange(48).reshape(12, 4) * np.arange(4)).sum())
    first = _probe(cache, compiled_by=-1, processes=3)
    assert first[2] == (True, "compiled", expected)
    for process in (0, 1):  # handed over; or, lagging behind, found in the file already
        assert first[process] in {(False, h, expected) for h in ("from process 2", "loaded")}
    folder = os.path.join(cache, "executables")
    assert len([n for n in os.listdir(folder) if n.endswith(".jaxexe")]) == 1  # one for all
    assert len([n for n in os.listdir(folder) if n.startswith("last-used-")]) == 3
    # Every process reads the executable ahead, before it can name it.
    again = _probe(cache, compiled_by=0, processes=3)
    assert again == {p: (False, "read ahead", expected) for p in range(3)}
