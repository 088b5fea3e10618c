"""
The papers' evaluators in PyTorch: ADM's (FID, sFID, Inception Score, precision and recall, as
guided-diffusion's evaluator.py computes them with TensorFlow and the 2015 Inception graph: both
papers' scorer) and dgm-eval's FDD (the Fréchet distance in DINOv2 ViT-L/14 space: SPRINT's).

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz          # FID, sFID, IS, P, R
    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --fdd    # and FDD
    python fid.py samples.npz ref.npz --fid-only --json                # FID alone, as JSON
    python fid.py REF_IMAGES --save-stats ref_stats.npz --fdd          # a reference's, once

SAMPLES and REF: a folder of images, an .npz of images (arr_0: uint8 N×H×W×3, as sample.py writes
it), an ADM reference batch (arr_0, mu, sigma, mu_s, sigma_s) or a --save-stats file; statistics a
file holds are used instead of its images, as the evaluator does; the networks download once into
torch's hub cache. References: Heusel et al. 2017 (FID), Nash et al. 2021 (sFID), Salimans et al.
2016 (IS), Kynkäänniemi et al. 2019 (precision, recall), Dhariwal & Nichol 2021 (the evaluator),
Oquab et al. 2023 (DINOv2), Stein et al. 2023 (FDD).
"""
import argparse
import contextlib
import functools
import json
import math
import os
import sys
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
NEIGHBOURS = 3          # k of the evaluator's ManifoldEstimator (nhood_sizes=(3,))
DISTANCE_BLOCK = 10000  # rows and columns per block of distances (its row/col_batch_size)
IS_SPLIT = 5000         # samples per Inception Score split (its split_size): 50,000 give 10 splits
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


#################################################################################
#             The graph's input: TF1 bilinear resize, then (x - 128) / 128      #
#################################################################################

def resize_bilinear_tf1(images, size=299):
    """TF1's ResizeBilinear (align_corners=False, half_pixel_centers=False) of images (N, H, W, C),
    uint8 or float, to float32 (N, size, size, C)."""
    def taps(n_in):
        # output pixel i reads source coordinate i * n_in / size (no half-pixel shift), in float32
        scale = torch.tensor(n_in, dtype=torch.float32, device=images.device) / size
        src = torch.arange(size, dtype=torch.float32, device=images.device) * scale
        low = src.long()                                         # floor: src is not negative
        return low, (low + 1).clamp(max=n_in - 1), src - src.floor()
    y0, y1, fy = taps(images.shape[1])
    x0, x1, fx = taps(images.shape[2])
    # the four source pixels of each output pixel, gathered before converting to float: a batch of
    # large uint8 images never becomes a float copy
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
    """Images (N, H, W, 3) of any size, values 0..255 -> the graph's input (N, 3, 299, 299), which
    pytorch-fid's own (F.interpolate, x / 127.5 - 1) misses by up to 0.25 at 256 px."""
    x = resize_bilinear_tf1(images)                              # (N, 299, 299, 3) in 0..255
    x = (x - 128) / 128                                          # the graph's Sub and Mul nodes
    return x.permute(0, 3, 1, 2).contiguous()                    # (N, 3, 299, 299)


#################################################################################
#                        Inception-v3 (FID variant)                             #
#################################################################################

# The graph's Inception-v3 as pytorch-fid ports it, with its weight file's key names. Unlike
# torchvision's, average pools do not count padding, Mixed_7c max-pools in its pool branch, and the
# classifier has 1008 outputs (the 2015 graph's: the 1000 ImageNet classes and unused ones).

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
    """Mixed_7b/7c (8×8): 3x3 convolutions split into parallel 1x3 and 3x1; the graph's 7c
    max-pools where 7b averages."""
    def __init__(self, cin, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
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
        # sFID reads the graph's mixed_6/conv:0, first 7 channels: mixed, mixed_1, ... are Mixed_5b,
        # 5c, ..., so mixed_6 is Mixed_6d, whose "conv" is its 1x1 branch, concatenated first
        # (channels 0-6, after BN and ReLU); the graph is channels-last: (17, 17, 7) flattened.
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)                  # (N, 17 * 17 * 7 = 2023)
        x = chain(x, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)  # (N, 2048, 8, 8)
        pool3 = x.mean(dim=(2, 3))                                          # (N, 2048): pool_3:0
        return pool3, spatial

    def logits(self, pool3):
        """The graph's softmax/logits/MatMul, pool3 @ W (N, 1008): the evaluator's Inception
        Score takes its softmax without the bias the graph adds next (fc.bias: loaded, unused)."""
        return pool3 @ self.fc.weight.T

    def features(self, batch):
        """uint8 images (N, H, W, 3) -> (pool3, spatial features), as the evaluator reads them."""
        return self(preprocess(torch.from_numpy(batch).to(self.fc.weight.device)))


