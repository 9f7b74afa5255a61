"""The training program: model, optimizer, state and the two jitted steps, built in one place.

`build_program` is what the launcher trains with and what `tools.bench.step`,
`tools.bench.checkpoint` and the tests measure, so a benchmark times exactly the step that
training runs. The state is replicated over the mesh and batches are split along 'batch';
the train step donates the state, so XLA updates it in place.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

import resnet
from launch import distributed, executables, plan
from launch.plan import ConfigError
from resnet import augment as augment_lib
from resnet import steps as steps_lib

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def model_options(config: ml_collections.ConfigDict, channels: int) -> dict[str, Any]:
    """The keyword arguments of `resnet.create_model` that the config decides."""
    if config.model.dtype not in COMPUTE_DTYPES:
        raise ConfigError(
            f"config.model.dtype={config.model.dtype!r}: use one of {', '.join(COMPUTE_DTYPES)}"
        )
    group = plan.bn_group_size(config)
    return dict(
        num_classes=config.model.num_classes,
        dtype=jnp.dtype(config.model.dtype),
        in_channels=channels,
        zero_init_residual=config.model.zero_init_residual,
        bn_momentum=config.model.bn_momentum,
        bn_epsilon=config.model.bn_epsilon,
        # 0 where a group is the whole micro-batch: the plain BatchNorm (either implementation).
        bn_group_size=0 if group == plan.micro_batch_size(config) else group,
        batch_norm=config.model.batch_norm,
        max_pool=config.model.max_pool,
    )


def build_model(config: ml_collections.ConfigDict, channels: int) -> nnx.Module:
    return resnet.create_model(
        config.model.name, rngs=nnx.Rngs(config.train.seed + 1), **model_options(config, channels)
    )


OPTIMIZERS = ("sgd", "lars")
LR_SCHEDULES = ("cosine", "polynomial")


def _choice(config, key: str, choices: tuple[str, ...]) -> str:
    value = config.train[key]
    if value not in choices:
        raise ConfigError(f"config.train.{key}={value!r}: use one of {', '.join(choices)}")
    return value


def make_optimizer(config, steps_per_epoch: int, num_steps: int):
    """SGD or LARS with linear warmup, then cosine or polynomial decay.

    The peak LR scales with the global batch (Goyal et al.): base_learning_rate x batch / 256.
    """
    train = config.train
    optimizer = _choice(config, "optimizer", OPTIMIZERS)
    kind = _choice(config, "lr_schedule", LR_SCHEDULES)
    peak = train.base_learning_rate * train.global_batch_size / 256
    if train.end_learning_rate > peak:
        raise ConfigError(
            f"config.train.end_learning_rate={train.end_learning_rate!r}: must not exceed the "
            f"peak learning rate {peak:g} (base_learning_rate x global_batch_size / 256)"
        )
    warmup = int(round(train.warmup_epochs * steps_per_epoch))
    schedule = steps_lib.learning_rate_schedule(
        peak,
        warmup,
        num_steps,
        kind=kind,
        end=train.end_learning_rate,
        power=train.polynomial_power,
    )
    common = dict(momentum=train.momentum, nesterov=train.nesterov, weight_decay=train.weight_decay)
    if optimizer == "lars":
        tx = steps_lib.lars_optimizer(
            schedule,
            trust_coefficient=train.lars_trust_coefficient,
            epsilon=train.lars_epsilon,
            **common,
        )
    else:
        tx = steps_lib.sgd_optimizer(schedule, **common)
    return tx, schedule


def shapes_digest(tree: Any) -> str:
    """A short digest of every leaf's path, shape and dtype: what a checkpoint must match."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    text = "\n".join(f"{jax.tree_util.keystr(p)} {x.shape} {x.dtype}" for p, x in leaves)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Program:
    """What a run trains and evaluates with; every array lives on `mesh`."""

    mesh: Mesh
    graphdef: nnx.GraphDef
    abstract_state: steps_lib.TrainState  # ShapeDtypeStructs, replicated
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    ids_on_device: bool  # train batches carry example ids (augmentation on the device)
    init: Callable[[], steps_lib.TrainState]
    train_step: jax.stages.Wrapped  # (state, batch, stop_votes) -> (state, metrics); donates state
    eval_step: jax.stages.Wrapped  # (state, batch, totals, stop_votes) -> (totals, stop)
    channels: int
    # What the compiled steps depend on besides their arguments (launch.executables).
    executable_key: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    _votes: dict[bool, jax.Array] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        return distributed.replicated(self.mesh)

    @property
    def batch_sharding(self) -> jax.sharding.NamedSharding:
        return distributed.batch_sharding(self.mesh)

    def stop_votes(self, stop: bool) -> jax.Array:
        """This host's vote on every one of its devices (see `_with_stop_votes`).

        Two arrays made once and passed again every step: no per-step transfer.
        """
        if stop not in self._votes:
            local = np.full((len(self.mesh.local_devices),), int(stop), np.int32)
            self._votes[stop] = jax.make_array_from_process_local_data(
                self.batch_sharding, local, (self.mesh.devices.size,)
            )
        return self._votes[stop]

    def abstract_batch(self, global_batch: int, image_size: int, *, eval_: bool = False):
        spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
        batch = {
            "image": spec((global_batch, image_size, image_size, self.channels), jnp.uint8),
            "label": spec((global_batch,), jnp.int32),
        }
        if eval_:
            batch["mask"] = spec((global_batch,), jnp.float32)
        elif self.ids_on_device:
            batch["example_id"] = spec((global_batch,), jnp.int32)
        return batch

    def zero_eval_totals(self) -> dict[str, jax.Array]:
        return jax.jit(steps_lib.zero_eval_totals, out_shardings=self.replicated)()

    def compile_train_step(self, global_batch: int, image_size: int):
        """The train step compiled ahead of time for this batch shape (a jax Compiled)."""
        votes = jax.ShapeDtypeStruct(
            (self.mesh.devices.size,), jnp.int32, sharding=self.batch_sharding
        )
        args = (self.abstract_state, self.abstract_batch(global_batch, image_size), votes)
        lower = lambda: self.train_step.lower(*args)
        return executables.load_or_compile("train_step", lower, self.executable_key, args)

    def compile_eval_step(self, global_batch: int, image_size: int):
        votes = jax.ShapeDtypeStruct(
            (self.mesh.devices.size,), jnp.int32, sharding=self.batch_sharding
        )
        batch = self.abstract_batch(global_batch, image_size, eval_=True)
        totals = jax.eval_shape(steps_lib.zero_eval_totals)
        totals = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), totals
        )
        args = (self.abstract_state, batch, totals, votes)
        lower = lambda: self.eval_step.lower(*args)
        return executables.load_or_compile("eval_step", lower, self.executable_key, args)

    def shapes_digest(self) -> str:
        return shapes_digest(self.abstract_state.params)


