"""Our ImageNet ResNets against torchvision's, given the same weights; the importer
(tools.import_torchvision); the weights format (resnet.weights).

Equal parameter counts (test_model.py) do not prove equal networks: stride placement, padding,
BatchNorm epsilon or the order of a block's layers keep the count and change the function.
Here torchvision models with random weights *and* random BatchNorm statistics go through the
real importer, and both sides' logits are compared on the same images, in eval and training
mode; each of our modules is also run on the input torchvision's counterpart saw, so a
mismatch names the first layer that differs (tests/torch_reference.py).

Tolerances, relative to the reference's scale (max |diff| / max |reference|):
* eval logits and every single module (outputs and updated running statistics): 1e-4.
  Measured: ~1e-6.
* training-mode logits and running statistics after a whole forward: 1e-4, or three times
  torchvision's own float32 error (its float32 forward against its float64 forward) where
  that is larger. Batch statistics over a batch of 2 make a deep network's training-mode
  forward ill-conditioned: torchvision's float32 result is itself ~3e-4 (ResNet-101) and
  ~1e-3 (ResNet-152) away from its float64 result at 64x64, and ours is as close.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import resnet
import resnet.from_weights
import resnet.weights
from launch.status import ExitStatus
from resnet import steps
from tests import torch_reference as ref
from tools import import_torchvision as tv_import

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_CLASSES = 10
RTOL = 1e-4
IMAGES = np.random.RandomState(0).randint(0, 256, (2, 64, 64, 3)).astype(np.uint8)
ALL_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def train_forward(model, x):
    """Training-mode logits; updates `model`'s running statistics."""
    return nnx.jit(lambda m, x: m(x, training=True))(model, x)


@dataclasses.dataclass
class Imported:
    torch_model: torch.nn.Module
    state_dict_file: str
    directory: str  # written by the importer
    model: resnet.ResNet  # resnet.from_weights.build of it


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """name -> Imported: a random torchvision model through the real import tool, made once
    per module."""
    root = tmp_path_factory.mktemp("torchvision")

    @functools.cache
    def make(name: str) -> Imported:
        torch_model = ref.random_resnet(name, NUM_CLASSES, seed=ALL_MODELS.index(name))
        file = str(root / f"{name}.pth")
        torch.save(torch_model.state_dict(), file)
        directory = str(root / name)
        tv_import.import_torchvision(name, file, directory)
        model = resnet.from_weights.build(resnet.weights.load(directory))
        return Imported(torch_model, file, directory, model)

    return make


def _explain(records, model, training) -> str:
    where = ref.first_difference(ref.module_differences(records, model, training), RTOL)
    return where or "every module agrees on torchvision's inputs: the wiring between them differs"


def check_eval(case: Imported, images: np.ndarray = IMAGES, per_module: bool = True) -> float:
    """Eval-mode logits of load_for_inference (uint8 in) against torchvision's on the same
    images with torchvision's normalisation; returns the relative difference.

    `per_module`: also every module on torchvision's inputs (always done to explain a failure).
    """
    predict = resnet.from_weights.load_for_inference(case.directory)
    ours = np.asarray(predict(images))
    logits, records, _ = ref.run(case.torch_model, ref.torch_input(images), training=False)
    rel = ref.relative_difference(ours, logits)
    assert rel <= RTOL, f"eval logits differ by {rel:.3g}; {_explain(records, case.model, False)}"
    if per_module:
        where = ref.first_difference(ref.module_differences(records, case.model, False), RTOL)
        assert where is None, where
    return rel


def float32_error(torch_model, x, training: bool) -> float:
    """How far torchvision's float32 forward is from its float64 one."""
    logits32, _, _ = ref.run(torch_model, x, training)
    logits64, _, _ = ref.run(copy.deepcopy(torch_model).double(), x.double(), training)
    return ref.relative_difference(logits32, logits64)


