"""CIFAR-10, or class folders of one's own images, for every script: find it, read it
safely, split it, and stream it through tf.data as uint8 that is augmented, resized
and scaled one batch at a time.

    python data.py                           # where the data came from, counts, figures
    python data.py --data_dir=~/data         # a folder with cifar-10-batches-py/ or the .tar.gz
    python data.py --data_dir=~/photos       # class folders: train/<class>/<images>

Writes plots/samples.png (random originals, the report's first figure) and
plots/augmented.png (the same images augmented and resized to 96 px).
"""

import settings

settings.check_command_line(__name__, __file__)  # --help, bad flags: before TF loads

import contextlib
import io
import os
import pickle
import sys
import tarfile
import time
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
AUGMENT_FLIP = True  # random horizontal flips
AUGMENT_TRANSLATE = 0.125  # random shifts, as a fraction of the side (0.125 = 4 px at 32)
AUGMENT_ROTATE = 0.0  # random rotation, as a fraction of a full turn (0 = off)
AUGMENT_ZOOM = 0.0  # random zoom, as a fraction of the side (0 = off)
AUGMENT_CONTRAST = 0.0  # random contrast change, as a fraction (0 = off)
PLOTS_DIR = "plots"  # where the figures go
CONFIG = settings.config_block(globals())  # the settings above: defaults for overrides

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
                raise settings.DataError(
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
        raise settings.DataError(
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
        raise settings.DataError(
            f"{name}: not a CIFAR-10 batch file ({error}, which could run code)"
        ) from None
    except Exception as error:  # truncated or corrupt: EOFError, UnpicklingError, ...
        detail = (
            error if isinstance(error, pickle.UnpicklingError) else type(error).__name__
        )
        raise settings.DataError(
            f"{name}: truncated or corrupt ({detail}); download it again"
        ) from None
    if not isinstance(batch, dict):
        raise settings.DataError(
            f"{name}: expected a dict, found {type(batch).__name__}"
        )
    batch = {
        key.decode() if isinstance(key, bytes) else key: value
        for key, value in batch.items()
    }
    if "data" not in batch or "labels" not in batch:
        raise settings.DataError(f"{name}: no 'data' and 'labels' entries")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise settings.DataError(
            f"{name}: data must be a uint8 array, found {getattr(data, 'dtype', type(data).__name__)}"
        )
    if data.ndim != 2 or data.shape[1] != 3 * NATIVE_SIZE * NATIVE_SIZE:
        raise settings.DataError(
            f"{name}: data must have shape (N, 3072), found {data.shape}"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise settings.DataError(
            f"{name}: expected {len(data)} integer labels, found shape {labels.shape} {labels.dtype}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise settings.DataError(
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
                raise settings.DataError(
                    f"{path}: missing; the folder needs {', '.join(TRAIN_BATCHES)} and {TEST_BATCH}"
                )
            try:
                raw = path.read_bytes()
            except OSError as error:
                raise settings.DataError(
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
                    raise settings.DataError(
                        f"{source}: archive has no {BATCHES_FOLDER}/{name}"
                    )
                return parse_batch(
                    archive.extractfile(members[name]).read(), f"{source}:{name}"
                )

            return _assemble(read)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise settings.DataError(
            f"{source}: unreadable archive ({type(error).__name__}: {error}); download it again"
        ) from None


def _assemble(read):
    train = [read(name) for name in TRAIN_BATCHES]
    test_images, test_labels = read(TEST_BATCH)
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    return train_images, train_labels, test_images, test_labels


# ---------------------------------------------------------------------------------
# Class folders: one's own images, FOLDER/train/<class>/<images> (Keras's layout)

# What tf.io.decode_image reads; other files are not images and are skipped.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")
HELD_OUT_FOLDERS = ("test", "val", "validation")  # beside train/: the test set, in order
# The test split taken from train/ has a seed of its own, not SEED: runs with other
# seeds, and evaluate.py, then see the same test images.
TEST_SPLIT_SEED = 0
DECODE_CHUNK = 256  # images decoded and resized per chunk before they are stored
FOLDERS_LAYOUT = (
    "class folders (train/<class>/<images>, optionally test/, val/ or validation/ "
    "beside train/)"
)


class ClassFolders(NamedTuple):
    """A class-folder dataset, listed and checked, nothing decoded yet."""

    train_files: np.ndarray  # paths (str), sorted by class, then by name
    train_labels: np.ndarray  # int32, indices into class_names
    test_files: np.ndarray
    test_labels: np.ndarray
    class_names: tuple  # the sub-folders of train/, sorted
    source: str  # the folder and where its test set came from


def class_folders_root(data_dir):
    """The folder of class folders that `data_dir` names, or None when it is
    CIFAR-10 (or nothing): CIFAR-10 batches or archive win over a train/ folder.
    A folder that is neither stops with exit code 3 saying what was expected."""
    if not data_dir:
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir() or find_source(path) is not None:
        return None
    if (path / "train").is_dir():
        return path
    hint = ""
    if any(image_files(folder, limit=1) for folder in visible_folders(path)):
        hint = f"\nits sub-folders hold images: move them into {path / 'train'}/"
    raise settings.DataError(
        f"--data_dir={data_dir}: neither CIFAR-10 ({BATCHES_FOLDER}/, its batch files "
        f"or {ARCHIVE_NAME}) nor {FOLDERS_LAYOUT}{hint}"
    )


def visible_folders(path):
    """Sub-folders of `path`, sorted, without hidden ones (.ipynb_checkpoints, ...)."""
    return sorted(
        entry
        for entry in Path(path).iterdir()
        if entry.is_dir() and not entry.name.startswith(".")
    )


def image_files(folder, limit=0):
    """Image files under `folder` (sub-folders included, hidden ones not), sorted;
    at most `limit` of them when it is set."""
    found = []
    for parent, folders, names in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        found += [
            os.path.join(parent, name)
            for name in sorted(names)
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
        ]
        if limit and len(found) >= limit:
            return found[:limit]
    return found


def list_split(split_dir, class_names):
    """(files, labels) of one split's class folders, `class_names` in label order;
    an empty class folder is an error."""
    files, labels = [], []
    for label, name in enumerate(class_names):
        found = image_files(split_dir / name)
        if not found:
            raise settings.DataError(
                f"{split_dir / name}: empty class folder (no "
                f"{'/'.join(IMAGE_EXTENSIONS)} files); add images or remove the folder"
            )
        files += found
        labels += [label] * len(found)
    return np.array(files, dtype=object), np.array(labels, dtype=np.int32)


def list_class_folders(root, test_fraction):
    """The images of a class-folder dataset, listed and checked: classes are the
    sub-folders of train/, sorted; the test set is test/, val/ or validation/ (the
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
    train_files, train_labels = list_split(train_dir, class_names)
    held_out = [name for name in HELD_OUT_FOLDERS if (root / name).is_dir()]
    if held_out:
        test_dir = root / held_out[0]
        test_classes = [folder.name for folder in visible_folders(test_dir)]
        unseen = [name for name in test_classes if name not in class_names]
        if unseen:
            raise settings.DataError(
                f"{test_dir / unseen[0]}: class {unseen[0]!r} is not in {train_dir}/, "
                f"so training never sees it; add train/{unseen[0]}/ or remove it"
            )
        if not test_classes:
            raise settings.DataError(
                f"{test_dir}: no class folders; expected {held_out[0]}/<class>/<images>, "
                "or remove it to take the test set from train/"
            )
        test_files, test_labels = list_split(test_dir, test_classes)
        # Labels index the training classes, which the test split may only part cover.
        test_labels = np.array(
            [class_names.index(test_classes[label]) for label in test_labels], np.int32
        )
        unused = "".join(f", {name}/ not used" for name in held_out[1:])
        source = f"{root} (class folders; test set: {held_out[0]}/{unused})"
    else:
        settings.require(
            0 < test_fraction < 1,
            f"--test_fraction must lie in (0, 1), got {test_fraction}",
        )
        try:
            train_index, test_index = train_test_split(
                np.arange(len(train_labels)),
                test_size=test_fraction,
                stratify=train_labels,
                random_state=TEST_SPLIT_SEED,
            )
        except ValueError as error:
            raise settings.ConfigError(
                f"{train_dir}: cannot hold out a stratified test set of "
                f"--test_fraction={test_fraction} from {len(train_labels)} images in "
                f"{len(class_names)} classes ({error}); add images or a test/ folder"
            ) from None
        train_index.sort()
        test_index.sort()
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
    """uint8 (N, S, S, 3) of `files` at S = `image_size`: RGB (grayscale spread to
    three channels, alpha dropped, a GIF's first frame), squeezed to a square as
    Keras's image_dataset_from_directory does. Decoded in parallel and resized a
    chunk at a time into one array made up front, so memory grows with the
    images at S, never with the photos' own size. A file that does not decode
    stops with exit code 3 naming it."""
    images = np.empty((len(files), image_size, image_size, 3), np.uint8)
    if not len(files):
        return images

    def decode(path):
        image = tf.io.decode_image(
            tf.io.read_file(path), channels=3, expand_animations=False
        )
        # Antialiased, so large photos shrink without aliasing.
        image = tf.image.resize(image, (image_size, image_size), antialias=True)
        return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)

    chunks = (
        tf.data.Dataset.from_tensor_slices(list(files))
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(chunk)
        .prefetch(1)
    )
    done = 0
    with native_stderr_silenced():
        try:
            for batch in chunks:
                images[done : done + len(batch)] = batch.numpy()
                done += len(batch)
        except tf.errors.OpError:
            # The chunk that failed starts at `done`: find its bad file, one at a time.
            for path in files[done:]:
                try:
                    decode(tf.constant(path))
                except tf.errors.OpError as error:
                    reason = error.message.split("}}")[-1].split("[Op:")[0].strip()
                    raise settings.DataError(
                        f"{path}: not a readable image "
                        f"({reason or type(error).__name__}); fix it or remove it"
                    ) from None
            raise
    return images


@contextlib.contextmanager
def native_stderr_silenced():
    """File descriptor 2 sent to /dev/null for a while: libjpeg and TensorFlow's C++
    runtime write a corrupt file's complaints there, several lines without its
    name, where the error raised instead names the file in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# ---------------------------------------------------------------------------------
# Splits: stratified and seeded, always from the training set


def split(images, labels, val_fraction, seed, train_images=0):
    """(train_images, train_labels, val_images, val_labels): a stratified subset of
    `train_images` images (0 = all), then a stratified validation split from it."""
    settings.require(
        0 < val_fraction < 1, f"--val_fraction must lie in (0, 1), got {val_fraction}"
    )
    settings.require(
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
        raise settings.ConfigError(
            f"cannot split {len(index)} images into stratified train and validation sets "
            f"with --val_fraction={val_fraction}: {error}"
        ) from None
    train_index.sort()
    val_index.sort()
    return images[train_index], labels[train_index], images[val_index], labels[val_index]


class Data(NamedTuple):
    """A script's images split three ways: uint8 (N, S, S, 3), labels int32 (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple
    source: str  # where the data came from (and, for class folders, the test set)


def load_data(
    data_dir, image_size, val_fraction, seed, train_images=0, test_fraction=TEST_FRACTION
):
    """CIFAR-10 at 32 px, or the class folders `data_dir` names at `image_size`,
    split into a TRAIN_IMAGES subset, a validation split from it and the test set.
    Of class folders only the images used are decoded, after every check."""
    root = class_folders_root(data_dir)
    if root is None:
        images, labels, test_images, test_labels, source = load_cifar10(data_dir)
        return Data(
            *split(images, labels, val_fraction, seed, train_images),
            test_images,
            test_labels,
            CLASS_NAMES,
            source,
        )
    folders = list_class_folders(root, test_fraction)
    # Split the file list, then decode only what the splits use.
    train_files, y_train, val_files, y_val = split(
        folders.train_files, folders.train_labels, val_fraction, seed, train_images
    )
    start = time.perf_counter()
    x_train, x_val, x_test = (
        decode_images(files, image_size)
        for files in (train_files, val_files, folders.test_files)
    )
    count = len(y_train) + len(y_val) + len(folders.test_labels)
    print(
        f"decoded {count:,} images from {root} at {image_size}x{image_size} px "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return Data(
        x_train, y_train, x_val, y_val, x_test, folders.test_labels,
        folders.class_names, folders.source,
    )  # fmt: skip


def load_test_data(data_dir, image_size, test_fraction=TEST_FRACTION):
    """(test images, test labels, source, training image count, class names): the
    test set a run was evaluated on, for evaluate.py."""
    root = class_folders_root(data_dir)
    if root is None:
        train_images, _, test_images, test_labels, source = load_cifar10(data_dir)
        return test_images, test_labels, source, len(train_images), CLASS_NAMES
    folders = list_class_folders(root, test_fraction)
    return (
        decode_images(folders.test_files, image_size),
        folders.test_labels,
        folders.source,
        len(folders.train_labels),
        folders.class_names,
    )


# ---------------------------------------------------------------------------------
# Pipelines: uint8 in memory, all float work one batch at a time


def make_augmenter(flip=False, translate=0.0, rotate=0.0, zoom=0.0, contrast=0.0, seed=0):
    """Keras preprocessing layers for 32 px batches in [0, 255]; None when all off
    (the defaults: the settings live in each script's config block). Reflect
    padding keeps shifted borders looking like image, not black bars. Shifts are
    whole pixels (nearest): bilinear sub-pixel shifts would blur most training
    images while the test images stay sharp."""
    layers = []
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if translate:
        layers.append(
            keras.layers.RandomTranslation(
                translate,
                translate,
                fill_mode="reflect",
                interpolation="nearest",
                seed=seed + 1,
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
    num_classes=NUM_CLASSES,
):
    """A tf.data pipeline of (images float32 (B, S, S, 3) in `value_range`, one-hot
    labels (B, num_classes)). The uint8 array (N, side, side, 3) is held once (150 MB
    for 50,000 CIFAR-10 images); only shuffled indices flow, and each batch is
    gathered, augmented at its stored side, resized to `image_size` and scaled on
    its own."""
    images = np.asarray(images, dtype=np.uint8)
    side = images.shape[1]
    labels = tf.convert_to_tensor(labels, dtype=tf.int32)
    low, high = value_range
    scale = (high - low) / 255.0

    def gather(index):
        # Batches are gathered from the caller's array itself: turning the whole
        # array into a tensor would copy it, and briefly hold it twice more.
        return images[index]

    def load_batch(index):
        batch = tf.numpy_function(gather, [index], tf.uint8, stateful=False)
        batch = tf.ensure_shape(batch, (None, side, side, 3))
        batch = tf.cast(batch, tf.float32)
        if augmenter is not None:
            batch = augmenter(batch, training=True)
        if image_size != side:
            batch = tf.image.resize(batch, (image_size, image_size), method="bilinear")
        batch = tf.clip_by_value(batch * scale + low, low, high)
        return batch, tf.one_hot(tf.gather(labels, index), num_classes)

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
    class_names: tuple  # label i is class_names[i]; the model needs len() outputs
    train_images: np.ndarray  # the training split, uint8 (N, S, S, 3), as stored


def pipelines_for(config, value_range):
    """The data of a training script's run, from its config block: CIFAR-10 or class
    folders found (DATA_DIR), the TRAIN_IMAGES subset and VAL_FRACTION split (SEED),
    and pipelines of BATCH_SIZE batches at IMG_SIZE scaled to `value_range`."""
    settings.require(config["IMG_SIZE"] >= NATIVE_SIZE, "--img_size must be 32 or more")
    settings.check_data_settings(config)
    x_train, y_train, x_val, y_val, test_images, test_labels, class_names, source = (
        load_data(
            config["DATA_DIR"],
            config["IMG_SIZE"],
            config["VAL_FRACTION"],
            config["SEED"],
            config["TRAIN_IMAGES"],
            # Runs saved before TEST_FRACTION existed resume with the default.
            config.get("TEST_FRACTION", TEST_FRACTION),
        )
    )
    batch_size, fixed_steps = config["BATCH_SIZE"], config["STEPS_PER_EPOCH"]
    batches = dict(
        batch_size=batch_size,
        image_size=config["IMG_SIZE"],
        value_range=value_range,
        num_classes=len(class_names),
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
        class_names=class_names,
        train_images=x_train,
    )


# ---------------------------------------------------------------------------------
# Report: python data.py


def save_figures(images, labels, augmenter, plots_dir, figure_size, class_names, title):
    """samples.png (originals with class names, under `title`) and augmented.png
    (the same images augmented and resized to `figure_size`, as the model would see
    them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    augmented = next(iter(make_dataset(
        images, labels, batch_size=len(labels), image_size=figure_size,
        value_range=(0.0, 1.0), augmenter=augmenter, num_classes=len(class_names),
    )))[0].numpy()  # fmt: skip
    columns = min(8, len(labels))
    rows = -(-len(labels) // columns)
    side = images.shape[1]
    paths = []
    for name, pictures, heading in (
        ("samples.png", images, f"{title}: random training images ({side}x{side})"),
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
            axis.set_title(class_names[label], fontsize=9)
        figure.suptitle(heading)
        figure.tight_layout()
        figure.savefig(plots_dir / name, dpi=100)
        plt.close(figure)
        paths.append(plots_dir / name)
    return paths


def check_config(config):
    """Checks of the settings alone: run before TensorFlow loads, and by main()."""
    settings.check_data_settings(config)
    settings.require(config["FIGURE_IMAGES"] > 0, "--figure_images must be positive")


def main(argv):
    config = training.configure(CONFIG, argv)
    check_config(config)
    # Class folders are decoded at the augmented figure's size: every image is
    # checked here as training would check it.
    x_train, y_train, _, y_val, _, test_labels, class_names, source = load_data(
        config["DATA_DIR"],
        config["FIGURE_SIZE"],
        config["VAL_FRACTION"],
        config["SEED"],
        config["TRAIN_IMAGES"],
        config["TEST_FRACTION"],
    )
    root = class_folders_root(config["DATA_DIR"])
    print(f"CIFAR-10 from {source}" if root is None else source)
    width = max(len("class"), *(len(name) for name in class_names))
    print(f"{'class':<{width}} {'train':>7} {'val':>7} {'test':>7}")
    for index, name in enumerate(class_names):
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
        class_names,
        "CIFAR-10" if root is None else root.resolve().name,
    ):
        print(f"wrote {path}")


if __name__ == "__main__":
    training.cli(main)
