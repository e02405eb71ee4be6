"""Shared fixtures: small CIFAR-10 data sets in the real file formats, made here.

The images are learnable: each class has its own colour and a stripe whose position
depends on the class, under noise, so a small model beats chance (10%) in an epoch
or two, and flips or shifts do not change the answer.
"""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# A shell starts a background job with SIGINT ignored, and its children inherit
# that: the tests that press Ctrl-C on a child must see what a terminal user sees.
signal.signal(signal.SIGINT, signal.default_int_handler)

# Under pytest-xdist (-n 2, pyproject.toml) TensorFlow in each worker, and in every
# process it starts, sizes its thread pools for its share of the cores, as in a run
# pinned to one core. Pools as wide as the machine in every process of both workers
# wait on each other: the suite took 974 s so, against 751 s in one process.
WORKER_COUNT = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if WORKER_COUNT > 1:
    SHARE = str(max(1, (os.cpu_count() or 1) // WORKER_COUNT))
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", SHARE)
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", SHARE)

# Keep the scripts offline and out of the user's Keras cache in every test.
os.environ["KERAS_HOME"] = tempfile.mkdtemp(prefix="keras-home-")
os.environ.pop("CIFAR10_DIR", None)

TRAIN_BATCHES = 5
PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128]],
    dtype=np.float32,
)  # fmt: skip


@pytest.fixture(autouse=True)
def float32_policy():
    """Every test starts in float32: a run made in-process sets its own precision,
    mixed_bfloat16 on a CPU with AMX, and Keras keeps that global policy."""
    if "keras" in sys.modules:
        sys.modules["keras"].mixed_precision.set_global_policy("float32")


def make_images(labels, seed):
    """uint8 (N, 32, 32, 3) images whose colour and stripe give away the class."""
    rng = np.random.default_rng(seed)
    images = np.empty((len(labels), 32, 32, 3), np.float32)
    images[:] = PALETTE[labels][:, None, None, :] * 0.6
    for i, label in enumerate(labels):
        row = 3 * label
        images[i, row : row + 3, :, :] = 255 - PALETTE[label]
    images += rng.normal(0, 30, images.shape)
    return np.clip(images, 0, 255).astype(np.uint8)


def batch_dict(images, labels, name):
    """A batch as CIFAR-10 stores it: bytes keys, data (N, 3072) channel-first."""
    return {
        b"batch_label": name.encode(),
        b"labels": [int(label) for label in labels],
        b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
        b"filenames": [f"{name}_{i}.png".encode() for i in range(len(images))],
    }


def write_batch(path, images, labels):
    with open(path, "wb") as file:
        pickle.dump(batch_dict(images, labels, Path(path).name), file, protocol=2)


def make_cifar_folder(root, per_batch=60, test_images=100, seed=0):
    """root/cifar-10-batches-py/ with five training batches and a test batch.
    Returns the batches folder."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(TRAIN_BATCHES):
        labels = np.arange(per_batch) % 10
        write_batch(
            folder / f"data_batch_{index + 1}", make_images(labels, seed + index), labels
        )
    labels = np.arange(test_images) % 10
    write_batch(folder / "test_batch", make_images(labels, seed + 99), labels)
    (folder / "batches.meta").write_bytes(
        pickle.dumps({b"num_cases_per_batch": per_batch})
    )
    return folder


def make_cifar_archive(root, **sizes):
    """root/cifar-10-python.tar.gz laid out as the official download."""
    root = Path(root)
    folder = make_cifar_folder(root / "unpacked", **sizes)
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A folder holding cifar-10-batches-py/: 300 training and 100 test images."""
    root = tmp_path_factory.mktemp("cifar")
    make_cifar_folder(root)
    return root


@pytest.fixture(scope="session")
def cifar_archive(tmp_path_factory):
    return make_cifar_archive(tmp_path_factory.mktemp("cifar-archive"))


OFFLINE_ENV = {
    # Any download fails at once: connections go to a closed local port.
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "",
    "no_proxy": "",
}


def run_script(script, *args, cwd=None, env=None, timeout=600):
    """Run a script as a user would; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd or REPO,
        env={**os.environ, **OFFLINE_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def own_stderr_lines(stderr):
    """stderr without TensorFlow's C++ start-up notices, which TF 2.21 prints
    before any Python code can silence them."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip()
        and not line.startswith(
            ("WARNING: All log messages before absl", "To enable the following")
        )
        and not (len(line) > 5 and line[0] in "IWEF" and line[1:5].isdigit())
    ]


