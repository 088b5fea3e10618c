"""fid.py's command line end to end on a tiny set with the fixture's Inception weights (from
test_fid.py), and every bad input: one line `fid.py: error: ...`, a non-zero exit, nothing
written."""
import hashlib
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import fid
from test_fid import fixture_model


@pytest.fixture(scope='module')
def model(one_thread):
    """The fixture's network, run on one thread (conftest.py: a second one spins on a busy CPU)."""
    return fixture_model()


@pytest.fixture
def network(model, monkeypatch):
    """fid.main loads the fixture's network, built once, instead of the released weights."""
    monkeypatch.setattr(fid, 'load_inception', lambda weights=None, device='cpu': model)


@pytest.fixture
def cli(network, monkeypatch):
    """fid.main in this process with the fixture's network; returns the features of each
    inception_outputs call. The network (0.5-1 s an image here) runs once per image set: a later
    call on the same images reuses its features, since the CLI's logic is tested here and the
    network in test_fid.py. The 2048-dim square root alone takes 10-60 s, so distances use the
    first 64 dimensions (frechet_distance has its own tests)."""
    outputs = []
    computed = {}
    inception_outputs = fid.inception_outputs
    frechet_distance = fid.frechet_distance

    def once_per_image_set(images, *args, **kwargs):
        key = pixels(images).tobytes()
        if key not in computed:
            computed[key] = inception_outputs(images, *args, **kwargs)
        outputs.append(computed[key])
        return outputs[-1]

    def leading_dims(mu1, sigma1, mu2, sigma2, k=64):
        return frechet_distance(mu1[:k], sigma1[:k, :k], mu2[:k], sigma2[:k, :k])
    monkeypatch.setattr(fid, 'inception_outputs', once_per_image_set)
    monkeypatch.setattr(fid, 'frechet_distance', leading_dims)
    return outputs


def pixels(images):
    """All the images of an ImageFiles or NpzImages, uint8 (N, H, W, 3)."""
    return np.concatenate(list(images.batches(len(images))))


def report_lines(text):
    """The report's 'key: value' lines as a dict."""
    return dict(line.split(': ', 1) for line in text.splitlines())


def write_images(folder, sizes, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f'{i:03d}.png')
    return folder

#### End to end ####

@pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')   # 4 images: singular covariances
def test_save_stats_then_score_against_an_adm_reference_batch(tmp_path, model, cli, capsys):
    folder = write_images(tmp_path / 'samples', [(24, 20)] * 4)  # k + 1: the fewest PR takes
    stats = tmp_path / 'samples_stats.npz'
    fid.main([str(folder), '--save-stats', str(stats), '--batch-size', '3'])
    assert report_lines(capsys.readouterr().out) == {'SAMPLES': 'computed from its 4 images'}
    pool3, spatial = cli[-1]
    saved = np.load(stats)
    assert sorted(saved.keys()) == ['mu', 'mu_s', 'pool3', 'sigma', 'sigma_s']
    for key, value in [('pool3', pool3), ('mu', pool3.mean(0)), ('mu_s', spatial.mean(0)),
                       ('sigma', np.cov(pool3, rowvar=False)),
                       ('sigma_s', np.cov(spatial, rowvar=False))]:
        assert np.array_equal(saved[key], value)

    # An ADM reference batch of the same images whose precomputed means are moved. The evaluator
    # reads a file's own statistics, so FID = |1 e0|^2 and sFID = |0.5 e0|^2 (equal covariances);
    # precision and recall come from its images, the samples' own: each point lies in its own ball.
    e0 = np.eye(2048, dtype=np.float32)[0]
    adm = tmp_path / 'VIRTUAL_tiny.npz'
    np.savez(adm, arr_0=pixels(fid.ImageFiles(str(folder))), mu=saved['mu'] + e0,
             sigma=saved['sigma'], mu_s=saved['mu_s'] + 0.5 * e0[:2023], sigma_s=saved['sigma_s'])
    fid.main([str(stats), str(adm), '--json'])
    report = json.loads(capsys.readouterr().out)
    assert report['SAMPLES'] == 'precomputed in samples_stats.npz (mu, sigma, mu_s, sigma_s, pool3)'
    assert report['REF'] == ('mu, sigma, mu_s, sigma_s precomputed in VIRTUAL_tiny.npz; pool3 '
                             'computed from its 4 images')
    assert cli[-1][0] is pool3                                   # its 4 images were read
    # rank-3 covariances: the square root of their singular product leaves up to 4e-7 (measured)
    assert abs(report['FID'] - 1) < 1e-6 and abs(report['sFID'] - 0.25) < 1e-6
    assert report['Precision'] == report['Recall'] == 1.0
    assert abs(report['IS'] - fid.inception_score(model.logits(torch.from_numpy(pool3)))) < 1e-9

    # FID alone reads no image and needs only mu and sigma
    calls = len(cli)
    fid.main([str(stats), str(adm), '--fid-only'])
    printed = report_lines(capsys.readouterr().out)
    assert list(printed) == ['SAMPLES', 'REF', 'FID'] and len(cli) == calls
    assert printed['REF'] == 'precomputed in VIRTUAL_tiny.npz (mu, sigma)'
    assert abs(float(printed['FID']) - 1) < 1e-4                 # printed to 4 decimals


