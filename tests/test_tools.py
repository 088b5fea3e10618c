"""tools/: the benchmarks print rows whose figures agree with each other and with the models' FLOP
counts; decode_latents.py turns sample.py's saved latents into the images --vae would have made.
(tools/encode_latents.py: test_data.py.)"""
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

import sample
import sprint
from sparsedit import MODELS
from tiny import ROOT, npz, run_sample, sampling_model, save_ckpt, tool

pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py


def table(text):
    """A printed Markdown table -> one {column: cell} dict per row."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
            for line in lines[2:]]


@pytest.fixture
def tiny_size(monkeypatch):
    """A size T: width 32, 2 heads, 1/2/1 blocks; at --image-size 64, 8 x 8 latents."""
    monkeypatch.setitem(sprint.SIZES, "T", (32, 2, (1, 2, 1)))
    return ["--size", "T", "--image-size", "64", "--batch", "4", "--reps", "3"]


#################################################################################
#                                  Benchmarks                                   #
#################################################################################

def test_the_training_benchmark_prints_one_row_of_consistent_figures(tiny_size, capsys):
    ms = tool("benchmark").main(["train", "--model", "sprint", "--drop", "0.75", *tiny_size])
    (row,) = table(capsys.readouterr().out)
    assert row["model"] == "sprint-T/2" and row["drop"] == "0.75" and row["batch"] == "4 = 1 x 4"
    assert float(row["ms/step"]) == pytest.approx(ms, abs=0.05)
    assert float(row["img/s"]) == pytest.approx(4 / ms * 1e3, rel=1e-2)
    # TFLOP/s from the model's own count: a step is 3 forwards of the 75%-drop model
    model = MODELS["sprint"](sprint.ModelConfig("sprint", "T", 2, 8, 4, 1000))
    step_flops = 3 * model.training_flops(0.75)
    assert float(row["TFLOP/s"]) == pytest.approx(step_flops * 4 / ms / 1e9, rel=1e-2)
    mfu, peak = row["MFU (of a measured fp32 matmul peak)"].split(" of ")
    assert float(mfu.rstrip("%")) / 100 == pytest.approx(
        float(row["TFLOP/s"]) / float(peak.split()[0]), rel=0.05, abs=1e-3)
    with pytest.raises(SystemExit, match="--model dit has no sparse path: leave --drop out"):
        tool("benchmark").main(["train", "--model", "dit", "--drop", "0.5", *tiny_size])


def test_the_sampling_benchmark_times_cfg_and_pdg_and_their_ratio(tiny_size, capsys):
    flags = [*tiny_size, "--sampler", "euler", "--steps", "10"]
    ms = tool("benchmark").main(["sample", "--model", "sprint", *flags])
    out = capsys.readouterr().out
    rows = {row["guidance"]: row for row in table(out)}
    assert set(ms) == set(map(str.lower, rows)) == {"cfg", "pdg"}
    for mode, row in rows.items():
        assert float(row["ms/step"]) == pytest.approx(ms[mode.lower()], abs=0.01)
        # 10 guided Euler steps an image
        assert float(row["img/s (euler-10)"]) == pytest.approx(4e3 / (ms[mode.lower()] * 10),
                                                              rel=1e-2)
    assert f"PDG/CFG speed-up per step: {ms['cfg'] / ms['pdg']:.2f}x" in out
    assert set(tool("benchmark").main(["sample", "--model", "dit", *flags])) == {"cfg"}


#################################################################################
#                 Latents saved without --vae, decoded later                    #
#################################################################################

@pytest.fixture
def fake_vae(monkeypatch):
    """diffusers' AutoencoderKL replaced by an 8x nearest upsampling of tanh(z[:3]); every latent it
    decodes is kept in the returned list."""
    decoded = []

    class FakeVAE(torch.nn.Module):
        dtype = torch.float32

        def decode(self, z):
            decoded.append(z)
            image = z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2)
            return types.SimpleNamespace(sample=torch.tanh(image))
    fake = types.ModuleType("diffusers")
    fake.AutoencoderKL = types.SimpleNamespace(from_pretrained=lambda path: FakeVAE())
    monkeypatch.setitem(sys.modules, "diffusers", fake)
    return decoded


def test_saved_latents_decode_to_the_images_that_vae_makes(tmp_path, fake_vae, capsys):
    ckpt = save_ckpt(tmp_path / "lat.pt", sampling_model(in_channels=4), args={"latent_scale": 0.5})
    common = ["--ckpt", ckpt, "--steps", 3, "--num-samples", 5, "--per-proc-batch-size", 2]
    run_sample(*common, "--vae", "sd-vae", "--out", tmp_path / "img.npz")
    run_sample(*common, "--vae", "none", "--out", tmp_path / "lat.npz")
    assert "holds latents, not images (--vae none): decode them with tools/decode_latents.py" in \
        capsys.readouterr().out
    images = npz(tmp_path / "img.npz")
    latents = npz(tmp_path / "lat.latents.npz")
    assert images["arr_0"].shape == (5, 64, 64, 3) and images["arr_0"].dtype == np.uint8
    # the model's output divided by the checkpoint's latent scale, as the VAE decoded it; sampled
    # in the command's batches (2, 2, 1): CPU kernels round differently by batch shape
    model = sample.load_model(ckpt)
    batches = [sample.sample_inputs(rows, 0, None, 4, (4, 8, 8), "cpu")
               for rows in (range(0, 2), range(2, 4), range(4, 5))]
    x = torch.cat([sample.sample(model, z, y, "sde", 3, gens, cfg_scale=4.0)
                   for z, y, gens in batches])
    assert torch.equal(torch.from_numpy(latents["latents"]), x / 0.5)
    fake_vae.clear()
    decode = tool("decode_latents")
    decode.main([str(tmp_path / "lat.latents.npz"), str(tmp_path / "decoded.npz"), "--vae", "sd",
                 "--device", "cpu", "--batch-size", "2"])
    torch.testing.assert_close(torch.cat(fake_vae), x / 0.5)          # in batches of 2, 2, 1
    decoded = npz(tmp_path / "decoded.npz")
    assert np.array_equal(decoded["arr_0"], images["arr_0"])
    assert np.array_equal(decoded["arr_1"], images["arr_1"])
    with pytest.raises(SystemExit, match=r"decoded\.npz exists: choose another output"):
        decode.main([str(tmp_path / "lat.latents.npz"), str(tmp_path / "decoded.npz")])


def test_decoding_refuses_what_it_cannot_read_before_loading_the_vae(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)             # not installed
    decode = tool("decode_latents")
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), arr_1=np.zeros(2))
    np.savez(tmp_path / "x.latents.npz", latents=np.zeros((2, 4, 1, 1)), arr_1=np.zeros(2))
    cases = [(tmp_path / "none.npz", r"none\.npz: not a readable \.npz \(.*No such file"),
             (tmp_path / "images.npz", r"images\.npz: holds arr_0, arr_1, not the latents and "
                                       r"labels \(latents, arr_1\) that sample\.py saves"),
             (tmp_path / "x.latents.npz", r"the SD-VAE stabilityai/sd-vae-ft-ema needs the optional "
                                          r"package diffusers: pip install diffusers")]
    for latents, message in cases:
        with pytest.raises(SystemExit, match=r"^decode_latents\.py: error: .*" + message):
            decode.main([str(latents), str(tmp_path / "out.npz"), "--device", "cpu"])
    assert not (tmp_path / "out.npz").exists()


#################################################################################
#                     Conformance: fixtures and their generators                #
#################################################################################

def declared(name):
    """tools/conformance's generators -> the value of their module constant `name` (read with ast:
    importing a generator needs the official code)."""
    import ast

    found = {}
    for path in sorted((ROOT / "tools" / "conformance").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            targets = [getattr(t, "id", None) for t in getattr(node, "targets", [])]
            if targets == [name]:                           # NAME = ..., not a, b = ...
                found[path.name] = ast.literal_eval(node.value)
    return found


def test_every_fixture_has_a_generator_and_every_generator_its_fixture():
    outputs = declared("OUTPUTS")
    made = [name for names in outputs.values() for name in names]
    assert len(made) == len(set(made))                                  # one generator each
    assert sorted(made) == sorted(p.name for p in (ROOT / "tests" / "fixtures").iterdir())
    pinned = declared("PINNED")
    assert pinned.keys() == outputs.keys()
    # README's table and tools/conformance/README.md's clones name the pinned commits
    readme = (ROOT / "README.md").read_text()
    clones = (ROOT / "tools" / "conformance" / "README.md").read_text()
    for repos in pinned.values():
        for repo, commit in repos.items():
            assert len(commit) == 40 and f"{repo} ({commit[:7]})" in readme, repo
            assert f"github.com/{repo} && git -C {repo.split('/')[1]} checkout {commit}" in clones


def test_compare_prints_the_largest_difference_and_fails_above_the_tolerance(tmp_path, capsys):
    compare = tool("conformance/compare")
    a = {"x": np.linspace(1, 2, 10), "n": np.arange(3), "config": np.asarray('{"depth": 2}')}
    np.savez(tmp_path / "a.npz", **a)

    def against(**b):
        """compare.py's exit status and last lines for a.npz against a copy with `b` changed."""
        np.savez(tmp_path / "b.npz", **{**a, **b})
        status = compare.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])
        return status, capsys.readouterr().out.splitlines()[-1]

    assert against() == (0, "3 keys in common; largest relative difference 0.00e+00")
    x = a["x"].copy()
    x[4] *= 1 + 1e-7                                                # 1.44e-7 of max |x| = 2
    assert against(x=x) == (0, "3 keys in common; largest relative difference 7.22e-08 (x)")
    x[4] *= 1 + 1e-4
    assert against(x=x) == (1, "x: relative difference 7.23e-05 > 1e-05")
    for changed in ({"n": np.arange(3.0)}, {"n": np.arange(4)}, {"config": np.asarray("{}")}):
        assert against(**changed)[0] == 1, changed


