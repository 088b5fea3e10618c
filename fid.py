"""
The papers' evaluator in PyTorch: FID, sFID, Inception Score, precision and recall, each computed as
ADM's evaluator computes it (guided-diffusion's evaluations/evaluator.py, TensorFlow and the 2015
Inception graph), the scorer of both SPRINT and SparseDiT.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz         # the five numbers
    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --json  # as one JSON object
    python fid.py samples.npz ref.npz --fid-only                      # FID alone, fast
    python fid.py REF_IMAGES --save-stats ref.npz                     # cache a reference once

SAMPLES and REF are each a folder of images, an .npz of images (arr_0: uint8 N×H×W×3, as
sample.py writes), an ADM reference batch (arr_0 and precomputed mu, sigma, mu_s, sigma_s) or a
statistics .npz from --save-stats (mu, sigma, mu_s, sigma_s and the pool3 features). As in the
evaluator, statistics a file holds win over its images; the report says which were used.

Where the evaluator's operations live:
- the graph's input (TF1 bilinear resize to 299, then (x - 128) / 128), the network: inception.py;
- FID and sFID: `feature_statistics` and `frechet_distance` of pool3 (2048 values an image) and of
  the spatial features (2023);
- IS: `inception_score` of the graph's logits without their bias, in splits of 5,000 samples;
- precision and recall: `precision_recall`, k = 3 nearest-neighbour balls in pool3 space, with the
  evaluator's float16 distances (`pairwise_distances`).
The network agrees with pytorch-fid's to 1e-4 on the same input; the scores do not, as pytorch-fid
preprocesses differently (inception.py); pytorch-fid has no sFID, precision or recall either.

References:
- Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"
  (NeurIPS 2017, arXiv 1706.08500): FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
- Nash et al., "Generating Images with Sparse Representations" (ICML 2021, arXiv 2103.03841): sFID,
  the same distance on the first 7 channels of an intermediate feature map (mixed_6/conv).
- Salimans et al., "Improved Techniques for Training GANs" (NeurIPS 2016, arXiv 1606.03498):
  IS = exp(E_x KL(p(y|x) || p(y))).
- Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing Generative Models"
  (NeurIPS 2019, arXiv 1904.06991): a set's manifold is the union of balls that reach from each
  point to its k-th nearest neighbour.
- Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis" (NeurIPS 2021, arXiv
  2105.05233): the evaluator (github.com/openai/guided-diffusion, evaluations/evaluator.py) and its
  reference batches.
"""
import argparse
import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from tqdm import tqdm

import inception
from data import IMAGE_EXTS, read_image

NEIGHBOURS = 3          # k of the evaluator's ManifoldEstimator (nhood_sizes=(3,))
DISTANCE_BLOCK = 10000  # rows and columns per block of distances (its row/col_batch_size)
IS_SPLIT = 5000         # samples per Inception Score split (its split_size): 50,000 give 10 splits

#################################################################################
#                        Images -> Inception features                           #
#################################################################################

def stack_images(images, names):
    """Stack same-sized (H, W, 3) images, or say which two differ."""
    for name, im in zip(names, images):
        if im.shape != images[0].shape:
            raise ValueError(f"images of mixed sizes in one batch: {names[0]} is {images[0].shape} "
                             f"but {name} is {im.shape}; resize them to one size first")
    return np.stack(images)


class ImageFiles:
    """A flat folder's images in sorted order, read lazily: files[i:j] is a uint8 (j-i, H, W, 3)
    array. name: the argument it came from (SAMPLES or REF), named in errors."""
    def __init__(self, path, name='images'):
        self.name = name
        self.files = sorted(os.path.join(path, f) for f in os.listdir(path)
                            if f.lower().endswith(IMAGE_EXTS))
        if not self.files:
            raise ValueError(f"{path}: no images found (looked for {'/'.join(IMAGE_EXTS)})")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        files = self.files[index]
        return stack_images([np.asarray(read_image(f, self.name)) for f in files], files)