def test_statistics_files_serve_the_full_report_on_both_sides(tmp_path, model, cli, capsys):
    # no image is read: the pool3 features give the Inception Score (through the model's logits)
    # and the balls
    rng = np.random.default_rng(0)
    pool3 = rng.random((5, 2048), dtype=np.float32)
    spatial = rng.random((5, 2023), dtype=np.float32)
    stats = tmp_path / 'stats.npz'
    np.savez(stats, mu=pool3.mean(0), sigma=np.cov(pool3, rowvar=False), mu_s=spatial.mean(0),
             sigma_s=np.cov(spatial, rowvar=False), pool3=pool3)
    fid.main([str(stats), str(stats)])
    printed = report_lines(capsys.readouterr().out)
    assert list(printed) == ['SAMPLES', 'REF', 'FID', 'sFID', 'IS', 'Precision', 'Recall']
    assert not cli
    assert printed['Precision'] == printed['Recall'] == '1.0000'
    assert printed['IS'] == f"{fid.inception_score(model.logits(torch.from_numpy(pool3))):.4f}"

#### Bad input: one line, a non-zero exit, nothing written ####

def cli_error(*args):
    """The one line fid.main exits with (a string exit code: status 1, the line on stderr)."""
    with pytest.raises(SystemExit) as e:
        fid.main([str(a) for a in args])
    assert isinstance(e.value.code, str) and '\n' not in e.value.code
    return e.value.code


def statistics_file(path, **keys):
    """An .npz of 8-dim statistics (mu, sigma) and the given keys."""
    np.savez(path, mu=np.zeros(8), sigma=np.eye(8), **keys)
    return path


