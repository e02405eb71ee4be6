"""Compare the finished runs of scratch_cnn.py and transfer_mobilenetv2.py on the
CIFAR-10 test set: the report's accuracy, loss curves, confusion matrices and table,
measured, with per-class accuracy, mistakes, calibration and inference speed added.

    python evaluate.py                                   # newest finished run of each
    python evaluate.py --scratch_run=runs/scratch_cnn/20250101-120000   # a chosen run
    python evaluate.py --data_dir=~/data --plots_dir=/tmp/plots   # test data, output

Writes into plots/: report.md (every figure and table on one page, ready to read on
GitHub), comparison.md and comparison.csv (the report's table, measured), the figures
that plots/README.md names, and per-model classification reports and confusion counts.
Every setting of a model comes from its run's config.json; the test set is predicted
once per model and those probabilities feed every figure and table. Inference times
are measured on the machine that runs this script.
"""

import settings

settings.check_command_line(__name__, __file__)  # --help, bad flags: before TF loads

import csv
import io
import json
import math
import os
import platform
import shlex
import time
from datetime import datetime
from pathlib import Path

import keras
import matplotlib

matplotlib.use("Agg")  # files only: never open a window

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import tensorflow as tf
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
)

import data
import training

# ---------------------------------------------------------------------------------
# Config (python evaluate.py --name=value overrides any of these)

OUT_DIR = "runs"  # where the training scripts leave runs: OUT_DIR/<script>/<timestamp>/
SCRATCH_RUN = ""  # a finished scratch_cnn run folder; "" = the newest in OUT_DIR
TRANSFER_RUN = ""  # a finished transfer_mobilenetv2 run folder; "" = the newest
DATA_DIR = ""  # CIFAR-10 or class folders for the test set; "" = each run's DATA_DIR
PLOTS_DIR = "plots"  # figures, tables and report.md go here, replacing earlier ones
DATA_LABEL = ""  # what the report calls the data, e.g. "CIFAR-10 (JPEG copy)"; "" = none
BATCH_SIZE = 256  # test images per prediction batch
MISCLASSIFIED_IMAGES = 24  # most confident mistakes shown per model
SAMPLE_IMAGES = 16  # random test images shown with every model's prediction
CALIBRATION_BINS = 10  # equal-width confidence bins for ECE and reliability diagrams
TOP_CONFUSED_PAIRS = 10  # (true, predicted) class pairs listed per model
CONVERGED_FRACTION = 0.95  # converged = first epoch at this share of best val accuracy
ACCURACY_TOLERANCE = 0.002  # warn when recomputed and recorded test accuracy differ more
SEED = 0  # picks the random test images
DPI = 110  # resolution of the saved figures, dots per inch
CONFIG = settings.config_block(globals())  # the settings above: defaults for overrides

SCRIPTS = ("scratch_cnn", "transfer_mobilenetv2")  # the training scripts, in table order
RUN_SETTING = {"scratch_cnn": "SCRATCH_RUN", "transfer_mobilenetv2": "TRANSFER_RUN"}
COLOURS = {"scratch_cnn": "tab:blue", "transfer_mobilenetv2": "tab:orange"}
HEATMAP_COLOURS = {"scratch_cnn": "Blues", "transfer_mobilenetv2": "Oranges"}
MAX_ANNOTATED_CLASSES = 20  # confusion matrices of more classes leave cells unlabelled
CAPTION_POINTS = 11  # height of a caption line under an image, in points
PHASE_NAMES = {"train": "training", "head": "head training", "fine_tune": "fine-tuning"}


def check_config(config):
    """Checks of the settings alone: run before TensorFlow loads, and by main()."""
    for name in ("BATCH_SIZE", "CALIBRATION_BINS", "TOP_CONFUSED_PAIRS", "DPI"):
        settings.require(config[name] > 0, f"--{name.lower()} must be positive")
    settings.require(
        0 < config["CONVERGED_FRACTION"] <= 1, "--converged_fraction must lie in (0, 1]"
    )


# ---------------------------------------------------------------------------------
# Runs: find them, check them, read what training left in them


def missing_run_hint(script, out_dir):
    """One line saying that `script` has no finished run and which command makes one."""
    command = f"python {script}.py"
    if str(out_dir) != CONFIG["OUT_DIR"]:
        command += f" --out_dir={out_dir}"
    return f"no finished {script} run in {Path(out_dir)}/; make one with: {command}"


def check_run_folder(path, script):
    """The run folder that --scratch_run or --transfer_run names, if it is a finished
    run of `script`; else stop with exit code 2 and say what is wrong."""
    flag = f"--{RUN_SETTING[script].lower()}={path}"
    run_dir = Path(path).expanduser()
    settings.require(
        (run_dir / "config.json").is_file(),
        f"{flag}: not a run folder (no config.json); runs are in "
        f"OUT_DIR/{script}/<timestamp>/",
    )
    settings.require(
        (run_dir / "metrics.json").is_file(),
        f"{flag}: that run has not finished (no metrics.json); finish it with: "
        f"python {script}.py --resume={run_dir}",
    )
    made_by = read_json(run_dir / "config.json").get("script")
    if made_by in RUN_SETTING and made_by != script:
        raise settings.ConfigError(
            f"{flag}: that is a {made_by} run; pass it as "
            f"--{RUN_SETTING[made_by].lower()}={path}"
        )
    return run_dir


