"""A finished run as TensorFlow Lite models for phones and small boards, each measured
for what it costs (file size, latency on this CPU) and what it keeps (test accuracy,
agreement with the Keras model).

    python export.py                                        # newest finished run of each
    python export.py --run=runs/scratch_cnn/20250101-120000 # one chosen run
    python export.py --latency_runs=1000                    # steadier latency figures

Writes into RUN/export/: float32.tflite; float16.tflite (float16 weights);
dynamic_int8.tflite (int8 weights, float activations); int8.tflite (int8 weights and
activations, int8 input and output, calibrated on CALIBRATION_IMAGES training images
through the run's own preprocessing); export.md and export.csv, the table: per form and
for the Keras model, file size, accuracy on the run's whole test set, agreement with the
Keras model's predictions, and median latency per image with 1 thread and all cores.

Result: the full-data scratch CNN (CIFAR-10, JPEG copy) keeps its 83.6% test accuracy
within 0.07 points in every form; int8 is 0.48 MB against 1.84 MB float32, about 1.2 ms
an image on one AMD EPYC core (README, Deploy).
An existing export/ is replaced only once every form has converted.
"""

import settings

settings.check_command_line(__name__, __file__)  # --help, bad flags: before TF loads

import contextlib
import csv
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import data
import training

# ---------------------------------------------------------------------------------
# Config (python export.py --name=value overrides any of these)

OUT_DIR = "runs"  # where the training scripts leave runs: OUT_DIR/<script>/<timestamp>/
RUN = ""  # a finished run folder; "" = the newest finished run of each training script
DATA_DIR = ""  # CIFAR-10 folder or .tar.gz; "" = the DATA_DIR the run was trained on
CALIBRATION_IMAGES = 500  # training images that set the int8 activation ranges
WARMUP_RUNS = 20  # single-image invocations before timing starts
LATENCY_RUNS = 200  # timed single-image invocations per form and thread count: median
FORMS = "float32,float16,dynamic_int8,int8"  # the forms to make, comma-separated
KERAS_ONE_THREAD = True  # also time Keras on 1 thread (a child process, ~10 s of CPU)
CONFIG = settings.config_block(globals())  # the settings above: defaults for overrides

SCRIPTS = ("scratch_cnn", "transfer_mobilenetv2")  # the training scripts, in order
FORM_DESCRIPTIONS = {
    # file stem: what it is, as export.md explains it
    "float32": "float32 weights and activations: the Keras model, converted",
    "float16": "float16 weights (half the size), computed in float32 on a CPU",
    "dynamic_int8": "int8 weights, float activations (dynamic range quantization)",
    "int8": "int8 weights and activations, int8 input and output (full integer)",
}
EXPORT_FOLDER = "export"  # inside the run folder
CSV_COLUMNS = (
    "form",
    "file",
    "megabytes",
    "test_accuracy",
    "agreement_with_keras",
    "ms_per_image_1_thread",
    "ms_per_image_all_cores",
    "all_cores",
)


# ---------------------------------------------------------------------------------
# Runs: find them, check them, load their models


def find_runs(out_dir, chosen):
    """The run folder `chosen` names, else the newest finished run of each training
    script in `out_dir`, with a hint line for each script that has none."""
    if chosen:
        return [Path(chosen).expanduser()], []
    runs, hints = [], []
    for script in SCRIPTS:
        finished = training.list_runs(out_dir, script, finished=True)
        if finished:
            runs.append(finished[-1])
        else:
            hints.append(f"no finished {script} run in {Path(out_dir)}/ to export")
    if not runs:
        raise settings.DataError(
            f"no finished runs in {Path(out_dir)}/ to export; train one with "
            "python scratch_cnn.py or python transfer_mobilenetv2.py, or pass --run="
        )
    return runs, hints


