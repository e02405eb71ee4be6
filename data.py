"""Every script's data, CIFAR-10 or class folders: found, read safely, split, streamed as
uint8 through tf.data a batch at a time. Run alone: counts and two figures in plots/.

    python data.py                      # where the data came from, counts, figures
    python data.py --data_dir=~/data    # a folder with cifar-10-batches-py/ or .tar.gz
    python data.py --data_dir=~/photos  # class folders: train/<class>/<images>
"""

import settings

settings.check_command_line(__name__, __file__)  # --help, bad flags: before TF loads

import io
import os
import pickle
import tarfile
import time
from collections import namedtuple
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
from sklearn.model_selection import train_test_split

import training

# ---------------------------------------------------------------------------------
# Config (python data.py --name=value overrides any of these)

DATA_DIR = ""  # CIFAR-10 folder or .tar.gz, or train/<class>/ folders; "" = search
SEED = 0  # seeds the split and the figures' random picks
VAL_FRACTION = 0.1  # share of the training images held out for validation, in (0, 1)
TEST_FRACTION = 0.2  # class folders without test/: share of train/ held out as test set
TRAIN_IMAGES = 0  # training images to use (stratified) before the split; 0 = all
FIGURE_IMAGES = 16  # images in each figure
FIGURE_SIZE = 96  # pixels: the side the augmented figure resizes to (the report's)
AUGMENT_FLIP = "random"  # horizontal flips: "random", "alternate" (airbench) or "none"
AUGMENT_TRANSLATE = 0.125  # random shifts, as a fraction of the side (0.125 = 4 px at 32)
AUGMENT_ROTATE = 0.0  # random rotation, as a fraction of a full turn (0 = off)
AUGMENT_ZOOM = 0.0  # random zoom, as a fraction of the side (0 = off)
AUGMENT_CONTRAST = 0.0  # random contrast change, as a fraction (0 = off)
PLOTS_DIR = "plots"  # where the figures go
CONFIG = settings.config_block(globals())  # the settings above: defaults for overrides

CLASS_NAMES = tuple("airplane automobile bird cat deer dog frog horse ship truck".split())
NUM_CLASSES = len(CLASS_NAMES)
NATIVE_SIZE = 32  # pixels, the side of a CIFAR-10 image
BATCHES_FOLDER = "cifar-10-batches-py"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")  # tf decodes these
HELD_OUT_FOLDERS = ("test", "val", "validation")  # beside train/: the test set, in order
TEST_SPLIT_SEED = 0  # a test set taken from train/ is the same for every run and SEED
DECODE_CHUNK = 256  # images decoded and resized per chunk before they are stored
FOLDERS_LAYOUT = (
    "class folders (train/<class>/<images>, optionally test/, val/ or validation/ "
    "beside train/)"
)
# TensorFlow's C++ log lines about an image that does not decode: the error names it.
DECODE_NOISE = (
    b"decode_image", b"OP_REQUIRES failed", b"Local rendezvous is aborting",
    b"Corrupt JPEG", b"Premature end", b"Improper call to JPEG library",
)  # fmt: skip


def check_config(config):
    """Checks of the settings alone: run before TensorFlow loads, and by main()."""
    settings.check_data_settings(config)
    settings.require(config["FIGURE_IMAGES"] > 0, "--figure_images must be positive")


# ---------------------------------------------------------------------------------
# Finding CIFAR-10: --data_dir, $CIFAR10_DIR, the Keras cache, else a download


def keras_home():
    """Keras's download cache, as Keras picks it: $KERAS_HOME, ~/.keras or /tmp/.keras."""
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser()
    no_home = "KERAS_HOME" not in os.environ and not os.access(Path.home(), os.W_OK)
    if no_home or (home.exists() and not os.access(home, os.W_OK)):
        return Path("/tmp/.keras")
    return home


