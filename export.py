"""A finished run as TensorFlow Lite models for phones and small boards, each measured
for what it costs (size, latency) and what it keeps (test accuracy, agreement with Keras).

    python export.py                                           # newest finished runs
    python export.py --run=runs/scratch_cnn/20250101-120000    # one chosen run
    python export.py --forms=float32,int8 --latency_runs=1000  # two forms, steadier

Writes RUN/export/, whole or not at all: a .tflite file per form, and export.md, .csv and
.json: each form's size, test accuracy and agreement with Keras (one pass per image), and
latency per image on one thread and on all cores. Results: the README's Deploy section.
"""

import settings

settings.check_command_line(__name__, __file__)  # --help, bad flags: before TF loads

import contextlib
import io
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import timeit
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

import data
import training

# ---------------------------------------------------------------------------------
# Config (python export.py --name=value overrides any of these)

OUT_DIR = "runs"  # where the training scripts leave runs: OUT_DIR/<script>/<timestamp>/
RUN = ""  # a finished run folder; "" = the newest finished run of each training script
DATA_DIR = ""  # the run's data (folder or .tar.gz); "" = the DATA_DIR it was trained on
CALIBRATION_IMAGES = 500  # training images that set the int8 activation ranges
WARMUP_RUNS = 20  # single-image invocations before timing starts
LATENCY_RUNS = 200  # timed single-image invocations per form and thread count: median
FORMS = "float32,float16,dynamic_int8,int8"  # the forms to make, comma-separated
KERAS_ONE_THREAD = True  # also time Keras on 1 thread (a child process: seconds of CPU)
CONFIG = settings.config_block(globals())  # the settings above: defaults for overrides

SCRIPTS = ("scratch_cnn", "transfer_mobilenetv2")  # the training scripts, in order
FORM_DESCRIPTIONS = {  # file stem: what it is, as export.md explains it
    "float32": "float32 weights and activations: the Keras model, converted",
    "float16": "float16 weights (half the size), computed in float32 on a CPU",
    "dynamic_int8": "int8 weights, float activations (dynamic range quantization)",
    "int8": "int8 weights, activations, input and output (full integer), calibrated on "
    "{calibrated} training images; test images are quantized with its input scale",
}
# export.csv's columns after form and file; export.json holds "<form>_<measure>".
MEASURES = ("megabytes", "test_accuracy", "agreement", "ms_one_thread", "ms_all_cores")
PATH_SETTINGS = ("out_dir", "run", "data_dir")  # shown without machine paths in export.md
# "All cores": those this process may run on (its CPU affinity), maybe fewer than exist.
CORES = len(os.sched_getaffinity(0)) if sys.platform == "linux" else os.cpu_count()


def check_config(config):
    """Every setting, checked before TensorFlow loads; returns the forms, in order."""
    names = [name.strip() for name in config["FORMS"].split(",") if name.strip()]
    settings.require(
        names and all(name in FORM_DESCRIPTIONS for name in names),
        f"--forms takes a comma-separated list of {', '.join(FORM_DESCRIPTIONS)}; "
        f"got {config['FORMS']!r}",
    )
    for name in ("CALIBRATION_IMAGES", "LATENCY_RUNS"):
        settings.require(config[name] > 0, f"--{name.lower()} must be positive")
    settings.require(config["WARMUP_RUNS"] >= 0, "--warmup_runs must be 0 or more")
    return [form for form in FORM_DESCRIPTIONS if form in names]


# ---------------------------------------------------------------------------------
# Data: the runs, and each run's own split and preprocessing from its config.json


def runs_to_export(out_dir, chosen):
    """The finished run `chosen` names (else exit 2), or the newest finished run of each
    training script in `out_dir`; no run at all is exit 3."""
    if chosen:
        return [settings.finished_run(chosen, f"--run={chosen}")]
    runs = []
    for script in SCRIPTS:
        finished = settings.list_runs(out_dir, script, finished=True)
        runs += finished[-1:]
        if not finished:
            print(f"no finished {script} run in {Path(out_dir)}/ to export")
    if not runs:
        raise settings.DataError(
            f"no finished runs in {Path(out_dir)}/ to export; train one with "
            "python scratch_cnn.py or python transfer_mobilenetv2.py, or pass --run="
        )
    return runs


def run_data(saved, config):
    """The run's pipelines as training built them, and CALIBRATION_IMAGES images of its
    shuffled training pipeline with augmentation off, so they look like test images."""
    run_config = dict(saved["config"])
    for name in run_config:
        if name.startswith("AUGMENT_"):
            run_config[name] = "none" if name == "AUGMENT_FLIP" else 0  # off
    run_config["DATA_DIR"] = config["DATA_DIR"] or run_config["DATA_DIR"]
    pipelines = data.pipelines_for(run_config, tuple(saved["value_range"]))
    calibration = pipelines.train.unbatch().take(config["CALIBRATION_IMAGES"])
    return pipelines, np.stack([image for image, _ in calibration.as_numpy_iterator()])


