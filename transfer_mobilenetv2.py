"""MobileNetV2 from ImageNet weights, fine-tuned on CIFAR-10 resized to 96 px, in two
phases: a new head on the frozen base, then the base but its first 10 layers.

    python transfer_mobilenetv2.py                        # full run (defaults below)
    python transfer_mobilenetv2.py --alpha=0.35           # 0.35-wide: a few times faster
    python transfer_mobilenetv2.py --train_images=2000 --fine_tune_epochs=1   # quick check
    python transfer_mobilenetv2.py --weights=none         # random start: what ImageNet adds
    python transfer_mobilenetv2.py --weights=PATH         # a weights file of the same alpha
    python transfer_mobilenetv2.py --dry_run              # find data and weights, train nothing
    python transfer_mobilenetv2.py --resume=last          # go on with an interrupted run

README, Results, gives what it reaches and how long it takes.
"""

import settings

settings.check_command_line(__name__, __file__)  # --help, bad flags: before TF loads

import re
import warnings
from pathlib import Path

import keras

import data
import training

# ---------------------------------------------------------------------------------
# Config (python transfer_mobilenetv2.py --name=value overrides any of these)

DATA_DIR = ""  # CIFAR-10 folder or .tar.gz, or class folders (README); "" = find CIFAR-10
TRAIN_IMAGES = 0  # training images to use, stratified; 0 = all 50,000
VAL_FRACTION = 0.1  # share of the training images held out for validation
TEST_FRACTION = 0.2  # class folders without test/: share of train/ held out to test
IMG_SIZE = 96  # pixels: the side images are resized to (32 or more)
BATCH_SIZE = 64  # images per step; at most an eighth of the training images
AUGMENT_FLIP = "random"  # horizontal flips: "random", "alternate" or "none"
AUGMENT_TRANSLATE = 0.125  # random shifts with reflect padding, fraction of the side
AUGMENT_ROTATE = 0.0  # random rotation, fraction of a full turn (0 = off)
AUGMENT_ZOOM = 0.0  # random zoom, fraction of the side (0 = off)
AUGMENT_CONTRAST = 0.0  # random contrast change, fraction (0 = off)
ALPHA = 1.0  # MobileNetV2's width multiplier; ImageNet weights: 0.35, 0.5, 0.75, 1.0, 1.3, 1.4
WEIGHTS = "imagenet"  # "imagenet" (Keras cache, else downloaded once), a path or "none"
DROPOUT = 0.2  # dropout rate before the classifier
HEAD_EPOCHS = 3  # phase 1: epochs training the new head on the frozen base; 0 = skip
HEAD_LR = 1e-3  # phase 1 learning rate, constant (AdamW)
FINE_TUNE_EPOCHS = 15  # phase 2: epochs with the base trainable; 0 = head only
FINE_TUNE_LR = 1e-4  # phase 2 peak learning rate (AdamW), 10x lower than the head's
FREEZE_FIRST = 10  # base layers (of 154, input included) kept frozen in phase 2
FINE_TUNE_BATCHNORM = False  # phase 2 trains BatchNorm too (batch statistics); False =
# ImageNet's statistics, frozen
RANDOM_START_LR = 2e-3  # --weights=none: peak learning rate (AdamW), all layers train
BATCHNORM_MOMENTUM = 0.9  # where BatchNorm trains (random start, FINE_TUNE_BATCHNORM);
# Keras's MobileNetV2 has 0.999, too slow for a few thousand steps
WARMUP_EPOCHS = 1  # phase 2: linear warm-up from 0, then cosine decay to 0 at the end
WEIGHT_DECAY = 0.01  # AdamW decoupled weight decay, scaled by the learning rate
LABEL_SMOOTHING = 0.1  # 0 = plain one-hot targets
TTA = "none"  # test-time augmentation: "none", "flip" (mean with the mirror image) or
# "crops" (flip, plus 1-pixel shifts each mirrored: 6 views)
STEPS_PER_EPOCH = 0  # batches per epoch; 0 = the whole training set
EARLY_STOPPING_PATIENCE = 0  # phase 2 epochs without a better val_accuracy; 0 = off
MIXED_PRECISION = "off"  # "off", "on" (float16 on a GPU, else bfloat16) or "auto"
JIT_COMPILE = False  # XLA-compile the train step: try it on GPUs
SEED = 0  # seeds the split, shuffling, augmentation and the initial weights
OUT_DIR = "runs"  # run folders go to OUT_DIR/transfer_mobilenetv2/<timestamp>/
RESUME = ""  # a run folder to go on with, "last" for the newest unfinished one
DRY_RUN = False  # find the data and the weights, print the plan, train nothing
VERBOSE = 1  # 0 = quiet, 1 = progress bar, 2 = a line per epoch and all TF notices
CONFIG = settings.config_block(globals())  # the settings above: defaults for overrides