def check_train(case: Imported, per_module: bool = True) -> float:
    """Training-mode logits and the running statistics one forward leaves, against
    torchvision's; returns the relative logit difference."""
    x = ref.torch_input(IMAGES)
    logits, records, after = ref.run(case.torch_model, x, training=True)
    tol = max(RTOL, 3 * float32_error(case.torch_model, x, True))

    model = nnx.clone(case.model)
    ours = np.asarray(train_forward(model, jnp.asarray(ref.to_nhwc(x))))
    rel = ref.relative_difference(ours, logits)
    assert rel <= tol, (
        f"training-mode logits differ by {rel:.3g} (tolerance {tol:.3g}); "
        f"{_explain(records, case.model, True)}"
    )

    if per_module:  # each module on torchvision's inputs, BatchNorm statistics included
        diffs = ref.module_differences(records, case.model, True, case.torch_model, after)
        assert sum(name.endswith(".running_var") for name, _ in diffs) == sum(
            isinstance(m, torch.nn.BatchNorm2d) for m in case.torch_model.modules()
        )
        where = ref.first_difference(diffs, RTOL)
        assert where is None, where

    # The statistics the whole forward left behind.
    counts = {name: inp.numel() // inp.shape[1] for name, inp, _ in records}
    before_modules, after_modules = (
        dict(case.torch_model.named_modules()),
        dict(after.named_modules()),
    )
    for name, module in ref.our_modules(model).items():
        if isinstance(module, resnet.batch_norm.BatchNorm):
            mean, var = ref.expected_running_stats(
                before_modules[name], after_modules[name], counts[name]
            )
            for what, got, want in (
                ("mean", module.mean[...], mean),
                ("var", module.var[...], var),
            ):
                d = ref.relative_difference(got, want)
                assert d <= tol, f"{name}.running_{what} after a forward differs by {d:.3g}"
    return rel


# --- against torchvision ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_eval_mode_matches_torchvision(name, imported):
    check_eval(imported(name))


@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_training_mode_matches_torchvision(name, imported):
    check_train(imported(name))


def test_odd_image_size_matches_torchvision(imported):
    # Odd sizes at every stride-2 layer: padding and rounding must agree, not only the centre.
    check_eval(
        imported("resnet18"),
        np.random.RandomState(1).randint(0, 256, (1, 57, 43, 3)).astype(np.uint8),
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL_MODELS if n not in ("resnet18", "resnet50")])
def test_the_other_resnets_match_torchvision(name, imported):
    # ResNet-18 and -50 (basic and bottleneck blocks) are checked module by module above;
    # the deeper nets repeat those blocks, so their whole forwards are compared here.
    case = imported(name)
    eval_rel = check_eval(case, per_module=False)
    train_rel = check_train(case, per_module=False)
    print(f"{name}: eval {eval_rel:.2e}, train {train_rel:.2e}")


def test_a_difference_names_the_first_differing_layer(imported):
    case = imported("resnet18")
    broken = nnx.clone(case.model)
    broken.stages[2][1].bn1.var[...] = broken.stages[2][1].bn1.var[...] * 1.5
    _, records, after = ref.run(case.torch_model, ref.torch_input(IMAGES), training=False)
    where = ref.first_difference(ref.module_differences(records, broken, False), RTOL)
    assert where is not None and where.startswith("first differing module: layer3.1.bn1,")
    # In training mode the variance is not used but updated: the statistic is named.
    broken = nnx.clone(case.model)
    broken.stages[0][0].bn2.momentum = 0.99
    _, records, after = ref.run(case.torch_model, ref.torch_input(IMAGES), training=True)
    diffs = ref.module_differences(records, broken, True, case.torch_model, after)
    where = ref.first_difference(diffs, RTOL)
    assert where is not None and where.startswith(
        "first differing module: layer1.0.bn2.running_mean,"
    )


# --- the importer -----------------------------------------------------------------------------


def test_mapping_examples():
    key = tv_import.torchvision_key
    assert key("stem_conv/kernel") == "conv1.weight"
    assert key("stem_bn/var") == "bn1.running_var"
    assert key("stages/0/2/bn3/scale") == "layer1.2.bn3.weight"
    assert key("stages/1/0/shortcut/conv/kernel") == "layer2.0.downsample.0.weight"
    assert key("stages/3/0/shortcut/bn/mean") == "layer4.0.downsample.1.running_mean"
    assert key("head/kernel") == "fc.weight"
    conv = np.arange(2 * 3 * 5 * 7).reshape(2, 3, 5, 7)  # OIHW
    assert tv_import.to_ours(conv)[4, 6, 2, 1] == conv[1, 2, 4, 6]
    assert tv_import.to_ours(np.zeros((10, 512))).shape == (512, 10)


