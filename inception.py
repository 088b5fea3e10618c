"""
The 2015 Inception graph that ADM's evaluator, and so both papers, score with, in plain PyTorch: its
input preprocessing, the Inception-v3 network and the released weights; fid.py computes the scores.

    model = load_inception()        # pt_inception-2015-12-05-6726825d.pth: --weights,
                                    # $FID_WEIGHTS or torch's hub cache
    x = preprocess(images)          # uint8 (N, H, W, 3) -> the graph's input (N, 3, 299, 299)
    pool3, spatial = model(x)       # (N, 2048): FID, IS, precision, recall; (N, 2023): sFID
    logits = model.logits(pool3)    # (N, 1008), what the evaluator's Inception Score reads

The graph (inception-2015-12-05, classify_image_graph_def.pb) takes images of any size in 0..255,
resizes them inside itself with TF1's ResizeBilinear and maps them with (x - 128) / 128;
`preprocess` does exactly that, bit-exact against TensorFlow's own ops
(tests/fixtures/adm_evaluator_ops.npz).
pytorch-fid resizes with F.interpolate and maps with x / 127.5 - 1 instead, which moves the input by
up to 0.25 at 256 px (more for smaller images), so its scores are not the papers'; it is not used.

The network is the graph's Inception-v3 as ported by pytorch-fid, with the key names of its weight
file, so that file loads as is. It differs from torchvision's Inception-v3 in three places: average
pools do not count padding, the last block (Mixed_7c) max-pools in its pool branch, and the
classifier has 1008 outputs (the 2015 graph's: the 1000 ImageNet classes and unused extra ones).

References:
- Szegedy et al., "Rethinking the Inception Architecture for Computer Vision" (CVPR 2016,
  arXiv 1512.00567).
- Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis" (NeurIPS 2021, arXiv
  2105.05233): guided-diffusion's evaluations/evaluator.py reads pool_3:0 and mixed_6/conv:0.
- pytorch-fid (github.com/mseitzer/pytorch-fid): the weight file and the FID-specific blocks.
- torch-fidelity (github.com/toshas/torch-fidelity): utils/util_convert_inception_weights.py names
  the module each graph node became (mixed_6/conv -> Mixed_6d.branch1x1), the basis of the sFID
  mapping below.
"""
import os
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               + WEIGHTS_NAME)
SIZE = 299                                          # the graph's input resolution

#################################################################################
#             The graph's input: TF1 bilinear resize, then (x - 128) / 128      #
#################################################################################

def resize_bilinear_tf1(x, size=SIZE):
    """TF1's ResizeBilinear (align_corners=False, half_pixel_centers=False) of x (N, C, H, W) to
    size × size."""
    def taps(n_in):
        # Output pixel i reads source coordinate i * n_in / size, with no half-pixel shift (that of
        # F.interpolate's align_corners=False), in float32 as TensorFlow computes it.
        scale = torch.tensor(n_in, dtype=torch.float32, device=x.device) / size
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale
        frac = src - src.floor()
        low = src.long()                                         # floor: src is not negative
        return low, (low + 1).clamp(max=n_in - 1), frac
    y0, y1, fy = taps(x.shape[2])
    x0, x1, fx = taps(x.shape[3])
    top = x[:, :, y0]                                            # (N, C, size, W)
    bottom = x[:, :, y1]
    # TensorFlow's order of operations: along each of the two rows first, then between them
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * fx      # (N, C, size, size)
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * fx
    return top + (bottom - top) * fy[:, None]


def preprocess(images):
    """Images (N, H, W, 3), uint8 or float in 0..255, any size -> the graph's input
    (N, 3, 299, 299), float32."""
    x = images.permute(0, 3, 1, 2).float()                       # (N, 3, H, W) in 0..255
    x = resize_bilinear_tf1(x)                                   # (N, 3, 299, 299)
    return (x - 128) / 128                                       # the graph's Sub and Mul nodes

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
#                     The released weights, found and checked                   #
#################################################################################

def find_weights(weights=None):
    """The weight file's path: the argument, else $FID_WEIGHTS (both for offline use), else
    WEIGHTS_URL's file in torch's hub cache, where the first use downloads it with a progress bar
    (as pytorch-fid, clean-fid and torch-fidelity do); its sha256 must start with the hex digits in
    its name (torch.hub's convention: ...-6726825d.pth)."""
    hint = (f"FID needs the Inception weights {WEIGHTS_NAME} (the FID Inception-v3 used by "
            f"pytorch-fid; random weights are never used). Download it from {WEIGHTS_URL} and pass "
            f"--weights PATH or set FID_WEIGHTS=PATH.")
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
    # torch.hub writes a temporary file and moves it into place only once verified
    try:
        torch.hub.download_url_to_file(WEIGHTS_URL, cached, hash_prefix=prefix, progress=True)
    except OSError as e:                                         # no network, HTTP errors
        raise FileNotFoundError(f"no Inception weights given, none at {cached}, and the download "
                                f"failed ({e}). {hint}") from None
    except RuntimeError:                                         # the hash does not match
        raise ValueError(f"{WEIGHTS_URL}: the downloaded file's sha256 does not start with "
                         f"{prefix}, so it was deleted; try again, or: {hint}") from None
    print(f"sha256 starts with {prefix} as expected; saved {cached}", file=sys.stderr)
    return cached


def load_inception(weights=None, device='cpu'):
    """The FID Inception-v3 in eval mode with the weights of WEIGHTS_NAME."""
    path = find_weights(weights)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled objects beyond tensors
        raise ValueError(f"Inception weights {path}: not a PyTorch state dict of tensors "
                         f"({type(e).__name__}); expected {WEIGHTS_NAME} from {WEIGHTS_URL}") from e
    if not isinstance(state, dict):
        raise ValueError(f"Inception weights {path}: expected a state dict, got "
                         f"{type(state).__name__}")
    model = FIDInceptionV3()
    # BatchNorm's num_batches_tracked counters are unused in eval mode; the released file has none.
    state = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}
    want = {k: v.shape for k, v in model.state_dict().items()
            if not k.endswith('num_batches_tracked')}
    missing = sorted(want.keys() - state.keys())
    unexpected = sorted(state.keys() - want.keys())
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(want[k])})"
             for k in sorted(want.keys() & state.keys()) if state[k].shape != want[k]]
    if missing or unexpected or wrong:
        kinds = [('missing keys', missing), ('unexpected keys', unexpected),
                 ('wrong shapes', wrong)]
        problems = [f"{kind} ({len(ks)}): {', '.join(ks[:5])}{', ...' if len(ks) > 5 else ''}"
                    for kind, ks in kinds if ks]
        raise ValueError(f"Inception weights {path} do not match the FID Inception-v3 "
                         f"({WEIGHTS_NAME}): " + '; '.join(problems))
    model.load_state_dict(state, strict=False)  # strict=False only for the counters, checked above
    return model.eval().requires_grad_(False).to(device)
