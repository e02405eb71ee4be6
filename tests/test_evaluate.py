"""evaluate.py on the session's tiny finished runs: every figure and table exists and
is valid, its numbers agree with the runs, seeds of one setting form one column with
a mean and an interval, no path of this machine is written, and missing or wrong runs
are reported plainly."""

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, own_stderr_lines, run_script
from PIL import Image
from scipy import stats

import data
import evaluate
import settings
import training

DATA_LABEL = "tiny set (CIFAR-10 format)"  # spaces and brackets: quoted in report.md
SCRATCH, FROM_FILE, RANDOM = (
    "CNN from scratch",
    "MobileNetV2, weights from base.weights.h5",
    "MobileNetV2, random start",
)
SLUGS = ("cnn_from_scratch", "mobilenetv2_weights_from_base_weights_h5",
         "mobilenetv2_random_start")  # fmt: skip
SHARED_FIGURES = ("curves_comparison.png", "per_class_accuracy.png",
                  "test_predictions.png", "calibration.png")  # fmt: skip
SHARED_TABLES = ("comparison.csv", "comparison.md", "confused_pairs.csv", "report.md")
RECORDED_SEEDS = {1: 0.1234, 2: 0.4567}  # never a recomputed share of 100 images


def figures_of(slug):
    return [f"confusion_{slug}.png", f"misclassified_{slug}.png"]


def tables_of(slug):
    return [f"confusion_{slug}.csv", f"classification_report_{slug}.txt"]


def edit_json(path, **changes):
    payload = json.loads(path.read_text())
    for key, value in changes.items():
        target = payload["config"] if key.isupper() else payload
        target[key] = value
    path.write_text(json.dumps(payload))


@pytest.fixture(scope="module")
def random_start_run(transfer_run, tmp_path_factory):
    """The third kind of model, cheaply: a copy of the session's MobileNetV2 run whose
    config.json says it started from random weights (evaluate.py names and groups
    runs by what config.json says, and predicts with the model.keras beside it)."""
    copy = tmp_path_factory.mktemp("random-start") / transfer_run.name
    shutil.copytree(transfer_run, copy)
    edit_json(copy / "config.json", WEIGHTS="none", weights_file=None)
    return copy


@pytest.fixture(scope="module")
def seed_runs(scratch_run, tmp_path_factory):
    """The scratch run and two copies of it posing as seeds 1 and 2 of the same
    setting, with other recorded test accuracies; seed 1 was exported, and its
    export.md names its folder by its absolute path."""
    runs = [scratch_run]
    for seed, accuracy in RECORDED_SEEDS.items():
        copy = tmp_path_factory.mktemp("seeds") / f"{scratch_run.name}-seed{seed}"
        shutil.copytree(scratch_run, copy)
        edit_json(copy / "config.json", SEED=seed)
        edit_json(copy / "metrics.json", test_accuracy=accuracy)
        runs.append(copy)
    (runs[1] / "export").mkdir()
    (runs[1] / "export" / "export.md").write_text(
        f"# Export\n\nMade by: `python export.py --run={runs[1]}`\n\n| form | MB |\n"
        "|---|---|\n| float16 | 0.1 |\n"
    )
    return runs


@pytest.fixture(scope="module")
def evaluated(seed_runs, transfer_run, random_start_run, tmp_path_factory):
    """evaluate.py in-process on five runs of three kinds, named by --runs relative
    to the current folder (pytest's base folder, which holds them all)."""
    base = tmp_path_factory.getbasetemp()
    plots_dir = tmp_path_factory.mktemp("plots")
    runs = [*seed_runs, transfer_run, random_start_run]
    argv = [
        "--runs=" + ",".join(str(run.relative_to(base)) for run in runs),
        f"--plots_dir={plots_dir.relative_to(base)}",
        f"--data_label={DATA_LABEL}",
    ]
    output = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(output):
        patch.chdir(base)
        result = evaluate.main(argv)
    return {
        **result,
        "argv": argv,
        "runs": runs,
        "base": base,
        "output": output.getvalue(),
    }


def read_csv(path):
    return pd.read_csv(path, keep_default_na=False).to_dict("records")


def table_row(table, name):
    """The line of a Markdown table whose first cell is `name`."""
    return next(line for line in table.splitlines() if line.startswith(f"| {name} |"))


def test_every_figure_is_a_readable_picture(evaluated):
    plots_dir = evaluated["plots_dir"]
    names = [*SHARED_FIGURES, *(name for slug in SLUGS for name in figures_of(slug))]
    for name in names:
        picture = matplotlib.image.imread(plots_dir / name)
        assert picture.ndim == 3 and min(picture.shape[:2]) >= 200, name
        assert picture.std() > 0.01, f"{name} is blank"
    assert sorted(path.name for path in plots_dir.glob("*.png")) == sorted(names)
    assert not list(plots_dir.glob("*.partial"))
    assert plt.get_fignums() == []  # every figure closed, none left to show


