"""fid.py and inception.py as a specification: the FID Inception-v3 reproduces pytorch-fid on the fixture, FID and
IS obey their definitions, and the CLI runs end to end and rejects bad input with messages a user can act on."""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
import fid
import inception

FIXTURE = np.load(ROOT / 'tests' / 'fixtures' / 'fid_inception_io.npz')


def fixture_weights():
    """The fixture's weight rule: the k-th key of sorted(keys) is drawn from a Generator seeded k."""
    shapes = json.loads(str(FIXTURE['shapes']))
    state = {}
    for k, key in enumerate(sorted(map(str, FIXTURE['keys']))):
        shape, g = shapes[key], torch.Generator().manual_seed(k)
        if key.endswith('running_var'):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith('running_mean'):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            state[key] = torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
        elif key.endswith('weight'):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope='module')
def weights_path(tmp_path_factory):
    path = tmp_path_factory.mktemp('weights') / inception.WEIGHTS_NAME
    torch.save(fixture_weights(), path)
    return path


@pytest.fixture(scope='module')
def model(weights_path):
    return inception.load_inception(str(weights_path))


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def write_images(folder, sizes, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f'{i:03d}.png')
    return folder


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / 'fid.py'), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, 'OMP_NUM_THREADS': '2', **(env or {})}, timeout=120)


#### The network matches pytorch-fid's FID Inception-v3 ####

def test_state_dict_has_the_released_weight_files_keys_and_shapes():
    shapes = json.loads(str(FIXTURE['shapes']))
    ours = {k: list(v.shape) for k, v in inception.FIDInceptionV3().state_dict().items()
            if not k.endswith('num_batches_tracked')}
    assert ours == shapes and len(ours) == 472


def test_reproduces_pool3_and_logits_after_bilinear_resize(model):
    pool3, logits = fid.inception_outputs(FIXTURE['images'], model)  # 64×64 -> 299×299 inside
    assert pool3.shape == (3, 2048) and logits.shape == (3, 1008)
    assert rel_err(pool3, FIXTURE['pool3']) < 1e-4
    assert rel_err(logits, FIXTURE['logits']) < 1e-4


def test_reproduces_pool3_at_native_299(model):
    pool3, _ = fid.inception_outputs(FIXTURE['images_299'], model)
    assert rel_err(pool3, FIXTURE['pool3_299']) < 1e-4


def test_uint8_channels_last_equals_float_channels_first(model):
    u8 = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    a, _ = fid.inception_outputs(u8, model)
    b, _ = fid.inception_outputs(torch.from_numpy(u8).permute(0, 3, 1, 2) / 255, model, batch_size=1)
    assert rel_err(a, b) < 1e-5


def test_loads_files_with_num_batches_tracked(tmp_path):
    path = tmp_path / 'with_counters.pth'
    torch.save(inception.FIDInceptionV3().state_dict(), path)
    assert isinstance(inception.load_inception(str(path)), inception.FIDInceptionV3)


#### Fréchet distance and Inception Score follow their definitions ####

def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 16))
    mu, sigma = fid.feature_statistics(x)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_of_a_set_with_itself_is_zero_with_fewer_samples_than_dims():
    # rank-4 covariance: sqrtm of a singular product is exact only up to rounding relative to its trace
    mu, sigma = fid.feature_statistics(np.random.default_rng(0).normal(size=(5, 64)))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_a_non_finite_square_root_is_retried_with_an_offset_diagonal(monkeypatch):
    calls, sqrtm = [], fid.linalg.sqrtm
    def flaky_sqrtm(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else sqrtm(m)
    monkeypatch.setattr(fid.linalg, 'sqrtm', flaky_sqrtm)
    assert abs(fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))) < 1e-5
    assert len(calls) == 2 and np.allclose(calls[1], (1 + 1e-6) ** 2 * np.eye(3))


def test_fid_between_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 8, 8))
    s1, s2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.normal(size=(2, 8))
    # Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), a symmetric form computed by eigendecomposition
    def psd_sqrt(m):
        w, v = np.linalg.eigh(m)
        return v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    r1 = psd_sqrt(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * psd_sqrt(r1 @ s2 @ r1))
    assert abs(fid.frechet_distance(mu1, s1, mu2, s2) - expected) < 1e-8 * expected
    # diagonal covariances: sum of (sqrt(a) - sqrt(b))^2
    d1, d2 = rng.uniform(0.5, 2, size=(2, 8))
    assert np.isclose(fid.frechet_distance(mu1, np.diag(d1), mu1, np.diag(d2)),
                      np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2))


