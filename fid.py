"""
FID and Inception Score of generated images, with the standard FID Inception-v3 of inception.py.

    python fid.py SAMPLES REF                      # FID (and IS of SAMPLES) against a reference
    python fid.py REF_IMAGES --save-stats ref.npz  # cache a reference's statistics once
    python fid.py samples.npz ref.npz --weights pt_inception-2015-12-05-6726825d.pth

    model = load_inception('pt_inception-2015-12-05-6726825d.pth')     # or FID_WEIGHTS=... and no argument
    mu, sigma = compute_statistics(images_uint8_nhwc, model)            # pool3 statistics, float64
    score = frechet_distance(mu, sigma, *ref_stats); feats, logits = inception_outputs(images, model)

SAMPLES and REF are each a folder of images, an ADM-style .npz (arr_0: uint8 N×H×W×3) or a statistics
.npz (mu, sigma). ADM's reference batches (e.g. VIRTUAL_imagenet256_labeled.npz) hold both; their mu/sigma win.
Images of any size are resized to 299×299 (bilinear) inside the network, as pytorch-fid does.

References:
- Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"
  (NeurIPS 2017, arXiv 1706.08500): FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) on pool3 features.
- Salimans et al., "Improved Techniques for Training GANs" (NeurIPS 2016, arXiv 1606.03498):
  IS = exp(E_x KL(p(y|x) || p(y))), averaged over 10 splits.
- pytorch-fid (github.com/mseitzer/pytorch-fid): FID's reference implementation, whose outputs tests/ match.
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from tqdm import tqdm

from data import IMAGE_EXTS, read_image
from inception import WEIGHTS_NAME, load_inception

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
    """A folder's images in sorted order, read lazily: folder[i:j] is a uint8 (j-i, H, W, 3) array. name: the
    argument it came from (SAMPLES or REF), named in errors."""
    def __init__(self, path, name='images'):
        self.name = name
        self.files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS))
        if not self.files:
            raise ValueError(f"{path}: no images found (looked for {'/'.join(IMAGE_EXTS)})")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        files = self.files[index]
        return stack_images([np.asarray(read_image(f, self.name)) for f in files], files)


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
        return 'images', ImageFolder(path, name)
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