def test_three_kinds_are_three_columns_named_by_what_they_are(evaluated):
    runs = [run.relative_to(evaluated["base"]) for run in evaluated["runs"]]
    assert evaluated["columns"] == {
        SCRATCH: runs[:3],
        FROM_FILE: [runs[3]],
        RANDOM: [runs[4]],
    }
    table = (evaluated["plots_dir"] / "comparison.md").read_text()
    assert table.splitlines()[0] == f"|  | {SCRATCH} | {FROM_FILE} | {RANDOM} |"
    assert "scratch_cnn" not in table and "transfer_mobilenetv2" not in table
    # Rows a reader understands, not the CSV's column names.
    rows = ("test accuracy, one view", "test accuracy, flip-averaged",
            "test accuracy, recorded (the run's own level)",
            "the run's test-time augmentation", "inference, ms per image",
            "expected calibration error")  # fmt: skip
    for row in rows:
        assert f"\n| {row} |" in table
    assert "\n| test_accuracy" not in table
    assert table.count("\n|") >= 20


def test_tables_hold_what_the_runs_recorded(evaluated):
    plots_dir, base = evaluated["plots_dir"], evaluated["base"]
    for name in [*SHARED_TABLES, *(name for slug in SLUGS for name in tables_of(slug))]:
        assert (plots_dir / name).stat().st_size > 50, name
    rows = read_csv(plots_dir / "comparison.csv")
    assert [row["run"] for row in rows] == [
        str(run.relative_to(base)) for run in evaluated["runs"]
    ]
    for row, run_dir in zip(rows, evaluated["runs"]):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        history = training.read_history(run_dir)
        assert row["tta"] == metrics["tta"]
        for key in ("test_accuracy", "test_loss", "best_val_accuracy", "params"):
            assert row[key] == pytest.approx(metrics[key]), key
        assert row["epochs"] == len(history)
        assert row["final_val_loss"] == pytest.approx(history[-1]["val_loss"])
        assert 1 <= row["epochs_to_converge"] <= len(history)
        assert 0 <= row["test_accuracy_none"] <= 1 and 0 <= row["test_accuracy_flip"] <= 1
        assert row["inference_ms_per_image"] > 0 and row["model_megabytes"] > 0
        assert 0 <= row["expected_calibration_error"] <= 1
    # The scratch CNN is confident enough that batch size cannot flip its answers:
    # recomputed at each level, its accuracy is what its training recorded.
    scratch = json.loads((evaluated["runs"][0] / "metrics.json").read_text())
    for level in ("none", "flip"):
        recorded = scratch[f"test_accuracy_tta_{level}"]
        assert abs(rows[0][f"test_accuracy_{level}"] - recorded) < 0.02


def test_seeds_of_one_setting_give_a_mean_a_t_interval_and_each_value(evaluated):
    recorded = [json.loads((run / "metrics.json").read_text())["test_accuracy"]
                for run in evaluated["runs"][:3]]  # fmt: skip
    mean, half = np.mean(recorded), stats.t.ppf(0.975, 2) * stats.sem(recorded)
    each = ", ".join(f"{value:.2%}" for value in recorded)
    table = (evaluated["plots_dir"] / "comparison.md").read_text()
    row = table_row(table, "test accuracy, recorded (the run's own level)")
    assert row.split(" | ")[1] == f"{mean:.2%} ± {half:.2%} (n=3: {each})"
    # The copies hold the same model: recomputed, their accuracies agree exactly;
    # only the copies' recorded accuracies differ from the recomputed ones.
    row = table_row(table, "test accuracy, one view")
    assert "± 0.00% (n=3: " in row.split(" | ")[1]
    warned = [line for line in evaluated["output"].splitlines() if "warning" in line]
    assert [sum(f"-seed{seed}: test accuracy" in line for line in warned)
            for seed in (1, 2)] == [1, 1], warned  # fmt: skip
    assert not [line for line in warned if f"{evaluated['runs'][0].name}:" in line]
    # The column's figures show its first run, and say so.
    title = Image.open(evaluated["plots_dir"] / f"confusion_{SLUGS[0]}.png").text["Title"]
    assert title.startswith(f"{SCRATCH}, seed 0 of 0, 1, 2: confusion matrix")


def test_every_figure_names_the_data_and_the_report_its_exact_command(evaluated):
    """Each figure's title ends with the data label on a line of its own (read back
    from the PNG's Title metadata, which is the title drawn); the report's command
    pastes into a shell as it ran, the label's spaces and brackets quoted."""
    for path in evaluated["plots_dir"].glob("*.png"):
        heading, label = Image.open(path).text["Title"].rsplit("\n", 1)
        assert heading.strip() and label == DATA_LABEL, path.name
    report = (evaluated["plots_dir"] / "report.md").read_text()
    command = re.search(r"Made by: `([^`]*)`", report).group(1)
    assert shlex.split(command) == ["python", "evaluate.py", *evaluated["argv"]]
    assert f"images of {DATA_LABEL} from" in report


