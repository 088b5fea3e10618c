"""
The papers' evaluator in PyTorch, in one file: FID, sFID, Inception Score, precision and recall,
each computed as ADM's evaluator computes them (guided-diffusion's evaluations/evaluator.py,
TensorFlow and the 2015 Inception graph), the scorer of both SPRINT and SparseDiT.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz         # the five numbers
    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --json  # as one JSON object
    python fid.py samples.npz ref.npz --fid-only                      # FID alone, fast
    python fid.py REF_IMAGES --save-stats ref.npz                     # cache a reference once

SAMPLES and REF are each a folder of images, an .npz of images (arr_0: uint8 N×H×W×3, as
sample.py writes), an ADM reference batch (arr_0 and precomputed mu, sigma, mu_s, sigma_s) or a
statistics .npz from --save-stats (mu, sigma, mu_s, sigma_s and the pool3 features). As in the
evaluator, statistics a file holds win over its images; the report says which were used. Images are
read batch by batch, never all at once (50,000 images of 512 px are 39 GB).

The graph (inception-2015-12-05, classify_image_graph_def.pb) takes images of any size in 0..255,
resizes them inside itself with TF1's ResizeBilinear and maps them with (x - 128) / 128.
pytorch-fid resizes with F.interpolate and maps with x / 127.5 - 1 instead, which moves the input by
up to 0.25 at 256 px (more for smaller images), so its scores are not the papers'; pytorch-fid has
no sFID, precision or recall either. Its network and weight file are the graph's, and used here.

Where the evaluator's operations live:
- the graph's input: `preprocess` (`resize_bilinear_tf1` to 299, then (x - 128) / 128), bit-exact
  against TensorFlow's own ops (tests/fixtures/adm_evaluator_ops.npz);
- the network: `FIDInceptionV3`, the graph's Inception-v3 as ported by pytorch-fid, with the key
  names of its weight file, which `load_inception` loads (pt_inception-2015-12-05-6726825d.pth);
  it agrees with pytorch-fid's network to 1e-4 on the same input;
- the features, streamed batch by batch: `inception_outputs` of `ImageFiles` or `NpzImages` gives
  pool3 (2048 values an image) and the spatial features (mixed_6/conv, 2023 values);
- FID and sFID: `feature_statistics` and `frechet_distance` of pool3 and of the spatial features;
- IS: `inception_score` of the graph's logits without their bias (`FIDInceptionV3.logits`), in
  splits of 5,000 samples;
- precision and recall: `precision_recall`, k = 3 nearest-neighbour balls in pool3 space
  (`manifold_radii`), with the evaluator's float16 distances (`pairwise_distances`).

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
  2105.05233): the evaluator (github.com/openai/guided-diffusion, evaluations/evaluator.py, which
  reads pool_3:0 and mixed_6/conv:0) and its reference batches.
- Szegedy et al., "Rethinking the Inception Architecture for Computer Vision" (CVPR 2016,
  arXiv 1512.00567): Inception-v3.
- pytorch-fid (github.com/mseitzer/pytorch-fid): the weight file and the FID-specific blocks.
- torch-fidelity (github.com/toshas/torch-fidelity): utils/util_convert_inception_weights.py names
  the module each graph node became (mixed_6/conv -> Mixed_6d.branch1x1), the basis of sFID's
  features in `FIDInceptionV3.forward`.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               + WEIGHTS_NAME)
SIZE = 299              # the graph's input resolution
NEIGHBOURS = 3          # k of the evaluator's ManifoldEstimator (nhood_sizes=(3,))
DISTANCE_BLOCK = 10000  # rows and columns per block of distances (its row/col_batch_size)
IS_SPLIT = 5000         # samples per Inception Score split (its split_size): 50,000 give 10 splits
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')

#################################################################################
#             The graph's input: TF1 bilinear resize, then (x - 128) / 128      #
#################################################################################

def resize_bilinear_tf1(images, size=SIZE):
    """TF1's ResizeBilinear (align_corners=False, half_pixel_centers=False) of images (N, H, W, C),
    uint8 or float, to float32 (N, size, size, C)."""
    def taps(n_in):
        # Output pixel i reads source coordinate i * n_in / size, with no half-pixel shift (that of
        # F.interpolate's align_corners=False), in float32 as TensorFlow computes it.
        scale = torch.tensor(n_in, dtype=torch.float32, device=images.device) / size
        src = torch.arange(size, dtype=torch.float32, device=images.device) * scale
        frac = src - src.floor()
        low = src.long()                                         # floor: src is not negative
        return low, (low + 1).clamp(max=n_in - 1), frac
    y0, y1, fy = taps(images.shape[1])
    x0, x1, fx = taps(images.shape[2])
    # Gather the four source pixels of each output pixel before converting to float, so that a
    # batch of large uint8 images never becomes a float copy (N, H, W, C): at 1024 px that is 12 MB
    # an image, the gathered pixels 4 × 1 MB.
    top = images[:, y0]                                          # (N, size, W, C), as given
    bottom = images[:, y1]
    top_left = top[:, :, x0].float()                             # (N, size, size, C)
    bottom_left = bottom[:, :, x0].float()
    fx = fx[:, None]                                             # (size, 1): along W
    # TensorFlow's order of operations: along each of the two rows first, then between them
    top = top_left + (top[:, :, x1].float() - top_left) * fx
    bottom = bottom_left + (bottom[:, :, x1].float() - bottom_left) * fx
    return top + (bottom - top) * fy[:, None, None]


def preprocess(images):
    """Images (N, H, W, 3), uint8 or float in 0..255, any size -> the graph's input
    (N, 3, 299, 299), float32."""
    x = resize_bilinear_tf1(images)                              # (N, 299, 299, 3) in 0..255
    x = (x - 128) / 128                                          # the graph's Sub and Mul nodes
    return x.permute(0, 3, 1, 2).contiguous()                    # (N, 3, 299, 299)

#################################################################################
#                        Inception-v3 (FID variant)                             #
#################################################################################

# The graph's Inception-v3 as pytorch-fid ports it, with the key names of its weight file, so that
# the file loads as is. It differs from torchvision's Inception-v3 in three places: average pools do
# not count padding, the last block (Mixed_7c) max-pools in its pool branch, and the classifier has
# 1008 outputs (the 2015 graph's: the 1000 ImageNet classes and unused extra ones).

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
    """3×3 average pool over real pixels only: the TF graph's (torchvision's counts the padding)."""
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
        row = dict(kernel=(1, 7), padding=(0, 3))
        col = dict(kernel=(7, 1), padding=(3, 0))
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
    """Mixed_7b/7c (8×8): 3x3 convolutions split into parallel 1x3 and 3x1; 7c max-pools."""
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
    """The graph's input (N, 3, 299, 299) -> (pool3 (N, 2048), spatial features (N, 2023))."""
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
        x = chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3) # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)                                    # (N, 64, 73, 73)
        x = chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)                # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)                                    # (N, 192, 35, 35)
        x = chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d)           # (N, 288, 35, 35)
        x = chain(x, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d)  # (N, 768, 17, 17)
        # sFID reads the graph's mixed_6/conv:0, first 7 channels. The graph names its blocks
        # mixed, mixed_1, mixed_2 (Mixed_5b-d), mixed_3 (6a), ..., mixed_6 (6d), and a block's
        # "conv" is its 1x1 branch: the weights mixed_6/conv/{conv2d_params,batchnorm} are
        # Mixed_6d.branch1x1's (torch-fidelity's conversion), and the tensor mixed_6/conv is that
        # unit's output after batch norm and ReLU. Mixed_6d concatenates branch1x1 first, so its
        # channels 0-6 are those. The graph is channels-last (NHWC) and the evaluator flattens
        # (17, 17, 7): row, column, channel.
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)                  # (N, 17 * 17 * 7 = 2023)
        x = chain(x, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)  # (N, 2048, 8, 8)
        pool3 = x.mean(dim=(2, 3))                                          # (N, 2048): pool_3:0
        return pool3, spatial

    def logits(self, pool3):
        """The graph's softmax/logits/MatMul, pool3 @ W (N, 1008): the evaluator's Inception
        Score takes its softmax without the bias the graph adds next (fc.bias: loaded, unused)."""
        return pool3 @ self.fc.weight.T