# ---------------------------------------------------------------------------------
# Model: the Keras model to each TensorFlow Lite form, and each form measured


def convert(model, form, calibration):
    """The `form` of the Keras `model` as .tflite bytes, or a DataError naming it."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if form != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if form == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if form == "int8":
        converter.representative_dataset = lambda: ([x[None]] for x in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        # Keras prints the signature of the SavedModel the converter goes through, and
        # the int8 converter asks for input statistics the calibration already gives.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Statistics for quantized inputs")
            return converter.convert()
    except Exception as error:  # noqa: BLE001 - the converter raises many kinds
        reason = str(error).splitlines()[0] if str(error) else ""
        raise settings.DataError(
            f"the {form} conversion failed ({type(error).__name__}: {reason})"
        ) from None


def lite_runner(model_bytes, threads):
    """A function from a float32 batch to the .tflite model's raw outputs (the argmax
    needs no dequantizing); int8 inputs get the model's own scale and zero point."""
    interpreter = tf.lite.Interpreter(model_content=model_bytes, num_threads=threads)
    given = interpreter.get_input_details()[0]
    output = interpreter.get_output_details()[0]
    allocated = []  # the batch shape the interpreter is allocated for

    def run(images):
        if allocated != [images.shape]:
            interpreter.resize_tensor_input(given["index"], images.shape)
            interpreter.allocate_tensors()
            allocated[:] = [images.shape]
        if given["dtype"] == np.int8:
            scale, zero_point = given["quantization"]
            images = np.clip(np.round(images / scale + zero_point), -128, 127)
        interpreter.set_tensor(given["index"], images.astype(given["dtype"]))
        interpreter.invoke()
        return interpreter.get_tensor(output["index"])

    return run


def median_ms(call, image, warmup, runs):
    """Median wall time of `call(image)` in ms, over `runs` calls after `warmup`."""
    timeit.repeat(lambda: call(image), number=1, repeat=warmup)
    return 1000 * np.median(timeit.repeat(lambda: call(image), number=1, repeat=runs))


def keras_ms_one_thread(run_dir, warmup, runs):
    """ms per image of the run's Keras model on one thread, timed in a fresh Python
    (TensorFlow sizes its thread pools once, when it starts) without its notices."""
    arguments = ["-c", "import export; export.child()", run_dir.resolve(), warmup, runs]
    command = [sys.executable, *map(str, arguments)]
    timing = lambda: subprocess.check_output(command, cwd=Path(__file__).parent)
    return float(settings.quietly(timing).split()[-1])


def child():
    """keras_ms_one_thread's child: prints the ms per image of a run's model (argv)."""
    run_dir, warmup, runs = sys.argv[1:]
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    model = training.load_checkpoint(run_dir)
    image = np.zeros((1, *model.input_shape[1:]), np.float32)  # as costly as any image
    print(median_ms(tf.function(model), image, int(warmup), int(runs)))


def measure(run, files, lite, test_data, config):
    """The export table: for "keras" and each form (`lite`: .tflite bytes), file size,
    test accuracy and agreement with Keras (one pass per image), ms per image."""
    runners = {form: lite_runner(content, CORES) for form, content in lite.items()}
    labels, predicted = [], {name: [] for name in files}
    for images, one_hot in test_data:
        labels.append(one_hot.numpy().argmax(axis=1))
        predicted["keras"].append(run["model"].predict_on_batch(images).argmax(axis=1))
        for form, runner in runners.items():
            predicted[form].append(runner(images.numpy()).argmax(axis=1))
    labels = np.concatenate(labels)
    predicted = {name: np.concatenate(classes) for name, classes in predicted.items()}
    timing = (images.numpy()[:1], config["WARMUP_RUNS"], config["LATENCY_RUNS"])
    latency = {
        form: [median_ms(lite_runner(lite[form], 1), *timing), median_ms(runner, *timing)]
        for form, runner in runners.items()
    }
    # Keras timed as a deployed TensorFlow model runs it: a compiled tf.function.
    latency["keras"] = [None, median_ms(tf.function(run["model"]), *timing)]
    if config["KERAS_ONE_THREAD"]:
        latency["keras"][0] = keras_ms_one_thread(run["dir"], *timing[1:])
    rows = [
        (name, path.name, path.stat().st_size / 1e6, np.mean(predicted[name] == labels))
        + (np.mean(predicted[name] == predicted["keras"]), *latency[name])
        for name, path in files.items()
    ]
    return pd.DataFrame(rows, columns=["form", "file", *MEASURES]).assign(all_cores=CORES)


# ---------------------------------------------------------------------------------
# Save/Report: export.md, .csv and .json in a new folder, swapped in whole; main()


def shown(path):
    """`path` relative to the current folder when below it, else its last part."""
    path, here = Path(path).expanduser().resolve(), Path.cwd().resolve()
    return str(path.relative_to(here)) if path.is_relative_to(here) else path.name