def as_uint8_batch(batch):
    """A batch as the evaluator reads arr_0: a uint8 (N, H, W, 3) array, or a clear error."""
    if isinstance(batch, (list, tuple)):
        names = [f"image {i}" for i in range(len(batch))]
        batch = stack_images([np.asarray(im) for im in batch], names)
    batch = np.asarray(batch)
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), as in ADM's arr_0, got "
                         f"{batch.dtype} {batch.shape}")
    return batch


@torch.inference_mode()
def inception_outputs(images, model, batch_size=50, device=None, progress=False, desc='inception'):
    """pool3 features (N, 2048) and spatial features (N, 2023) of images, float32 numpy, as the
    evaluator reads them. images: a sliceable set (uint8 (N, H, W, 3) array, ImageFiles, list of
    (H, W, 3) arrays) or any other iterable yielding such batches (e.g. a sampler's generator)."""
    device = device or next(model.parameters()).device
    if hasattr(images, '__len__') and hasattr(images, '__getitem__'):
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
        total = len(images)
    else:
        batches = images
        total = None
    pool3 = []
    spatial = []
    bar = tqdm(total=total, disable=not progress, unit='img', desc=desc)
    # float32 convolutions as in the graph, not cuDNN's default TF32 (10-bit mantissas)
    with bar, torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for batch in batches:
            batch = as_uint8_batch(batch)
            x = inception.preprocess(torch.from_numpy(batch).to(device))   # (n, 3, 299, 299)
            batch_pool3, batch_spatial = model(x)                         # (n, 2048), (n, 2023)
            pool3.append(batch_pool3.float().cpu().numpy())
            spatial.append(batch_spatial.float().cpu().numpy())
            bar.update(len(batch))
    if not pool3:
        raise ValueError("no images given")
    return np.concatenate(pool3), np.concatenate(spatial)

#################################################################################
#                  Statistics, Fréchet distance, Inception Score                #
#################################################################################

def feature_statistics(feats):
    """Mean (D,) and covariance (D, D) of features (N, D) as the evaluator takes them: np.mean in
    the features' own precision (float32 for the network's), np.cov in float64."""
    if len(feats) < 2:
        raise ValueError(f"need at least 2 images to estimate a covariance, got {len(feats)}")
    feats = np.asarray(feats)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def compute_statistics(images, model, batch_size=50, device=None, progress=False):
    """FID statistics (mu (2048,), sigma (2048, 2048)) of images; formats as inception_outputs."""
    pool3, _ = inception_outputs(images, model, batch_size, device, progress)
    return feature_statistics(pool3)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Fréchet distance of two Gaussians, in
    float64."""
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    d = len(mu1)
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Near-singular product (e.g. fewer samples than dimensions): regularise both slightly.
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # S1 S2 has real non-negative eigenvalues in exact arithmetic; rounding may leave tiny
        # imaginary parts. Only the trace enters the distance.
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"the square root of sigma1 @ sigma2 has an imaginary part up to "
                             f"{imag:.3g}: the statistics are not valid covariances (or far too "
                             f"few samples)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=IS_SPLIT):
    """ADM's Inception Score: exp(E_x KL(p(y|x) || p(y))) in each run of split_size consecutive
    samples (the last may be shorter), averaged over the runs; p(y|x) = softmax of the logits
    (N, 1008)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    scores = []
    for part in torch.split(logits, split_size):
        # log space and float64: the evaluator's float32 p * log(p) is nan where p underflows to 0
        log_p = F.log_softmax(part, dim=1)                              # log p(y|x), (n, 1008)
        log_py = torch.logsumexp(log_p, dim=0) - math.log(len(part))   # log p(y), (1008,)
        kl = (log_p.exp() * (log_p - log_py)).sum(dim=1)                # KL(p(y|x) || p(y)), (n,)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores))

#################################################################################
#          Precision and recall, with the evaluator's float16 distances         #
#################################################################################