SCRIPT = "transfer_mobilenetv2"
# MobileNetV2's own preprocess_input range: its ImageNet weights were trained on
# pixels / 127.5 - 1. The report fed [0, 1], which silently costs accuracy.
VALUE_RANGE = (-1.0, 1.0)
IMAGENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)  # widths Keras has weights for
IMAGENET_SIZES = (224, 192, 160, 128, 96)  # pixels: sizes Keras has weights for
IMAGENET_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
)
IMAGENET_PREFIX = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_"  # then alpha_size


def check_config(config):
    """Checks of the settings alone: run before TensorFlow loads, and by main()."""
    random_start = config["WEIGHTS"] == "none"
    settings.require(
        config["HEAD_EPOCHS"] >= 0 and config["FINE_TUNE_EPOCHS"] >= 0,
        "--head_epochs and --fine_tune_epochs must be 0 or more",
    )
    settings.require(  # a random start has one phase, FINE_TUNE_EPOCHS long
        config["FINE_TUNE_EPOCHS"] > 0
        or (not random_start and config["HEAD_EPOCHS"] > 0),
        "nothing to train: --fine_tune_epochs is 0"
        + ("" if random_start else " and so is --head_epochs"),
    )
    for name in ("WARMUP_EPOCHS", "FREEZE_FIRST"):
        settings.require(config[name] >= 0, f"--{name.lower()} must be 0 or more")
    settings.require(config["IMG_SIZE"] >= 32, "--img_size must be 32 or more")
    settings.require(config["ALPHA"] > 0, "--alpha must be positive")
    settings.require(
        config["WEIGHTS"] != "imagenet" or config["ALPHA"] in IMAGENET_ALPHAS,
        f"--alpha={config['ALPHA']}: ImageNet weights exist for alpha "
        f"{', '.join(map(str, IMAGENET_ALPHAS))}; pick one, or use --weights=none",
    )
    settings.check_data_settings(config)


# ---------------------------------------------------------------------------------
# Model: weights (ImageNet through the Keras cache, a file, or none), network, phases


def imagenet_weights_name(alpha, image_size):
    """Keras's weights file for a MobileNetV2 base of width `alpha` at `image_size`."""
    return f"{IMAGENET_PREFIX}{float(alpha)}_{image_size}_no_top.h5"


