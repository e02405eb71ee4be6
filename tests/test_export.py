"""export.py on copies of the session's tiny finished runs: every TensorFlow Lite form
is written, measured and sane, float32 keeps the Keras model's single-pass accuracy,
int8 is int8 at both ends, export.json agrees with export.csv, export.md holds no
machine path, evaluate.py shows the table, and bad input writes nothing."""

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from conftest import OFFLINE_ENV, REPO, own_stderr_lines, run_script

import export
import settings
import training

FORMS = ("float32", "float16", "dynamic_int8", "int8")
QUICK = ["--latency_runs=3", "--warmup_runs=1", "--calibration_images=32"]
# The keys study.py reads from export.json, "<form>_<measure>".
CONTRACT = ("megabytes", "test_accuracy", "agreement", "ms_one_thread", "ms_all_cores")
# A path from the root of a file system: "/tmp/...", "/root/..." (not "ms/image").
ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/[\w.~-]+/")

# Runs a script as __main__ and reports on stderr, as it exits, whether TensorFlow
# was imported by then (as tests/test_cli.py does).
TRACE_IMPORTS = textwrap.dedent("""
    import atexit, runpy, sys
    def report():
        print("tensorflow imported:", "tensorflow" in sys.modules, file=sys.stderr)
    atexit.register(report)
    sys.argv = sys.argv[1:]
    sys.path.insert(0, sys.argv[0].rpartition("/")[0])
    runpy.run_path(sys.argv[0], run_name="__main__")
    """)


def read_rows(run_dir):
    with open(run_dir / "export" / "export.csv", newline="") as file:
        return {row["form"]: row for row in csv.DictReader(file)}


def made_by(run_dir):
    """The command export.md says made it, split as a shell would."""
    text = (run_dir / "export" / "export.md").read_text()
    return shlex.split(re.search(r"Made by `([^`]*)`", text)[1])


def copy_run(run_dir, root):
    """A copy of a run folder, so exporting never changes the shared session runs."""
    return shutil.copytree(run_dir, root / run_dir.parent.name / run_dir.name)


@pytest.fixture(scope="module")
def exported(scratch_run, transfer_run, cifar_dir, tmp_path_factory):
    """{script: run folder copy} after export.py ran on each, in-process: every form
    of the scratch CNN, from the folder above its copy ("My runs", a space in its name,
    so export.md shows a relative path); float32 alone of MobileNetV2, whose 150-layer
    graph takes seconds of CPU per conversion, its Keras model timed on all cores only,
    from an unrelated folder (export.md shows the run by its name)."""
    root = tmp_path_factory.mktemp("export")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    copies = {}
    with pytest.MonkeyPatch.context() as patch:
        for script, run_dir, cwd, options in (
            ("scratch_cnn", scratch_run, root, [f"--forms={','.join(FORMS)}"]),
            (
                "transfer",
                transfer_run,
                elsewhere,
                ["--forms=float32", "--keras_one_thread=False"],
            ),
        ):
            copies[script] = copy_run(run_dir, root / "My runs")
            patch.chdir(cwd)
            export.main(
                [f"--run={copies[script]}", f"--data_dir={cifar_dir}", *options, *QUICK]
            )
    copies["root"] = root
    return copies


def test_every_form_is_written_and_measured(exported, cifar_dir):
    run_dir = exported["scratch_cnn"]
    folder = run_dir / "export"
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        [f"{form}.tflite" for form in FORMS] + ["export.csv", "export.json", "export.md"]
    )
    assert not list(run_dir.glob(".export*")), "a temporary folder was left behind"
    # Paths relative to the folder it ran in; the data folder, outside it, by name.
    relative = run_dir.relative_to(exported["root"])
    assert " " in str(relative)
    assert made_by(run_dir)[:3] == ["python", "export.py", f"--run={relative}"]
    assert f"--data_dir={cifar_dir.name}" in made_by(run_dir)
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
        assert 0 < float(row["ms_one_thread"]) < 10_000
        assert 0 < float(row["ms_all_cores"]) < 10_000
        assert 0 <= float(row["test_accuracy"]) <= 1
        assert int(row["all_cores"]) >= 1
    assert float(rows["keras"]["agreement"]) == 1.0


@pytest.mark.parametrize("script", ["scratch_cnn", "transfer"])
def test_float32_keeps_the_keras_accuracy_on_the_run_test_set(exported, script):
    rows = read_rows(exported[script])
    keras_accuracy = float(rows["keras"]["test_accuracy"])
    # The same test set and preprocessing as the run: its recorded single-pass
    # accuracy back, whatever test-time augmentation the run itself used.
    metrics = settings.read_json(exported[script] / "metrics.json")
    assert keras_accuracy == pytest.approx(metrics["test_accuracy_tta_none"], abs=1e-6)
    assert abs(float(rows["float32"]["test_accuracy"]) - keras_accuracy) <= 0.001
    assert float(rows["float32"]["agreement"]) >= 0.99


