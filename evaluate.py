"""Compare finished runs of scratch_cnn.py and transfer_mobilenetv2.py on their test set:
the report's table, measured, with learning curves, confusion matrices, per-class
accuracy, mistakes, calibration and inference speed; report.md shows them all. A column
per kind of model, evaluated alike; runs that differ only in SEED share one.

    python evaluate.py                              # the newest finished run of each kind
    python evaluate.py --runs=runs/scratch_cnn/A,runs/scratch_cnn/B   # chosen runs
    python evaluate.py --data_dir=~/data --plots_dir=results --data_label="CIFAR-10"
"""

import settings

settings.check_command_line(__name__, __file__)  # --help, bad flags: before TF loads

import os
import platform
import re
import shlex
import time
from collections import namedtuple
from datetime import datetime
from pathlib import Path

import keras
import matplotlib

matplotlib.use("Agg")  # files only: never open a window

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import tensorflow as tf
from matplotlib.patches import Patch
from scipy import stats
from sklearn.metrics import classification_report, confusion_matrix

import data
import training

# ---------------------------------------------------------------------------------
# Config (python evaluate.py --name=value overrides any of these)

OUT_DIR = "runs"  # where the training scripts leave runs: OUT_DIR/<script>/<timestamp>/
RUNS = ""  # finished run folders, comma-separated; "" = the newest finished run
# of each kind (CNN from scratch, MobileNetV2 from ImageNet weights, random start, ...)
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
INTERVAL = 0.95  # confidence level of the Student-t interval over a column's seeds
SEED = 0  # picks the random test images
DPI = 110  # resolution of the saved figures, dots per inch
CONFIG = settings.config_block(globals())  # the settings above: defaults for overrides

SCRIPTS = ("scratch_cnn", "transfer_mobilenetv2")  # the training scripts evaluated
EXPECTED = {  # the kinds compared by default, and the command that makes each
    "CNN from scratch": "python scratch_cnn.py",
    "MobileNetV2, ImageNet weights": "python transfer_mobilenetv2.py",
    "MobileNetV2, random start": "python transfer_mobilenetv2.py --weights=none",
}
NOT_COMPARED = ("SEED", "OUT_DIR", "RESUME", "VERBOSE", "DRY_RUN")  # seeds may differ
FIGURE_TTA = "flip"  # the test-time augmentation of every figure, for every model
SAVED = ("data_source", "weights_file", "value_range", "devices", "versions")  # shown
TestSet = namedtuple("TestSet", "images labels source available class_names dataset")
ROW_NAMES = {
    "tta": "the run's test-time augmentation",
    "test_accuracy_none": "test accuracy, one view",
    "test_accuracy_flip": "test accuracy, flip-averaged",
    "test_accuracy_crops": "test accuracy, 6 views (crops)",
    "test_accuracy": "test accuracy, recorded (the run's own level)",
    "test_loss": "test loss (training objective)",
    "final_loss": "final training loss",
    "final_val_loss": "final validation loss",
    "inference_ms_per_image": "inference, ms per image",
}  # comparison rows; the others read as their names with spaces


def check_config(config):
    """Checks of the settings alone: run before TensorFlow loads, and by main()."""
    for name in ("BATCH_SIZE", "CALIBRATION_BINS", "TOP_CONFUSED_PAIRS", "DPI"):
        settings.require(config[name] > 0, f"--{name.lower()} must be positive")
    for name in ("CONVERGED_FRACTION", "INTERVAL"):
        settings.require(0 < config[name] <= 1, f"--{name.lower()} must lie in (0, 1]")


# ---------------------------------------------------------------------------------
# Runs: find them, read them, the seeds of one setting into one column


def find_runs(out_dir, chosen):
    """([run folders], [hints]): those `chosen`, else the newest of each kind by name."""
    if chosen:
        paths = [path.strip() for path in chosen.split(",") if path.strip()]
        return [settings.finished_run(path, f"--runs={path}") for path in paths], []
    newest = {}
    for script in SCRIPTS:
        for run_dir in settings.list_runs(out_dir, script, finished=True):  # oldest first
            config = settings.read_json(run_dir / "config.json").get("config", {})
            newest[settings.model_name(script, config)] = run_dir
    flag = "" if str(out_dir) == CONFIG["OUT_DIR"] else f" --out_dir={out_dir}"
    where = f"in {Path(out_dir)}/"
    if not newest:
        commands = ", ".join(command + flag for command in EXPECTED.values())
        raise settings.DataError(f"no finished runs {where}; make them with: {commands}")
    hints = [f'no finished run of "{kind}" {where}; make one with: {command}{flag}'
             for kind, command in EXPECTED.items() if kind not in newest]  # fmt: skip
    order = [*EXPECTED, *sorted(newest)]  # the expected kinds first
    return [newest[kind] for kind in sorted(newest, key=order.index)], hints


