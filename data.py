"""CIFAR-10 for every script: find it, read it safely, split it, and stream it
through tf.data as uint8 that is augmented, resized and scaled one batch at a time.

    python data.py                           # where the data came from, counts, figures
    python data.py --data_dir=~/data         # a folder with cifar-10-batches-py/ or the .tar.gz

Writes plots/samples.png (random originals, the report's first figure) and
plots/augmented.png (the same images augmented and resized to 96 px).
"""

import settings

settings.check_command_line(__name__, __file__)  # --help, bad flags: before TF loads

import io
import os
import pickle
import tarfile
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
from sklearn.model_selection import train_test_split

import training

# ---------------------------------------------------------------------------------
# Config (python data.py --name=value overrides any of these)

DATA_DIR = (
    ""  # folder with cifar-10-batches-py/, that folder, or the .tar.gz; "" = search
)
SEED = 0  # seeds the split and the figures' random picks
VAL_FRACTION = 0.1  # share of the training images held out for validation, in (0, 1)
TRAIN_IMAGES = 0  # training images to use (stratified) before the split; 0 = all
FIGURE_IMAGES = 16  # images in each figure
FIGURE_SIZE = 96  # pixels: the side the augmented figure resizes to (the report's)
AUGMENT_FLIP = True  # random horizontal flips
AUGMENT_TRANSLATE = 0.125  # random shifts, as a fraction of the side (0.125 = 4 px at 32)
AUGMENT_ROTATE = 0.0  # random rotation, as a fraction of a full turn (0 = off)
AUGMENT_ZOOM = 0.0  # random zoom, as a fraction of the side (0 = off)
AUGMENT_CONTRAST = 0.0  # random contrast change, as a fraction (0 = off)
PLOTS_DIR = "plots"  # where the figures go
CONFIG = training.config_block(globals())  # the settings above: defaults for overrides

# ---------------------------------------------------------------------------------
# Finding CIFAR-10

CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
NUM_CLASSES = len(CLASS_NAMES)
NATIVE_SIZE = 32  # pixels, the side of a CIFAR-10 image
BATCHES_FOLDER = "cifar-10-batches-py"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


def keras_home():
    """The folder Keras caches downloads in, chosen as Keras chooses it: $KERAS_HOME,
    else ~/.keras, and /tmp/.keras when that is not writable. Datasets go to its
    datasets/, weights to its models/."""
    if "KERAS_HOME" in os.environ:
        home = Path(os.environ["KERAS_HOME"]).expanduser()
    else:
        home = Path.home() / ".keras"
        if not os.access(Path.home(), os.W_OK):
            home = Path("/tmp/.keras")
    if home.exists() and not os.access(home, os.W_OK):
        home = Path("/tmp/.keras")
    return home


def keras_datasets_dir():
    return keras_home() / "datasets"


def keras_cache_dirs():
    """Where keras.datasets.cifar10 leaves the extracted batches: Keras >= 3.6, then
    older versions."""
    datasets = keras_datasets_dir()
    return [
        datasets / "cifar-10-batches-py-target" / BATCHES_FOLDER,
        datasets / BATCHES_FOLDER,
    ]


BATCH_FILES = (*TRAIN_BATCHES, TEST_BATCH)


def find_source(path):
    """The batches folder or archive that `path` holds or is, else None. A folder
    with only some of the batch files still counts, so the error names the rest."""
    path = Path(path).expanduser()
    if path.is_file():
        return path  # read_cifar10 says so if it is not a .tar.gz
    for folder in (path / BATCHES_FOLDER, path):
        if any((folder / name).is_file() for name in BATCH_FILES):
            return folder
    if (path / ARCHIVE_NAME).is_file():
        return path / ARCHIVE_NAME
    if (path / BATCHES_FOLDER).is_dir():
        return path / BATCHES_FOLDER
    return None


