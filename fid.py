"""
FID and Inception Score with the standard FID Inception-v3, in plain PyTorch (no torchvision).

    python fid.py SAMPLES REF                      # FID (and IS of SAMPLES) against a reference
    python fid.py REF_IMAGES --save-stats ref.npz  # cache a reference's statistics once
    python fid.py samples.npz ref.npz --weights pt_inception-2015-12-05-6726825d.pth

    model = load_inception('pt_inception-2015-12-05-6726825d.pth')     # or FID_WEIGHTS=... and no argument
    mu, sigma = compute_statistics(images_uint8_nhwc, model)            # pool3 statistics, float64
    score = frechet_distance(mu, sigma, *ref_stats); feats, logits = inception_outputs(images, model)

SAMPLES and REF are each a folder of images, an ADM-style .npz (arr_0: uint8 N×H×W×3) or a statistics
.npz (mu, sigma). ADM's reference batches (e.g. VIRTUAL_imagenet256_labeled.npz) hold both; their mu/sigma win.

The network is the Inception-v3 of the original TensorFlow FID graph (inception-2015-12-05) as ported by
pytorch-fid, with the key names of its weight file, so that file loads as is. It differs from torchvision's
Inception-v3 in three places: average pools do not count padding, the last block (Mixed_7c) max-pools in its
pool branch, and the classifier has 1008 outputs (the 2015 TF graph's layout: the 1000 ImageNet classes
plus extra, unused ones).

References:
- Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"
  (NeurIPS 2017, arXiv 1706.08500): FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) on pool3 features.
- Salimans et al., "Improved Techniques for Training GANs" (NeurIPS 2016, arXiv 1606.03498):
  IS = exp(E_x KL(p(y|x) || p(y))), averaged over 10 splits.
- Szegedy et al., "Rethinking the Inception Architecture for Computer Vision" (CVPR 2016, arXiv 1512.00567).
- pytorch-fid (github.com/mseitzer/pytorch-fid): the weight file and the FID-specific blocks.
"""
import argparse
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + WEIGHTS_NAME
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')

#################################################################################
#                        Inception-v3 (FID variant)                             #
#################################################################################

class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as in the TF graph) -> ReLU."""
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def chain(x, *layers):
    """x through layers in order (a branch of an Inception block)."""
    for layer in layers:
        x = layer(x)
    return x


def avg_pool(x):
    # The TF graph averages only over real pixels at the border; torchvision's default counts the padding.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b-d (35×35): 1x1, 5x5, double 3x3 and pool branches."""
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          chain(x, self.branch5x5_1, self.branch5x5_2),
                          chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35×35 -> 17×17."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b-e (17×17): 7x7 convolutions factorised into 1x7 and 7x1."""
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                          chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                                self.branch7x7dbl_4, self.branch7x7dbl_5),
                          self.branch_pool(avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17×17 -> 8×8."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        return torch.cat([chain(x, self.branch3x3_1, self.branch3x3_2),
                          chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                                self.branch7x7x3_4),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b/7c (8×8): 3x3 convolutions split into parallel 1x3 and 3x1; 7c max-pools (FID graph)."""
    def __init__(self, cin, max_pool=False):
        super().__init__()
        self.max_pool = max_pool  # the TF graph's Mixed_7c max-pools where Mixed_7b averages
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
                          self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """Images in [0, 1] -> (pool3 features (N, 2048), logits (N, 1008))."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        x = 2 * x - 1                                                       # (N, 3, 299, 299) in [-1, 1]
        x = chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                                    # (N, 64, 73, 73)
        x = chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)                # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                                    # (N, 192, 35, 35)
        x = chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d)           # (N, 288, 35, 35)
        x = chain(x, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e)  # (N, 768, 17, 17)
        x = chain(x, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)           # (N, 2048, 8, 8)
        pool3 = x.mean(dim=(2, 3))                                          # (N, 2048)
        return pool3, self.fc(pool3)                                        # (N, 2048), (N, 1008)


