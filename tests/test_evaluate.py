"""evaluate.py on the session's tiny finished runs: every figure and table exists and
is valid, its numbers agree with the runs, and missing runs are reported plainly."""

import csv
import json
import os
import re
import shlex
import shutil
import time

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image
from conftest import own_stderr_lines, run_script

import data
import evaluate
import settings
import training

SCRIPTS = ("scratch_cnn", "transfer_mobilenetv2")
SHARED_FIGURES = (
    "curves_comparison.png",
    "per_class_accuracy.png",
    "confused_pairs.png",
    "test_predictions.png",
    "calibration.png",
)
SHARED_TABLES = ("comparison.csv", "comparison.md", "confused_pairs.csv", "report.md")
DATA_LABEL = "tiny set (CIFAR-10 format)"  # spaces and brackets: quoted in report.md


def figures_of(script):
    return [
        f"curves_{script}.png",
        f"confusion_{script}.png",
        f"misclassified_{script}.png",
    ]


def tables_of(script):
    return [f"confusion_{script}.csv", f"classification_report_{script}.txt"]


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def count_test_images(cifar_dir):
    return len(data.load_cifar10(cifar_dir)[3])


@pytest.fixture(scope="module")
def evaluated(scratch_run, transfer_run, cifar_dir, tmp_path_factory):
    """evaluate.py run in-process on both tiny runs, named explicitly."""
    plots_dir = tmp_path_factory.mktemp("plots")
    argv = [
        f"--scratch_run={scratch_run}",
        f"--transfer_run={transfer_run}",
        f"--data_dir={cifar_dir}",
        f"--plots_dir={plots_dir}",
        f"--data_label={DATA_LABEL}",
    ]
    return {**evaluate.main(argv), "argv": argv}


def test_every_figure_is_a_readable_picture(evaluated):
    plots_dir = evaluated["plots_dir"]
    names = [
        *SHARED_FIGURES,
        *figures_of("scratch_cnn"),
        *figures_of("transfer_mobilenetv2"),
    ]
    for name in names:
        path = plots_dir / name
        assert path.is_file(), name
        picture = matplotlib.image.imread(path)
        assert picture.ndim == 3 and min(picture.shape[:2]) >= 200, name
        assert picture.std() > 0.01, f"{name} is blank"
    assert sorted(path.name for path in plots_dir.glob("*.png")) == sorted(names)
    assert not list(plots_dir.glob("*.partial"))
    assert plt.get_fignums() == []  # every figure closed, none left to show


def test_tables_hold_what_the_runs_recorded(evaluated, scratch_run, transfer_run):
    plots_dir = evaluated["plots_dir"]
    for name in [
        *SHARED_TABLES,
        *tables_of("scratch_cnn"),
        *tables_of("transfer_mobilenetv2"),
    ]:
        assert (plots_dir / name).is_file() and (
            plots_dir / name
        ).stat().st_size > 50, name

    rows = {row["script"]: row for row in read_csv(plots_dir / "comparison.csv")}
    assert set(rows) == set(SCRIPTS)
    for script, run_dir in (
        ("scratch_cnn", scratch_run),
        ("transfer_mobilenetv2", transfer_run),
    ):
        row = rows[script]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        history = training.read_history(run_dir)
        assert row["run"] == str(run_dir)
        assert float(row["test_accuracy"]) == metrics["test_accuracy"]
        assert float(row["test_loss"]) == metrics["test_loss"]
        assert float(row["best_val_accuracy"]) == metrics["best_val_accuracy"]
        assert int(row["params"]) == metrics["params"]
        assert int(row["epochs"]) == len(history)
        assert float(row["final_val_loss"]) == history[-1]["val_loss"]
        assert 1 <= int(row["epochs_to_converge"]) <= len(history)
        assert 0 <= float(row["recomputed_test_accuracy"]) <= 1
        assert float(row["inference_ms_per_image"]) > 0
        assert float(row["model_megabytes"]) > 0
        assert 0 <= float(row["expected_calibration_error"]) <= 1
    # The scratch CNN is confident enough that batch size cannot flip its answers.
    scratch = rows["scratch_cnn"]
    assert (
        abs(float(scratch["recomputed_test_accuracy"]) - float(scratch["test_accuracy"]))
        < 0.02
    )

    table = (plots_dir / "comparison.md").read_text()
    assert "test accuracy (recorded)" in table and "inference, ms per image" in table
    assert table.count("\n|") >= 15


def test_every_figure_names_the_data_and_the_report_its_exact_command(evaluated):
    """Each figure's title ends with the data label on a line of its own (read back
    from the PNG's Title metadata, which is the title drawn); the report's command
    pastes into a shell as it ran, the label's spaces and brackets quoted."""
    plots_dir = evaluated["plots_dir"]
    pictures = sorted(plots_dir.glob("*.png"))
    assert len(pictures) == len(SHARED_FIGURES) + 2 * len(figures_of("scratch_cnn"))
    for path in pictures:
        heading, label = Image.open(path).text["Title"].rsplit("\n", 1)
        assert heading.strip() and label == DATA_LABEL, path.name
    report = (plots_dir / "report.md").read_text()
    command = re.search(r"Made by `([^`]*)`", report).group(1)
    assert shlex.split(command) == ["python", "evaluate.py", *evaluated["argv"]]
    assert f"images of {DATA_LABEL} from" in report


