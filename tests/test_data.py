"""data.py: every way to find CIFAR-10, the safe batch reader and its errors, the
stratified split, the tf.data pipeline (scaling, one-hot, resize, shuffle, random
and alternating flips, augmentation), the batch a training run gets, what decoding
leaves on stderr, the `python data.py` report, and the pipeline's memory use.

Most tests call data.py's functions in-process; the two that need a process of their
own (the offline download's exit code and stderr, memory) start them together.
"""

import builtins
import io
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import (
    REPO,
    batch_dict,
    make_cifar_archive,
    make_cifar_folder,
    make_images,
    own_stderr_lines,
    run_script,
    write_batch,
)
import tensorflow as tf
from PIL import Image

import data
import settings
import training

PER_BATCH, TEST_IMAGES = 60, 100  # what the cifar_dir and cifar_archive fixtures hold


def expected_cifar(per_batch=PER_BATCH, test_images=TEST_IMAGES, seed=0):
    """The arrays make_cifar_folder writes, rebuilt independently of any reader."""
    labels = np.arange(per_batch) % 10
    train_images = np.concatenate([make_images(labels, seed + i) for i in range(5)])
    test_labels = np.arange(test_images) % 10
    return (
        train_images,
        np.tile(labels, 5),
        make_images(test_labels, seed + 99),
        test_labels,
    )


def indexed_images(count, seed=0):
    """Random uint8 images whose first pixel spells out their own index, so a test
    can tell which source image any output came from."""
    images = np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(count) % 256
    images[:, 0, 0, 1] = np.arange(count) // 256
    return images


def index_of(images):
    images = np.asarray(images)
    return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


def shuffled_labels(count, seed=0):
    return np.random.default_rng(seed).permutation(np.arange(count) % 10).astype(np.int32)


@pytest.fixture
def no_download(monkeypatch):
    """In-process loads must find the data on disk; a download attempt fails the test."""

    def refuse():  # pytest.fail is a BaseException: load_cifar10 cannot catch it
        pytest.fail("load_cifar10 tried to download")

    monkeypatch.setattr(data.keras.datasets.cifar10, "load_data", refuse)
    monkeypatch.delenv("CIFAR10_DIR", raising=False)


def write_raw_batch(path, payload):
    path.write_bytes(pickle.dumps(payload, protocol=2))


def run_cli(monkeypatch, capsys, *args):
    """`python data.py ARGS` in-process, through the same settings.cli wrapper:
    (exit code, own stderr lines)."""
    monkeypatch.setattr(sys, "argv", ["data.py", *args])
    with pytest.raises(SystemExit) as stopped:
        settings.cli(data.main)
    return stopped.value.code, own_stderr_lines(capsys.readouterr().err)


# ---------------------------------------------------------------------------------
# Subprocess runs, started together: each pays for a TensorFlow import

MEMORY_PROBE = """
import re, sys
sys.path.insert(0, {repo!r})
import numpy as np
import data

def rss_mb():
    status = open("/proc/self/status").read()
    return int(re.search(r"VmRSS:\\s+(\\d+) kB", status).group(1)) / 1024

images = np.random.default_rng(0).integers(0, 256, (50000, 32, 32, 3), np.uint8)
labels = (np.arange(50000) % 10).astype(np.int32)
before = rss_mb()
dataset = data.make_dataset(
    images, labels, batch_size=128, image_size=96, value_range=(-1.0, 1.0),
    augmenter=data.augmenter_for(data.CONFIG), flip=data.CONFIG["AUGMENT_FLIP"],
    shuffle=True, seed=0,
)
batches = 0
for batch, onehot in dataset.take(20):
    assert batch.shape == (128, 96, 96, 3) and onehot.shape == (128, 10)
    batches += 1
print(f"batches={{batches}} rss_growth_mb={{rss_mb() - before:.1f}}")
"""


@pytest.fixture(scope="module")
def script_runs(cifar_dir, tmp_path_factory):
    """The offline download failure and the memory probe, run side by side rather
    than one after another."""
    empty_home = tmp_path_factory.mktemp("empty-keras-home")
    jobs = {
        "offline": lambda: run_script("data.py", env={"KERAS_HOME": str(empty_home)}),
        "memory": lambda: subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE.format(repo=str(REPO))],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        ),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        results = {name: future.result() for name, future in futures.items()}
    results["empty_home"] = empty_home
    return results


def assert_one_error(result, code, *needles):
    """An expected failure: the documented exit code, no traceback, at most two own
    lines on stderr, and they say what is wrong."""
    lines = own_stderr_lines(result.stderr)
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert 1 <= len(lines) <= 2, lines
    for needle in needles:
        assert needle in "\n".join(lines), (needle, lines)


# ---------------------------------------------------------------------------------
# Finding CIFAR-10


