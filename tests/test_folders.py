"""Class folders of one's own images: train/<class>/ (and test/, val/ or validation/)
through data.py, both training scripts and evaluate.py, end to end, with 3 classes;
and every bad folder stopped with exit code 3 before anything is written.

The images are real files written with Pillow: JPEG, PNG, BMP and GIF of odd sizes
and aspect ratios, one grayscale and one RGBA, each class with its own colour.
"""

import json
import re
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import own_stderr_lines, run_script
from PIL import Image

import data
import evaluate
import scratch_cnn
import settings
import training
import transfer_mobilenetv2

CLASSES = ("apple", "banana", "cherry")  # sorted: the label order expected
COLOURS = {"apple": (200, 40, 40), "banana": (230, 210, 60), "cherry": (90, 20, 120)}
SIZES = ((37, 23), (64, 48), (19, 41), (50, 50), (120, 33))  # (width, height), odd
FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("bmp", "BMP"), ("gif", "GIF"))
# Tiny runs: the batch is an eighth of the 33 training images (4), two steps an epoch.
TINY = ["--batch_size=16", "--steps_per_epoch=2", "--verbose=0", "--val_fraction=0.2"]


def write_image(path, colour, size, seed, mode="RGB"):
    """A noisy picture of `colour`, saved in the format its extension names."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (height, width, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8)).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def make_folders(root, per_class=10, test_per_class=0, held_out="test"):
    """root/train/<class>/ (and root/<held_out>/<class>/) of `per_class` images in
    rotating formats and sizes; the first apple is grayscale, the first banana RGBA.
    A README.txt beside the images is no image and must be skipped."""
    for split, count in (("train", per_class), (held_out, test_per_class)):
        if not count:
            continue
        for label, name in enumerate(CLASSES):
            for index in range(count):
                extension, _ = FORMATS[index % len(FORMATS)]
                mode = "RGB"
                if index == 0 and name == "apple":
                    mode, extension = "L", "png"
                if index == 0 and name == "banana":
                    mode, extension = "RGBA", "png"
                write_image(
                    root / split / name / f"{index:03d}.{extension}",
                    COLOURS[name],
                    SIZES[index % len(SIZES)],
                    seed=100 * label + index + (50 if split == "train" else 0),
                    mode=mode,
                )
            (root / split / name / "README.txt").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """train/ with 14 images per class and test/ with 4."""
    return make_folders(tmp_path_factory.mktemp("fruit"), 14, 4)


# ---------------------------------------------------------------------------------
# Reading: any format, size and mode becomes RGB at IMG_SIZE


def test_class_folders_are_listed_sorted_with_their_test_split(folders):
    listing = data.list_class_folders(folders, test_fraction=0.2)
    assert listing.class_names == CLASSES
    assert np.bincount(listing.train_labels).tolist() == [14, 14, 14]
    assert np.bincount(listing.test_labels).tolist() == [4, 4, 4]
    assert not any(str(path).endswith(".txt") for path in listing.train_files)
    assert "test set: test/" in listing.source


def test_images_of_any_format_size_and_mode_decode_to_rgb_at_img_size(folders):
    listing = data.list_class_folders(folders, test_fraction=0.2)
    images = data.decode_images(listing.train_files, image_size=24, chunk=5)
    assert images.shape == (42, 24, 24, 3) and images.dtype == np.uint8
    # Each class's colour survives decoding and resizing, whatever the file was.
    for label, name in enumerate(CLASSES):
        mean = images[listing.train_labels == label].reshape(-1, 3).mean(axis=0)
        assert np.abs(mean - COLOURS[name]).max() < 25, (name, mean)
    # The grayscale apple has three equal channels.
    gray = images[list(listing.train_files).index(str(folders / "train/apple/000.png"))]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_without_a_held_out_folder_the_test_set_is_a_stratified_part_of_train(
    tmp_path,
):
    root = make_folders(tmp_path, per_class=10)
    listing = data.list_class_folders(root, test_fraction=0.3)
    assert np.bincount(listing.test_labels).tolist() == [3, 3, 3]
    assert np.bincount(listing.train_labels).tolist() == [7, 7, 7]
    assert not set(listing.test_files) & set(listing.train_files)
    assert "30% of train/" in listing.source
    again = data.list_class_folders(root, test_fraction=0.3)
    assert list(again.test_files) == list(listing.test_files)  # seeded


def test_val_folder_serves_as_test_set_and_may_lack_a_class(tmp_path):
    root = make_folders(tmp_path, per_class=6, test_per_class=2, held_out="val")
    for path in (root / "val" / "apple").iterdir():
        path.unlink()
    (root / "val" / "apple").rmdir()
    listing = data.list_class_folders(root, test_fraction=0.2)
    assert "test set: val/" in listing.source
    assert sorted(set(listing.test_labels)) == [1, 2]  # banana, cherry keep their labels


# ---------------------------------------------------------------------------------
# End to end: data.py, both training scripts and evaluate.py on 3 classes


def test_data_report_prints_classes_and_writes_figures(folders, tmp_path, capsys):
    plots = tmp_path / "plots"
    data.main(
        [f"--data_dir={folders}", f"--plots_dir={plots}", "--figure_size=48",
         "--val_fraction=0.2"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "test set: test/" in printed
    # 14 training images per class, 20% of them (3) held out for validation.
    for name in CLASSES:
        assert re.search(rf"^{name}\s+11\s+3\s+4$", printed, re.MULTILINE), printed
    assert re.search(r"^total\s+33\s+9\s+12$", printed, re.MULTILINE)
    for name in ("samples.png", "augmented.png"):
        assert (plots / name).stat().st_size > 5000


@pytest.fixture(scope="module")
def folder_runs(folders, tmp_path_factory):
    """Both training scripts trained on the class folders into one OUT_DIR:
    (OUT_DIR, scratch run folder, transfer run folder). MobileNetV2 starts from
    random weights, so its run is also the random-start run tested below."""
    runs = tmp_path_factory.mktemp("fruit-runs")
    common = [f"--data_dir={folders}", f"--out_dir={runs}", *TINY]
    scratch_dir = scratch_cnn.main([*common, "--epochs=1", "--width=8"])
    transfer_dir = transfer_mobilenetv2.main(
        [*common, "--weights=none", "--fine_tune_epochs=1", "--alpha=0.35",
         "--img_size=32"]
    )  # fmt: skip
    return runs, scratch_dir, transfer_dir


def test_both_scripts_train_and_evaluate_compares_them(folder_runs, tmp_path):
    runs, scratch_dir, transfer_dir = folder_runs
    for run_dir in (scratch_dir, transfer_dir):
        saved = json.loads((run_dir / "config.json").read_text())
        assert saved["class_names"] == list(CLASSES)
        assert "test set: test/" in saved["data_source"]
        assert (run_dir / "metrics.json").is_file()
        model = training.load_checkpoint(run_dir)
        assert model.output_shape == (None, 3)

    plots = tmp_path / "plots"
    result = evaluate.main([f"--out_dir={runs}", f"--plots_dir={plots}"])
    compared = [Path(run) for runs in result["columns"].values() for run in runs]
    assert sorted(compared) == sorted([scratch_dir, transfer_dir])
    confusions = sorted(plots.glob("confusion_*.csv"))
    reports = sorted(plots.glob("classification_report_*.txt"))
    assert len(confusions) == len(reports) == 2, sorted(result["files"])
    for path in confusions:
        rows = path.read_text().splitlines()
        assert rows[0] == "true \\ predicted," + ",".join(CLASSES)
        assert [row.split(",")[0] for row in rows[1:]] == list(CLASSES)
        assert sum(int(n) for row in rows[1:] for n in row.split(",")[1:]) == 12
    for path in reports:
        assert all(name in path.read_text() for name in CLASSES)
    pairs = (plots / "confused_pairs.csv").read_text()
    assert "airplane" not in pairs and "airplane" not in (plots / "report.md").read_text()


def test_random_start_trains_every_layer_and_batchnorm(folder_runs):
    """--weights=none is the control for what pretraining is worth: one phase in
    which every layer learns and BatchNorm learns its statistics, as a network
    trained from scratch would, at RANDOM_START_LR; no head phase (HEAD_EPOCHS, 3 by
    default, is ignored), nothing frozen. (On this module's class folders: the path
    does not depend on the data, and a second MobileNetV2 run would cost as much.)"""
    run_dir = folder_runs[2]
    history = training.read_history(run_dir)
    assert [row["phase"] for row in history] == ["random_start"]
    plan = json.loads((run_dir / "config.json").read_text())["training_plan"]
    assert plan["phases"] == {"random_start": 1} and plan["frozen_first_layers"] == []
    # The optimizer the model was saved with: its schedule peaks at RANDOM_START_LR.
    with zipfile.ZipFile(run_dir / "model.keras") as saved:
        optimizer = json.loads(saved.read("config.json"))["compile_config"]["optimizer"]
    peak = optimizer["config"]["learning_rate"]["config"]["peak"]
    assert transfer_mobilenetv2.RANDOM_START_LR != transfer_mobilenetv2.FINE_TUNE_LR
    assert peak == transfer_mobilenetv2.RANDOM_START_LR

    model = training.load_checkpoint(run_dir)
    (base,) = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert all(layer.trainable for layer in base.layers)
    batchnorm = [
        layer
        for layer in base.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert batchnorm
    for layer in batchnorm:
        # 0.999, MobileNetV2's own, would leave a short run at the placeholders.
        assert layer.momentum == transfer_mobilenetv2.BATCHNORM_MOMENTUM
        # A new layer holds exactly 0 and 1, which a frozen one keeps; two steps in
        # training mode move both (means after a BatchNorm and a 1x1 convolution stay
        # near 0 until the betas learn, but not at exactly 0).
        assert np.any(layer.moving_mean.numpy() != 0.0), layer.name
        assert not np.allclose(layer.moving_variance.numpy(), 1.0), layer.name


# ---------------------------------------------------------------------------------
# Bad folders: exit code 3, one or two lines naming what is wrong, nothing written


def expect_data_error(root, tmp_path, *needles):
    """scratch_cnn.main on `root` stops with a DataError (exit code 3 from the
    command line) of one or two lines holding `needles`, before writing anything."""
    out = tmp_path / "out"
    with pytest.raises(settings.DataError) as error:
        scratch_cnn.main([f"--data_dir={root}", f"--out_dir={out}", "--epochs=1"])
    message = str(error.value)
    assert 1 <= len(message.splitlines()) <= 2, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not out.exists()
    return message.splitlines()


def test_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("no classes here")
    expect_data_error(tmp_path, tmp_path, "found none", "train/<class>/<images>")


def test_one_class_folder(tmp_path):
    write_image(tmp_path / "train" / "apple" / "a.jpg", (1, 2, 3), (9, 9), 0)
    expect_data_error(tmp_path, tmp_path, "only one (apple/)")


def test_empty_class_folder(tmp_path):
    make_folders(tmp_path, per_class=4)
    (tmp_path / "train" / "durian").mkdir()
    (tmp_path / "train" / "durian" / "notes.txt").write_text("no images yet")
    expect_data_error(tmp_path, tmp_path, "durian: empty class folder")


def test_test_class_unseen_in_training(tmp_path):
    make_folders(tmp_path, per_class=4, test_per_class=1)
    write_image(tmp_path / "test" / "durian" / "d.png", (1, 2, 3), (9, 9), 0)
    expect_data_error(tmp_path, tmp_path, "'durian' is not in", "training never sees")


def test_corrupt_image_is_named_before_training_exit_3(tmp_path):
    make_folders(tmp_path, per_class=10)
    bad = tmp_path / "train" / "cherry" / "004.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    expect_data_error(tmp_path, tmp_path, f"{bad}: not a readable image")
    # As a command: exit code 3, one line, no traceback, nothing written.
    out = tmp_path / "command-out"
    result = run_script(
        "scratch_cnn.py", f"--data_dir={tmp_path}", f"--out_dir={out}", "--epochs=1"
    )
    assert result.returncode == settings.EXIT_DATA, result.stderr
    lines = own_stderr_lines(result.stderr)
    assert len(lines) == 1 and f"{bad}: not a readable image" in lines[0], lines
    assert not out.exists()


def test_folder_neither_cifar10_nor_class_folders(tmp_path):
    # Class folders without train/ around them: say what was expected, and where.
    write_image(tmp_path / "apple" / "a.jpg", (1, 2, 3), (9, 9), 0)
    lines = expect_data_error(
        tmp_path, tmp_path, "neither CIFAR-10", "cifar-10-batches-py", "train/<class>"
    )
    assert f"move them into {tmp_path / 'train'}/" in lines[-1]