def find_weights(weights=None):
    """The weight file's path: the argument, else $FID_WEIGHTS (both for offline use), else WEIGHTS_URL's file in
    torch's hub cache, where the first use downloads it with a progress bar (as pytorch-fid, clean-fid and
    torch-fidelity do); its sha256 must start with the hex digits in its name (torch.hub's convention:
    ...-6726825d.pth)."""
    hint = (f"FID needs the Inception weights {WEIGHTS_NAME} (the FID Inception-v3 used by pytorch-fid; random "
            f"weights are never used). Download it from {WEIGHTS_URL} and pass --weights PATH or set FID_WEIGHTS=PATH.")
    path = weights or os.environ.get('FID_WEIGHTS')
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception weights {path}: no such file. {hint}")
        return path
    name = os.path.basename(WEIGHTS_URL)
    cached = os.path.join(torch.hub.get_dir(), 'checkpoints', name)
    if os.path.isfile(cached):
        return cached
    digits = re.search(r'-([0-9a-f]{8,})\.', name)
    prefix = digits and digits.group(1)
    print(f"downloading the FID Inception weights from {WEIGHTS_URL} to {cached}", file=sys.stderr)
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    try:                           # torch.hub writes a temporary file and moves it into place only once verified
        torch.hub.download_url_to_file(WEIGHTS_URL, cached, hash_prefix=prefix, progress=True)
    except OSError as e:                                                # no network, HTTP errors
        raise FileNotFoundError(f"no Inception weights given, none at {cached}, and the download failed ({e}). "
                                f"{hint}") from None
    except RuntimeError:                                                # the hash does not match: nothing was kept
        raise ValueError(f"{WEIGHTS_URL}: the downloaded file's sha256 does not start with {prefix}, so it was "
                         f"deleted; try again, or: {hint}") from None
    print(f"sha256 starts with {prefix} as expected; saved {cached}", file=sys.stderr)
    return cached


def load_inception(weights=None, device='cpu'):
    """The FID Inception-v3 in eval mode with the weights of pt_inception-2015-12-05-6726825d.pth."""
    path = find_weights(weights)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled objects beyond tensors
        raise ValueError(f"Inception weights {path}: not a PyTorch state dict of tensors ({type(e).__name__}); "
                         f"expected {WEIGHTS_NAME} from {WEIGHTS_URL}") from e
    if not isinstance(state, dict):
        raise ValueError(f"Inception weights {path}: expected a state dict, got {type(state).__name__}")
    model = FIDInceptionV3()
    # BatchNorm's num_batches_tracked counters are unused in eval mode; the released file has none.
    state = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}
    want = {k: v.shape for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    missing = sorted(want.keys() - state.keys())
    unexpected = sorted(state.keys() - want.keys())
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(want[k])})"
             for k in sorted(want.keys() & state.keys()) if state[k].shape != want[k]]
    if missing or unexpected or wrong:
        problems = [f"{name} ({len(ks)}): {', '.join(ks[:5])}{', ...' if len(ks) > 5 else ''}"
                    for name, ks in (('missing keys', missing), ('unexpected keys', unexpected),
                                     ('wrong shapes', wrong)) if ks]
        raise ValueError(f"Inception weights {path} do not match the FID Inception-v3 ({WEIGHTS_NAME}): "
                         + '; '.join(problems))
    model.load_state_dict(state, strict=False)  # strict=False only for num_batches_tracked, checked above
    return model.eval().requires_grad_(False).to(device)

#################################################################################
#                        Images -> features and statistics                      #
#################################################################################

def stack_images(images, names):
    """Stack same-sized (H, W, 3) images, or say which two differ."""
    for name, im in zip(names, images):
        if im.shape != images[0].shape:
            raise ValueError(f"images of mixed sizes in one batch: {names[0]} is {images[0].shape} but "
                             f"{name} is {im.shape}; resize them to one size first")
    return np.stack(images)