def test_a_mixed_precision_model_converts_as_float32():
    """A run trained in mixed_bfloat16 ("auto" on a CPU with AMX) has bfloat16 ops that
    TensorFlow Lite cannot convert: its float32 form is made from a float32 copy."""
    import keras

    import scratch_cnn

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    images = np.random.default_rng(0).random((4, 32, 32, 3), np.float32)
    model = scratch_cnn.build_model(
        32, 8, 10, images.mean((0, 1, 2)), images.std((0, 1, 2))
    )
    keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("whiten").compute_dtype == "bfloat16"
    interpreter = tf.lite.Interpreter(model_content=export.convert(model, "float32", []))
    interpreter.allocate_tensors()
    (given,), (taken,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.set_tensor(given["index"], images[:1])
    interpreter.invoke()
    expected = model(images[:1]).numpy()
    np.testing.assert_allclose(
        interpreter.get_tensor(taken["index"]), expected, atol=0.02
    )


def test_only_the_chosen_forms_are_made(exported):
    folder = exported["transfer"] / "export"
    assert sorted(path.name for path in folder.iterdir()) == [
        "export.csv",
        "export.json",
        "export.md",
        "float32.tflite",
    ]
    rows = read_rows(exported["transfer"])
    assert list(rows) == ["keras", "float32"]
    assert rows["keras"]["ms_one_thread"] == ""  # --keras_one_thread=False
    assert "not measured" in (folder / "export.md").read_text()


def test_export_md_names_the_model_and_holds_no_machine_path(exported):
    for script in ("scratch_cnn", "transfer"):
        run_dir = exported[script]
        text = (run_dir / "export" / "export.md").read_text()
        assert not ABSOLUTE_PATH.search(text), ABSOLUTE_PATH.search(text)[0]
        saved = settings.read_json(run_dir / "config.json")
        title = text.splitlines()[0]
        assert settings.model_name(saved["script"], saved["config"]) in title
    # Run from a folder the run is not in: the run by its folder name.
    transfer = exported["transfer"]
    assert made_by(transfer)[2] == f"--run={transfer.name}"
    # A weights file by its name (the session's stand-in weights).
    assert (
        "weights from base.weights.h5" in (transfer / "export" / "export.md").read_text()
    )


def test_a_run_with_test_time_augmentation_is_compared_single_pass(exported):
    # The scratch run evaluates with test-time augmentation, the transfer run without.
    scratch = settings.read_json(exported["scratch_cnn"] / "metrics.json")
    transfer = settings.read_json(exported["transfer"] / "metrics.json")
    assert scratch["tta"] != "none" and transfer["tta"] == "none"
    notes = {
        script: (exported[script] / "export" / "export.md").read_text()
        for script in ("scratch_cnn", "transfer")
    }
    assert f"the run's own test accuracy is with {scratch['tta']}" in notes["scratch_cnn"]
    assert "the run's own test accuracy is with" not in notes["transfer"]
    for script in ("scratch_cnn", "transfer"):
        assert "single-pass, without test-time augmentation" in notes[script]


def test_export_json_holds_the_csv_figures(exported):
    for script in ("scratch_cnn", "transfer"):
        summary = json.loads((exported[script] / "export" / "export.json").read_text())
        rows = read_rows(exported[script])
        expected = {
            f"{form}_{name}": float(row[name])
            for form, row in rows.items()
            for name in CONTRACT
            if row[name] != ""
        }
        assert summary == pytest.approx(expected)
        for form in set(rows) - {"keras"}:
            assert {f"{form}_{name}" for name in CONTRACT} <= set(summary)
        assert summary["keras_test_accuracy"] == float(rows["keras"]["test_accuracy"])


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
    import evaluate  # here: the other tests need only export.py

    result = evaluate.main(
        [
            f"--runs={exported['scratch_cnn']}",
            f"--out_dir={tmp_path / 'no-runs'}",
            f"--plots_dir={tmp_path / 'plots'}",
        ]
    )
    report = (result["plots_dir"] / "report.md").read_text()
    assert "## Deployment: TensorFlow Lite" in report
    table = (exported["scratch_cnn"] / "export" / "export.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 1 + len(FORMS)  # header, rule, Keras, each form
    for line in rows:
        assert line in report


def test_the_newest_finished_run_of_each_script_is_found_by_name(tmp_path, capsys):
    runs = tmp_path / "scratch_cnn"
    for name in ("20250101-000000", "20250102-000000", "20250103-000000"):
        (runs / name).mkdir(parents=True)
        (runs / name / "config.json").write_text("{}")
        if name != "20250103-000000":  # the newest has not finished
            (runs / name / "metrics.json").write_text("{}")
    os.utime(runs / "20250101-000000")  # touched last, as an export of it would
    assert export.runs_to_export(tmp_path, "") == [runs / "20250102-000000"]
    assert "no finished transfer_mobilenetv2 run" in capsys.readouterr().out
    with pytest.raises(settings.DataError, match="no finished runs"):
        export.runs_to_export(tmp_path / "empty", "")


def test_an_unknown_form_stops_before_tensorflow_loads():
    result = subprocess.run(
        [sys.executable, "-c", TRACE_IMPORTS, str(REPO / "export.py"), "--forms=int4"],
        cwd=REPO,
        env={**os.environ, **OFFLINE_ENV},
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    *lines, trace = result.stderr.splitlines()
    assert result.returncode == settings.EXIT_CONFIG
    assert trace == "tensorflow imported: False"
    assert len(lines) == 1 and "--forms" in lines[0] and "'int4'" in lines[0], lines


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


def test_a_folder_that_is_no_finished_run_exits_2(
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
            settings.cli(export.main)
        assert stopped.value.code == settings.EXIT_CONFIG  # as evaluate.py
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
            raise settings.DataError("the float16 conversion failed (made to by a test)")
        return convert(model, form, calibration)

    monkeypatch.setattr(export, "convert", float16_fails)
    with pytest.raises(settings.DataError, match="float16 conversion failed"):
        export.main([f"--run={run_dir}", f"--data_dir={cifar_dir}", *QUICK])
    after = {path.name: path.read_bytes() for path in (run_dir / "export").iterdir()}
    assert after == before
    assert not list(run_dir.glob(".export*")), "a temporary folder was left behind"