# The evaluator casts the features to float16 and computes |u|^2 - 2 u.v + |v|^2 with TensorFlow's
# float16 ops, each of which rounds its result to float16. Its radii are therefore float16 numbers,
# which exact distances do not reproduce (tests/test_fid.py), and the order in which TensorFlow
# sums the squares matters. On a CPU, TensorFlow sums with Eigen's vectorised float16 reduction;
# with Eigen's constants below, the radii of tests/fixtures/adm_evaluator_ops.npz (computed on a
# CPU) are reproduced bit for bit. On a GPU, TensorFlow sums in float32 and rounds once: on the
# fixture that moves 30% of the radii by one float16 step and recall by 1 of 600 references.
PACKET = 8   # float16 lanes of one vector register (Eigen's Packet8h on AVX)
LEAF = 200   # Eigen's LeafSize<half>: a row longer than PACKET * LEAF is summed as two halves


def to_half(x):
    """x (float32) rounded to the nearest float16, kept in float32: a float16 operation's result."""
    return x.half().float()


def leaf_sum(x):
    """Row sums (R,) of float16 values x (R, n), n <= PACKET * LEAF, in Eigen's vectorised order:
    four accumulators of PACKET lanes take successive packets in turn, then add up (1, 2 and 3 into
    0); leftover packets go to accumulator 0, leftover values to a scalar; at the end the lanes are
    added in float32 and rounded once, and the scalar is added."""
    rows, n = x.shape
    acc = x.new_zeros(rows, PACKET)
    start = 0
    if n >= 4 * PACKET:
        start = n // (4 * PACKET) * (4 * PACKET)
        quads = x[:, :start].reshape(rows, -1, 4, PACKET)      # (R, steps, accumulator, lane)
        accs = x.new_zeros(rows, 4, PACKET)
        for step in range(quads.shape[1]):
            accs = to_half(accs + quads[:, step])
        acc = accs[:, 0]
        for k in range(1, 4):
            acc = to_half(acc + accs[:, k])
    while start + PACKET <= n:
        acc = to_half(acc + x[:, start:start + PACKET])
        start += PACKET
    scalar = x.new_zeros(rows)
    for j in range(start, n):
        scalar = to_half(scalar + x[:, j])
    # float16 values added in float32 are exact unless their exponents lie more than 13 apart, so
    # the order of the lanes does not matter
    return to_half(scalar + to_half(acc.sum(dim=1)))


def tree_sum(x, first=0):
    """Row sums (R,) of float16 values x (R, n) as Eigen's tree reduction takes them. first: where
    the rows start in the flattened tensor, modulo PACKET (the split is at a packet boundary)."""
    n = x.shape[1]
    if n <= PACKET * LEAF:
        return leaf_sum(x)
    left = PACKET * math.ceil((first + math.ceil(n / 2)) / PACKET) - first   # 2048: 1024 + 1024
    return to_half(tree_sum(x[:, :left], first) + tree_sum(x[:, left:]))


def float16_squared_norms(u):
    """tf.reduce_sum(tf.square(u), 1) of float16 values u (R, D), as TensorFlow computes it on a
    CPU: (R,)."""
    squares = to_half(u * u)                                     # tf.square rounds each square
    # row r starts at r * D of the flattened tensor: at a packet boundary when D is a multiple of 8
    starts = torch.arange(len(u)) * u.shape[1] % PACKET
    norms = torch.empty(len(u), device=u.device)
    for first in starts.unique().tolist():
        rows = (starts == first).to(u.device)
        norms[rows] = tree_sum(squares[rows], first)
    return norms


def pairwise_distances(u, v):
    """Squared Euclidean distances (R, C) between features u (R, D) and v (C, D), float32 tensors on
    one device, as the evaluator's DistanceBlock computes them: in float16 where the whole block is
    finite, else in float32."""
    u16 = to_half(u)
    v16 = to_half(v)
    # float16 products are exact in float32; TensorFlow's CPU MatMul adds them in float32 and rounds
    # once (the fixture's radii say so). Its order of addition may differ from torch's: float32 and
    # float64 sums of 2048 terms round to different float16 dots 1 time in 10,000 (measured).
    dots = to_half(u16 @ v16.T)                                  # (R, C)
    d = to_half(float16_squared_norms(u16)[:, None] - to_half(2 * dots))
    d = to_half(d + float16_squared_norms(v16)[None]).clamp_min(0)
    if torch.isfinite(d).all():
        return d
    # a squared norm beyond float16's 65504: the evaluator's tf.cond redoes the block in float32
    d = (u * u).sum(dim=1)[:, None] - 2 * (u @ v.T)
    return (d + (v * v).sum(dim=1)[None]).clamp_min(0)