def read_run(run_dir):
    """config.json of a finished run, with what rebuilding its data needs; else a
    DataError (exit 3) saying what is wrong."""
    if not (run_dir / "config.json").is_file():
        raise settings.DataError(
            f"{run_dir}: not a run folder (no config.json); runs are in "
            "OUT_DIR/<script>/<timestamp>/"
        )
    if not (run_dir / "metrics.json").is_file():
        raise settings.DataError(
            f"{run_dir}: that run has not finished (no metrics.json); finish it with "
            f"python <script>.py --resume={run_dir}"
        )
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        saved["config"]["IMG_SIZE"], saved["value_range"]
    except (OSError, ValueError, KeyError, TypeError):
        raise settings.DataError(
            f"{run_dir / 'config.json'}: unreadable, or no IMG_SIZE or value_range; "
            "train that run again with the current scripts"
        ) from None
    return saved


# ---------------------------------------------------------------------------------
# Data: the run's own split and preprocessing, rebuilt from its config.json


def run_pipelines(saved, data_dir):
    """The run's pipelines as training built them (same source, split, image size and
    value range), with augmentation off so calibration images look like test images."""
    config = dict(saved["config"])
    if data_dir:
        config["DATA_DIR"] = data_dir
    for name, value in config.items():
        if name.startswith("AUGMENT_"):
            config[name] = type(value)()  # False or 0: off
    return data.pipelines_for(config, tuple(saved["value_range"]))


def calibration_images(train_data, count):
    """float32 (count, S, S, 3): the first `count` images of the (shuffled, seeded)
    training pipeline, never test images."""
    batches, total = [], 0
    for images, _ in train_data:
        batches.append(images.numpy())
        total += len(batches[-1])
        if total >= count:
            break
    return np.concatenate(batches)[:count]


# ---------------------------------------------------------------------------------
# Convert: the Keras model to each TensorFlow Lite form


def convert(model, form, calibration):
    """The `form` of the Keras `model` as .tflite bytes; a conversion that fails is a
    DataError naming the form."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if form != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if form == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if form == "int8":

        def representative_dataset():
            for image in calibration:
                yield [image[None]]

        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        # Keras prints the signature of the SavedModel the converter goes through,
        # once a form; and the int8 converter asks for input statistics that the
        # representative dataset already gives it. Neither says anything here.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Statistics for quantized inputs")
            return converter.convert()
    except Exception as error:
        raise settings.DataError(
            f"the {form} conversion failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
        ) from None


# ---------------------------------------------------------------------------------
# Measure: accuracy and agreement on the test set, latency per image


class Lite:
    """A .tflite model ready to run float32 images of the run's preprocessing: int8
    inputs are quantized with the model's own input scale and zero point."""

    def __init__(self, model_bytes, threads):
        self.interpreter = tf.lite.Interpreter(
            model_content=model_bytes, num_threads=threads
        )
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = None

    def quantize(self, images):
        if self.input["dtype"] != np.int8:
            return images.astype(self.input["dtype"])
        scale, zero_point = self.input["quantization"]
        quantized = np.round(images / scale + zero_point)
        return np.clip(quantized, -128, 127).astype(np.int8)

    def __call__(self, images):
        """Raw outputs (int8 for the int8 form; the argmax needs no dequantizing)."""
        if len(images) != self.batch:
            self.interpreter.resize_tensor_input(self.input["index"], images.shape)
            self.interpreter.allocate_tensors()
            self.batch = len(images)
        self.interpreter.set_tensor(self.input["index"], self.quantize(images))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])


def predict_test_set(model, lite_models, test_data):
    """(labels, {"keras" and each form: predicted classes}) over the whole test set,
    one batch at a time so a large set at 96 px never sits in memory in float32."""
    labels, predicted = [], {name: [] for name in ["keras", *lite_models]}
    for images, one_hot in test_data:
        images = images.numpy()
        labels.append(one_hot.numpy().argmax(axis=1))
        predicted["keras"].append(model.predict_on_batch(images).argmax(axis=1))
        for form, lite in lite_models.items():
            predicted[form].append(lite(images).argmax(axis=1))
    return np.concatenate(labels), {
        name: np.concatenate(values) for name, values in predicted.items()
    }