def read_columns(run_dirs):
    """The runs as training left them, a column per kind and settings: seeds share one."""
    groups = {}
    for run_dir in run_dirs:
        saved = settings.read_json(run_dir / "config.json")
        history = training.history_frame(run_dir)
        usable = "value_range" in saved and "IMG_SIZE" in saved.get("config", {})
        if saved.get("script") not in SCRIPTS or not usable or history.empty:
            raise settings.DataError(
                f"{run_dir}: not a {' or '.join(SCRIPTS)} run with a value_range, "
                "IMG_SIZE and history.csv; train it again with the current scripts"
            )
        config, metrics = saved["config"], settings.read_json(run_dir / "metrics.json")
        earlier = "flip" if config.get("TTA_FLIP") else "none"  # runs before TTA levels
        run = {
            "dir": run_dir, "saved": saved, "config": config, "metrics": metrics,
            "history": history, "tta": metrics.get("tta") or config.get("TTA", earlier),
        }  # fmt: skip
        kind = settings.model_name(saved["script"], config)
        compared = {k: v for k, v in config.items() if k not in NOT_COMPARED}
        groups.setdefault((kind, repr(sorted(compared.items()))), []).append(run)
    kinds, columns = [kind for kind, _ in groups], []
    for index, ((kind, _), members) in enumerate(groups.items()):
        name = kind if kinds.count(kind) == 1 else f"{kind} ({members[0]['dir'].name})"
        seeds = [str(run["config"].get("SEED")) for run in members]
        title = f"{name}, seed {seeds[0]} of {', '.join(seeds)}" if seeds[1:] else name
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        columns.append({"name": name, "slug": slug, "title": title, "runs": members,
                        "colour": f"C{index}"})  # fmt: skip
    return columns


# ---------------------------------------------------------------------------------
# Evaluate: the test set, each model's probabilities, what they measure


def load_test_set(run, data_dir, cache):
    """The test set `run` was evaluated on (`data_dir`, else its DATA_DIR), read once."""
    config, where = run["config"], data_dir or run["config"].get("DATA_DIR", "")
    fraction = config.get("TEST_FRACTION", data.TEST_FRACTION)
    folders = data.class_folders_root(where)
    key = (where, fraction, folders and config["IMG_SIZE"])  # CIFAR-10 is read at 32 px
    if key not in cache:
        found = data.load_test_data(where, config["IMG_SIZE"], fraction)
        dataset = "CIFAR-10" if folders is None else folders.resolve().name
        cache[key] = TestSet(*found[:4], tuple(found[4]), dataset)
        settings.require(
            all(np.array_equal(found[1], other.labels) for other in cache.values()),
            "the runs' test sets differ (other data); pass --data_dir= to use one",
        )
    test, trained_on = cache[key], run["saved"].get("class_names") or data.CLASS_NAMES
    if test.class_names != tuple(trained_on):
        raise settings.DataError(
            f"{run['dir']}: trained on the classes {', '.join(trained_on)}; the test "
            f"data in {test.source} has {', '.join(test.class_names)}; pass --data_dir="
        )
    return test


def calibration_bins(confidence, correct, bins):
    """(per confidence bin: "counts", mean "confidence", "accuracy"; the expected
    calibration error: their gap averaged over the images, 0 for a model as sure as right)
    """
    frame = pd.DataFrame({"confidence": confidence, "accuracy": correct.astype(float)})
    edges = pd.cut(confidence, np.linspace(0.0, 1.0, bins + 1), include_lowest=True)
    grouped = frame.groupby(edges, observed=False)
    table = grouped.mean().assign(counts=grouped.size())
    gaps = (table["accuracy"] - table["confidence"]).abs()
    return table, float((table["counts"] * gaps).sum() / len(confidence))