#################################################################################
#                     The released weights, fetched and checked                 #
#################################################################################

def one_line(error):
    """An exception's message on one line: its whitespace, newlines included, collapsed."""
    return ' '.join(str(error).split())


def load_inception(weights=None, device='cpu'):
    """The FID Inception-v3 in eval mode with the released weights: the file `weights`, else
    $FID_WEIGHTS (both for offline use), else WEIGHTS_URL through torch's hub cache, downloaded on
    first use (as pytorch-fid, clean-fid and torch-fidelity do) and kept only if its sha256 starts
    with the digits in its name (-6726825d). Random weights are never used."""
    hint = (f"FID needs the Inception weights {WEIGHTS_NAME} (the FID Inception-v3 used by "
            f"pytorch-fid; random weights are never used). Download it from {WEIGHTS_URL} and pass "
            f"--weights PATH or set FID_WEIGHTS=PATH.")
    path = weights or os.environ.get('FID_WEIGHTS')
    if path is None:
        path = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(WEIGHTS_URL))
        try:
            # torch.hub announces a download on stdout, which carries the report (--json)
            with contextlib.redirect_stdout(sys.stderr):
                state = torch.hub.load_state_dict_from_url(WEIGHTS_URL, map_location='cpu',
                                                           progress=True, check_hash=True,
                                                           weights_only=True)
        except Exception as e:
            # no network, an HTTP error, a sha256 that does not start with the name's digits
            # (torch.hub deletes that download) or a damaged cached file: torch's words say which
            raise FileNotFoundError(f"no Inception weights given, and torch.hub could not provide "
                                    f"{path} ({type(e).__name__}: {one_line(e)}). {hint}") from None
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights {path}: no such file. {hint}")
    else:
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:  # not a torch file, truncated, or pickled objects beyond tensors
            raise ValueError(f"Inception weights {path}: not a PyTorch state dict of tensors "
                             f"({type(e).__name__}); expected {WEIGHTS_NAME} from "
                             f"{WEIGHTS_URL}") from None
    if not isinstance(state, dict):
        raise ValueError(f"Inception weights {path}: expected a state dict, got "
                         f"{type(state).__name__}")
    model = FIDInceptionV3()
    # BatchNorm's num_batches_tracked counters are unused in eval mode and the released file has
    # none: the fresh model's own stand in for them, so that the load can be strict
    counters = {k: v for k, v in model.state_dict().items() if k.endswith('num_batches_tracked')}
    try:
        model.load_state_dict({**counters, **state})
    except RuntimeError as e:   # torch's report of missing and unexpected keys and wrong shapes
        raise ValueError(f"Inception weights {path} do not fit the FID Inception-v3 "
                         f"({one_line(e)})") from None
    return model.eval().requires_grad_(False).to(device)