def find_source(path):
    """The batches folder (even a partial one) or archive at `path`, else None."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    for folder in (path / BATCHES_FOLDER, path):
        if any((folder / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH)):
            return folder
    if (path / ARCHIVE_NAME).is_file():
        return path / ARCHIVE_NAME
    return path / BATCHES_FOLDER if (path / BATCHES_FOLDER).is_dir() else None


def load_cifar10(data_dir=""):
    """(train images, train labels, test images, test labels, source), uint8 and int32."""
    given = {"--data_dir": data_dir, "CIFAR10_DIR": os.environ.get("CIFAR10_DIR")}
    for origin, where in given.items():
        if where:
            source = find_source(where)
            if source is None:
                raise settings.DataError(
                    f"{origin}={where}: no CIFAR-10 there; expected {BATCHES_FOLDER}/, "
                    f"its batch files, or {ARCHIVE_NAME}"
                )
            return (*read_cifar10(source), str(source))
    datasets = keras_home() / "datasets"
    # Where keras.datasets.cifar10 keeps the batches (Keras >= 3.6, older), or the archive
    cached = (f"{BATCHES_FOLDER}-target/{BATCHES_FOLDER}", BATCHES_FOLDER, ARCHIVE_NAME)
    for where in (datasets / name for name in cached):
        if (where / TEST_BATCH).exists() or where.is_file():
            return (*read_cifar10(where), str(where))
    try:  # offline, Keras fails with a long traceback: say what to do instead
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    except Exception as error:  # urllib, HTTP and archive errors all land here
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise settings.DataError(
            f"CIFAR-10 is not on this machine and the download failed ({reason}). "
            f"Pass --data_dir=FOLDER holding {ARCHIVE_NAME} or {BATCHES_FOLDER}/, "
            f"or put {ARCHIVE_NAME} in {datasets}/"
        ) from None
    labels = (y_train.ravel().astype(np.int32), y_test.ravel().astype(np.int32))
    return x_train, labels[0], x_test, labels[1], "keras.datasets.cifar10 download"


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global but the few numpy needs: a crafted batch cannot run code."""

    ALLOWED = frozenset({  # numpy 1's numpy.core.* is numpy 2's numpy._core.*
        ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # Python 3 pickles of bytes at protocol 2
    })  # fmt: skip

    def find_class(self, module, name):
        numpy_2 = module.replace("numpy.core", "numpy._core", 1)
        if (numpy_2, name) not in self.ALLOWED:
            refused = f"refused to load {module}.{name}, which could run code"
            raise settings.DataError(refused)
        return super().find_class(numpy_2, name)


