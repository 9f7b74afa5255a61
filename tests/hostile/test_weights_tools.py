"""Hostile cases for weights folders and the tools that write and read them, one row per case.

A weights folder is trusted only if every array matches the SHA-256 that model.json holds for
it; export writes only new folders outside any run's checkpoints; predict names every image it
cannot classify and classifies the rest. Every row asserts the exit status, the one `error:`
line and that the user's files are as they were. The tools run in-process through their
command functions (what `main` calls after parsing flags); the launcher's `init_from` through
its one mapping of errors to exit statuses.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import resnet
import resnet.from_weights
import resnet.weights
from launch import checkpointing, distributed, setup
from launch import main as launcher
from launch import program as program_lib
from launch.status import ExitStatus
from tests import helpers
from tests.hostile.harness import assert_one_clear_line, tree_digest
from tools import export, predict

PREPROCESSING = {"mean": [33.3], "std": [78.6], "image_size": 16, "eval_crop_fraction": 1.0}


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> str:
    """A real weights folder of the demo's model (resnet20, 10 classes, one channel)."""
    model = resnet.create_model("resnet20", num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    path = str(tmp_path_factory.mktemp("weights") / "digits")
    resnet.weights.save(
        path,
        model={"name": "resnet20", "num_classes": 10, "in_channels": 1},
        params=params,
        batch_stats=batch_stats,
        preprocessing=PREPROCESSING,
    )
    return path


def _copy(weights_dir: str, root) -> str:
    path = str(root / "model")
    shutil.copytree(weights_dir, path)
    return path


def _largest_array_file(path: str) -> str:
    files = [os.path.join(r, n) for r, _, names in os.walk(path) for n in names]
    return max(files, key=os.path.getsize)


def _flip_one_bit(path: str) -> None:
    """One bit in the middle of the largest data file: a parameter changes, Orbax reads it."""
    file = _largest_array_file(os.path.join(path, resnet.weights.ARRAYS))
    with open(file, "r+b") as f:
        f.seek(os.path.getsize(file) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


def _capture(capfd, command) -> tuple[int, str, str]:
    capfd.readouterr()
    status = command()
    out = capfd.readouterr()
    return status, out.out, out.err


# --- a weights folder that cannot be trusted, given to predict ------------------------------


def _flipped(weights_dir, root) -> tuple[str, tuple[str, ...]]:
    path = _copy(weights_dir, root)
    _flip_one_bit(path)
    return path, (path, "does not match its SHA-256 in model.json", "array ")


def _no_model_json(weights_dir, root) -> tuple[str, tuple[str, ...]]:
    path = _copy(weights_dir, root)
    os.remove(os.path.join(path, resnet.weights.MODEL_JSON))
    return path, (path, "has no model.json: not a weights folder written by tools.export")


def _empty_folder(weights_dir, root) -> tuple[str, tuple[str, ...]]:
    path = str(root / "model")
    os.mkdir(path)
    return path, (path, "has no model.json")


def _digest_removed(weights_dir, root) -> tuple[str, tuple[str, ...]]:
    path = _copy(weights_dir, root)
    file = os.path.join(path, resnet.weights.MODEL_JSON)
    with open(file) as f:
        text = f.read()
    with open(file, "w") as f:
        f.write(text.replace('"sha256"', '"sha-256"'))
    return path, ("model.json: 'sha256' is missing",)


UNTRUSTED = [  # damage found: 1 (failed); not weights at all: 2 (bad input)
    pytest.param(_flipped, ExitStatus.FAILED, id="flipped-bit"),
    pytest.param(_no_model_json, ExitStatus.BAD_INPUT, id="no-model-json"),
    pytest.param(_empty_folder, ExitStatus.BAD_INPUT, id="empty-folder"),
    pytest.param(_digest_removed, ExitStatus.BAD_INPUT, id="no-digests"),
]


@pytest.mark.parametrize("make, expected_status", UNTRUSTED)
def test_predict_refuses_weights_it_cannot_trust(
    weights_dir, tmp_path, capfd, make, expected_status
):
    path, expected = make(weights_dir, tmp_path)
    image = str(tmp_path / "digit.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)
    before = tree_digest(str(tmp_path))
    status, out, err = _capture(capfd, lambda: predict.predict_command([image], weights=path))
    assert status == expected_status and out == ""
    assert_one_clear_line(err, *expected)
    assert tree_digest(str(tmp_path)) == before


def test_a_flipped_bit_names_the_array_it_changed(weights_dir, tmp_path):
    path = _copy(weights_dir, tmp_path)
    _flip_one_bit(path)
    with pytest.raises(resnet.weights.DigestMismatch) as info:
        resnet.from_weights.load_for_inference(path)
    original = resnet.weights.flatten(checkpointing.read_numpy(os.path.join(weights_dir, "arrays")))
    tampered = resnet.weights.flatten(checkpointing.read_numpy(os.path.join(path, "arrays")))
    changed = [p for p in original if not np.array_equal(original[p], tampered[p])]
    assert len(changed) == 1  # Orbax reads the flipped bit back without complaint
    assert f"array {changed[0]} does not match" in str(info.value)


# --- export: only new folders, never among a run's checkpoints ------------------------------


def _run_with_a_checkpoint(root) -> str:
    """A workdir holding one real committed checkpoint (written by the launcher's Checkpointer)."""
    workdir = str(root / "run")
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=2,
        async_save=False,
        barrier_timeout_seconds=60,
    )
    try:
        ckpt.save(4, {"w": jnp.ones((3,))}, {})
        ckpt.wait()
    finally:
        ckpt.close()
    return workdir


def _into_checkpoints(workdir: str, root) -> str:
    return os.path.join(workdir, "checkpoints", "exported")


def _into_a_step(workdir: str, root) -> str:
    return os.path.join(workdir, "checkpoints", "4", "exported")


def _onto_a_folder(workdir: str, root) -> str:
    os.makedirs(root / "mine")
    (root / "mine" / "notes.txt").write_text("the user's own file")
    return str(root / "mine")


def _onto_a_file(workdir: str, root) -> str:
    (root / "model.bin").write_bytes(b"\x00" * 16)
    return str(root / "model.bin")


EXPORT_REFUSED = [
    pytest.param(_into_checkpoints, "a run's checkpoints folder", id="into-checkpoints"),
    pytest.param(_into_a_step, "a run's checkpoints folder", id="into-a-step"),
    pytest.param(_onto_a_folder, "exists; weights are written to a new directory", id="folder"),
    pytest.param(_onto_a_file, "exists; weights are written to a new directory", id="file"),
]


@pytest.mark.parametrize("target, words", EXPORT_REFUSED)
def test_export_writes_only_new_folders_outside_checkpoints(tmp_path, capfd, target, words):
    workdir = _run_with_a_checkpoint(tmp_path)
    output = target(workdir, tmp_path)
    before = tree_digest(str(tmp_path))
    status, out, err = _capture(capfd, lambda: export.export(workdir, output))
    assert status == ExitStatus.BAD_INPUT and out == ""
    assert_one_clear_line(err, output, words)
    assert tree_digest(str(tmp_path)) == before


# --- predict: every bad image named, the good ones classified --------------------------------


def _png(width: int, height: int) -> bytes:
    """A valid grey PNG of zeros: a few hundred KB that decode to width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def _photos(folder) -> dict[str, str]:
    """Good digits and, among them, one image of each kind predict cannot classify; returns
    file name -> what its line must say ("" for the good ones)."""
    folder.mkdir()
    rng = np.random.RandomState(0)
    for name in ("a-good.png", "m-good.jpg", "z-good.png"):
        Image.fromarray(rng.randint(0, 256, (40, 40), np.uint8)).save(folder / name)
    noisy = folder / "corrupt.png"
    Image.fromarray(rng.randint(0, 256, (64, 64), np.uint8)).save(noisy)
    noisy.write_bytes(noisy.read_bytes()[: noisy.stat().st_size * 2 // 3])
    (folder / "notes.png").write_text("a shopping list, not an image")
    (folder / "bomb.png").write_bytes(_png(20_000, 20_000))  # over twice PIL's pixel limit
    (folder / "large.png").write_bytes(_png(10_000, 10_000))  # over PIL's warning limit
    return {
        "a-good.png": "",
        "m-good.jpg": "",
        "z-good.png": "",
        "corrupt.png": "cannot decode the image",
        "notes.png": "not an image file that PIL can read",
        "bomb.png": "too many pixels to decode safely",
        "large.png": "too many pixels to decode safely",
    }


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_predict_names_every_bad_image_and_classifies_the_rest(
    weights_dir, tmp_path, capfd, as_json
):
    folder = tmp_path / "photos"
    expected = _photos(folder)
    before = tree_digest(str(tmp_path))
    status, out, err = _capture(
        capfd, lambda: predict.predict_command([str(folder)], weights=weights_dir, as_json=as_json)
    )
    assert status == 1
    good = sorted(n for n, why in expected.items() if not why)
    lines = out.splitlines()
    classified = (
        [json.loads(x)["image"] for x in lines] if as_json else [x.split(": ")[0] for x in lines]
    )
    assert [os.path.basename(p) for p in classified] == good
    bad = {n: why for n, why in expected.items() if why}
    assert_one_clear_line(err, f"{len(bad)} of {len(expected)} images could not be classified")
    for name, why in bad.items():
        lines = [x for x in err.splitlines() if x.startswith(str(folder / name) + ":")]
        assert len(lines) == 1 and why in lines[0], (name, err)
    assert "BytesIO" not in err and "Warning" not in err
    assert tree_digest(str(tmp_path)) == before


def test_predict_with_only_good_images_exits_0(weights_dir, tmp_path, capfd):
    image = str(tmp_path / "digit.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(image)
    status, out, err = _capture(
        capfd, lambda: predict.predict_command([image], weights=weights_dir)
    )
    assert status == 0 and out.startswith(f"{image}: ") and "error" not in err


# --- init_from: a tampered weights folder is bad input to the launcher (exit 2) -------------


def test_init_from_a_tampered_folder_is_refused_with_status_2(data, weights_dir, tmp_path, capfd):
    path = _copy(weights_dir, tmp_path)
    _flip_one_bit(path)
    before = tree_digest(path)
    config = helpers.tiny_config(*data, **{"model.init_from": path})
    program = program_lib.build_program(
        config, distributed.make_mesh(), channels=1, steps_per_epoch=12, num_steps=8
    )
    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        launcher.exit_with_status(lambda: setup.initial_state(config, program))
    assert exited.value.code == ExitStatus.BAD_INPUT
    assert_one_clear_line(
        capfd.readouterr().err, f"config.model.init_from={path}", "does not match its SHA-256"
    )
    assert tree_digest(path) == before


# --- as the user runs them: what reaches the terminal (slow) --------------------------------


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=helpers.REPO, env=helpers.child_env(1),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _truncate_every_step(workdir: str) -> None:
    for step in checkpointing.committed_steps(workdir):
        state = os.path.join(workdir, "checkpoints", str(step), "state")
        file = _largest_array_file(state)
        os.truncate(file, 1000)


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["tools.export", "tools.predict"])
def test_a_failed_read_prints_one_line_and_no_library_noise(tiny_finished, tmp_path, tool):
    """One array of each checkpoint cut short: Orbax's restore fails while TensorStore's other
    reads are in flight. The user sees the one error line: no 'Event loop is closed'
    tracebacks, no Orbax INFO lines."""
    workdir = str(tmp_path / "w")
    shutil.copytree(tiny_finished, workdir)
    _truncate_every_step(workdir)
    image = str(tmp_path / "digit.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)
    before = tree_digest(str(tmp_path))
    if tool == "tools.export":
        run = _tool(tool, f"--workdir={workdir}", f"--output={tmp_path / 'model'}")
    else:
        run = _tool(tool, f"--workdir={workdir}", image)
    assert run.returncode == ExitStatus.BAD_INPUT
    assert_one_clear_line(run.stderr, "holds no trustworthy checkpoint")
    assert "Event loop is closed" not in run.stderr and "Task exception" not in run.stderr
    assert not [x for x in run.stderr.splitlines() if x.startswith("I")], run.stderr[-2000:]
    assert tree_digest(str(tmp_path)) == before


@pytest.mark.slow
def test_init_from_a_tampered_folder_through_the_launcher(data, weights_dir, tmp_path):
    path = _copy(weights_dir, tmp_path)
    _flip_one_bit(path)
    before = tree_digest(path)
    run = helpers.launch(
        helpers.tiny_run_args(*data, str(tmp_path / "w"), **{"model.init_from": path})
    )
    assert run.returncode == ExitStatus.BAD_INPUT, run.stderr[-3000:]
    assert_one_clear_line(run.stderr, f"config.model.init_from={path}", "SHA-256")
    assert tree_digest(path) == before


def test_the_digest_is_of_the_stored_bytes():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    same = np.asfortranarray(values)  # another memory layout, the same array
    assert resnet.weights.array_sha256(values) == resnet.weights.array_sha256(same)
    changed = values.copy()
    changed.flat[4] = np.nextafter(changed.flat[4], np.float32(np.inf))  # one ulp
    assert resnet.weights.array_sha256(changed) != resnet.weights.array_sha256(values)
    bf16 = jnp.asarray(values, jnp.bfloat16)
    assert resnet.weights.array_sha256(np.asarray(jax.device_get(bf16))) != (
        resnet.weights.array_sha256(values)
    )


USAGE = [
    pytest.param(("tools.predict", "--weights=/nowhere", "--bogus=1", "x.png"), "bogus", id="flag"),
    pytest.param(
        ("tools.predict", "x.png"), "exactly one of --workdir and --weights", id="neither"
    ),
    pytest.param(("tools.export", "--workdir=/w", "--output=/o", "extra"), "unexpected", id="arg"),
    pytest.param(("tools.import_torchvision", "--nonsense"), "nonsense", id="import-flag"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args, words", USAGE)
def test_a_tool_misused_says_so_in_one_line_with_status_2(tmp_path, args, words):
    before = tree_digest(str(tmp_path))
    run = _tool(*args)
    assert run.returncode == ExitStatus.BAD_INPUT, run.stderr[-2000:]
    assert_one_clear_line(run.stderr, words)
    assert tree_digest(str(tmp_path)) == before