def find_runs(out_dir, chosen):
    """({script: run folder}, [hint lines]): the folder `chosen[script]` names, else
    the newest finished run in `out_dir`; a hint line for each script with neither.
    No run at all stops with exit code 3."""
    runs, hints = {}, []
    for script in SCRIPTS:
        if chosen.get(script):
            runs[script] = check_run_folder(chosen[script], script)
            continue
        finished = training.list_runs(out_dir, script, finished=True)
        if finished:
            runs[script] = finished[-1]
        else:
            hints.append(missing_run_hint(script, out_dir))
    if not runs:
        flag = "" if str(out_dir) == CONFIG["OUT_DIR"] else f" --out_dir={out_dir}"
        raise settings.DataError(
            f"no finished runs in {Path(out_dir)}/ to evaluate; make them with: "
            f"python scratch_cnn.py{flag} and python transfer_mobilenetv2.py{flag}"
        )
    return runs, hints


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise settings.DataError(
            f"{path}: unreadable ({type(error).__name__}); train that run again"
        ) from None


def read_run(run_dir, script):
    """What training left in `run_dir`: its config.json, metrics.json and history."""
    saved = read_json(run_dir / "config.json")
    if "value_range" not in saved or "IMG_SIZE" not in saved.get("config", {}):
        raise settings.DataError(
            f"{run_dir / 'config.json'}: no value_range or IMG_SIZE, so the test "
            "pipeline cannot be rebuilt; train that run again with the current scripts"
        )
    history = training.read_history(run_dir)
    if not history:
        raise settings.DataError(f"{run_dir / 'history.csv'}: missing or empty")
    return {
        "script": script,
        "dir": Path(run_dir),
        "saved": saved,
        "config": saved.get("config", {}),
        "value_range": tuple(saved["value_range"]),
        "metrics": read_json(run_dir / "metrics.json"),
        "history": history,
    }


def model_label(run):
    """The model's name in legends and tables, saying where its weights came from."""
    if run["script"] == "scratch_cnn":
        return "CNN from scratch"
    weights = run["config"].get("WEIGHTS", "imagenet")
    if weights == "imagenet":
        return "MobileNetV2 from ImageNet"
    if weights == "none":
        return "MobileNetV2, random init"
    return f"MobileNetV2 from {Path(weights).name}"


# ---------------------------------------------------------------------------------
# Data: the test set each run was evaluated on, read once per source


def run_class_names(run):
    """The classes a run was trained on; runs saved before class folders existed
    were CIFAR-10's."""
    return tuple(run["saved"].get("class_names") or data.CLASS_NAMES)


def load_test_set(run, data_dir, cache):
    """(images uint8, labels, source, training images count, class names, data set
    name) for `run`: from `data_dir` when given, else from the DATA_DIR the run was
    trained with. Class folders are decoded at the run's IMG_SIZE, as its training
    decoded them."""
    where = data_dir or run["config"].get("DATA_DIR", "")
    image_size = run["config"]["IMG_SIZE"]
    test_fraction = run["config"].get("TEST_FRACTION", data.TEST_FRACTION)
    # CIFAR-10 is read at 32 px whatever the run's size; class folders at its size.
    folders = data.class_folders_root(where)
    key = (where, test_fraction, image_size if folders else None)
    if key not in cache:
        cache[key] = data.load_test_data(where, image_size, test_fraction)
    _, _, source, _, class_names = cache[key]
    if tuple(class_names) != run_class_names(run):
        raise settings.DataError(
            f"{run['dir']}: trained on the classes {', '.join(run_class_names(run))}; "
            f"the test data in {source} has {', '.join(class_names)}; pass --data_dir="
        )
    return (*cache[key], "CIFAR-10" if folders is None else folders.resolve().name)


def training_images(run, available):
    """Images the run trained on: TRAIN_IMAGES (0 = all `available`) less the
    validation share, rounded as scikit-learn's split rounds it."""
    chosen = run["config"].get("TRAIN_IMAGES", 0)
    total = chosen if 0 < chosen < available else available
    return total - math.ceil(total * run["config"].get("VAL_FRACTION", 0.0))


# ---------------------------------------------------------------------------------
# Model: load the best checkpoint and predict the test set once


def load_model(run):
    return training.load_checkpoint(run["dir"])


def predict(model, run, images, labels, batch_size):
    """(probabilities (N, classes), seconds per image) over the run's test pipeline
    (its image size and value range), flip-averaged when the run was evaluated so
    (TTA_FLIP), as training.finish does. The timed pass is the second one: the
    first traces the graph for the full batches and again for the smaller last
    batch (on a GPU, an XLA compile each), which is set-up, not inference."""
    num_classes = model.output_shape[-1]
    if num_classes != len(run_class_names(run)):
        raise settings.DataError(
            f"{run['dir'] / 'model.keras'}: {num_classes} outputs for "
            f"{len(run_class_names(run))} classes in its config.json; train it again"
        )
    test_data = data.make_dataset(
        images,
        labels,
        batch_size=batch_size,
        image_size=run["config"]["IMG_SIZE"],
        value_range=run["value_range"],
        num_classes=num_classes,
    )
    tta_flip = run["config"].get("TTA_FLIP", False)
    training.predict_probabilities(model, test_data, tta_flip)
    start = time.perf_counter()
    probabilities, _ = training.predict_probabilities(model, test_data, tta_flip)
    seconds = time.perf_counter() - start
    return probabilities.astype(np.float64), seconds / len(labels)


def weights_megabytes(model):
    """The size of the model's weights (what inference needs), in MB: model.keras
    also holds the optimizer's slots, about 3x the weights for AdamW."""
    return sum(weight.numpy().nbytes for weight in model.weights) / 1e6


