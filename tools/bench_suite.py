r"""Runs `tools.bench_step` over a preset list of variants and prints one comparison table.

  python -m tools.bench_suite --preset=h200 --out=DIR [--wheels=.whl] [--budget_s=540]
  python -m tools.bench_suite --preset=smoke --out=/tmp/suite          # CPU, seconds

Made for a short, metered lease on a GPU machine, where one prepared command has to say
everything:
* each variant is its own process (XLA_FLAGS must be set before JAX starts), in order of
  importance: the target configuration first, with the torchvision peer, the optimized HLO
  and a profile (taken after the timing, so it does not disturb the figures);
* results are appended to DIR/results.jsonl and all output to DIR/suite.log as they come,
  so a run cut short keeps what it measured; a variant that fails is recorded and the rest
  still run; a variant is skipped once the budget left is less than the longest so far;
* on GPU, all variants share one XLA autotuning cache (where this XLA knows the flag), so
  only the first pays for the cuDNN algorithm search;
* --wheels installs carried wheels (the device machine has no registry) for the children.

DIR ends up with at most four files, flat: results.jsonl, suite.log, the HLO and the trace
(read it here with `python -m tools.profile_summary DIR`).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from tools import bench_step


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    args: tuple[str, ...]  # bench_step flags; "{hlo}" and "{profile}" are filled in
    xla_flags: tuple[str, ...] = ()


_R50 = ("--model=resnet50", "--image_size=224", "--steps=50", "--warmup=5", "--repeats=3")
_BF16_256 = (*_R50, "--dtype=bfloat16", "--batch_size=256")
_TINY = ("--model=resnet20", "--image_size=16", "--num_classes=10", "--batch_size=8")
_TINY_TIMING = ("--steps=2", "--warmup=1", "--repeats=1", "--dtype=float32")

PRESETS = {
    # The target (ResNet-50, bf16, batch 256, 224 px) and what each choice buys.
    "h200": (
        Variant(
            "target",
            (*_BF16_256, "--peer=torch", "--hlo_out={hlo}", "--profile_dir={profile}"),
        ),
        Variant("flax_batchnorm", (*_BF16_256, "--batch_norm=flax")),
        Variant("xla_max_pool", (*_BF16_256, "--max_pool=xla")),
        Variant("batch512", (*_R50, "--dtype=bfloat16", "--batch_size=512")),
        Variant("xla_defaults", (*_BF16_256, "--nogpu_xla_flags")),
        Variant("float32", (*_R50, "--dtype=float32", "--batch_size=256")),
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


def _log(out: str, text: str) -> None:
    print(text, flush=True)
    with open(os.path.join(out, "suite.log"), "a") as f:
        f.write(text + "\n")


def install_wheels(folder: str, env: dict) -> None:
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        sys.exit(f"error: no *.whl in {folder}")
    target = os.path.join(tempfile.gettempdir(), "bench_suite_site")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    cmd += ["--no-compile", "--no-cache-dir", "--upgrade", "--target", target, *wheels]
    subprocess.run(cmd, check=True)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [target, env.get("PYTHONPATH")]))


def accepted_xla_flags(extra: list[str], env: dict) -> bool:
    """Whether this jaxlib starts with `extra` added to XLA_FLAGS (unknown flags abort it)."""
    probe = dict(env, XLA_FLAGS=" ".join([env.get("XLA_FLAGS", ""), *extra]).strip())
    cmd = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(cmd, env=probe, capture_output=True, timeout=300).returncode == 0


def _text(captured) -> str:
    # TimeoutExpired carries bytes even when the run asked for text.
    if isinstance(captured, bytes):
        return captured.decode(errors="replace")
    return captured or ""


def run_variant(variant: Variant, out: str, env: dict, timeout: float) -> dict:
    profile_tmp = tempfile.mkdtemp(prefix="bench_profile_")
    hlo = os.path.join(out, f"{variant.name}.hlo.txt.gz")
    args = [a.format(hlo=hlo, profile=profile_tmp) for a in variant.args]
    child_env = dict(env)
    if variant.xla_flags:
        child_env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *variant.xla_flags]).strip()
    cmd = [sys.executable, "-m", "tools.bench_step", *args]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=timeout)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout, stderr, rc = _text(e.stdout), _text(e.stderr) + "\n[timed out]", None
    seconds = time.monotonic() - start
    _log(out, f"===== {variant.name}: {' '.join(cmd[3:])}\n{stderr.rstrip()}\n{stdout.rstrip()}")
    result = {"variant": variant.name, "wall_s": round(seconds, 1)}
    lines = stdout.strip().splitlines()  # bench_step's last line is its JSON
    if rc == 0 and lines and lines[-1].startswith("{"):
        result.update(json.loads(lines[-1]))
        if "profile" in result:  # flatten: only two folder levels come back from a lease
            flat = os.path.join(out, f"{variant.name}.xplane.pb.gz")
            with open(result["profile"], "rb") as src, gzip.open(flat, "wb") as dst:
                shutil.copyfileobj(src, dst)
            result["profile"] = flat
    else:
        last = (stderr.strip() or stdout.strip()).splitlines()[-1:] or [""]
        result["error"] = f"{'timed out' if rc is None else f'exit {rc}'}: {last[0][:300]}"
    shutil.rmtree(profile_tmp, ignore_errors=True)
    with open(os.path.join(out, "results.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def table(results: list[dict]) -> str:
    base = next((r["images_per_second"] for r in results if "images_per_second" in r), None)
    rows = [
        f"{'variant':<16} {'images/s':>10} {'/device':>9} {'step ms':>8} {'MFU':>6} "
        f"{'vs first':>8} {'vs torch':>8}"
    ]
    for r in results:
        if "images_per_second" not in r:
            rows.append(f"{r['variant']:<16} {r.get('error', 'skipped')}")
            continue
        ips = r["images_per_second"]
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        peer = f"{r['ratio_vs_peer']:.3f}" if "ratio_vs_peer" in r else ""
        rows.append(
            f"{r['variant']:<16} {ips:>10,.1f} {r['images_per_second_per_device']:>9,.1f} "
            f"{r['step_time_ms']:>8.2f} {mfu:>6} {ips / base:>8.3f} {peer:>8}"
        )
        if "peer" in r and "images_per_second" in r["peer"]:
            rows.append(f"{'  torch peer':<16} {r['peer']['images_per_second']:>10,.1f}")
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
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if FLAGS.wheels:
        install_wheels(FLAGS.wheels, env)
    if bench_step.gpu_expected():
        cache = [f"{_AUTOTUNE_CACHE_FLAG}={tempfile.mkdtemp(prefix='xla_autotune_')}"]
        if accepted_xla_flags(cache, env):
            env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *cache]).strip()
        else:
            _log(FLAGS.out, f"note: this XLA does not know {_AUTOTUNE_CACHE_FLAG}; not shared")

    results, longest = [], 0.0
    for variant in variants:
        left = deadline - time.monotonic()
        if left < max(longest, 30.0):
            results.append({"variant": variant.name, "error": f"skipped ({left:.0f}s left)"})
            continue
        result = run_variant(variant, FLAGS.out, env, timeout=left)
        longest = max(longest, result["wall_s"])
        results.append(result)
    _log(FLAGS.out, f"===== {FLAGS.preset}: {len(results)} variants\n{table(results)}")


if __name__ == "__main__":
    app.run(main)