def test_confusion_matrices_count_every_test_image(evaluated, cifar_dir):
    plots_dir, images = evaluated["plots_dir"], count_test_images(cifar_dir)
    for script in SCRIPTS:
        rows = read_csv(plots_dir / f"confusion_{script}.csv")
        assert [row["true \\ predicted"] for row in rows] == list(data.CLASS_NAMES)
        counts = np.array([[int(row[name]) for name in data.CLASS_NAMES] for row in rows])
        assert counts.sum() == images
        report = (plots_dir / f"classification_report_{script}.txt").read_text()
        assert all(name in report for name in data.CLASS_NAMES)
        assert f"{images}" in report.splitlines()[-1]  # weighted avg support
    for row in read_csv(plots_dir / "confused_pairs.csv"):
        assert row["true"] != row["predicted"] and int(row["images"]) > 0


def test_report_shows_every_figure_and_table(evaluated):
    plots_dir = evaluated["plots_dir"]
    report = (plots_dir / "report.md").read_text()
    for path in plots_dir.glob("*.png"):
        assert f"]({path.name})" in report, path.name
    for name in ("comparison.csv", "comparison.md", "confusion_scratch_cnn.csv"):
        assert f"]({name})" in report
    assert "this machine" in report and "ECE" in report
    assert "`img_size`" in report  # each run's settings
    assert "> **Missing:**" not in report


def test_newest_finished_run_of_each_script_is_found(scratch_run, transfer_run, tmp_path):
    """Of an older and a newer finished run, the newer; an unfinished one, even
    newer still, is passed over."""
    newest = {}
    for script, run in (
        ("scratch_cnn", scratch_run),
        ("transfer_mobilenetv2", transfer_run),
    ):
        for age, name in ((300, "older"), (200, "newer"), (100, "unfinished")):
            copy = tmp_path / script / name
            shutil.copytree(run, copy)
            if name == "unfinished":
                (copy / "metrics.json").unlink()
            stamp = time.time() - age
            os.utime(copy, (stamp, stamp))
        newest[script] = tmp_path / script / "newer"
    runs, hints = evaluate.find_runs(tmp_path, {})
    assert hints == []
    assert runs == newest


def test_one_missing_model_is_evaluated_alone_with_a_hint(
    scratch_run, cifar_dir, tmp_path, capsys
):
    out_dir = tmp_path / "runs"
    shutil.copytree(scratch_run, out_dir / "scratch_cnn" / scratch_run.name)
    plots_dir = tmp_path / "plots"
    result = evaluate.main(
        [f"--out_dir={out_dir}", f"--data_dir={cifar_dir}", f"--plots_dir={plots_dir}"]
    )
    hint = (
        f"no finished transfer_mobilenetv2 run in {out_dir}/; make one with: "
        f"python transfer_mobilenetv2.py --out_dir={out_dir}"
    )
    assert capsys.readouterr().out.splitlines().count(hint) == 1
    assert result["hints"] == [hint]
    assert set(result["runs"]) == {"scratch_cnn"}
    for name in [*SHARED_FIGURES, *SHARED_TABLES, *figures_of("scratch_cnn")]:
        assert (plots_dir / name).is_file(), name
    assert not list(plots_dir.glob("*transfer_mobilenetv2*"))
    rows = read_csv(plots_dir / "comparison.csv")
    assert [row["script"] for row in rows] == ["scratch_cnn"]
    assert hint in (plots_dir / "report.md").read_text()


def test_no_runs_exit_3_naming_both_commands(tmp_path):
    result = run_script(
        "evaluate.py", f"--out_dir={tmp_path}", f"--plots_dir={tmp_path / 'plots'}"
    )
    assert result.returncode == settings.EXIT_DATA, result.stderr
    assert "Traceback" not in result.stderr
    lines = own_stderr_lines(result.stderr)
    assert 1 <= len(lines) <= 2, lines
    assert "python scratch_cnn.py" in lines[-1]
    assert "python transfer_mobilenetv2.py" in lines[-1]
    assert not (tmp_path / "plots").exists()


def test_a_folder_that_is_no_finished_run_is_refused(scratch_run, transfer_run, tmp_path):
    with pytest.raises(settings.ConfigError, match="not a run folder"):
        evaluate.main([f"--scratch_run={tmp_path}"])
    with pytest.raises(settings.ConfigError, match="--transfer_run="):
        evaluate.main([f"--scratch_run={transfer_run}"])
    unfinished = tmp_path / "unfinished"
    shutil.copytree(scratch_run, unfinished)
    (unfinished / "metrics.json").unlink()
    with pytest.raises(settings.ConfigError, match="--resume="):
        evaluate.main([f"--scratch_run={unfinished}"])


def test_calibration_error_measures_the_gap_between_confidence_and_accuracy():
    correct = np.array([True, True, False, False])
    assert evaluate.expected_calibration_error(np.full(4, 0.5), correct, 10) == 0.0
    assert evaluate.expected_calibration_error(np.ones(4), correct, 10) == 0.5
    assert evaluate.expected_calibration_error(np.ones(4), ~correct | True, 10) == 0.0
    bins = evaluate.calibration_bins(np.array([0.05, 0.95, 1.0]), correct[:3], 10)
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
    run = {"script": "scratch_cnn", "dir": tmp_path, "config": {}}
    figure = evaluate.plot_misclassified(
        run, evaluation, np.zeros((20, 32, 32, 3), np.uint8), labels, 24
    )
    path = evaluate.save_figure(figure, tmp_path / "misclassified.png", 100)
    assert min(matplotlib.image.imread(path).shape[:2]) >= 200
