"""Every configuration field, with its default. Other configs start from this one.

Override any field on the command line: `--config.train.global_batch_size=512`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = model = ml_collections.ConfigDict()
    model.name = "resnet50"  # one of resnet.MODEL_NAMES (resnet18..152, resnet8..110)
    model.num_classes = 1000  # must equal the dataset's number of classes
    model.dtype = "bfloat16"  # compute dtype; parameters and BN statistics stay float32
    model.zero_init_residual = True  # last BN scale of each residual branch starts at 0
    model.bn_momentum = 0.9  # ImageNet recipe (NNX's own default is 0.99)
    model.bn_epsilon = 1e-5
    # Ghost BatchNorm: training normalises in groups of this many examples, which divides the
    # micro-batch and is a multiple of the device count (each group takes rows from every
    # device). 0: each micro-batch is one group (the global batch when train.microbatches is
    # 1). Part of the run signature.
    model.bn_group_size = 0
    # "fused" (resnet.batch_norm: float32 per-channel maths, one-pass statistics, hand-written
    # backward) or "flax" (nnx.BatchNorm, the reference). Same state names: either resumes.
    model.batch_norm = "fused"
    # Backward pass of the ImageNet stem's max pool: "dense" (resnet.pooling: fused, the same
    # on every run) or "xla" (select-and-scatter: atomic adds on GPU). Same values.
    model.max_pool = "dense"
    # Start from trained weights instead of a random initialisation (fine-tuning): a weights
    # directory (tools.import_torchvision, tools.export) or a run's workdir. Only parameters
    # and BatchNorm statistics are taken; a classifier head of another size is re-initialised.
    # Ignored once this workdir has a checkpoint (a restart resumes it).
    model.init_from = ""
    model.init_from_step = -1  # with a run's workdir: that step; -1: its newest trustworthy

    config.data = data = ml_collections.ConfigDict()
    data.train_dir = ""  # ArrayRecord dataset made by tools.make_arrayrecord
    data.eval_dir = ""  # its eval split; empty: no evaluation
    data.embedded = ""  # "mnist": the MNIST digits shipped in the repository (see demo.py)
    # A resume on other data than the checkpoint's (by content fingerprint, train or eval, an
    # eval set added or dropped included) is refused; True accepts it, logs a warning, and
    # records it in the checkpoints' topology and data history and in FINISHED.
    data.allow_change = False
    data.image_size = 224  # side of the square network input, in pixels (eval: always)
    # Progressive resizing, FFCV's ramp (pipeline/resizing.py): epoch e trains at
    # min_image_size while e <= resize_start_epoch, at max_image_size from resize_end_epoch,
    # linearly in between, rounded to a multiple of resize_multiple. Evaluation stays at
    # image_size. min_image_size=0: off, training is at image_size.
    data.min_image_size = 0
    data.max_image_size = 0
    data.resize_start_epoch = 0.0
    data.resize_end_epoch = 0.0
    data.resize_multiple = 32
    data.crop_scale = (0.08, 1.0)  # random-resized-crop area range, fraction of the image
    data.crop_ratio = (3 / 4, 4 / 3)  # random-resized-crop aspect-ratio range
    data.random_flip = True  # horizontal flips (turn off for digits and text)
    data.eval_crop_fraction = 0.875  # eval: centre crop of this fraction of the short side
    # JPEGs are decoded at 1/2, 1/4 or 1/8 scale when the crop still has 1.25x the output's
    # pixels (PSNR >= 35 dB against a full decode; docs/measurements.md). False: always full.
    data.scaled_decode = True
    # Raw datasets of one image size (MNIST, CIFAR): the host sends the stored pixels and the
    # train step pads by device_crop_padding, crops back and flips (random_flip) on the
    # device, from (seed, step, example id). crop_scale/crop_ratio are then unused, and
    # image_size must be the stored size.
    data.augment_on_device = False
    data.device_crop_padding = 4
    data.mean = (123.675, 116.28, 103.53)  # per-channel pixel mean, 0..255 scale
    data.std = (58.395, 57.12, 57.375)  # per-channel pixel standard deviation
    data.num_workers = 0  # Grain decoding processes per host (0: decode in threads)
    data.num_threads = 4  # Grain reading threads per process
    data.prefetch = 2  # global batches kept in flight on the devices

    config.train = train = ml_collections.ConfigDict()
    train.global_batch_size = 1024  # summed over all devices of all hosts
    # Gradient accumulation: each step scans the batch in this many micro-batches (rows i,
    # i + k, ... form micro-batch i) and applies one update with their mean gradient.
    train.microbatches = 1
    train.num_epochs = 90.0
    train.num_steps = -1  # > 0 overrides num_epochs
    train.seed = 0  # shuffling and augmentation; model initialisation uses seed + 1
    train.base_learning_rate = 0.1  # per 256 examples: peak LR = base * global_batch / 256
    train.warmup_epochs = 5.0  # linear warmup from 0 to the peak, then lr_schedule's decay
    # Decay after the warmup, to end_learning_rate at the last step: "cosine" or
    # "polynomial" (power polynomial_power, the MLPerf ResNet-50 schedule).
    train.lr_schedule = "cosine"
    train.polynomial_power = 2.0
    train.end_learning_rate = 0.0  # absolute, not scaled with the batch
    # "sgd" (momentum) or "lars" (layer-wise trust ratio on conv and dense kernels; BN
    # parameters and biases get plain momentum SGD without weight decay).
    train.optimizer = "sgd"
    train.momentum = 0.9
    train.nesterov = True
    train.weight_decay = 5e-5  # on conv and dense kernels only
    train.lars_trust_coefficient = 0.001  # LARS: trust ratio = this x |w| / (|g + wd w| + eps)
    train.lars_epsilon = 0.0
    train.label_smoothing = 0.1
    # > 0: also keep an exponential moving average of the parameters and BatchNorm statistics,
    # updated after each applied step with decay min(ema_decay, (1 + step) / (10 + step));
    # eval.use_ema evaluates it, `tools.export --ema` exports it. 0: none.
    train.ema_decay = 0.0
    train.log_every_steps = 100  # log line and TensorBoard scalars
    train.max_nonfinite_in_a_row = 5  # skipped non-finite steps tolerated before stopping
    train.num_image_summaries = 8  # augmented inputs shown in TensorBoard at the start
    # No training step or eval batch completing for this long (or 50x the median step time,
    # if longer) means a stall: every process logs its stacks and exits 5. 0 turns it off.
    train.stall_timeout_seconds = 600.0
    # JAX's persistent compilation cache: a restarted run loads its compiled steps instead of
    # compiling them again. Relative paths are under the workdir; on a pod use a path every
    # host shares (the workdir, or gs://bucket/xla-cache shared by runs). '': off.
    train.compilation_cache_dir = "compilation_cache"
    # (first, last): trace these steps with jax.profiler on process 0 into
    # WORKDIR/tensorboard (TensorBoard's profile plugin opens it). (): no trace.
    train.profile_steps = ()

    # Intervals: every_steps when > 0, else every_epochs when > 0, else only at the end.
    config.eval = eval_ = ml_collections.ConfigDict()
    eval_.every_steps = 0
    eval_.every_epochs = 5.0  # also evaluates at the end
    eval_.global_batch_size = -1  # -1: the training global batch size
    eval_.at_start = False  # also evaluate before the first step (a fine-tuning's baseline)
    eval_.use_ema = False  # evaluate the average of train.ema_decay, not the current weights

    # "auto": the interval sets itself (launch.interval): Daly's sqrt(2 x save stall x (mean
    # time between faults + restore)), measured in this run and re-decided at every save,
    # within [a few steps and the save's own duration, the MTBF and one hour]. A number fixes
    # it; every_steps > 0 wins over every_epochs. Either way a SIGTERM saves at once, and the
    # run saves at its end.
    config.checkpoint = checkpoint = ml_collections.ConfigDict()
    checkpoint.every_steps = ml_collections.FieldReference(0, field_type=object)
    checkpoint.every_epochs = ml_collections.FieldReference("auto", field_type=object)
    # The mean time between faults assumed until the workdir's events show one (seconds).
    checkpoint.expected_fault_interval_seconds = 3600.0
    checkpoint.max_to_keep = 3
    checkpoint.async_save = True  # write in the background while training goes on
    checkpoint.barrier_timeout_seconds = 300  # Orbax cross-host barriers

    config.distributed = distributed = ml_collections.ConfigDict()
    # A host that stops answering is declared dead after this long, and the others exit.
    distributed.heartbeat_timeout_seconds = 100
    # Every host must join within this long, and reach the first step within this long of
    # the first host that is ready to (restore and compile times differ between hosts).
    distributed.initialization_timeout_seconds = 300
    # After SIGTERM, the agreed checkpoint must commit within this long, else the process logs
    # its stacks and exits 5 (a TPU VM gets 30 s of notice before it is gone).
    distributed.preemption_grace_seconds = 25.0
    return config