class ImageFolder:
    """A folder's images in sorted order, read lazily: folder[i:j] is a uint8 (j-i, H, W, 3) array."""
    def __init__(self, path):
        self.files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
        if not self.files:
            raise ValueError(f"{path}: no images found (looked for {'/'.join(IMAGE_EXTS)})")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        files = self.files[index]
        return stack_images([np.asarray(Image.open(f).convert('RGB')) for f in files], files)


def to_float_images(x):
    """A batch of images, uint8 or float in [0, 1], (N, H, W, 3) or (N, 3, H, W) -> float (N, 3, H, W)."""
    if isinstance(x, (list, tuple)):
        x = stack_images([np.asarray(im) for im in x], [f"image {i}" for i in range(len(x))])
    x = torch.as_tensor(x)
    if x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise ValueError(f"expected a batch of RGB images (N, H, W, 3) or (N, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)
    if x.dtype == torch.uint8:
        return x.float() / 255
    x = x.float()
    if x.min() < -1e-3 or x.max() > 1 + 1e-3:
        raise ValueError(f"float images must lie in [0, 1] (got [{x.min():.3f}, {x.max():.3f}]); "
                         "map samples in [-1, 1] with (x + 1) / 2, or pass uint8")
    return x


@torch.inference_mode()
def inception_outputs(images, model, batch_size=50, device=None, progress=False):
    """pool3 features (N, 2048) and logits (N, 1008), float64 numpy, of images.

    images: a sequence sliced into batches (uint8/float array or tensor, ImageFolder, list of (H, W, 3) arrays),
    or any other iterable yielding batches (e.g. a sampler's generator)."""
    device = device or next(model.parameters()).device
    if hasattr(images, '__len__') and hasattr(images, '__getitem__'):
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
        total = math.ceil(len(images) / batch_size)
    else:
        batches, total = images, None
    feats, logits = [], []
    for batch in tqdm(batches, total=total, disable=not progress, unit='batch', desc='inception'):
        f, l = model(to_float_images(batch).to(device))
        feats.append(f.double().cpu())
        logits.append(l.double().cpu())
    if not feats:
        raise ValueError("no images given")
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def feature_statistics(feats):
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    if len(feats) < 2:
        raise ValueError(f"need at least 2 images to estimate a covariance, got {len(feats)}")
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def compute_statistics(images, model, batch_size=50, device=None, progress=False):
    """FID statistics (mu (2048,), sigma (2048, 2048)) of images; see inception_outputs for the formats."""
    feats, _ = inception_outputs(images, model, batch_size, device, progress)
    return feature_statistics(feats)

#################################################################################
#                        Fréchet distance and Inception Score                   #
#################################################################################

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Fréchet distance of two Gaussians, in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = len(mu1)
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Near-singular product (e.g. fewer samples than dimensions): regularise both covariances slightly.
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # S1 S2 has real non-negative eigenvalues in exact arithmetic; rounding may leave tiny imaginary parts.
        imag = np.abs(np.diagonal(covmean).imag).max()  # only the trace enters the distance
        if imag > 1e-3:
            raise ValueError(f"the square root of sigma1 @ sigma2 has an imaginary part up to {imag:.3g}: "
                             "the statistics are not valid covariances (or far too few samples)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits=10):
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax of the logits (N, 1008)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if len(logits) < splits:
        raise ValueError(f"the Inception Score over {splits} splits needs at least {splits} images, "
                         f"got {len(logits)}")
    scores = []
    for part in torch.tensor_split(logits, splits):
        log_p = F.log_softmax(part, dim=1)                               # log p(y|x), (n, 1008)
        log_py = torch.logsumexp(log_p, dim=0) - math.log(len(part))    # log p(y) = log mean_x p(y|x)
        kl = (log_p.exp() * (log_p - log_py)).sum(dim=1)                 # KL(p(y|x) || p(y)), (n,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))

#################################################################################
#                                   CLI                                          #
#################################################################################

def load_input(path, name):
    """('stats', (mu, sigma)) for a statistics .npz, else ('images', a sliceable image set)."""
    if os.path.isdir(path):
        return 'images', ImageFolder(path)
    if not os.path.isfile(path):
        raise ValueError(f"{name} {path}: no such file or folder")
    if not path.endswith('.npz'):
        raise ValueError(f"{name} {path}: expected a folder of images or an .npz (arr_0 images or mu/sigma)")
    data = np.load(path)
    if 'mu' in data and 'sigma' in data:  # ADM reference batches carry arr_0 too: their statistics win
        return 'stats', (data['mu'], data['sigma'])
    if 'arr_0' in data:
        images = data['arr_0']
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{name} {path}: arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        return 'images', images
    raise ValueError(f"{name} {path}: found keys {list(data.keys())}; expected mu and sigma, or arr_0")


def statistics_of(loaded, model, args):
    """((mu, sigma), logits or None) of what load_input returned."""
    kind, value = loaded
    if kind == 'stats':
        return value, None
    feats, logits = inception_outputs(value, model, args.batch_size, args.device, progress=True)
    return feature_statistics(feats), logits


def main(argv=None):
    parser = argparse.ArgumentParser(description="FID and Inception Score with the standard FID Inception-v3.")
    parser.add_argument('samples', metavar='SAMPLES', help="folder of images, .npz with arr_0, or .npz with mu/sigma")
    parser.add_argument('ref', metavar='REF', nargs='?', help="the same kinds; optional with --save-stats")
    parser.add_argument('--save-stats', metavar='OUT.npz', help="write SAMPLES' statistics (mu, sigma) here")
    parser.add_argument('--overwrite', action='store_true', help="let --save-stats replace an existing file")
    parser.add_argument('--weights', default=None, help=f"path to {WEIGHTS_NAME} (default: $FID_WEIGHTS, else "
                        f"torch's hub cache, downloaded there on first use)")
    parser.add_argument('--batch-size', type=int, default=50, help="images per Inception forward pass (default 50)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help="cuda, cuda:N or cpu (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.ref is None and args.save_stats is None:
        parser.error("give REF to compute FID, or --save-stats OUT.npz to cache the statistics of SAMPLES")
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: must be at least 1")
        if args.save_stats and os.path.exists(args.save_stats) and not args.overwrite:
            raise ValueError(f"--save-stats {args.save_stats} exists: pass --overwrite to replace it, or choose "
                             f"another file")
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device}: not a device (cuda, cuda:N or cpu)") from None
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available here; use --device cpu")
        samples = load_input(args.samples, 'SAMPLES')
        ref = load_input(args.ref, 'REF') if args.ref else None
        needs_model = samples[0] == 'images' or (ref is not None and ref[0] == 'images')
        model = load_inception(args.weights, args.device) if needs_model else None
        (mu, sigma), logits = statistics_of(samples, model, args)
        if args.save_stats:
            with open(args.save_stats, 'wb') as f:  # a file object, so numpy appends no second .npz
                np.savez(f, mu=mu, sigma=sigma)
            print(f"saved statistics of {args.samples} to {args.save_stats}")
        if ref is not None:
            (mu_ref, sigma_ref), _ = statistics_of(ref, model, args)
            print(f"FID: {frechet_distance(mu, sigma, mu_ref, sigma_ref):.4f}")
        if logits is not None and len(logits) >= 10:
            print("IS: {:.4f} ± {:.4f}".format(*inception_score(logits, splits=10)))
        elif logits is not None:
            print(f"IS: skipped (its 10 splits need at least 10 images, got {len(logits)})")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"fid.py: error: {e}")


if __name__ == '__main__':
    main()
