"""A finished run as TensorFlow Lite models for phones and small boards, each measured
for what it costs (size, latency) and what it keeps (test accuracy, agreement with Keras).

    python export.py                                           # newest finished runs
    python export.py --run=runs/scratch_cnn/20250101-120000    # one chosen run
    python export.py --forms=float32,int8 --latency_runs=1000  # two forms, steadier

Writes RUN/export/ whole or not at all: a .tflite file per form; export.md, .csv and .json
with each form's size, accuracy, agreement, latency. Results: the README's Deploy section.
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
from pathlib import Path

import keras
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
# Data: the finished runs to export


def runs_to_export(out_dir, chosen):
    """The finished run `chosen` (else exit 2), or each script's newest (none: exit 3)."""
    if chosen:
        return [settings.finished_run(chosen, f"--run={chosen}")]
    runs = []
    for script in ("scratch_cnn", "transfer_mobilenetv2"):
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


# ---------------------------------------------------------------------------------
# Model: the Keras model to each TensorFlow Lite form, and each form measured


def convert(model, form, calibration):
    """The `form` of the Keras `model` as .tflite bytes, or a DataError naming it."""
    # TensorFlow Lite cannot convert the bfloat16 ops of a mixed-precision run
    # (MIXED_PRECISION, "auto" on AMX): a float32 copy of it, same weights, converts.
    if any(layer.dtype_policy.name != "float32" for layer in model.layers):
        float32 = keras.models.clone_model(
            model,
            clone_function=lambda layer: layer.__class__.from_config(
                {**layer.get_config(), "dtype": "float32"}
            ),
        )
        float32.set_weights(model.get_weights())
        model = float32
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if form != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if form == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if form == "int8":
        converter.representative_dataset = lambda: ([x[None]] for x, _ in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.int8
    try:
        # Keras prints the signature of the SavedModel the converter goes through, and
        # the int8 converter asks for input statistics the calibration already gives.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Statistics for quantized inputs")
            return converter.convert()
    except Exception as error:  # noqa: BLE001 - the converter raises many kinds
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        raise settings.DataError(f"the {form} conversion failed ({reason})") from None


def lite_runner(path, threads):
    """A function: float32 batch -> raw outputs (argmax needs no dequantizing)."""
    interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=threads)
    given = interpreter.get_input_details()[0]
    output = interpreter.get_output_details()[0]
    allocated = []  # the batch shape the interpreter is allocated for

    def run(images):
        if allocated != [images.shape]:
            interpreter.resize_tensor_input(given["index"], images.shape)
            interpreter.allocate_tensors()
            allocated[:] = [images.shape]
        if given["dtype"] == np.int8:  # quantized with the model's own scale
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


def child():
    """Print the ms per image of the Keras model of a run (argv) on one thread."""
    run_dir, warmup, runs = sys.argv[1:]
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    model = training.load_checkpoint(run_dir)
    image = np.zeros((1, *model.input_shape[1:]), np.float32)  # as costly as any image
    print(median_ms(tf.function(model), image, int(warmup), int(runs)))


def measure(run, files, test_data, config):
    """The export table: Keras and each form's (`files`) size, accuracy, agreement, ms."""
    levels, one_hot = training.predict_tta(run["model"], test_data)
    labels, predicted = one_hot.argmax(axis=1), {"keras": levels["none"].argmax(axis=1)}
    image = next(iter(test_data))[0][:1].numpy()  # one preprocessed test image
    timing = (image, config["WARMUP_RUNS"], config["LATENCY_RUNS"])
    # Keras timed as a deployed TensorFlow model runs it: a compiled tf.function; on one
    # thread in a fresh Python (TensorFlow sizes its thread pools once, when it starts).
    latency = {"keras": [None, median_ms(tf.function(run["model"]), *timing)]}
    if config["KERAS_ONE_THREAD"]:
        arguments = map(str, [run["dir"].resolve(), *timing[1:]])
        command = [sys.executable, "-c", "import export; export.child()", *arguments]
        output = lambda: subprocess.check_output(command, cwd=Path(__file__).parent)
        latency["keras"][0] = float(settings.quietly(output).split()[-1])
    for form, path in list(files.items())[1:]:  # each form after Keras
        runner, one_thread = lite_runner(path, CORES), lite_runner(path, 1)
        batches = [runner(images.numpy()).argmax(axis=1) for images, _ in test_data]
        predicted[form] = np.concatenate(batches)
        latency[form] = [median_ms(one_thread, *timing), median_ms(runner, *timing)]
    rows = [
        (name, path.name, path.stat().st_size / 1e6, np.mean(predicted[name] == labels))
        + (np.mean(predicted[name] == predicted["keras"]), *latency[name])
        for name, path in files.items()
    ]
    return pd.DataFrame(rows, columns=["form", "file", *MEASURES]).assign(all_cores=CORES)


# ---------------------------------------------------------------------------------
# Save/Report: export.md, .csv and .json in a new folder, swapped in whole; main()