def most_confused_pairs(confusion, top):
    """[(true, predicted, count)]: the `top` largest counts off the diagonal."""
    pairs = pd.DataFrame(confusion - np.diag(np.diag(confusion))).stack()
    pairs = pairs[pairs > 0].sort_values(ascending=False, kind="stable").head(top)
    return [(int(t), int(p), int(count)) for (t, p), count in pairs.items()]


def epochs_to_reach(val_accuracy, fraction):
    """The first epoch (from 1) whose validation accuracy is `fraction` of the best."""
    target = fraction * max(val_accuracy)
    return next(epoch for epoch, value in enumerate(val_accuracy, 1) if value >= target)


def evaluate_predictions(probabilities, labels, bins, class_names=data.CLASS_NAMES):
    """What test predictions measure; cross-entropy unsmoothed, so all models compare."""
    predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    correct, classes = predicted == labels, range(len(class_names))
    confusion = confusion_matrix(labels, predicted, labels=classes)
    true_probability = np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1)
    calibration, ece = calibration_bins(confidence, correct, bins)
    return {
        "class_names": tuple(class_names), "correct": correct,
        "confidence": confidence, "accuracy": float(correct.mean()),
        "cross_entropy": float(-np.mean(np.log(true_probability))),
        "confusion": confusion, "calibration": calibration, "ece": ece,
        "per_class_accuracy": np.diag(confusion) / np.maximum(1, confusion.sum(axis=1)),
        "answers": [f"{class_names[p]} {c:.0%}" for p, c in zip(predicted, confidence)],
        "report": classification_report(labels, predicted, labels=classes, digits=4,
                                        target_names=class_names, zero_division=0),
    }  # fmt: skip


def evaluate_run(column, run, test, config):
    """`run`'s row of comparison.csv, measured beside recorded; keeps its evaluation."""
    keras.backend.clear_session()  # free the models evaluated before this one
    model, tta, trained = training.load_checkpoint(run["dir"]), run["tta"], run["config"]
    dataset = data.make_dataset(
        test.images, test.labels, batch_size=config["BATCH_SIZE"],
        image_size=trained["IMG_SIZE"], value_range=tuple(run["saved"]["value_range"]),
        num_classes=len(test.class_names),
    )  # fmt: skip
    level = max(FIGURE_TTA, tta, key=settings.CHOICES["TTA"].index)
    levels, _ = training.predict_tta(model, dataset, level)
    start = time.perf_counter()  # a pass without TTA, the graph traced by now
    model.predict(dataset, verbose=0)  # images only: predict leaves the labels alone
    seconds = (time.perf_counter() - start) / len(test.labels)
    # The weights are what inference needs; model.keras also holds optimizer slots.
    megabytes = sum(weight.numpy().nbytes for weight in model.weights) / 1e6
    accuracy = {k: float(np.mean(p.argmax(1) == test.labels)) for k, p in levels.items()}
    history, metrics = run["history"], run["metrics"]
    recorded = metrics["test_accuracy"]
    print(f"{column['name']}, {run['dir'].name}: test accuracy by TTA level {accuracy}")
    if abs(recorded - accuracy[tta]) > config["ACCURACY_TOLERANCE"]:
        print(
            f"warning: {run['dir']}: test accuracy recomputed here ({tta}) "
            f"{accuracy[tta]:.4f} differs from the recorded {recorded:.4f} in its "
            "metrics.json (other test data, or a changed model?)"
        )
    run["evaluation"] = evaluation = evaluate_predictions(
        levels[FIGURE_TTA], test.labels, config["CALIBRATION_BINS"], test.class_names
    )
    converged = epochs_to_reach(history["val_accuracy"], config["CONVERGED_FRACTION"])
    images = min(trained.get("TRAIN_IMAGES") or test.available, test.available)  # 0 = all
    images -= int(np.ceil(images * trained.get("VAL_FRACTION", 0)))  # as sklearn rounds
    copied = ["test_accuracy", "test_loss", "train_seconds", "images_per_second"]
    return {
        "model": column["name"], "run": settings.shown(run["dir"]),
        "seed": trained.get("SEED"), "tta": tta,
        **{f"test_accuracy_{key}": value for key, value in accuracy.items()},
        **{key: metrics.get(key) for key in copied},
        "test_cross_entropy": evaluation["cross_entropy"],
        "best_val_accuracy": history["val_accuracy"].max(),
        **history.iloc[-1][["loss", "val_loss"]].add_prefix("final_"),
        "epochs": len(history), "epochs_to_converge": converged,
        "seconds_to_converge": round(history["epoch_seconds"][:converged].sum(), 1),
        "training_images": images, "image_size": trained["IMG_SIZE"],
        "params": metrics["params"], "model_megabytes": round(megabytes, 2),
        "inference_ms_per_image": round(1000 * seconds, 4),
        "expected_calibration_error": evaluation["ece"],
    }  # fmt: skip


