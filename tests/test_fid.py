"""fid.py as a specification of ADM's evaluator and of dgm-eval's FDD: the network is pytorch-fid's
FID Inception-v3; the graph's preprocessing, the evaluator's FID and precision are what TensorFlow
computed (tests/fixtures/adm_evaluator_ops.npz), its radii and recall within the float16 steps
measured below; sFID reads the right features in the right order; FDD's input, DINOv2 features
and distance are what DINOv2's and dgm-eval's code computed (tests/fixtures/dinov2_fdd.npz); the
Fréchet distance and Inception Score obey their definitions. The command line is tested in
test_fid_cli.py, its memory in test_fid_memory.py."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
import fid
from tiny import fixture, tool

FIXTURE = np.load(fixture('fid_inception_io.npz'))     # pytorch-fid's network, fixed weights
ADM = np.load(fixture('adm_evaluator_ops.npz'))        # the evaluator's operations, in TensorFlow
DINO = np.load(fixture('dinov2_fdd.npz'))              # DINOv2's and dgm-eval's own code


def fixture_weights():
    """The fixture's weight rule for its keys and shapes (the k-th key of sorted(keys) drawn from a
    Generator seeded k), as tools/conformance/fid_inception_io.py draws it."""
    shapes = json.loads(str(FIXTURE['shapes']))
    return tool('conformance/fid_inception_io').rule_weights(
        {key: shapes[key] for key in map(str, FIXTURE['keys'])})


def fixture_model():
    """The FID Inception-v3 with the fixture's weights, in eval mode."""
    model = fid.FIDInceptionV3()
    model.load_state_dict(fixture_weights(), strict=False)    # the rule has no BatchNorm counters
    return model.eval().requires_grad_(False)


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.fixture(scope='module')
def outputs(one_thread):
    """The network on pytorch-fid's own input for the fixture's images (F.interpolate bilinear to
    299, then 2x - 1), capturing Mixed_6d.branch1x1's output: one forward pass for the tests
    below (on one thread: a second one spins on a busy shared CPU and is 4x slower, measured)."""
    model = fixture_model()
    captured = {}
    hook = model.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, inputs, out: captured.update(branch1x1=out))
    x = torch.from_numpy(FIXTURE['images'])                      # (3, 3, 64, 64) in [0, 1]
    x = 2 * F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1
    with torch.inference_mode():
        pool3, spatial = model(x)
    hook.remove()
    return dict(model=model, pool3=pool3, spatial=spatial, branch1x1=captured['branch1x1'])

#### The network is pytorch-fid's FID Inception-v3 ####

def test_state_dict_has_the_released_weight_files_keys_and_shapes():
    shapes = json.loads(str(FIXTURE['shapes']))
    ours = {k: list(v.shape) for k, v in fid.FIDInceptionV3().state_dict().items()
            if not k.endswith('num_batches_tracked')}
    assert ours == shapes and len(ours) == 472


def test_reproduces_pytorch_fids_pool3_and_logits_on_the_same_input(outputs):
    assert outputs['pool3'].shape == (len(FIXTURE['images']), 2048)
    assert rel_err(outputs['pool3'], FIXTURE['pool3']) < 1e-4                # measured 2e-6
    assert rel_err(outputs['model'].fc(outputs['pool3']), FIXTURE['logits']) < 1e-4


def test_the_inception_scores_logits_are_the_matmul_without_the_bias(outputs):
    # the evaluator imports softmax/logits/MatMul: pool3 @ W, before the graph adds softmax/biases
    model = outputs['model']
    logits = model.logits(outputs['pool3'])
    assert rel_err(logits, FIXTURE['logits'] - model.fc.bias.numpy()) < 1e-4

#### sFID reads mixed_6/conv: Mixed_6d.branch1x1, first 7 channels, channels-last ####

