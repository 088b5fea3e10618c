"""fid.py's command line end to end on tiny sets with the fixtures' networks (from test_fid.py),
FDD beside the ADM numbers, every bad input in one table (one line `fid.py: error: ...`, nothing
written), and the released weights: downloaded once into torch's hub cache, hash-checked, loaded
strictly."""
import hashlib
import json
import os
import re
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import fid
from test_fid import dino_model, fixture_model


@pytest.fixture(scope="module")
def networks(one_thread):
    """The fixtures' Inception and DINOv2, built once, run on one thread."""
    return {fid.INCEPTION_URL: fixture_model(), fid.DINOV2_URL: dino_model()}


@pytest.fixture
def cli(networks, monkeypatch):
    """fid.main in this process with the fixtures' networks; returns the features of each extract
    call. A network runs once per image set (a later call on the same images reuses its features:
    the CLI's logic is tested here, the networks in test_fid.py), and distances use the first 64
    dimensions (the 2048-dim square root alone takes 10-60 s; frechet_distance has its tests)."""
    outputs = []
    computed = {}
    extract = fid.extract
    frechet_distance = fid.frechet_distance

    def once_per_image_set(images, network, *args, **kwargs):
        key = (pixels(images).tobytes(), id(network))
        if key not in computed:
            computed[key] = extract(images, network, *args, **kwargs)
        outputs.append(computed[key])
        return outputs[-1]

    def leading_dims(mu1, sigma1, mu2, sigma2, k=64):
        return frechet_distance(mu1[:k], sigma1[:k, :k], mu2[:k], sigma2[:k, :k])
    monkeypatch.setattr(fid, "released", lambda network, url, device="cpu": networks[url])
    monkeypatch.setattr(fid, "extract", once_per_image_set)
    monkeypatch.setattr(fid, "frechet_distance", leading_dims)
    return outputs


def pixels(images):
    """All the images of an Images, uint8 (N, H, W, 3)."""
    return np.concatenate(list(images.batches(images.count)))


def report_lines(text):
    """The report's 'key: value' lines as a dict."""
    return dict(line.split(": ", 1) for line in text.splitlines())