# ---------------------------------------------------------------------------------
# Report: figures (saved, never shown; a colour per column), tables, report.md; main()


def new_figure(rows=1, columns=1, size=(12, 4.5), **options):
    """A figure whose layout makes room for titles, labels and legends by itself."""
    options.update(figsize=size, squeeze=False, layout="constrained")
    return plt.subplots(rows, columns, **options)


def save_figure(figure, path, dpi, data_label=""):
    """Write a PNG whole or not at all and close it; `data_label` goes under the title."""
    if data_label:
        figure.suptitle(f"{figure.get_suptitle()}\n{data_label}")
    partial = path.with_name(path.name + ".partial")
    meta = {"Title": figure.get_suptitle()}
    figure.savefig(partial, format="png", dpi=dpi, bbox_inches="tight", metadata=meta)
    plt.close(figure)
    return partial.replace(path)


def plot_curves(columns):
    """curves_comparison.png: accuracy and loss per epoch of each column's first run."""
    figure, axes = new_figure(1, 2)
    for column in columns:
        history = column["runs"][0]["history"]
        history = history.set_axis(np.arange(1, len(history) + 1))  # epochs
        phases = history.get("phase", pd.Series("", history.index))
        for axis, key in zip(axes.flat, ("accuracy", "loss")):
            names = {key: f"{column['title']}, training", f"val_{key}": "validation"}
            lines = history[list(names)].rename(columns=names)
            lines.plot(ax=axis, style=["o-", "o--"], color=column["colour"], markersize=3)
            for epoch in phases.index[phases.ne(phases.shift())][1:]:  # fine-tuning
                axis.axvline(epoch - 0.5, color=column["colour"], linestyle=":")
    for axis, key in zip(axes.flat, ("accuracy", "loss (training objective)")):
        axis.set(xlabel="epoch", ylabel=key, title=f"{key}: training vs validation")
        axis.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    figure.suptitle("Learning curves (solid: training, dashed: validation)")
    return figure


def plot_confusion(column):
    """confusion_<model>.png: shares of each true class in colour, counts in cells."""
    confusion, names = column["confusion"], column["class_names"]
    side = max(7.0, 0.4 * len(names))  # room for every class
    figure, axes = new_figure(size=(1.25 * side, side))
    sns.heatmap(
        confusion / np.maximum(1, confusion.sum(axis=1, keepdims=True)), fmt="d",
        annot=confusion if len(names) <= 20 else False, square=True, ax=axes[0, 0],
        cmap=sns.light_palette(column["colour"], as_cmap=True), xticklabels=names,
        yticklabels=names, cbar_kws={"label": "share of the true class"},
    )  # fmt: skip
    axes[0, 0].set(xlabel="predicted class", ylabel="true class")
    what = f"confusion matrix on {confusion.sum():,} test images"
    figure.suptitle(f"{column['title']}: {what}, accuracy {column['accuracy']:.2%}")
    return figure


def plot_per_class_accuracy(columns):
    """per_class_accuracy.png: each class's test accuracy, the models side by side."""
    names, colours = columns[0]["class_names"], [c["colour"] for c in columns]
    accuracy = {f"{c['name']} (overall {c['accuracy']:.1%})": c["per_class_accuracy"]
                for c in columns}  # fmt: skip
    figure, axes = new_figure(size=(max(12.0, 0.45 * len(columns) * len(names)), 4.5))
    axis, turn = axes[0, 0], 45 if len(names) > 10 else 0
    pd.DataFrame(accuracy, names).plot.bar(ax=axis, color=colours, rot=turn, width=0.8)
    for bars in axis.containers:
        axis.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    axis.set(xlabel="true class", ylabel="test accuracy (recall)", ylim=(0, 1.15))
    axis.legend(loc="upper center", ncol=len(columns), fontsize=8)
    figure.suptitle("Per-class test accuracy")
    return figure