def test_fewer_images_than_k_plus_1_have_no_precision_and_recall(tmp_path):
    samples = tmp_path / 'three.npz'
    np.savez(samples, arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    ref = statistics_file(tmp_path / 'ref.npz', mu_s=np.zeros(8), sigma_s=np.eye(8),
                          pool3=np.zeros((9, 8)))
    assert cli_error(samples, ref, '--save-stats', tmp_path / 'out.npz') == (
        f"fid.py: error: SAMPLES {samples}: precision and recall need at least 4 images (each "
        f"one's ball reaches its 3rd nearest neighbour), got 3")
    assert not (tmp_path / 'out.npz').exists()


def test_a_reference_without_spatial_statistics_or_images_has_no_sfid(tmp_path, monkeypatch,
                                                                       capsys):
    samples = statistics_file(tmp_path / 'samples.npz', mu_s=np.zeros(8), sigma_s=np.eye(8),
                              pool3=np.zeros((4, 8), np.float32))
    ref = statistics_file(tmp_path / 'old_ref.npz')              # mu and sigma only
    assert cli_error(samples, ref) == (
        f"fid.py: error: REF {ref} holds no images and no mu_s/sigma_s for sFID (the spatial "
        f"statistics that ADM's reference batches and --save-stats files carry); give its images, "
        f"or pass --fid-only")

    def no_network(*args, **kwargs):
        raise AssertionError("FID of two statistics files needs no Inception weights")
    monkeypatch.setattr(fid, 'load_inception', no_network)
    fid.main([str(samples), str(ref), '--fid-only'])
    assert report_lines(capsys.readouterr().out)['FID'] == '0.0000'


def test_statistics_without_pool3_features_have_no_is_precision_or_recall(tmp_path):
    stats = statistics_file(tmp_path / 'stats.npz', mu_s=np.zeros(8), sigma_s=np.eye(8))
    assert cli_error(stats, stats).endswith(
        "holds no images: the Inception Score, precision and recall need its images or their "
        "pool3 features (as --save-stats saves them); or pass --fid-only")
    assert cli_error(stats, '--save-stats', tmp_path / 'out.npz') == (
        f"fid.py: error: --save-stats: SAMPLES {stats} holds no images to compute statistics from")


def test_inputs_that_are_neither_images_nor_statistics(tmp_path):
    (tmp_path / 'x.txt').write_text('x')
    np.savez(tmp_path / 'other.npz', latents=np.zeros(3))
    np.savez(tmp_path / 'float.npz', arr_0=np.zeros((4, 8, 8, 3), np.float32))
    missing = tmp_path / 'nope.npz'
    assert cli_error(missing, missing).endswith(f"SAMPLES {missing}: no such file or folder")
    text = tmp_path / 'x.txt'
    assert 'expected a folder of images or an .npz' in cli_error(text, text)
    (tmp_path / 'cut.npz').write_bytes(b'PK\x03\x04 cut short')
    assert 'cut.npz: not a readable .npz (' in cli_error(tmp_path / 'cut.npz', text)
    assert cli_error(tmp_path / 'other.npz', '--fid-only', tmp_path / 'other.npz').endswith(
        "found keys ['latents']; expected arr_0 (images), or mu and sigma (statistics)")
    assert cli_error(tmp_path / 'float.npz', tmp_path / 'float.npz').endswith(
        "arr_0 must be uint8 (N, H, W, 3), got float32 (4, 8, 8, 3)")


def test_an_arr_0_shorter_than_its_header_says(tmp_path, network):
    # the header, read at open, promises 5 images; the data holds 3
    path = tmp_path / 'cut.npz'
    with zipfile.ZipFile(path, 'w') as archive, archive.open('arr_0.npy', 'w') as f:
        np.lib.format.write_array_header_1_0(f, {'descr': '|u1', 'fortran_order': False,
                                                 'shape': (5, 8, 8, 3)})
        f.write(np.zeros((3, 8, 8, 3), np.uint8).tobytes())
    assert cli_error(path, '--save-stats', tmp_path / 's.npz') == (
        f"fid.py: error: SAMPLES {path}: arr_0 holds fewer than the 5 images its header promises")
    assert not (tmp_path / 's.npz').exists()


def test_empty_folder(tmp_path):
    (tmp_path / 'empty').mkdir()
    assert 'no images found' in cli_error(tmp_path / 'empty', '--save-stats', tmp_path / 's.npz')


def test_mixed_sizes_in_one_batch(tmp_path, network):
    folder = write_images(tmp_path / 'mixed', [(8, 8), (8, 8), (12, 8), (8, 8)])
    msg = cli_error(folder, '--save-stats', tmp_path / 's.npz')
    assert 'images of mixed sizes in one batch' in msg and '002.png' in msg


def test_an_image_that_cannot_be_decoded_is_named(tmp_path, network):
    folder = write_images(tmp_path / 'imgs', [(8, 8)] * 4)
    (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n cut short')
    msg = cli_error(folder, '--save-stats', tmp_path / 's.npz')
    assert msg.startswith(f"fid.py: error: SAMPLES: cannot decode {folder / 'broken.png'} (")
    assert not (tmp_path / 's.npz').exists()


def test_fewer_than_two_images_have_no_covariance(tmp_path):
    folder = write_images(tmp_path / 'one', [(8, 8)])
    ref = statistics_file(tmp_path / 'ref.npz')
    assert cli_error(folder, ref, '--fid-only') == (
        f"fid.py: error: SAMPLES {folder}: need at least 2 images to estimate a covariance, got 1")


def test_bad_batch_size_and_device_are_named(tmp_path, monkeypatch):
    folder = write_images(tmp_path / 'imgs', [(8, 8)] * 2)
    assert cli_error(folder, folder, '--batch-size', 0).endswith(
        '--batch-size 0: must be at least 1')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert cli_error(folder, folder, '--device', 'cuda').endswith(
        '--device cuda: CUDA is not available here; use --device cpu')
    assert cli_error(folder, folder, '--device', 'gpu').endswith(
        '--device gpu: not a device (cuda, cuda:N or cpu)')


def test_save_stats_never_overwrites_a_file_unasked(tmp_path):
    folder = write_images(tmp_path / 'imgs', [(8, 8)] * 2)
    earlier = tmp_path / 'stats.npz'
    earlier.write_bytes(b'earlier statistics')
    assert cli_error(folder, '--save-stats', earlier) == (
        f"fid.py: error: --save-stats {earlier} exists: pass --overwrite to replace it, or choose "
        f"another file")                                         # before any image is read
    assert earlier.read_bytes() == b'earlier statistics'

#### The Inception weights: fetched once through torch.hub, checked, loaded strictly ####

def test_missing_weights_name_the_file_and_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv('FID_WEIGHTS', raising=False)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))   # no cached copy either
    offline = f'file://{tmp_path}/offline/{fid.WEIGHTS_NAME}'          # and no network
    monkeypatch.setattr(fid, 'WEIGHTS_URL', offline)
    folder = write_images(tmp_path / 'imgs', [(8, 8)] * 4)
    for args in [(folder, folder), (folder, folder, '--weights', tmp_path / 'nope.pth')]:
        msg = cli_error(*args)
        assert fid.WEIGHTS_NAME in msg and fid.WEIGHTS_URL in msg and 'random' in msg
        assert 'pass --weights PATH or set FID_WEIGHTS=PATH' in msg
    assert 'URLError' in cli_error(folder, folder)               # torch.hub's reason, named


