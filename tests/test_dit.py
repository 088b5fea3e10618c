"""The DiT paper's model and diffusion as a specification, against facebookresearch/DiT's own code
(tests/fixtures/dit_official.npz, random weights stored as a released checkpoint is): the position
table, the forward pass, forward_with_cfg, the training loss terms, the respaced timesteps,
p_mean_variance and a whole guided 25-step chain; then sample.py on a released-format file and
train.py converting one into a SparseDiT and fine-tuning it with DiT's loss."""

import numpy as np
import pytest
import torch

import sample
import sprint
from sparsedit import DDPM, space_timesteps
from tiny import fixture, npz, records, run, run_sample

FIXTURE = np.load(fixture("dit_official.npz"))
pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def fixture(key):
    return torch.from_numpy(FIXTURE[key])


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The fixture's state dict as a released DiT file stores it (a bare state dict: Conv2d patch
    embedding, the final Linear in (p1, p2, c) order, the table)."""
    path = tmp_path_factory.mktemp("dit") / "DiT-tiny.pt"
    torch.save({k[3:]: fixture(k) for k in FIXTURE.files if k.startswith("sd/")}, path)
    return path


@pytest.fixture(scope="module", autouse=True)
def fixture_size():
    """The fixture's width, heads and depth as a size "T": the tensors of a model without q/k norm
    do not give its heads, which sample.py takes from the size of its width (released files have
    the real sizes': XL, 1152 wide, 16 heads)."""
    size = (int(FIXTURE["config_hidden_size"]), int(FIXTURE["config_num_heads"]),
            (0, int(FIXTURE["config_depth"]), 0))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sprint.SIZES, "T", size)
        yield


@pytest.fixture(scope="module")
def model(released):
    """The model sample.py reads from that file."""
    return sample.load_model(released)


#################################################################################
#                     The model: its config, table, forward                     #
#################################################################################

def test_a_released_dit_is_read_as_the_dit_papers_model(model):
    cfg = model.cfg
    assert (cfg.input_size, cfg.patch_size, cfg.in_channels, cfg.hidden_size, sum(cfg.depths),
            cfg.num_classes) == tuple(int(FIXTURE[f"config_{k}"]) for k in (
                "input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_classes"))
    assert (cfg.diffusion, cfg.positions, cfg.qk_norm, cfg.out_channels) == ("ddpm", "table",
                                                                             False, 8)
    # the table the file stores is DiT's sin-cos table, which a fresh model builds itself
    torch.testing.assert_close(model.pos_embed, sprint.sincos_table(cfg.grid, cfg.hidden_size)[None])


def test_the_forward_pass_is_dits(model):
    with torch.no_grad():
        out = model(fixture("fwd_x"), fixture("fwd_t"), fixture("fwd_y"))
    assert rel(out, fixture("fwd_out")) < 1e-5                           # measured 2.6e-7


def test_guidance_is_forward_with_cfg_on_the_first_3_channels(model):
    """DiT's forward_with_cfg: the batch's first half conditional, its second the null label; the
    first 3 of the 8 output channels guided, the rest the conditional pass's own."""
    x, t, y, out = (fixture(f"cfg_{k}") for k in ("x", "t", "y", "out"))
    B = len(x) // 2
    with torch.no_grad():
        ours = torch.cat([sample.guided_velocity(model, x[i:i + 1], int(t[i]), y[i:i + 1],
                                                 float(FIXTURE["cfg_scale"])) for i in range(B)])
        plain = model(x[:B], t[:B], y[:B])
    assert rel(ours, out[:B]) < 1e-5                                      # measured 3e-7
    # batches of 2 and of 1 round differently on some CPUs: equal up to float32 rounding
    torch.testing.assert_close(ours[:, 3:], plain[:, 3:], rtol=0, atol=1e-6)
    assert not torch.allclose(ours[:, :3], plain[:, :3], rtol=0, atol=1e-2)


#################################################################################
#                          The diffusion: loss, sampler                         #
#################################################################################

def test_the_training_loss_terms_are_dits_per_sample(model):
    """create_diffusion("").training_losses: mse of the noise, vb (the learned variance's
    variational bound term, the decoder's NLL at t = 0), their sum."""
    with torch.no_grad():
        mse, vb = DDPM().losses(model, *(fixture(f"loss_{k}") for k in ("x0", "y", "t", "noise")))
    assert fixture("loss_t")[0] == 0                                      # the decoder term too
    assert rel(mse, fixture("loss_mse")) < 1e-5
    assert rel(vb, fixture("loss_vb")) < 1e-5                             # measured 2.8e-8
    assert rel(mse + vb, fixture("loss_loss")) < 1e-5