@pytest.mark.parametrize("form", ["parent", "batches", "archive_parent", "archive"])
def test_every_data_dir_form_loads_the_same_images(
    form, cifar_dir, cifar_archive, no_download
):
    where = {
        "parent": cifar_dir,
        "batches": cifar_dir / "cifar-10-batches-py",
        "archive_parent": cifar_archive.parent,
        "archive": cifar_archive,
    }[form]
    train_images, train_labels, test_images, test_labels, source = data.load_cifar10(
        str(where)
    )
    assert train_images.shape == (5 * PER_BATCH, 32, 32, 3)
    assert test_images.shape == (TEST_IMAGES, 32, 32, 3)
    assert train_images.dtype == test_images.dtype == np.uint8
    assert train_labels.dtype == test_labels.dtype == np.int32
    assert train_labels.shape == (5 * PER_BATCH,) and test_labels.shape == (TEST_IMAGES,)
    for labels in (train_labels, test_labels):
        assert labels.min() >= 0 and labels.max() <= 9
    expected = expected_cifar()
    for loaded, wanted in zip(
        (train_images, train_labels, test_images, test_labels), expected
    ):
        np.testing.assert_array_equal(loaded, wanted)
    is_archive = form.startswith("archive")
    assert source.endswith(
        "cifar-10-python.tar.gz" if is_archive else "cifar-10-batches-py"
    )