def test_spatial_features_are_mixed_6d_branch1x1s_first_7_channels_channels_last(outputs):
    spatial = outputs['spatial']
    branch = outputs['branch1x1']                                # (3, 192, 17, 17)
    assert spatial.shape == (len(FIXTURE['images']), 17 * 17 * 7) and 17 * 17 * 7 == 2023
    assert torch.equal(spatial, branch[:, :7].permute(0, 2, 3, 1).flatten(1))
    # channels-last: the first 7 values are pixel (0, 0)'s 7 channels, the next 7 pixel (0, 1)'s
    assert torch.equal(spatial[:, :7], branch[:, :7, 0, 0])
    assert torch.equal(spatial[:, 7:14], branch[:, :7, 0, 1])
    assert torch.equal(spatial[:, 17 * 7:17 * 7 + 7], branch[:, :7, 1, 0])
    assert (spatial >= 0).all()                                  # after the unit's ReLU

#### The graph's preprocessing, against TensorFlow's own ops ####

@pytest.mark.parametrize('name', ['img256', 'img32', 'img512', 'img299', 'img100x80'])
def test_preprocessing_is_tf1_resize_bilinear_then_x_minus_128_over_128(name):
    rows = torch.from_numpy(ADM['pre_rows_cols'])                # both borders and the middle
    x = fid.preprocess(torch.from_numpy(ADM[name]))              # (1, 3, 299, 299)
    assert x.shape == (1, 3, 299, 299) and x.dtype == torch.float32
    ours = x[:, :, rows][..., rows].permute(0, 2, 3, 1).numpy()  # (1, 60, 60, 3), as the fixture
    assert np.abs(ours - ADM[f'{name}_pre']).max() < 1e-5        # measured 0: bit-exact


def test_float_images_in_0_255_preprocess_like_uint8():
    u8 = torch.from_numpy(ADM['img100x80'])
    assert torch.equal(fid.preprocess(u8.float()), fid.preprocess(u8))


def test_preprocess_is_not_pytorch_fids_input():
    # pytorch-fid's F.interpolate (half-pixel centres) and x / 127.5 - 1 move the graph's input by
    # up to a quarter (0.2544 on the committed fixture's 256 px image, 0.2238 on another's;
    # preprocess's docstring: "up to 0.25")
    rows = torch.from_numpy(ADM['pre_rows_cols'])
    image = torch.from_numpy(ADM['img256'])
    theirs = F.interpolate(image.permute(0, 3, 1, 2).float(), size=(299, 299), mode='bilinear',
                           align_corners=False) / 127.5 - 1
    diff = (theirs - fid.preprocess(image))[:, :, rows][..., rows].abs()
    assert 0.1 < diff.max() < 0.3 and diff.mean() > 0.01


def float16_steps(a, b):
    """|a - b| in float16 steps at b's size (b > 0)."""
    return np.abs(a - b) / np.spacing(b.astype(np.float16)).astype(np.float64)


#### Precision, recall and FID as the evaluator computed them ####

def test_radii_are_float16_distances_to_the_3rd_neighbour_within_8_steps_of_tensorflow_cpus():
    # TensorFlow-CPU added the squares in float16 (Eigen's order), fid.py adds them in float32 and
    # rounds once (as TensorFlow on a GPU): on the committed fixture 189 of the 1,100 squared norms
    # differ by one float16 step and 334 radii with them, by up to 8 steps (0.5 of 126.25); most
    # radii are TensorFlow's own (766 of 1,100 there)
    equal = total = 0
    for feats, radii in [('pr_ref', 'pr_radii_ref'), ('pr_sample', 'pr_radii_sample')]:
        ours = fid.manifold_radii(torch.from_numpy(ADM[feats])).numpy()
        tf_cpu = ADM[radii][:, 0]
        assert (ours.astype(np.float16) == ours).all()           # float16 numbers, as TF's
        assert float16_steps(ours, tf_cpu).max() <= 8
        equal += (ours == tf_cpu).sum()
        total += len(ours)
    assert equal > total / 2


def test_without_float16_rounding_no_radius_is_tensorflows(monkeypatch):
    # why pairwise_distances rounds to float16: the evaluator's radii are float16 sums (149.25,
    # 118.25, ...), which exact distances never hit
    def exact(u, v):
        return (torch.cdist(u.double(), v.double()) ** 2).float()
    monkeypatch.setattr(fid, 'pairwise_distances', exact)
    radii = fid.manifold_radii(torch.from_numpy(ADM['pr_ref'])).numpy()
    assert (radii == ADM['pr_radii_ref'][:, 0]).sum() == 0