#################################################################################
#             DINOv2 ViT-L/14 and dgm-eval's input, for FDD                     #
#################################################################################

def dinov2_input(batch):
    """dgm-eval's transform of uint8 images (N, H, W, 3): PIL's bicubic to 224x224 (torchvision's
    Resize of a PIL image), ToTensor's [0, 1], ImageNet's mean and std -> (N, 3, 224, 224)."""
    x = np.stack([np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC))
                  for img in batch])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
    mean, std = torch.tensor([[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]])[..., None, None]
    return (x - mean) / std


class ViTBlock(nn.Module):
    """DINOv2's pre-norm block with LayerScale: x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x))
    (LayerNorm eps 1e-6, exact GELU); dicts where the file's keys have a level more."""
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))
        self.ls1 = nn.ParameterDict(dict(gamma=nn.Parameter(torch.ones(dim))))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, 4 * dim), fc2=nn.Linear(4 * dim, dim)))
        self.ls2 = nn.ParameterDict(dict(gamma=nn.Parameter(torch.ones(dim))))

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                             # 3 x (B, heads, N, d)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + self.ls1.gamma * self.attn.proj(a)
        return x + self.ls2.gamma * self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DINOv2(nn.Module):
    """DINOv2 ViT-L/14 as torch.hub builds dinov2_vitl14 (a 37x37 position grid plus CLS, resized
    bicubically to the input's grid with scale (grid + 0.1) / 37, no antialias; no registers), with
    dinov2_vitl14_pretrain.pth's keys. Its feature: the CLS token after the final LayerNorm."""
    def __init__(self, dim=1024, depth=24, heads=16, patch=14, img_size=518):
        super().__init__()
        grid = img_size // patch
        self.patch = patch
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, dim, patch, stride=patch)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))       # for training; in the file
        self.blocks = nn.ModuleList(ViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        """(N, 3, H, W) normalised images -> CLS features (N, dim)."""
        h, w = x.shape[2] // self.patch, x.shape[3] // self.patch
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)           # (N, h*w, dim)
        grid = math.isqrt(self.pos_embed.shape[1] - 1)
        pos = self.pos_embed[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, scale_factor=((h + 0.1) / grid, (w + 0.1) / grid),
                            mode="bicubic", antialias=False)              # (1, dim, h, w)
        pos = torch.cat([self.pos_embed[:, :1], pos.flatten(2).transpose(1, 2)], dim=1)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def features(self, batch):
        """uint8 images (N, H, W, 3) -> (CLS features,)."""
        return (self(dinov2_input(batch).to(self.norm.weight.device)),)


#################################################################################
#             The released weights; images -> features, batch by batch          #
#################################################################################