def median_milliseconds(call, image, warmup, runs):
    """Median wall time of `call(image)` in ms, over `runs` calls after `warmup`."""
    for _ in range(warmup):
        call(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call(image)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def keras_serving(model):
    """The Keras model as a deployed TensorFlow model runs: a compiled tf.function
    from a float32 batch to numpy probabilities."""
    serve = tf.function(lambda batch: model(batch, training=False))
    return lambda batch: serve(batch).numpy()


def keras_latency_one_thread(model_path, image, warmup, runs):
    """ms per image of the Keras model on one thread, in a fresh Python: TensorFlow
    fixes its thread pools when it starts, so this process cannot change them."""
    with tempfile.TemporaryDirectory(prefix="export-latency-") as folder:
        image_path = Path(folder) / "image.npy"
        np.save(image_path, image)
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; sys.path.insert(0, sys.argv[1]); import export; "
                "print(export.one_thread_keras_latency(*sys.argv[2:]))",
                str(Path(__file__).resolve().parent),
                str(model_path),
                str(image_path),
                str(warmup),
                str(runs),
            ],
            capture_output=True,
            text=True,
        )
    if child.returncode != 0:
        raise RuntimeError(f"timing Keras on one thread failed:\n{child.stderr}")
    return float(child.stdout.split()[-1])


def one_thread_keras_latency(model_path, image_path, warmup, runs):
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    model = keras.models.load_model(model_path, compile=False)
    return median_milliseconds(
        keras_serving(model), np.load(image_path), int(warmup), int(runs)
    )


def all_cores():
    """The cores this process may run on (its CPU affinity), which can be fewer than
    the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------
# Save/Report: export.md and export.csv, then the folder swapped in whole


def csv_text(rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def milliseconds(value):
    return "not measured" if value is None else f"{value:.3f}"


def table_markdown(rows):
    """The export table: one row per form, the Keras model first."""
    cores = rows[0]["all_cores"]
    header = [
        "form",
        "file",
        "size, MB",
        "test accuracy",
        "agrees with Keras",
        "ms/image, 1 thread",
        f"ms/image, all cores ({cores})",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        lines.append(
            f"| {row['form']} | `{row['file']}` | {row['megabytes']:.3f} | "
            f"{row['test_accuracy']:.2%} | {row['agreement_with_keras']:.2%} | "
            f"{milliseconds(row['ms_per_image_1_thread'])} | "
            f"{milliseconds(row['ms_per_image_all_cores'])} |"
        )
    return "\n".join(lines)


def export_markdown(run_dir, saved, rows, facts):
    """export.md: a title line, how it was measured, the table, what each form is."""
    config = saved["config"]
    forms = [row["form"] for row in rows[1:]]
    notes = [
        f"# TensorFlow Lite export of `{run_dir}`",
        (
            f"Made by `{facts['command']}` on {datetime.now():%Y-%m-%d %H:%M} "
            f"({saved.get('script', 'run')}, {config['IMG_SIZE']} px, inputs in "
            f"{list(saved['value_range'])}). Test set: all {facts['test_images']:,} "
            f"images from `{facts['source']}`, preprocessed as the run was; agreement "
            "is the share of test images whose predicted class equals the Keras "
            "model's."
            + (
                f" The int8 model was calibrated on {facts['calibration_images']} "
                "training images and is fed test images quantized with its own input "
                "scale and zero point."
                if "int8" in forms
                else ""
            )
        ),
        (
            f"Latency: median of {facts['latency_runs']} single-image invocations after "
            f"{facts['warmup_runs']} warm-up ones, input already preprocessed, on "
            f"{facts['machine']}. TensorFlow Lite through `tf.lite.Interpreter` and "
            "its default CPU delegate; Keras as a compiled `tf.function`. "
            "`model.keras` holds the optimizer state too, so its size overstates "
            "the model."
        ),
        table_markdown(rows),
        "\n".join(f"- `{form}`: {FORM_DESCRIPTIONS[form]}" for form in forms),
    ]
    if config.get("TTA_FLIP"):
        notes.append(
            "The run evaluates with test-time flips (TTA_FLIP); these figures are the "
            "plain model's, one pass per image."
        )
    return "\n\n".join(notes) + "\n"


def replace_folder(built, target):
    """Put the finished folder `built` at `target`; an earlier one goes only after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        target.rename(old)
    built.rename(target)
    if old is not None:
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------
# main: python export.py


