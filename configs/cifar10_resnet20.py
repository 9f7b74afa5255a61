"""ResNet-20 on CIFAR-10, the recipe of He et al. (2015) section 4.2, with a cosine schedule.

Convert first: `python -m tools.make_arrayrecord --format=cifar10 --split=train ...` and
`--split=test` into the two directories below.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet20"
    config.model.num_classes = 10
    config.model.dtype = "float32"
    config.data.train_dir = "data/cifar10/train"
    config.data.eval_dir = "data/cifar10/test"
    config.data.image_size = 32
    # The paper's augmentation exactly: 4-pixel zero padding, a random 32x32 crop and flips,
    # on the device from the raw pixels (CIFAR converts to raw records by default).
    config.data.augment_on_device = True
    config.data.device_crop_padding = 4
    config.data.eval_crop_fraction = 1.0
    config.data.mean = (125.3, 123.0, 113.9)
    config.data.std = (63.0, 62.1, 66.7)
    config.train.global_batch_size = 128
    config.train.num_epochs = 182.0  # 64k iterations at batch 128
    config.train.base_learning_rate = 0.2  # 0.1 at batch 128
    config.train.warmup_epochs = 1.0
    config.train.weight_decay = 1e-4
    config.train.label_smoothing = 0.0
    config.eval.every_epochs = 10.0
    return config