def released(network, url, device="cpu"):
    """The network (a class) in eval mode with its released weights from torch's hub cache:
    downloaded there once (pytorch-fid's checked against the sha256 digits in its name) or put
    there by hand. Never random weights; a file that does not fit: load_state_dict's report."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    with torch.device("meta"):                           # no random weights to draw first
        model = network()
    try:
        with contextlib.redirect_stdout(sys.stderr):      # a download's notice; stdout: the report
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True,
                                                       weights_only=True)
        # BatchNorm's counters: unused in eval mode, not in the file
        counters = {k: torch.tensor(0) for k in model.state_dict() if k.endswith("batches_tracked")}
        model.load_state_dict({**counters, **state}, assign=True)
    except Exception as e:          # no network, a wrong hash, a damaged or foreign file: say which
        raise ValueError(f"the weights {path} ({type(e).__name__}: {' '.join(str(e).split())}); "
                         f"without network, download {url} to that path") from None
    return model.eval().requires_grad_(False).to(device)


class Images:
    """A folder's images (sorted, decoded batch by batch) or an .npz's arr_0, uint8 (N, H, W, 3),
    read as the evaluator reads it but never whole: ZipFile streams stored (np.savez) and deflated
    (np.savez_compressed) members alike. name: the argument (SAMPLES, REF), named in errors."""
    def __init__(self, path, name):
        self.path, self.name, self.files = path, name, None
        if os.path.isdir(path):
            self.files = sorted(os.path.join(path, f) for f in os.listdir(path)
                                if f.lower().endswith(IMAGE_EXTS))
            self.count = len(self.files)
        else:
            with self.arr_0() as (_, self.shape, fortran_order, dtype):
                self.count = self.shape[0]
            if dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3 or fortran_order:
                raise ValueError(f"{name} {path}: arr_0 must be uint8 (N, H, W, 3), C-ordered; "
                                 f"got {dtype} {self.shape}")
        if self.count < 2:
            raise ValueError(f"{name} {path}: {self.count} images ({'/'.join(IMAGE_EXTS)} in a "
                             f"folder); a covariance needs at least 2")

    @contextlib.contextmanager
    def arr_0(self):
        """arr_0.npy opened and read past its header -> (file, shape, fortran_order, dtype)."""
        with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            yield (f, *read(f))

    def batches(self, size):
        """uint8 (n, H, W, 3) arrays of `size` images in order (the last may hold fewer)."""
        if self.files:
            for start in range(0, self.count, size):
                images = [read_image(f, self.name) for f in self.files[start:start + size]]
                if len({image.shape for image in images}) > 1:
                    raise ValueError(f"{self.name} {self.path}: images of mixed sizes; resize "
                                     f"them to one size first")
                yield np.stack(images)
            return
        with self.arr_0() as (f, *_):
            for start in range(0, self.count, size):
                batch = np.empty((min(size, self.count - start), *self.shape[1:]), np.uint8)
                for image in batch:          # one at a time: ZipFile's read copies what it reads
                    if f.readinto(image) < image.nbytes:
                        raise ValueError(f"{self.name} {self.path}: arr_0 holds fewer than the "
                                         f"{self.count} images its header promises")
                yield batch


def read_image(path, name):
    """An image file as uint8 (H, W, 3) RGB, or an error naming it and the argument `name`."""
    try:
        return np.asarray(Image.open(path).convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:            # PIL's ways of saying "not an image"
        raise ValueError(f"{name}: cannot decode {path} ({e})") from None


@torch.inference_mode()
def extract(images, network, batch_size=50, desc=None):
    """network.features of every image, batch by batch -> float32 numpy arrays, one per feature.
    images: an Images, or any iterable of uint8 (n, H, W, 3) batches."""
    batches = images.batches(batch_size) if isinstance(images, Images) else images
    outputs = []
    # float32 convolutions as in the graph, not cuDNN's default TF32 (10-bit mantissas)
    with tqdm(total=getattr(images, "count", None), unit="img", desc=desc, disable=desc is None) \
            as bar, torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for batch in batches:
            outputs.append([f.float().cpu().numpy() for f in network.features(batch)])
            bar.update(len(batch))
    return [np.concatenate(parts) for parts in zip(*outputs)]


#################################################################################
#                  Statistics, Fréchet distance, Inception Score                #
#################################################################################

def feature_statistics(feats):
    """Mean (D,) and covariance (D, D) of features (N >= 2, D) as the evaluator takes them: np.mean
    in the features' own precision (float32 for the network's), np.cov in float64."""
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Fréchet distance of Gaussians, |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64."""
    mu1, mu2 = (np.atleast_1d(np.asarray(mu, np.float64)) for mu in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if not sigma1.shape == sigma2.shape == (len(mu1), len(mu1)) or mu1.shape != mu2.shape:
        raise ValueError(f"statistics that do not fit each other: mu {mu1.shape} and {mu2.shape}, "
                         f"sigma {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():          # near-singular (fewer samples than dimensions)
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):                # rounding's tiny imaginary parts; S1 S2's are real
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"the square root of sigma1 @ sigma2 has an imaginary part up to "
                             f"{imag:.3g}: the statistics are not valid covariances")
        covmean = covmean.real
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    if not math.isfinite(distance):
        raise ValueError("the Fréchet distance is not finite: the statistics are not covariances")
    return distance


