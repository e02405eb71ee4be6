"""export.py on copies of the session's tiny finished runs: every TensorFlow Lite form
is written, measured and sane, float32 keeps the Keras model's accuracy, int8 is int8
at both ends, evaluate.py shows the table, and bad input writes nothing."""

import csv
import re
import shlex
import shutil
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import own_stderr_lines, run_script

import evaluate
import export
import settings
import training

FORMS = ("float32", "float16", "dynamic_int8", "int8")
QUICK = ["--latency_runs=5", "--warmup_runs=1", "--calibration_images=64"]


def read_rows(run_dir):
    with open(run_dir / "export" / "export.csv", newline="") as file:
        return {row["form"]: row for row in csv.DictReader(file)}


def copy_run(run_dir, root):
    """A copy of a run folder, so exporting never changes the shared session runs."""
    return shutil.copytree(run_dir, root / run_dir.parent.name / run_dir.name)


@pytest.fixture(scope="module")
def exported(scratch_run, transfer_run, cifar_dir, tmp_path_factory):
    """{script: run folder copy} after export.py ran on each, in-process: every form
    of the scratch CNN; float32 alone of MobileNetV2, whose 150-layer graph takes
    seconds of CPU per conversion, and its Keras model timed on all cores only. The
    copies' folder has a space in its name, as a user's "My runs" may."""
    root = tmp_path_factory.mktemp("export runs")
    copies = {}
    for script, run_dir, options in (
        ("scratch_cnn", scratch_run, [f"--forms={','.join(FORMS)}"]),
        ("transfer", transfer_run, ["--forms=float32", "--keras_one_thread=False"]),
    ):
        copies[script] = copy_run(run_dir, root)
        export.main(
            [f"--run={copies[script]}", f"--data_dir={cifar_dir}", *options, *QUICK]
        )
    return copies


def test_every_form_is_written_and_measured(exported):
    run_dir = exported["scratch_cnn"]
    folder = run_dir / "export"
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        [f"{form}.tflite" for form in FORMS] + ["export.csv", "export.md"]
    )
    assert not list(run_dir.glob(".export*")), "a temporary folder was left behind"
    command = re.search(r"Made by `([^`]*)`", (folder / "export.md").read_text())[1]
    assert shlex.split(command)[:3] == ["python", "export.py", f"--run={run_dir}"]
    rows = read_rows(run_dir)
    assert list(rows) == ["keras", *FORMS]
    size = {form: float(row["megabytes"]) for form, row in rows.items()}
    for form in FORMS:
        on_disk = (folder / f"{form}.tflite").stat().st_size / 1e6
        assert size[form] == pytest.approx(on_disk)
    # float16 halves the float32 weights, int8 quarters them.
    assert size["float16"] < 0.7 * size["float32"]
    assert size["dynamic_int8"] < 0.7 * size["float16"]
    assert size["int8"] < 0.7 * size["float16"]
    for row in rows.values():
        assert 0 < float(row["ms_per_image_1_thread"]) < 10_000
        assert 0 < float(row["ms_per_image_all_cores"]) < 10_000
        assert 0 <= float(row["test_accuracy"]) <= 1
    assert float(rows["keras"]["agreement_with_keras"]) == 1.0


@pytest.mark.parametrize("script", ["scratch_cnn", "transfer"])
def test_float32_keeps_the_keras_accuracy_on_the_run_test_set(exported, script):
    rows = read_rows(exported[script])
    keras_accuracy = float(rows["keras"]["test_accuracy"])
    # The same test set and preprocessing as the run: its recorded accuracy back
    # (export predicts each image once, so the run's figure without flip averaging).
    metrics = evaluate.read_json(exported[script] / "metrics.json")
    recorded = metrics.get("test_accuracy_without_tta", metrics["test_accuracy"])
    assert keras_accuracy == pytest.approx(recorded, abs=1e-6)
    assert abs(float(rows["float32"]["test_accuracy"]) - keras_accuracy) <= 0.001
    assert float(rows["float32"]["agreement_with_keras"]) >= 0.99