def test_channel_first_rows_become_nhwc_pixels(tmp_path, no_download):
    """A CIFAR-10 row is 1024 red, then 1024 green, then 1024 blue values, each
    plane row by row: built here by hand, not through the fixtures' transpose."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows_by_file = {}
    for name in data.TRAIN_BATCHES + (data.TEST_BATCH,):
        rows = rng.integers(0, 256, (4, 3072), np.uint8)
        labels = [int(label) for label in rng.integers(0, 10, 4)]
        write_raw_batch(folder / name, {b"data": rows, b"labels": labels})
        rows_by_file[name] = (rows, labels)
    train_images, train_labels, test_images, test_labels, _ = data.load_cifar10(
        str(tmp_path)
    )
    rows, labels = rows_by_file["data_batch_2"]
    image = train_images[4 + 1]  # the second image of the second batch
    assert train_labels[4 + 1] == labels[1]
    for channel, y, x in [(0, 0, 0), (0, 0, 31), (1, 5, 7), (2, 31, 0), (2, 17, 30)]:
        assert image[y, x, channel] == rows[1, channel * 1024 + y * 32 + x]
    rows, labels = rows_by_file["test_batch"]
    planes = rows.reshape(4, 3, 32, 32)
    for channel in range(3):
        np.testing.assert_array_equal(test_images[..., channel], planes[:, channel])
    assert test_labels.tolist() == labels
    assert train_images.flags["C_CONTIGUOUS"]


def test_batch_files_may_hold_different_numbers_of_images(tmp_path, no_download):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    sizes = [7, 13, 1, 25, 4]
    written = []
    for index, size in enumerate(sizes):
        labels = np.arange(size) % 10
        images = make_images(labels, seed=index)
        write_batch(folder / f"data_batch_{index + 1}", images, labels)
        written.append((images, labels))
    test_labels = np.arange(9) % 10
    write_batch(folder / "test_batch", make_images(test_labels, seed=50), test_labels)
    train_images, train_labels, test_images, _, _ = data.load_cifar10(str(folder))
    assert len(train_images) == len(train_labels) == sum(sizes)
    np.testing.assert_array_equal(
        train_images, np.concatenate([images for images, _ in written])
    )
    np.testing.assert_array_equal(
        train_labels, np.concatenate([labels for _, labels in written])
    )
    assert test_images.shape == (9, 32, 32, 3)


def test_cifar10_dir_variable(cifar_dir, monkeypatch, no_download):
    monkeypatch.setenv("CIFAR10_DIR", str(cifar_dir))
    *arrays, source = data.load_cifar10("")
    assert source == str(cifar_dir / "cifar-10-batches-py")
    np.testing.assert_array_equal(arrays[0], expected_cifar()[0])


def test_data_dir_comes_before_cifar10_dir(
    cifar_archive, tmp_path, monkeypatch, no_download
):
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path))  # empty: would fail
    *_, source = data.load_cifar10(str(cifar_archive))
    assert source == str(cifar_archive)


@pytest.mark.parametrize("origin", ["--data_dir", "CIFAR10_DIR"])
def test_a_named_folder_without_cifar10_says_so(
    origin, tmp_path, monkeypatch, no_download
):
    if origin == "CIFAR10_DIR":
        monkeypatch.setenv("CIFAR10_DIR", str(tmp_path))
    with pytest.raises(settings.DataError) as error:
        data.load_cifar10(str(tmp_path) if origin == "--data_dir" else "")
    assert f"{origin}={tmp_path}" in str(error.value)
    assert "cifar-10-python.tar.gz" in str(error.value)


@pytest.mark.parametrize(
    "layout",
    [
        "datasets/cifar-10-batches-py-target",  # Keras >= 3.6
        "datasets",  # older Keras
    ],
)
def test_keras_cache_in_both_layouts(layout, tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    folder = make_cifar_folder(tmp_path / layout)
    *arrays, source = data.load_cifar10("")
    assert source == str(folder)
    np.testing.assert_array_equal(arrays[0], expected_cifar()[0])


def test_keras_cache_takes_the_archive_where_the_error_says_to_put_it(
    cifar_archive, tmp_path, monkeypatch, no_download
):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    datasets = data.keras_home() / "datasets"
    assert datasets == tmp_path / "datasets"
    datasets.mkdir()
    shutil.copy(cifar_archive, datasets / "cifar-10-python.tar.gz")
    *arrays, source = data.load_cifar10("")
    assert source == str(datasets / "cifar-10-python.tar.gz")
    np.testing.assert_array_equal(arrays[2], expected_cifar()[2])


def test_offline_with_nothing_cached_exits_3_and_says_where_to_put_the_data(
    script_runs,
):
    result = script_runs["offline"]
    cache = script_runs["empty_home"] / "datasets"
    assert_one_error(result, 3, "--data_dir", "cifar-10-python.tar.gz", str(cache))


# ---------------------------------------------------------------------------------
# Bad batch files and archives


@pytest.fixture
def cifar_copy(cifar_dir, tmp_path):
    """A writable copy of the batches folder."""
    return shutil.copytree(
        cifar_dir / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py"
    )


def test_truncated_batch_file_exits_3_naming_it(cifar_copy, monkeypatch, capsys):
    batch = cifar_copy / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])
    code, lines = run_cli(monkeypatch, capsys, f"--data_dir={cifar_copy}")
    assert code == 3
    assert len(lines) == 1
    assert str(batch) in lines[0] and "truncated or corrupt" in lines[0]


def test_missing_batch_file_is_named(cifar_copy, no_download):
    (cifar_copy / "test_batch").unlink()
    with pytest.raises(settings.DataError, match=r"test_batch: missing"):
        data.load_cifar10(str(cifar_copy.parent))


def test_archive_without_batch_files_exits_3_naming_what_is_missing(
    tmp_path, monkeypatch, capsys
):
    folder = make_cifar_folder(tmp_path / "unpacked")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "batches.meta", arcname="cifar-10-batches-py/batches.meta")
        tar.add(folder / "data_batch_1", arcname="cifar-10-batches-py/data_batch_1")
    code, lines = run_cli(monkeypatch, capsys, f"--data_dir={archive}")
    assert code == 3
    assert len(lines) == 1
    assert str(archive) in lines[0] and "cifar-10-batches-py/data_batch_2" in lines[0]


@pytest.mark.parametrize("damage", ["not_gzip", "truncated"])
def test_unreadable_archive_is_a_data_error(damage, cifar_archive, tmp_path, no_download):
    raw = cifar_archive.read_bytes()
    broken = tmp_path / "cifar-10-python.tar.gz"
    broken.write_bytes(
        b"<html>404</html>" if damage == "not_gzip" else raw[: len(raw) // 2]
    )
    with pytest.raises(settings.DataError) as error:
        data.load_cifar10(str(broken))
    assert str(broken) in str(error.value) and "download it again" in str(error.value)


class RunsOnLoad:
    """Pickles as a call to `function(*args)`: what a crafted batch file would hold."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker):
    return {
        "os.system": RunsOnLoad(os.system, f"touch {marker}"),
        "exec": RunsOnLoad(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess": RunsOnLoad(subprocess.call, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("payload", ["os.system", "exec", "subprocess"])
def test_a_pickle_that_calls_anything_but_numpy_is_refused(payload, tmp_path):
    marker = tmp_path / "payload-ran"
    good = batch_dict(*expected_cifar()[2:], "test_batch")
    raw = pickle.dumps({**good, b"data": payloads(marker)[payload]}, protocol=2)
    with pytest.raises(
        settings.DataError, match=r"evil_batch: not a CIFAR-10 batch file"
    ):
        data.parse_batch(raw, "evil_batch")
    assert not marker.exists()
    # The same bytes through a plain unpickler do run the payload: the test is live.
    pickle.loads(raw)
    assert marker.exists()


def test_crafted_batch_file_in_a_folder_exits_3_and_never_runs(
    cifar_copy, tmp_path, monkeypatch, capsys
):
    marker = tmp_path / "payload-ran"
    good = batch_dict(*expected_cifar()[2:], "data_batch_4")
    write_raw_batch(
        cifar_copy / "data_batch_4",
        {**good, b"labels": RunsOnLoad(os.system, f"touch {marker}")},
    )
    code, lines = run_cli(monkeypatch, capsys, f"--data_dir={cifar_copy}")
    assert code == 3 and len(lines) == 1
    assert "data_batch_4" in lines[0] and "refused" in lines[0] and "system" in lines[0]
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_arrays_pickled_at_any_protocol_are_admitted(protocol):
    images, labels = expected_cifar()[2:]
    batch = batch_dict(images, labels, "test_batch")
    batch[b"labels"] = np.asarray(labels, np.int64)  # an array, not a list
    loaded_images, loaded_labels = data.parse_batch(
        pickle.dumps(batch, protocol=protocol), "test_batch"
    )
    np.testing.assert_array_equal(loaded_images, images)
    np.testing.assert_array_equal(loaded_labels, labels)
    assert loaded_labels.dtype == np.int32


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str (BINSTRING), as cPickle wrote CIFAR-10's batches."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def test_python2_batch_with_numpy_core_globals_is_read():
    """The real files: Python 2 str for keys and pixel bytes, and numpy 1's module
    path numpy.core.multiarray, which numpy 2 only knows as numpy._core."""
    images, labels = expected_cifar()[2:]
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(batch_dict(images, labels, "test_batch"))
    raw = buffer.getvalue().replace(
        b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"
    )
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
    loaded_images, loaded_labels = data.parse_batch(raw, "test_batch")
    np.testing.assert_array_equal(loaded_images, images)
    np.testing.assert_array_equal(loaded_labels, labels)


def bad_batch(problem):
    labels = np.arange(20) % 10
    batch = batch_dict(make_images(labels, 3), labels, "data_batch_1")
    if problem == "wrong_shape":
        batch[b"data"] = batch[b"data"][:, :3000]
    elif problem == "flat_data":
        batch[b"data"] = batch[b"data"].ravel()
    elif problem == "wrong_dtype":
        batch[b"data"] = batch[b"data"].astype(np.float32)
    elif problem == "label_too_big":
        batch[b"labels"][7] = 10
    elif problem == "label_negative":
        batch[b"labels"][0] = -1
    elif problem == "too_few_labels":
        batch[b"labels"] = batch[b"labels"][:-1]
    elif problem == "float_labels":
        batch[b"labels"] = [0.5] * 20
    elif problem == "no_labels":
        del batch[b"labels"]
    elif problem == "not_a_dict":
        batch = [batch[b"data"], batch[b"labels"]]
    return batch


@pytest.mark.parametrize(
    "problem, says",
    [
        ("wrong_shape", r"shape \(N, 3072\), found \(20, 3000\)"),
        ("flat_data", r"shape \(N, 3072\), found \(61440,\)"),
        ("wrong_dtype", r"uint8 array, found float32"),
        ("label_too_big", r"labels must lie in 0\.\.9, found 0\.\.10"),
        ("label_negative", r"labels must lie in 0\.\.9, found -1\.\.9"),
        ("too_few_labels", r"expected 20 integer labels, found shape \(19,\)"),
        ("float_labels", r"expected 20 integer labels.*float"),
        ("no_labels", r"no 'data' and 'labels' entries"),
        ("not_a_dict", r"expected a dict, found list"),
    ],
)
def test_invalid_batch_contents_name_file_and_problem(problem, says, cifar_copy):
    path = cifar_copy / "data_batch_1"
    write_raw_batch(path, bad_batch(problem))
    with pytest.raises(settings.DataError) as error:
        data.read_cifar10(cifar_copy)
    assert str(error.value).startswith(f"{path}: ")
    assert re.search(says, str(error.value)), str(error.value)


def test_invalid_batch_inside_an_archive_names_archive_and_member(tmp_path, no_download):
    archive = make_cifar_archive(tmp_path)
    folder = tmp_path / "unpacked" / "cifar-10-batches-py"
    write_raw_batch(folder / "test_batch", bad_batch("label_too_big"))
    archive.unlink()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    match = r"tar\.gz:test_batch: labels must lie"
    with pytest.raises(settings.DataError, match=match):
        data.load_cifar10(str(archive))


# ---------------------------------------------------------------------------------
# The split: stratified, seeded, disjoint, from the training set only


def class_counts(labels):
    return np.bincount(labels, minlength=10)


def test_split_is_stratified_disjoint_and_from_the_given_images():
    images, labels = indexed_images(300), shuffled_labels(300)
    x_train, y_train, x_val, y_val = data.split(images, labels, 0.15, seed=0)
    assert len(x_val) == len(y_val) == 45 and len(x_train) == len(y_train) == 255
    for counts in (class_counts(y_train), class_counts(y_val)):
        assert counts.max() - counts.min() <= 1, counts
    train_index, val_index = index_of(x_train), index_of(x_val)
    assert not set(train_index) & set(val_index)
    assert sorted([*train_index, *val_index]) == list(range(300))
    # Each image keeps its own label, and comes unchanged from the training array.
    np.testing.assert_array_equal(y_train, labels[train_index])
    np.testing.assert_array_equal(y_val, labels[val_index])
    np.testing.assert_array_equal(x_val, images[val_index])
    assert x_train.dtype == np.uint8 and y_train.dtype == labels.dtype


def test_split_is_seeded():
    images, labels = indexed_images(300), shuffled_labels(300)
    first = data.split(images, labels, 0.1, seed=3)
    again = data.split(images, labels, 0.1, seed=3)
    other = data.split(images, labels, 0.1, seed=4)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert set(index_of(first[2])) != set(index_of(other[2]))


def test_train_images_takes_a_stratified_seeded_subset_before_the_split():
    images, labels = indexed_images(300), shuffled_labels(300)
    x_train, y_train, x_val, y_val = data.split(images, labels, 0.2, 0, train_images=100)
    assert len(y_train) == 80 and len(y_val) == 20
    assert class_counts(y_train).tolist() == [8] * 10
    assert class_counts(y_val).tolist() == [2] * 10
    used = set(index_of(x_train)) | set(index_of(x_val))
    assert len(used) == 100
    np.testing.assert_array_equal(y_train, labels[index_of(x_train)])
    again = data.split(images, labels, 0.2, 0, train_images=100)
    other = data.split(images, labels, 0.2, 1, train_images=100)
    assert used == set(index_of(again[0])) | set(index_of(again[2]))
    assert used != set(index_of(other[0])) | set(index_of(other[2]))
    # More than there are means all of them.
    assert len(data.split(images, labels, 0.2, 0, train_images=10**6)[0]) == 240


@pytest.mark.parametrize("val_fraction", [0, 1, -0.1, 1.5, 0.01])
def test_bad_val_fraction_is_a_config_error(val_fraction):
    """0.01 of 300 images is 3: too few to hold every class."""
    with pytest.raises(settings.ConfigError, match=r"--val_fraction"):
        data.split(indexed_images(300), shuffled_labels(300), val_fraction, seed=0)


@pytest.mark.parametrize("train_images", [-5, 5])
def test_bad_train_images_is_a_config_error(train_images):
    """5 images cannot hold one of each of 10 classes."""
    with pytest.raises(settings.ConfigError):
        data.split(indexed_images(300), shuffled_labels(300), 0.1, 0, train_images)


# ---------------------------------------------------------------------------------
# The pipeline


def collect(dataset):
    batches = [(images.numpy(), labels.numpy()) for images, labels in dataset]
    return (
        np.concatenate([images for images, _ in batches]),
        np.concatenate([labels for _, labels in batches]),
        batches,
    )


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_pipeline_scales_one_hot_encodes_and_keeps_order(value_range):
    images, labels = indexed_images(50), shuffled_labels(50)
    dataset = data.make_dataset(
        images, labels, batch_size=16, image_size=32, value_range=value_range
    )
    pixels, onehot, batches = collect(dataset)
    assert [len(batch) for batch, _ in batches] == [16, 16, 16, 2]
    assert pixels.shape == (50, 32, 32, 3) and pixels.dtype == np.float32
    assert onehot.shape == (50, 10) and onehot.dtype == np.float32
    low, high = value_range
    np.testing.assert_allclose(
        pixels, low + images.astype(np.float32) * (high - low) / 255, atol=1e-6
    )
    np.testing.assert_array_equal(onehot.argmax(axis=1), labels)
    np.testing.assert_array_equal(onehot.sum(axis=1), 1)
    assert set(np.unique(onehot)) == {0.0, 1.0}
    span = high - low
    for batch, _ in batches[:3]:
        assert batch.min() >= low and batch.max() <= high
        assert batch.min() < low + 0.02 * span and batch.max() > high - 0.02 * span


def test_minus_one_to_one_is_what_mobilenetv2_expects():
    import keras

    images, labels = indexed_images(20), shuffled_labels(20)
    pixels, _, _ = collect(
        data.make_dataset(
            images, labels, batch_size=20, image_size=32, value_range=(-1.0, 1.0)
        )
    )
    expected = keras.applications.mobilenet_v2.preprocess_input(images.astype("float32"))
    np.testing.assert_allclose(pixels, expected, atol=1e-5)


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_pipeline_resizes_to_96_augmented_and_in_range(value_range):
    images, labels = indexed_images(40), shuffled_labels(40)
    dataset = data.make_dataset(
        images,
        labels,
        batch_size=20,
        image_size=96,
        value_range=value_range,
        augmenter=data.augmenter_for(data.CONFIG),
        shuffle=True,
        seed=0,
    )
    low, high = value_range
    for batch, onehot in dataset:
        assert batch.shape == (20, 96, 96, 3) and batch.dtype == np.float32
        assert onehot.shape == (20, 10)
        batch = batch.numpy()
        assert batch.min() >= low and batch.max() <= high
        assert batch.min() < low + 0.05 * (high - low)
        assert batch.max() > high - 0.05 * (high - low)


def test_resize_keeps_colours_and_layout():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[0] = [200, 100, 50]  # one colour everywhere
    images[1, :, 16:] = 255  # dark left half, bright right half
    pixels, _, _ = collect(
        data.make_dataset(
            images, np.array([1, 2]), batch_size=2, image_size=96, value_range=(0, 1)
        )
    )
    assert pixels.shape == (2, 96, 96, 3)
    colour = np.array([200, 100, 50]) / 255
    np.testing.assert_allclose(pixels[0], np.broadcast_to(colour, (96, 96, 3)), atol=1e-6)
    # Output column j samples input column (j + 0.5) / 3 - 0.5: 46 is input 15, 49 is 16.
    np.testing.assert_allclose(pixels[1, :, :47], 0, atol=1e-6)
    np.testing.assert_allclose(pixels[1, :, 49:], 1, atol=1e-6)
    assert 0.2 < pixels[1, 0, 47, 0] < 0.8


def test_shuffle_is_seeded_complete_and_keeps_labels_with_images():
    images, labels = indexed_images(64), shuffled_labels(64)

    def order(seed):
        dataset = data.make_dataset(
            images,
            labels,
            batch_size=16,
            image_size=32,
            value_range=(0, 1),
            shuffle=True,
            seed=seed,
        )
        pixels, onehot, _ = collect(dataset)
        index = index_of(np.rint(pixels * 255).astype(np.uint8))
        np.testing.assert_array_equal(onehot.argmax(axis=1), labels[index])
        return index.tolist()

    first = order(seed=7)
    assert sorted(first) == list(range(64))
    assert first != list(range(64))
    assert order(seed=7) == first
    assert order(seed=8) != first


def test_each_epoch_is_reshuffled_and_repeat_goes_on():
    images, labels = indexed_images(32), shuffled_labels(32)
    dataset = data.make_dataset(
        images, labels, batch_size=8, image_size=32, value_range=(0, 1), shuffle=True
    )
    epochs = [
        index_of(np.rint(collect(dataset)[0] * 255).astype(np.uint8)) for _ in range(2)
    ]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(32))
    assert epochs[0].tolist() != epochs[1].tolist()
    repeated = data.make_dataset(
        images, labels, batch_size=8, image_size=32, value_range=(0, 1), repeat=True
    )
    assert len(list(repeated.take(10))) == 10  # 10 batches from 4 per epoch


def test_augmentation_changes_pixels_but_never_labels():
    images, labels = indexed_images(64), shuffled_labels(64)
    common = {"batch_size": 32, "image_size": 32, "value_range": (0.0, 1.0)}
    plain, plain_labels, _ = collect(data.make_dataset(images, labels, **common))
    augmenter = data.make_augmenter(translate=0.125, seed=0)
    augmented, augmented_labels, _ = collect(
        data.make_dataset(images, labels, augmenter=augmenter, flip="random", **common)
    )
    np.testing.assert_array_equal(augmented_labels, plain_labels)
    np.testing.assert_array_equal(augmented_labels.argmax(axis=1), labels)
    changed = np.abs(augmented - plain).mean(axis=(1, 2, 3)) > 0.01
    assert changed.mean() > 0.5, changed
    assert augmented.shape == plain.shape
    assert augmented.min() >= 0 and augmented.max() <= 1


def orientations(images, labels, flip, passes, repeat=False, seed=3):
    """Each pass of a shuffled `flip` pipeline over `images` (distinct, and each
    unlike its mirror image), as an array over the source images: 1 where the image
    came out mirrored, 0 where it came out as stored. Every output must be one or the
    other of its source, with its own label, and every image must come once a pass."""
    count, batch_size = len(labels), 8
    steps = -(-count // batch_size)
    dataset = data.make_dataset(
        images, labels, batch_size=batch_size, image_size=32, value_range=(0, 1),
        flip=flip, shuffle=True, seed=seed, repeat=repeat,
    )  # fmt: skip
    if repeat:  # one iterator that goes on: its passes follow each other
        batches = list(dataset.take(steps * passes))
    else:  # a new iterator a pass, as model.fit makes one an epoch
        batches = [batch for _ in range(passes) for batch in dataset]
    assert len(batches) == steps * passes
    known = {}
    for index, image in enumerate(images):
        known[image.tobytes()] = (index, 0)
        known[image[:, ::-1].tobytes()] = (index, 1)
    found = []
    for start in range(0, len(batches), steps):
        mirrored = np.full(count, -1)
        for pixels, onehot in batches[start : start + steps]:
            pixels = np.rint(pixels.numpy() * 255).astype(np.uint8)
            for picture, label in zip(pixels, onehot.numpy().argmax(axis=1)):
                index, side = known[picture.tobytes()]  # KeyError: neither
                assert mirrored[index] == -1, f"image {index} twice in a pass"
                assert label == labels[index]
                mirrored[index] = side
        assert (mirrored >= 0).all(), "an image missing from a pass"
        found.append(mirrored)
    return found


@pytest.mark.parametrize("repeat", [False, True])
def test_alternate_flips_mirror_each_image_in_every_other_pass(repeat):
    """airbench's flips: a random half of the images mirrored in the first pass,
    then each image the other way round in the next pass, and back in the one after,
    whether each pass is a new iterator (full epochs) or one repeating iterator
    (STEPS_PER_EPOCH)."""
    images, labels = indexed_images(60), shuffled_labels(60)
    first, second, third = orientations(images, labels, "alternate", 3, repeat)
    assert 10 < first.sum() < 50, first
    np.testing.assert_array_equal(second, 1 - first)
    np.testing.assert_array_equal(third, first)
    # The first pass's coins come from the seed.
    again = orientations(images, labels, "alternate", 1, repeat)[0]
    other = orientations(images, labels, "alternate", 1, repeat, seed=4)[0]
    np.testing.assert_array_equal(again, first)
    assert (other != first).any()


def test_random_flips_mirror_some_images_and_none_flips_none():
    images, labels = indexed_images(64), shuffled_labels(64)
    first, second = orientations(images, labels, "random", 2)
    for mirrored in (first, second):
        assert 10 < mirrored.sum() < 54, mirrored
    # A coin per image and pass: not the same images again, nor all the others.
    assert 10 < (first != second).sum() < 54
    for mirrored in orientations(images, labels, "none", 2):
        assert mirrored.sum() == 0


def test_augmenter_layers_follow_the_settings():
    assert data.make_augmenter(translate=0) is None
    full = data.make_augmenter(translate=0.1, rotate=0.05, zoom=0.1, contrast=0.2)
    assert len(full.layers) == 4
    batch = indexed_images(8).astype(np.float32)
    out = np.asarray(full(batch, training=True))
    assert out.shape == batch.shape
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, batch)
    # Flips are the pipeline's, not a layer's: they must not be applied twice.
    names = [type(layer).__name__ for layer in full.layers]
    assert "RandomFlip" not in names, names


def pipelines_config(cifar_dir, **changes):
    """A training script's data settings over the 300-image cifar_dir."""
    config = {**data.CONFIG, "DATA_DIR": str(cifar_dir), "IMG_SIZE": 32}
    return {**config, "BATCH_SIZE": 1024, "STEPS_PER_EPOCH": 0, **changes}


def test_batch_is_at_most_an_eighth_of_the_training_images(cifar_dir):
    """200 images, 20% of them held out: 160 train, so a batch of 1,024 becomes 20
    (8 steps an epoch, not one); a smaller BATCH_SIZE stays; with several replicas
    the batch is the nearest multiple of their count, which each pipeline yields."""
    config = pipelines_config(cifar_dir, TRAIN_IMAGES=200, VAL_FRACTION=0.2)
    pipelines = data.pipelines_for(config, (0.0, 1.0))
    assert pipelines.sizes == {"train": 160, "validation": 40, "test": 100}
    assert pipelines.batch_size == 20
    assert pipelines.steps_per_epoch == 8
    assert pipelines.images_per_epoch == 160
    assert pipelines.train_images.shape == (160, 32, 32, 3)
    assert pipelines.train_images.dtype == np.uint8
    for dataset in (pipelines.train, pipelines.validation, pipelines.test):
        images, onehot = next(iter(dataset))
        assert images.shape == (20, 32, 32, 3) and onehot.shape == (20, 10)
    # The training data repeats, so that model.fit keeps one iterator for every epoch
    # (a new one an epoch stalls); each epoch's 8 batches are one pass over the set.
    assert pipelines.train.cardinality() == tf.data.INFINITE_CARDINALITY
    passes = [
        np.concatenate([onehot.numpy().argmax(1) for _, onehot in batches])
        for batches in (pipelines.train.take(8), pipelines.train.skip(8).take(8))
    ]
    assert len(passes[0]) == len(passes[1]) == 160
    np.testing.assert_array_equal(np.bincount(passes[0]), np.bincount(passes[1]))
    for batch_size, replicas, expected in ((16, 1, 16), (1024, 3, 21), (16, 3, 15)):
        config = pipelines_config(
            cifar_dir, TRAIN_IMAGES=200, VAL_FRACTION=0.2, BATCH_SIZE=batch_size
        )
        pipelines = data.pipelines_for(config, (0.0, 1.0), replicas=replicas)
        assert pipelines.batch_size == expected, (batch_size, replicas)
        images, _ = next(iter(pipelines.train))
        assert len(images) == expected
    # STEPS_PER_EPOCH: the training pipeline repeats, an epoch is that many batches.
    config = pipelines_config(cifar_dir, TRAIN_IMAGES=200, STEPS_PER_EPOCH=3)
    pipelines = data.pipelines_for(config, (0.0, 1.0))
    assert pipelines.batch_size == 22  # 180 training images
    assert pipelines.steps_per_epoch == 3
    assert pipelines.images_per_epoch == 66
    assert len(list(pipelines.train.take(20))) == 20


def write_png(path, seed, size=(20, 12)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3))
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return str(path)