def fid_of(batches, network, ref, world=1):
    """FID against statistics ref (mu, sigma) of the uint8 image batches, all ranks' if world > 1."""
    pool3 = extract(batches, network)[:1]                        # []: a rank without images
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, pool3)
        pool3 = sum(shares, [])
    return frechet_distance(*feature_statistics(np.concatenate(pool3)), ref["mu"], ref["sigma"])


def inception_score(logits, split_size=IS_SPLIT):
    """ADM's Inception Score: exp(E_x KL(p(y|x) || p(y))), p(y|x) the logits' softmax (N, 1008), in
    each run of split_size consecutive samples (the last may be shorter), averaged."""
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

# The evaluator computes |u|^2 - 2 u.v + |v|^2 with TensorFlow's float16 ops, each rounding its
# result: its radii are float16 numbers, which exact distances miss. Here each op rounds once, as on
# a GPU; TensorFlow's CPU adds the squares in float16 (Eigen's order): radii within 0.5 of it.

def to_half(x):
    """x (float32) rounded to the nearest float16, kept in float32: a float16 operation's result."""
    return x.half().float()


def pairwise_distances(u, v):
    """Squared distances (R, C) between features u (R, D) and v (C, D) (float32, one device) as the
    evaluator's DistanceBlock computes them: in float16 where the whole block is finite, else 32."""
    u16, v16 = to_half(u), to_half(v)
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


def manifold_radii(feats, k=NEIGHBOURS, block=DISTANCE_BLOCK):
    """Each feature's squared distance (N,) to its k-th nearest neighbour in feats (N, D), as the
    evaluator's ManifoldEstimator, blockwise: a row holds the point itself, so its (k + 1)-th."""
    radii = []
    for rows in feats.split(block):
        nearest = []
        for cols in feats.split(block):
            d = pairwise_distances(rows, cols)                   # (r, c)
            nearest.append(d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values)
        radii.append(torch.cat(nearest, dim=1).kthvalue(k + 1, dim=1).values)   # (r,)
    return torch.cat(radii)


@torch.inference_mode()
def precision_recall(ref, samples, k=NEIGHBOURS, block=DISTANCE_BLOCK, device="cpu"):
    """(precision, recall) of features samples (N, D) against ref (M, D), as the evaluator's: the
    shares of samples in some reference's ball, of references in some sample's (radius: k-th)."""
    if min(len(ref), len(samples)) < k + 1:
        raise ValueError(f"precision and recall need at least {k + 1} feature vectors per set "
                         f"(each one's ball reaches its k = {k}th neighbour)")
    ref = torch.as_tensor(ref, dtype=torch.float32, device=device)
    samples = torch.as_tensor(samples, dtype=torch.float32, device=device)
    ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sample_inside = torch.zeros(len(samples), dtype=torch.bool, device=device)
    ref_radii, sample_radii = manifold_radii(ref, k, block), manifold_radii(samples, k, block)
    for i in range(0, len(ref), block):
        for j in range(0, len(samples), block):
            # reference rows, sample columns, as the evaluator orders them
            d = pairwise_distances(ref[i:i + block], samples[j:j + block])    # (m, n)
            ref_inside[i:i + block] |= (d <= sample_radii[None, j:j + block]).any(dim=1)
            sample_inside[j:j + block] |= (d <= ref_radii[i:i + block, None]).any(dim=0)
    return sample_inside.double().mean().item(), ref_inside.double().mean().item()


#################################################################################
#                                   The command line                            #
#################################################################################

ADM_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "pool3")      # a reference batch's and --save-stats'
FDD_KEYS = ("fdd_mu", "fdd_sigma")
NETWORKS = {"inception": (FIDInceptionV3, INCEPTION_URL), "dinov2": (DINOv2, DINOV2_URL)}