def manifold_radii(feats, k=NEIGHBOURS, block=DISTANCE_BLOCK, bar=None):
    """Each feature's squared distance (N,) to its k-th nearest neighbour in feats (N, D), as the
    evaluator's ManifoldEstimator, in blocks of `block` rows and columns. A row includes the point
    itself (at distance about 0), so the radius is the row's (k + 1)-th smallest distance."""
    radii = []
    for rows in feats.split(block):
        nearest = []
        for cols in feats.split(block):
            d = pairwise_distances(rows, cols)                   # (r, c)
            nearest.append(d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values)
            if bar is not None:
                bar.update()
        radii.append(torch.cat(nearest, dim=1).kthvalue(k + 1, dim=1).values)   # (r,)
    return torch.cat(radii)


@torch.inference_mode()
def precision_recall(ref, samples, k=NEIGHBOURS, block=DISTANCE_BLOCK, device='cpu',
                     progress=False):
    """(precision, recall) of pool3 features samples (N, D) against ref (M, D), as the evaluator
    computes them: precision = share of samples inside some reference ball, recall = share of
    references inside some sample ball; a ball reaches from its point to the point's k-th nearest
    neighbour in its own set, boundary included."""
    if min(len(ref), len(samples)) < k + 1:
        raise ValueError(f"precision and recall need at least {k + 1} feature vectors per set "
                         f"(k = {k} neighbours besides the point itself), got {len(ref)} and "
                         f"{len(samples)}")
    ref = torch.as_tensor(ref, dtype=torch.float32, device=device)
    samples = torch.as_tensor(samples, dtype=torch.float32, device=device)
    nr = math.ceil(len(ref) / block)
    ns = math.ceil(len(samples) / block)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sample_inside = torch.zeros(len(samples), dtype=torch.bool, device=device)
    bar = tqdm(total=nr * nr + ns * ns + nr * ns, disable=not progress, unit='block',
               desc='precision/recall')
    with bar:
        ref_radii = manifold_radii(ref, k, block, bar)           # (M,)
        sample_radii = manifold_radii(samples, k, block, bar)    # (N,)
        for i in range(0, len(ref), block):
            for j in range(0, len(samples), block):
                # reference rows, sample columns, as the evaluator orders them
                d = pairwise_distances(ref[i:i + block], samples[j:j + block])    # (m, n)
                ref_inside[i:i + block] |= (d <= sample_radii[None, j:j + block]).any(dim=1)
                sample_inside[j:j + block] |= (d <= ref_radii[i:i + block, None]).any(dim=0)
                bar.update()
    return sample_inside.double().mean().item(), ref_inside.double().mean().item()

#################################################################################
#                                   CLI                                          #
#################################################################################

@dataclass
class Source:
    """What one argument holds: images, and what a statistics file or reference batch carries."""
    name: str                  # SAMPLES or REF, named in messages
    path: str
    images: object = None      # a sliceable uint8 image set (arr_0 or ImageFiles), or None
    fid_stats: tuple = None    # (mu, sigma) of pool3, precomputed in the file
    sfid_stats: tuple = None   # (mu_s, sigma_s) of the spatial features, precomputed in the file
    pool3: np.ndarray = None   # pool3 features (N, 2048), as --save-stats saves them

    def count(self):
        """The number of images (or of saved feature vectors) behind this input."""
        if self.images is not None:
            return len(self.images)
        return len(self.pool3)