def plot_images(images, titles, captions, columns=8):
    """A grid of titled images, caption lines [(text, colour)] under each, or "none"."""
    lines, rows = max(map(len, captions), default=0), max(1, -(-len(images) // columns))
    figure, axes = new_figure(rows, columns, size=(14, (2.5 + 0.25 * lines) * rows))
    for index, axis in enumerate(axes.flat):
        axis.set(xticks=[], yticks=[], visible=index < len(images))
        axis.spines[:].set_visible(False)
    for axis, image, title, caption in zip(axes.flat, images, titles, captions):
        axis.imshow(image)
        axis.set_title(title, fontsize=9)
        # An empty label as high as the caption makes the layout leave room for it.
        axis.set_xlabel("\n" * len(caption), fontsize=9, linespacing=1.2)
        for line, (text, colour) in enumerate(caption):
            below = (0, -2 - 11 * line)  # points under the image
            axis.annotate(text, (0.5, 0), below, "axes fraction", "offset points",
                          ha="center", va="top", fontsize=9, color=colour)  # fmt: skip
    if not len(images):
        figure.text(0.5, 0.1, "none", ha="center", fontsize=14)
    return figure


def plot_misclassified(column, images, labels, count):
    """misclassified_<model>.png: the model's most confident mistakes."""
    wrong = np.flatnonzero(~column["correct"])
    picks = wrong[np.argsort(-column["confidence"][wrong], kind="stable")][:count]
    names, answers = column["class_names"], column["answers"]
    titles = [f"{names[labels[i]]}\n→ {answers[i]}" for i in picks]
    figure = plot_images(images[picks], titles, [[]] * len(picks))
    what = f"the {len(picks)} most confident of {len(wrong):,} mistakes (true → guess)"
    what = what if len(wrong) else "no misclassified test images"
    figure.suptitle(f"{column['title']}: {what}", color=column["colour"])
    return figure


def plot_test_predictions(columns, images, labels, count, seed):
    """test_predictions.png: random test images, each model's answer (✓ right)."""
    picks = np.random.default_rng(seed).permutation(len(labels))[:count]
    captions = [
        [(f"{'✓' if c['correct'][i] else '✗'} {c['answers'][i]}", c["colour"])
         for c in columns] for i in picks
    ]  # fmt: skip
    titles = [f"true: {columns[0]['class_names'][labels[i]]}" for i in picks]
    figure = plot_images(images[picks], titles, captions)
    handles = [Patch(color=column["colour"], label=column["name"]) for column in columns]
    figure.legend(handles=handles, loc="outside lower center", ncol=len(columns))
    figure.suptitle("Random test images: each model's prediction (✓ right, ✗ wrong)")
    return figure


def plot_calibration(columns):
    """calibration.png: per model, a reliability diagram over a confidence histogram."""
    size, grid = (5.5 * len(columns), 7), {"height_ratios": [3, 1]}
    figure, axes = new_figure(2, len(columns), size=size, sharex=True, gridspec_kw=grid)
    for top, bottom, column in zip(axes[0], axes[1], columns):
        table, confidence = column["calibration"], column["confidence"].mean()
        colour, width = column["colour"], 1 / len(table)
        centres = (np.arange(len(table)) + 0.5) * width
        top.bar(centres, table["accuracy"].fillna(0), width, color=colour, ec="white")
        top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy in bin")
        top.legend(loc="upper left", fontsize=8)
        what = f"ECE {column['ece']:.3f}, mean confidence {confidence:.2f}, "
        what += f"accuracy {column['accuracy']:.2f}"
        top.set_title(f"{column['title']}\n{what}", fontsize=10)
        bottom.bar(centres, table["counts"], width, color=colour, edgecolor="white")
        bottom.set(xlabel="confidence (highest predicted probability)", ylabel="images")
    figure.suptitle(f"Calibration on the test set ({FIGURE_TTA}-averaged)")
    return figure


def comparison_markdown(table, level):
    """The report's table: a column per model, its runs' mean, shares ± a t interval."""

    def cell(values, key):
        values, n = values.dropna(), values.count()
        if not n or not pd.api.types.is_numeric_dtype(values):
            return ", ".join(dict.fromkeys(map(str, values))) or "n/a"
        if not re.search("accuracy|confidence", key):
            mean = values.mean()
            return f"{mean:,.0f}" if float(mean).is_integer() else f"{mean:,.4g}"
        half = stats.t.ppf((1 + level) / 2, n - 1) * stats.sem(values) if n > 1 else 0
        each = ", ".join(f"{value:.2%}" for value in values)
        spread = f" ± {half:.2%} (n={n}: {each})" if n > 1 else ""
        return f"{values.mean():.2%}{spread}"

    groups = table.groupby("model", sort=False)  # the models in the table's order
    rows = [
        [ROW_NAMES.get(key, key.replace("_", " ")), *groups[key].agg(cell, key)]
        for key in table.columns.drop(["model", "run", "seed"])
    ]
    return settings.markdown_table(["", *table["model"].unique()], rows)


def report_markdown(columns, files, pairs, hints, test, config, argv):
    """report.md: the figures and tables in `files`, exports, run settings; no paths."""
    gpus = ", ".join(training.gpu_names()) or "no GPU"
    machine = f"{settings.cpu_name()} ({os.cpu_count()} logical cores, {gpus}), "
    machine += f"{platform.system()}, TensorFlow {tf.__version__}"
    notes = (
        "Every model is evaluated alike, without test-time augmentation (TTA) and with "
        "flip averaging (each image and its mirror image), from its `model.keras`; "
        "*recorded* figures come from each run's `metrics.json`, at the TTA level it "
        "chose. The test loss is the training objective (label smoothing included where "
        "used); the cross-entropy, without smoothing, compares models fairly. "
        f"Convergence: the first epoch at {config['CONVERGED_FRACTION']:.0%} of the best "
        "validation accuracy. A column of several seeds gives their mean; shares add ± "
        f"the half-width of the {config['INTERVAL']:.0%} Student-t confidence interval "
        "(percentage points), n and each seed; its figures show its first run. The "
        f"figures below the curves use {FIGURE_TTA}-averaged predictions. Inference: "
        f"`model.predict` in batches of {config['BATCH_SIZE']}, without TTA, resizing "
        f"and scaling included, timed once the graph was traced, on {machine}. The "
        "original report on CIFAR-10: from scratch about 72% test accuracy, training "
        "and validation loss 0.67 and 0.79; MobileNetV2 over 95%, 0.20 and 0.25. Its "
        "last row, suitability for small data, needs runs with a small `--train_images`."
    )
    runs = [(column["name"], run) for column in columns for run in column["runs"]]
    exported = [
        f"### {name} ({settings.shown(run['dir'])})\n\n" + settings.without_paths(
            (run["dir"] / "export" / "export.md").read_text().partition("\n")[2].strip(),
            run["dir"].resolve(), run["dir"])
        for name, run in runs if (run["dir"] / "export" / "export.md").is_file()
    ]  # fmt: skip
    if exported:
        exported.insert(0, "## Deployment: TensorFlow Lite\n\nFrom `python export.py`.")
    command = shlex.join(["python", "evaluate.py", *map(settings.without_paths, argv)])
    label = f" of {config['DATA_LABEL']}" if config["DATA_LABEL"] else ""
    source = settings.without_paths(test.source)
    frame = pd.DataFrame([
        {**{f"`{k.lower()}`": repr(v) for k, v in run["config"].items()},
         **{k.replace("_", " "): run["saved"].get(k, "") for k in SAVED},
         "run folder": settings.shown(run["dir"]), "model": name}
        for name, run in runs
    ])  # fmt: skip
    # The settings first, then what else config.json holds.
    frame = frame[sorted(frame, key=lambda name: not name.startswith("`"))]
    cells = frame.fillna("").map(settings.without_paths).groupby("model", sort=False)
    cells = cells.agg(lambda values: ", ".join(dict.fromkeys(values)))  # seeds' values
    tables = [name for name in files if name.endswith((".md", ".csv"))]
    blocks = [
        f"# {test.dataset}: {' vs '.join(column['name'] for column in columns)}",
        f"Made by: `{command}` on {datetime.now():%Y-%m-%d %H:%M}. Test set: "
        + f"{len(test.labels):,} images{label} from `{source}`.",
        *[f"> **Missing:** {settings.without_paths(hint)}" for hint in hints],
        f"## The comparison\n\n{files['comparison.md']}",
        notes,
        "Tables: " + ", ".join(f"[{name}]({name})" for name in tables) + ".",
        *exported,
        "## Learning curves\n\n![Learning curves](curves_comparison.png)",
        "## Confusion matrices",
        *[
            f"![Confusion matrix: {c['name']}](confusion_{c['slug']}.png)"
            for c in columns
        ],
        "## Per-class accuracy\n\n![Per-class accuracy](per_class_accuracy.png)",
        "## Most confused class pairs",
        settings.markdown_table([*pairs.columns.str.replace("_", " ")], pairs.values),
        "## Mistakes and predictions on test images",
        *[f"![Mistakes: {c['name']}](misclassified_{c['slug']}.png)" for c in columns],
        "![Random test images with predictions](test_predictions.png)",
        "## Calibration: expected calibration error (ECE), reliability diagrams",
        "![Reliability diagrams](calibration.png)",
        "## Classification reports",
        *[f"### {c['title']}\n\n```\n{c['report'].rstrip()}\n```" for c in columns],
        "## Settings of each run",
        settings.markdown_table(["setting", *cells.index], cells.T.reset_index().values),
    ]
    return "\n\n".join(blocks) + "\n"


def main(argv):
    config = training.configure(CONFIG, argv)
    check_config(config)
    run_dirs, hints = find_runs(config["OUT_DIR"], config["RUNS"])
    for hint in hints:
        print(hint)
    columns = read_columns(run_dirs)
    plots_dir = Path(config["PLOTS_DIR"]).expanduser()
    plots_dir.mkdir(parents=True, exist_ok=True)
    cache, rows = {}, []
    for column in columns:
        for run in column["runs"]:
            test = load_test_set(run, config["DATA_DIR"], cache)
            rows.append(evaluate_run(column, run, test, config))
        column.update(column["runs"][0]["evaluation"])  # its figures show its first run
    table = pd.DataFrame(rows)
    picks = (test.images, test.labels, config["SAMPLE_IMAGES"], config["SEED"])
    mistakes = (test.images, test.labels, config["MISCLASSIFIED_IMAGES"])
    files = {
        "comparison.csv": table.to_csv(index=False),
        "comparison.md": comparison_markdown(table, config["INTERVAL"]),
        "curves_comparison.png": plot_curves(columns),
        "per_class_accuracy.png": plot_per_class_accuracy(columns),
        "test_predictions.png": plot_test_predictions(columns, *picks),
        "calibration.png": plot_calibration(columns),
    }
    names, pairs = test.class_names, []
    index = pd.Index(names, name="true \\ predicted")  # confusion rows
    for column in columns:
        slug, confusion = column["slug"], column["confusion"]
        files[f"confusion_{slug}.csv"] = pd.DataFrame(confusion, index, names).to_csv()
        files[f"classification_report_{slug}.txt"] = column["report"]
        files[f"confusion_{slug}.png"] = plot_confusion(column)
        files[f"misclassified_{slug}.png"] = plot_misclassified(column, *mistakes)
        top = most_confused_pairs(confusion, config["TOP_CONFUSED_PAIRS"])
        for rank, (true, guess, count) in enumerate(top, 1):
            share = round(count / confusion[true].sum(), 4)  # of the true class's images
            pairs.append([column["name"], rank, names[true], names[guess], count, share])
    header = ["model", "rank", "true", "predicted", "images", "share_of_true_class"]
    pairs = pd.DataFrame(pairs, columns=header)
    files["confused_pairs.csv"] = pairs.to_csv(index=False)
    files["report.md"] = report_markdown(columns, files, pairs, hints, test, config, argv)
    for name, content in files.items():  # report.md last, once all it shows is there
        if name.endswith(".png"):
            save_figure(content, plots_dir / name, config["DPI"], config["DATA_LABEL"])
        else:
            settings.write_text(plots_dir / name, content)
        print(f"wrote {plots_dir / name}")
    return {
        "columns": {c["name"]: [run["dir"] for run in c["runs"]] for c in columns},
        "plots_dir": plots_dir.resolve(), "files": sorted(files), "hints": hints,
    }  # fmt: skip


if __name__ == "__main__":
    settings.cli(main)