def statistics(path, name, keys, network, batch_size):
    """The statistics `keys` of one input (SAMPLES or REF): those its .npz holds (as the evaluator
    reads a reference batch's), the rest from its images -> (dict, a line saying which)."""
    if not os.path.exists(path):
        raise ValueError(f"{name} {path}: no such file or folder")
    held = {}
    if os.path.isfile(path):
        try:
            with np.load(path) as f:
                held = {k: f[k] for k in keys if k in f.files}
        except (OSError, EOFError, ValueError, AttributeError, zipfile.BadZipFile) as e:
            raise ValueError(f"{name} {path}: not a readable .npz ({' '.join(str(e).split())})"
                             ) from None
    bad = [k for k, v in held.items() if v.dtype.kind not in "fiu" or not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"{name} {path}: its {', '.join(bad)} must hold finite numbers")
    missing = [k for k in keys if k not in held]
    if not missing:
        return held, f"{', '.join(keys)} from the file"
    try:
        images = Images(path, name)
    except KeyError:                                         # the zip has no arr_0.npy
        raise ValueError(f"{name} {path} holds neither {', '.join(missing)} nor images (arr_0) to "
                         f"compute them from") from None
    computed = {}
    if set(missing) & set(ADM_KEYS):
        pool3, spatial = extract(images, network("inception"), batch_size, f"{name}, Inception")
        computed.update(zip(ADM_KEYS, (*feature_statistics(pool3), *feature_statistics(spatial),
                                       pool3)))
    if set(missing) & set(FDD_KEYS):
        (cls,) = extract(images, network("dinov2"), batch_size, f"{name}, DINOv2")
        computed.update(zip(FDD_KEYS, feature_statistics(cls.astype(np.float64))))  # dgm-eval's
    held.update({k: computed[k] for k in missing})               # the file's own win
    return {k: held[k] for k in keys}, f"{', '.join(missing)} from its {images.count} images"


def main(argv=None):
    p = argparse.ArgumentParser(prog="fid.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("samples", metavar="SAMPLES", help="a folder of images or an .npz")
    p.add_argument("ref", metavar="REF", nargs="?", help="the same, e.g. ADM's reference batch "
                   "VIRTUAL_imagenet256_labeled.npz (optional with --save-stats)")
    p.add_argument("--fid-only", action="store_true", help="FID alone (pool3 statistics)")
    p.add_argument("--fdd", action="store_true", help="also FDD (DINOv2 ViT-L/14, dgm-eval's)")
    p.add_argument("--save-stats", metavar="OUT.npz", help="write SAMPLES' statistics here")
    p.add_argument("--json", action="store_true", help="the report as one JSON object")
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass")
    args = p.parse_intermixed_args(argv)
    if args.ref is None and args.save_stats is None:
        p.error("give REF to score SAMPLES against, or --save-stats OUT.npz")
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: must be at least 1")
    if args.save_stats and os.path.exists(args.save_stats):
        p.error(f"--save-stats {args.save_stats} exists: choose another file")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    @functools.cache
    def network(kind):
        """The released network "inception" or "dinov2", loaded once."""
        return released(*NETWORKS[kind], device)

    def distance(a, b, mean="mu", covariance="sigma"):
        return frechet_distance(a[mean], a[covariance], b[mean], b[covariance])

    fdd_keys = FDD_KEYS if args.fdd else ()
    ref_keys = (("mu", "sigma") if args.fid_only else ADM_KEYS) + fdd_keys
    sample_keys = ADM_KEYS + fdd_keys if args.save_stats else ref_keys
    try:
        ours, report = statistics(args.samples, "SAMPLES", sample_keys, network, args.batch_size)
        report = {"SAMPLES": report}
        if args.ref:
            ref, report["REF"] = statistics(args.ref, "REF", ref_keys, network, args.batch_size)
            report["FID"] = distance(ours, ref)
        if args.ref and not args.fid_only:
            report["sFID"] = distance(ours, ref, "mu_s", "sigma_s")
            pool3 = torch.as_tensor(ours["pool3"], dtype=torch.float32, device=device)
            report["IS"] = inception_score(network("inception").logits(pool3).cpu())
            report["Precision"], report["Recall"] = precision_recall(ref["pool3"], ours["pool3"],
                                                                     device=device)
        if args.ref and args.fdd:
            report["FDD"] = distance(ours, ref, "fdd_mu", "fdd_sigma")
    except ValueError as e:
        raise SystemExit(f"fid.py: error: {e}")
    if args.save_stats:
        with open(args.save_stats, "wb") as f:        # a file object: numpy adds no second .npz
            np.savez(f, **ours)
        print(f"saved {', '.join(ours)} of {args.samples} to {args.save_stats}", file=sys.stderr)
    print(json.dumps(report) if args.json else "\n".join(
        f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in report.items()))


if __name__ == "__main__":
    main()