def export_markdown(run, frame, pipelines, config, command):
    """export.md: a title, how it was measured, the table (Keras first), each form."""
    header = ["form", "file", "size, MB", "test accuracy", "agrees with Keras"]
    header += ["ms/image, 1 thread", f"ms/image, all cores ({frame['all_cores'][0]})"]
    specs = ["{}", "`{}`", "{:.3f}", "{:.2%}", "{:.2%}", "{:.3f}", "{:.3f}"]  # per column
    rows = [[spec.format(cell) for spec, cell in zip(specs, row)] for row in frame.values]
    saved, tta = run["saved"], run["metrics"].get("tta", "none")
    augmented = f" (the run's own test accuracy is with {tta})" if tta != "none" else ""
    source, marker, rest = pipelines.source.partition(" (class folders")
    calibrated = min(config["CALIBRATION_IMAGES"], pipelines.sizes["train"])
    forms = "\n".join(f"- `{form}`: {FORM_DESCRIPTIONS[form]}" for form in frame.form[1:])
    table = settings.markdown_table(header, rows).replace(" nan |", " not measured |")
    return (
        f"# TensorFlow Lite: {settings.model_name(saved['script'], saved['config'])}"
        f", run `{settings.shown(run['dir'])}`\n\n"
        f"Made by `{command}` on {pd.Timestamp.now():%Y-%m-%d %H:%M} ({saved['script']}, "
        f"{saved['config']['IMG_SIZE']} px, inputs in {list(saved['value_range'])}). "
        f"Test set: all {pipelines.sizes['test']:,} images from `{settings.shown(source)}"
        f"{marker}{rest}`, preprocessed as the run was; agreement is the share of test "
        "images whose predicted class equals the Keras model's. Every figure, Keras's "
        f"too, is single-pass, without test-time augmentation{augmented}.\n\n"
        f"Latency: median of {config['LATENCY_RUNS']} single-image invocations after "
        f"{config['WARMUP_RUNS']} warm-up ones, input already preprocessed, on "
        f"{settings.cpu_name()}, {CORES} cores, TensorFlow {tf.__version__}: TensorFlow "
        "Lite through `tf.lite.Interpreter` and its default CPU delegate, Keras as a "
        "compiled `tf.function`. `model.keras` holds the optimizer state too.\n\n"
        f"{table}\n\n{forms.format(calibrated=calibrated)}\n"
    )


def export_run(run, forms, config, command):
    """RUN/export/ for one run, built beside the old one and swapped in once complete."""
    # The run's data as training split and scaled it; calibration images from its
    # shuffled training pipeline with augmentation off, so they look like test images.
    off = {name: 0 for name in run["saved"]["config"] if name.startswith("AUGMENT_")}
    trained = {**run["saved"]["config"], **off, "AUGMENT_FLIP": "none"}
    trained["DATA_DIR"] = config["DATA_DIR"] or trained["DATA_DIR"]
    pipelines = data.pipelines_for(trained, tuple(run["saved"]["value_range"]))
    calibration = pipelines.train.unbatch().take(config["CALIBRATION_IMAGES"])
    build = Path(tempfile.mkdtemp(prefix=".export-", dir=run["dir"]))
    shown = settings.shown(run["dir"])
    try:
        files = {"keras": run["dir"] / "model.keras"}
        for form in forms:
            print(f"{shown}: converting to {form}")
            files[form] = build / f"{form}.tflite"
            files[form].write_bytes(convert(run["model"], form, calibration))
        print(f"{shown}: measuring, {pipelines.sizes['test']:,} test images")
        frame = measure(run, files, pipelines.test, config)
        summary = frame.set_index("form")[list(MEASURES)].stack().dropna()
        summary.index = [f"{form}_{name}" for form, name in summary.index]
        settings.write_json(build / "export.json", summary.to_dict())
        settings.write_text(build / "export.csv", frame.to_csv(index=False))
        text = export_markdown(run, frame, pipelines, config, command)
        settings.write_text(build / "export.md", text)
        final, old = run["dir"] / "export", run["dir"] / f".export-old-{os.getpid()}"
        if final.exists():
            final.rename(old)
        build.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone already when it succeeded
    table = "\n".join(line for line in text.splitlines() if line.startswith("| "))
    print(f"wrote {settings.shown(final)}/\n{table}")
    return frame


def main(argv):
    config = training.configure(CONFIG, argv)
    forms = check_config(config)
    # Every run checked and its model loaded before anything is written.
    runs = [
        {"dir": run_dir, "saved": settings.read_json(run_dir / "config.json"),
         "metrics": settings.read_json(run_dir / "metrics.json"),
         "model": training.load_checkpoint(run_dir)}
        for run_dir in runs_to_export(config["OUT_DIR"], config["RUN"])
    ]  # fmt: skip
    words = [
        f"--{flag}={settings.shown(text) if flag in PATH_SETTINGS and text else text}"
        for flag, text in settings.split_arguments(argv, ["keras_one_thread"])
    ]
    command = shlex.join(["python", "export.py", *words])
    return {run["dir"]: export_run(run, forms, config, command) for run in runs}


if __name__ == "__main__":
    settings.cli(main)