TINY_RUN = ["--batch_size=32", "--verbose=0"]


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory):
    """OUT_DIR shared by the session's tiny runs."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def scratch_run(cifar_dir, runs_dir):
    """A finished tiny scratch_cnn run folder (trained in-process, once a session)."""
    import scratch_cnn

    # float32 on every CPU ("auto" is bfloat16 with AMX): the same figures everywhere.
    return scratch_cnn.main(
        [f"--data_dir={cifar_dir}", f"--out_dir={runs_dir}", "--epochs=4", "--width=16"]
        + TINY_RUN + ["--mixed_precision=off"]
    )  # fmt: skip


@pytest.fixture(scope="session")
def base_weights(cifar_dir, tmp_path_factory):
    """A stand-in for pretrained MobileNetV2 base weights at 32 px (ImageNet's cannot
    be downloaded here): random kernels, and BatchNorm statistics taken from a batch
    of the tiny training images, not the placeholders (0 and 1) of a new layer."""
    import keras

    import data
    import transfer_mobilenetv2

    keras.utils.set_random_seed(0)
    _, base = transfer_mobilenetv2.build_model(32, 1.0, None, dropout=0.0)
    images = data.load_cifar10(cifar_dir)[0][:64].astype("float32") / 127.5 - 1.0
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0  # the moving statistics become this batch's
    base(images, training=True)
    path = tmp_path_factory.mktemp("weights") / "base.weights.h5"
    base.save_weights(path)
    return path


@pytest.fixture(scope="session")
def transfer_resume(cifar_dir, runs_dir, base_weights, tmp_path_factory):
    """A tiny two-phase transfer_mobilenetv2 run, 32 px, from the stand-in pretrained
    weights (one head epoch, two fine-tuning epochs), stopped by a Ctrl-C once its
    first fine-tuning epoch is backed up, then resumed to the end: one MobileNetV2
    run serves the resume test and every test of a finished run. Returns what the
    interruption left ("error", "history", "metrics_written", "backup": a copy of
    its backup/ folder), "run_dir" and what the resume returned ("resumed")."""
    import settings
    import training
    import transfer_mobilenetv2

    back_up_epoch = training.Backup.on_epoch_end

    def interrupt_after_epoch_1(self, epoch, logs=None):
        back_up_epoch(self, epoch, logs)
        if epoch == 1:
            raise KeyboardInterrupt

    args = [
        f"--data_dir={cifar_dir}",
        f"--out_dir={runs_dir}",
        f"--weights={base_weights}",
        "--img_size=32",
        "--head_epochs=1",
        "--fine_tune_epochs=2",
    ] + TINY_RUN
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.Backup, "on_epoch_end", interrupt_after_epoch_1)
        with pytest.raises(settings.Interrupted) as error:
            transfer_mobilenetv2.main(args)
    (run_dir,) = (runs_dir / transfer_mobilenetv2.SCRIPT).iterdir()
    state = {
        "run_dir": run_dir,
        "error": str(error.value),
        "history": training.read_history(run_dir),
        "metrics_written": (run_dir / "metrics.json").exists(),
        "backup": shutil.copytree(
            run_dir / "backup", tmp_path_factory.mktemp("transfer-backup") / "backup"
        ),
    }
    state["resumed"] = transfer_mobilenetv2.main([f"--resume={run_dir}", "--verbose=0"])
    return state


@pytest.fixture(scope="session")
def transfer_run(transfer_resume):
    """A finished tiny two-phase transfer_mobilenetv2 run folder (transfer_resume's:
    one head epoch, two fine-tuning epochs, resumed after the first of them)."""
    return transfer_resume["run_dir"]


# pytest-xdist (`-n 2 --dist loadfile`, set in pyproject.toml): each worker builds
# its own session and module fixtures. A test file's tests run in one worker, so its
# module fixtures are built once; the files that use the finished MobileNetV2 run
# (transfer_resume, the costliest fixture) run in one worker together; the tests of
# SPREAD_FILES, each training runs of its own, go wherever a worker is free.
# (xdist_group marks cannot say this: pytest-xdist 3.8's loadgroup loses them with
# pytest 9.2, pytest-xdist issue 1386.)
TRANSFER_RUN_FILES = ("test_evaluate.py", "test_export.py", "test_transfer.py")
SPREAD_FILES = ("test_resilience.py",)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            if Path(path).name in SPREAD_FILES:
                return nodeid
            if Path(path).name in TRANSFER_RUN_FILES:
                return "transfer_resume"
            return path

    return FileScheduling(config, log)
