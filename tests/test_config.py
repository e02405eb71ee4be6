"""The override helper (--name=value against a config block), the exit code of a bad
command line, run folders that are never reused, found by name, and atomic JSON."""

import importlib.util
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import numpy as np
import pytest
from conftest import REPO, own_stderr_lines, run_script

import data
import settings
import training

DEFAULTS = settings.config_block(
    {
        "EPOCHS": 10,
        "LEARNING_RATE": 1e-3,
        "AUGMENT_FLIP": True,
        "DATA_DIR": "",
        "OUT_DIR": "runs",
        "CLASS_NAMES": ("cat", "dog"),  # not a scalar: not a setting
        "lower_case": 1,  # not UPPER_CASE: not a setting
        "Mixed": 2,
    }
)


def parse(*argv):
    return settings.parse_overrides(DEFAULTS, list(argv))


# ---------------------------------------------------------------------------------
# The config block


def test_config_block_holds_the_upper_case_scalars_in_order():
    assert list(DEFAULTS) == [
        "EPOCHS",
        "LEARNING_RATE",
        "AUGMENT_FLIP",
        "DATA_DIR",
        "OUT_DIR",
    ]


def test_data_py_config_block_is_its_settings_and_nothing_after():
    assert data.CONFIG["DATA_DIR"] == "" and data.CONFIG["VAL_FRACTION"] == 0.1
    assert {"SEED", "TRAIN_IMAGES", "AUGMENT_FLIP", "PLOTS_DIR"} <= set(data.CONFIG)
    # Constants defined below the block are not settings.
    for constant in ("NUM_CLASSES", "NATIVE_SIZE", "ARCHIVE_NAME", "CONFIG"):
        assert constant not in data.CONFIG


# ---------------------------------------------------------------------------------
# Overrides that work


def test_override_sets_the_upper_case_name_and_leaves_the_rest():
    config = parse("--epochs=3")
    assert config["EPOCHS"] == 3 and type(config["EPOCHS"]) is int
    assert {name: config[name] for name in DEFAULTS if name != "EPOCHS"} == {
        name: value for name, value in DEFAULTS.items() if name != "EPOCHS"
    }
    assert DEFAULTS["EPOCHS"] == 10  # the defaults are not changed
    assert parse() == DEFAULTS


def test_name_space_value_equals_name_equals_value():
    spaced = parse("--epochs", "3", "--data_dir", "/d", "--learning_rate", "-2e-4")
    assert spaced == parse("--epochs=3", "--data_dir=/d", "--learning_rate=-2e-4")
    assert spaced["EPOCHS"] == 3 and spaced["LEARNING_RATE"] == -2e-4


@pytest.mark.parametrize(
    "argv, value",
    [
        (["--augment_flip"], True),
        (["--augment_flip=False", "--augment_flip"], True),
        (["--augment_flip", "false"], False),
        (["--augment_flip", "True"], True),
        (["--augment_flip", "--epochs=2"], True),
    ],
)
def test_a_bare_flag_sets_a_boolean(argv, value):
    assert parse(*argv)["AUGMENT_FLIP"] is value


def test_a_bare_flag_takes_no_value_but_true_or_false():
    with pytest.raises(settings.ConfigError, match="got '1'"):
        parse("--augment_flip", "1")  # "1" is not the flag's: a stray argument


def test_later_overrides_win_and_dashes_mean_underscores():
    assert parse("--epochs=3", "--epochs=5")["EPOCHS"] == 5
    assert parse("--data-dir=/d")["DATA_DIR"] == "/d"
    assert parse("--EPOCHS=4")["EPOCHS"] == 4


@pytest.mark.parametrize(
    "text, value", [("1", 1.0), ("2e-4", 2e-4), ("0.5", 0.5), ("-3", -3.0)]
)
def test_int_or_float_given_to_a_float(text, value):
    learning_rate = parse(f"--learning_rate={text}")["LEARNING_RATE"]
    assert learning_rate == value and type(learning_rate) is float


@pytest.mark.parametrize(
    "text, value",
    [("True", True), ("true", True), ("TRUE", True), ("False", False), ("false", False)],
)
def test_bool_values(text, value):
    assert parse(f"--augment_flip={text}")["AUGMENT_FLIP"] is value