def parse_batch(raw, name):
    """A batch file's bytes, checked -> images uint8 (N, 32, 32, 3), labels int32 (N,)."""

    def bad(problem):
        return settings.DataError(f"{name}: {problem}")

    try:
        batch = NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except settings.DataError as error:
        raise bad(f"not a CIFAR-10 batch file ({error})") from None
    except Exception as error:  # truncated or corrupt: EOFError, UnpicklingError, ...
        unpickling = isinstance(error, pickle.UnpicklingError)
        detail = error if unpickling else type(error).__name__
        raise bad(f"truncated or corrupt ({detail}); download it again") from None
    if not isinstance(batch, dict):
        raise bad(f"expected a dict, found {type(batch).__name__}")
    keys = [key.decode() if isinstance(key, bytes) else key for key in batch]
    batch = dict(zip(keys, batch.values()))
    if "data" not in batch or "labels" not in batch:
        raise bad("no 'data' and 'labels' entries")
    pixels, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        found = getattr(pixels, "dtype", type(pixels).__name__)
        raise bad(f"data must be a uint8 array, found {found}")
    if pixels.ndim != 2 or pixels.shape[1] != 3 * NATIVE_SIZE**2:
        raise bad(f"data must have shape (N, 3072), found {pixels.shape}")
    if labels.shape != (len(pixels),) or not np.issubdtype(labels.dtype, np.integer):
        found = f"found shape {labels.shape} {labels.dtype}"
        raise bad(f"expected {len(pixels)} integer labels, {found}")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise bad(f"labels must lie in 0..9, found {labels.min()}..{labels.max()}")
    # Rows are stored channel-first (1024 red, 1024 green, 1024 blue): to NHWC.
    images = pixels.reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def read_cifar10(source):
    """The batches' arrays, from a batches folder or the .tar.gz (read, not extracted)."""
    source, names, batches = Path(source), (*TRAIN_BATCHES, TEST_BATCH), []
    if source.is_dir():
        for path in (source / name for name in names):
            if not path.is_file():
                needs = f"{', '.join(TRAIN_BATCHES)} and {TEST_BATCH}"
                raise settings.DataError(f"{path}: missing; the folder needs {needs}")
            try:
                batches.append(parse_batch(path.read_bytes(), str(path)))
            except OSError as error:
                problem = f"unreadable ({error.strerror})"
                raise settings.DataError(f"{path}: {problem}") from None
    else:
        try:
            with tarfile.open(source, "r:gz") as archive:
                files = [member for member in archive.getmembers() if member.isfile()]
                members = {Path(member.name).name: member for member in files}
                for name in names:
                    if name not in members:
                        missing = f"archive has no {BATCHES_FOLDER}/{name}"
                        raise settings.DataError(f"{source}: {missing}")
                    raw = archive.extractfile(members[name]).read()
                    batches.append(parse_batch(raw, f"{source}:{name}"))
        except (tarfile.TarError, EOFError, OSError) as error:
            problem = f"unreadable archive ({type(error).__name__}: {error})"
            raise settings.DataError(f"{source}: {problem}; download it again") from None
    *train, test = batches  # train images and labels joined, then the test ones
    return (*map(np.concatenate, zip(*train)), *test)


# ---------------------------------------------------------------------------------
# Class folders: one's own images, FOLDER/train/<class>/<images> (Keras's layout)

# Listed, not decoded: paths sorted by class then name; labels index class_names.
ClassFolders = namedtuple(
    "ClassFolders", "train_files train_labels test_files test_labels class_names source"
)


def class_folders_root(data_dir):
    """Root of the class folders `data_dir` names; None if no folder or if CIFAR-10."""
    if not data_dir:
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir() or find_source(path) is not None:
        return None
    if (path / "train").is_dir():
        return path
    hint = ""
    if any(any(image_files(folder)) for folder in visible_folders(path)):
        hint = f"\nits sub-folders hold images: move them into {path / 'train'}/"
    raise settings.DataError(
        f"--data_dir={data_dir}: neither CIFAR-10 ({BATCHES_FOLDER}/, its batch files "
        f"or {ARCHIVE_NAME}) nor {FOLDERS_LAYOUT}{hint}"
    )


def visible_folders(path):
    """Sub-folders of `path`, sorted, without hidden ones (.ipynb_checkpoints, ...)."""
    folders = [folder for folder in Path(path).iterdir() if folder.is_dir()]
    return sorted(folder for folder in folders if not folder.name.startswith("."))


def image_files(folder):
    """Image files under `folder`, hidden ones not, sorted; found lazily, one by one."""
    for parent, folders, names in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.join(parent, name)


def list_split(split_dir, names, class_names):
    """(files, labels) of a split's class folders `names`, labels index `class_names`."""
    files, labels = [], []
    for name in names:
        found = list(image_files(split_dir / name))
        if not found:
            raise settings.DataError(
                f"{split_dir / name}: empty class folder (no "
                f"{'/'.join(IMAGE_EXTENSIONS)} files); add images or remove the folder"
            )
        files += found
        labels += [class_names.index(name)] * len(found)
    return np.array(files, dtype=object), np.array(labels, dtype=np.int32)


