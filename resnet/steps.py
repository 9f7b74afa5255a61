"""The math of training and evaluation: loss, optimizer, schedule, train and eval steps.

Everything here is a pure function of arrays, jitted by the caller with the shardings of
its choice. State is a plain pytree (`TrainState`) stepped by `jax.jit` with donated
buffers: `nnx.jit` would re-walk the module graph on every call, which shows at small step
times. BatchNorm statistics are computed over the *global* batch, or over ghost groups that
take rows from every device: under SPMD `jit` the batch axis is sharded and XLA inserts the
cross-device reductions, so training behaves the same on any number of devices (unlike
per-device batches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (skipped steps included)
    params: nnx.State
    batch_stats: nnx.State
    opt_state: Any
    nonfinite_in_a_row: jax.Array  # int32 scalar: consecutive skipped (non-finite) steps
    nonfinite_total: jax.Array  # int32 scalar
    # train.ema_decay > 0: {"params", "batch_stats"} averaged over the steps (`ema_update`);
    # None otherwise, so that a run without EMA holds no more arrays.
    ema: Any = None


def merge(graphdef: nnx.GraphDef, *states: nnx.State) -> nnx.Module:
    # States hold the Variable objects themselves, and a Variable may only be updated in the
    # trace that made it: copy them so BatchNorm can update its statistics inside jax.grad.
    return nnx.merge(graphdef, *states, copy=True)


def learning_rate_schedule(
    peak: float,
    warmup_steps: int,
    total_steps: int,
    *,
    kind: str = "cosine",
    end: float = 0.0,
    power: float = 2.0,
) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then decay to `end` by the last step, per step.

    `kind` "cosine" decays along a half cosine; "polynomial" as
    `end + (peak - end) * (1 - t / decay_steps) ** power` (the MLPerf ResNet-50 schedule).
    """
    warmup_steps = min(warmup_steps, total_steps)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup_steps,
            decay_steps=max(total_steps, warmup_steps + 1),
            end_value=end,
        )
    if kind == "polynomial":
        warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
        decay = optax.polynomial_schedule(
            init_value=peak,
            end_value=end,
            power=power,
            transition_steps=max(total_steps - warmup_steps, 1),
        )
        return optax.join_schedules([warmup, decay], [warmup_steps])
    raise ValueError(f"unknown learning-rate schedule {kind!r}: use cosine or polynomial")


def _decays(params: nnx.State) -> Any:
    # Conv (4-D) and dense (2-D) kernels decay; BN scales/biases and biases (1-D) do not.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def sgd_optimizer(
    schedule: optax.Schedule, *, momentum: float, nesterov: bool, weight_decay: float
) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum and L2 weight decay on kernels, as the ResNet recipe."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=_decays),
        optax.sgd(schedule, momentum=momentum, nesterov=nesterov),
    )


def lars_optimizer(
    schedule: optax.Schedule,
    *,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    trust_coefficient: float,
    epsilon: float,
) -> optax.GradientTransformation:
    """LARS (You et al. 2017) on kernels; BN parameters and biases get plain momentum SGD.

    As in the MLPerf reference, the 1-D leaves take neither weight decay nor the trust ratio:
    their update is `momentum * trace + lr * grad`. The trust ratio is
    `trust_coefficient * |w| / (|g + weight_decay * w| + epsilon)`, per kernel (optax.lars).
    """
    return optax.lars(
        schedule,
        weight_decay=weight_decay,
        weight_decay_mask=_decays,
        trust_coefficient=trust_coefficient,
        eps=epsilon,
        trust_ratio_mask=_decays,
        momentum=momentum,
        nesterov=nesterov,
    )