def test_no_path_of_this_machine_is_written(evaluated, cifar_dir):
    """Runs show relative to the current folder, data and weights by name; an
    export table's absolute path too."""
    machine = (str(evaluated["base"]), str(cifar_dir), str(REPO), tempfile.gettempdir())
    for path in evaluated["plots_dir"].iterdir():
        if path.suffix in (".md", ".csv", ".txt"):
            text = path.read_text()
            assert not [part for part in machine if part in text], path.name
    report = (evaluated["plots_dir"] / "report.md").read_text()
    exported = evaluated["runs"][1].relative_to(evaluated["base"])
    assert f"--run={exported}`" in report  # the export table's own path
    assert "| float16 | 0.1 |" in report and "## Deployment" in report
    assert f"| {evaluated['runs'][0].relative_to(evaluated['base'])}, " in report
    assert "base.weights.h5" in report  # the weights file, by name


def test_confusion_matrices_count_every_test_image(evaluated, cifar_dir):
    plots_dir, images = evaluated["plots_dir"], len(data.load_cifar10(cifar_dir)[3])
    for slug in SLUGS:
        rows = read_csv(plots_dir / f"confusion_{slug}.csv")
        assert [row["true \\ predicted"] for row in rows] == list(data.CLASS_NAMES)
        assert sum(row[name] for row in rows for name in data.CLASS_NAMES) == images
        report = (plots_dir / f"classification_report_{slug}.txt").read_text()
        assert all(name in report for name in data.CLASS_NAMES)
        assert f"{images}" in report.splitlines()[-1]  # weighted avg support
    for row in read_csv(plots_dir / "confused_pairs.csv"):
        assert row["true"] != row["predicted"] and row["images"] > 0


def test_report_shows_every_figure_and_table(evaluated):
    plots_dir = evaluated["plots_dir"]
    report = (plots_dir / "report.md").read_text()
    for path in plots_dir.glob("*.png"):
        assert f"]({path.name})" in report, path.name
    for name in ("comparison.csv", "comparison.md", f"confusion_{SLUGS[0]}.csv"):
        assert f"]({name})" in report
    assert "ECE" in report and "`img_size`" in report  # each run's settings
    assert f"timed once the graph was traced, on {settings.cpu_name()}" in report
    assert "> **Missing:**" not in report


def test_newest_finished_run_of_each_kind_is_found_by_name(
    scratch_run, transfer_run, tmp_path
):
    """Run folders are timestamps: the newest is the last by name, whatever the
    folders' modification times; an unfinished one is passed over."""
    folders = [
        ("scratch_cnn", "20250101-000000", {}),
        ("scratch_cnn", "20250102-000000", {}),
        ("scratch_cnn", "20250103-000000", None),  # unfinished
        ("transfer_mobilenetv2", "20250101-000000", {"WEIGHTS": "imagenet"}),
        ("transfer_mobilenetv2", "20250102-000000", {"WEIGHTS": "none"}),
        ("transfer_mobilenetv2", "20250103-000000", {"WEIGHTS": "imagenet"}),
    ]
    for age, (script, name, changes) in enumerate(folders):
        source = scratch_run if script == "scratch_cnn" else transfer_run
        folder = tmp_path / script / name
        folder.mkdir(parents=True)
        for file in ("config.json", "metrics.json")[: 1 if changes is None else 2]:
            shutil.copy(source / file, folder / file)
        edit_json(folder / "config.json", **(changes or {}))
        stamp = 1e9 - 1000 * age  # older by name is newer by time
        os.utime(folder, (stamp, stamp))
    runs, hints = evaluate.find_runs(tmp_path, "")
    assert hints == []
    assert runs == [
        tmp_path / "scratch_cnn" / "20250102-000000",
        tmp_path / "transfer_mobilenetv2" / "20250103-000000",
        tmp_path / "transfer_mobilenetv2" / "20250102-000000",
    ]