def test_fid_fails_loudly_on_invalid_covariances():
    with pytest.raises(ValueError, match='imaginary part'):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match='statistics do not match'):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_inception_score_of_identical_uniform_predictions_is_one():
    mean, std = fid.inception_score(np.zeros((50, 1008)))
    assert abs(mean - 1) < 1e-12 and std < 1e-12


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    logits = 100 * np.eye(1008)[np.arange(100) % 5]  # each split holds two of each of 5 classes
    mean, _ = fid.inception_score(logits, splits=10)
    assert abs(mean - 5) < 1e-6


#### The CLI end to end ####

def test_cli_saves_statistics_and_scores_samples_against_them(tmp_path, weights_path, model, monkeypatch, capsys):
    # fid.main in this process with the fixture's network loaded once; the second run's features (from other
    # inputs, at another batch size) are the reference for the first run's saved statistics
    monkeypatch.setattr(fid, 'load_inception', lambda weights=None, device='cpu': model)
    outputs, inception_outputs, frechet_distance = [], fid.inception_outputs, fid.frechet_distance

    def record(*args, **kwargs):
        outputs.append(inception_outputs(*args, **kwargs))
        return outputs[-1]

    def leading_dims(mu1, sigma1, mu2, sigma2, k=64):     # the 2048-dim square root alone takes 10-25 s on a CPU;
        assert len(mu1) == len(mu2) == 2048                 # frechet_distance has its own tests above
        return frechet_distance(mu1[:k], sigma1[:k, :k], mu2[:k], sigma2[:k, :k])
    monkeypatch.setattr(fid, 'inception_outputs', record)
    monkeypatch.setattr(fid, 'frechet_distance', leading_dims)
    folder = write_images(tmp_path / 'ref', [(16, 16)] * 10)               # 10: the fewest the IS's splits take
    stats = tmp_path / 'ref_stats.npz'
    fid.main([str(folder), '--save-stats', str(stats), '--weights', str(weights_path), '--device', 'cpu',
              '--batch-size', '4'])

    # the same images as ADM-style samples (arr_0) against the cached statistics: FID ~0 and their IS
    samples = tmp_path / 'samples.npz'
    np.savez(samples, arr_0=fid.ImageFolder(str(folder))[:])
    capsys.readouterr()
    fid.main([str(samples), str(stats), '--device', 'cpu'])
    printed = dict(line.split(': ', 1) for line in capsys.readouterr().out.splitlines())
    feats, logits = outputs[-1]                                          # the samples' pool3 features and logits
    mu, sigma = fid.feature_statistics(feats)
    saved = np.load(stats)
    assert rel_err(saved['mu'], mu) < 1e-5 and rel_err(saved['sigma'], sigma) < 1e-5
    assert abs(float(printed['FID'])) < 1e-6 * np.trace(sigma)
    assert abs(float(printed['IS'].split(' ± ')[0]) - fid.inception_score(logits)[0]) < 1e-4


def test_statistics_in_an_adm_reference_batch_win_over_its_images(tmp_path):
    path = tmp_path / 'VIRTUAL_ref.npz'
    np.savez(path, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=np.ones(3), sigma=np.eye(3))
    kind, (mu, sigma) = fid.load_input(str(path), 'REF')
    assert kind == 'stats' and mu.tolist() == [1, 1, 1]


#### Bad input fails with a message a user can act on ####

def cli_error(*args):
    with pytest.raises(SystemExit) as e:
        fid.main([str(a) for a in args])
    return str(e.value)


def test_missing_weights_name_the_file_and_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv('FID_WEIGHTS', raising=False)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))  # no cached copy either
    monkeypatch.setattr(inception, 'WEIGHTS_URL', f'file://{tmp_path}/offline/{inception.WEIGHTS_NAME}')   # and no network
    folder = write_images(tmp_path / 'imgs', [(8, 8)] * 2)
    for args in [(folder, folder), (folder, folder, '--weights', tmp_path / 'nope.pth')]:
        msg = cli_error(*args)
        assert inception.WEIGHTS_NAME in msg and inception.WEIGHTS_URL in msg and 'random' in msg