def test_precision_is_the_evaluators_and_recall_within_one_reference_in_any_block_size():
    # precision equal to TensorFlow-CPU's (113 / 500 on the committed fixture); recall at most one
    # reference away, from the radii that moved (above; one reference above it there)
    n = len(ADM['pr_ref'])
    for block in (fid.DISTANCE_BLOCK, 256):                      # 1 block; several blocks
        precision, recall = fid.precision_recall(ADM['pr_ref'], ADM['pr_sample'], block=block)
        assert precision == ADM['precision']
        assert abs(round(n * (recall - ADM['recall']))) <= 1


def test_a_point_on_the_boundary_of_a_ball_is_inside_it():
    # the evaluator's d <= radius: references at 0, 1, 2, 3 (reference 0's ball reaches its 3rd
    # neighbour: radius 3^2 = 9) and four samples at -3, at squared distance 9 from reference 0
    # and outside the other balls; the samples' own balls have radius 0 (four copies)
    ref = np.array([[0.0], [1.0], [2.0], [3.0]])
    samples = np.full((4, 1), -3.0)
    assert fid.precision_recall(ref, samples) == (1.0, 0.0)
    assert fid.precision_recall(samples, ref) == (0.0, 1.0)


def test_a_block_that_overflows_float16_is_computed_in_float32():
    u = torch.tensor([[300.0, 0.0], [0.0, 1.0]])                 # |u0|^2 = 90,000 > 65,504
    assert fid.pairwise_distances(u, u).tolist() == [[0.0, 90001.0], [90001.0, 0.0]]


def test_fewer_than_k_plus_1_points_have_no_k_th_neighbour():
    with pytest.raises(ValueError, match='at least 4 feature vectors per set'):
        fid.precision_recall(np.zeros((3, 8)), np.zeros((10, 8)))


def test_fid_is_the_evaluators_on_the_same_features():
    # samples first, as the evaluator's sample_stats.frechet_distance(ref_stats)
    mu1, sigma1 = fid.feature_statistics(ADM['pr_sample'])
    mu2, sigma2 = fid.feature_statistics(ADM['pr_ref'])
    assert mu1.dtype == np.float32 and sigma1.dtype == np.float64     # its np.mean and np.cov
    fd = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert abs(fd - ADM['fid']) < 1e-6                           # measured 1.8e-7 of 16.2

#### FDD: dgm-eval's transform, DINOv2's features, the distance ####

def dino_model():
    """DINOv2 at the fixture's width and depth, its state dict loaded strictly as the released
    file's is."""
    size = {k: int(DINO[f'config_{k}']) for k in ('embed_dim', 'depth', 'num_heads', 'patch_size',
                                                   'img_size')}
    model = fid.DINOv2(size['embed_dim'], size['depth'], size['num_heads'], size['patch_size'],
                       size['img_size'])
    model.load_state_dict({k[3:]: torch.from_numpy(DINO[k]) for k in DINO.files
                           if k.startswith('sd/')})
    return model.eval()


def test_fdd_input_is_dgm_evals_transform():
    # PIL's bicubic to 224 x 224, [0, 1], ImageNet mean and std: to float rounding
    pixels = fid.dinov2_input(DINO['imgs_a'][:4]).numpy()
    assert pixels.shape == (4, 3, 224, 224)
    assert np.abs(pixels - DINO['pixels_a']).max() < 1e-6                # measured 0


def test_dinov2_features_and_fdd_are_dinov2s_and_dgm_evals(one_thread):
    model = dino_model()
    a, b, odd = (fid.extract([images], model, batch_size=100)[0]
                 for images in (DINO['imgs_a'], DINO['imgs_b'], DINO['odd_img'][None]))
    assert rel_err(a, DINO['feats_a']) < 1e-5 and rel_err(b, DINO['feats_b']) < 1e-5   # 3e-7
    assert rel_err(odd, DINO['odd_feat']) < 1e-5                         # a 200 x 300 image
    fd = fid.frechet_distance(*fid.feature_statistics(a.astype(np.float64)),
                              *fid.feature_statistics(b.astype(np.float64)))
    assert abs(fd / DINO['fd'] - 1) < 1e-5                               # measured 4e-9