#################################################################################
#                  Images -> Inception features, batch by batch                 #
#################################################################################

def read_image(path, source):
    """An image file as a uint8 (H, W, 3) RGB array. A file PIL cannot decode is one ValueError
    naming where it came from (`source`: the argument) and the file."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert('RGB'))
    # PIL's ways of saying "not an image"
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{source}: cannot decode {path} ({e})") from None


def stack_images(images, names):
    """Stack same-sized (H, W, 3) images, or say which two differ."""
    for name, im in zip(names, images):
        if im.shape != images[0].shape:
            raise ValueError(f"images of mixed sizes in one batch: {names[0]} is {images[0].shape} "
                             f"but {name} is {im.shape}; resize them to one size first")
    return np.stack(images)


class ImageFiles:
    """A flat folder's images in sorted order, decoded one batch at a time. name: the argument it
    came from (SAMPLES or REF), named in errors."""
    def __init__(self, path, name='images'):
        self.name = name
        self.files = sorted(os.path.join(path, f) for f in os.listdir(path)
                            if f.lower().endswith(IMAGE_EXTS))
        if not self.files:
            raise ValueError(f"{path}: no images found (looked for {'/'.join(IMAGE_EXTS)})")

    def __len__(self):
        return len(self.files)

    def batches(self, batch_size):
        """uint8 (n, H, W, 3) arrays of batch_size images in order (the last may hold fewer)."""
        for start in range(0, len(self.files), batch_size):
            files = self.files[start:start + batch_size]
            yield stack_images([read_image(f, self.name) for f in files], files)


class NpzImages:
    """An .npz's arr_0, uint8 (N, H, W, 3), read batch by batch as ADM's evaluator reads it, never
    whole: 50,000 images of 512 px are 39 GB. Its shape and dtype are read from the .npy header and
    checked at open. name: the argument it came from (SAMPLES or REF), named in errors."""
    def __init__(self, path, name='images'):
        self.path = path
        self.name = name
        with self.arr_0() as (_, shape, fortran_order, dtype):
            self.shape = shape
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{name} {path}: arr_0 must be uint8 (N, H, W, 3), got {dtype} "
                             f"{shape}")
        if fortran_order:
            raise ValueError(f"{name} {path}: arr_0 is stored in Fortran order; save it C-ordered "
                             f"(np.ascontiguousarray) to be read batch by batch")

    @contextlib.contextmanager
    def arr_0(self):
        """The member arr_0.npy, opened and read past its header: (file, shape, fortran_order,
        dtype). ZipFile.open streams both stored (np.savez) and deflated (np.savez_compressed)
        members."""
        with zipfile.ZipFile(self.path) as archive, archive.open('arr_0.npy') as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(f)
            else:
                header = np.lib.format.read_array_header_2_0(f)
            yield (f, *header)

    def __len__(self):
        return self.shape[0]

    def batches(self, batch_size):
        """uint8 (n, H, W, 3) arrays of batch_size images in order (the last may hold fewer)."""
        with self.arr_0() as (f, *_):
            for start in range(0, len(self), batch_size):
                batch = np.empty((min(batch_size, len(self) - start), *self.shape[1:]), np.uint8)
                # one image at a time: ZipFile's read copies what it reads, once or twice
                for image in batch:
                    if f.readinto(image) < image.nbytes:
                        raise ValueError(f"{self.name} {self.path}: arr_0 holds fewer than the "
                                         f"{len(self)} images its header promises")
                yield batch


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
    evaluator reads them. images: ImageFiles or NpzImages (read one batch at a time), a uint8
    (N, H, W, 3) array or list of (H, W, 3) arrays, or any other iterable yielding such batches
    (e.g. a sampler's generator)."""
    device = device or next(model.parameters()).device
    total = len(images) if hasattr(images, '__len__') else None
    if hasattr(images, 'batches'):
        batches = images.batches(batch_size)
    elif hasattr(images, '__getitem__'):
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    else:
        batches = images
    pool3 = []
    spatial = []
    bar = tqdm(total=total, disable=not progress, unit='img', desc=desc)
    # float32 convolutions as in the graph, not cuDNN's default TF32 (10-bit mantissas)
    with bar, torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for batch in batches:
            batch = as_uint8_batch(batch)
            x = preprocess(torch.from_numpy(batch).to(device))      # (n, 3, 299, 299)
            batch_pool3, batch_spatial = model(x)                   # (n, 2048), (n, 2023)
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
# float16 ops, each of which rounds its result to float16: its radii are float16 numbers, which
# exact distances do not reproduce (tests/test_fid.py). Here each op rounds its result once, as
# TensorFlow on a GPU does. TensorFlow on a CPU adds the squares in float16 (Eigen's vectorised
# order), which moves some squared norms by one float16 step: of the 1,100 radii it computed in
# tests/fixtures/adm_evaluator_ops.npz, 766 are equal here and the others within 0.5; precision is
# equal and recall is 1 of 600 references higher.

