"""After training: evaluate a checkpoint on any number of hosts, export it, predict with it,
and start a new run from trained (or torchvision-imported) weights. Real launcher runs."""

import json
import os
import shutil
import subprocess
import sys

import grain
import numpy as np
import pytest
import torch

import resnet.from_weights
import resnet.weights
from launch import checkpoint_weights, train
from launch.status import ExitStatus
from pipeline import dataset, records, transforms
from tests import helpers, torch_reference
from tests.hostile.harness import tree_digest
from tools import import_torchvision

pytestmark = pytest.mark.slow
IMAGENET = {"data.mean": "(123.675,116.28,103.53)", "data.std": "(58.395,57.12,57.375)"}


@pytest.fixture(scope="module")
def finished(tiny_finished, tmp_path_factory):
    """A copy of the shared tiny run: evaluating writes into its workdir."""
    workdir = str(tmp_path_factory.mktemp("finished") / "w")
    shutil.copytree(tiny_finished, workdir)
    return workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The demo's own data at 16 px, trained long enough to read digits (~90% top-1)."""
    workdir = str(tmp_path_factory.mktemp("trained") / "w")
    args = [
        "--config=configs/demo.py", f"--workdir={workdir}", "--config.data.image_size=16",
        "--config.train.global_batch_size=64", "--config.train.num_steps=150",
    ]  # fmt: skip
    run = helpers.launch(args)
    assert run.returncode == 0, run.stderr[-3000:]
    return workdir


def _tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=helpers.REPO, env=helpers.child_env(1),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("processes, devices", [(1, 4), (2, 2)])
def test_evaluate_reproduces_the_finished_figures(data, finished, processes, devices):
    args = helpers.tiny_run_args(*data, finished)
    before = tree_digest(finished)
    run = helpers.launch(args, processes=processes, devices=devices, module="launch.evaluate")
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    after = tree_digest(finished)
    after.pop("eval-step-8.json")
    before.pop("eval-step-8.json", None)
    assert after == before  # only the figures: no compilation cache entry, lock or events
    line = [x for x in run.stdout.splitlines() if '"eval/loss"' in x][-1]
    figures = json.loads(line[line.index("{") :])
    reported = json.load(open(os.path.join(finished, train.FINISHED_MARKER)))["eval"]
    assert figures["step"] == 8
    for key, value in reported.items():
        if (processes, devices) == (1, 4):  # the training's own topology: the same programs
            assert figures[key] == value, key
        else:  # another order of the cross-host sums
            assert figures[key] == pytest.approx(value, rel=1e-6), key
    assert json.load(open(os.path.join(finished, "eval-step-8.json")))["eval/count"] == 37


def test_evaluate_refuses_a_missing_step_in_one_line(data, finished):
    args = helpers.tiny_run_args(*data, finished) + ["--step=5"]
    run = helpers.launch(args, module="launch.evaluate", timeout=120)
    assert run.returncode == ExitStatus.BAD_INPUT
    assert "has no checkpoint of step 5" in run.stderr and "Traceback" not in run.stderr


def _eval_images(eval_dir: str, image_size: int, channels: int):
    info = dataset.load_info(eval_dir)
    source = grain.sources.ArrayRecordDataSource(list(info.shard_paths))
    examples = [records.decode_example(source[i]) for i in range(len(source))]
    images = np.stack(
        [
            transforms.center_crop(
                transforms.decode_image(e.image, channels), image_size, channels, 1.0
            )
            for e in examples
        ]
    )
    return images, np.array([e.label for e in examples])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_exported_model_computes_what_the_checkpoint_computes(data, finished, tmp_path, dtype):
    out = str(tmp_path / "exported")
    run = _tool("tools.export", f"--workdir={finished}", f"--output={out}", f"--dtype={dtype}")
    assert run.returncode == 0, run.stderr[-3000:]
    images, _ = _eval_images(data[1], 16, 1)
    direct = np.asarray(
        resnet.from_weights.Predictor(checkpoint_weights.weights_from_checkpoint(finished))(images)
    )
    exported = np.asarray(resnet.from_weights.load_for_inference(out)(images))
    if dtype == "float32":
        np.testing.assert_array_equal(exported, direct)
    else:  # the arrays were rounded to bfloat16
        np.testing.assert_allclose(exported, direct, atol=0.05 * np.abs(direct).max())
    again = _tool("tools.export", f"--workdir={finished}", f"--output={out}")
    assert again.returncode == ExitStatus.BAD_INPUT and "exists" in again.stderr  # never overwrites