def load_input(path, name):
    """The Source of a folder of images or of an .npz (arr_0, mu/sigma, mu_s/sigma_s, pool3)."""
    if os.path.isdir(path):
        return Source(name, path, images=ImageFiles(path, name))
    if not os.path.isfile(path):
        raise ValueError(f"{name} {path}: no such file or folder")
    if not path.endswith('.npz'):
        raise ValueError(f"{name} {path}: expected a folder of images or an .npz (arr_0 images, or "
                         f"statistics)")
    try:
        data = np.load(path)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{name} {path}: not a readable .npz ({e})") from None
    source = Source(name, path)
    if 'mu' in data and 'sigma' in data:
        source.fid_stats = (data['mu'], data['sigma'])
    if 'mu_s' in data and 'sigma_s' in data:
        source.sfid_stats = (data['mu_s'], data['sigma_s'])
    if 'pool3' in data:
        source.pool3 = data['pool3']
    if 'arr_0' in data:
        images = data['arr_0']
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{name} {path}: arr_0 must be uint8 (N, H, W, 3), got {images.dtype} "
                             f"{images.shape}")
        source.images = images
    if source.images is None and source.fid_stats is None and source.pool3 is None:
        raise ValueError(f"{name} {path}: found keys {list(data.keys())}; expected arr_0 (images), "
                         f"or mu and sigma (statistics)")
    return source


def needs_images(source, full):
    """Whether the report (full: all five numbers, else FID alone) needs the network on this input's
    images: only for what its file does not hold, as the evaluator reads a file's own statistics."""
    if full:
        return source.fid_stats is None or source.sfid_stats is None or source.pool3 is None
    return source.fid_stats is None


def check_input(source, full):
    """Say, before any image is read, what this input lacks for the report."""
    bare = f"{source.name} {source.path} holds no images"
    if source.fid_stats is None and source.images is None:
        raise ValueError(f"{bare} and no mu/sigma for FID")
    if full and source.sfid_stats is None and source.images is None:
        raise ValueError(f"{bare} and no mu_s/sigma_s for sFID (the spatial statistics that ADM's "
                         f"reference batches and --save-stats files carry); give its images, or "
                         f"pass --fid-only")
    if full and source.pool3 is None and source.images is None:
        scores = "precision and recall need"
        if source.name == 'SAMPLES':
            scores = "the Inception Score, precision and recall need"
        raise ValueError(f"{bare}: {scores} its images or their pool3 features (as --save-stats "
                         f"saves them); or pass --fid-only")
    if needs_images(source, full) and len(source.images) < 2:
        raise ValueError(f"{source.name} {source.path}: need at least 2 images to estimate a "
                         f"covariance, got {len(source.images)}")


def measure(source, model, args, full):
    """FID statistics of one input, with full also its sFID statistics and pool3 features: the
    file's own where it holds them, else computed from its images; and a line saying which."""
    pool3 = source.pool3
    spatial = None
    if needs_images(source, full):
        pool3, spatial = inception_outputs(source.images, model, args.batch_size, args.device,
                                           progress=True, desc=source.name)
    result = {'pool3': pool3, 'fid_stats': source.fid_stats or feature_statistics(pool3)}
    if full:
        result['sfid_stats'] = source.sfid_stats or feature_statistics(spatial)
    held = [('mu, sigma', source.fid_stats)]
    if full:
        held += [('mu_s, sigma_s', source.sfid_stats), ('pool3', source.pool3)]
    used = ', '.join(key for key, value in held if value is not None)
    computed = ', '.join(key for key, value in held if value is None)
    where = f"precomputed in {os.path.basename(source.path)}"
    if not needs_images(source, full):
        result['how'] = f"{where} ({used})"
    elif used:
        result['how'] = f"{used} {where}; {computed} computed from its {len(pool3)} images"
    else:
        result['how'] = f"computed from its {len(pool3)} images"
    return result