def test_imported_description(imported):
    weights = resnet.weights.load(imported("resnet18").directory)
    assert weights.model == {
        "name": "resnet18",
        "num_classes": NUM_CLASSES,
        "in_channels": 3,
        "shortcut": "projection",
        "bn_epsilon": 1e-5,
    }
    assert weights.preprocessing == {
        "mean": pytest.approx([123.675, 116.28, 103.53]),
        "std": pytest.approx([58.395, 57.12, 57.375]),
        "image_size": 224,
        "eval_crop_fraction": 0.875,
    }
    assert weights.class_names is None
    assert weights.metadata["source"] == "torchvision"
    sd = imported("resnet18").torch_model.state_dict()
    np.testing.assert_array_equal(
        weights.params["stages"]["1"]["0"]["conv2"]["kernel"],
        sd["layer2.0.conv2.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(weights.batch_stats["stem_bn"]["var"], sd["bn1.running_var"])


def _leaves(weights):
    return {
        f"{c}/{p}": v
        for c in ("params", "batch_stats")
        for p, v in resnet.weights.flatten(getattr(weights, c)).items()
    }


def _run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "tools.import_torchvision", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # runs the tool in a subprocess
def test_command_line(imported, tmp_path):
    case = imported("resnet18")
    names = tmp_path / "names.txt"
    names.write_text("".join(f"class {i}\n" for i in range(NUM_CLASSES)))
    out = str(tmp_path / "cli")
    args = [
        "--model=resnet18",
        f"--weights={case.state_dict_file}",
        f"--output={out}",
        f"--num_classes={NUM_CLASSES}",
        f"--class_names={names}",
        "--dtype=bfloat16",
        "--eval_crop_fraction=0.9655",  # torchvision's V2 weights: 224 of 232
    ]
    result = _run_cli(*args)
    assert result.returncode == 0, result.stderr
    weights = resnet.weights.load(out)
    assert weights.class_names == tuple(f"class {i}" for i in range(NUM_CLASSES))
    assert weights.dtype == "bfloat16"
    assert weights.preprocessing["eval_crop_fraction"] == 0.9655
    assert weights.preprocessing["image_size"] == 224
    expected = _leaves(resnet.weights.load(case.directory))
    got = _leaves(weights)
    assert got.keys() == expected.keys()
    for path, value in got.items():
        assert value.dtype == jnp.bfloat16
        np.testing.assert_array_equal(value, expected[path].astype(jnp.bfloat16), err_msg=path)

    again = _run_cli(*args)  # the output exists now
    assert again.returncode == ExitStatus.BAD_INPUT
    assert again.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "exists" in again.stderr


def test_whole_model_and_checkpoint_files(imported, tmp_path):
    case = imported("resnet18")
    expected = _leaves(resnet.weights.load(case.directory))
    sd = case.torch_model.state_dict()
    files = {
        "model.pth": case.torch_model,  # a pickled torchvision ResNet: allowed classes only
        "ckpt.pth": {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},  # DDP
    }
    for filename, obj in files.items():
        torch.save(obj, tmp_path / filename)
        out = str(tmp_path / filename.replace(".pth", ""))
        tv_import.import_torchvision("resnet18", str(tmp_path / filename), out)
        got = _leaves(resnet.weights.load(out))
        assert got.keys() == expected.keys()
        for path, value in got.items():
            np.testing.assert_array_equal(value, expected[path], err_msg=f"{filename}: {path}")


def test_foreign_pickled_code_needs_allow_pickle(imported, tmp_path):
    # torchvision's reference training scripts store their argparse arguments beside the model.
    file = str(tmp_path / "ckpt.pth")
    torch.save(
        {"model": imported("resnet18").torch_model.state_dict(), "args": argparse.Namespace()},
        file,
    )
    with pytest.raises(tv_import.ConversionError, match="argparse.Namespace.*--allow_pickle"):
        tv_import.import_torchvision("resnet18", file, str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused")
    tv_import.import_torchvision("resnet18", file, str(tmp_path / "trusted"), allow_pickle=True)
    assert resnet.weights.load(str(tmp_path / "trusted")).model["name"] == "resnet18"


def _broken(sd, drop=(), add=None, replace=None):
    sd = {k: v for k, v in sd.items() if k not in drop}
    sd.update(add or {})
    sd.update(replace or {})
    return sd


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(drop=["layer1.0.bn1.running_var"]), r"missing 1: layer1\.0\.bn1\.running_var$"),
        (
            dict(add={"fc2.weight": torch.zeros(3, 3), "layer9.0.conv1.weight": torch.zeros(1)}),
            r"not used 2: fc2\.weight, layer9\.0\.conv1\.weight$",
        ),
        (
            dict(replace={"layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)}),
            r"layer2\.0\.conv1\.weight has shape \(128, 64, 1, 1\).*needs \(3, 3, 64, 128\)",
        ),
        (dict(drop=["fc.weight"]), "fc.weight is missing"),
    ],
    ids=["missing", "extra", "shape", "no-head"],
)
def test_state_dict_must_fit_exactly(imported, change, message):
    sd = _broken(imported("resnet18").torch_model.state_dict(), **change)
    with pytest.raises(tv_import.ConversionError, match=message):
        tv_import.convert_state_dict("resnet18", sd)


def test_wrong_architecture_and_class_count(imported):
    sd = imported("resnet50").torch_model.state_dict()
    with pytest.raises(
        tv_import.ConversionError,
        match=r"fc.weight has shape \(10, 2048\).*resnet18 needs \(512, 10\)",
    ):
        tv_import.convert_state_dict("resnet18", sd)
    with pytest.raises(tv_import.ConversionError, match="--num_classes=1000 but fc.weight has 10"):
        tv_import.convert_state_dict("resnet50", sd, num_classes=1000)
    with pytest.raises(tv_import.ConversionError, match="unknown model 'resnet20'"):
        tv_import.convert_state_dict("resnet20", sd)


def test_import_refuses_to_overwrite(imported, tmp_path):
    case = imported("resnet18")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(tv_import.ConversionError, match="exists"):
        tv_import.import_torchvision("resnet18", case.state_dict_file, str(tmp_path / "taken"))
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]


# --- the weights format -----------------------------------------------------------------------

PREPROCESSING = {"mean": [33.3], "std": [78.6], "image_size": 12, "eval_crop_fraction": 1.0}


@pytest.fixture(scope="module")
def small_model():
    """A one-channel ResNet-20 (zero-pad shortcuts) with every variable random."""
    model = resnet.resnet20(num_classes=4, rngs=nnx.Rngs(0), in_channels=1)
    key = jax.random.key(7)
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        key, sub = jax.random.split(key)
        value = jax.random.normal(sub, var.shape) * 0.5
        var[...] = jnp.exp(value) if path[-1] == "var" else value + (path[-1] == "scale")
    return model


def _save(path, net, **kwargs):
    _, params, batch_stats = nnx.split(net, nnx.Param, nnx.BatchStat)
    args = dict(
        model={"name": "resnet20", "num_classes": 4, "in_channels": 1},
        params=params,
        batch_stats=batch_stats,
        preprocessing=PREPROCESSING,
    )
    args.update(kwargs)
    resnet.weights.save(str(path), **args)
    return str(path)


def _pixels(seed=1, shape=(3, 12, 12, 1)):
    return np.random.RandomState(seed).randint(0, 256, shape).astype(np.uint8)


def _direct(model, pixels):
    x = steps.normalize(pixels, PREPROCESSING["mean"], PREPROCESSING["std"], jnp.float32)
    return np.asarray(model(x, training=False))


def test_round_trip(small_model, tmp_path):
    names = ["a", "b", "c", "d"]
    path = _save(tmp_path / "w", small_model, class_names=names, metadata={"step": 5})
    assert sorted(os.listdir(tmp_path)) == ["w"]  # no temporary directory left
    with open(os.path.join(path, "model.json")) as f:
        description = json.load(f)
    assert description["format"] == "resnet-multihost-weights" and description["version"] == 1
    weights = resnet.weights.load(path)
    # The defaults are written out: the family's shortcut and the constructor's epsilon.
    assert weights.model == {
        "name": "resnet20",
        "num_classes": 4,
        "in_channels": 1,
        "shortcut": "zero_pad",
        "bn_epsilon": 1e-5,
    }
    assert weights.preprocessing == PREPROCESSING
    assert weights.class_names == tuple(names)
    assert weights.metadata == {"step": 5}
    assert weights.dtype == "float32"
    _, params, _ = nnx.split(small_model, nnx.Param, nnx.BatchStat)
    assert resnet.weights.flatten(weights.params).keys() == {
        "/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)
    }

    built = resnet.from_weights.build(weights)
    pixels = _pixels()
    np.testing.assert_array_equal(_direct(built, pixels), _direct(small_model, pixels))
    for (path_a, a), (path_b, b) in zip(
        nnx.to_flat_state(nnx.state(built)), nnx.to_flat_state(nnx.state(small_model))
    ):
        assert path_a == path_b
        np.testing.assert_array_equal(a[...], b[...])

    # Other implementations of the same function load the same weights.
    flax_bn = resnet.from_weights.build(weights, batch_norm="flax", max_pool="xla")
    np.testing.assert_allclose(
        _direct(flax_bn, pixels), _direct(small_model, pixels), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="fixed by the weights"):
        resnet.from_weights.build(weights, bn_epsilon=1e-3)


def test_load_for_inference(small_model, tmp_path):
    path = _save(tmp_path / "w", small_model)
    predict = resnet.from_weights.load_for_inference(path)
    pixels = _pixels(shape=(2, 16, 12, 1))
    logits = predict(pixels)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 4)
    np.testing.assert_allclose(logits, _direct(small_model, pixels), rtol=1e-5, atol=1e-5)
    # An example's logits do not depend on the rest of the batch: eval mode.
    np.testing.assert_allclose(predict(pixels[:1]), logits[:1], rtol=1e-5, atol=1e-5)
    assert predict.class_names is None and predict.preprocessing == PREPROCESSING
    with pytest.raises(ValueError, match=r"uint8 images shaped \(N, H, W, 1\)"):
        predict(pixels.astype(np.float32))
    with pytest.raises(ValueError, match=r"uint8 images shaped \(N, H, W, 1\)"):
        predict(np.zeros((2, 12, 12, 3), np.uint8))