def export_run(run_dir, saved, model, config, command):
    """Convert, measure and write RUN/export/ for one run; returns the table rows."""
    pipelines = run_pipelines(saved, config["DATA_DIR"])
    calibration = calibration_images(pipelines.train, config["CALIBRATION_IMAGES"])
    cores = all_cores()
    build = Path(tempfile.mkdtemp(prefix=f".{EXPORT_FOLDER}-", dir=run_dir))
    try:
        forms = {}
        for form in chosen_forms(config["FORMS"]):
            print(f"{run_dir}: converting to {form}")
            forms[form] = convert(model, form, calibration)
            (build / f"{form}.tflite").write_bytes(forms[form])

        print(f"{run_dir}: predicting {pipelines.sizes['test']:,} test images")
        lite_models = {form: Lite(forms[form], cores) for form in forms}
        labels, predicted = predict_test_set(model, lite_models, pipelines.test)
        image = next(iter(pipelines.test))[0].numpy()[:1]

        print(f"{run_dir}: timing {config['LATENCY_RUNS']} single images per form")
        timing = dict(warmup=config["WARMUP_RUNS"], runs=config["LATENCY_RUNS"])
        latency = {
            "keras": (
                (
                    keras_latency_one_thread(run_dir / "model.keras", image, **timing)
                    if config["KERAS_ONE_THREAD"]
                    else None
                ),
                median_milliseconds(keras_serving(model), image, **timing),
            )
        }
        for form in forms:
            latency[form] = tuple(
                median_milliseconds(Lite(forms[form], threads), image, **timing)
                for threads in (1, cores)
            )

        files = {"keras": run_dir / "model.keras"}
        files.update({form: build / f"{form}.tflite" for form in forms})
        rows = [
            {
                "form": name,
                "file": files[name].name,
                "megabytes": files[name].stat().st_size / 1e6,
                "test_accuracy": float(np.mean(predicted[name] == labels)),
                "agreement_with_keras": float(
                    np.mean(predicted[name] == predicted["keras"])
                ),
                "ms_per_image_1_thread": latency[name][0],
                "ms_per_image_all_cores": latency[name][1],
                "all_cores": cores,
            }
            for name in files
        ]
        facts = {
            "command": command,
            "test_images": len(labels),
            "source": pipelines.source,
            "calibration_images": len(calibration),
            "latency_runs": config["LATENCY_RUNS"],
            "warmup_runs": config["WARMUP_RUNS"],
            "machine": (
                f"{training.cpu_name()}, {cores} cores, TensorFlow {tf.__version__}"
            ),
        }
        (build / "export.csv").write_text(csv_text(rows))
        (build / "export.md").write_text(export_markdown(run_dir, saved, rows, facts))
        replace_folder(build, run_dir / EXPORT_FOLDER)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone already when it succeeded
    return rows


def chosen_forms(text):
    """The forms --forms names, in the table's order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FORM_DESCRIPTIONS]
    settings.require(
        names and not unknown,
        f"--forms takes a comma-separated list of {', '.join(FORM_DESCRIPTIONS)}; "
        f"got {text!r}",
    )
    return [form for form in FORM_DESCRIPTIONS if form in names]


def main(argv):
    config = training.configure(CONFIG, argv)
    chosen_forms(config["FORMS"])
    for name in ("CALIBRATION_IMAGES", "LATENCY_RUNS"):
        settings.require(config[name] > 0, f"--{name.lower()} must be positive")
    settings.require(config["WARMUP_RUNS"] >= 0, "--warmup_runs must be 0 or more")
    run_dirs, hints = find_runs(config["OUT_DIR"], config["RUN"])
    for hint in hints:
        print(hint)
    # Every run checked and its model loaded before anything is written.
    runs = [(run_dir, read_run(run_dir), training.load_checkpoint(run_dir)) for run_dir in run_dirs]
    command = shlex.join(["python", "export.py", *argv])
    exported = {}
    for run_dir, saved, model in runs:
        rows = export_run(run_dir, saved, model, config, command)
        exported[run_dir] = rows
        print(f"wrote {run_dir / EXPORT_FOLDER}/")
        print(table_markdown(rows))
    return exported


if __name__ == "__main__":
    training.cli(main)