def init_state(
    model: nnx.Module, tx: optax.GradientTransformation, *, ema: bool = False
) -> tuple[nnx.GraphDef, TrainState]:
    """The state of step 0; with `ema`, the average starts as a copy of the weights."""
    # Flax types split() with filters as variadic; it returns one State per filter.
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)  # type: ignore[misc]
    zero = lambda: jnp.zeros((), jnp.int32)  # distinct buffers: the step donates them
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    return graphdef, TrainState(
        step=zero(),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        nonfinite_in_a_row=zero(),
        nonfinite_total=zero(),
        ema={"params": copy(params), "batch_stats": copy(batch_stats)} if ema else None,
    )


def ema_decay_at(ema_decay: float, step: jax.Array) -> jax.Array:
    """The decay of the update after optimizer step `step` (0 for the first): min(ema_decay,
    (1 + step) / (10 + step)), TensorFlow's ExponentialMovingAverage with num_updates. The
    warmup forgets the random initialisation quickly; with the full decay from step 0 it
    would still weigh ema_decay ** step in the average (0.37 after 10,000 steps at 0.9999)."""
    step = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(ema_decay), (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, new: Any, ema_decay: float, step: jax.Array) -> Any:
    """`decay * ema + (1 - decay) * new` leaf by leaf, with `ema_decay_at(ema_decay, step)`."""
    decay = ema_decay_at(ema_decay, step)
    return jax.tree.map(lambda e, n: decay * e + (1.0 - decay) * n, ema, new)


def normalize(
    images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...], dtype: Any
) -> jax.Array:
    """uint8 NHWC pixels to normalised `dtype` (done on device: see pipeline.transforms)."""
    mean_f32 = jnp.asarray(mean, jnp.float32)
    inv_std = 1.0 / jnp.asarray(std, jnp.float32)
    return ((images.astype(jnp.float32) - mean_f32) * inv_std).astype(dtype)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Per-example softmax cross-entropy against smoothed one-hot targets, in fp32."""
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k largest logits (ties broken towards lower index)."""
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    classes = jnp.arange(logits.shape[-1])
    beats_label = (logits > label_logit) | ((logits == label_logit) & (classes < labels[:, None]))
    return (jnp.sum(beats_label, axis=-1) < k).astype(jnp.float32)


def all_finite(tree: Any) -> jax.Array:
    """True when every float in `tree` is finite (integer leaves such as counters are skipped)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.bool_(True)
    flags = jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])
    # Padded so that it stays one reduction: XLA rewrites the reduction of stacked scalars as a
    # chain of ands and copies that chain into every fusion that reads the result (in the train
    # step, the update of every leaf): leaves x leaves operations, most of ResNet-20's step.
    return jnp.all(jnp.pad(flags, (0, 1), constant_values=True))


def split_microbatches(x: jax.Array, microbatches: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...]: micro-batch i holds rows i, i + k, i + 2k, ... of the batch.

    Strided, not contiguous: a device's block of B/D consecutive rows holds B/(k D) rows of
    every micro-batch, so each micro-batch stays split over all devices without moving data,
    and which example lands in which micro-batch depends on its row alone, not the topology.
    """
    return x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:]).swapaxes(0, 1)


