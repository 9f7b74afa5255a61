"""Shared test helpers: tiny datasets, running the real launcher, reading checkpoints."""

from __future__ import annotations

import functools
import io
import os
import subprocess
import sys

import numpy as np

import pipeline
from pipeline import conversion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(pipeline.EMBEDDED_DIR, "mnist-t10k")


def _subset(lo: int, hi: int, example_id: int) -> bool:
    return lo <= example_id < hi


def make_mnist_subset(directory: str, first: int, count: int) -> str:
    """ArrayRecord dataset of the shipped MNIST digits with ids [first, first + count)."""
    conversion.convert(
        "mnist",
        MNIST,
        directory,
        progress=False,
        keep=functools.partial(_subset, first, first + count),
    )
    return directory


def rgb_copy(data_dir: str, root) -> str:
    """The same digits as 3-channel PNGs in an imagefolder under `root`, converted."""
    from pipeline import dataset, records, transforms  # pylint: disable=g-import-not-at-top

    info = dataset.load_info(data_dir)
    source = dataset.grain.sources.ArrayRecordDataSource(list(info.shard_paths))
    folder = os.path.join(root, "rgb-images")
    for i in range(len(source)):
        example = records.decode_example(source[i])
        image = transforms.decode_image(example.image, 3)
        os.makedirs(os.path.join(folder, str(example.label)), exist_ok=True)
        image.save(os.path.join(folder, str(example.label), f"{example.example_id:05d}.png"))
    out = os.path.join(root, "rgb")
    conversion.convert("imagefolder", folder, out, progress=False)
    return out