def list_class_folders(root, test_fraction):
    """Classes are train/'s sub-folders; the test set is test/, val/ or validation/ (the
    first there), else a stratified `test_fraction` of train/."""
    root = Path(root).expanduser()
    train_dir = root / "train"
    class_names = tuple(folder.name for folder in visible_folders(train_dir))
    if len(class_names) < 2:
        found = f"only one ({class_names[0]}/)" if class_names else "none"
        raise settings.DataError(
            f"{train_dir}: class folders needed, 2 or more, found {found}; "
            f"expected {FOLDERS_LAYOUT}"
        )
    train_files, train_labels = list_split(train_dir, class_names, class_names)
    held_out = [name for name in HELD_OUT_FOLDERS if (root / name).is_dir()]
    if held_out:
        test_dir = root / held_out[0]
        test_classes = [folder.name for folder in visible_folders(test_dir)]
        unseen = [name for name in test_classes if name not in class_names]
        if unseen:
            raise settings.DataError(
                f"{test_dir / unseen[0]}: class {unseen[0]!r} is not in {train_dir}/, so "
                f"training never sees it; add train/{unseen[0]}/ or remove it"
            )
        if not test_classes:
            raise settings.DataError(
                f"{test_dir}: no class folders; expected {held_out[0]}/<class>/<images>, "
                "or remove it to take the test set from train/"
            )
        # Labels index the training classes, which the test split may only part cover.
        test_files, test_labels = list_split(test_dir, test_classes, class_names)
        unused = "".join(f", {name}/ not used" for name in held_out[1:])
        source = f"{root} (class folders; test set: {held_out[0]}/{unused})"
    else:
        try:
            parts = train_test_split(
                np.arange(len(train_labels)), test_size=test_fraction,
                stratify=train_labels, random_state=TEST_SPLIT_SEED,
            )  # fmt: skip
        except ValueError as error:
            raise settings.ConfigError(
                f"{train_dir}: cannot hold out a stratified test set of --test_fraction="
                f"{test_fraction} from {len(train_labels)} images in {len(class_names)} "
                f"classes ({error}); add images or a test/ folder"
            ) from None
        train_index, test_index = (np.sort(part) for part in parts)
        test_files, test_labels = train_files[test_index], train_labels[test_index]
        train_files, train_labels = train_files[train_index], train_labels[train_index]
        source = (
            f"{root} (class folders; no test/, val/ or validation/: test set "
            f"{test_fraction:.0%} of train/, stratified)"
        )
    return ClassFolders(
        train_files, train_labels, test_files, test_labels, class_names, source
    )


def decode_images(files, image_size, chunk=DECODE_CHUNK):
    """uint8 RGB (N, S, S, 3) of `files` squeezed square as Keras does, S = `image_size`,
    a chunk at a time: memory never grows with photo size. DataError names a bad file."""
    images = np.empty((len(files), image_size, image_size, 3), np.uint8)

    def decode(path):
        contents = tf.io.read_file(path)
        image = tf.io.decode_image(contents, channels=3, expand_animations=False)
        image = tf.image.resize(image, (image_size, image_size), antialias=True)
        return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)

    def decode_all():
        paths = tf.data.Dataset.from_tensor_slices(list(files))
        decoded = paths.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(chunk)
        done = 0
        try:
            for batch in decoded.prefetch(1):
                images[done : done + len(batch)] = batch.numpy()
                done += len(batch)
        except tf.errors.OpError:
            for path in files[done:]:  # the failed chunk starts at `done`: find its file
                try:
                    decode(tf.constant(path))
                except tf.errors.OpError as error:
                    reason = error.message.split("}}")[-1].split("[Op:")[0].strip()
                    reason = reason or type(error).__name__
                    raise settings.DataError(
                        f"{path}: not a readable image ({reason}); fix it or remove it"
                    ) from None
            raise

    if len(files):
        settings.quietly(decode_all, drop=DECODE_NOISE)
    return images