# ---------------------------------------------------------------------------------
# Evaluate: everything below works from the probabilities alone


def calibration_bins(confidence, correct, bins):
    """Per equal-width confidence bin (lower, upper]: image count, mean confidence
    and accuracy (NaN where empty)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_confidence = np.bincount(index, confidence, bins) / counts
        accuracy = np.bincount(index, correct.astype(float), bins) / counts
    return {
        "edges": edges,
        "counts": counts,
        "confidence": mean_confidence,
        "accuracy": accuracy,
    }


def expected_calibration_error(confidence, correct, bins):
    """ECE: the gap between confidence and accuracy, averaged over confidence bins
    weighted by their image counts. 0 = the model is as sure as it is right."""
    table = calibration_bins(confidence, correct, bins)
    filled = table["counts"] > 0
    gaps = np.abs(table["accuracy"][filled] - table["confidence"][filled])
    return float(np.sum(table["counts"][filled] * gaps) / len(confidence))


def most_confused_pairs(confusion, top):
    """[(true class index, predicted class index, count)], the `top` largest
    off-diagonal counts of `confusion`, largest first; pairs never confused left out."""
    off_diagonal = confusion.copy()
    np.fill_diagonal(off_diagonal, 0)
    order = np.argsort(-off_diagonal, axis=None, kind="stable")[:top]
    pairs = [
        (*np.unravel_index(flat, confusion.shape), off_diagonal.flat[flat])
        for flat in order
    ]
    return [
        (int(true), int(predicted), int(count))
        for true, predicted, count in pairs
        if count > 0
    ]


def epochs_to_reach(val_accuracy, fraction):
    """The first epoch (1-based) whose validation accuracy reaches `fraction` of the
    best one: how fast a model converges."""
    target = fraction * max(val_accuracy)
    return next(epoch for epoch, value in enumerate(val_accuracy, 1) if value >= target)


def evaluate_predictions(probabilities, labels, bins, class_names=data.CLASS_NAMES):
    """Accuracy, plain cross-entropy, confusion matrix, per-class accuracy and
    calibration of one model's test-set probabilities over `class_names`."""
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    correct = predicted == labels
    confusion = confusion_matrix(labels, predicted, labels=range(len(class_names)))
    per_class_total = confusion.sum(axis=1)
    with np.errstate(invalid="ignore"):
        per_class_accuracy = np.diag(confusion) / per_class_total
    true_probability = probabilities[np.arange(len(labels)), labels]
    return {
        "class_names": tuple(class_names),
        "predicted": predicted,
        "confidence": confidence,
        "correct": correct,
        "accuracy": float(accuracy_score(labels, predicted)),
        # Without label smoothing, so models trained with different smoothing compare.
        "cross_entropy": float(-np.mean(np.log(np.clip(true_probability, 1e-7, 1.0)))),
        "confusion": confusion,
        "per_class_accuracy": per_class_accuracy,
        "calibration": calibration_bins(confidence, correct, bins),
        "ece": expected_calibration_error(confidence, correct, bins),
        "mean_confidence": float(confidence.mean()),
    }


def measure(run, evaluation, seconds_per_image, megabytes, train_count, fraction):
    """One row of comparison.csv: the recorded figures of `run` beside the ones
    measured here."""
    metrics, history = run["metrics"], run["history"]
    val_accuracy = [row["val_accuracy"] for row in history]
    converged = epochs_to_reach(val_accuracy, fraction)
    return {
        "model": model_label(run),
        "script": run["script"],
        "run": str(run["dir"]),
        "test_accuracy": metrics["test_accuracy"],
        "recomputed_test_accuracy": evaluation["accuracy"],
        "test_loss": metrics["test_loss"],
        "test_cross_entropy": evaluation["cross_entropy"],
        "best_val_accuracy": metrics.get("best_val_accuracy", max(val_accuracy)),
        "final_train_loss": history[-1]["loss"],
        "final_val_loss": history[-1]["val_loss"],
        "final_train_accuracy": history[-1]["accuracy"],
        "final_val_accuracy": history[-1]["val_accuracy"],
        "epochs": len(history),
        "epochs_to_converge": converged,
        "seconds_to_converge": round(
            sum(row["epoch_seconds"] for row in history[:converged]), 1
        ),
        "train_seconds": metrics["train_seconds"],
        "train_images_per_second": metrics.get("images_per_second"),
        "training_images": train_count,
        "image_size": run["config"]["IMG_SIZE"],
        "params": metrics["params"],
        "model_megabytes": round(megabytes, 2),
        "tta_flip": run["config"].get("TTA_FLIP", False),
        "inference_ms_per_image": round(1000 * seconds_per_image, 4),
        "expected_calibration_error": evaluation["ece"],
        "mean_confidence": evaluation["mean_confidence"],
    }


# ---------------------------------------------------------------------------------
# Figures: saved, never shown; one colour per model throughout


def new_figure(rows=1, columns=1, size=(12, 4.5), **options):
    """A figure whose layout makes room for titles, labels and legends by itself."""
    return plt.subplots(
        rows, columns, figsize=size, squeeze=False, layout="constrained", **options
    )


def save_figure(figure, path, dpi, data_label=""):
    """Write a PNG whole or not at all, and free the figure. A data label goes on a
    line of its own under the title; the title is also the PNG's Title metadata."""
    if data_label:
        figure.suptitle(f"{figure.get_suptitle()}\n{data_label}")
    partial = path.with_name(path.name + ".partial")
    figure.savefig(
        partial,
        dpi=dpi,
        format="png",
        bbox_inches="tight",
        metadata={"Title": figure.get_suptitle()},
    )
    plt.close(figure)
    partial.replace(path)
    return path