def jpeg_restart_interval(jpeg: bytes) -> int:
    """The restart interval (MCUs) of a JPEG's DRI segment, before its scan; 0 without one.
    Walks the header's segments, so bytes inside an EXIF or ICC payload are never read as one."""
    pos = 2
    while pos + 4 <= len(jpeg) and jpeg[pos] == 0xFF:
        marker = jpeg[pos + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # fill; no length
            pos += 1 if marker == 0xFF else 2
            continue
        if marker == 0xDA:  # the scan: no DRI before it
            return 0
        if marker == 0xDD:
            return int.from_bytes(jpeg[pos + 4 : pos + 6], "big")
        pos += 2 + int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
    return 0


def jpeg_mcus_per_row(jpeg: bytes) -> int:
    """MCUs in a row of a JPEG's (interleaved, or single-component) scan, from PIL's header."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    with Image.open(io.BytesIO(jpeg)) as image:
        samples = image.layer if len(image.layer) > 1 else [(0, 1, 1, 0)]
        return -(-image.size[0] // (8 * max(h for _, h, _, _ in samples)))


def tiny_resnet(*, num_classes: int = 10, in_channels: int = 3, seed: int = 0, **options):
    """A ResNet of one basic block per stage, 4/8/16 channels wide (the CIFAR family's shape
    with n = 1): every kind of layer and shortcut of ResNet-20, a tenth of its compile time.
    For tests of the step's maths, which do not depend on depth."""
    from flax import nnx  # pylint: disable=g-import-not-at-top

    import resnet  # pylint: disable=g-import-not-at-top

    return resnet.ResNet(
        resnet.BasicBlock, (1, 1, 1), (4, 8, 16), num_classes=num_classes, stem="cifar",
        rngs=nnx.Rngs(seed), in_channels=in_channels, shortcut="zero_pad", **options,
    )  # fmt: skip


# Every test process compiles at LLVM's lowest optimisation level: compiling is most of what
# the tests spend (a third less CPU time in all); their tiny programs hardly run slower.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def child_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO
    return env


def _tiny_settings(train_dir: str, eval_dir: str, overrides: dict) -> dict:
    settings = {
        "model.name": "resnet8",  # the demo's ResNet-20 at a third of the compile time
        "data.embedded": "",
        "data.train_dir": train_dir,
        "data.eval_dir": eval_dir,
        "data.image_size": 16,
        "train.global_batch_size": 16,
        "train.num_steps": 8,
        "train.log_every_steps": 2,
        "train.num_image_summaries": 2,
        "checkpoint.every_steps": 4,
        "checkpoint.max_to_keep": 5,
        "distributed.heartbeat_timeout_seconds": 10,
    }
    settings.update(overrides)
    return settings


def tiny_run_args(train_dir: str, eval_dir: str, workdir: str, **overrides) -> list[str]:
    """Launcher flags for a small, fast run of configs/demo.py on the given data."""
    settings = _tiny_settings(train_dir, eval_dir, overrides)
    args = ["--config=configs/demo.py", f"--workdir={workdir}"]
    return args + [f"--config.{k}={v}" for k, v in settings.items()]


def tiny_config(train_dir: str, eval_dir: str, **overrides):
    """The same run as `tiny_run_args`, as a config for calling the launcher in-process."""
    from configs import demo  # pylint: disable=g-import-not-at-top

    config = demo.get_config()
    for key, value in _tiny_settings(train_dir, eval_dir, overrides).items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def launcher_command(
    args: list[str],
    processes: int,
    devices: int,
    module: str = "launch.main",
    cluster_flags: tuple[str, ...] = (),
) -> list[str]:
    """The real launcher: directly for one process, through local_cluster for more."""
    if processes == 1:
        return [sys.executable, "-m", module, *args]
    return [
        sys.executable, "-m", "launch.local_cluster", f"--num_processes={processes}",
        f"--devices_per_process={devices}", f"--module={module}", *cluster_flags, "--", *args,
    ]  # fmt: skip


def launch(
    args: list[str],
    *,
    processes: int = 1,
    devices: int = 4,
    timeout: float = 300,
    module: str = "launch.main",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Runs the launcher (or `module`, e.g. launch.evaluate) to completion, capturing output;
    `env` adds to (or replaces in) `child_env`."""
    return subprocess.run(
        launcher_command(args, processes, devices, module), cwd=REPO,
        env={**child_env(devices), **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def start(
    args: list[str], *, processes: int = 1, devices: int = 4, cluster_flags: tuple[str, ...] = ()
) -> subprocess.Popen:
    """Like `launch`, without waiting; stdout and stderr are merged."""
    return subprocess.Popen(
        launcher_command(args, processes, devices, cluster_flags=cluster_flags),
        cwd=REPO, env=child_env(devices),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def load_state(workdir: str, step: int) -> dict:
    """The saved TrainState of `step` as nested dicts of numpy arrays (any device count)."""
    from launch import checkpointing  # pylint: disable=g-import-not-at-top

    return checkpointing.read_numpy(os.path.join(workdir, "checkpoints", str(step), "state"))


def flat_arrays(tree) -> dict[str, np.ndarray]:
    import jax  # pylint: disable=g-import-not-at-top

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def start_hosts(args: list[str], *, processes: int = 2, devices: int = 2) -> list[subprocess.Popen]:
    """The launcher as separate host processes joined on localhost, with no supervisor."""
    import portpicker  # pylint: disable=g-import-not-at-top

    address = f"localhost:{portpicker.pick_unused_port()}"
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launch.main",
                *args,
                f"--coordinator_address={address}",
                f"--num_processes={processes}",
                f"--process_id={index}",
            ],
            cwd=REPO,
            env=child_env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(processes)
    ]


def wait_for_line(proc: subprocess.Popen, needle: str, seen: list[str]) -> bool:
    """Reads `proc`'s output into `seen` until a line contains `needle` (False at EOF)."""
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return True
    return False


def host_pid(workdir: str, process_id: int) -> int:
    """The pid of the launcher with this --process_id working on `workdir` (other runs on the
    machine, even other test sessions, must never be signalled by mistake)."""
    import re  # pylint: disable=g-import-not-at-top

    pattern = f"launch.main .*--workdir={re.escape(workdir)} .*--process_id={process_id}$"
    return int(subprocess.check_output(["pgrep", "-f", pattern], text=True).split()[0])