#### Fréchet distance and Inception Score follow their definitions ####

def test_fid_of_a_set_with_itself_is_zero_and_with_its_shifted_copy_the_shift_squared():
    x = np.random.default_rng(0).normal(size=(200, 16))
    mu, sigma = fid.feature_statistics(x)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    shift = np.linspace(-1, 1, 16)                               # the same covariance: |shift|^2
    assert abs(fid.frechet_distance(mu + shift, sigma, mu, sigma) - shift @ shift) < 1e-6


def test_fid_of_a_set_with_itself_is_zero_with_fewer_samples_than_dims():
    # rank-4 covariance: the square root of a singular product is exact only to rounding of its
    # trace
    mu, sigma = fid.feature_statistics(np.random.default_rng(0).normal(size=(5, 64)))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_a_non_finite_square_root_is_retried_with_an_offset_diagonal(monkeypatch):
    """pytorch-fid's (and the evaluator's) retry: sqrt((S1 + eps I)(S2 + eps I)), the offset on
    each covariance, not on their product."""
    calls = []
    sqrtm = fid.linalg.sqrtm

    def flaky_sqrtm(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else sqrtm(m)
    monkeypatch.setattr(fid.linalg, 'sqrtm', flaky_sqrtm)
    s1, s2, eps = np.diag([1.0, 2.0, 3.0]), np.diag([4.0, 1.0, 0.5]), 0.25
    distance = fid.frechet_distance(np.zeros(3), s1, np.zeros(3), s2, eps=eps)
    offset = (s1 + eps * np.eye(3)) @ (s2 + eps * np.eye(3))
    assert len(calls) == 2 and np.array_equal(calls[1], offset)
    assert distance == pytest.approx(np.trace(s1 + s2) - 2 * np.sqrt(np.diag(offset)).sum())


def test_fid_between_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 8, 8))
    s1 = a @ a.T + 0.1 * np.eye(8)
    s2 = b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.normal(size=(2, 8))

    def psd_sqrt(m):
        w, v = np.linalg.eigh(m)
        return v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    # Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), a symmetric form
    r1 = psd_sqrt(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * psd_sqrt(r1 @ s2 @ r1))
    assert abs(fid.frechet_distance(mu1, s1, mu2, s2) - expected) < 1e-8 * expected
    # diagonal covariances: the sum of (sqrt(a) - sqrt(b))^2
    d1, d2 = rng.uniform(0.5, 2, size=(2, 8))
    assert np.isclose(fid.frechet_distance(mu1, np.diag(d1), mu1, np.diag(d2)),
                      np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2))


def test_fid_fails_loudly_on_invalid_covariances():
    with pytest.raises(ValueError, match='imaginary part'):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match='statistics that do not fit each other'):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_inception_score_of_identical_uniform_predictions_is_one():
    assert abs(fid.inception_score(np.zeros((50, 1008))) - 1) < 1e-12


def test_inception_score_of_confident_balanced_predictions_is_the_class_count():
    logits = 100 * np.eye(1008)[np.arange(100) % 5]              # 20 of each of 5 classes
    assert abs(fid.inception_score(logits) - 5) < 1e-6


def test_inception_score_averages_runs_of_split_size_consecutive_samples():
    # ADM's splits hold 5,000 samples (50,000 give 10), the last one fewer. In runs of 3 here:
    # classes (0, 1, 2) score 3, (0, 0, 0) score 1, the last sample alone 1; their mean is 5/3
    logits = 100 * np.eye(1008)[[0, 1, 2, 0, 0, 0, 7]]
    assert abs(fid.inception_score(logits, split_size=3) - 5 / 3) < 1e-6
    assert fid.IS_SPLIT == 5000