def test_the_variance_term_trains_the_variance_channels_only():
    """DiT's vb term sees the predicted mean frozen (its `frozen_out`): its gradient reaches the
    4 variance channels of the output and none of the 4 noise channels; the mse term the reverse."""
    class Output(torch.nn.Module):
        """A 'model' whose output (B, 8, H, W) is its parameter."""
        def __init__(self, out):
            super().__init__()
            self.out = torch.nn.Parameter(out)

        def forward(self, x, t, y):
            return self.out
    x0, y, t, noise = (fixture(f"loss_{k}") for k in ("x0", "y", "t", "noise"))
    out = Output(torch.randn(len(x0), 8, *x0.shape[2:]))
    mse, vb = DDPM().losses(out, x0, y, t, noise)
    (grad_vb,) = torch.autograd.grad(vb.sum(), out.out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(mse.sum(), out.out)
    assert (grad_vb[:, :4] == 0).all() and (grad_vb[:, 4:] != 0).any()
    assert (grad_mse[:, 4:] == 0).all() and (grad_mse[:, :4] != 0).any()


def test_the_respaced_timesteps_are_dits():
    assert space_timesteps(25) == FIXTURE["steps25"].tolist()
    assert space_timesteps(250) == FIXTURE["steps250"].tolist()


def test_p_mean_variance_of_the_respaced_diffusion_is_dits(model):
    ddpm = DDPM(space_timesteps(25))
    x, i = fixture("pmv_x"), fixture("pmv_i")
    with torch.no_grad():
        out = model(x, torch.tensor(ddpm.timesteps)[i], fixture("pmv_y"))
    mean, log_variance, x0 = ddpm.p_mean_variance(out, x, i)
    for ours, key in ((mean, "mean"), (log_variance, "log_variance"), (x0, "pred_xstart")):
        assert rel(ours, fixture(f"pmv_{key}")) < 1e-5, key              # measured < 1e-7


def test_a_guided_25_step_chain_is_dits_sample_loop(model, monkeypatch):
    """DiT's sample.py with 25 steps and scale 4, each step's noise given (none at the last)."""
    noises = iter(fixture("chain_noise"))
    monkeypatch.setattr(sample, "noise_like", lambda x, generators=None: next(noises))
    out = sample.ddpm_sample(model, fixture("chain_z"), fixture("chain_y"), 25,
                             cfg_scale=float(FIXTURE["chain_scale"]))
    assert rel(out, fixture("chain_out")) < 1e-4                          # measured 2.5e-7
    assert len(list(noises)) == 1                                         # the last one unused


#################################################################################
#         The commands: sampling a released DiT, converting it to SparseDiT     #
#################################################################################

def test_sample_py_samples_a_released_dit_with_ddpm(released, tmp_path, capsys):
    run_sample("--ckpt", released, "--steps", 5, "--cfg-scale", 1.5, "--num-samples", 3,
               "--out", tmp_path / "dit.npz", "--vae", "none")
    assert "ddpm-5" in capsys.readouterr().out
    saved = npz(tmp_path / "dit.latents.npz")
    side = int(FIXTURE["config_input_size"])
    assert saved["latents"].shape == (3, 4, side, side) and np.isfinite(saved["latents"]).all()
    with pytest.raises(SystemExit, match="--sampler euler: this ddpm model samples with "
                                         "--sampler ddpm"):
        run_sample("--ckpt", released, "--sampler", "euler", "--out", tmp_path / "x.npz")


def test_train_py_converts_a_released_dit_to_sparsedit_and_fine_tunes_it(released, tmp_path):
    data = tmp_path / "latents"
    data.mkdir()
    side, classes = int(FIXTURE["config_input_size"]), int(FIXTURE["config_num_classes"])
    latents = np.random.default_rng(0).standard_normal((40, 4, side, side), np.float32)
    np.save(data / "x.npy", latents)
    np.save(data / "y.npy", np.arange(40) % classes)
    # the fixture's size over tiny.run's tiny flags
    size = [f"--{k.replace('_', '-')}={FIXTURE['config_' + k]}"
            for k in ("hidden_size", "num_heads", "patch_size")]
    run_dir = run(tmp_path, "--model", "sparsedit", "--size", "T", *size, "--depths", "0",
                  str(FIXTURE["config_depth"]), "0", "--init", str(released), "--data", str(data),
                  "--steps", "3", "--eval-every", "3")
    ckpt = torch.load(run_dir / "checkpoints" / "0000003.pt", weights_only=True)
    assert {k: ckpt["config"][k] for k in ("model", "diffusion", "positions", "qk_norm")} == dict(
        model="sparsedit", diffusion="ddpm", positions="table", qk_norm=False)
    # its blocks are the DiT's, the table too (until fine-tuned: it is fixed)
    assert torch.equal(ckpt["model"]["pos_embed"], fixture("sd/pos_embed"))
    evals = [rec["eval_loss"] for rec in records(run_dir) if "eval_loss" in rec]
    assert len(evals) == 2 and all(np.isfinite(evals))                   # DiT's mse + vb