def test_the_weights_are_downloaded_once_into_the_hub_cache_and_their_hash_checked(tmp_path, weights_path, monkeypatch,
                                                                                 capsys):
    monkeypatch.delenv('FID_WEIGHTS', raising=False)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    data = weights_path.read_bytes()
    server = tmp_path / 'server'
    server.mkdir()
    good = server / f'pt_inception-test-{hashlib.sha256(data).hexdigest()[:8]}.pth'  # torch.hub's name convention
    good.write_bytes(data)
    monkeypatch.setattr(inception, 'WEIGHTS_URL', f'file://{good}')
    cached = tmp_path / 'hub' / 'checkpoints' / good.name
    assert inception.find_weights() == str(cached) and cached.read_bytes() == data
    assert f'downloading the FID Inception weights from file://{good}' in capsys.readouterr().err
    good.unlink()                                                      # the second use reads the cache only
    assert inception.find_weights() == str(cached)
    assert inception.find_weights(str(weights_path)) == str(weights_path)   # --weights (and FID_WEIGHTS) win, offline

    bad = server / 'pt_inception-test-00000000.pth'                    # a hash the content does not have
    bad.write_bytes(data)
    monkeypatch.setattr(inception, 'WEIGHTS_URL', f'file://{bad}')
    with pytest.raises(ValueError, match=r"sha256 does not start with 00000000, so it was deleted"):
        inception.find_weights()
    assert sorted(os.listdir(tmp_path / 'hub' / 'checkpoints')) == [good.name]   # nothing of the bad download


def test_weights_with_wrong_keys_or_shapes_are_rejected(tmp_path):
    state = fixture_weights()
    state['fc.weight'] = torch.zeros(1000, 2048)
    state['AuxLogits.fc.weight'] = state.pop('Mixed_7c.branch_pool.conv.weight')
    path = tmp_path / 'bad.pth'
    torch.save(state, path)
    with pytest.raises(ValueError) as e:
        inception.load_inception(str(path))
    msg = str(e.value)
    for part in ['missing keys (1): Mixed_7c.branch_pool.conv.weight', 'unexpected keys (1): AuxLogits.fc.weight',
                 'wrong shapes (1): fc.weight (1000, 2048) (expected (1008, 2048))']:
        assert part in msg
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='not a PyTorch state dict'):
        inception.load_inception(str(tmp_path / 'junk.pth'))


def test_empty_folder(tmp_path, weights_path):
    (tmp_path / 'empty').mkdir()
    assert 'no images found' in cli_error(tmp_path / 'empty', '--save-stats', tmp_path / 's.npz')


def test_mixed_sizes_in_one_batch(tmp_path, weights_path):
    folder = write_images(tmp_path / 'mixed', [(8, 8), (8, 8), (12, 8)])
    msg = cli_error(folder, '--save-stats', tmp_path / 's.npz', '--weights', weights_path, '--device', 'cpu')
    assert 'images of mixed sizes in one batch' in msg and '002.png' in msg


def test_an_image_that_cannot_be_decoded_is_named(tmp_path, weights_path):
    folder = write_images(tmp_path / 'imgs', [(8, 8)] * 2)
    (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n cut short')
    msg = cli_error(folder, '--save-stats', tmp_path / 's.npz', '--weights', weights_path, '--device', 'cpu')
    assert msg.startswith(f"fid.py: error: SAMPLES: cannot decode {folder / 'broken.png'} (")
    assert '\n' not in msg and not (tmp_path / 's.npz').exists()


def test_fewer_than_two_samples(tmp_path, weights_path):
    folder = write_images(tmp_path / 'one', [(8, 8)])
    msg = cli_error(folder, '--save-stats', tmp_path / 's.npz', '--weights', weights_path, '--device', 'cpu')
    assert 'need at least 2 images' in msg


def test_bad_batch_size_and_device_are_named(tmp_path, monkeypatch):
    folder = write_images(tmp_path / 'imgs', [(8, 8)] * 2)
    assert cli_error(folder, folder, '--batch-size', 0).endswith('--batch-size 0: must be at least 1')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert cli_error(folder, folder, '--device', 'cuda').endswith(
        '--device cuda: CUDA is not available here; use --device cpu')
    assert cli_error(folder, folder, '--device', 'gpu').endswith('--device gpu: not a device (cuda, cuda:N or cpu)')


def test_save_stats_never_overwrites_a_file_unasked(tmp_path):
    folder = write_images(tmp_path / 'imgs', [(8, 8)] * 2)
    (tmp_path / 'stats.npz').write_bytes(b'earlier statistics')
    assert cli_error(folder, '--save-stats', tmp_path / 'stats.npz') == (
        f"fid.py: error: --save-stats {tmp_path / 'stats.npz'} exists: pass --overwrite to replace it, or choose "
        f"another file")                                                  # one line, before any image is read
    assert (tmp_path / 'stats.npz').read_bytes() == b'earlier statistics'