@pytest.mark.parametrize(
    "text, value",
    [
        ("/data/cifar", "/data/cifar"),
        ("~/data", "~/data"),
        ("123", "123"),  # a number, kept as the text given
        ("True", "True"),
        ("'quoted'", "quoted"),
        ("a=b", "a=b"),  # only the first '=' separates name and value
        ("", ""),
        ("two words", "two words"),
    ],
)
def test_strings_may_be_given_bare(text, value):
    assert parse(f"--data_dir={text}")["DATA_DIR"] == value


def test_configure_prints_every_setting_and_marks_overrides(capsys):
    config = training.configure(DEFAULTS, ["--epochs=3", "--out_dir=elsewhere"])
    assert config["OUT_DIR"] == "elsewhere"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(DEFAULTS)
    marked = {line.split()[0] for line in lines if line.endswith("(set)")}
    assert marked == {"epochs", "out_dir"}
    assert any(line.split() == ["epochs", "=", "3", "(set)"] for line in lines)
    training.configure(DEFAULTS, ["--epochs=3"], verbose=False)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------
# Overrides that stop the script


def test_an_unknown_name_suggests_the_closest_ones():
    with pytest.raises(settings.ConfigError) as error:
        parse("--epoch=3")
    assert "unknown setting --epoch; did you mean --epochs?" in str(error.value)
    with pytest.raises(settings.ConfigError, match="--zzz; see --help"):
        parse("--zzz=1")  # nothing close: no guess
    for not_a_setting in ("class_names", "lower_case", "mixed"):
        with pytest.raises(settings.ConfigError, match="unknown setting"):
            parse(f"--{not_a_setting}=1")


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("--epochs=abc", "int"),
        ("--epochs=1.5", "int"),
        ("--epochs=True", "int"),  # a bool is not a number of epochs
        ("--epochs=", "int"),
        ("--epochs=[3]", "int"),
        ("--learning_rate=fast", "float"),
        ("--learning_rate=True", "float"),
        ("--augment_flip=1", "bool"),
        ("--augment_flip=yes", "bool"),
    ],
)
def test_wrong_type_is_a_config_error(arg, expected):
    flag, text = arg.split("=", 1)
    with pytest.raises(settings.ConfigError) as error:
        parse(arg)
    article = "an" if expected == "int" else "a"
    assert f"{flag} takes {article} {expected}" in str(error.value)
    assert repr(text) in str(error.value)


@pytest.mark.parametrize("arg", ["epochs=3", "-epochs=3", "3", "--", ""])
def test_malformed_argument_is_a_config_error(arg):
    with pytest.raises(settings.ConfigError) as error:
        parse(arg)
    assert "expected --name=value" in str(error.value) and repr(arg) in str(error.value)


@pytest.mark.parametrize(
    "argv", [["--epochs"], ["--epochs", "--learning_rate=1"], ["--data_dir"]]
)
def test_a_name_without_its_value_is_a_config_error(argv):
    with pytest.raises(settings.ConfigError, match=f"{argv[0]} needs a value"):
        parse(*argv)


def test_a_value_literal_eval_chokes_on_is_still_a_config_error():
    with pytest.raises(settings.ConfigError):
        parse("--epochs={[]: 1}")


# ---------------------------------------------------------------------------------
# The command line: exit 2 before any work, one line why


@pytest.fixture(scope="module")
def bad_command_lines():
    """Both runs side by side: each pays for a TensorFlow import."""
    argvs = {"unknown": "--data_dirr=x", "wrong_type": "--seed=abc"}
    with ThreadPoolExecutor(len(argvs)) as pool:
        futures = {
            key: pool.submit(run_script, "data.py", arg) for key, arg in argvs.items()
        }
        return {key: future.result() for key, future in futures.items()}


