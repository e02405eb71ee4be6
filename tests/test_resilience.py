"""Runs that survive interruption, crashes, divergence, resumes and several devices.

Real runs on the tiny data sets of conftest.py: Ctrl-C is SIGINT (or `kill`'s
SIGTERM) sent to a child process paused after its first epoch, a crash is a file-size
limit put on a paused child (a full disk), divergence a weight turned NaN at a chosen
step, and several GPUs are logical CPU devices in a child process.
"""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import keras
import numpy as np
import pytest
from conftest import OFFLINE_ENV, REPO, own_stderr_lines, run_script
from test_transfer import ALPHA, EVEN_BATCH, save_imagenet_style_weights

import data
import scratch_cnn
import settings
import training
import transfer_mobilenetv2 as transfer

# Each run as small as it can be: 2 steps an epoch, batches that divide the
# validation and test sets (no second trace of the network), no progress bar.
SHORT_RUN = ["--steps_per_epoch=2", f"--batch_size={EVEN_BATCH}", "--verbose=0"]
SCRATCH_TINY = ["--width=8", "--tta=none"]  # the smallest scratch CNN, one test pass


@pytest.fixture(scope="module")
def pretrained_tiny(tmp_path_factory):
    """Two phases need pretrained weights: a stand-in alpha-0.35 file at 32 px."""
    path = tmp_path_factory.mktemp("weights") / "stand-in_no_top.h5"
    save_imagenet_style_weights(path)
    return [f"--weights={path}", f"--alpha={ALPHA}", "--img_size=32"]


# Runs a training script as __main__, as `python script.py ...` would, except that
# once its first epoch is backed up it waits there until the file go_on(out_dir)
# exists: the test's Ctrl-C, SIGTERM or full disk lands in that wait, never after a
# tiny run has already finished on a busy machine.
PAUSE_AFTER_FIRST_EPOCH = textwrap.dedent("""
    import pathlib, runpy, sys, time
    sys.path.insert(0, sys.argv[1])
    import training
    go_on = pathlib.Path(sys.argv[2])
    back_up_epoch = training.Backup.on_epoch_end
    def back_up_then_wait(self, epoch, logs=None):
        back_up_epoch(self, epoch, logs)
        deadline = time.monotonic() + 600
        while epoch == 0 and not go_on.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    training.Backup.on_epoch_end = back_up_then_wait
    sys.argv = sys.argv[3:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """)


def go_on(out_dir):
    """The file that lets a child paused after its first epoch go on."""
    return out_dir / "go-on"


def start(script, out_dir, *args):
    """A training script as a child process, paused after its first epoch, its
    output going to files in out_dir (a full pipe would stall it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-c", PAUSE_AFTER_FIRST_EPOCH, str(REPO), str(go_on(out_dir)),
         str(REPO / script), f"--out_dir={out_dir}", *args, *SHORT_RUN],
        cwd=REPO, env={**os.environ, **OFFLINE_ENV},
        stdout=(out_dir / "stdout.txt").open("w"),
        stderr=(out_dir / "stderr.txt").open("w"),
    )  # fmt: skip
    # (Python ignores SIGXFSZ: past a file-size limit a write fails with EFBIG.)


def wait_for_first_epoch(process, out_dir, script, timeout=600):
    """The child's run folder once its first epoch is in its history and its backup:
    the state a Ctrl-C between two epochs leaves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, (out_dir / "stderr.txt").read_text()[-2000:]
        for run_dir in (out_dir / script).glob("*"):
            backed_up = [
                json.loads(path.read_text())["epoch"]
                for path in (run_dir / "backup").glob("*/training_metadata.json")
            ]
            if training.read_history(run_dir) and max(backed_up, default=0) >= 1:
                return run_dir
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no first epoch within {timeout} s")


def interrupt(process, out_dir, signum=signal.SIGINT):
    """Ctrl-C, as a terminal sends it (or SIGTERM, as `kill` and schedulers send
    it, which must stop the same way); the child must exit 130, resumable."""
    process.send_signal(signum)
    assert process.wait(timeout=300) == 130, (out_dir / "stderr.txt").read_text()
    assert "--resume=" in (out_dir / "stderr.txt").read_text()


def epochs_and_phases(run_dir):
    return [(row["epoch"], row["phase"]) for row in training.read_history(run_dir)]


