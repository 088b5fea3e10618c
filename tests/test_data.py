"""train.py's data as a specification: the embedded data, image folders, .npz files and folders
of memory-mapped arrays set the model's channels, size and classes; a memory-mapped set is read
batch by batch (a rank's memory does not grow with it) and a non-finite latent stops the run by its
index; tools/encode_latents.py streams each image and its mirror into that layout, never leaves a
half-written folder, and train.py holds out whole images, both views."""
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

import sample
import train
from tiny import TINY, image_folder, records, resident_bytes, run, tool

pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py


def load(*flags):
    """train.load_data for these flags -> (dataset, number of classes)."""
    args, _ = train.parse_args(list(flags))
    return train.load_data(args)


#################################################################################
#                   The sources: embedded, folders, .npz, arrays                #
#################################################################################

def test_the_embedded_data_is_fixed_and_its_classes_differ():
    (x, y), (x2, y2) = train.embedded_dataset(16, 500), train.embedded_dataset(16, 500)
    assert x.shape == (500, 16, 16, 3) and x.dtype == np.uint8 and set(y) == set(range(10))
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    # each class its own hue
    colours = np.stack([x[y == k].reshape(-1, 3).max(0) for k in range(10)])
    assert len({tuple(c // 32) for c in colours}) == 10
    train_idx, held_out = train.split(500)
    assert len(held_out) == 50 and not set(train_idx) & set(held_out)
    assert np.array_equal(held_out, train.split(500)[1])


def test_an_image_folder_is_decoded_in_workers_and_sets_the_classes(tmp_path):
    folder = image_folder(tmp_path / "images", classes=3)
    run_dir = run(tmp_path, "--data", str(folder), "--num-workers", "1", "--steps", "2",
                  "--eval-every", "2", "--image-size", "16")
    cfg = torch.load(run_dir / "checkpoints" / "0000002.pt", weights_only=True)["config"]
    assert (cfg["in_channels"], cfg["input_size"], cfg["num_classes"]) == (3, 16, 3)
    assert any("eval_loss" in rec for rec in records(run_dir))


@pytest.mark.parametrize("kind", ["pixels in an .npz", "latents in x.npy and y.npy"])
def test_arrays_of_pixels_or_latents_set_channels_size_and_classes(tmp_path, kind):
    rng = np.random.default_rng(0)
    y = np.arange(40) % 5
    if kind == "pixels in an .npz":
        data = tmp_path / "data.npz"
        np.savez(data, x=rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), y=y)
    else:
        data = tmp_path / "latents"
        data.mkdir()
        np.save(data / "x.npy", rng.standard_normal((40, 4, 8, 8)).astype(np.float16))
        np.save(data / "y.npy", y)
    run_dir = run(tmp_path, "--data", str(data), "--image-size", "8", "--patch-size", "2",
                  "--latent-scale", "0.5", "--steps", "2")
    cfg = torch.load(run_dir / "checkpoints" / "0000002.pt", weights_only=True)["config"]
    channels = 3 if kind == "pixels in an .npz" else 4
    assert (cfg["in_channels"], cfg["input_size"], cfg["num_classes"]) == (channels, 8, 5)


def test_latents_are_scaled_by_sd_vaes_factor_and_decoded_by_the_runs_own(tmp_path, monkeypatch):
    """One latent scale: train.py multiplies latents by --latent-scale, SD-VAE's 0.18215 unless
    given, the checkpoint keeps it, and sample.py divides by that one before decoding."""
    data = tmp_path / "latents"
    data.mkdir()
    np.save(data / "x.npy", np.random.default_rng(0).standard_normal((40, 4, 8, 8), np.float32))
    np.save(data / "y.npy", np.arange(40) % 5)
    seen = []
    step = train.train_step

    def spy(model, raw, ema, opt, x, *args, **kwargs):
        seen.append(x)
        return step(model, raw, ema, opt, x, *args, **kwargs)
    monkeypatch.setattr(train, "train_step", spy)
    run_dir = run(tmp_path, "--data", str(data), "--patch-size", "2", "--steps", "1")
    latents = torch.from_numpy(np.load(data / "x.npy"))
    assert abs(seen[0].std() / latents.std() - sample.LATENT_SCALE) < 0.01
    ckpt = str(run_dir / "checkpoints" / "0000001.pt")
    args = sample.parse_args(["--ckpt", ckpt, "--vae", "none", "--out", str(tmp_path / "s.npz")])
    assert sample.sampling_model(args, torch.device("cpu"))[2] == sample.LATENT_SCALE


def test_pixels_are_resized_to_the_image_size_with_antialiasing_and_latents_are_not(tmp_path):
    checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)    # 1-pixel checkerboard
    pixels = np.repeat(checker[None, ..., None], 12, 0).repeat(3, -1)
    np.savez(tmp_path / "px.npz", x=pixels, y=np.arange(12) % 3)
    dataset, num_classes = load("--data", str(tmp_path / "px.npz"), "--image-size", "16")
    x = dataset[np.arange(12)][0]
    assert x.shape == (12, 3, 16, 16) and num_classes == 3
    # averaged to grey, not aliased to 0 or 255
    assert (x.float() - 127.5).abs().max() <= 1
    # not square: cropped to the centre, 16 x 16 (ADM's crop), also without --image-size
    np.savez(tmp_path / "wide.npz", x=np.zeros((12, 16, 24, 3), np.uint8), y=np.arange(12) % 3)
    assert load("--data", str(tmp_path / "wide.npz"))[0][np.arange(2)][0].shape == (2, 3, 16, 16)
    np.savez(tmp_path / "latents.npz", x=np.zeros((12, 4, 8, 8), np.float16), y=np.arange(12) % 3)
    with pytest.raises(ValueError, match=r"--image-size 16: .*latents\.npz holds 8x8 latents, "
                                         r"which are not resized"):
        load("--data", str(tmp_path / "latents.npz"), "--image-size", "16")


#################################################################################
#          Arrays on disk: memory-mapped, read batch by batch, checked          #
#################################################################################

def test_a_folder_of_arrays_is_read_batch_by_batch_not_whole(tmp_path):
    """409 MB of latents (a sparse file: no disk used), opened as train.py opens --data and read in
    five batches of 64: resident memory grows by what those batches read (measured: 28 MB, mostly
    numpy's and the allocator's own), not by the array; reading it whole grows it by 415 MB."""
    n = 50_000
    x = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.float16, (n, 4, 32, 32))
    del x
    np.save(tmp_path / "y.npy", np.arange(n) % 10)
    before = resident_bytes()
    dataset, num_classes = load("--data", str(tmp_path))
    train_idx, held_out = train.split(len(dataset))
    batches = [dataset[np.random.default_rng(i).choice(train_idx, 64)] for i in range(5)]
    grown = resident_bytes() - before
    assert num_classes == 10 and batches[0][0].shape == (64, 1, 1, 4, 32, 32)   # 1 view, 1 moment
    assert grown < 100e6, f"resident memory grew by {grown / 1e6:.0f} MB"


