r"""Times the project's real train step on synthetic data: images/s, step time, FLOPs, MFU,
and XLA's memory figures.

  python -m tools.bench.step --model=resnet50 --batch_size=256 --image_size=224 \
      --dtype=bfloat16 [--steps=50 --warmup=5 --repeats=3 --peer=torch --microbatches=1,4]
  python -m tools.bench.step --model=resnet50 --batch_size=256 --image_sizes=160,192

--image_sizes times each size in turn, each with its own compiled step, as progressive
resizing trains (data.min_image_size): one images/s line per size, and `per_image_size` in
the JSON. --microbatches times each train.microbatches count, with XLA's memory figures:
one line per count, and `by_microbatches` in the JSON. The other figures are those of the
first size and count.

The step is the launcher's own (`launch.program.build_program`: the same model, optimizer,
shardings and donation), fed one uint8 batch that is put on the devices once. Compilation is
excluded; each repeat runs --steps steps with a single block_until_ready at the end, and the
median repeat is reported.
The last line printed is JSON, for scripts.

XLA_FLAGS is read when JAX first initialises a backend, so flags are parsed first, then
XLA_FLAGS is set, and only then is anything imported that could touch a device.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time

from absl import app, flags

from tools.bench import profile_summary, xla_env

# Dense bf16 TFLOP/s by device kind (first substring match wins: most specific first).
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("V100", 125.0),
    ("TPU v4", 275.0),
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),
    ("TPU v6 lite", 918.0),
)

# Forward GMACs per image at the reference size (torchvision / He et al.). A train step is
# ~3 forwards (forward + two backward matmuls) at 2 FLOPs per MAC: ResNet-50 ~24.5 GFLOP.
FORWARD_GMACS = {
    "resnet18": (1.81, 224),
    "resnet34": (3.66, 224),
    "resnet50": (4.09, 224),
    "resnet101": (7.80, 224),
    "resnet152": (11.51, 224),
    "resnet8": (0.012, 32),
    "resnet20": (0.041, 32),
    "resnet32": (0.069, 32),
    "resnet44": (0.098, 32),
    "resnet56": (0.125, 32),
    "resnet110": (0.253, 32),
}
TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
MODELS = tuple(sorted(FORWARD_GMACS))

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "resnet50", MODELS, "Model name (resnet.MODEL_NAMES).")
flags.DEFINE_integer("batch_size", 256, "Global batch, split over all local devices.")
flags.DEFINE_integer("image_size", 224, "Side of the square input, pixels.")
flags.DEFINE_list(
    "image_sizes", [], "Time each of these sides, e.g. 160,192 (overrides --image_size)."
)
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_enum("batch_norm", "fused", ["fused", "flax"], "config.model.batch_norm.")
flags.DEFINE_enum("max_pool", "dense", ["dense", "xla"], "config.model.max_pool.")
flags.DEFINE_integer("num_classes", 1000, "Classifier outputs.")
flags.DEFINE_integer("channels", 3, "Input channels.")
flags.DEFINE_integer("steps", 50, "Timed steps per repeat.")
flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.")
flags.DEFINE_integer("repeats", 3, "Timed repeats; the median is reported.")
flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s for MFU (default: by device kind).")
flags.DEFINE_enum("peer", "none", ["none", "torch"], "Also time torchvision's ResNet.")
flags.DEFINE_bool("gpu_xla_flags", True, "On GPU, add xla_env.GPU_XLA_FLAGS to XLA_FLAGS.")
flags.DEFINE_string("hlo_out", None, "Write the compiled step's optimized HLO here (.gz ok).")
flags.DEFINE_string("profile_dir", None, "Trace --profile_steps more steps here, then summarise.")
flags.DEFINE_integer("profile_steps", 5, "Steps traced with --profile_dir.")
flags.DEFINE_list(
    "microbatches",
    ["1"],
    "config.train.microbatches values to measure, each compiled and timed on its own "
    "(for example 1,4: the memory that gradient accumulation saves).",
)
flags.DEFINE_bool(
    "donate",
    True,
    "Donate the state buffers (as the launcher does); --nodonate measures what donation buys.",
)


def peak_tflops(device_kind: str) -> float | None:
    return next((peak for key, peak in PEAK_TFLOPS if key.lower() in device_kind.lower()), None)


def analytical_flops(model: str, image_size: int) -> float:
    gmacs, size = FORWARD_GMACS[model]
    return 6 * gmacs * 1e9 * (image_size / size) ** 2


def xla_cost(compiled, key: str) -> float | None:
    """One figure ("flops", "bytes accessed") of XLA's cost analysis of one execution of the
    per-device program (a dict, or a list of dicts on old jax); None where unavailable."""
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError):  # backends without it (XlaRuntimeError)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    value = (cost or {}).get(key)
    return float(value) if value and value > 0 else None


def memory(compiled) -> dict[str, int] | None:
    """XLA's memory figures for one execution, per device, in bytes: scratch (temp),
    arguments, outputs, the outputs that reuse donated arguments (alias), and their total."""
    try:
        analysis = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # backends without it (XlaRuntimeError)
        return None
    if analysis is None:
        return None
    figures = {
        name: int(getattr(analysis, f"{name}_size_in_bytes"))
        for name in ("temp", "argument", "output", "alias")
    }
    figures["total"] = figures["temp"] + figures["argument"] + figures["output"] - figures["alias"]
    return figures


def write_text(path: str, text: str) -> None:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt") as f:
        f.write(text)


def time_repeats(run_steps, repeats: int) -> float:
    """Median wall seconds of `run_steps()` (which must end synchronised) over repeats."""
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        run_steps()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def image_sizes() -> list[int]:
    """--image_sizes as whole numbers, or [--image_size]."""
    try:
        sizes = [int(s) for s in FLAGS.image_sizes] or [FLAGS.image_size]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        sys.exit(
            f"error: --image_sizes={','.join(FLAGS.image_sizes)}: give sides in pixels, 160,192"
        )
    return sizes


def bench_jax(image_size: int, microbatches: int, extras: bool = True) -> dict:
    """The step timed at one image size and micro-batch count; `extras`: also --hlo_out and
    --profile_dir."""
    import flax
    import jax
    import numpy as np

    from configs import default
    from launch import distributed, plan
    from launch import program as program_lib

    config = default.get_config()
    config.model.name, config.model.num_classes = FLAGS.model, FLAGS.num_classes
    config.model.dtype, config.train.global_batch_size = FLAGS.dtype, FLAGS.batch_size
    config.model.batch_norm, config.model.max_pool = FLAGS.batch_norm, FLAGS.max_pool
    config.train.microbatches = microbatches
    if FLAGS.channels != 3:
        config.data.mean, config.data.std = (127.5,) * FLAGS.channels, (64.0,) * FLAGS.channels
    try:
        distributed.check_batch_size(FLAGS.batch_size, "--batch_size")
        plan.check_config(config)
        plan.check_batch_split_over(config, jax.device_count())
    except ValueError as e:
        sys.exit(f"error: {e}")

    # The launcher's own program (its default long schedule: the LR value costs nothing).
    program = program_lib.build_program(
        config,
        distributed.make_mesh(),
        channels=FLAGS.channels,
        donate=FLAGS.donate,
    )
    train_step = program.train_step
    state = program.init()
    votes = program.stop_votes(False)

    rng = np.random.default_rng(0)
    shape = (FLAGS.batch_size, image_size, image_size, FLAGS.channels)
    batch = jax.device_put(
        {
            "image": rng.integers(0, 256, shape, dtype=np.uint8),
            "label": rng.integers(0, FLAGS.num_classes, FLAGS.batch_size, dtype=np.int32),
        },
        program.batch_sharding,
    )

    start = time.perf_counter()
    compiled = train_step.lower(state, batch, votes).compile()
    compile_s = time.perf_counter() - start
    flops = xla_cost(compiled, "flops")
    # The compiled module is the per-device SPMD program: scale to the global batch.
    flops_per_image = flops * jax.device_count() / FLAGS.batch_size if flops else None
    # XLA's estimate of memory traffic per step and device: what BatchNorm and elementwise
    # fusions are bound by, so a layer change shows here even where timings are noise.
    bytes_accessed = xla_cost(compiled, "bytes accessed")

    def run(n):
        nonlocal state
        metrics = None
        for _ in range(n):
            state, metrics = compiled(state, batch, votes)
        jax.block_until_ready((state, metrics))  # the only host sync of the timed loop

    run(max(FLAGS.warmup, 1))  # at least one: a jax that did not cache the compile does it here
    seconds = time_repeats(lambda: run(FLAGS.steps), FLAGS.repeats)
    if FLAGS.hlo_out and extras:
        write_text(FLAGS.hlo_out, compiled.as_text())
    trace = None
    if FLAGS.profile_dir and extras:  # after the timing, so tracing costs the figures nothing
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0  # device ops are the point; Python frames bloat it
        with jax.profiler.trace(FLAGS.profile_dir, profiler_options=options):
            run(FLAGS.profile_steps)
        trace = profile_summary.newest_trace(FLAGS.profile_dir)
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "seconds": seconds,
        "compile_s": compile_s,
        "flops_per_image": flops_per_image,
        "bytes_accessed_per_step": bytes_accessed,
        "memory": memory(compiled),
        "profile": trace,
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
    }


def bench_torch(image_size: int) -> dict:
    """torchvision's ResNet with torch.compile, channels_last and bf16 autocast."""
    try:  # imported here only: the JAX benchmark must not depend on torch
        import torch
        import torchvision
    except ImportError as e:  # installed but broken (e.g. a CUDA library mismatch)
        print(f"peer torch: skipped (import failed: {e})")
        return {"skipped": f"import failed: {e}"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = getattr(torchvision.models, FLAGS.model)(num_classes=FLAGS.num_classes)
    model = model.to(device=device, memory_format=torch.channels_last)
    compiled = torch.compile(model)
    opt = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    size, batch = image_size, FLAGS.batch_size
    # Same input contract as ours: uint8 on the device, normalised inside the step.
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, FLAGS.num_classes, (batch,), device=device)
    mean = torch.tensor([123.675, 116.28, 103.53], device=device).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor([58.395, 57.12, 57.375], device=device).view(1, 3, 1, 1)
    bf16 = FLAGS.dtype == "bfloat16"

    def run(n):
        for _ in range(n):
            x = (images.float() - mean) * inv_std
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(compiled(x), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()

    run(max(FLAGS.warmup, 3))  # the first calls compile (forward, then backward)
    seconds = time_repeats(lambda: run(FLAGS.steps), FLAGS.repeats)
    return {
        "device": device,
        "torch_version": torch.__version__,
        "images_per_second": FLAGS.steps * batch / seconds,
    }


def size_row(image_size: int, seconds: float, compile_s: float) -> dict:
    """One size's figures from the median seconds of --steps steps."""
    return {
        "image_size": image_size,
        "images_per_second": FLAGS.steps * FLAGS.batch_size / seconds,
        "step_time_ms": 1e3 * seconds / FLAGS.steps,
        "compile_s": compile_s,
    }


def per_image_size(sizes: list[int], first: dict, microbatches: int) -> list[dict]:
    """`first` (the first size, already timed) and every other size timed, one line each."""
    rows = [first]
    for size in sizes[1:]:
        other = bench_jax(size, microbatches, extras=False)
        rows.append(size_row(size, other["seconds"], other["compile_s"]))
    for row in rows:
        ratio = row["images_per_second"] / first["images_per_second"]
        print(
            f"  at {row['image_size']}px: {row['images_per_second']:,.1f} images/s, step "
            f"{row['step_time_ms']:.2f} ms, {ratio:.3f} x the first size's images/s "
            f"(compile {row['compile_s']:.1f}s)"
        )
    return rows


def _microbatch_counts() -> list[int]:
    try:
        counts = [int(k) for k in FLAGS.microbatches]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        sys.exit(f"error: --microbatches={','.join(FLAGS.microbatches)}: give counts >= 1")
    return counts


def _microbatch_figures(microbatches: int, run: dict) -> dict:
    return {
        "microbatches": microbatches,
        "images_per_second": FLAGS.steps * FLAGS.batch_size / run["seconds"],
        "step_time_ms": 1e3 * run["seconds"] / FLAGS.steps,
        "memory": run["memory"],
    }


def _print_microbatch_line(figures: dict) -> None:
    """One line per micro-batch count: its speed, and XLA's memory per device."""
    line = (
        f"  micro-batches {figures['microbatches']}: {figures['images_per_second']:,.1f} "
        f"images/s, step {figures['step_time_ms']:.2f} ms"
    )
    if memory := figures["memory"]:
        mib = lambda name: f"{memory[name] / 2**20:,.1f}"
        line += (
            f"; XLA memory per device: scratch {mib('temp')} MiB, arguments "
            f"{mib('argument')} MiB, outputs {mib('output')} MiB ({mib('alias')} MiB of them "
            f"in donated buffers), total {mib('total')} MiB"
        )
    print(line)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.peer == "torch" and (FLAGS.model not in TORCHVISION_MODELS or FLAGS.channels != 3):
        sys.exit(
            f"error: --peer=torch needs a torchvision model ({', '.join(TORCHVISION_MODELS)})"
            f" and --channels=3; got --model={FLAGS.model} --channels={FLAGS.channels}. "
            "The CIFAR ResNets have no torchvision counterpart."
        )
    peer_missing = [m for m in ("torch", "torchvision") if importlib.util.find_spec(m) is None]
    if FLAGS.peer == "torch" and peer_missing:  # said up front, before the long JAX part
        print(f"peer torch: skipped ({' and '.join(peer_missing)} not installed)")
    if FLAGS.peer == "torch" and not peer_missing:
        # JAX preallocates 75% of GPU memory by default, leaving torch too little; share it.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    on_gpu = xla_env.gpu_expected()
    xla_added = xla_env.set_gpu_xla_flags() if FLAGS.gpu_xla_flags and on_gpu else []

    sizes, counts = image_sizes(), _microbatch_counts()
    image_size = sizes[0]
    # The first import of jax happens here, after XLA_FLAGS is set.
    runs = [bench_jax(image_size, k, extras=i == 0) for i, k in enumerate(counts)]
    by_microbatches = [_microbatch_figures(k, run) for k, run in zip(counts, runs)]
    ours = runs[0]  # the full report is of the first size and count
    seconds, flops, source = ours.pop("seconds"), ours.pop("flops_per_image"), "xla_cost_analysis"
    ips = FLAGS.steps * FLAGS.batch_size / seconds
    if flops is None:
        flops, source = analytical_flops(FLAGS.model, image_size), "analytical"
    tflops = ips * flops / 1e12
    peak = FLAGS.peak_tflops or peak_tflops(ours["device_kind"])
    mfu = tflops / peak if peak else None

    command = "python -m tools.bench.step " + shlex.join(sys.argv[1:])
    print(f"command: {command}")
    print(
        f"jax {ours['jax_version']}, flax {ours['flax_version']}; {ours['devices']} x "
        f"{ours['device_kind']} ({ours['platform']}); XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}"
    )
    print(
        f"{FLAGS.model} {FLAGS.dtype} batch {FLAGS.batch_size} at {image_size}px, "
        f"{FLAGS.batch_norm} BatchNorm, {FLAGS.max_pool} max pool, {counts[0]} micro-batch(es): "
        f"compile {ours['compile_s']:.1f}s, median of {FLAGS.repeats} x {FLAGS.steps} steps"
    )
    print(
        f"  {ips:,.1f} images/s ({ips / ours['devices']:,.1f} per device), "
        f"step {1e3 * seconds / FLAGS.steps:.2f} ms"
    )
    print(
        f"  {flops / 1e9:.3f} GFLOP/image ({source}; analytical "
        f"{analytical_flops(FLAGS.model, image_size) / 1e9:.3f}), {tflops:.2f} TFLOP/s, "
        f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}% of {peak:g} TFLOP/s'}"
    )
    if ours["bytes_accessed_per_step"]:
        traffic = ours["bytes_accessed_per_step"]
        scratch = (ours["memory"] or {}).get("temp")
        print(
            f"  XLA estimate per device and step: {traffic / 1e9:.3f} GB accessed "
            f"({traffic / (seconds / FLAGS.steps) / 1e9:,.1f} GB/s at this step time)"
            + (f", {scratch / 1e6:,.1f} MB scratch" if scratch else "")
        )
    for figures in by_microbatches:
        _print_microbatch_line(figures)
    result = {
        "model": FLAGS.model,
        "batch_size": FLAGS.batch_size,
        "image_size": image_size,
        "dtype": FLAGS.dtype,
        "batch_norm": FLAGS.batch_norm,
        "max_pool": FLAGS.max_pool,
        "donate": FLAGS.donate,
        "microbatches": counts[0],
        "images_per_second": ips,
        "images_per_second_per_device": ips / ours["devices"],
        "step_time_ms": 1e3 * seconds / FLAGS.steps,
        "flops_per_image": flops,
        "flops_source": source,
        "achieved_tflops": tflops,
        "peak_tflops": peak,
        "mfu": mfu,
        "gpu_xla_flags": xla_added if ours["platform"] == "gpu" else [],
        "command": command,
        **ours,
        "by_microbatches": by_microbatches,
    }
    if len(sizes) > 1:
        first = size_row(image_size, seconds, ours["compile_s"])
        result["per_image_size"] = per_image_size(sizes, first, counts[0])
    # The figures first: the profile summary and the torch peer come after, and if either
    # fails the process exits non-zero with our figures already printed (bench_suite keeps
    # the last JSON line it finds).
    print(json.dumps(result), flush=True)
    if trace := result["profile"]:
        print(f"profile of {FLAGS.profile_steps} steps:")
        print(profile_summary.summarize(trace, top=20))
    if FLAGS.peer == "torch":
        missing = " and ".join(peer_missing)
        peer = {"skipped": f"{missing} not installed"} if missing else bench_torch(image_size)
        result["peer"] = peer
        if "images_per_second" in peer:
            result["ratio_vs_peer"] = ratio = ips / peer["images_per_second"]
            print(
                f"peer torch {peer['torch_version']} ({peer['device']}): "
                f"{peer['images_per_second']:,.1f} images/s; ours/peer = {ratio:.3f}"
            )
        print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
