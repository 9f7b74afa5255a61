"""tools/bench_input.py runs end to end on a tiny synthetic JPEG set and reports figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_input_synthetic_smoke():
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.bench_input",
            "--synthetic_jpeg=24",
            "--image_size=32",
            "--batch_size=4",
            "--seconds=1",
            "--num_workers=0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    (pipeline,) = result["pipeline"]
    assert pipeline["num_workers"] == 0
    for figures in (pipeline, result["pil"]):
        assert figures["images"] > 0
        assert figures["images_per_s"] > 0 and figures["images_per_cpu_s"] > 0
    assert result["ratio_per_cpu_s"]["0"] > 0
    assert result["image_size"] == 32 and result["num_examples"] == 24