def phase_starts(history):
    """[(epoch after which a new phase starts, phase name)], e.g. fine-tuning."""
    return [
        (epoch, history[epoch].get("phase"))
        for epoch in range(1, len(history))
        if history[epoch].get("phase") != history[epoch - 1].get("phase")
    ]


def draw_curves(axes, run, colour, label_prefix=""):
    """Training (solid) and validation (dashed) accuracy and loss of one run on
    `axes` (accuracy, loss), with the start of each new phase marked."""
    epochs = np.arange(1, len(run["history"]) + 1)
    for axis, key in zip(axes, ("accuracy", "loss")):
        for prefix, style, name in (("", "-", "training"), ("val_", "--", "validation")):
            values = [row[prefix + key] for row in run["history"]]
            axis.plot(
                epochs,
                values,
                style,
                color=colour,
                marker="o",
                markersize=3,
                label=f"{label_prefix}{name}",
            )
        for epoch, phase in phase_starts(run["history"]):
            axis.axvline(epoch + 0.5, color=colour, linestyle=":", linewidth=1.5)
            axis.annotate(
                f" {PHASE_NAMES.get(phase, phase)} starts",
                (epoch + 0.5, 0.98),
                xycoords=("data", "axes fraction"),
                ha="left",
                va="top",
                fontsize=8,
                color=colour,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
            )


def style_curve_axes(axes, last_epoch):
    for axis, key in zip(axes, ("accuracy", "loss")):
        axis.set_xlabel("epoch")
        axis.set_ylabel("accuracy" if key == "accuracy" else "loss (training objective)")
        axis.set_title(f"{key}: training vs validation")
        axis.set_xlim(0.5, last_epoch + 0.5)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)


def plot_curves(run):
    """curves_<script>.png: one run's accuracy and loss per epoch."""
    figure, axes = new_figure(1, 2)
    draw_curves(axes.flat, run, COLOURS[run["script"]])
    style_curve_axes(axes.flat, len(run["history"]))
    figure.suptitle(f"{model_label(run)}: learning curves (run {run['dir'].name})")
    return figure


def plot_curves_comparison(runs):
    """curves_comparison.png: every run's curves on one pair of axes."""
    figure, axes = new_figure(1, 2)
    for run in runs:
        draw_curves(axes.flat, run, COLOURS[run["script"]], f"{model_label(run)}, ")
    style_curve_axes(axes.flat, max(len(run["history"]) for run in runs))
    figure.suptitle("Learning curves compared (solid: training, dashed: validation)")
    return figure


def plot_confusion(run, evaluation):
    """confusion_<script>.png: test-set counts, and the same rows normalised."""
    confusion = evaluation["confusion"]
    with np.errstate(invalid="ignore"):
        normalised = np.nan_to_num(confusion / confusion.sum(axis=1, keepdims=True))
    class_names = evaluation["class_names"]
    # Room for every class; counts written in the cells while they still fit.
    side = max(7.0, 0.4 * len(class_names))
    figure, axes = new_figure(1, 2, size=(2.3 * side, side))
    for axis, values, fmt, title in (
        (axes[0, 0], confusion, "d", "test images"),
        (axes[0, 1], normalised, ".2f", "share of each true class (rows sum to 1)"),
    ):
        sns.heatmap(
            values,
            annot=len(class_names) <= MAX_ANNOTATED_CLASSES,
            fmt=fmt,
            cmap=HEATMAP_COLOURS[run["script"]],
            xticklabels=class_names,
            yticklabels=class_names,
            square=True,
            cbar_kws={"shrink": 0.7},
            annot_kws={"fontsize": 8},
            ax=axis,
        )
        axis.set_xlabel("predicted class")
        axis.set_ylabel("true class")
        axis.set_title(title)
        axis.tick_params(axis="x", rotation=45)
        axis.tick_params(axis="y", rotation=0)
    figure.suptitle(
        f"{model_label(run)}: confusion matrix on {confusion.sum():,} test images, "
        f"accuracy {evaluation['accuracy']:.2%}"
    )
    return figure


def plot_per_class_accuracy(runs, evaluations):
    """per_class_accuracy.png: each class's test accuracy, the models side by side."""
    class_names = evaluations[runs[0]["script"]]["class_names"]
    width = max(12.0, 0.45 * len(runs) * len(class_names))
    figure, axes = new_figure(size=(width, 4.5))
    axis = axes[0, 0]
    positions = np.arange(len(class_names))
    width = 0.8 / len(runs)
    for offset, run in enumerate(runs):
        evaluation = evaluations[run["script"]]
        bars = axis.bar(
            positions + (offset - (len(runs) - 1) / 2) * width,
            np.nan_to_num(evaluation["per_class_accuracy"]),
            width,
            color=COLOURS[run["script"]],
            label=f"{model_label(run)} (overall {evaluation['accuracy']:.1%})",
        )
        axis.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    if len(class_names) > 10:
        axis.set_xticks(positions, class_names, rotation=45, ha="right")
    else:
        axis.set_xticks(positions, class_names)
    axis.set_ylim(0, 1.15)
    axis.set_xlabel("true class")
    axis.set_ylabel("test accuracy (recall)")
    figure.suptitle("Per-class test accuracy")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(loc="upper center", ncol=len(runs), fontsize=8)
    return figure