def test_missing_kinds_each_get_a_hint_and_the_rest_is_evaluated(
    scratch_run, cifar_dir, tmp_path, capsys
):
    out_dir = tmp_path / "runs"
    shutil.copytree(scratch_run, out_dir / "scratch_cnn" / scratch_run.name)
    plots_dir = tmp_path / "plots"
    result = evaluate.main(
        [f"--out_dir={out_dir}", f"--data_dir={cifar_dir}", f"--plots_dir={plots_dir}"]
    )
    commands = {
        "MobileNetV2, ImageNet weights": "python transfer_mobilenetv2.py",
        "MobileNetV2, random start": "python transfer_mobilenetv2.py --weights=none",
    }
    hints = [
        f'no finished run of "{kind}" in {out_dir}/; make one with: {command} '
        f"--out_dir={out_dir}"
        for kind, command in commands.items()
    ]
    printed = capsys.readouterr().out.splitlines()
    assert [printed.count(hint) for hint in hints] == [1, 1]
    assert result["hints"] == hints and list(result["columns"]) == [SCRATCH]
    for name in [*SHARED_FIGURES, *SHARED_TABLES, *figures_of(SLUGS[0])]:
        assert (plots_dir / name).is_file(), name
    assert not list(plots_dir.glob("*mobilenetv2*"))
    assert [row["model"] for row in read_csv(plots_dir / "comparison.csv")] == [SCRATCH]
    report = (plots_dir / "report.md").read_text()
    assert report.count("> **Missing:**") == 2 and str(tmp_path) not in report
    assert "make one with: python transfer_mobilenetv2.py --weights=none" in report


def test_no_runs_is_exit_3_naming_the_commands(tmp_path):
    """As a user sees it: one or two lines naming what to do, no traceback."""
    result = run_script(
        "evaluate.py", f"--out_dir={tmp_path}", f"--plots_dir={tmp_path / 'plots'}"
    )
    assert result.returncode == settings.EXIT_DATA, result.stderr
    assert "Traceback" not in result.stderr
    lines = own_stderr_lines(result.stderr)
    assert 1 <= len(lines) <= 2, lines
    for command in ("python scratch_cnn.py", "python transfer_mobilenetv2.py",
                    "python transfer_mobilenetv2.py --weights=none"):  # fmt: skip
        assert command in lines[-1]
    assert not (tmp_path / "plots").exists()


def test_a_folder_that_is_no_finished_run_is_exit_2(
    scratch_run, tmp_path, monkeypatch, capsys
):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(scratch_run, unfinished)
    (unfinished / "metrics.json").unlink()
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's SIGTERM
    for runs, words in ((tmp_path, "not a run folder"), (unfinished, "--resume=")):
        monkeypatch.setattr(sys, "argv", ["evaluate.py", f"--runs={scratch_run},{runs}"])
        with pytest.raises(SystemExit) as stop:
            settings.cli(evaluate.main)
        lines = capsys.readouterr().err.splitlines()
        assert stop.value.code == settings.EXIT_CONFIG and len(lines) == 1, lines
        assert f"--runs={runs}: " in lines[0] and words in lines[0], lines


def test_paths_are_shown_without_this_machine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert settings.shown(tmp_path / "runs" / "a") == "runs/a"
    assert settings.shown("/somewhere/else/run") == "run"
    text = f"CIFAR-10 from {tmp_path}/data, '/device:CPU:0', {tmp_path / 'a b'}/x"
    assert settings.without_paths(text, tmp_path / "a b") == (
        "CIFAR-10 from data, '/device:CPU:0', a b/x"
    )


def test_calibration_error_measures_the_gap_between_confidence_and_accuracy():
    correct = np.array([True, True, False, False])
    assert evaluate.calibration_bins(np.full(4, 0.5), correct, 10)[1] == 0.0
    assert evaluate.calibration_bins(np.ones(4), correct, 10)[1] == 0.5
    assert evaluate.calibration_bins(np.ones(4), ~correct | True, 10)[1] == 0.0
    bins, _ = evaluate.calibration_bins(np.array([0.05, 0.95, 1.0]), correct[:3], 10)
    assert bins["counts"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 2]


def test_convergence_and_confused_pairs():
    assert evaluate.epochs_to_reach([0.2, 0.5, 0.96, 1.0, 0.99], 0.95) == 3
    assert evaluate.epochs_to_reach([0.5], 0.95) == 1
    confusion = np.array([[5, 3, 0], [1, 6, 0], [0, 4, 2]])
    assert evaluate.most_confused_pairs(confusion, 2) == [(2, 1, 4), (0, 1, 3)]
    assert evaluate.most_confused_pairs(np.eye(3, dtype=int), 5) == []


def test_a_model_without_mistakes_still_gets_its_figure(tmp_path):
    labels = np.arange(20) % 10
    evaluation = evaluate.evaluate_predictions(np.eye(10)[labels], labels, 10)
    assert evaluation["accuracy"] == 1.0 and evaluation["ece"] == 0.0
    column = {**evaluation, "title": SCRATCH, "colour": "C0"}
    images = np.zeros((20, 32, 32, 3), np.uint8)
    figure = evaluate.plot_misclassified(column, images, labels, 24)
    path = evaluate.save_figure(figure, tmp_path / "misclassified.png", 100)
    assert min(matplotlib.image.imread(path).shape[:2]) >= 200
