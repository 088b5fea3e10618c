"""quality.py as a specification: the miniature's measure is a pure function of the images (the
reference measured against itself gives 0, their order does not matter), the classifier file keeps
what training measured (held-out accuracy, the floor below the ceiling), and every bad input is one
line naming it, with nothing written."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import quality

EMOJI = Path(__file__).resolve().parent / "emoji_google_32.npz"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A classifier trained through the CLI for 1 epoch on the first 20 Noto emoji of every class
    -> (the data file, the classifier file)."""
    tmp = tmp_path_factory.mktemp("quality")
    with np.load(EMOJI) as f:
        x, y = f["x"], f["y"]
    keep = np.concatenate([np.flatnonzero(y == c)[:20] for c in range(y.max() + 1)])
    np.savez(tmp / "emoji.npz", x=x[keep], y=y[keep])
    data, out = str(tmp / "emoji.npz"), str(tmp / "classifier.pt")
    quality.main(["train", "--data", data, "--image-size", "16", "--out", out, "--epochs", "1"])
    return data, out


@pytest.fixture(scope="module")
def real(trained):
    """(images, labels, reference indices, held-out indices) of that data at 16 px."""
    images, labels = quality.real_images(trained[0], 16)
    return (images, labels, *quality.split(labels))


#################################################################################
#                        The measure as a specification                         #
#################################################################################

def test_the_split_is_fixed_stratified_and_disjoint():
    labels = np.repeat(np.arange(3), [8, 20, 40])
    reference, held = quality.split(labels)
    assert not set(reference) & set(held) and len(reference) + len(held) == len(labels)
    assert [int((labels[held] == c).sum()) for c in range(3)] == [2, 5, 10]   # 25% of every class
    assert np.array_equal(held, quality.split(labels)[1])


def test_the_measure_is_a_pure_function_of_the_set_and_0_for_the_reference(trained, real):
    images, labels, reference, _ = real
    classifier = quality.load_classifier(trained[1])
    first = quality.measure(images[reference], labels[reference], classifier)
    assert abs(first["distance"]) < 1e-9                           # its own statistics: 0
    order = np.random.default_rng(1).permutation(reference)
    shuffled = quality.measure(images[order], labels[order], classifier)
    assert shuffled["distance"] == pytest.approx(first["distance"], abs=1e-9)
    assert shuffled["accuracy"] == first["accuracy"] and first["n"] == len(reference)
    with torch.no_grad():
        _, logits = classifier(quality.to_input(images[reference]))
    assert first["accuracy"] == (logits.argmax(1).numpy() == labels[reference]).mean()


def test_score_of_the_held_out_images_is_the_floor_the_file_keeps_below_its_ceiling(
        trained, real, tmp_path, capsys):
    """The same images measured again (here through the CLI) give the very same numbers."""
    images, labels, _, held = real
    np.savez(tmp_path / "samples.npz", images[held], labels[held])       # arr_0, arr_1 as sample.py
    quality.main(["score", str(tmp_path / "samples.npz"), "--classifier", trained[1],
                  "--out", str(tmp_path / "samples.json")])
    written = json.loads((tmp_path / "samples.json").read_text())
    info = quality.load_classifier(trained[1]).info
    floor = info["floor"]
    assert {k: written[k] for k in floor} == floor and floor["n"] == len(held)
    assert info["held_out_accuracy"] == floor["accuracy"]
    assert info["ceiling"]["distance"] > 10 * floor["distance"]        # uniform noise: far away
    assert info["data"] == trained[0] and info["image_size"] == 16 and info["epochs"] == 1
    assert not Path(trained[1] + ".tmp").exists()                            # written, renamed
    printed = capsys.readouterr().out
    assert f"distance {floor['distance']:.4f}, class accuracy {floor['accuracy']:.4f}" in printed


#################################################################################
#                     Bad input: one line, nothing written                      #
#################################################################################

def bad_samples(tmp, images, labels):
    """Sample files a classifier of 9 classes at 16 px cannot score: {case: (path, message)}."""
    cases = {"images of another size": (np.zeros((4, 32, 32, 3), np.uint8), labels[:4],
                                        r"images are 32x32, the classifier's 16x16"),
             "labels outside its classes": (images[:4], np.array([0, 1, 2, 9]),
                                            r"labels range over 0\.\.9, but the classifier knows "
                                            r"classes 0\.\.8"),
             "one image": (images[:1], labels[:1], r"need at least 2 images"),
             "not uint8": (images[:4].astype(np.float32), labels[:4],
                           r"images must be uint8 RGB")}
    files = {}
    for case, (x, y, message) in cases.items():
        path = tmp / (case.replace(" ", "_") + ".npz")
        np.savez(path, x, y)
        files[case] = (str(path), message)
    np.savez(tmp / "no_labels.npz", images[:4])
    files["no labels"] = (str(tmp / "no_labels.npz"),
                          r"needs arr_0 \(images\) and arr_1 \(labels\), found arr_0")
    files["missing"] = (str(tmp / "missing.npz"), r"SAMPLES .*missing\.npz: no such file")
    return files


@pytest.mark.parametrize("case", ["images of another size", "labels outside its classes",
                                  "one image", "not uint8", "no labels", "missing"])
def test_score_rejects_a_bad_samples_file_in_one_line(trained, real, tmp_path, case):
    images, labels, _, _ = real
    path, message = bad_samples(tmp_path, images, labels)[case]
    with pytest.raises(SystemExit, match=r"^quality\.py: error: .*" + message) as e:
        quality.main(["score", path, "--classifier", trained[1], "--out", str(tmp_path / "o.json")])
    assert "\n" not in str(e.value) and not (tmp_path / "o.json").exists()


def test_train_and_score_name_a_missing_or_wrong_file_or_flag(trained, tmp_path):
    (tmp_path / "notes.txt").write_text("not a classifier")
    data, new = trained[0], str(tmp_path / "c.pt")
    cases = [(["score", data, "--classifier", str(tmp_path / "none.pt")],
              r"--classifier .*none\.pt: no such file"),
             (["score", data, "--classifier", str(tmp_path / "notes.txt")],
              r"notes\.txt: not a classifier from quality\.py train"),
             (["train", "--data", str(tmp_path / "none.npz"), "--image-size", "16", "--out", new],
              r"--data .*none\.npz: no such file"),
             (["train", "--data", str(tmp_path / "notes.txt"), "--image-size", "16", "--out", new],
              r"notes\.txt: not an \.npz file"),
             (["train", "--data", data, "--image-size", "16", "--out", trained[1]],
              r"--out .*classifier\.pt exists: pass --overwrite"),
             (["train", "--data", data, "--image-size", "2", "--out", new],
              r"--image-size 2: must be at least 4"),
             (["train", "--data", data, "--image-size", "16", "--out", new, "--epochs", "0"],
              r"--epochs 0: must be at least 1")]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=r"^quality\.py: error: .*" + message) as e:
            quality.main(argv)
        assert "\n" not in str(e.value)
    assert not Path(new).exists()