def load_cifar10(data_dir=""):
    """(train_images, train_labels, test_images, test_labels, source): images uint8
    (N, 32, 32, 3), labels int32 (N,). Looks in `data_dir`, $CIFAR10_DIR, the Keras
    cache (extracted batches, or cifar-10-python.tar.gz put there by hand), then
    downloads once through Keras."""
    for origin, where in (
        ("--data_dir", data_dir),
        ("CIFAR10_DIR", os.environ.get("CIFAR10_DIR")),
    ):
        if where:
            source = find_source(where)
            if source is None:
                raise training.DataError(
                    f"{origin}={where}: no CIFAR-10 there; expected {BATCHES_FOLDER}/, "
                    f"its batch files, or {ARCHIVE_NAME}"
                )
            return (*read_cifar10(source), str(source))
    for cached in keras_cache_dirs():
        if (cached / TEST_BATCH).exists():
            return (*read_cifar10(cached), str(cached))
    archive = keras_datasets_dir() / ARCHIVE_NAME
    if archive.is_file():
        return (*read_cifar10(archive), str(archive))
    return (*download_cifar10(), "keras.datasets.cifar10 download")


def download_cifar10():
    """keras.datasets.cifar10.load_data(), which downloads CIFAR-10 once; offline it
    fails with a long traceback, so say what to do instead."""
    try:
        (train_images, train_labels), (test_images, test_labels) = (
            keras.datasets.cifar10.load_data()
        )
    except Exception as error:  # urllib, HTTP and archive errors all land here
        cache = keras_datasets_dir()
        # Keras wraps URL errors in a bare Exception: its text holds the reason.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise training.DataError(
            f"CIFAR-10 is not on this machine and the download failed ({reason}). "
            f"Pass --data_dir=FOLDER holding {ARCHIVE_NAME} or {BATCHES_FOLDER}/, "
            f"or put {ARCHIVE_NAME} in {cache}/"
        ) from None
    return (
        train_images,
        train_labels.ravel().astype(np.int32),
        test_images,
        test_labels.ravel().astype(np.int32),
    )


# ---------------------------------------------------------------------------------
# Reading batch files: pickles, so admit nothing but numpy array reconstruction