def plot_confused_pairs(runs, pairs, top, class_names):
    """confused_pairs.png: each model's most frequent (true -> predicted) mistakes."""
    figure, axes = new_figure(1, len(runs), size=(6.5 * len(runs), 0.8 + 0.35 * top))
    for axis, run in zip(axes.flat, runs):
        rows = pairs[run["script"]]
        names = [f"{class_names[t]} → {class_names[p]}" for t, p, _ in rows]
        counts = [count for _, _, count in rows]
        # Largest at the top, in slots of equal height however few pairs there are.
        bars = axis.barh(np.arange(len(rows)), counts, 0.7, color=COLOURS[run["script"]])
        axis.bar_label(bars, fontsize=8, padding=2)
        axis.set_yticks(np.arange(len(rows)), names)
        axis.set_ylim(top - 0.5, -0.5)
        axis.set_xlabel("test images")
        axis.set_title(model_label(run))
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.margins(x=0.15)
        axis.grid(axis="x", alpha=0.3)
        if not rows:
            axis.text(0.5, 0.5, "no mistakes", ha="center", transform=axis.transAxes)
    figure.suptitle("Most confused pairs (true → predicted), test images")
    return figure


def image_grid(count, cell_height, columns=8, caption_lines=0):
    """A figure of `count` image cells, `columns` a row, without ticks or frames,
    with room for `caption_lines` lines of text under each image."""
    rows = max(1, -(-count // columns))
    figure, axes = new_figure(rows, columns, size=(1.75 * columns, cell_height * rows))
    for index, axis in enumerate(axes.flat):
        axis.set_xticks([])
        axis.set_yticks([])
        axis.spines[:].set_visible(False)
        # An empty label of the caption's height makes the layout leave room for it.
        axis.set_xlabel(
            "\n" * (caption_lines - 1) + " " if caption_lines else "",
            fontsize=CAPTION_POINTS - 2,
            linespacing=CAPTION_POINTS / (CAPTION_POINTS - 2),
        )
        axis.set_visible(index < count)
    return figure, axes


def plot_misclassified(run, evaluation, images, labels, count):
    """misclassified_<script>.png: the test images the model got wrong with the
    highest confidence, with true and predicted classes."""
    wrong = np.flatnonzero(~evaluation["correct"])
    shown = wrong[np.argsort(-evaluation["confidence"][wrong], kind="stable")][:count]
    if not len(shown):
        figure, axes = new_figure(size=(8, 2.5))
        axes[0, 0].axis("off")
        axes[0, 0].text(0.5, 0.5, "none", ha="center", va="center", fontsize=14)
    else:
        figure, axes = image_grid(len(shown), cell_height=2.1)
    class_names = evaluation["class_names"]
    for axis, index in zip(axes.flat, shown):
        axis.imshow(images[index])
        axis.set_title(
            f"{class_names[labels[index]]}\n"
            f"→ {class_names[evaluation['predicted'][index]]} "
            f"{evaluation['confidence'][index]:.0%}",
            fontsize=9,
        )
    title = (
        f"the {len(shown)} most confident of {len(wrong):,} mistakes "
        "(true class → predicted class, confidence)"
        if len(wrong)
        else "no misclassified test images"
    )
    figure.suptitle(f"{model_label(run)}: {title}", color=COLOURS[run["script"]])
    return figure


def plot_test_predictions(runs, evaluations, images, labels, count, seed):
    """test_predictions.png: random test images with every model's prediction and
    confidence (the report's check on test images); ✓ right, ✗ wrong."""
    picks = np.random.default_rng(seed).choice(
        len(labels), size=min(count, len(labels)), replace=False
    )
    figure, axes = image_grid(
        len(picks), cell_height=2.0 + 0.25 * len(runs), caption_lines=len(runs)
    )
    class_names = evaluations[runs[0]["script"]]["class_names"]
    for axis, index in zip(axes.flat, picks):
        axis.imshow(images[index])
        axis.set_title(f"true: {class_names[labels[index]]}", fontsize=9)
        for line, run in enumerate(runs):
            evaluation = evaluations[run["script"]]
            mark = "✓" if evaluation["correct"][index] else "✗"
            axis.annotate(
                f"{mark} {class_names[evaluation['predicted'][index]]} "
                f"{evaluation['confidence'][index]:.0%}",
                (0.5, 0),
                xycoords="axes fraction",
                xytext=(0, -2 - CAPTION_POINTS * line),
                textcoords="offset points",
                ha="center",
                va="top",
                fontsize=CAPTION_POINTS - 2,
                color=COLOURS[run["script"]],
            )
    figure.legend(
        handles=[
            Patch(color=COLOURS[run["script"]], label=model_label(run)) for run in runs
        ],
        loc="outside lower center",
        ncol=len(runs),
        frameon=False,
    )
    figure.suptitle(
        "Random test images: each model's prediction and confidence (✓ right, ✗ wrong)"
    )
    return figure


def plot_calibration(runs, evaluations):
    """calibration.png: per model, a reliability diagram (accuracy against confidence
    per bin; on the diagonal = calibrated) over a histogram of confidences."""
    figure, axes = new_figure(
        2,
        len(runs),
        size=(5.5 * len(runs), 7),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1]},
    )
    for column, run in enumerate(runs):
        evaluation = evaluations[run["script"]]
        table = evaluation["calibration"]
        colour = COLOURS[run["script"]]
        edges = table["edges"]
        centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        accuracy = np.nan_to_num(table["accuracy"])
        top, bottom = axes[0, column], axes[1, column]
        top.bar(
            centres, accuracy, width, color=colour, edgecolor="white", label="accuracy"
        )
        top.bar(
            centres,
            np.nan_to_num(table["confidence"] - table["accuracy"]),
            width,
            bottom=accuracy,
            fill=False,
            hatch="//",
            edgecolor="firebrick",
            linewidth=0,
            label="gap to mean confidence",
        )
        top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy in bin")
        top.set_title(
            f"{model_label(run)}\nECE {evaluation['ece']:.3f}, mean confidence "
            f"{evaluation['mean_confidence']:.2f}, accuracy {evaluation['accuracy']:.2f}",
            fontsize=10,
        )
        top.legend(loc="upper left", fontsize=8)
        top.grid(alpha=0.3)
        bottom.bar(centres, table["counts"], width, color=colour, edgecolor="white")
        bottom.set_xlabel("confidence (highest predicted probability)")
        bottom.set_ylabel("test images")
        bottom.grid(alpha=0.3)
    figure.suptitle("Calibration on the test set: reliability diagrams")
    return figure


