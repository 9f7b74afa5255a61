"""The torchvision side of tests/resnet/test_torchvision.py: random ResNets, and finding the first
layer where ours and torchvision's disagree.

Localising a difference: every torchvision module's input and output are recorded with
forward hooks; each of our modules that has a torchvision counterpart (the importer's own
mapping, `tools.import_torchvision.torchvision_module`) is then run on torchvision's *input*
and compared with torchvision's *output*. Feeding each module the reference input keeps
errors from accumulating, so the first module (in torchvision's execution order: inner layers
before the block that contains them) that disagrees is where the networks differ.
"""

from __future__ import annotations

import copy

import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from flax import nnx

import resnet
from resnet.batch_norm import BatchNorm
from resnet.pooling import max_pool_3x3_s2
from tools.import_torchvision import torchvision_module

# torchvision's ImageNet normalisation, on 0..1 pixels.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def random_resnet(name: str, num_classes: int, seed: int, size: int = 64) -> torch.nn.Module:
    """A torchvision ResNet with random weights, BatchNorm affine parameters and running
    statistics, in eval mode.

    Identity BatchNorms (scale 1, bias 0, mean 0, var 1) would hide a swapped scale/var, a
    missing epsilon or a transposed statistic, so all four are random. The statistics are
    taken from a random batch (so that activations keep a sane scale through 150 layers) and
    then perturbed: mean shifted by up to ~0.5 std, variance scaled by 0.5..2.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(num_classes=num_classes)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            c = bn.num_features
            sign = torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0)
            bn.weight.copy_(sign * (0.3 + torch.rand(c, generator=gen)))
            bn.bias.copy_(0.3 * torch.randn(c, generator=gen))
            bn.momentum = 1.0  # the next training-mode forward sets the statistics
        model.train()
        model(torch.randn(4, 3, size, size, generator=gen))
        for bn in bns:
            c = bn.num_features
            std = bn.running_var.sqrt()
            bn.running_mean.add_(0.5 * std * torch.randn(c, generator=gen))
            bn.running_var.mul_(2.0 ** (2 * torch.rand(c, generator=gen) - 1))
            bn.momentum = 0.1  # torchvision's default again
            bn.num_batches_tracked.zero_()
    return model.eval()


def torch_input(images_uint8_nhwc: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> normalised float32 NCHW, as torchvision's ToTensor + Normalize."""
    x = torch.from_numpy(images_uint8_nhwc).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


def run(model: torch.nn.Module, x: torch.Tensor, training: bool):
    """Logits and (module name, input, output) of every module call, in the order the calls
    finished. Runs on a copy, so a training-mode call leaves `model`'s statistics alone; the
    copy (with its updated statistics) is returned too."""
    model = copy.deepcopy(model).train(training)
    records = []

    def hook(module, inputs, output, name):
        # Cloned now: torchvision's ReLUs work in place on the tensors seen here.
        records.append((name, inputs[0].detach().clone(), output.detach().clone()))

    handles = [
        m.register_forward_hook(lambda mod, i, o, name=name: hook(mod, i, o, name))
        for name, m in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits.numpy(), records, model


def our_modules(model: resnet.ResNet) -> dict[str, nnx.Module]:
    """torchvision module name -> our module, through the importer's mapping."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and path:
            try:
                out[torchvision_module(tuple(path))] = node
            except KeyError:
                pass  # modules torchvision has no name for (the lists of stages and blocks)
    return out


def _call(module, x, training: bool):
    if isinstance(module, (BatchNorm, nnx.BatchNorm)):
        return module(x, use_running_average=not training)
    if isinstance(module, (resnet.BasicBlock, resnet.Bottleneck, resnet.ProjectionShortcut)):
        return module(x, training)
    return module(x)  # Conv, Linear


def relative_difference(ours, reference) -> float:
    """max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    scale = np.max(np.abs(reference))
    return float(np.max(np.abs(ours - reference)) / max(scale, 1e-30))


def expected_running_stats(before, after, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Our running (mean, var) after the training-mode call that took torchvision's BatchNorm
    from `before` to `after`, over `count` values per channel.

    The momentum conventions match (torch's 0.1 is our 0.9), but torch feeds running_var the
    unbiased batch variance, we (as flax) the biased one: ours = 0.9 old + 0.1 (n-1)/n u.
    """
    mean = after.running_mean.numpy()
    old_var = before.running_var.numpy().astype(np.float64)
    unbiased_part = after.running_var.numpy().astype(np.float64) - 0.9 * old_var
    return mean, 0.9 * old_var + unbiased_part * (count - 1) / count


def module_differences(records, model: resnet.ResNet, training: bool, before=None, after=None):
    """(torchvision module name, relative difference) for each module of ours run on the
    recorded torchvision input, in torchvision's order (see the module docstring).

    With `before` and `after` (torchvision's model before and after a training-mode forward,
    as `run` returns it), each BatchNorm's updated running statistics are compared too, as
    "NAME.running_mean" and "NAME.running_var".
    """
    model = nnx.clone(model)  # training-mode BatchNorm calls update statistics
    ours = our_modules(model)
    ours["maxpool"] = max_pool_3x3_s2
    torch_before = dict(before.named_modules()) if before is not None else {}
    torch_after = dict(after.named_modules()) if after is not None else {}
    out = []
    for name, inp, expected in records:
        if name not in ours:
            continue  # ReLUs and the average pool: no module of ours
        module = ours[name]
        got = _call(module, jnp.asarray(to_nhwc(inp)), training)
        out.append((name, relative_difference(got, to_nhwc(expected))))
        if training and name in torch_after and isinstance(module, (BatchNorm, nnx.BatchNorm)):
            count = inp.numel() // inp.shape[1]
            mean, var = expected_running_stats(torch_before[name], torch_after[name], count)
            out.append((f"{name}.running_mean", relative_difference(module.mean[...], mean)))
            out.append((f"{name}.running_var", relative_difference(module.var[...], var)))
    return out


def first_difference(differences, rtol: float) -> str | None:
    """Describes the first entry of `module_differences` above `rtol`, or None."""
    for name, rel in differences:
        if not rel <= rtol:
            return f"first differing module: {name}, max |diff| / max |output| = {rel:.3g}"
    return None