def fingerprint(folder):
    return {
        path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def backup_weights(run_dir):
    return sorted((run_dir / "backup").glob("*/latest.weights.h5"))


def float_names(file):
    """The names of the floating-point arrays in an open .h5 weights file."""
    names = []
    file.visititems(
        lambda name, item: (
            names.append(name)
            if isinstance(item, h5py.Dataset) and item.dtype.kind == "f"
            else None
        )
    )
    return names


def float_arrays(path):
    """Every floating-point array in an .h5 weights file (h5py raises if the file
    is truncated)."""
    with h5py.File(path, "r") as file:
        return [file[name][()] for name in float_names(file)]


def all_finite(arrays):
    return all(np.isfinite(np.asarray(array)).all() for array in arrays)


# ---------------------------------------------------------------------------------
# 1. A resume in the head phase must not train extra fine-tuning epochs


def test_resume_in_the_head_phase_starts_fine_tuning_at_its_own_epoch(
    cifar_dir, tmp_path, pretrained_tiny
):
    """Ctrl-C in the head phase (2 epochs), once its first epoch is backed up; the
    resumed run finishes the head and trains the one fine-tuning epoch as epoch 3,
    each epoch once (Keras's BackupAndRestore leaves the head's restored epoch in
    model._initial_epoch, which fit would use for fine-tuning: epochs 2 and 3)."""
    child = start(
        "transfer_mobilenetv2.py", tmp_path, f"--data_dir={cifar_dir}",
        "--head_epochs=2", "--fine_tune_epochs=1", *pretrained_tiny,
    )  # fmt: skip
    run_dir = wait_for_first_epoch(child, tmp_path, transfer.SCRIPT)
    interrupt(child, tmp_path)
    assert not (run_dir / "backup" / "fine_tune").exists()

    assert transfer.main([f"--resume={run_dir}", "--verbose=0"]) == run_dir
    assert epochs_and_phases(run_dir) == [(0, "head"), (1, "head"), (2, "fine_tune")]
    history = training.read_history(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 3
    assert metrics["train_seconds"] == pytest.approx(
        sum(row["epoch_seconds"] for row in history), abs=0.1
    )


# ---------------------------------------------------------------------------------
# 2. A crash while an epoch's files are written loses nothing


def test_a_crash_writing_an_epoch_keeps_checkpoint_and_backup_whole(cifar_dir, tmp_path):
    """Once epoch 1 is saved, the disk 'fills up' (a file-size limit smaller than
    the checkpoint and the backup, put on the paused child): epoch 2's writes fail.
    Checkpoint and backup stay whole, and the resumed run ends with every epoch in
    the history exactly once."""
    child = start(
        "scratch_cnn.py", tmp_path, f"--data_dir={cifar_dir}", "--epochs=4",
        *SCRATCH_TINY,
    )  # fmt: skip
    run_dir = wait_for_first_epoch(child, tmp_path, scratch_cnn.SCRIPT)
    limit = (
        min(
            (run_dir / "model.keras").stat().st_size,
            (run_dir / "backup" / "train" / "latest.weights.h5").stat().st_size,
        )
        // 2
    )
    resource.prlimit(child.pid, resource.RLIMIT_FSIZE, (limit, limit))
    go_on(tmp_path).touch()
    assert child.wait(timeout=300) not in (0, 130)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "File too large" in stderr, stderr[-2000:]
    assert not (run_dir / "metrics.json").exists()

    keras.models.load_model(run_dir / "model.keras")  # whole, not cut short
    assert all_finite(float_arrays(run_dir / "backup/train/latest.weights.h5"))

    assert scratch_cnn.main([f"--resume={run_dir}", "--verbose=0"]) == run_dir
    assert [row["epoch"] for row in training.read_history(run_dir)] == [0, 1, 2, 3]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 4
    assert not list(run_dir.glob("*partial*"))


# ---------------------------------------------------------------------------------
# 3. A diverged run keeps its last finite state and never resumes from NaN


class NaNAt(keras.callbacks.Callback):
    """Turns the classifier's kernel to NaN before training batch `batch` of epoch
    `epoch` (both 0-based), as an exploding step leaves weights: a divergence at a
    known step on every machine (when an absurd learning rate overflows depends on
    the CPU's arithmetic). Records each epoch begun and the kernel it began with."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.begun, self.kernels = (epoch, batch), [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.begun.append(epoch)
        self.kernels.append(self.model.get_layer("classes").kernel.numpy())

    def on_train_batch_begin(self, batch, logs=None):
        if (self.begun[-1], batch) == self.at:
            kernel = self.model.get_layer("classes").kernel
            kernel.assign(np.full(kernel.shape, np.nan, kernel.dtype))


def test_divergence_keeps_the_last_finite_state_and_resume_starts_from_it(
    cifar_dir, tmp_path, pretrained_tiny, monkeypatch
):
    """Two head epochs then fine-tuning; in epoch 2 the weights turn NaN at its
    second step. The run stops naming epoch 2, with no NaN in its history,
    checkpoint or backup (epoch 1's, which a NaN epoch 2 would overwrite); a resume
    goes on from that finite state, changing no file, and diverges again at the
    same step. (In the head phase: it traces the network at a fraction of the
    fine-tuning phase's cost, and the guard does not care which phase runs.)"""
    nan_at = NaNAt(epoch=1, batch=1)
    fit = training.fit

    def fit_with_nan(*args, callbacks=(), **kwargs):
        return fit(*args, callbacks=(*callbacks, nan_at), **kwargs)

    monkeypatch.setattr(training, "fit", fit_with_nan)
    args = [
        f"--data_dir={cifar_dir}", f"--out_dir={tmp_path}", "--head_epochs=2",
        "--fine_tune_epochs=1", *pretrained_tiny, *SHORT_RUN,
    ]  # fmt: skip
    with pytest.raises(settings.ConfigError, match="diverged in epoch 2") as error:
        transfer.main(args)
    assert "after epoch 1, the last finite one" in str(error.value)
    assert "lower learning rate" in str(error.value)
    assert nan_at.begun == [0, 1]
    (run_dir,) = (tmp_path / transfer.SCRIPT).iterdir()

    assert epochs_and_phases(run_dir) == [(0, "head")]
    row = training.read_history(run_dir)[0]
    assert np.isfinite([row["loss"], row["val_loss"]]).all()
    assert all_finite(keras.models.load_model(run_dir / "model.keras").get_weights())
    assert [path.parent.name for path in backup_weights(run_dir)] == ["head"]
    assert all_finite(float_arrays(backup_weights(run_dir)[0]))
    assert not (run_dir / "metrics.json").exists()
    before, after_epoch_1 = fingerprint(run_dir), nan_at.kernels[1]
    nan_at.begun.clear()
    nan_at.kernels.clear()
    with pytest.raises(settings.ConfigError, match="diverged in epoch 2"):
        transfer.main([f"--resume={run_dir}", "--verbose=0"])
    assert nan_at.begun == [1]  # epoch 1 restored from the backup, not trained
    np.testing.assert_array_equal(nan_at.kernels[0], after_epoch_1)
    assert fingerprint(run_dir) == before  # still the last finite state


# ---------------------------------------------------------------------------------
# 4. Early stopping remembers the epochs before a resume


def test_early_stopping_counts_the_epochs_before_a_resume(cifar_dir, tmp_path):
    """With a learning rate of 0, frozen BatchNorm statistics and no lookahead the
    model never changes, so val_accuracy never improves after epoch 1 and a patience
    of 3 ends the run after epoch 4. A stop after epoch 1 must not restart the
    count; the stop here is SIGTERM (`kill`), which must act as Ctrl-C does."""
    child = start(
        "scratch_cnn.py", tmp_path, f"--data_dir={cifar_dir}", "--epochs=10",
        *SCRATCH_TINY, "--learning_rate=0.0", "--batchnorm_momentum=1.0",
        "--lookahead=False", "--early_stopping_patience=3",
    )  # fmt: skip
    run_dir = wait_for_first_epoch(child, tmp_path, scratch_cnn.SCRIPT)
    interrupt(child, tmp_path, signal.SIGTERM)
    assert len(training.read_history(run_dir)) == 1

    assert scratch_cnn.main([f"--resume={run_dir}", "--verbose=0"]) == run_dir
    history = training.read_history(run_dir)
    assert len({row["val_accuracy"] for row in history}) == 1  # never improved
    assert [row["epoch"] for row in history] == [0, 1, 2, 3]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 4


# ---------------------------------------------------------------------------------
# 5-6. Several replicas: bfloat16 instead of loss scaling, an even batch split


@pytest.mark.parametrize(
    "batch_size, replicas, batch",
    [(16, 1, 16), (16, 3, 15), (32, 3, 33), (64, 1, 33), (64, 5, 35), (2, 4, 4)],
)
def test_batch_is_at_most_an_eighth_of_the_images_split_evenly(
    cifar_dir, batch_size, replicas, batch
):
    """270 training images, MIN_STEPS 8: BATCH_SIZE, at most 33 (an eighth), rounded
    to the nearest multiple of the replicas, and at least one image for each."""
    config = {**scratch_cnn.CONFIG, "DATA_DIR": str(cifar_dir), "BATCH_SIZE": batch_size}
    config["MIN_STEPS"] = 8
    pipelines = data.pipelines_for(config, scratch_cnn.VALUE_RANGE, replicas)
    assert pipelines.sizes["train"] == 270
    assert pipelines.batch_size == batch


def test_mixed_precision_is_bfloat16_on_several_replicas_and_cpus():
    policy = training.precision_policy
    assert policy("off", 1, []) == "float32"
    assert policy("off", 4, ["GPU"] * 4) == "float32"
    assert policy("on", 1, ["GPU"]) == "mixed_float16"
    assert policy("on", 2, ["GPU"] * 2) == "mixed_bfloat16"  # no loss scaling
    assert policy("on", 1, []) == "mixed_bfloat16"  # a CPU has no fast float16
    assert policy("auto", 1, ["GPU"]) == "mixed_float16"
    assert policy("auto", 1, [], ("avx512f",)) == "float32"
    assert policy("auto", 1, [], ("avx512f", "amx_bf16")) == "mixed_bfloat16"


def test_three_replicas_train_in_bfloat16_on_an_even_batch_split(cifar_dir, tmp_path):
    """The several-GPU path on a CPU split into three logical devices: a batch of
    32 becomes 33 (11 each), said at start and saved, and MIXED_PRECISION trains
    in mixed_bfloat16, not with float16 loss scaling."""
    script = textwrap.dedent(f"""
        import sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 3
        )
        sys.path.insert(0, {str(REPO)!r})
        import training, scratch_cnn
        devices = [device.name for device in tf.config.list_logical_devices("CPU")]
        training.distribution_strategy = lambda: tf.distribute.MirroredStrategy(devices)
        scratch_cnn.main(sys.argv[1:])
        """)
    result = subprocess.run(
        [sys.executable, "-c", script, f"--data_dir={cifar_dir}", f"--out_dir={tmp_path}",
         "--epochs=1", *SCRATCH_TINY, "--steps_per_epoch=1", "--batch_size=32",
         "--mixed_precision=on", "--verbose=0"],
        env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 replica(s), batch 33" in result.stdout
    assert "precision: mixed_bfloat16" in result.stdout
    (run_dir,) = (tmp_path / "scratch_cnn").iterdir()
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["BATCH_SIZE"] == 33
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert np.isfinite(metrics["test_loss"])
    assert training.read_history(run_dir)[0]["images_per_second"] > 0
    model = keras.models.load_model(run_dir / "model.keras")
    assert model.get_layer("block1_conv1").dtype_policy.name == "mixed_bfloat16"
    assert model.get_layer("block1_conv1").compute_dtype == "bfloat16"


# ---------------------------------------------------------------------------------
# --resume refuses a run folder it cannot safely go on with, and changes nothing


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def fill_with_nan(path):
    """One weight array of the file set to NaN, as a diverged run saved it."""
    with h5py.File(path, "r+") as file:
        file[float_names(file)[0]][...] = np.nan


DAMAGE = {
    "another script's run": (
        "config.json",
        lambda path: path.write_text(
            path.read_text().replace('"scratch_cnn"', '"transfer_mobilenetv2"', 1)
        ),
        "a run of transfer_mobilenetv2.py, not scratch_cnn.py",
    ),
    "damaged config.json": ("config.json", truncate, "damaged"),
    "truncated model.keras": ("model.keras", truncate, "damaged or truncated"),
    "truncated backup": ("backup/train/latest.weights.h5", truncate, "truncated"),
    "damaged backup epoch": (
        "backup/train/training_metadata.json",
        lambda path: path.write_text('{"epo'),
        "damaged",
    ),
    "NaN in the backup": ("backup/train/latest.weights.h5", fill_with_nan, "NaN"),
}


@pytest.fixture
def unfinished_run(scratch_run, tmp_path):
    """A copy of the session's finished scratch run as an interrupted run looks:
    no metrics.json, and a backup of its last epoch, saved by Keras."""
    run_dir = tmp_path / "scratch_cnn" / scratch_run.name
    shutil.copytree(scratch_run, run_dir)
    (run_dir / "metrics.json").unlink()
    backup = run_dir / "backup" / "train"
    backup.mkdir(parents=True)
    model = keras.models.load_model(run_dir / "model.keras")
    model.save_weights(backup / "latest.weights.h5")
    settings.write_json(backup / "training_metadata.json", {"epoch": 3, "batch": 0})
    training.check_resumable(run_dir, scratch_cnn.SCRIPT)  # whole, it passes
    return run_dir


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_refuses_a_damaged_run_naming_the_file(damage, unfinished_run):
    name, spoil, says = DAMAGE[damage]
    spoil(unfinished_run / name)
    before = fingerprint(unfinished_run)
    for resume in (unfinished_run, "last"):
        with pytest.raises(settings.DataError, match=says) as error:
            scratch_cnn.main(
                [f"--resume={resume}", f"--out_dir={unfinished_run.parent.parent}"]
            )
        assert str(unfinished_run / name) in str(error.value)
    assert fingerprint(unfinished_run) == before


def test_resume_of_a_damaged_run_exits_3_with_one_line(unfinished_run):
    truncate(unfinished_run / "model.keras")
    before = fingerprint(unfinished_run)
    result = run_script("scratch_cnn.py", f"--resume={unfinished_run}")
    assert result.returncode == 3, result.stderr[-2000:]
    lines = own_stderr_lines(result.stderr)
    assert len(lines) == 1 and str(unfinished_run / "model.keras") in lines[0], lines
    assert fingerprint(unfinished_run) == before