# ---------------------------------------------------------------------------------
# Tables and report


COMPARISON_ROWS = (
    # (comparison.csv column, label in comparison.md, format)
    ("test_accuracy", "test accuracy (recorded)", "{:.2%}"),
    ("recomputed_test_accuracy", "test accuracy (recomputed here)", "{:.2%}"),
    ("test_loss", "test loss (training objective, recorded)", "{:.4f}"),
    ("test_cross_entropy", "test cross-entropy (no label smoothing)", "{:.4f}"),
    ("best_val_accuracy", "best validation accuracy", "{:.2%}"),
    ("final_train_loss", "final training loss", "{:.4f}"),
    ("final_val_loss", "final validation loss", "{:.4f}"),
    ("final_train_accuracy", "final training accuracy", "{:.2%}"),
    ("final_val_accuracy", "final validation accuracy", "{:.2%}"),
    ("epochs", "epochs trained", "{}"),
    ("epochs_to_converge", "epochs to reach {fraction} of best val accuracy", "{}"),
    (
        "seconds_to_converge",
        "seconds to reach {fraction} of best val accuracy",
        "{:,.1f}",
    ),
    ("train_seconds", "training time, s", "{:,.1f}"),
    ("train_images_per_second", "training images per second", "{:,.0f}"),
    ("training_images", "training images used", "{:,}"),
    ("image_size", "input size, px", "{}"),
    ("params", "parameters", "{:,}"),
    ("model_megabytes", "model weights, MB", "{:.2f}"),
    ("tta_flip", "test-time flip averaging", "{}"),
    ("inference_ms_per_image", "inference, ms per image (this machine)", "{:.3f}"),
    ("expected_calibration_error", "expected calibration error", "{:.3f}"),
    ("mean_confidence", "mean confidence", "{:.2%}"),
)


def csv_text(header, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def markdown_table(header, rows):
    def cell(value):
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(name) for name in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def formatted(value, fmt):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(value)


def comparison_markdown(measures, fraction):
    """The report's table, measured: one row per figure, one column per model."""
    rows = [
        [label.format(fraction=f"{fraction:.0%}")]
        + [formatted(row[key], fmt) for row in measures]
        for key, label, fmt in COMPARISON_ROWS
    ]
    return markdown_table([""] + [row["model"] for row in measures], rows)


def settings_markdown(runs):
    """Each run's settings as config.json saved them, side by side."""
    names = list(dict.fromkeys(name for run in runs for name in run["config"]))
    rows = [
        [f"`{name.lower()}`"]
        + [repr(run["config"][name]) if name in run["config"] else "" for run in runs]
        for name in names
    ]
    rows += [
        ["data source"] + [run["saved"].get("data_source", "") for run in runs],
        ["value range"] + [str(list(run["value_range"])) for run in runs],
        ["devices"] + [", ".join(run["saved"].get("devices", [])) for run in runs],
        ["versions"]
        + [
            ", ".join(f"{k} {v}" for k, v in run["saved"].get("versions", {}).items())
            for run in runs
        ],
    ]
    return markdown_table(["setting"] + [model_label(run) for run in runs], rows)


def confused_pairs_rows(runs, pairs, evaluations):
    rows = []
    for run in runs:
        confusion = evaluations[run["script"]]["confusion"]
        class_names = evaluations[run["script"]]["class_names"]
        for rank, (true, predicted, count) in enumerate(pairs[run["script"]], 1):
            rows.append(
                [
                    run["script"],
                    rank,
                    class_names[true],
                    class_names[predicted],
                    count,
                    round(count / confusion[true].sum(), 4),
                ]
            )
    return rows


def machine_description():
    """This machine in one line: CPU, cores, GPUs, OS and TensorFlow version."""
    cpu = training.cpu_name()
    gpus = training.gpu_names()
    return (
        f"{cpu}, {os.cpu_count()} logical cores, "
        f"{'GPU: ' + ', '.join(gpus) if gpus else 'no GPU'}; "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}"
    )


def export_blocks(runs):
    """The TensorFlow Lite table of each run that export.py has exported, from its
    export/export.md (its own title line dropped); nothing when none has been."""
    blocks = []
    for run in runs:
        path = run["dir"] / "export" / "export.md"
        if path.is_file():
            body = path.read_text().partition("\n")[2]
            blocks += [f"### {model_label(run)}", body.strip()]
    if not blocks:
        return []
    return [
        "## Deployment: TensorFlow Lite",
        "From `python export.py`; the models and tables are in each run's `export/`.",
        *blocks,
    ]


