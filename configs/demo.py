"""The embedded default: ResNet-20 on the MNIST digits shipped in the repository.

Runs anywhere with no download: 8,000 training and 2,000 eval digits, converted to
ArrayRecord once per machine into ~/.cache/resnet-multihost ($RESNET_MULTIHOST_CACHE moves it;
pipeline/demo_data.py). Reaches about 98-99% eval top-1 in a few minutes on a 2-core CPU.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet20"
    config.model.num_classes = 10
    config.model.dtype = "float32"  # CPUs have no fast bf16
    # Starting every residual branch at zero helps huge-batch ImageNet runs but slows a
    # small net on a short schedule several-fold.
    config.model.zero_init_residual = False
    config.data.embedded = "mnist"
    config.data.image_size = 28
    config.data.crop_scale = (0.7, 1.0)  # mild: digits must stay legible
    config.data.crop_ratio = (0.8, 1.25)
    config.data.random_flip = False  # a mirrored digit is another symbol
    config.data.eval_crop_fraction = 1.0
    config.data.mean = (33.3,)
    config.data.std = (78.6,)
    config.data.num_threads = 2
    config.train.global_batch_size = 128
    config.train.num_epochs = 4.0
    config.train.base_learning_rate = 0.2
    config.train.warmup_epochs = 0.5
    config.train.weight_decay = 1e-4
    config.train.label_smoothing = 0.0
    config.train.log_every_steps = 20
    config.eval.every_epochs = 0.0  # at the end only
    config.checkpoint.max_to_keep = 2
    return config
