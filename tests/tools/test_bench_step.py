"""Tests for tools/bench/step.py (the real train step, timed, reported as JSON) and for the
tools/bench/suite.py driver and tools/bench/profile_summary.py that a GPU lease runs.

Each case is one subprocess on CPU with a tiny model; the figures themselves are not checked
(CPU timings mean nothing), only that they are there and sane.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tools.bench import profile_summary
from tools.bench import suite as bench_suite

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "--batch_size=8",
    "--image_size=16",
    "--dtype=float32",
    "--steps=2",
    "--warmup=1",
    "--repeats=1",
    "--num_classes=10",
]
TORCH_MISSING = any(importlib.util.find_spec(m) is None for m in ("torch", "torchvision"))


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)  # one CPU device, whatever the caller's environment says
    return subprocess.run(
        [sys.executable, "-m", "tools.bench.step", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def final_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_suite_reports_throughput_flops_hlo_and_profile(tmp_path):
    # The smoke preset runs bench_step twice (fused and flax BatchNorm) through the same
    # driver that a GPU lease runs, so this covers bench_step's own report as well.
    out = tmp_path / "suite"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench.suite", "--preset=smoke", f"--out={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == [
        "results.jsonl",
        "suite.log",
        "target.hlo.txt.gz",
        "target.xplane.pb.gz",
    ]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in results] == ["target", "flax_batchnorm"]
    assert [r["batch_norm"] for r in results] == ["fused", "flax"]
    for result in results:
        assert result["model"] == "resnet8" and result["batch_size"] == 8
        assert result["images_per_second"] > 0
        assert result["flops_per_image"] > 0
        assert result["flops_source"] == "xla_cost_analysis"
        assert result["mfu"] is None  # no peak is known for CPU
    log = (out / "suite.log").read_text()
    assert "MFU n/a" in log and "python -m tools.bench.step --model=resnet8" in log
    table = proc.stdout[proc.stdout.rindex("===== smoke") :]
    assert "target" in table and "flax_batchnorm" in table and "1.000" in table
    with gzip.open(out / "target.hlo.txt.gz", "rt") as f:
        assert f.read().startswith("HloModule")
    summary = profile_summary.summarize(profile_summary.newest_trace(str(out)), top=5)
    assert "events from /host:CPU" in summary and "ms in all" in summary


def test_suite_records_a_failing_variant_and_goes_on(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    broken = bench_suite.Variant("broken", ("--model=resnet9000",))
    result = bench_suite.run_variant(broken, str(tmp_path), env, timeout=120)
    assert result["variant"] == "broken"
    assert result["error"].startswith("exit 1:")  # absl rejects the flag value
    assert "resnet9000" in (tmp_path / "suite.log").read_text()
    assert json.loads((tmp_path / "results.jsonl").read_text()) == result
    assert "broken" in bench_suite.table([result], (broken,))


def test_torch_peer_rejects_cifar_models():
    proc = run_bench("--model=resnet8", "--peer=torch", *TINY)
    assert proc.returncode != 0
    assert "--peer=torch needs a torchvision model" in proc.stderr
    assert "resnet8" in proc.stderr


@pytest.mark.skipif(not TORCH_MISSING, reason="checks the path where torch is absent")
def test_torch_peer_is_skipped_without_torch():
    proc = run_bench(
        "--model=resnet18",
        "--peer=torch",
        "--batch_size=8",
        "--image_size=16",
        "--dtype=float32",
        "--steps=1",
        "--warmup=0",
        "--repeats=1",
        "--num_classes=10",
    )
    result = final_json(proc)
    assert "peer torch: skipped (" in proc.stdout and "not installed)" in proc.stdout
    assert "not installed" in result["peer"]["skipped"]
    assert result["images_per_second"] > 0


@pytest.mark.slow
def test_suite_keeps_our_figures_when_the_peer_fails(tmp_path):
    # A torch that breaks on import (as a CUDA mismatch or an inductor crash would mid-run):
    # bench_step exits non-zero, but its figures were printed first and the suite keeps them.
    fake = tmp_path / "fake"
    for module in ("torch", "torchvision"):
        (fake / module).mkdir(parents=True)
        (fake / module / "__init__.py").write_text('raise RuntimeError("broken peer")\n')
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(fake), REPO]))
    env.pop("XLA_FLAGS", None)
    out = tmp_path / "out"
    out.mkdir()
    variant = bench_suite.Variant("peer", ("--model=resnet18", "--peer=torch", *TINY))
    result = bench_suite.run_variant(variant, str(out), env, timeout=300)
    assert result["images_per_second"] > 0 and result["model"] == "resnet18"
    assert result["error"].startswith("exit 1:") and "broken peer" in result["error"]
    assert "peer" not in result and "ratio_vs_peer" not in result


@pytest.mark.slow
def test_the_step_is_timed_at_each_image_size():
    proc = run_bench("--model=resnet8", "--image_sizes=16,24", *TINY)
    result = final_json(proc)
    sizes = result["per_image_size"]
    assert [s["image_size"] for s in sizes] == [16, 24]
    assert all(s["images_per_second"] > 0 and s["compile_s"] > 0 for s in sizes)
    assert sizes[0]["images_per_second"] == result["images_per_second"]  # the first size's
    assert result["image_size"] == 16
    assert "  at 16px: " in proc.stdout and "  at 24px: " in proc.stdout


def test_bad_image_sizes_are_one_line():
    proc = run_bench("--model=resnet8", "--image_sizes=16,big", *TINY)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --image_sizes=16,big: give sides in pixels, 160,192"
    )


@pytest.mark.slow
def test_microbatches_are_measured_each_with_xla_memory_figures():
    proc = run_bench("--model=resnet8", *TINY, "--microbatches=1,4")
    result = final_json(proc)
    counts = [r["microbatches"] for r in result["by_microbatches"]]
    assert counts == [1, 4] and result["microbatches"] == 1
    one, four = (r["memory"] for r in result["by_microbatches"])
    assert four["temp"] < one["temp"]  # one micro-batch of activations alive, not four
    assert four["argument"] == one["argument"]  # the same state and batch
    assert "micro-batches 4:" in proc.stdout and "scratch" in proc.stdout


def test_memory_figures_add_up():
    import jax
    import jax.numpy as jnp

    from tools.bench import step

    step_fn = jax.jit(lambda x: jnp.sin(x) @ x, donate_argnums=0)
    figures = step.memory(step_fn.lower(jnp.ones((64, 64))).compile())
    assert figures is not None and figures["argument"] == 64 * 64 * 4
    held = figures["temp"] + figures["argument"] + figures["output"]
    assert figures["total"] == held - figures["alias"]


def test_bad_microbatch_counts_are_one_line():
    proc = run_bench("--model=resnet8", *TINY, "--microbatches=3")
    assert proc.returncode != 0
    message = "error: config.train.microbatches=3: must divide train.global_batch_size=8"
    assert message in proc.stderr