def main(argv=None):
    """The command line: check the flags and what each input holds, measure both, report."""
    parser = argparse.ArgumentParser(description="FID, sFID, Inception Score, precision and recall "
                                                 "as ADM's evaluator computes them.")
    parser.add_argument('samples', metavar='SAMPLES', help="folder of images, .npz with arr_0 "
                        "(uint8 N×H×W×3), or a statistics .npz")
    parser.add_argument('ref', metavar='REF', nargs='?', help="the same kinds, e.g. ADM's "
                        "VIRTUAL_imagenet256_labeled.npz; optional with --save-stats")
    parser.add_argument('--fid-only', action='store_true', help="FID alone, from pool3 statistics "
                        "(no spatial statistics, IS or nearest neighbours)")
    parser.add_argument('--json', action='store_true', help="print the report as one JSON object")
    parser.add_argument('--save-stats', metavar='OUT.npz', help="write SAMPLES' mu, sigma, mu_s, "
                        "sigma_s and pool3 features here")
    parser.add_argument('--overwrite', action='store_true',
                        help="let --save-stats replace an existing file")
    parser.add_argument('--weights', default=None, help=f"path to {inception.WEIGHTS_NAME} "
                        f"(default: $FID_WEIGHTS, else torch's hub cache, downloaded on first use)")
    parser.add_argument('--batch-size', type=int, default=50,
                        help="images per Inception forward pass (default 50)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help="cuda, cuda:N or cpu (default: cuda if available)")
    args = parser.parse_intermixed_args(argv)
    if args.ref is None and args.save_stats is None:
        parser.error("give REF to score SAMPLES against, or --save-stats OUT.npz to cache SAMPLES' "
                     "statistics")
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: must be at least 1")
        if args.save_stats and os.path.exists(args.save_stats) and not args.overwrite:
            raise ValueError(f"--save-stats {args.save_stats} exists: pass --overwrite to replace "
                             f"it, or choose another file")
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device}: not a device (cuda, cuda:N or "
                             f"cpu)") from None
        if device.type == 'cuda' and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available here; use --device "
                             f"cpu")

        # what each input holds, checked before any image is read
        full = not args.fid_only
        full_samples = full or args.save_stats is not None    # a saved file serves a full report
        samples = load_input(args.samples, 'SAMPLES')
        ref = load_input(args.ref, 'REF') if args.ref else None
        if args.save_stats and samples.images is None:
            raise ValueError(f"--save-stats: SAMPLES {args.samples} holds no images to compute "
                             f"statistics from")
        check_input(samples, full_samples)
        if ref is not None:
            check_input(ref, full)
        for source in (samples, ref):
            if ref is not None and full and source.count() < NEIGHBOURS + 1:
                raise ValueError(f"{source.name} {source.path}: precision and recall need at least "
                                 f"{NEIGHBOURS + 1} images (each one's ball reaches its "
                                 f"{NEIGHBOURS}rd nearest neighbour), got {source.count()}")

        # the network reads only the inputs whose file lacks what the report needs, and gives the
        # Inception Score its logits
        model = None
        ref_needs_model = ref is not None and (full or needs_images(ref, full))
        if needs_images(samples, full_samples) or ref_needs_model:
            model = inception.load_inception(args.weights, args.device)
        sample_stats = measure(samples, model, args, full_samples)
        report = {'SAMPLES': sample_stats['how']}
        if ref is not None:
            ref_stats = measure(ref, model, args, full)
            report['REF'] = ref_stats['how']
            report['FID'] = frechet_distance(*sample_stats['fid_stats'], *ref_stats['fid_stats'])
        if ref is not None and full:
            report['sFID'] = frechet_distance(*sample_stats['sfid_stats'], *ref_stats['sfid_stats'])
            pool3 = torch.as_tensor(sample_stats['pool3'], dtype=torch.float32, device=args.device)
            report['IS'] = inception_score(model.logits(pool3).cpu())   # logits (N, 1008)
            precision, recall = precision_recall(ref_stats['pool3'], sample_stats['pool3'],
                                                 device=args.device, progress=True)
            report['Precision'] = precision
            report['Recall'] = recall

        if args.save_stats:
            mu, sigma = sample_stats['fid_stats']
            mu_s, sigma_s = sample_stats['sfid_stats']
            with open(args.save_stats, 'wb') as f:   # a file object: numpy appends no second .npz
                np.savez(f, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s,
                         pool3=sample_stats['pool3'])
            print(f"saved the statistics of {args.samples} to {args.save_stats}", file=sys.stderr)
        if args.json:
            print(json.dumps(report))
        else:
            for key, value in report.items():
                print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"fid.py: error: {e}")


if __name__ == '__main__':
    main()