def test_bfloat16_storage(small_model, tmp_path):
    path = _save(tmp_path / "w", small_model, dtype="bfloat16")
    weights = resnet.weights.load(path)
    assert weights.dtype == "bfloat16"
    kernel = weights.params["stages"]["1"]["0"]["conv1"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        kernel, np.asarray(small_model.stages[1][0].conv1.kernel[...]).astype(jnp.bfloat16)
    )
    built = resnet.from_weights.build(weights, dtype=jnp.bfloat16)
    assert built.stages[1][0].conv1.kernel[...].dtype == jnp.float32  # variables stay float32
    np.testing.assert_array_equal(built.stages[1][0].conv1.kernel[...], kernel.astype(np.float32))


def test_build_checks_every_variable(small_model, tmp_path):
    weights = resnet.weights.load(_save(tmp_path / "w", small_model))
    flat = resnet.weights.flatten(weights.params)

    def with_params(changed):
        return dataclasses.replace(weights, params=resnet.weights.unflatten(changed))

    wrong = dict(flat, **{"stages/1/0/conv1/kernel": np.zeros((3, 3, 16, 31), np.float32)})
    with pytest.raises(
        ValueError,
        match=r"stages/1/0/conv1/kernel has shape \(3, 3, 16, 31\), "
        r"the model needs \(3, 3, 16, 32\)",
    ):
        resnet.from_weights.build(with_params(wrong))
    missing = {k: v for k, v in flat.items() if k != "stages/2/1/bn2/bias"}
    with pytest.raises(
        ValueError, match="params do not match the model: missing 1: stages/2/1/bn2/bias$"
    ):
        resnet.from_weights.build(with_params(missing))
    extra = dict(flat, **{"stages/2/1/shortcut/conv/kernel": np.zeros((1, 1, 64, 64))})
    with pytest.raises(ValueError, match="unexpected 1: stages/2/1/shortcut/conv/kernel$"):
        resnet.from_weights.build(with_params(extra))