@pytest.mark.parametrize("source, workers", [("x.npy", 4), ("npz", 0), ("folder", 8)])
def test_default_workers_read_a_memory_map_and_decode_images_the_main_process_holds_the_rest(
        tmp_path, monkeypatch, source, workers):
    """DataLoader workers by default: 4 read batches of a memory-mapped x.npy, 8 decode an image
    folder's files; arrays already in memory need none."""
    x, y = np.zeros((40, 8, 8, 3), np.uint8), np.arange(40) % 4
    data = {"folder": image_folder(tmp_path / "images", classes=2, per_class=20, size=(8, 8)),
            "npz": tmp_path / "d.npz", "x.npy": tmp_path}[source]
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    seen = []

    def loader(*args, num_workers, **kwargs):
        seen.append(num_workers)
        raise KeyboardInterrupt                              # the run need go no further
    monkeypatch.setattr(train, "DataLoader", loader)
    at = TINY.index("--num-workers")
    flags = TINY[:at] + TINY[at + 2:]                        # the default
    with pytest.raises(KeyboardInterrupt):
        train.main([*flags, "--data", str(data), "--image-size", "8", "--results-dir",
                    str(tmp_path / "results")])
    assert seen == [workers]


def test_a_nan_latent_in_the_middle_of_a_memory_mapped_set_stops_the_run_at_its_step(tmp_path):
    """tools/encode_latents.py refuses to write a latent that is not finite; one in latents of other
    origin makes its step's loss non-finite, and the run stops there, naming the step."""
    latents = np.random.default_rng(0).standard_normal((200, 4, 16, 16)).astype(np.float32)
    latents[137, 2, 1, 3] = np.nan
    data = tmp_path / "latents"
    data.mkdir()
    np.save(data / "x.npy", latents)
    np.save(data / "y.npy", np.arange(200) % 4)
    # steps that reach every training item: the run starts, then stops at the batch holding it
    with pytest.raises(FloatingPointError, match=r"^a non-finite loss by step \d+: stopped"):
        run(tmp_path, "--data", str(data), "--steps", "40")
    assert (tmp_path / "results").is_dir()                  # opened without a scan of the whole