def shown_command(argv):
    """The command line that made the export, its paths shown as shown() shows them."""
    words = ["python", "export.py"]
    for flag, text in settings.split_arguments(argv, ["keras_one_thread"]):
        text = shown(text) if flag in PATH_SETTINGS and text else text
        words.append(f"--{flag}={text}")
    return shlex.join(words)


def table_markdown(frame):
    """The export table: one row per form, the Keras model first."""
    header = ["form", "file", "size, MB", "test accuracy", "agrees with Keras"]
    header += ["ms/image, 1 thread", f"ms/image, all cores ({frame['all_cores'][0]})"]
    rows = [
        [row.form, f"`{row.file}`", f"{row.megabytes:.3f}", f"{row.test_accuracy:.2%}"]
        + [f"{row.agreement:.2%}", f"{row.ms_one_thread:.3f}", f"{row.ms_all_cores:.3f}"]
        for row in frame.itertuples()
    ]
    return settings.markdown_table(header, rows).replace(" nan |", " not measured |")


def export_markdown(run, frame, pipelines, config, command):
    """export.md: a title line, how it was measured, the table, what each form is."""
    saved, tta = run["saved"], run["metrics"].get("tta", "none")
    augmented = f" (the run's own test accuracy is with {tta})" if tta != "none" else ""
    source, marker, rest = pipelines.source.partition(" (class folders")
    calibrated = min(config["CALIBRATION_IMAGES"], pipelines.sizes["train"])
    notes = [
        f"# TensorFlow Lite: {settings.model_name(saved['script'], saved['config'])}"
        f", run `{shown(run['dir'])}`",
        f"Made by `{command}` on {datetime.now():%Y-%m-%d %H:%M} ({saved['script']}, "
        f"{saved['config']['IMG_SIZE']} px, inputs in {list(saved['value_range'])}). "
        f"Test set: all {pipelines.sizes['test']:,} images from `{shown(source)}"
        f"{marker}{rest}`, preprocessed as the run was; agreement is the share of test "
        "images whose predicted class equals the Keras model's. Every figure, Keras's "
        f"too, is single-pass, without test-time augmentation{augmented}.",
        f"Latency: median of {config['LATENCY_RUNS']} single-image invocations after "
        f"{config['WARMUP_RUNS']} warm-up ones, input already preprocessed, on "
        f"{settings.cpu_name()}, {CORES} cores, TensorFlow {tf.__version__}: TensorFlow "
        "Lite through `tf.lite.Interpreter` and its default CPU delegate, Keras as a "
        "compiled `tf.function`. `model.keras` holds the optimizer state too.",
        table_markdown(frame),
        "\n".join(
            f"- `{form}`: " + FORM_DESCRIPTIONS[form].format(calibrated=calibrated)
            for form in frame["form"][1:]
        ),
    ]
    return "\n\n".join(notes) + "\n"


def export_run(run, forms, config, command):
    """Convert, measure and write RUN/export/ for one run; returns the table. The new
    folder is built beside the old one, which it replaces only once complete."""
    pipelines, calibration = run_data(run["saved"], config)
    build = Path(tempfile.mkdtemp(prefix=".export-", dir=run["dir"]))
    try:
        files, lite = {"keras": run["dir"] / "model.keras"}, {}
        for form in forms:
            print(f"{shown(run['dir'])}: converting to {form}")
            lite[form] = convert(run["model"], form, calibration)
            files[form] = build / f"{form}.tflite"
            files[form].write_bytes(lite[form])
        print(f"{shown(run['dir'])}: measuring, {pipelines.sizes['test']:,} test images")
        frame = measure(run, files, lite, pipelines.test, config)
        summary = frame.set_index("form")[list(MEASURES)].stack().dropna()
        summary.index = [f"{form}_{name}" for form, name in summary.index]
        settings.write_json(build / "export.json", summary.to_dict())
        settings.write_text(build / "export.csv", frame.to_csv(index=False))
        markdown = export_markdown(run, frame, pipelines, config, command)
        settings.write_text(build / "export.md", markdown)
        old = run["dir"] / f".export-old-{os.getpid()}"
        if (run["dir"] / "export").exists():
            (run["dir"] / "export").rename(old)
        build.rename(run["dir"] / "export")
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone already when it succeeded
    print(f"wrote {shown(run['dir'] / 'export')}/\n{table_markdown(frame)}")
    return frame


def main(argv):
    config = training.configure(CONFIG, argv)
    forms = check_config(config)
    # Every run checked and its model loaded before anything is written.
    runs = [
        {
            "dir": run_dir,
            "saved": settings.read_json(run_dir / "config.json"),
            "metrics": settings.read_json(run_dir / "metrics.json"),
            "model": training.load_checkpoint(run_dir),
        }
        for run_dir in runs_to_export(config["OUT_DIR"], config["RUN"])
    ]
    command = shown_command(argv)
    return {run["dir"]: export_run(run, forms, config, command) for run in runs}


if __name__ == "__main__":
    training.cli(main)