def test_decoding_drops_only_tensorflows_decode_notices(tmp_path, monkeypatch, capfd):
    """While images decode, stderr loses TensorFlow's notice about an image that does
    not decode (the error names the file instead) and nothing else: a line another
    library writes to file descriptor 2 meanwhile still reaches the terminal."""
    files = [write_png(tmp_path / f"{index}.png", index) for index in range(3)]
    resize = data.tf.image.resize

    def resize_and_complain(*args, **kwargs):  # runs as decoding is traced
        os.write(2, b"libexample: error: a real problem, said from C\n")
        os.write(
            2,
            b"W0000 00:00:1.0  99 op_kernel.cc:1857] OP_REQUIRES failed at "
            b"decode_image_op.cc:470 : INVALID_ARGUMENT: stand-in notice\n",
        )
        return resize(*args, **kwargs)

    monkeypatch.setattr(data.tf.image, "resize", resize_and_complain)
    images = data.decode_images(files, image_size=8)
    assert images.shape == (3, 8, 8, 3)
    stderr = capfd.readouterr().err
    assert "libexample: error: a real problem, said from C" in stderr, stderr
    assert "stand-in notice" not in stderr, stderr
    monkeypatch.undo()
    # A truncated JPEG: the DataError names it, and the lines libjpeg and TensorFlow
    # print about it are gone (as a command: test_folders, one line on stderr).
    broken = tmp_path / "broken.jpg"
    Image.open(files[1]).save(broken)
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(settings.DataError, match=rf"{broken}: not a readable image"):
        data.decode_images([*files, str(broken)], image_size=8)
    stderr = capfd.readouterr().err
    assert own_stderr_lines(stderr) == [] and "INVALID_ARGUMENT" not in stderr, stderr