def weights_resolution(path):
    """The image size a Keras weights file was trained at, from its name, or None."""
    match = re.match(IMAGENET_PREFIX + r"[\d.]+_(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def resolve_weights(weights, alpha, image_size):
    """The `weights` argument for MobileNetV2: None for "none", else a weights file.
    "imagenet" is looked for in the Keras cache, at `image_size` first, then at any
    other size (every file works at every size), and downloaded there if absent."""
    if weights == "none":
        return None
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise settings.DataError(
                f"--weights={weights}: no such file; expected MobileNetV2 base weights "
                f"of alpha {alpha} (.h5 or .weights.h5). Choices: --weights=imagenet|PATH|none"
            )
        return str(path)
    models_dir = data.keras_home() / "models"
    first = image_size if image_size in IMAGENET_SIZES else 224
    sizes = [first] + [size for size in IMAGENET_SIZES if size != first]
    names = [imagenet_weights_name(alpha, size) for size in sizes]
    for name in names:
        if (models_dir / name).is_file():
            return str(models_dir / name)
    try:
        return keras.utils.get_file(
            names[0], IMAGENET_URL + names[0], cache_dir=str(models_dir.parent),
            cache_subdir="models",
        )  # fmt: skip
    except Exception as error:  # urllib, HTTP and proxy errors all land here
        reason = str(error).rsplit(" -- ", 1)[-1][:100] or type(error).__name__
        raise settings.DataError(
            f"the MobileNetV2 ImageNet weights for alpha {alpha} are not in the Keras "
            f"cache and the download failed ({reason}).\nDownload {IMAGENET_URL}{names[0]} "
            f"(any size's file works) into {models_dir}/, or pass --weights=PATH or none"
        ) from None


def build_model(image_size, alpha, weights, dropout, num_classes=data.NUM_CLASSES):
    """(model, base): MobileNetV2 of width `alpha` without its ImageNet classifier
    (`weights`: None or a weights file), then global average pooling, dropout and a
    softmax over `num_classes`. Inputs are images in [-1, 1]."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    # A file of another width makes Keras warn once per layer before it fails: hold
    # the warnings, and show them only if the weights did load.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            base = keras.applications.MobileNetV2(
                input_shape=(image_size, image_size, 3), alpha=alpha,
                include_top=False, weights=weights,
            )  # fmt: skip
        except (OSError, ValueError) as error:
            if weights is None:
                raise
            reason = (str(error).strip().splitlines() or [""])[0][:160]
            raise settings.DataError(
                f"--weights={weights}: cannot load it into MobileNetV2 of alpha {alpha} "
                f"without its top ({type(error).__name__}: {reason}); expected "
                f"{imagenet_weights_name(alpha, 224)} (any size) or a .weights.h5 saved "
                f"from such a base"
            ) from None
    for warning in caught:
        warnings.warn_explicit(
            warning.message, warning.category, warning.filename, warning.lineno
        )
    # Pretrained: training=False states the intent; Keras <= 3.15 ignores it inside
    # fit, so freeze_base and unfreeze_for_fine_tuning freeze BatchNorm themselves.
    # Random: BatchNorm must learn its statistics, so it follows fit's mode.
    x = base(inputs, training=False if weights else None)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    # Softmax in float32 even under mixed precision, for a stable loss.
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="classes"
    )(x)
    return keras.Model(inputs, outputs, name="mobilenetv2_transfer"), base


def freeze_base(base):
    """Phase 1: the whole base frozen, BatchNorm included; only the head learns."""
    base.trainable = False


def unfreeze_for_fine_tuning(base, freeze_first, batchnorm_momentum=None):
    """Phase 2: the base trainable but its first `freeze_first` layers and BatchNorm (a
    frozen BatchNorm layer runs in inference mode: it uses its moving statistics and
    leaves them alone); given `batchnorm_momentum`, BatchNorm trains, at that momentum.
    A random start is `freeze_first=0` with a momentum."""
    base.trainable = True
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = batchnorm_momentum is not None
            if layer.trainable:  # 0.0 too: batch statistics only
                layer.momentum = batchnorm_momentum
    for layer in base.layers[:freeze_first]:
        layer.trainable = False


def compile_phase(model, base, config, phase, steps_per_epoch):
    """Make `phase` ("head", "fine_tune" or "random_start") trainable and compile for
    it: AdamW, constant for the head, else under a warm-up then cosine decay."""
    momentum = config["BATCHNORM_MOMENTUM"]
    if phase == "head":
        freeze_base(base)
        learning_rate = config["HEAD_LR"]
    else:  # fine-tuning; a random start trains every layer, BatchNorm included
        fine_tune = phase == "fine_tune"
        if fine_tune and not config["FINE_TUNE_BATCHNORM"]:
            momentum = None
        frozen = config["FREEZE_FIRST"] if fine_tune else 0
        unfreeze_for_fine_tuning(base, frozen, momentum)
        learning_rate = training.WarmupThenDecay(
            config["FINE_TUNE_LR" if fine_tune else "RANDOM_START_LR"],
            warmup_steps=config["WARMUP_EPOCHS"] * steps_per_epoch,
            total_steps=config["FINE_TUNE_EPOCHS"] * steps_per_epoch,
        )
    optimizer = keras.optimizers.AdamW(learning_rate, weight_decay=config["WEIGHT_DECAY"])
    training.compile_model(
        model, optimizer, config["LABEL_SMOOTHING"], config["JIT_COMPILE"]
    )


def compiled_model(config, train_images, num_classes, steps_per_epoch, weights=None):
    """The network compiled for its longest phase, fine-tuning (or the random start
    with --weights=none), from `weights` (None: random); bench.py times it."""
    model, base = build_model(
        config["IMG_SIZE"], config["ALPHA"], weights, config["DROPOUT"], num_classes
    )
    phase = "random_start" if config["WEIGHTS"] == "none" else "fine_tune"
    compile_phase(model, base, config, phase, steps_per_epoch)
    return model


def training_plan(config, base):
    """The phases of a run and what each trains, saved in config.json."""
    if config["WEIGHTS"] == "none":
        return {
            "phases": {"random_start": config["FINE_TUNE_EPOCHS"]},
            "frozen_first_layers": [],
            "batchnorm": f"trained, momentum {config['BATCHNORM_MOMENTUM']}",
            "ignored": ["HEAD_EPOCHS", "HEAD_LR", "FINE_TUNE_LR", "FREEZE_FIRST"],
        }
    phases = {"head": config["HEAD_EPOCHS"], "fine_tune": config["FINE_TUNE_EPOCHS"]}
    frozen = base.layers[: config["FREEZE_FIRST"]]
    return {
        "phases": {phase: epochs for phase, epochs in phases.items() if epochs},
        "frozen_first_layers": [layer.name for layer in frozen],
        "batchnorm": (
            "trained in phase 2"
            if config["FINE_TUNE_BATCHNORM"]
            else "from the weights, frozen"
        ),
    }


# ---------------------------------------------------------------------------------
# Train


def main(argv):
    config, run_dir = training.configure_run(CONFIG, argv, SCRIPT)
    check_config(config)
    strategy = training.distribution_strategy()  # before any tensor exists
    weights = resolve_weights(config["WEIGHTS"], config["ALPHA"], config["IMG_SIZE"])
    keras.utils.set_random_seed(config["SEED"])
    precision = training.set_precision(config["MIXED_PRECISION"], strategy)

    # Data: uint8 in memory; each batch is augmented, resized and scaled on its own
    pipelines = data.pipelines_for(config, VALUE_RANGE, strategy.num_replicas_in_sync)
    config["BATCH_SIZE"] = pipelines.batch_size
    print(f"data: {pipelines.source}; images per split: {pipelines.sizes}")

    # Model
    with strategy.scope():
        model, base = build_model(
            config["IMG_SIZE"], config["ALPHA"], weights, config["DROPOUT"],
            num_classes=len(pipelines.class_names),
        )  # fmt: skip
    settings.require(
        config["FREEZE_FIRST"] <= len(base.layers),
        f"--freeze_first must be at most {len(base.layers)}, the base's layer count",
    )
    plan = training_plan(config, base)
    weights_file = Path(weights).name if weights else None
    trained_at = weights_resolution(weights) if weights else None
    print(
        f"model: MobileNetV2 alpha {config['ALPHA']}, {model.count_params():,} "
        f"parameters; weights {weights_file or 'random'}"
        f"{f' (trained at {trained_at} px)' if trained_at else ''}; "
        f"phases {plan['phases']}; BatchNorm {plan['batchnorm']}"
    )
    if config["DRY_RUN"]:
        print("dry run: the data and the weights are at hand; nothing trained")
        return None

    # Train
    if run_dir is None:
        run_dir = training.new_run_dir(config["OUT_DIR"], SCRIPT)
        training.save_run_config(
            run_dir, SCRIPT, config, pipelines.source, value_range=VALUE_RANGE,
            class_names=list(pipelines.class_names), precision=precision,
            weights_file=weights_file, weights_resolution=trained_at, training_plan=plan,
        )  # fmt: skip
    print(f"run folder: {run_dir}")
    done = 0
    for phase, epochs in plan["phases"].items():
        with strategy.scope():
            compile_phase(model, base, config, phase, pipelines.steps_per_epoch)
        trainable = training.count_trainable(model)
        print(f"{phase}: {epochs} epochs, {trainable:,} trainable parameters")
        # A resumed run restores a finished phase from its backup and trains no further.
        patience = 0 if phase == "head" else config["EARLY_STOPPING_PATIENCE"]
        training.fit(
            model, pipelines, run_dir, phase=phase, epochs=done + epochs,
            initial_epoch=done, early_stopping_patience=patience,
            verbose=config["VERBOSE"],
        )  # fmt: skip
        done += epochs

    # Save/Report
    training.finish(
        run_dir, model, pipelines.test, config["LABEL_SMOOTHING"], config["TTA"]
    )
    return run_dir


if __name__ == "__main__":
    settings.cli(main)