def accumulate(fn: Callable, microbatches: int, *batch: jax.Array) -> Any:
    """The mean over micro-batches of `fn(*micro_batch)` (any pytree of float arrays).

    One `jax.lax.scan`, so only one micro-batch's activations are alive at a time; the sums
    are kept in the outputs' own dtypes (float32 for gradients and statistics).
    """
    if microbatches == 1:
        return fn(*batch)
    split = [split_microbatches(x, microbatches) for x in batch]
    shapes = jax.eval_shape(fn, *(x[0] for x in split))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def add(total, micro_batch):
        return jax.tree.map(jnp.add, total, fn(*micro_batch)), None

    total, _ = jax.lax.scan(add, zeros, split)
    return jax.tree.map(lambda t: t / microbatches, total)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    mean,
    std,
    compute_dtype,
    label_smoothing: float,
    augment: Callable | None = None,
    ema_decay: float = 0.0,
    microbatches: int = 1,
) -> Callable:
    """Returns `train_step(state, batch) -> (state, metrics)`; jit it with donation.

    `augment(images, example_ids, step)`, when given, runs on the device first
    (batch["example_id"] needed). `ema_decay` > 0 updates `state.ema` towards the new
    parameters and statistics (`ema_update`); the state must have been made with `ema`.

    `microbatches` = k > 1 scans the batch in k micro-batches (`split_microbatches`) and takes
    one optimizer step with the mean of their gradients. Each BatchNorm running average moves
    once, by the mean of the micro-batches' statistics, so k micro-batches give the update of
    one step with BatchNorm groups of B/k examples. Loss and accuracy are over the whole batch.

    A step whose loss, gradients or updated parameters are not finite leaves parameters,
    statistics, optimizer state and average untouched and only counts itself, so a
    checkpoint never holds non-finite values.
    """

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        images = batch["image"]
        if augment is not None:
            images = augment(images, batch["example_id"], state.step)
        labels = batch["label"]

        def loss_fn(params, batch_stats, images, labels):
            model = merge(graphdef, params, batch_stats)
            logits = model(normalize(images, mean, std, compute_dtype), training=True)
            loss = jnp.mean(cross_entropy(logits, labels, label_smoothing))
            top1 = jnp.mean(_top_k_correct(logits, labels, 1))
            return loss, (top1, nnx.state(model, nnx.BatchStat))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        micro_step = lambda images, labels: grad_fn(state.params, state.batch_stats, images, labels)
        (loss, (top1, batch_stats)), grads = accumulate(micro_step, microbatches, images, labels)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        # Finite gradients can still overflow the parameters with a large learning rate.
        finite = jnp.isfinite(loss) & all_finite((grads, params, batch_stats))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        skipped = jnp.logical_not(finite).astype(jnp.int32)
        ema = state.ema
        if ema_decay > 0:
            new = {"params": params, "batch_stats": batch_stats}
            ema = keep(ema_update(ema, new, ema_decay, state.step), ema)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            batch_stats=keep(batch_stats, state.batch_stats),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
            nonfinite_total=state.nonfinite_total + skipped,
            ema=ema,
        )
        metrics = {
            "loss": loss,
            "top1": top1,
            "learning_rate": schedule(state.step),
            "nonfinite_in_a_row": new_state.nonfinite_in_a_row,
            "nonfinite_total": new_state.nonfinite_total,
        }
        return new_state, metrics

    return train_step


def zero_eval_totals() -> dict[str, jax.Array]:
    return {k: jnp.zeros((), jnp.float32) for k in ("loss", "top1", "top5", "count")}


def make_eval_step(
    graphdef: nnx.GraphDef, *, mean, std, compute_dtype, use_ema: bool = False
) -> Callable:
    """Returns `eval_step(state, batch, totals) -> totals`; `use_ema` evaluates `state.ema`.

    Masked sums (not means) are added to the running `totals` inside the step, so that
    batches, devices and hosts add up exactly (divide by `count` once at the end) and each
    batch is one program that depends on the previous one. Independent per-batch programs,
    each with its own cross-host all-reduce, may run concurrently and in a different order on
    different hosts; over gloo that deadlocked two-process evaluations.
    """

    def eval_step(state: TrainState, batch: dict[str, jax.Array], totals):
        params, batch_stats = state.params, state.batch_stats
        if use_ema:
            params, batch_stats = state.ema["params"], state.ema["batch_stats"]
        model = merge(graphdef, params, batch_stats)
        logits = model(normalize(batch["image"], mean, std, compute_dtype), training=False)
        labels, mask = batch["label"], batch["mask"]
        k5 = min(5, logits.shape[-1])
        sums = {
            "loss": jnp.sum(cross_entropy(logits, labels, 0.0) * mask),
            "top1": jnp.sum(_top_k_correct(logits, labels, 1) * mask),
            "top5": jnp.sum(_top_k_correct(logits, labels, k5) * mask),
            "count": jnp.sum(mask),
        }
        return jax.tree.map(jnp.add, totals, sums)

    return eval_step