# ---------------------------------------------------------------------------------
# python data.py: counts and figures


def test_report_prints_counts_and_writes_both_figures(cifar_dir, tmp_path, capsys):
    """`python data.py`, in-process (its command line and exit codes: above)."""
    plots = tmp_path / "plots"
    data.main([f"--data_dir={cifar_dir}", f"--plots_dir={plots}", "--seed=1"])
    stdout = capsys.readouterr().out
    assert "cifar-10-batches-py" in stdout
    # 300 training images: 10% (3 per class) held out; 100 test images.
    for name in data.CLASS_NAMES:
        assert re.search(rf"^{name}\s+27\s+3\s+10$", stdout, re.MULTILINE), stdout
    assert re.search(r"^total\s+270\s+30\s+100$", stdout, re.MULTILINE)
    import matplotlib.image

    for name in ("samples.png", "augmented.png"):
        path = plots / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 20_000
        picture = matplotlib.image.imread(path)
        assert picture.ndim == 3 and picture.shape[0] > 200 and picture.std() > 0.05
        assert f"wrote {path}" in stdout


# ---------------------------------------------------------------------------------
# Memory: the 96 px pipeline over 50,000 images works one batch at a time


def test_96px_pipeline_over_50000_images_stays_small(script_runs):
    result = script_runs["memory"]
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"batches=20 rss_growth_mb=(-?[\d.]+)", result.stdout)
    assert found, result.stdout
    growth = float(found.group(1))
    print(f"RSS growth for the 96 px pipeline over 50,000 images: {growth:.0f} MB")
    # Resizing all of it up front would take 5.5 GB; a second copy of the uint8
    # array is 150 MB.
    assert growth < 300, growth