def test_predict_names_the_class_of_training_digits(trained, tmp_path):
    record = json.load(open(os.path.join(trained, train.FINISHED_MARKER)))
    train_dir = record["data"]["train"]["path"]  # the converted demo data it trained on
    info = dataset.load_info(train_dir)
    source = grain.sources.ArrayRecordDataSource(list(info.shard_paths))
    folder = tmp_path / "digits"
    folder.mkdir()
    labels = {}
    for i in range(20):
        example = records.decode_example(source[i])
        name = f"digit-{example.example_id}.png"
        transforms.decode_image(example.image, 1).save(folder / name)
        labels[name] = str(example.label)
    run = _tool("tools.predict", f"--workdir={trained}", "--json", str(folder))
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(results) == 20
    right = sum(r["top"][0]["class"] == labels[os.path.basename(r["image"])] for r in results)
    assert right >= 18, results  # ~90% top-1 after 150 steps; these digits were trained on
    for r in results:
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6


def _imported_resnet18(tmp_path, num_classes: int) -> str:
    weights_file = str(tmp_path / f"resnet18-{num_classes}.pth")
    torch.save(
        torch_reference.random_resnet("resnet18", num_classes, seed=3).state_dict(), weights_file
    )
    out = str(tmp_path / f"imported-{num_classes}")
    import_torchvision.import_torchvision(
        "resnet18", weights_file, out, image_size=32, eval_crop_fraction=1.0
    )
    return out


def _finetune_args(rgb_dirs, workdir, weights, **overrides):
    settings = {
        "model.name": "resnet18",
        "model.init_from": weights,
        "data.image_size": 32,
        "data.eval_crop_fraction": 1.0,
        "eval.at_start": True,
        "train.num_steps": 2,
        **IMAGENET,
        **overrides,
    }
    return helpers.tiny_run_args(*rgb_dirs, workdir, **settings)


def test_fine_tuning_starts_from_the_imported_weights(data, tmp_path):
    rgb = (
        helpers.rgb_copy(data[0], tmp_path / "train"),
        helpers.rgb_copy(data[1], tmp_path / "eval"),
    )
    weights = _imported_resnet18(tmp_path, 10)
    workdir = str(tmp_path / "w")
    run = helpers.launch(_finetune_args(rgb, workdir, weights))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"initialised from {weights}" in run.stderr
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        first = [json.loads(x) for x in f if '"eval"' in x][0]
    assert first["step"] == 0
    # The imported model evaluated directly, the plain way.
    images, labels = _eval_images(rgb[1], 32, 3)
    logits = np.asarray(resnet.from_weights.load_for_inference(weights)(images), np.float64)
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    assert first["eval/top1"] == np.mean(logits.argmax(1) == labels)
    assert first["eval/loss"] == pytest.approx(
        -log_probs[np.arange(len(labels)), labels].mean(), rel=1e-5
    )


def test_a_head_of_another_size_is_replaced(data, tmp_path):
    rgb = (helpers.rgb_copy(data[0], tmp_path / "train"), "")
    weights = _imported_resnet18(tmp_path, 1000)
    workdir = str(tmp_path / "w")
    args = _finetune_args(
        rgb, workdir, weights, **{"train.base_learning_rate": 0.0, "eval.at_start": False}
    )
    run = helpers.launch(args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "has 1000 classes, this run 10: it is initialised afresh" in run.stderr
    imported = resnet.weights.flatten(resnet.weights.load(weights).params)
    trained = resnet.weights.flatten(checkpoint_weights.weights_from_checkpoint(workdir).params)
    assert trained["head/kernel"].shape == (512, 10)
    for path, value in imported.items():  # a zero learning rate leaves the parameters as given
        if not path.startswith("head/"):
            np.testing.assert_array_equal(trained[path], value, err_msg=path)