def test_assign_for_fine_tuning(small_model, tmp_path):
    weights = resnet.weights.load(_save(tmp_path / "w", small_model))
    model = resnet.resnet20(num_classes=7, rngs=nnx.Rngs(3), in_channels=1, batch_norm="flax")
    head = np.asarray(model.head.kernel[...])
    with pytest.raises(
        ValueError, match=r"params: head/bias has shape \(4,\), the model needs \(7,\)"
    ):
        resnet.from_weights.assign(model, weights)
    resnet.from_weights.assign(model, weights, skip=("head",))
    np.testing.assert_array_equal(model.head.kernel[...], head)
    np.testing.assert_array_equal(
        model.stages[2][2].bn2.var[...], small_model.stages[2][2].bn2.var[...]
    )
    np.testing.assert_array_equal(model.stem_conv.kernel[...], small_model.stem_conv.kernel[...])
    other_eps = resnet.resnet20(num_classes=4, rngs=nnx.Rngs(3), in_channels=1, bn_epsilon=1e-3)
    with pytest.raises(ValueError, match="epsilon"):
        resnet.from_weights.assign(other_eps, weights)


def test_save_refuses_existing_path_and_bad_arguments(small_model, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        _save(tmp_path / "taken", small_model)
    bad = [
        (dict(preprocessing=dict(PREPROCESSING, mean=[1.0, 2.0, 3.0])), "mean must be 1 number"),
        (dict(preprocessing={"mean": [1.0]}), "preprocessing needs exactly"),
        (dict(class_names=["a", "b"]), "2 class_names for 4 classes"),
        (dict(model={"name": "resnet20", "num_classes": 4, "width": 2}), "unknown model option"),
        (dict(model={"name": "resnet21", "num_classes": 4}), "resnet21"),
        (
            dict(model={"name": "resnet20", "num_classes": 5, "in_channels": 1}),
            r"save: params: head/bias has shape \(4,\), the model needs \(5,\)",
        ),
        (dict(dtype="float16"), "dtype must be one of"),
        (dict(metadata={"x": object()}), "not JSON-serialisable"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            _save(tmp_path / "new", small_model, **kwargs)
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # nothing written, nothing left behind


def _edit_json(path, edit):
    file = os.path.join(path, "model.json")
    with open(file) as f:
        description = json.load(f)
    edit(description)
    with open(file, "w") as f:
        json.dump(description, f)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: os.rename(p, p + ".gone"), "no such weights directory"),
        (
            lambda p: os.remove(os.path.join(p, "model.json")),
            "has no model.json: not a weights folder written by tools.export",
        ),
        (
            lambda p: open(os.path.join(p, "model.json"), "w").write('{"format": '),
            "model.json: unreadable",
        ),
        (
            lambda p: _edit_json(p, lambda d: d.update(format="keras")),
            "model.json: format is 'keras'",
        ),
        (lambda p: _edit_json(p, lambda d: d.update(version=2)), "model.json: version 2"),
        (
            lambda p: _edit_json(p, lambda d: d["model"].pop("shortcut")),
            r"model.json: model \['shortcut'\] missing",
        ),
        (
            lambda p: _edit_json(p, lambda d: d["preprocessing"].update(std=[0.0])),
            "model.json: preprocessing std must be positive",
        ),
        (
            lambda p: _edit_json(p, lambda d: d.update(dtype="bfloat16")),
            "arrays: (params|batch_stats)/.* is float32, model.json says bfloat16",
        ),
        (lambda p: shutil.rmtree(os.path.join(p, "arrays")), "arrays: missing"),
        (lambda p: os.remove(os.path.join(p, "arrays", "_METADATA")), "arrays: cannot be read"),
        (
            lambda p: _edit_json(p, lambda d: d["sha256"].update({"params/head/bias": "0" * 64})),
            "array params/head/bias does not match its SHA-256 in model.json",
        ),
        (
            lambda p: _edit_json(p, lambda d: d["sha256"].pop("params/head/bias")),
            r"not listed in model.json: params/head/bias",
        ),
    ],
    ids=[
        "no-dir",
        "no-json",
        "garbled-json",
        "foreign",
        "newer",
        "incomplete-model",
        "bad-std",
        "dtype",
        "no-arrays",
        "damaged-arrays",
        "digest",
        "unlisted-array",
    ],
)
def test_load_errors_name_the_file(small_model, tmp_path, damage, message):
    path = _save(tmp_path / "w", small_model)
    damage(path)
    with pytest.raises(ValueError, match=message) as info:
        resnet.weights.load(path)
    assert path in str(info.value)
