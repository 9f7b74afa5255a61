r"""Runs `tools.bench.step` over a preset list of variants and prints one comparison table.

  python -m tools.bench.suite --preset=h200 --out=DIR [--wheels=.whl] [--budget_s=540]
  python -m tools.bench.suite --preset=cpu --out=/tmp/cpu     # the layer A/Bs on CPU
  python -m tools.bench.suite --preset=smoke --out=/tmp/smoke # what the tests run

Made for accelerator time that is short or metered (a reservation, a shared node), where one
prepared command has to say everything:
* each variant is its own process (XLA_FLAGS must be set before JAX starts), in order of
  importance: the target configuration first, with the torchvision peer, the optimized HLO
  and a profile (taken after the timing, so it does not disturb the figures);
* results are appended to DIR/results.jsonl and all output to DIR/suite.log as they come,
  so a run cut short keeps what it measured; a variant that fails or runs out of time is
  recorded (with any figures it printed first) and the rest still run; a variant is
  skipped once the budget left is less than the quickest variant so far;
* on GPU, all variants share one XLA autotuning cache (where this XLA knows the flag), so
  only the first pays for the cuDNN algorithm search (compile times are not comparable);
* --wheels installs wheels brought along (tools/bench/offline_wheels.sh) for the children, on
  machines that cannot reach a package registry.

DIR ends up with at most four files, flat: results.jsonl, suite.log, the HLO and the trace
(read it anywhere with `python -m tools.bench.profile_summary DIR`).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from tools.bench import xla_env


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    args: tuple[str, ...]  # bench_step flags; "{hlo}" and "{profile}" are filled in
    xla_flags: tuple[str, ...] = ()
    baseline: str | None = None  # the variant its ratio is against (default: the preset's first)


_R50 = ("--model=resnet50", "--image_size=224", "--steps=50", "--warmup=5", "--repeats=3")
_BF16_256 = (*_R50, "--dtype=bfloat16", "--batch_size=256")
_TINY = ("--model=resnet8", "--image_size=16", "--num_classes=10", "--batch_size=8")
_TINY_TIMING = ("--steps=2", "--warmup=1", "--repeats=1", "--dtype=float32")
_CPU_CIFAR = ("--model=resnet20", "--image_size=32", "--num_classes=10", "--batch_size=64")
_CPU_IMAGENET = ("--model=resnet18", "--image_size=64", "--num_classes=10", "--batch_size=16")
_CPU_TIMING = ("--dtype=float32", "--steps=5", "--warmup=2", "--repeats=5")

PRESETS = {
    # The target configuration (ResNet-50, bf16, batch 256, 224 px) and what each choice buys.
    "h200": (
        Variant(
            "target",
            (
                *_BF16_256,
                "--peer=torch",
                "--hlo_out={hlo}",
                "--profile_dir={profile}",
                "--profile_steps=3",
            ),
        ),
        Variant("flax_batchnorm", (*_BF16_256, "--batch_norm=flax")),
        Variant("xla_max_pool", (*_BF16_256, "--max_pool=xla")),
        Variant("batch512", (*_R50, "--dtype=bfloat16", "--batch_size=512")),
        Variant("float32", (*_R50, "--dtype=float32", "--batch_size=256")),
    ),
    # Each layer choice against its Flax/XLA counterpart on CPU, where a model is small enough
    # to time (mostly float32: CPUs have no fast bfloat16). Says nothing about GPU speed.
    "cpu": (
        Variant("cifar_fused_bn", (*_CPU_CIFAR, *_CPU_TIMING)),
        Variant("cifar_flax_bn", (*_CPU_CIFAR, *_CPU_TIMING, "--batch_norm=flax")),
        Variant(
            "cifar_fused_bf16",
            (*_CPU_CIFAR, *_CPU_TIMING, "--dtype=bfloat16"),
            baseline="cifar_fused_bf16",
        ),
        Variant(
            "cifar_flax_bf16",
            (*_CPU_CIFAR, *_CPU_TIMING, "--dtype=bfloat16", "--batch_norm=flax"),
            baseline="cifar_fused_bf16",
        ),
        Variant("stem_dense_pool", (*_CPU_IMAGENET, *_CPU_TIMING), baseline="stem_dense_pool"),
        Variant(
            "stem_xla_pool",
            (*_CPU_IMAGENET, *_CPU_TIMING, "--max_pool=xla"),
            baseline="stem_dense_pool",
        ),
    ),
    # The same machinery on a tiny model: what the tests run on CPU.
    "smoke": (
        Variant("target", (*_TINY, *_TINY_TIMING, "--hlo_out={hlo}", "--profile_dir={profile}")),
        Variant("flax_batchnorm", (*_TINY, *_TINY_TIMING, "--batch_norm=flax")),
    ),
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "h200", list(PRESETS), "Which variants to run.")
flags.DEFINE_string("out", None, "Folder for results.jsonl, suite.log, HLO and trace.")
flags.DEFINE_list("only", [], "Run just these variants (names from the preset).")
flags.DEFINE_integer("budget_s", 540, "Wall-clock budget for all variants, seconds.")
flags.DEFINE_string("wheels", None, "Folder of wheels to install (no index) for the children.")
flags.mark_flag_as_required("out")

_AUTOTUNE_CACHE_FLAG = "--xla_gpu_per_fusion_autotune_cache_dir"
_MAX_FILE_BYTES = 15 * 2**20  # keep every result file small enough to copy back anywhere


def _log(out: str, text: str) -> None:
    print(text, flush=True)
    with open(os.path.join(out, "suite.log"), "a") as f:
        f.write(text + "\n")


def _record(out: str, result: dict) -> dict:
    with open(os.path.join(out, "results.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def install_wheels(folder: str, env: dict) -> None:
    """pip-installs every wheel in `folder` into a fresh target put on the children's path."""
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        raise RuntimeError(f"no *.whl in {folder}")
    target = tempfile.mkdtemp(prefix="bench_suite_site_")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    cmd += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", target, *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"installing {folder}/*.whl failed:\n{proc.stdout}{proc.stderr}")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [target, env.get("PYTHONPATH")]))


def accepted_xla_flags(extra: list[str], env: dict) -> bool:
    """Whether this jaxlib starts with `extra` added to XLA_FLAGS (unknown flags abort it)."""
    probe = dict(env, XLA_FLAGS=xla_env.with_flags(env.get("XLA_FLAGS", ""), extra))
    cmd = [sys.executable, "-c", "import jax; jax.devices()"]
    try:
        return subprocess.run(cmd, env=probe, capture_output=True, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _run(cmd: list[str], env: dict, timeout: float) -> tuple[str, str, int | None]:
    """(stdout, stderr, exit status or None on timeout). On timeout the whole process group
    is killed: torch's compile workers would otherwise hold the pipes open."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return stdout, stderr, proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return stdout, stderr + f"\n[killed after {timeout:.0f}s]", None


def run_variant(variant: Variant, out: str, env: dict, timeout: float) -> dict:
    profile_tmp = tempfile.mkdtemp(prefix="bench_profile_")
    hlo = os.path.join(out, f"{variant.name}.hlo.txt.gz")
    args = [a.format(hlo=hlo, profile=profile_tmp) for a in variant.args]
    child_env = dict(env)
    if variant.xla_flags:
        child_env["XLA_FLAGS"] = xla_env.with_flags(env.get("XLA_FLAGS", ""), variant.xla_flags)
    cmd = [sys.executable, "-m", "tools.bench.step", *args]
    start = time.monotonic()
    stdout, stderr, rc = _run(cmd, child_env, timeout)
    result = {"variant": variant.name, "wall_s": round(time.monotonic() - start, 1)}
    _log(out, f"===== {variant.name}: {' '.join(cmd[3:])}\n{stderr.rstrip()}\n{stdout.rstrip()}")
    # bench_step prints its figures as a JSON line (before the peer too): keep the last one.
    reports = [line for line in stdout.splitlines() if line.startswith("{")]
    if reports:
        result.update(json.loads(reports[-1]))
    if rc != 0:
        last = (stderr.strip() or stdout.strip()).splitlines()[-1:] or [""]
        result["error"] = f"{'timed out' if rc is None else f'exit {rc}'}: {last[0][:300]}"
    if result.get("profile"):  # flattened and zipped: one flat folder of small files
        flat = os.path.join(out, f"{variant.name}.xplane.pb.gz")
        with open(result["profile"], "rb") as src, gzip.open(flat, "wb") as dst:
            shutil.copyfileobj(src, dst)
        result["profile"] = flat
        if os.path.getsize(flat) > _MAX_FILE_BYTES:
            os.remove(flat)
            result["profile"] = "dropped: larger than the result-file limit"
    shutil.rmtree(profile_tmp, ignore_errors=True)
    return _record(out, result)


def table(results: list[dict], variants: tuple[Variant, ...]) -> str:
    speed = {r["variant"]: r["images_per_second"] for r in results if "images_per_second" in r}
    baselines = {v.name: v.baseline or variants[0].name for v in variants}
    rows = [
        f"{'variant':<16} {'images/s':>10} {'/device':>9} {'step ms':>8} {'MFU':>6} "
        f"{'vs base':>8} {'vs torch':>8} {'GB/step':>8}"
    ]
    for r in results:
        if "images_per_second" not in r:
            rows.append(f"{r['variant']:<16} {r.get('error', 'no figures')}")
            continue
        ips = r["images_per_second"]
        base = speed.get(baselines.get(r["variant"], ""))
        ratio = f"{ips / base:.3f}" if base else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        peer = f"{r['ratio_vs_peer']:.3f}" if "ratio_vs_peer" in r else ""
        traffic = r.get("bytes_accessed_per_step")  # XLA's estimate, per device
        traffic = f"{traffic / 1e9:.3f}" if traffic else ""
        rows.append(
            f"{r['variant']:<16} {ips:>10,.1f} {r['images_per_second_per_device']:>9,.1f} "
            f"{r['step_time_ms']:>8.2f} {mfu:>6} {ratio:>8} {peer:>8} {traffic:>8}"
        )
        if "peer" in r and "images_per_second" in r["peer"]:
            rows.append(f"{'  torch peer':<16} {r['peer']['images_per_second']:>10,.1f}")
        if "error" in r:
            rows.append(f"{'':<16} ({r['error']})")
    return "\n".join(rows)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    variants = PRESETS[FLAGS.preset]
    unknown = set(FLAGS.only) - {v.name for v in variants}
    if unknown:
        sys.exit(f"error: --only names {sorted(unknown)} not in preset {FLAGS.preset!r}")
    if FLAGS.only:
        variants = tuple(v for v in variants if v.name in FLAGS.only)
    os.makedirs(FLAGS.out, exist_ok=True)
    deadline = time.monotonic() + FLAGS.budget_s
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    if FLAGS.wheels:
        try:
            install_wheels(FLAGS.wheels, env)
        except RuntimeError as e:
            _log(FLAGS.out, f"error: {e}")
            sys.exit(1)
    if xla_env.gpu_expected():
        cache = [f"{_AUTOTUNE_CACHE_FLAG}={tempfile.mkdtemp(prefix='xla_autotune_')}"]
        if accepted_xla_flags(cache, env):
            env["XLA_FLAGS"] = xla_env.with_flags(env.get("XLA_FLAGS", ""), cache)
        else:
            _log(FLAGS.out, f"note: this XLA does not take {_AUTOTUNE_CACHE_FLAG}; not shared")

    results, quickest = [], None
    for variant in variants:
        left = deadline - time.monotonic()
        # Optimistic on purpose: the first variant carries the peer and the profile, and one
        # that overruns loses only itself (it is killed at the deadline).
        if left < (quickest or 30.0):
            results.append(
                _record(FLAGS.out, {"variant": variant.name, "error": f"skipped: {left:.0f}s left"})
            )
            continue
        result = run_variant(variant, FLAGS.out, env, timeout=left)
        quickest = min(quickest or result["wall_s"], result["wall_s"])
        results.append(result)
    _log(FLAGS.out, f"===== {FLAGS.preset}: {len(results)} variants\n{table(results, variants)}")


if __name__ == "__main__":
    app.run(main)