class RefusedGlobal(pickle.UnpicklingError):
    """A batch file asked for something other than numpy array reconstruction."""


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global but the few numpy needs to rebuild an array, so a
    crafted batch file cannot run code."""

    ALLOWED = {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    } | {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # Python 3 pickles of bytes at protocol 2
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise RefusedGlobal(f"refused to load {module}.{name}")
        if module.startswith("numpy.core"):
            module = module.replace("numpy.core", "numpy._core", 1)
        return super().find_class(module, name)


def parse_batch(raw, name):
    """One batch file's bytes -> (images uint8 (N, 32, 32, 3), labels int32 (N,))."""
    try:
        batch = NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except RefusedGlobal as error:
        raise training.DataError(
            f"{name}: not a CIFAR-10 batch file ({error}, which could run code)"
        ) from None
    except Exception as error:  # truncated or corrupt: EOFError, UnpicklingError, ...
        detail = (
            error if isinstance(error, pickle.UnpicklingError) else type(error).__name__
        )
        raise training.DataError(
            f"{name}: truncated or corrupt ({detail}); download it again"
        ) from None
    if not isinstance(batch, dict):
        raise training.DataError(f"{name}: expected a dict, found {type(batch).__name__}")
    batch = {
        key.decode() if isinstance(key, bytes) else key: value
        for key, value in batch.items()
    }
    if "data" not in batch or "labels" not in batch:
        raise training.DataError(f"{name}: no 'data' and 'labels' entries")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise training.DataError(
            f"{name}: data must be a uint8 array, found {getattr(data, 'dtype', type(data).__name__)}"
        )
    if data.ndim != 2 or data.shape[1] != 3 * NATIVE_SIZE * NATIVE_SIZE:
        raise training.DataError(
            f"{name}: data must have shape (N, 3072), found {data.shape}"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise training.DataError(
            f"{name}: expected {len(data)} integer labels, found shape {labels.shape} {labels.dtype}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise training.DataError(
            f"{name}: labels must lie in 0..9, found {labels.min()}..{labels.max()}"
        )
    # Rows are stored channel-first (1024 red, 1024 green, 1024 blue): to NHWC.
    images = data.reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def read_cifar10(source):
    """Read the five training batches and the test batch from a batches folder or
    from the .tar.gz archive (without extracting it)."""
    source = Path(source)
    if source.is_dir():

        def read(name):
            path = source / name
            if not path.is_file():
                raise training.DataError(
                    f"{path}: missing; the folder needs {', '.join(TRAIN_BATCHES)} and {TEST_BATCH}"
                )
            try:
                raw = path.read_bytes()
            except OSError as error:
                raise training.DataError(
                    f"{path}: unreadable ({error.strerror})"
                ) from None
            return parse_batch(raw, str(path))

        return _assemble(read)
    try:
        with tarfile.open(source, "r:gz") as archive:
            members = {
                Path(member.name).name: member
                for member in archive.getmembers()
                if member.isfile()
            }

            def read(name):
                if name not in members:
                    raise training.DataError(
                        f"{source}: archive has no {BATCHES_FOLDER}/{name}"
                    )
                return parse_batch(
                    archive.extractfile(members[name]).read(), f"{source}:{name}"
                )

            return _assemble(read)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise training.DataError(
            f"{source}: unreadable archive ({type(error).__name__}: {error}); download it again"
        ) from None


def _assemble(read):
    train = [read(name) for name in TRAIN_BATCHES]
    test_images, test_labels = read(TEST_BATCH)
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    return train_images, train_labels, test_images, test_labels


# ---------------------------------------------------------------------------------
# Splits: stratified and seeded, always from the training set


def split(images, labels, val_fraction, seed, train_images=0):
    """(train_images, train_labels, val_images, val_labels): a stratified subset of
    `train_images` images (0 = all), then a stratified validation split from it."""
    training.require(
        0 < val_fraction < 1, f"--val_fraction must lie in (0, 1), got {val_fraction}"
    )
    training.require(
        train_images >= 0,
        f"--train_images must be 0 (all) or positive, got {train_images}",
    )
    index = np.arange(len(labels))
    try:
        if train_images and train_images < len(labels):
            index, _ = train_test_split(
                index, train_size=train_images, stratify=labels, random_state=seed
            )
        train_index, val_index = train_test_split(
            index, test_size=val_fraction, stratify=labels[index], random_state=seed
        )
    except ValueError as error:
        raise training.ConfigError(
            f"cannot split {len(index)} images into stratified train and validation sets "
            f"with --val_fraction={val_fraction}: {error}"
        ) from None
    train_index.sort()
    val_index.sort()
    return images[train_index], labels[train_index], images[val_index], labels[val_index]


# ---------------------------------------------------------------------------------
# Pipelines: uint8 in memory, all float work one batch at a time


def make_augmenter(flip=False, translate=0.0, rotate=0.0, zoom=0.0, contrast=0.0, seed=0):
    """Keras preprocessing layers for 32 px batches in [0, 255]; None when all off
    (the defaults: the settings live in each script's config block). Reflect
    padding keeps shifted borders looking like image, not black bars."""
    layers = []
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if translate:
        layers.append(
            keras.layers.RandomTranslation(
                translate, translate, fill_mode="reflect", seed=seed + 1
            )
        )
    if rotate:
        layers.append(
            keras.layers.RandomRotation(rotate, fill_mode="reflect", seed=seed + 2)
        )
    if zoom:
        layers.append(
            keras.layers.RandomZoom(zoom, zoom, fill_mode="reflect", seed=seed + 3)
        )
    if contrast:
        layers.append(
            keras.layers.RandomContrast(contrast, value_range=(0, 255), seed=seed + 4)
        )
    return keras.Sequential(layers, name="augment") if layers else None


def make_dataset(
    images,
    labels,
    *,
    batch_size,
    image_size,
    value_range,
    augmenter=None,
    shuffle=False,
    seed=0,
    repeat=False,
):
    """A tf.data pipeline of (images float32 (B, S, S, 3) in `value_range`, one-hot
    labels (B, 10)). The uint8 array is held once (150 MB for 50,000 images); only
    shuffled indices flow, and each batch is gathered, augmented at 32 px, resized
    to `image_size` and scaled on its own."""
    images = np.asarray(images, dtype=np.uint8)
    labels = tf.convert_to_tensor(labels, dtype=tf.int32)
    low, high = value_range
    scale = (high - low) / 255.0

    def gather(index):
        # Batches are gathered from the caller's array itself: turning the whole
        # array into a tensor would copy it, and briefly hold it twice more.
        return images[index]

    def load_batch(index):
        batch = tf.numpy_function(gather, [index], tf.uint8, stateful=False)
        batch = tf.ensure_shape(batch, (None, NATIVE_SIZE, NATIVE_SIZE, 3))
        batch = tf.cast(batch, tf.float32)
        if augmenter is not None:
            batch = augmenter(batch, training=True)
        if image_size != NATIVE_SIZE:
            batch = tf.image.resize(batch, (image_size, image_size), method="bilinear")
        batch = tf.clip_by_value(batch * scale + low, low, high)
        return batch, tf.one_hot(tf.gather(labels, index), NUM_CLASSES)

    dataset = tf.data.Dataset.range(len(labels))
    if shuffle:
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size)
    dataset = dataset.map(load_batch, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def augmenter_for(config):
    """The augmentation a script's AUGMENT_* settings describe, seeded by its SEED."""
    return make_augmenter(
        config["AUGMENT_FLIP"],
        config["AUGMENT_TRANSLATE"],
        config["AUGMENT_ROTATE"],
        config["AUGMENT_ZOOM"],
        config["AUGMENT_CONTRAST"],
        seed=config["SEED"],
    )


class Pipelines(NamedTuple):
    """A training script's data: three pipelines and the counts its training needs."""

    train: tf.data.Dataset  # shuffled and augmented; repeated when STEPS_PER_EPOCH is set
    validation: tf.data.Dataset
    test: tf.data.Dataset
    sizes: dict  # images per split: {"train": ..., "validation": ..., "test": ...}
    steps_per_epoch: int  # batches per epoch, for learning-rate schedules
    fit_steps: int | None  # for model.fit: None = each epoch runs the whole set once
    images_per_epoch: int
    source: str  # where the data came from


def pipelines_for(config, value_range):
    """The data of a training script's run, from its config block: CIFAR-10 found
    (DATA_DIR), the TRAIN_IMAGES subset and VAL_FRACTION split (SEED), and pipelines
    of BATCH_SIZE batches at IMG_SIZE scaled to `value_range`."""
    training.require(config["IMG_SIZE"] >= NATIVE_SIZE, "--img_size must be 32 or more")
    training.require(config["BATCH_SIZE"] > 0, "--batch_size must be positive")
    train_images, train_labels, test_images, test_labels, source = load_cifar10(
        config["DATA_DIR"]
    )
    x_train, y_train, x_val, y_val = split(
        train_images,
        train_labels,
        config["VAL_FRACTION"],
        config["SEED"],
        config["TRAIN_IMAGES"],
    )
    batch_size, fixed_steps = config["BATCH_SIZE"], config["STEPS_PER_EPOCH"]
    batches = dict(
        batch_size=batch_size, image_size=config["IMG_SIZE"], value_range=value_range
    )
    steps_per_epoch = fixed_steps or -(-len(y_train) // batch_size)
    return Pipelines(
        train=make_dataset(
            x_train,
            y_train,
            **batches,
            augmenter=augmenter_for(config),
            shuffle=True,
            seed=config["SEED"],
            repeat=bool(fixed_steps),
        ),
        validation=make_dataset(x_val, y_val, **batches),
        test=make_dataset(test_images, test_labels, **batches),
        sizes={"train": len(y_train), "validation": len(y_val), "test": len(test_labels)},
        steps_per_epoch=steps_per_epoch,
        fit_steps=fixed_steps or None,
        images_per_epoch=fixed_steps * batch_size if fixed_steps else len(y_train),
        source=source,
    )


# ---------------------------------------------------------------------------------
# Report: python data.py


def save_figures(images, labels, augmenter, plots_dir, figure_size):
    """samples.png (originals with class names) and augmented.png (the same images
    augmented and resized to `figure_size`, as the model would see them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    augmented = next(iter(make_dataset(
        images, labels, batch_size=len(labels), image_size=figure_size,
        value_range=(0.0, 1.0), augmenter=augmenter,
    )))[0].numpy()  # fmt: skip
    columns = min(8, len(labels))
    rows = -(-len(labels) // columns)
    paths = []
    for name, pictures, title in (
        ("samples.png", images, "CIFAR-10: random training images (32x32)"),
        (
            "augmented.png",
            augmented,
            f"The same images augmented and resized to {figure_size}x{figure_size}",
        ),
    ):
        figure, axes = plt.subplots(
            rows, columns, figsize=(1.6 * columns, 1.8 * rows), squeeze=False
        )
        for axis in axes.flat:
            axis.axis("off")
        for axis, picture, label in zip(axes.flat, pictures, labels):
            axis.imshow(picture)
            axis.set_title(CLASS_NAMES[label], fontsize=9)
        figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(plots_dir / name, dpi=100)
        plt.close(figure)
        paths.append(plots_dir / name)
    return paths


def check_config(config):
    """Checks of the settings alone: run before TensorFlow loads, and by main()."""
    settings.require(
        0 < config["VAL_FRACTION"] < 1,
        f"--val_fraction must lie in (0, 1), got {config['VAL_FRACTION']}",
    )
    settings.require(
        config["TRAIN_IMAGES"] >= 0,
        f"--train_images must be 0 (all) or positive, got {config['TRAIN_IMAGES']}",
    )
    settings.require(config["FIGURE_IMAGES"] > 0, "--figure_images must be positive")


def main(argv):
    config = training.configure(CONFIG, argv)
    check_config(config)
    train_images, train_labels, _, test_labels, source = load_cifar10(config["DATA_DIR"])
    x_train, y_train, _, y_val = split(
        train_images,
        train_labels,
        config["VAL_FRACTION"],
        config["SEED"],
        config["TRAIN_IMAGES"],
    )
    print(f"CIFAR-10 from {source}")
    width = max(len(name) for name in CLASS_NAMES)
    print(f"{'class':<{width}} {'train':>7} {'val':>7} {'test':>7}")
    for index, name in enumerate(CLASS_NAMES):
        counts = [
            int((labels == index).sum()) for labels in (y_train, y_val, test_labels)
        ]
        print(f"{name:<{width}} " + " ".join(f"{count:>7}" for count in counts))
    print(f"{'total':<{width}} {len(y_train):>7} {len(y_val):>7} {len(test_labels):>7}")

    rng = np.random.default_rng(config["SEED"])
    pick = rng.choice(
        len(y_train), size=min(config["FIGURE_IMAGES"], len(y_train)), replace=False
    )
    for path in save_figures(
        x_train[pick],
        y_train[pick],
        augmenter_for(config),
        config["PLOTS_DIR"],
        config["FIGURE_SIZE"],
    ):
        print(f"wrote {path}")


if __name__ == "__main__":
    training.cli(main)