class StandIn(torch.nn.Module):
    """One BatchNorm in FIDInceptionV3's place (its file, like the released one, without the
    counter): where the weights come from is tested here, not what they hold."""
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(1)


def test_the_weights_are_downloaded_once_into_the_hub_cache_and_hash_checked(tmp_path,
                                                                               monkeypatch,
                                                                               capsys):
    monkeypatch.delenv('FID_WEIGHTS', raising=False)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    monkeypatch.setattr(fid, 'FIDInceptionV3', StandIn)
    state = {'bn.weight': torch.tensor([2.0]), 'bn.bias': torch.tensor([3.0]),
             'bn.running_mean': torch.tensor([4.0]), 'bn.running_var': torch.tensor([5.0])}
    server = tmp_path / 'server'
    server.mkdir()
    torch.save(state, server / 'weights.pth')
    data = (server / 'weights.pth').read_bytes()
    digits = hashlib.sha256(data).hexdigest()[:8]
    good = server / f'pt_inception-test-{digits}.pth'            # torch.hub's name convention
    (server / 'weights.pth').rename(good)
    monkeypatch.setattr(fid, 'WEIGHTS_URL', f'file://{good}')
    cached = tmp_path / 'hub' / 'checkpoints' / good.name
    assert fid.load_inception().bn.bias.item() == 3.0 and cached.read_bytes() == data
    out, err = capsys.readouterr()
    assert out == '' and str(cached) in err      # torch.hub's note on stderr: stdout is the report
    good.unlink()                                                # the second use reads the cache
    assert fid.load_inception().bn.running_var.item() == 5.0
    assert capsys.readouterr().err == ''

    bad = server / 'pt_inception-test-00000000.pth'              # a hash its content has not
    bad.write_bytes(data)
    monkeypatch.setattr(fid, 'WEIGHTS_URL', f'file://{bad}')
    with pytest.raises(FileNotFoundError) as e:
        fid.load_inception()
    msg = str(e.value)
    assert '\n' not in msg and 'invalid hash value (expected "00000000", got "' in msg
    assert fid.WEIGHTS_NAME in msg and f'file://{bad}' in msg and 'FID_WEIGHTS=PATH' in msg
    assert os.listdir(tmp_path / 'hub' / 'checkpoints') == [good.name]   # nothing of the bad one
    monkeypatch.setenv('FID_WEIGHTS', str(cached))               # offline: the given file, no hub
    assert fid.load_inception().bn.weight.item() == 2.0


def test_weights_with_wrong_keys_or_shapes_are_rejected(tmp_path, model):
    # load_state_dict's own report, on one line
    state = {k: v for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    state['fc.weight'] = torch.zeros(1000, 2048)
    state['AuxLogits.fc.weight'] = state.pop('Mixed_7c.branch_pool.conv.weight')
    path = tmp_path / 'bad.pth'
    torch.save(state, path)
    folder = write_images(tmp_path / 'imgs', [(8, 8)] * 2)
    msg = cli_error(folder, '--save-stats', tmp_path / 's.npz', '--weights', path)
    assert msg.startswith(f"fid.py: error: Inception weights {path} do not fit the FID "
                          f"Inception-v3 (Error(s) in loading state_dict for FIDInceptionV3: ")
    for part in ['Missing key(s) in state_dict: "Mixed_7c.branch_pool.conv.weight"',
                 'Unexpected key(s) in state_dict: "AuxLogits.fc.weight"',
                 'size mismatch for fc.weight: copying a param with shape torch.Size([1000, 2048]) '
                 'from checkpoint, the shape in current model is torch.Size([1008, 2048])']:
        assert part in msg
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    assert 'not a PyTorch state dict' in cli_error(folder, '--save-stats', tmp_path / 's.npz',
                                                   '--weights', tmp_path / 'junk.pth')
    assert not (tmp_path / 's.npz').exists()


def test_weights_load_with_or_without_num_batches_tracked(model, tmp_path):
    state = model.state_dict()                                   # with BatchNorm's counters
    without = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}
    torch.save(state, tmp_path / 'with.pth')
    torch.save(without, tmp_path / 'without.pth')                # as the released file
    for name in ('with.pth', 'without.pth'):
        loaded = fid.load_inception(str(tmp_path / name))
        assert torch.equal(loaded.fc.weight, model.fc.weight)