def test_memory_mapped_pixels_are_cropped_per_batch_and_travel_to_workers_by_file_name(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (50, 24, 24, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    np.save(tmp_path / "y.npy", np.arange(50) % 5)
    dataset, num_classes = load("--data", str(tmp_path), "--image-size", "16")
    x, y = dataset[[3, 7]]
    expected = train.center_crop_arr(train.Image.fromarray(pixels[7]), 16)
    assert x.shape == (2, 3, 16, 16) and np.array_equal(x[1].permute(1, 2, 0).numpy(), expected)
    # a DataLoader worker started by spawn (macOS, Windows) unpickles it: the file names, not
    # the 86 KB of pixels, and the same batches
    blob = pickle.dumps(dataset)
    assert len(blob) < 2_000 and torch.equal(pickle.loads(blob)[[3, 7]][0], x)
    assert num_classes == 5 and y.tolist() == [3, 2]


#################################################################################
#             tools/encode_latents.py: streamed, checked, all or nothing        #
#################################################################################

@pytest.fixture
def fake_vae(monkeypatch):
    """diffusers' AutoencoderKL replaced: the posterior's mean is the 8 x 8 average of the pixels
    plus a fourth channel of zeros, its std 0.25; `fake_vae.calls` counts encodings, `fake_vae.fail`
    maps a call number to the exception it raises, `fake_vae.nan` marks a batch row whose latent
    is NaN."""
    state = types.SimpleNamespace(calls=0, fail={}, nan=None)

    class FakeVAE(torch.nn.Module):
        def encode(self, x):
            state.calls += 1
            if state.calls in state.fail:
                raise state.fail[state.calls]
            z = torch.nn.functional.avg_pool2d(x, 8)                      # (B, 3, H/8, W/8)
            z = torch.cat([z, torch.zeros_like(z[:, :1])], dim=1)         # (B, 4, H/8, W/8)
            if state.nan is not None and state.calls == state.nan[0]:
                z[state.nan[1]] = float("nan")
            posterior = types.SimpleNamespace(mean=z, std=torch.full_like(z, 0.25))
            return types.SimpleNamespace(latent_dist=posterior)

    fake = types.ModuleType("diffusers")
    fake.AutoencoderKL = types.SimpleNamespace(from_pretrained=lambda *a, **k: FakeVAE())
    monkeypatch.setitem(sys.modules, "diffusers", fake)
    return state


def test_encoding_writes_every_image_and_its_mirror_and_train_py_reads_them(tmp_path, fake_vae):
    folder = image_folder(tmp_path / "images", classes=2, per_class=3, size=(40, 32))
    encode = tool("encode_latents")
    encode.main([str(folder), str(tmp_path / "latents"), "--size", "16", "--device", "cpu",
                 "--batch-size", "4", "--num-workers", "0"])
    x = np.load(tmp_path / "latents" / "x.npy")
    y = np.load(tmp_path / "latents" / "y.npy")
    # 6 images, 2 views each, each view's posterior mean and std
    assert x.shape == (6, 2, 2, 4, 2, 2) and x.dtype == np.float16
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    pixels = train.image_folder(folder, 16)[0][range(6)][0].float() / 127.5 - 1
    expected = torch.nn.functional.avg_pool2d(pixels, 8).half().numpy()
    assert np.array_equal(x[:, 0, 0, :3], expected) and not x[:, :, 0, 3].any()
    assert (x[:, :, 1] == 0.25).all()                                # the std
    # the mirrors (summed in another order: equal to float16 rounding)
    assert np.allclose(x[:, 1, 0, :3].astype(np.float32), expected[..., ::-1], rtol=0, atol=1e-3)
    assert not (tmp_path / "latents.partial").exists()
    dataset, num_classes = load("--data", str(tmp_path / "latents"))
    assert num_classes == 2 and torch.equal(dataset[[4]][0], torch.from_numpy(x[[4]]))
    # a training step draws one view of each image (train.py's flip): it trains on them
    run_dir = run(tmp_path, "--data", str(tmp_path / "latents"), "--patch-size", "1",
                  "--global-batch-size", "4", "--steps", "2")
    assert torch.load(run_dir / "checkpoints" / "0000002.pt")["config"]["input_size"] == 2


def test_views_image_and_random_store_one_view_each_as_sprint_and_fast_dit_train_on(tmp_path,
                                                                                 fake_vae):
    """--views image: the image alone (SPRINT's code never flips; half the size); random: the image
    or its mirror, the same ones every time, some of each (fast-DiT's features, SparseDiT's data).
    Either way train.py finds no mirror to draw, so its recipes train them unflipped."""
    folder = image_folder(tmp_path / "images", classes=2, per_class=6, size=(40, 32))
    encoded = {}
    for views in ("both", "image", "random", "random"):
        out = tmp_path / f"{views}{len(encoded)}"
        tool("encode_latents").main([str(folder), str(out), "--size", "16", "--device", "cpu",
                                     "--batch-size", "4", "--num-workers", "0", "--views", views])
        encoded[out.name] = np.load(out / "x.npy")
    both, image, random, again = encoded.values()
    assert image.shape == random.shape == (12, 1, 2, 4, 2, 2)
    assert np.array_equal(image[:, 0], both[:, 0]) and np.array_equal(random, again)
    mirrored = [np.array_equal(random[i, 0], both[i, 1]) for i in range(12)]
    assert all(m or np.array_equal(random[i, 0], both[i, 0]) for i, m in enumerate(mirrored))
    assert 0 < sum(mirrored) < 12
    run_dir = run(tmp_path, "--data", str(tmp_path / "random2"), "--patch-size", "1",
                  "--global-batch-size", "4", "--steps", "1", "--model", "dit", "--diffusion",
                  "ddpm")                                    # a recipe that flips, without mirrors
    assert "flip none;" in (run_dir / "log.txt").read_text()
    with pytest.raises(ValueError, match=r"--flip step: .*random2 stores no mirror of its images"):
        run(tmp_path, "--data", str(tmp_path / "random2"), "--patch-size", "1",
            "--global-batch-size", "4", "--steps", "1", "--flip", "step")


def test_each_step_draws_a_fresh_latent_from_the_stored_posterior_of_a_view():
    """SPRINT's sample_posterior: z = mean + std * n with a new n each step, then times the latent
    scale; with --flip step a view (the image or its mirror) with probability 1/2 each, else the
    image's. Held out: the mean."""
    G = 4000
    posterior = [(-10.0, 0.5), (10.0, 2.0)]               # (mean, std) of view 0 and of view 1
    x = torch.tensor(posterior).reshape(1, 2, 2, 1, 1, 1).expand(G, -1, -1, -1, -1, -1)
    torch.manual_seed(0)
    z = train.step_inputs(x, "step", 0.5, G, slice(None)).flatten() / 0.5   # (G, V, 2, 1, 1, 1)
    view_1 = z > 0                                        # the views' samples lie apart
    assert abs(view_1.float().mean() - 0.5) < 0.03
    for view, (m, s) in enumerate(posterior):
        samples = z[view_1 == bool(view)]
        assert abs(samples.mean() - m) < 0.1 and abs(samples.std() / s - 1) < 0.06
    again = train.step_inputs(x, "step", 0.5, G, slice(None)).flatten() / 0.5
    assert not torch.equal(z, again)                      # fresh each step
    assert (train.step_inputs(x, "none", 0.5, G, slice(None)) < 0).all()    # the image's view
    assert torch.equal(train.model_inputs(x[:3], 0.5), torch.full((3, 1, 1, 1), -5.0))


def test_the_held_out_images_are_never_trained_on_mirrored(tmp_path, fake_vae):
    """An image and its mirror are the same image: the held-out split keeps both on one side. Each
    image is a class of its own here, so a label on both sides would be an image on both."""
    folder = image_folder(tmp_path / "images", classes=20, per_class=1, size=(16, 16))
    tool("encode_latents").main([str(folder), str(tmp_path / "latents"), "--size", "16",
                                 "--device", "cpu", "--num-workers", "0"])
    dataset, _ = load("--data", str(tmp_path / "latents"))
    train_idx, held_out = train.split(len(dataset))
    trained = set(dataset[train_idx][1].tolist())
    assert len(held_out) and not trained & set(dataset[held_out][1].tolist())
    assert len(trained) + len(held_out) == 20


def test_an_interrupted_encoding_leaves_no_folder_that_passes_for_complete(tmp_path, fake_vae):
    folder = image_folder(tmp_path / "images", classes=2, per_class=3, size=(40, 32))
    encode = tool("encode_latents")
    argv = [str(folder), str(tmp_path / "latents"), "--size", "16", "--device", "cpu",
            "--batch-size", "4", "--num-workers", "0"]
    fake_vae.fail = {3: KeyboardInterrupt()}                          # the second batch's images
    with pytest.raises(KeyboardInterrupt):
        encode.main(argv)
    # neither the folder nor its partial one (a kill's would be named latents.partial)
    assert sorted(os.listdir(tmp_path)) == ["images"]
    with pytest.raises(ValueError, match="latents: not an image folder.* No such file"):
        load("--data", str(tmp_path / "latents"))
    # rerun: starts afresh and completes
    fake_vae.calls = 0
    fake_vae.fail = {}
    encode.main(argv)
    assert np.load(tmp_path / "latents" / "x.npy").shape == (6, 2, 2, 4, 2, 2)
    assert sorted(os.listdir(tmp_path)) == ["images", "latents"]


def test_a_non_finite_latent_stops_the_encoding_naming_its_image(tmp_path, fake_vae):
    folder = image_folder(tmp_path / "images", classes=2, per_class=3, size=(40, 32))
    fake_vae.nan = (3, 1)                      # second batch, images 4 and 5: row 1 is class1/2.png
    with pytest.raises(SystemExit, match=r"^encode_latents\.py: error: .*class1.2\.png: its latent "
                                         r"holds NaN or infinite values; nothing was written"):
        tool("encode_latents").main([str(folder), str(tmp_path / "latents"), "--size", "16",
                                    "--device", "cpu", "--batch-size", "4", "--num-workers", "0"])
    assert sorted(os.listdir(tmp_path)) == ["images"]
    # the tool's errors name its own arguments
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"^encode_latents\.py: error: FOLDER .*empty: no images "
                                         r"\(\.png"):
        tool("encode_latents").main([str(tmp_path / "empty"), str(tmp_path / "latents")])