@pytest.mark.parametrize(
    "case, needles",
    [
        ("unknown", ["unknown setting --data_dirr; did you mean --data_dir?"]),
        ("wrong_type", ["--seed takes an int", "'abc'"]),
    ],
)
def test_bad_command_line_exits_2_with_one_line(case, needles, bad_command_lines):
    result = bad_command_lines[case]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = own_stderr_lines(result.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("data.py: error: ")
    for needle in needles:
        assert needle in lines[0]
    # Stopped before any work: not even the configuration was printed.
    assert result.stdout == ""


# ---------------------------------------------------------------------------------
# Run folders and JSON


def test_run_folders_are_never_reused(tmp_path, monkeypatch):
    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2025, 1, 2, 3, 4, 5)

    monkeypatch.setattr(training, "datetime", FrozenClock)
    first = training.new_run_dir(tmp_path, "scratch_cnn")
    (first / "model.keras").write_text("earlier run")
    second = training.new_run_dir(tmp_path, "scratch_cnn")
    third = training.new_run_dir(tmp_path, "scratch_cnn")
    assert first == tmp_path / "scratch_cnn" / "20250102-030405"
    assert len({first, second, third}) == 3
    assert all(path.is_dir() for path in (first, second, third))
    assert list(second.iterdir()) == [] and list(third.iterdir()) == []
    assert (first / "model.keras").read_text() == "earlier run"


def test_two_run_folders_in_the_same_second_differ(tmp_path):
    folders = [training.new_run_dir(tmp_path / "out", "transfer") for _ in range(5)]
    assert len(set(folders)) == 5
    assert all(folder.parent == tmp_path / "out" / "transfer" for folder in folders)


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "metrics.json"
    settings.write_json(path, {"test_accuracy": 0.5, "where": tmp_path})
    assert json.loads(path.read_text()) == {"test_accuracy": 0.5, "where": str(tmp_path)}
    settings.write_json(path, {"test_accuracy": 0.75})
    assert json.loads(path.read_text()) == {"test_accuracy": 0.75}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    # A payload that cannot be written leaves the earlier file whole, and no debris.
    circular = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        settings.write_json(path, circular)
    assert json.loads(path.read_text()) == {"test_accuracy": 0.75}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_the_newest_run_is_the_newest_folder_name_whatever_was_written_last(tmp_path):
    """export.py writes into an old run folder, which changes its modification time:
    the newest run must still be the one started last."""
    folders = []
    for stamp in ("20250101-000000", "20250102-000000"):
        folder = tmp_path / "scratch_cnn" / stamp
        folder.mkdir(parents=True)
        for name in ("config.json", "metrics.json"):
            (folder / name).write_text("{}")
        folders.append(folder)
    (folders[0] / "export").mkdir()  # touched last
    assert settings.list_runs(tmp_path, "scratch_cnn", finished=True) == folders
    assert settings.list_runs(tmp_path, "scratch_cnn", finished=False) == []


def test_test_time_crops_run_converted_without_autograph_warnings(caplog):
    """Every view of the crops level is traced by AutoGraph: a lambda it cannot find
    in the source (two on one line) runs as-is and prints a warning in every run."""
    import keras
    import tensorflow as tf

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])  # fmt: skip
    images = np.random.default_rng(0).random((6, 8, 8, 3), np.float32)
    labels = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]]
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(3)
    with caplog.at_level("WARNING", logger="tensorflow"):
        levels, _ = training.predict_tta(model, dataset, "crops")
    assert sorted(levels) == ["crops", "flip", "none"]
    assert not [r for r in caplog.records if "AutoGraph" in r.getMessage()]


def test_test_time_views_come_from_the_code_in_memory_not_the_file_now(
    tmp_path, monkeypatch
):
    """AutoGraph reads a map function's source again, by its line number, when the map
    is made: a run testing its model after training.py was edited would be handed
    another line's lambda. Each view must come from the code the run imported."""
    import keras
    import tensorflow as tf

    copy = tmp_path / "training_as_imported.py"
    copy.write_text((REPO / "training.py").read_text())
    spec = importlib.util.spec_from_file_location("training_as_imported", copy)
    imported = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, imported)  # imported as `import` does
    spec.loader.exec_module(imported)
    edited = [  # now edited: every line that held a lambda holds another one
        line[: len(line) - len(line.lstrip())] + "other = lambda x: x" if "lambda" in line
        else line for line in copy.read_text().splitlines()
    ]  # fmt: skip
    copy.write_text("\n".join(edited) + "\n")
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])  # fmt: skip
    images = np.random.default_rng(0).random((6, 8, 8, 3), np.float32)
    labels = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]]
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(3)
    levels, _ = imported.predict_tta(model, dataset, "crops")
    expected, _ = training.predict_tta(model, dataset, "crops")
    assert sorted(levels) == sorted(expected) == ["crops", "flip", "none"]
    for level, probabilities in expected.items():
        np.testing.assert_allclose(levels[level], probabilities, rtol=1e-6)