def test_scratch_cnn_keeps_40_steps_an_epoch_on_a_smaller_set():
    """airbench's schedule needs hundreds of steps: with 4,500 training images a batch
    of 1,024 gave 8 steps an epoch and the run stalled at a third of its accuracy. The
    scratch CNN's batch shrinks for MIN_STEPS steps, not below 32 (or an eighth of a
    tiny set); MobileNetV2 keeps its rule, an eighth of the training images."""
    scratch = settings.read_script(REPO / "scratch_cnn.py").settings
    scratch = {name: setting.default for name, setting in scratch.items()}
    assert scratch["MIN_STEPS"] == 40
    for train, batch in ((45000, 1024), (9000, 225), (4500, 112), (900, 32), (225, 28)):
        assert settings.batch_size(scratch, train) == batch, train
        assert train // batch >= 40 or batch in (1024, 32, 28)  # the limits
    assert settings.batch_size(scratch, 4500, replicas=3) == 111
    transfer = settings.read_script(REPO / "transfer_mobilenetv2.py").settings
    transfer = {name: setting.default for name, setting in transfer.items()}
    assert "MIN_STEPS" not in transfer
    for train, batch in ((45000, 64), (4500, 64), (225, 28), (7, 1)):
        assert settings.batch_size(transfer, train) == batch, train