def test_only_the_chosen_forms_are_made(exported):
    folder = exported["transfer"] / "export"
    assert sorted(path.name for path in folder.iterdir()) == [
        "export.csv",
        "export.md",
        "float32.tflite",
    ]
    rows = read_rows(exported["transfer"])
    assert list(rows) == ["keras", "float32"]
    assert rows["keras"]["ms_per_image_1_thread"] == ""  # --keras_one_thread=False
    assert "not measured" in (folder / "export.md").read_text()


def test_int8_model_takes_and_gives_int8(exported):
    interpreter = tf.lite.Interpreter(
        model_path=str(exported["scratch_cnn"] / "export" / "int8.tflite")
    )
    inputs = interpreter.get_input_details()[0]
    outputs = interpreter.get_output_details()[0]
    assert inputs["dtype"] == np.int8 and outputs["dtype"] == np.int8
    assert inputs["quantization"][0] > 0 and outputs["quantization"][0] > 0
    # Its input scale spans the scratch CNN's [0, 1] inputs in 256 steps.
    assert inputs["quantization"][0] == pytest.approx(1 / 255, rel=0.05)


def test_report_gains_the_export_table(exported, tmp_path):
    result = evaluate.main(
        [
            f"--scratch_run={exported['scratch_cnn']}",
            f"--out_dir={tmp_path / 'no-runs'}",
            f"--plots_dir={tmp_path / 'plots'}",
        ]
    )
    report = (result["plots_dir"] / "report.md").read_text()
    assert "## Deployment: TensorFlow Lite" in report
    table = (exported["scratch_cnn"] / "export" / "export.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 1 + len(FORMS)  # header, Keras, each form
    for line in rows:
        assert line in report


def test_a_model_that_does_not_load_exits_3_and_writes_nothing(scratch_run, tmp_path):
    run_dir = copy_run(scratch_run, tmp_path)
    (run_dir / "model.keras").write_bytes(b"not a zip file")
    (run_dir / "export").mkdir()
    (run_dir / "export" / "float32.tflite").write_bytes(b"an earlier export")
    before = sorted(str(path) for path in run_dir.rglob("*"))
    result = run_script("export.py", f"--run={run_dir}", *QUICK)
    assert result.returncode == settings.EXIT_DATA
    lines = own_stderr_lines(result.stderr)
    assert len(lines) == 1 and "model.keras: cannot be loaded" in lines[0], lines
    assert sorted(str(path) for path in run_dir.rglob("*")) == before
    assert (run_dir / "export" / "float32.tflite").read_bytes() == b"an earlier export"


def test_a_folder_that_is_no_finished_run_exits_3(
    scratch_run, tmp_path, monkeypatch, capsys
):
    unfinished = copy_run(scratch_run, tmp_path)
    (unfinished / "metrics.json").unlink()
    for folder, says in (
        (unfinished, "has not finished"),
        (tmp_path / "empty", "not a run folder"),
    ):
        folder.mkdir(exist_ok=True)
        before = sorted(folder.rglob("*"))
        monkeypatch.setattr(sys, "argv", ["export.py", f"--run={folder}"])
        with pytest.raises(SystemExit) as stopped:
            training.cli(export.main)
        assert stopped.value.code == settings.EXIT_DATA
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and says in error[0], error
        assert sorted(folder.rglob("*")) == before


def test_an_existing_export_survives_a_failed_export(
    exported, cifar_dir, tmp_path, monkeypatch
):
    run_dir = copy_run(exported["scratch_cnn"], tmp_path)
    before = {path.name: path.read_bytes() for path in (run_dir / "export").iterdir()}
    convert = export.convert

    def float16_fails(model, form, calibration):
        # After float32 has converted and been written into the new folder.
        if form == "float16":
            raise settings.DataError(
                "the float16 conversion failed (made to by a test)"
            )
        return convert(model, form, calibration)

    monkeypatch.setattr(export, "convert", float16_fails)
    with pytest.raises(settings.DataError, match="float16 conversion failed"):
        export.main([f"--run={run_dir}", f"--data_dir={cifar_dir}", *QUICK])
    after = {path.name: path.read_bytes() for path in (run_dir / "export").iterdir()}
    assert after == before
    assert not list(run_dir.glob(".export*")), "a temporary folder was left behind"