def test_a_generator_refuses_official_code_at_another_commit_and_says_how_to_fix_it(tmp_path):
    import subprocess

    official = tool("conformance/official")
    with pytest.raises(SystemExit, match="not a git clone; get one with\n  git clone https://"):
        official.checkout(tmp_path, "owner/repo", "0" * 40)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    with pytest.raises(SystemExit, match=f"is at {head}; .* pinned to owner/repo at 1{{40}}:\n"
                                         f"  git -C {tmp_path} checkout 1{{40}}"):
        official.checkout(tmp_path, "owner/repo", "1" * 40)
    assert official.checkout(tmp_path, "owner/repo", head) == tmp_path.resolve()
    assert sys.path.pop(0) == str(tmp_path.resolve())                 # first on the import path


def test_conformance_fixtures_points_the_tests_at_another_folders_fixtures(tmp_path, monkeypatch):
    import tiny

    # tests/conftest.py by its path: in the whole suite `import conftest` finds experiments' own
    spec = importlib.util.spec_from_file_location("tests_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    (tmp_path / "dit_official.npz").write_bytes(b"")
    monkeypatch.setenv("CONFORMANCE_FIXTURES", str(tmp_path))
    assert tiny.fixture("dit_official.npz") == tmp_path / "dit_official.npz"
    assert tiny.fixture("dinov2_fdd.npz") == ROOT / "tests" / "fixtures" / "dinov2_fdd.npz"
    assert conftest.pytest_report_header() == f"fixtures from {tmp_path}: dit_official.npz"