# ---------------------------------------------------------------------------------
# Splits: stratified and seeded, always from the training set


def split(images, labels, val_fraction, seed, train_images=0):
    """(train images, train labels, val images, val labels): a stratified subset of
    `train_images` images (0 = all), then a stratified validation split from it."""
    settings.check_data_settings(
        {"VAL_FRACTION": val_fraction, "TRAIN_IMAGES": train_images}
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
        raise settings.ConfigError(
            f"cannot split {len(index)} images into stratified train and validation sets "
            f"with --val_fraction={val_fraction}: {error}"
        ) from None
    train_index, val_index = np.sort(train_index), np.sort(val_index)
    return images[train_index], labels[train_index], images[val_index], labels[val_index]


def load_data(config, image_size):
    """(x_train, y_train, x_val, y_val, x_test, y_test, class names, source) of DATA_DIR;
    class folders decoded at `image_size`, only the images used, after every check."""
    root = class_folders_root(config["DATA_DIR"])
    split_settings = config["VAL_FRACTION"], config["SEED"], config["TRAIN_IMAGES"]
    if root is None:
        images, labels, *test, source = load_cifar10(config["DATA_DIR"])
        return (*split(images, labels, *split_settings), *test, CLASS_NAMES, source)
    folders = list_class_folders(root, config.get("TEST_FRACTION", TEST_FRACTION))
    train_files, y_train, val_files, y_val = split(
        folders.train_files, folders.train_labels, *split_settings
    )
    y_test, start = folders.test_labels, time.perf_counter()
    x_train, x_val, x_test = (
        decode_images(files, image_size)
        for files in (train_files, val_files, folders.test_files)
    )
    print(
        f"decoded {len(y_train) + len(y_val) + len(y_test):,} images from {root} at "
        f"{image_size}x{image_size} px in {time.perf_counter() - start:.1f} s"
    )
    splits = x_train, y_train, x_val, y_val, x_test, y_test
    return (*splits, folders.class_names, folders.source)


def load_test_data(data_dir, image_size, test_fraction=TEST_FRACTION):
    """(test images, test labels, source, training image count, class names): the test
    set a run was evaluated on, for evaluate.py."""
    root = class_folders_root(data_dir)
    if root is None:
        train_images, _, test_images, test_labels, source = load_cifar10(data_dir)
        return test_images, test_labels, source, len(train_images), CLASS_NAMES
    folders = list_class_folders(root, test_fraction)
    images = decode_images(folders.test_files, image_size)
    count = len(folders.train_labels)
    return images, folders.test_labels, folders.source, count, folders.class_names


# ---------------------------------------------------------------------------------
# Pipelines: uint8 in memory, all float work one batch at a time


def make_augmenter(translate=0.0, rotate=0.0, zoom=0.0, contrast=0.0, seed=0):
    """Keras layers for batches in [0, 255] at their stored side, None if all are off.
    Reflected borders look like image, not black bars; whole-pixel shifts stay sharp."""
    reflect = {"fill_mode": "reflect"}
    layers = []
    if translate:
        layers.append(keras.layers.RandomTranslation(
            translate, translate, **reflect, interpolation="nearest", seed=seed + 1
        ))  # fmt: skip
    if rotate:
        layers.append(keras.layers.RandomRotation(rotate, **reflect, seed=seed + 2))
    if zoom:
        layers.append(keras.layers.RandomZoom(zoom, zoom, **reflect, seed=seed + 3))
    if contrast:
        layers.append(
            keras.layers.RandomContrast(contrast, value_range=(0, 255), seed=seed + 4)
        )
    return keras.Sequential(layers, name="augment") if layers else None


def make_dataset(
    images, labels, *, batch_size, image_size, value_range, augmenter=None, flip="none",
    shuffle=False, seed=0, repeat=False, num_classes=NUM_CLASSES,
):  # fmt: skip
    """(float32 images (B, S, S, 3) in `value_range`, one-hot labels), each batch gathered
    from the uint8 array by index, flipped ("random": new coins each pass; "alternate":
    airbench's, the first pass's coins mirrored every other pass; "none"), augmented,
    resized."""
    images = np.asarray(images, dtype=np.uint8)
    side, low, high = images.shape[1], *value_range
    labels = tf.convert_to_tensor(labels, dtype=tf.int32)
    coins = tf.constant(np.random.default_rng(seed).integers(0, 2, len(labels)), tf.int64)
    passes = tf.Variable(-1, dtype=tf.int64, trainable=False)

    def load_batch(index, pass_number):
        # Gathered from the caller's array itself: a tensor of it would copy it.
        batch = tf.numpy_function(lambda i: images[i], [index], tf.uint8, stateful=False)
        batch = tf.cast(tf.ensure_shape(batch, (None, side, side, 3)), tf.float32)
        if flip != "none":
            if flip == "random":  # fresh coins each pass, fixed by the seed
                coins_now = tf.random.stateless_uniform(
                    [len(labels)], [seed, pass_number], 0, 2, tf.int64
                )
            else:
                coins_now = (coins + pass_number) % 2
            mirrored = tf.cast(tf.gather(coins_now, index), tf.bool)[:, None, None, None]
            batch = tf.where(mirrored, tf.reverse(batch, [2]), batch)
        if augmenter is not None:
            batch = augmenter(batch, training=True)
        if image_size != side:
            batch = tf.image.resize(batch, (image_size, image_size), method="bilinear")
        batch = tf.clip_by_value(batch * ((high - low) / 255.0) + low, low, high)
        return batch, tf.one_hot(tf.gather(labels, index), num_classes)

    indices = tf.data.Dataset.range(len(labels))
    if shuffle:
        indices = indices.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    # Each pass over the images counts itself, for alternating flips.
    dataset = (
        tf.data.Dataset.range(1)
        .map(lambda _: passes.assign_add(1))
        .flat_map(lambda number: indices.batch(batch_size).map(lambda i: (i, number)))
    )
    # flat_map hides the length, which Keras needs to end each epoch quietly.
    length = tf.data.experimental.assert_cardinality(-(-len(labels) // batch_size))
    dataset = dataset.repeat() if repeat else dataset.apply(length)
    dataset = dataset.map(load_batch, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def augmenter_for(config):
    """The augmentation a script's AUGMENT_* settings describe, seeded by its SEED."""
    return make_augmenter(
        config["AUGMENT_TRANSLATE"], config["AUGMENT_ROTATE"], config["AUGMENT_ZOOM"],
        config["AUGMENT_CONTRAST"], seed=config["SEED"],
    )  # fmt: skip


class Pipelines(NamedTuple):
    """A training script's data: three pipelines and the counts its training needs."""

    train: tf.data.Dataset  # shuffled, augmented, repeated: one iterator for every epoch
    validation: tf.data.Dataset
    test: tf.data.Dataset
    sizes: dict  # images per split: {"train": ..., "validation": ..., "test": ...}
    batch_size: int  # images per step, all replicas together
    steps_per_epoch: int  # batches per epoch: one pass, or STEPS_PER_EPOCH if set
    images_per_epoch: int
    source: str  # where the data came from
    class_names: tuple  # label i is class_names[i]; the model needs len() outputs
    train_images: np.ndarray  # the training split, uint8 (N, S, S, 3), as stored


def pipelines_for(config, value_range, replicas=1):
    """The Pipelines a training script's config asks for, scaled to `value_range`."""
    settings.check_data_settings(config)
    x_train, y_train, x_val, y_val, x_test, y_test, class_names, source = load_data(
        config, config["IMG_SIZE"]
    )
    batch_size = settings.batch_size(config, len(y_train), replicas)
    fixed_steps = config["STEPS_PER_EPOCH"]
    batches = {
        "batch_size": batch_size, "image_size": config["IMG_SIZE"],
        "value_range": value_range, "num_classes": len(class_names),
    }  # fmt: skip
    train = make_dataset(
        x_train, y_train, **batches, augmenter=augmenter_for(config), shuffle=True,
        flip=config["AUGMENT_FLIP"], seed=config["SEED"], repeat=True,
    )  # fmt: skip
    return Pipelines(
        train=train,
        validation=make_dataset(x_val, y_val, **batches),
        test=make_dataset(x_test, y_test, **batches),
        sizes={"train": len(y_train), "validation": len(y_val), "test": len(y_test)},
        batch_size=batch_size,
        steps_per_epoch=fixed_steps or -(-len(y_train) // batch_size),
        images_per_epoch=fixed_steps * batch_size if fixed_steps else len(y_train),
        source=source,
        class_names=class_names,
        train_images=x_train,
    )


# ---------------------------------------------------------------------------------
# Report: python data.py


def save_figures(images, labels, config, class_names, title):
    """Write plots/samples.png as stored, plots/augmented.png as a pipeline gives it."""
    from matplotlib.figure import Figure  # no pyplot: files only, never a window

    plots_dir, size = Path(config["PLOTS_DIR"]), config["FIGURE_SIZE"]
    plots_dir.mkdir(parents=True, exist_ok=True)
    augmented, _ = next(iter(make_dataset(  # unshuffled: in the order of `labels`
        images, labels, batch_size=len(labels), image_size=size, value_range=(0.0, 1.0),
        augmenter=augmenter_for(config), flip=config["AUGMENT_FLIP"], seed=config["SEED"],
        num_classes=len(class_names),
    )))  # fmt: skip
    side = images.shape[1]
    resized = f"The same images augmented and resized to {size}x{size}"
    columns = min(8, len(labels))
    rows = -(-len(labels) // columns)
    for name, pictures, heading in (
        ("samples.png", images, f"{title}: random training images ({side}x{side})"),
        ("augmented.png", augmented.numpy(), resized),
    ):
        figure = Figure(figsize=(1.6 * columns, 1.8 * rows), layout="constrained")
        axes = figure.subplots(rows, columns, squeeze=False)
        for axis in axes.flat:
            axis.axis("off")
        for axis, picture, label in zip(axes.flat, pictures, labels):
            axis.imshow(picture)
            axis.set_title(class_names[label], fontsize=9)
        figure.suptitle(heading)
        figure.savefig(plots_dir / name, dpi=100)
        print(f"wrote {plots_dir / name}")


def main(argv):
    config = training.configure(CONFIG, argv)
    check_config(config)
    # Class folders decode at FIGURE_SIZE: every image is checked as training would.
    x_train, y_train, _, y_val, _, y_test, class_names, source = load_data(
        config, config["FIGURE_SIZE"]
    )
    root = class_folders_root(config["DATA_DIR"])
    print(f"CIFAR-10 from {source}" if root is None else source)
    width = max(len("class"), *(len(name) for name in class_names))
    print(f"{'class':<{width}} {'train':>7} {'val':>7} {'test':>7}")
    for index, name in enumerate(class_names):
        counts = [int((labels == index).sum()) for labels in (y_train, y_val, y_test)]
        print(f"{name:<{width}} " + " ".join(f"{count:>7}" for count in counts))
    print(f"{'total':<{width}} {len(y_train):>7} {len(y_val):>7} {len(y_test):>7}")
    count = min(config["FIGURE_IMAGES"], len(y_train))
    rng = np.random.default_rng(config["SEED"])
    pick = np.sort(rng.choice(len(y_train), count, replace=False))
    title = "CIFAR-10" if root is None else root.resolve().name
    save_figures(x_train[pick], y_train[pick], config, class_names, title)


if __name__ == "__main__":
    settings.cli(main)