def _with_stop_votes(step: Callable, *, into_metrics: bool) -> Callable:
    """`step(*args)` that also takes the hosts' stop votes and returns their maximum.

    The votes hold one int32 per device (1 where that device's host was asked to stop). Their
    maximum rides the step's own all-reduce, so every host reads the same decision at the same
    step with no extra round trip. The train step returns it as `metrics["stop"]`, the eval
    step as a second output: `(totals, stop)`.
    """

    def voted(*args):
        *step_args, votes = args
        # The votes are reduced before the step starts. On the CPU backend (jax 0.10), an
        # executable loaded from a cache whose first collective runs inside the scan over
        # micro-batches left its devices waiting on each other's collectives.
        stop, step_args = jax.lax.optimization_barrier((jnp.max(votes), step_args))
        out = step(*step_args)
        if into_metrics:
            state, metrics = out
            return state, {**metrics, "stop": stop}
        return out, stop

    return voted


# Sections only the host reads (when to save, how long to wait for the other hosts): no
# compiled program depends on them, so a restart that changes them loads the same programs.
_HOST_ONLY_SECTIONS = ("checkpoint", "distributed")


def _program_config(config: ml_collections.ConfigDict) -> str:
    """The config the compiled programs are keyed by (launch.executables): all of it but the
    host-only sections."""
    kept = config.copy_and_resolve_references()
    with kept.unlocked():
        for section in _HOST_ONLY_SECTIONS:
            if section in kept:
                del kept[section]
    return kept.to_json_best_effort(sort_keys=True)