def report_markdown(
    runs, measures, evaluations, pairs, reports, hints, test, config, files, command
):
    """report.md: every figure and table on one page, in blocks separated by a blank
    line, figures linked by their file names in the same folder."""
    scripts = [run["script"] for run in runs]
    fraction = config["CONVERGED_FRACTION"]
    run_list = ", ".join(f"`{run['dir']}`" for run in runs)
    blocks = [
        f"# {test['dataset']}: a CNN from scratch against MobileNetV2 transfer learning",
        (
            f"Made by `{command}` on {datetime.now():%Y-%m-%d %H:%M} from {run_list}. "
            f"Test set: {len(test['labels']):,} images"
            f"{' of ' + config['DATA_LABEL'] if config['DATA_LABEL'] else ''} from "
            f"`{test['source']}`, predicted once per model."
        ),
        *[f"> **Missing:** {hint}" for hint in hints],
        "## The comparison",
        comparison_markdown(measures, fraction),
        (
            "*Recorded* figures come from each run's `metrics.json`, written when "
            "training ended; *recomputed* ones from this evaluation's predictions. The "
            "test loss is the loss the model trained on (label smoothing included "
            "where the run used it); the cross-entropy without smoothing compares "
            "models fairly. Convergence counts the epochs until validation accuracy "
            f"first reached {fraction:.0%} of its best. The report's last row, "
            "suitability for small data, needs runs on little data: train both "
            "scripts with a small `--train_images` (e.g. 5000) and evaluate again."
        ),
        (
            "For reference, the original report on CIFAR-10: from scratch about 72% "
            "test accuracy, training and validation loss 0.67 and 0.79; MobileNetV2 "
            "over 95%, 0.20 and 0.25."
        ),
        (
            f"Inference: `model.predict` over the test set in batches of "
            f"{config['BATCH_SIZE']}, input pipeline (resizing and scaling) included, "
            "each image and its mirror for a run evaluated with flip averaging "
            "(`TTA_FLIP`), timed on a second pass (the first traces the graph for "
            f"the full and the last, smaller batch), on this machine: "
            f"{machine_description()}."
        ),
        "The table as [comparison.md](comparison.md) and [comparison.csv](comparison.csv).",
        *export_blocks(runs),
        "## Learning curves",
        (
            "Solid lines: training; dashed: validation. A dotted vertical line marks "
            "where a new phase (fine-tuning) starts."
        ),
        f"![Learning curves compared]({files['curves_comparison']})",
        *[
            f"![Learning curves of {script}]({files['curves_' + script]})"
            for script in scripts
        ],
        "## Confusion matrices",
    ]
    for script in scripts:
        blocks += [
            f"![Confusion matrix of {script}]({files['confusion_' + script]})",
            f"Counts as [confusion_{script}.csv](confusion_{script}.csv).",
        ]
    labels = {run["script"]: model_label(run) for run in runs}
    blocks += [
        "## Per-class accuracy",
        f"![Per-class accuracy]({files['per_class_accuracy']})",
        "## Most confused class pairs",
        f"![Most confused pairs]({files['confused_pairs']})",
        markdown_table(
            ["model", "rank", "true", "predicted", "images", "share of true class"],
            [
                [labels[row[0]], *row[1:]]
                for row in confused_pairs_rows(runs, pairs, evaluations)
            ],
        ),
        "## Mistakes and predictions on test images",
        *[
            f"![Mistakes of {script}]({files['misclassified_' + script]})"
            for script in scripts
        ],
        f"![Random test images with predictions]({files['test_predictions']})",
        "## Calibration",
        (
            "The report worried about bias carried over from the pretrained model. One "
            "measurable form of it is miscalibration: a model more (or less) sure than "
            "it is right. The expected calibration error (ECE) averages the gap between "
            f"confidence and accuracy over {config['CALIBRATION_BINS']} confidence bins, "
            "weighted by their images; 0 is perfect."
        ),
        f"![Reliability diagrams]({files['calibration']})",
        "## Classification reports",
    ]
    for run in runs:
        name = files[f"classification_report_{run['script']}.txt"]
        blocks += [
            f"### {labels[run['script']]} ([{name}]({name}))",
            "```\n" + reports[run["script"]].rstrip() + "\n```",
        ]
    blocks += ["## Settings of each run", settings_markdown(runs)]
    return "\n\n".join(block.rstrip("\n") for block in blocks) + "\n"


# ---------------------------------------------------------------------------------
# main: python evaluate.py