def write_images(folder, sizes, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder

#### End to end ####

@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")   # 4 images: singular covariances
def test_save_stats_then_score_against_an_adm_reference_batch(tmp_path, networks, cli, capsys):
    folder = write_images(tmp_path / "samples", [(24, 20)] * 4)  # k + 1: the fewest PR takes
    stats = tmp_path / "samples_stats.npz"
    fid.main([str(folder), "--save-stats", str(stats), "--batch-size", "3"])
    assert report_lines(capsys.readouterr().out) == {
        "SAMPLES": "mu, sigma, mu_s, sigma_s, pool3 from its 4 images"}
    pool3, spatial = cli[-1]
    saved = np.load(stats)
    assert sorted(saved.keys()) == ["mu", "mu_s", "pool3", "sigma", "sigma_s"]
    for key, value in [("pool3", pool3), ("mu", pool3.mean(0)), ("mu_s", spatial.mean(0)),
                       ("sigma", np.cov(pool3, rowvar=False)),
                       ("sigma_s", np.cov(spatial, rowvar=False))]:
        assert np.array_equal(saved[key], value)

    # An ADM reference batch of the same images whose precomputed means are moved. The evaluator
    # reads a file's own statistics, so FID = |1 e0|^2 and sFID = |0.5 e0|^2 (equal covariances);
    # precision and recall come from its images, the samples' own: each point lies in its own ball.
    e0 = np.eye(2048, dtype=np.float32)[0]
    adm = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(adm, arr_0=pixels(fid.Images(str(folder), "REF")), mu=saved["mu"] + e0,
             sigma=saved["sigma"], mu_s=saved["mu_s"] + 0.5 * e0[:2023], sigma_s=saved["sigma_s"])
    fid.main([str(stats), str(adm), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["SAMPLES"] == "mu, sigma, mu_s, sigma_s, pool3 from the file"
    assert report["REF"] == "pool3 from its 4 images"
    assert cli[-1][0] is pool3                                   # its 4 images were read
    # rank-3 covariances: the square root of their singular product leaves up to 4e-7 (measured)
    assert abs(report["FID"] - 1) < 1e-6 and abs(report["sFID"] - 0.25) < 1e-6
    assert report["Precision"] == report["Recall"] == 1.0
    inception = networks[fid.INCEPTION_URL]
    assert abs(report["IS"] - fid.inception_score(inception.logits(torch.from_numpy(pool3)))) < 1e-9

    # FID alone reads no image and needs only mu and sigma
    calls = len(cli)
    fid.main([str(stats), str(adm), "--fid-only"])
    printed = report_lines(capsys.readouterr().out)
    assert list(printed) == ["SAMPLES", "REF", "FID"] and len(cli) == calls
    assert printed["REF"] == "mu, sigma from the file"
    assert abs(float(printed["FID"]) - 1) < 1e-4                 # printed to 4 decimals


class CheapInception:
    """pool3 and spatial features from the graph's input's means, for a test about FDD."""
    def features(self, batch):
        mean = fid.preprocess(torch.from_numpy(batch)).mean(dim=(2, 3))    # (N, 3)
        return mean.repeat(1, 683)[:, :2048], mean.repeat(1, 675)[:, :2023]


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_fdd_is_printed_beside_fid_and_its_statistics_are_saved(tmp_path, networks, cli, capsys,
                                                               monkeypatch):
    monkeypatch.setitem(networks, fid.INCEPTION_URL, CheapInception())
    samples = write_images(tmp_path / "samples", [(24, 20)] * 5, seed=1)
    ref = write_images(tmp_path / "ref", [(30, 30)] * 5, seed=2)
    ref_stats = tmp_path / "ref_stats.npz"
    fid.main([str(ref), "--save-stats", str(ref_stats), "--fdd"])
    assert set(np.load(ref_stats).files) == {"mu", "sigma", "mu_s", "sigma_s", "pool3", "fdd_mu",
                                             "fdd_sigma"}
    (dino_ref,) = cli[-1]
    fid.main([str(samples), str(ref_stats), "--fdd", "--fid-only"])
    printed = report_lines(capsys.readouterr().out)
    assert list(printed) == ["SAMPLES", "REF", "FID", "FDD"]
    (dino_samples,) = cli[-1]
    # dgm-eval's: float64 statistics of the CLS features, the Fréchet distance
    expected = fid.frechet_distance(*fid.feature_statistics(dino_samples.astype(np.float64)),
                                    *fid.feature_statistics(dino_ref.astype(np.float64)))
    assert float(printed["FDD"]) == pytest.approx(expected, abs=1e-4)


def test_statistics_files_serve_the_full_report_on_both_sides(tmp_path, networks, cli, capsys):
    # no image is read: the pool3 features give the Inception Score (through the network's
    # logits) and the balls
    rng = np.random.default_rng(0)
    pool3 = rng.random((5, 2048), dtype=np.float32)
    spatial = rng.random((5, 2023), dtype=np.float32)
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=pool3.mean(0), sigma=np.cov(pool3, rowvar=False), mu_s=spatial.mean(0),
             sigma_s=np.cov(spatial, rowvar=False), pool3=pool3)
    fid.main([str(stats), str(stats)])
    printed = report_lines(capsys.readouterr().out)
    assert list(printed) == ["SAMPLES", "REF", "FID", "sFID", "IS", "Precision", "Recall"]
    assert not cli
    assert printed["Precision"] == printed["Recall"] == "1.0000"
    inception = networks[fid.INCEPTION_URL]
    assert printed["IS"] == f"{fid.inception_score(inception.logits(torch.from_numpy(pool3))):.4f}"

#### Bad input: one line, a non-zero exit, nothing written ####

def test_every_bad_input_is_one_line_and_nothing_is_written(tmp_path, cli, capsys):
    folder = write_images(tmp_path / "imgs", [(8, 8)] * 4)
    mixed = write_images(tmp_path / "mixed", [(8, 8), (8, 8), (12, 8), (8, 8)])
    one = write_images(tmp_path / "one", [(8, 8)])
    broken = write_images(tmp_path / "broken", [(8, 8)] * 4)
    (broken / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.txt").write_text("x")
    np.savez(tmp_path / "three.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "stats8.npz", mu=np.zeros(8), sigma=np.eye(8))    # mu and sigma only
    np.savez(tmp_path / "other.npz", latents=np.zeros(3))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 cut short")
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as archive, \
            archive.open("arr_0.npy", "w") as f:                      # the header promises 5
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (5, 8, 8, 3)})
        f.write(np.zeros((3, 8, 8, 3), np.uint8).tobytes())
    (tmp_path / "earlier.npz").write_bytes(b"earlier statistics")
    np.savez(tmp_path / "nan.npz", mu=np.full(8, np.nan), sigma=np.eye(8))
    np.savez(tmp_path / "inf.npz", mu=np.zeros(8), sigma=np.full((8, 8), np.inf))
    np.savez(tmp_path / "text.npz", mu=np.array(["a"] * 8), sigma=np.eye(8))
    np.savez(tmp_path / "wide.npz", mu=np.zeros(8), sigma=np.ones((8, 9)))
    np.savez(tmp_path / "huge.npz", mu=np.zeros(8), sigma=np.eye(8) * 1e308)   # finite, overflows
    t = tmp_path
    cases = {
        "no reference": ([folder], "give REF to score SAMPLES against, or --save-stats"),
        "fewer than k + 1 for precision": ([t / "three.npz", folder], "precision and recall need "
                                           "at least 4 feature vectors per set"),
        "a reference without what is asked": ([folder, t / "stats8.npz"], f"REF {t / 'stats8.npz'}"
                                              " holds neither mu_s, sigma_s, pool3 nor images "
                                              "(arr_0) to compute them from"),
        "no such file": ([t / "nope.npz", folder], f"SAMPLES {t / 'nope.npz'}: no such file"),
        "not an npz": ([t / "x.txt", folder], f"SAMPLES {t / 'x.txt'}: not a readable .npz"),
        "a cut npz": ([t / "cut.npz", folder], "cut.npz: not a readable .npz ("),
        "neither images nor statistics": ([t / "other.npz", folder, "--fid-only"],
                                          "other.npz holds neither mu, sigma nor images"),
        "float images": ([t / "float.npz", folder], "arr_0 must be uint8 (N, H, W, 3), C-ordered; "
                                                    "got float32 (4, 8, 8, 3)"),
        "an arr_0 shorter than its header": ([t / "short.npz", folder], "arr_0 holds fewer than "
                                             "the 5 images its header promises"),
        "an empty folder": ([t / "empty", folder], "SAMPLES {}: 0 images".format(t / "empty")),
        "one image": ([one, t / "stats8.npz", "--fid-only"], "1 images (.png/.jpg/.jpeg/.webp/"
                                                             ".bmp in a folder); a covariance"),
        "mixed sizes": ([mixed, folder], f"SAMPLES {mixed}: images of mixed sizes"),
        "an image that does not decode": ([broken, folder], f"SAMPLES: cannot decode "
                                                            f"{broken / 'bad.png'} ("),
        "batch size 0": ([folder, folder, "--batch-size", "0"], "--batch-size 0: must be at least 1"),
        **{f"statistics of {name}": ([t / "stats8.npz", t / f"{name}.npz", "--fid-only"],
                                     f"REF {t / f'{name}.npz'}: its {key} must hold finite numbers")
           for name, key in (("nan", "mu"), ("inf", "sigma"), ("text", "mu"))},
        "a covariance that is not square": ([t / "stats8.npz", t / "wide.npz", "--fid-only"],
                                            "statistics that do not fit each other: mu (8,) and "
                                            "(8,), sigma (8, 8) and (8, 9)"),
        "a distance that overflows": ([t / "stats8.npz", t / "huge.npz", "--fid-only"],
                                      "the Fréchet distance is not finite"),
        "an existing statistics file": ([folder, "--save-stats", t / "earlier.npz"],
                                        f"--save-stats {t / 'earlier.npz'} exists: choose another"),
    }
    before = sorted(os.listdir(tmp_path))
    for case, (argv, message) in cases.items():
        with pytest.raises(SystemExit) as e:
            fid.main([str(a) for a in argv])
        line = e.value.code
        if line == 2:                                               # argparse's own report
            line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("fid.py: error: ") and message in line, (case, line)
        assert sorted(os.listdir(tmp_path)) == before, case
    assert (tmp_path / "earlier.npz").read_bytes() == b"earlier statistics"

#### The released weights: fetched once through torch.hub, checked, loaded strictly ####

class StandIn(torch.nn.Module):
    """One BatchNorm in a network's place (its file, like the released Inception's, without the
    counter): where the weights come from is tested here, not what they hold."""
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(1)


def test_the_weights_download_once_into_the_hub_cache_hash_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    state = {"bn.weight": torch.tensor([2.0]), "bn.bias": torch.tensor([3.0]),
             "bn.running_mean": torch.tensor([4.0]), "bn.running_var": torch.tensor([5.0])}
    server = tmp_path / "server"
    server.mkdir()
    torch.save(state, server / "weights.pth")
    data = (server / "weights.pth").read_bytes()
    good = server / f"pt_inception-test-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (server / "weights.pth").rename(good)                          # torch.hub's name convention
    cached = tmp_path / "hub" / "checkpoints" / good.name
    assert fid.released(StandIn, f"file://{good}").bn.bias.item() == 3.0
    assert cached.read_bytes() == data
    out, err = capsys.readouterr()
    assert out == "" and str(cached) in err      # torch.hub's note on stderr: stdout is the report
    good.unlink()                                                # the second use reads the cache
    assert fid.released(StandIn, f"file://{good}").bn.running_var.item() == 5.0

    bad = server / "pt_inception-test-00000000.pth"               # a hash its content has not
    bad.write_bytes(data)
    with pytest.raises(ValueError) as e:
        fid.released(StandIn, f"file://{bad}")
    message = str(e.value)
    assert "\n" not in message and 'invalid hash value (expected "00000000", got "' in message
    assert f"without network, download file://{bad} to that path" in message
    assert os.listdir(tmp_path / "hub" / "checkpoints") == [good.name]   # nothing of the bad one
    offline = tmp_path / "nowhere" / "dinov2_vitl14_pretrain.pth"   # no network, no copy
    with pytest.raises(ValueError, match=re.escape(str(cached.parent / offline.name))):
        fid.released(StandIn, f"file://{offline}")


def test_weights_that_do_not_fit_are_load_state_dicts_report(tmp_path, monkeypatch, networks):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model = networks[fid.INCEPTION_URL]
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.zeros(1000, 2048)
    state["AuxLogits.fc.weight"] = state.pop("Mixed_7c.branch_pool.conv.weight")
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / "odd.pth")       # in the cache: not downloaded
    with pytest.raises(ValueError) as e:
        fid.released(fid.FIDInceptionV3, "file:///elsewhere/odd.pth")
    message = str(e.value)
    for part in ['Missing key(s) in state_dict: "Mixed_7c.branch_pool.conv.weight"',
                 'Unexpected key(s) in state_dict: "AuxLogits.fc.weight"',
                 "size mismatch for fc.weight: copying a param with shape torch.Size([1000, 2048]) "
                 "from checkpoint, the shape in current model is torch.Size([1008, 2048])"]:
        assert part in message