def to_half(x):
    """x (float32) rounded to the nearest float16, kept in float32: a float16 operation's result."""
    return x.half().float()


def pairwise_distances(u, v):
    """Squared Euclidean distances (R, C) between features u (R, D) and v (C, D), float32 tensors on
    one device, as the evaluator's DistanceBlock computes them: in float16 where the whole block is
    finite, else in float32."""
    u16 = to_half(u)
    v16 = to_half(v)
    # tf.square rounds each square, tf.reduce_sum adds them in float32 and rounds once
    norms_u = to_half(to_half(u16 * u16).sum(dim=1))            # (R,)
    norms_v = to_half(to_half(v16 * v16).sum(dim=1))            # (C,)
    # products of float16 numbers are exact in float32; the MatMul adds them and rounds once
    dots = to_half(u16 @ v16.T)                                  # (R, C)
    d = to_half(norms_u[:, None] - to_half(2 * dots))
    d = to_half(d + norms_v[None]).clamp_min(0)
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
    images: object = None      # NpzImages (arr_0) or ImageFiles, read batch by batch; or None
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
        data = np.load(path)                 # lazy: a key is read when asked for
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{name} {path}: not a readable .npz ({e})") from None
    source = Source(name, path)
    with data:
        if 'mu' in data and 'sigma' in data:
            source.fid_stats = (data['mu'], data['sigma'])
        if 'mu_s' in data and 'sigma_s' in data:
            source.sfid_stats = (data['mu_s'], data['sigma_s'])
        if 'pool3' in data:
            source.pool3 = data['pool3']
        keys = list(data.keys())
    if 'arr_0' in keys:
        source.images = NpzImages(path, name)                    # its header only, for now
    if source.images is None and source.fid_stats is None and source.pool3 is None:
        raise ValueError(f"{name} {path}: found keys {keys}; expected arr_0 (images), or mu and "
                         f"sigma (statistics)")
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
    parser.add_argument('--weights', default=None, help=f"path to {WEIGHTS_NAME} "
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
            model = load_inception(args.weights, args.device)
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