def evaluate_runs(runs, config):
    """Predict the test set once per model; every figure and table reuses those
    probabilities. Returns (test set, {script: evaluation}, [comparison rows])."""
    cache, evaluations, measures, test = {}, {}, [], None
    for run in runs:
        images, labels, source, available, class_names, dataset = load_test_set(
            run, config["DATA_DIR"], cache
        )
        if test is not None and (
            not np.array_equal(labels, test["labels"])
            or class_names != test["class_names"]
        ):
            raise settings.ConfigError(
                "the runs were trained on different data, so their test sets differ; "
                "pass --data_dir= to evaluate both on one"
            )
        test = {
            "images": images,
            "labels": labels,
            "source": source,
            "class_names": class_names,
            "dataset": dataset,
        }
        print(f"{run['script']}: predicting {len(labels):,} test images, {run['dir']}")
        model = load_model(run)
        probabilities, seconds_per_image = predict(
            model, run, images, labels, config["BATCH_SIZE"]
        )
        megabytes = weights_megabytes(model)
        del model
        keras.backend.clear_session()  # free the model before loading the next
        evaluation = evaluate_predictions(
            probabilities, labels, config["CALIBRATION_BINS"], class_names
        )
        row = measure(
            run,
            evaluation,
            seconds_per_image,
            megabytes,
            training_images(run, available),
            config["CONVERGED_FRACTION"],
        )
        recorded, recomputed = row["test_accuracy"], row["recomputed_test_accuracy"]
        if abs(recorded - recomputed) > config["ACCURACY_TOLERANCE"]:
            print(
                f"warning: {run['script']}: test accuracy recomputed here "
                f"{recomputed:.4f} differs from the recorded {recorded:.4f} in "
                f"{run['dir'] / 'metrics.json'} (other test data, or a changed model?)"
            )
        print(
            f"{run['script']}: test accuracy {recomputed:.4f} (recorded {recorded:.4f}), "
            f"ECE {row['expected_calibration_error']:.3f}, "
            f"{row['inference_ms_per_image']:.3f} ms per image"
        )
        evaluations[run["script"]] = evaluation
        measures.append(row)
    return test, evaluations, measures


def write_figures(runs, evaluations, pairs, test, config, plots_dir):
    """Every figure, as {name: file name}."""
    files = {}

    def save(name, plot, *args):
        path = plots_dir / f"{name}.png"
        save_figure(plot(*args), path, config["DPI"], config["DATA_LABEL"])
        files[name] = path.name

    images, labels = test["images"], test["labels"]
    save("curves_comparison", plot_curves_comparison, runs)
    for run in runs:
        script, evaluation = run["script"], evaluations[run["script"]]
        save(f"curves_{script}", plot_curves, run)
        save(f"confusion_{script}", plot_confusion, run, evaluation)
        save(
            f"misclassified_{script}",
            plot_misclassified,
            run,
            evaluation,
            images,
            labels,
            config["MISCLASSIFIED_IMAGES"],
        )
    save("per_class_accuracy", plot_per_class_accuracy, runs, evaluations)
    save(
        "confused_pairs",
        plot_confused_pairs,
        runs,
        pairs,
        config["TOP_CONFUSED_PAIRS"],
        test["class_names"],
    )
    save(
        "test_predictions",
        plot_test_predictions,
        runs,
        evaluations,
        images,
        labels,
        config["SAMPLE_IMAGES"],
        config["SEED"],
    )
    save("calibration", plot_calibration, runs, evaluations)
    return files


def write_tables(runs, evaluations, measures, pairs, reports, config, plots_dir):
    """comparison.csv and .md, confused_pairs.csv, and per model its confusion counts
    and classification report, as {file name: file name}."""
    tables = {
        "comparison.csv": csv_text(
            list(measures[0]), [list(row.values()) for row in measures]
        ),
        "comparison.md": comparison_markdown(measures, config["CONVERGED_FRACTION"]),
        "confused_pairs.csv": csv_text(
            ["script", "rank", "true", "predicted", "images", "share_of_true_class"],
            confused_pairs_rows(runs, pairs, evaluations),
        ),
    }
    for run in runs:
        script = run["script"]
        confusion = evaluations[script]["confusion"].tolist()
        class_names = evaluations[script]["class_names"]
        tables[f"confusion_{script}.csv"] = csv_text(
            ["true \\ predicted", *class_names],
            [[name, *counts] for name, counts in zip(class_names, confusion)],
        )
        tables[f"classification_report_{script}.txt"] = reports[script]
    return {
        name: training.write_text(plots_dir / name, text).name
        for name, text in tables.items()
    }


def main(argv):
    config = training.configure(CONFIG, argv)
    check_config(config)
    run_dirs, hints = find_runs(
        config["OUT_DIR"], {script: config[RUN_SETTING[script]] for script in SCRIPTS}
    )
    for hint in hints:
        print(hint)
    runs = [
        read_run(run_dirs[script], script) for script in SCRIPTS if script in run_dirs
    ]
    plots_dir = Path(config["PLOTS_DIR"]).expanduser()
    plots_dir.mkdir(parents=True, exist_ok=True)

    # Evaluate
    test, evaluations, measures = evaluate_runs(runs, config)
    pairs = {
        script: most_confused_pairs(evaluation["confusion"], config["TOP_CONFUSED_PAIRS"])
        for script, evaluation in evaluations.items()
    }
    reports = {
        script: classification_report(
            test["labels"],
            evaluation["predicted"],
            labels=range(len(evaluation["class_names"])),
            target_names=evaluation["class_names"],
            digits=4,
            zero_division=0,
        )
        for script, evaluation in evaluations.items()
    }

    # Figures, tables, and the report that shows them all
    files = write_figures(runs, evaluations, pairs, test, config, plots_dir)
    files.update(
        write_tables(runs, evaluations, measures, pairs, reports, config, plots_dir)
    )
    report = report_markdown(
        runs,
        measures,
        evaluations,
        pairs,
        reports,
        hints,
        test,
        config,
        files,
        command=shlex.join(["python", "evaluate.py", *argv]),
    )
    files["report.md"] = training.write_text(plots_dir / "report.md", report).name
    for name in files.values():
        print(f"wrote {plots_dir / name}")
    return {
        "runs": {run["script"]: run["dir"] for run in runs},
        "plots_dir": plots_dir,
        "files": sorted(files.values()),
        "hints": hints,
    }


if __name__ == "__main__":
    training.cli(main)
