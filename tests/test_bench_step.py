"""Tests for tools/bench_step.py: it runs the real train step end to end and reports JSON.

Each case is one subprocess on CPU with a tiny model; the figures themselves are not checked
(CPU timings mean nothing), only that they are there and sane.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
        [sys.executable, "-m", "tools.bench_step", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def final_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_reports_throughput_and_flops():
    proc = run_bench("--model=resnet20", *TINY)
    result = final_json(proc)
    assert result["model"] == "resnet20"
    assert result["batch_size"] == 8
    assert result["images_per_second"] > 0
    assert result["flops_per_image"] > 0
    assert result["flops_source"] == "xla_cost_analysis"
    assert result["mfu"] is None  # no peak is known for CPU
    assert "MFU n/a" in proc.stdout
    assert "python -m tools.bench_step --model=resnet20" in proc.stdout


def test_torch_peer_rejects_cifar_models():
    proc = run_bench("--model=resnet20", "--peer=torch", *TINY)
    assert proc.returncode != 0
    assert "--peer=torch needs a torchvision model" in proc.stderr
    assert "resnet20" in proc.stderr


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
