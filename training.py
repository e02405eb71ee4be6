"""The plumbing both training scripts share: run folders and resume, devices, precision,
the schedule, callbacks and the test evaluation. Hyperparameters live in the scripts."""

import atexit
import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
import zipfile
from datetime import datetime
from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd
import tensorflow as tf

import settings

MAY_CHANGE_ON_RESUME = ("RESUME", "VERBOSE", "OUT_DIR", "DATA_DIR")  # where, how loud
HEARTBEAT_TIMEOUT_MS = 300_000  # a worker silent this long is taken for dead (TF: 10 s)

# ---------------------------------------------------------------------------------
# Set-up: configuration, run folders and resume, seeds, devices and precision


def configure(defaults, argv, verbose=True):
    """A script's effective configuration, `defaults` with `argv` applied."""
    config = settings.parse_overrides(defaults, argv)
    if verbose:
        settings.print_config(config, defaults)
    return config


def new_run_dir(out_dir, script):
    """A fresh run folder, never an existing one. Only a multi-worker run's chief writes
    it; another worker, whose Keras callbacks write too, gets a temporary one."""
    if not cluster_task()[1]:
        folder = Path(tempfile.mkdtemp(prefix=f"{script}-worker-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return folder
    parent = Path(out_dir) / script
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        run_dir = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        with contextlib.suppress(FileExistsError):  # taken: try the next name
            run_dir.mkdir()
            return run_dir
    raise settings.ConfigError(f"cannot create a new run folder in {parent}")


def configure_run(defaults, argv, script):
    """(config, run_dir): `defaults` with `argv` applied, run_dir None for a new run; or
    --resume's run folder (or "last" unfinished one), checked, with its saved settings."""
    config = settings.parse_overrides(defaults, argv)
    resume, out_dir = config["RESUME"], config["OUT_DIR"]
    if not resume:
        settings.print_config(config, defaults)
        return config, None
    if resume == "last":
        unfinished = settings.list_runs(out_dir, script, finished=False)
        runs = Path(out_dir) / script
        settings.require(unfinished, f"--resume=last: no unfinished run in {runs}")
        run_dir = unfinished[-1]
    else:
        run_dir = Path(resume)
        settings.require(
            (run_dir / "config.json").is_file(),
            f"--resume={resume}: not a run folder (no config.json in it)",
        )
        settings.require(
            not (run_dir / "metrics.json").is_file(),
            f"--resume={resume}: that run has finished (metrics.json exists)",
        )
    saved = check_resumable(run_dir, script)
    given = {name: value for name, value in config.items() if value != defaults[name]}
    changed = [name for name in given if name not in MAY_CHANGE_ON_RESUME]
    settings.require(
        not changed,
        f"a resumed run keeps its saved settings; drop --{', --'.join(changed).lower()}",
    )
    config = {**defaults, **saved, **given, "RESUME": resume}
    print(f"resuming {run_dir} with its saved settings:")
    settings.print_config(config, defaults)
    if not cluster_task()[1]:  # a worker goes on from a temporary copy; the chief writes
        copy = new_run_dir(out_dir, script)
        run_dir = shutil.copytree(run_dir, copy, dirs_exist_ok=True)
    return config, run_dir


def check_resumable(run_dir, script):
    """The saved config of `run_dir`; else a DataError (exit 3) naming its first file a
    resume of `script` could not go on from: another script's, damaged or holding NaN."""
    cannot = "this run cannot be resumed; start a new one"
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
        owner, saved_config = saved["script"], saved["config"]
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise settings.DataError(
            f"{path}: damaged ({type(error).__name__}); {cannot}"
        ) from None
    if owner != script or not isinstance(saved_config, dict):
        raise settings.DataError(
            f"{path}: a run of {owner}.py, not {script}.py; resume it with: "
            f"python {owner}.py --resume={run_dir}"
        )
    path = run_dir / "model.keras"
    if path.exists():
        try:  # a .keras file is a zip: a truncated one has no central directory
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except (OSError, zipfile.BadZipFile):
            damaged = "the archive"
        if damaged:
            raise settings.DataError(
                f"{path}: damaged or truncated ({damaged} unreadable); {cannot}"
            )
    for path in sorted((run_dir / "backup").glob("*/training_metadata.json")):
        try:
            int(json.loads(path.read_text())["epoch"])
        except (OSError, ValueError, TypeError, KeyError):
            raise settings.DataError(f"{path}: damaged; {cannot}") from None
    for path in sorted((run_dir / "backup").glob("*/latest.weights.h5")):
        try:
            with h5py.File(path, "r") as file:
                items = []  # every group and array in the file
                file.visititems(lambda name, item: items.append(item))
                arrays = [item for item in items if isinstance(item, h5py.Dataset)]
                floats = (array[()] for array in arrays if array.dtype.kind == "f")
                finite = all(np.isfinite(values).all() for values in floats)
        except (OSError, ValueError, KeyError):
            raise settings.DataError(f"{path}: damaged or truncated; {cannot}") from None
        if not finite:
            raise settings.DataError(
                f"{path}: holds NaN or inf weights (the run diverged); resuming would "
                f"train on from them. Start a new run with a lower learning rate"
            )
    return saved_config


def save_run_config(run_dir, script, config, data_source, **extra):
    """config.json: the effective config, data source, versions, devices and `extra`."""
    versions = {module.__name__: module.__version__ for module in (tf, keras, np)}
    run = {"script": script, "config": config, "data_source": data_source, **extra}
    run["versions"] = {"python": platform.python_version(), **versions}
    run["devices"] = [device.name for device in tf.config.list_logical_devices()]
    settings.write_json(run_dir / "config.json", run)


def gpu_names():
    """The GPUs TensorFlow sees, by their device names."""
    return [
        tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
        for gpu in tf.config.list_physical_devices("GPU")
    ]


def cluster_task():
    """(jobs, chief): the number of tasks of each job, chief and worker, TF_CONFIG's
    cluster names, and whether this process is the chief ("chief", else worker 0)."""
    try:
        tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        cluster, task = tf_config.get("cluster", {}), tf_config.get("task", {})
        jobs = {job: len(cluster[job]) for job in ("chief", "worker") if cluster.get(job)}
    except (ValueError, AttributeError, TypeError) as error:
        raise settings.ConfigError(
            f"TF_CONFIG must be JSON with a cluster and a task, as docs/multi-worker.md "
            f"shows ({error})"
        ) from None
    chief = task.get("type") == "chief" or (
        task.get("type") == "worker" and task.get("index") == 0 and "chief" not in cluster
    )
    return jobs, chief or sum(jobs.values()) <= 1


class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy as Keras 3's fit calls it (keras-team/keras#20585):
    reducing a nest a tensor at a time, and scalar metrics over replicas, not axis 0."""

    def reduce(self, reduce_op, value, axis=None):
        def reduce_one(one):
            local = self.experimental_local_results(one)[0]
            scalar = getattr(local, "shape", None) is not None and local.shape.rank == 0
            return super(MultiWorkerStrategy, self).reduce(
                reduce_op, one, None if scalar else axis
            )

        return tf.nest.map_structure(reduce_one, value)


def distribution_strategy():
    """The multi-worker, several-GPU or default strategy; make it before any tensor."""
    jobs = cluster_task()[0]
    if sum(jobs.values()) > 1:
        # The coordination service as the strategy sets it up, with a longer heartbeat.
        from tensorflow.compiler.xla.tsl.protobuf.coordination_config_pb2 import (
            CoordinatedJob,
        )
        from tensorflow.python.eager import context

        context.context().configure_coordination_service(
            service_type="standalone",
            service_leader=f"/job:{list(jobs)[0]}/replica:0/task:0",
            heartbeat_timeout_in_ms=HEARTBEAT_TIMEOUT_MS,
            coordinated_jobs=[
                CoordinatedJob(name=job, num_tasks=tasks) for job, tasks in jobs.items()
            ],
        )
        return MultiWorkerStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([gpu.name for gpu in gpus])
    return tf.distribute.get_strategy()


def precision_policy(mixed_precision, replicas, gpus, cpu_flags=()):
    """The dtype policy for MIXED_PRECISION ("auto": "on" on GPUs and AMX CPUs). Several
    replicas take bfloat16: Keras 3.15.1's loss scaling sees the first replica alone."""
    fast_hardware = gpus or "amx_bf16" in cpu_flags
    if mixed_precision == "off" or (mixed_precision == "auto" and not fast_hardware):
        return "float32"
    return "mixed_float16" if gpus and replicas == 1 else "mixed_bfloat16"


def set_precision(mixed_precision, strategy):
    """Set and return the global dtype policy; call it before the model is built."""
    replicas, gpus = strategy.num_replicas_in_sync, tf.config.list_logical_devices("GPU")
    policy = precision_policy(mixed_precision, replicas, gpus, settings.cpu_flags())
    keras.mixed_precision.set_global_policy(policy)
    if policy != "float32":
        print(f"precision: {policy}")
    return policy


# ---------------------------------------------------------------------------------
# Model pieces both scripts use: the schedule, a fast-learning bias, compilation


@keras.saving.register_keras_serializable(package="training")
class WarmupThenDecay(keras.optimizers.schedules.LearningRateSchedule):
    """A linear warm-up from `start` x `peak` to `peak` over `warmup_steps`, then a
    cosine or linear decay to `end` x `peak` at `total_steps`."""

    def __init__(
        self, peak, warmup_steps, total_steps, start=0.0, end=0.0, decay="cosine"
    ):
        self.peak, self.start, self.end, self.decay = peak, start, end, decay
        self.warmup_steps, self.total_steps = min(warmup_steps, total_steps), total_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        rising = self.start + (1 - self.start) * step / max(self.warmup_steps, 1)
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = keras.ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = 0.5 * (1 + keras.ops.cos(np.pi * progress))
        falling = cosine if self.decay == "cosine" else 1 - progress
        falling = self.end + (1 - self.end) * falling
        return self.peak * keras.ops.where(step < self.warmup_steps, rising, falling)

    def get_config(self):
        names = ("peak", "warmup_steps", "total_steps", "start", "end", "decay")
        return {name: getattr(self, name) for name in names}


@keras.saving.register_keras_serializable(package="training")
class Bias(keras.layers.Layer):
    """x + bias, one per channel, with a coupled L2 penalty `l2` (its gradient adds
    l2 x bias). The data's gradient reaches the bias `rate_factor` times larger, which
    under SGD with momentum is exactly a learning rate that many times higher."""

    def __init__(self, rate_factor=1.0, l2=0.0, **kwargs):
        super().__init__(**kwargs)
        self.rate_factor, self.l2 = rate_factor, l2

    def build(self, input_shape):
        self.bias = self.add_weight(
            shape=(input_shape[-1],), initializer="zeros", name="bias",
            regularizer=keras.regularizers.L2(self.l2 / 2) if self.l2 else None,
        )  # fmt: skip

    def call(self, x):
        scaled = self.bias * self.rate_factor
        bias = scaled - keras.ops.stop_gradient(scaled - self.bias)
        return x + keras.ops.cast(bias, x.dtype)

    def get_config(self):
        return {**super().get_config(), "rate_factor": self.rate_factor, "l2": self.l2}


def compile_model(model, optimizer, label_smoothing, jit_compile):
    """Compile for one-hot labels, with the metric and the optimizer built here: Keras
    3.15 would create both inside the train step's first trace, then traced again."""
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
    )
    model.optimizer.build(model.trainable_variables)


def count_trainable(model):
    """Parameters the optimizer updates."""
    return sum(int(keras.ops.size(weight)) for weight in model.trainable_weights)


# ---------------------------------------------------------------------------------
# Training: callbacks that checkpoint, log, guard and back up each epoch


class Diverged(Exception):
    """The loss, or a weight, became NaN or inf in the epoch (0-based) raised with."""


class DivergenceGuard(keras.callbacks.Callback):
    """Raise Diverged at a NaN or inf loss, weight or optimizer state, before the
    callbacks that write, so a diverged epoch writes nothing (Keras 3.15.1's
    TerminateOnNaN waits for the epoch's end, when BackupAndRestore saves NaN weights)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if not np.isfinite(float((logs or {}).get("loss", 0.0))):
            raise Diverged(self.epoch)

    def on_epoch_end(self, epoch, logs=None):
        arrays = [logs[name] for name in ("loss", "val_loss") if name in (logs or {})]
        arrays += [v.numpy() for v in self.model.weights + self.model.optimizer.variables]
        if not all(np.isfinite(array).all() for array in arrays):
            raise Diverged(epoch)


class Checkpoint(keras.callbacks.ModelCheckpoint):
    """model.keras, the best epoch by val_accuracy, saved as model.partial.keras and
    renamed: Keras 3.15.1 writes in place, and a crash would truncate the best model."""

    def __init__(self, path, best):
        self.path = Path(path)
        super().__init__(
            str(self.path.with_suffix(".partial.keras")), monitor="val_accuracy",
            mode="max", save_best_only=True, initial_value_threshold=best,
        )  # fmt: skip

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        Path(self.filepath).unlink(missing_ok=True)  # a crash's half-written file

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if Path(self.filepath).exists():
            Path(self.filepath).replace(self.path)


class Backup(keras.callbacks.BackupAndRestore):
    """Keras's resume state in backup/<phase>, each file written under a temporary name
    and renamed, weights first: Keras 3.15.1 writes in place, and a half-written file
    stops a resume. Last in the callbacks: an epoch is done once all else is saved."""

    def on_epoch_end(self, epoch, logs=None):
        weights = Path(self._weights_path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        partial = weights.with_name("partial.weights.h5")
        self.model.save_weights(str(partial), overwrite=True)
        partial.replace(weights)
        metadata = {"epoch": epoch + 1, "batch": 0}  # as Keras writes it
        settings.write_json(self._training_metadata_path, metadata)


class EarlyStopping(keras.callbacks.EarlyStopping):
    """Early stopping across a resume: Keras resets it, so it replays `earlier_rows`."""

    def __init__(self, patience, earlier_rows):
        super().__init__(monitor="val_accuracy", mode="max", patience=patience)
        self.earlier_rows = earlier_rows

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        for row in self.earlier_rows:
            self.on_epoch_end(row["epoch"], row)


class History(keras.callbacks.CSVLogger):
    """history.csv, a row per epoch as it ends, with its phase, seconds and images/s."""

    def __init__(self, filename, phase, images_per_epoch):
        super().__init__(str(filename), append=True)
        self.phase, self.images_per_epoch = phase, images_per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = self.validation_start = time.perf_counter()

    def on_test_begin(self, logs=None):
        self.validation_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.epoch_start
        train_seconds = (self.validation_start - self.epoch_start) or seconds
        logs = {**(logs or {}), "phase": self.phase, "epoch_seconds": round(seconds, 3)}
        logs["images_per_second"] = round(self.images_per_epoch / train_seconds, 1)
        super().on_epoch_end(epoch, logs)


def history_frame(run_dir):
    """history.csv as a DataFrame, without a row a crash cut short; empty before any."""
    path = Path(run_dir) / "history.csv"
    if not path.is_file() or not path.stat().st_size:
        return pd.DataFrame()
    frame = pd.read_csv(path, on_bad_lines="skip").dropna()
    return frame.astype({"epoch": int}) if "epoch" in frame else frame


def read_history(run_dir):
    """history.csv as a list of dicts, numbers parsed."""
    return history_frame(run_dir).to_dict("records")


def fit(
    model, pipelines, run_dir, *, phase, epochs, initial_epoch=0,
    early_stopping_patience=0, verbose=1, callbacks=(),
):  # fmt: skip
    """`model.fit` with `callbacks`, then the run's. Called again, it goes on from
    backup/<phase>, drops the history rows the backup lacks, and early stopping counts
    the phase's earlier epochs. Ctrl-C raises Interrupted; divergence, ConfigError."""
    run_dir = Path(run_dir)
    backup_dir = run_dir / "backup" / phase
    metadata = backup_dir / "training_metadata.json"
    start = settings.read_json(metadata)["epoch"] if metadata.is_file() else initial_epoch
    history = history_frame(run_dir)
    # model.keras may come from a row about to be dropped: a later epoch must beat it.
    best = float(history["val_accuracy"].max()) if len(history) else None
    if len(history):  # drop the rows the backup does not hold, and any half-written one
        kept = history[(history["phase"] != phase) | (history["epoch"] < start)]
        if len(kept) < len((run_dir / "history.csv").read_text().splitlines()) - 1:
            settings.write_text(run_dir / "history.csv", kept.to_csv(index=False))
    callbacks = [
        *callbacks,
        DivergenceGuard(),
        Checkpoint(run_dir / "model.keras", best),
        History(run_dir / "history.csv", phase, pipelines.images_per_epoch),
    ]
    if early_stopping_patience:
        earlier = [row for row in read_history(run_dir) if row["phase"] == phase]
        stopper = EarlyStopping(early_stopping_patience, earlier)
        stopper.set_model(model)
        stopper.on_train_begin()
        if stopper.stopped_epoch:
            stopped = stopper.stopped_epoch + 1
            print(f"{phase}: early stopping ended this phase after epoch {stopped}")
            return
        callbacks.append(stopper)
    callbacks.append(Backup(str(backup_dir), delete_checkpoint=False))
    # Keras 3.15.1: BackupAndRestore sets model._initial_epoch and nothing clears it,
    # so a later phase without a backup would start where the previous one was restored.
    model._initial_epoch = None
    try:
        # steps_per_epoch keeps one iterator for the whole fit: Keras 3.15.1 otherwise
        # makes one an epoch, and tearing one down waits for its tf.data autotuning.
        model.fit(
            pipelines.train, validation_data=pipelines.validation, epochs=epochs,
            initial_epoch=initial_epoch, steps_per_epoch=pipelines.steps_per_epoch,
            callbacks=callbacks, shuffle=False, verbose=verbose,
        )  # fmt: skip
    except KeyboardInterrupt:
        raise settings.Interrupted(
            f"interrupted; best checkpoint and history kept in {run_dir}. "
            f"Resume with: python {run_dir.parent.name}.py --resume={run_dir}"
        ) from None
    except Diverged as diverged:
        done = len(history_frame(run_dir))
        kept = f"its state after epoch {done}, the last finite one, is kept in {run_dir}"
        if not done:
            kept = f"it had finished no epoch ({run_dir})"
        raise settings.ConfigError(
            f"training diverged in epoch {diverged.args[0] + 1} (NaN or inf); {kept}. "
            f"Start a new run with a lower learning rate"
        ) from None


# ---------------------------------------------------------------------------------
# Evaluation: the best checkpoint on the test set, with test-time augmentation


def load_checkpoint(run_dir):
    """A finished run's model.keras, uncompiled; missing or unreadable is a DataError."""
    path = Path(run_dir) / "model.keras"
    if not path.is_file():
        raise settings.DataError(f"{path}: missing; train that run again")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # zip, HDF5 and deserialisation errors all land here
        reason = str(error).splitlines()[0] if str(error) else ""
        raise settings.DataError(
            f"{path}: cannot be loaded ({type(error).__name__}: {reason})"
        ) from None


def predict_tta(model, dataset, tta="none"):
    """({level: probabilities}, one-hot labels) for each test-time augmentation level up
    to `tta`: "none", "flip" (with mirror images), airbench's "crops" (1-pixel shifts)."""
    # AutoGraph would reread each lambda's source by line number: after an edit of this
    # file during a run, another line's lambda. These maps need none of its conversion.
    plain = tf.autograph.experimental.do_not_convert
    images = dataset.map(plain(lambda images, labels: images))

    def predict(views, mirror=False):
        views = views.map(plain(lambda x: tf.reverse(x, [2]))) if mirror else views
        return model.predict(views, verbose=0)

    levels = {"none": predict(images)}
    if tta != "none":
        levels["flip"] = (levels["none"] + predict(images, mirror=True)) / 2
    if tta == "crops":
        one_pixel = [[0, 0], [1, 1], [1, 1], [0, 0]]  # around each image of a batch
        padded = images.map(plain(lambda x: tf.pad(x, one_pixel, "REFLECT")))
        shifts = [plain(lambda x: x[:, :-2, :-2]), plain(lambda x: x[:, 2:, 2:])]
        crops = [padded.map(shift) for shift in shifts]  # top left, bottom right
        views = [predict(crop, mirror) for crop in crops for mirror in (False, True)]
        levels["crops"] = levels["flip"] / 2 + sum(views) / 8
    labels = np.concatenate([labels.numpy() for _, labels in dataset])
    return levels, labels


def finish(run_dir, model, test_data, label_smoothing=0.0, tta="none"):
    """Test the best checkpoint once, write metrics.json (the run is finished) with the
    accuracy at each TTA level up to `tta`, so runs compare alike, and drop the backup."""
    if not (run_dir / "model.keras").is_file():
        model.save(run_dir / "model.keras")
    best = load_checkpoint(run_dir)
    levels, labels = predict_tta(best, test_data, tta)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    accuracy = {
        level: float(np.mean(probabilities.argmax(1) == labels.argmax(1)))
        for level, probabilities in levels.items()
    }
    history = history_frame(run_dir)
    metrics = {
        "test_accuracy": accuracy[tta],
        "test_loss": float(loss(labels, levels[tta])),
        "tta": tta,
        **{f"test_accuracy_tta_{level}": value for level, value in accuracy.items()},
        "best_val_accuracy": float(history["val_accuracy"].max()),
        "epochs": len(history),
        "train_seconds": round(float(history["epoch_seconds"].sum()), 1),
        # The median epoch, so the first epoch's graph tracing does not count.
        "images_per_second": float(history["images_per_second"].median()),
        "params": int(best.count_params()),
    }
    settings.write_json(run_dir / "metrics.json", metrics)
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    print(
        f"test accuracy {metrics['test_accuracy']:.4f} (test-time augmentation: {tta}), "
        f"test loss {metrics['test_loss']:.4f}, {metrics['epochs']} epochs in "
        f"{metrics['train_seconds']:.0f} s "
        f"({metrics['images_per_second']:.0f} images/s); run folder {run_dir}"
    )
    return metrics