def build_program(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    *,
    channels: int,
    steps_per_epoch: int = 1000,
    num_steps: int = 100_000,
    donate: bool = True,
) -> Program:
    """Builds the model, optimizer and jitted steps; raises ConfigError for bad model options.

    `steps_per_epoch` and `num_steps` shape the learning-rate schedule; the defaults, a long
    schedule, serve callers for whom it does not matter (evaluation, step benchmarks).
    `donate=False` only exists to measure what donating the state buys (tools.bench.step).
    """
    tx, schedule = make_optimizer(config, steps_per_epoch, num_steps)
    make_model = lambda: build_model(config, channels)
    replicated = distributed.replicated(mesh)
    batch_sharding = distributed.batch_sharding(mesh)
    ema = config.train.ema_decay > 0
    init = lambda: steps_lib.init_state(make_model(), tx, ema=ema)[1]
    executable_key = {
        "config": _program_config(config),
        "build": [channels, steps_per_epoch, num_steps, donate],
        **executables.environment_key(mesh),
    }

    def trace() -> tuple[Any, Any]:  # the graph definition and the state's shapes, at once
        graphdefs = []

        def traced_init():
            graphdef, state = steps_lib.init_state(make_model(), tx, ema=ema)
            graphdefs.append(graphdef)  # static: no array in it
            return state

        try:
            state_shapes = jax.eval_shape(traced_init)
        except ValueError as e:  # resnet validates its options and names where it builds
            raise ConfigError(f"config.model: {e}") from None
        return graphdefs[0], state_shapes

    # Building the model is most of a start-up's tracing: a restart reads it back.
    graphdef, state_shapes = executables.load_or_build("program", trace, executable_key)
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state_shapes
    )
    compute = dict(
        mean=tuple(config.data.mean),
        std=tuple(config.data.std),
        compute_dtype=jnp.dtype(config.model.dtype),
    )
    augment = None
    if config.data.augment_on_device:
        augment = functools.partial(
            augment_lib.pad_crop_flip,
            seed=config.train.seed,
            pad=config.data.device_crop_padding,
            flip=config.data.random_flip,
        )
    train_step = jax.jit(
        _with_stop_votes(
            steps_lib.make_train_step(
                graphdef,
                tx,
                schedule,
                label_smoothing=config.train.label_smoothing,
                augment=augment,
                ema_decay=config.train.ema_decay,
                microbatches=config.train.microbatches,
                **compute,
            ),
            into_metrics=True,
        ),
        in_shardings=(replicated, batch_sharding, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0 if donate else (),
    )
    eval_step = jax.jit(
        _with_stop_votes(
            steps_lib.make_eval_step(graphdef, use_ema=config.eval.use_ema, **compute),
            into_metrics=False,
        ),
        in_shardings=(replicated, batch_sharding, replicated, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=2,  # the running totals
    )
    init_on_mesh = jax.jit(init, out_shardings=replicated)

    @functools.cache  # once per program, like jax.jit's own cache
    def compiled_init():
        # Kept like the steps (launch.executables), and compiled by the last process while
        # process 0 compiles the train step.
        return executables.load_or_compile(
            "init", init_on_mesh.lower, executable_key, (), compiled_by=-1
        )

    return Program(
        mesh=mesh,
        graphdef=graphdef,
        abstract_state=abstract_state,
        schedule=schedule,
        tx=tx,
        ids_on_device=augment is not None,
        init=lambda: compiled_init()(),
        train_step=train_step,
        eval_step=eval_step,
        channels=channels,
        executable_key=executable_key,
    )


class TrainSteps:
    """The train step compiled once per training image size, called like one compiled step:
    it runs the executable of the batch's size (batches of the old size may still be in
    flight when a resizing ramp moves on). Never compiles in the loop."""

    def __init__(self, program, global_batch: int):
        self._program, self._global_batch = program, global_batch
        self.by_size: dict[int, Any] = {}

    def compile(self, sizes) -> float:
        """Compiles (or loads, launch.executables) the sizes not yet here; the seconds taken."""
        start = time.perf_counter()
        for size in sizes:
            if size not in self.by_size:
                self.by_size[size] = self._program.compile_train_step(self._global_batch, size)
        return time.perf_counter() - start

    def __call__(self, state, batch, *args):
        size = batch["image"].shape[1]
        if size not in self.by_size:
            raise RuntimeError(
                f"no train step was compiled for {size} px images (compiled: "
                f"{sorted(self.by_size)}); the input and the resizing ramp disagree"
            )
        return self.by_size[size](state, batch, *args)
