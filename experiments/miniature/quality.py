"""
The CPU miniature's instrument for sample quality: a small CNN classifier trained on the miniature's
own real images, at the resolution the models sample. Its penultimate features give a Fréchet
distance between a set of samples and the real images (lower is better), and its predictions the
share of class-conditional samples that look like their class.

    python experiments/miniature/quality.py train \\
        --data experiments/miniature/emoji_google_32.npz --image-size 16 --out classifier.pt
    python experiments/miniature/quality.py score samples.npz --classifier classifier.pt \\
        --out samples.json

    classifier = load_classifier("classifier.pt")
    measure(images, labels, classifier)     # uint8 (N, H, W, 3), (N,) -> distance, accuracy, n

This is not the papers' FID (that is fid.py: Inception-v3 features of ImageNet at 299 px, which
know little of 16-px emoji). Its numbers compare the miniature's runs with each other and with the
two bounds stored with the classifier: the floor (real images the classifier never saw) and the
ceiling (uniform noise); they mean nothing next to FIDs elsewhere.

The real images are read as train.py reads them (train.center_crop_arr to --image-size) and split
once, by class, with a fixed seed: 75% train the classifier and are the reference whose feature
statistics samples are compared with; the other 25%, never seen in training, give the held-out
accuracy and the floor.
"""
import argparse
import json
import os
import pickle
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy.linalg import LinAlgWarning

# the repository root, two folders up, for train.py and fid.py: the script runs from any folder
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from fid import feature_statistics, frechet_distance
from train import center_crop_arr

SEED = 0            # the split, the weights, the augmentation and the ceiling's noise
HELD_OUT = 0.25     # share of each class the classifier never sees: floor and held-out accuracy
EPOCHS = 15         # ~100 s on one core for the Noto set at 16 px, held-out accuracy ~0.84
BATCH = 64
LR = 2e-3
WIDTH = 32          # channels of the first stage, 2x and 4x after each pooling: 4 x WIDTH features


#################################################################################
#                     The real images, as train.py sees them                    #
#################################################################################

def real_images(path, size):
    """An .npz of uint8 images x (N, H, W, 3) and labels y -> (images (N, size, size, 3), resized as
    train.py's --image-size does, labels (N,) int64). A file that is not one is a ValueError."""
    if not os.path.isfile(path):
        raise ValueError(f"--data {path}: no such file")
    if not zipfile.is_zipfile(path):                           # an .npz is a zip of .npy files
        raise ValueError(f"--data {path}: not an .npz file (with arrays x and y)")
    with np.load(path) as f:
        if not {"x", "y"} <= set(f.files):
            found = ", ".join(f.files)
            raise ValueError(f"--data {path}: needs arrays 'x' and 'y' (found: {found})")
        x = f["x"]
        y = f["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"--data {path}: x must hold N >= 2 uint8 RGB images (N, H, W, 3) and y "
                         f"their N labels; got x {x.shape} {x.dtype}, y {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ValueError(f"--data {path}: labels y must be integers >= 0, got {y.dtype}")
    if x.shape[1:3] != (size, size):
        x = np.stack([center_crop_arr(Image.fromarray(img), size) for img in x])
    return x, y.astype(np.int64)


def split(labels):
    """A fixed split by class -> (reference indices, held-out indices), both sorted: of a class's n
    images, round(HELD_OUT * n), drawn with SEED, are held out."""
    rng = np.random.default_rng(SEED)
    reference = []
    held = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        k = round(HELD_OUT * len(members))
        held.append(members[:k])
        reference.append(members[k:])
    return np.sort(np.concatenate(reference)), np.sort(np.concatenate(held))


#################################################################################
#             The classifier, its features and the quality measure              #
#################################################################################

def conv_block(c_in, c_out):
    """3x3 convolution, BatchNorm, ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class Classifier(nn.Module):
    """A small CNN for (S, S, 3) images: three stages of two conv blocks (W, 2W, 4W channels, a 2x2
    max-pool between stages), global average pooling to 4W penultimate features, a linear head. It
    carries the feature statistics of its reference set (float64 buffers), which `measure` uses."""
    def __init__(self, num_classes, image_size, width=WIDTH):
        super().__init__()
        self.num_classes = num_classes
        self.image_size = image_size
        self.width = width
        w = width
        self.body = nn.Sequential(*conv_block(3, w), *conv_block(w, w), nn.MaxPool2d(2),
                                  *conv_block(w, 2 * w), *conv_block(2 * w, 2 * w), nn.MaxPool2d(2),
                                  *conv_block(2 * w, 4 * w), *conv_block(4 * w, 4 * w),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, num_classes)
        self.register_buffer("ref_mu", torch.zeros(4 * w, dtype=torch.float64))
        self.register_buffer("ref_sigma", torch.zeros(4 * w, 4 * w, dtype=torch.float64))

    def forward(self, x):
        """Images (B, 3, S, S) in [-1, 1] -> (penultimate features (B, 4W), logits (B, classes))."""
        feats = self.body(x)
        return feats, self.head(feats)


def to_input(images):
    """uint8 (B, S, S, 3) numpy -> float (B, 3, S, S) in [-1, 1], as train.py scales the images."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1


@torch.no_grad()
def features(images, classifier):
    """(features (N, 4W) float64, predicted classes (N,)) of uint8 images (N, S, S, 3): in eval mode
    and fixed batches of 500, so that the same images always give the same numbers."""
    classifier.eval()
    feats = []
    preds = []
    for i in range(0, len(images), 500):
        f, logits = classifier(to_input(images[i: i + 500]))
        feats.append(f.double())
        preds.append(logits.argmax(1))
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def check_images(images, labels, classifier):
    """A ValueError saying what is wrong with images and labels this classifier cannot measure."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    S = classifier.image_size
    C = classifier.num_classes
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 RGB (N, H, W, 3), got {images.dtype} "
                         f"{images.shape}")
    if images.shape[1:3] != (S, S):
        raise ValueError(f"images are {images.shape[1]}x{images.shape[2]}, the classifier's "
                         f"{S}x{S}: sample at --image-size {S}, or train a classifier at this size")
    if len(images) < 2:
        raise ValueError(f"need at least 2 images to estimate a covariance, got {len(images)}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"need one integer label per image: {len(images)} images, labels "
                         f"{labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= C:
        raise ValueError(f"labels range over {labels.min()}..{labels.max()}, but the classifier "
                         f"knows classes 0..{C - 1}")


def measure(images, labels, classifier):
    """The quality of a set of class-conditional samples, a pure function of the images and labels:
    {"distance": the Fréchet distance of their penultimate features to the reference statistics,
    "accuracy": the share the classifier assigns to their intended label, "n": how many}."""
    check_images(images, labels, classifier)
    feats, preds = features(images, classifier)
    reference = classifier.ref_mu.numpy(), classifier.ref_sigma.numpy()
    with warnings.catch_warnings():
        # features that leave a channel constant (noise, a collapsed sampler) have a singular
        # covariance: scipy's sqrtm warns, and its trace, all the distance uses, is still sound
        warnings.simplefilter("ignore", LinAlgWarning)
        distance = frechet_distance(*feature_statistics(feats), *reference)
    accuracy = float(np.mean(preds == np.asarray(labels)))
    return {"distance": distance, "accuracy": accuracy, "n": len(images)}


#################################################################################
#               Training, the floor and the ceiling, the file                   #
#################################################################################

def augment(x, generator):
    """Mirrors half the batch (train.py's generators learn mirrored images too) and shifts it by up
    to one pixel each way, edges repeated: (B, 3, S, S) -> (B, 3, S, S)."""
    B, _, S, _ = x.shape
    flip = torch.rand(B, generator=generator) < 0.5
    x = torch.where(flip.view(B, 1, 1, 1), x.flip(3), x)
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return F.pad(x, (1, 1, 1, 1), mode="replicate")[:, :, dy: dy + S, dx: dx + S]


def train_classifier(images, labels, num_classes, epochs):
    """A Classifier trained from a fixed seed on uint8 images (N, S, S, 3): AdamW, cross-entropy,
    the lr decayed to 0 on a cosine; its reference statistics are those of these images."""
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    classifier = Classifier(num_classes, images.shape[1])
    x = to_input(images)
    y = torch.from_numpy(labels)
    steps = max(1, len(x) // BATCH)                            # per epoch
    opt = torch.optim.AdamW(classifier.parameters(), lr=LR, weight_decay=5e-4)
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    for epoch in range(epochs):
        classifier.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for b in range(steps):
            idx = order[b * BATCH: (b + 1) * BATCH]
            loss = F.cross_entropy(classifier(augment(x[idx], generator))[1], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_decay.step()
            total += loss.item()
        print(f"epoch {epoch + 1}/{epochs}: training loss {total / steps:.3f}")
    mu, sigma = feature_statistics(features(images, classifier)[0])
    classifier.ref_mu.copy_(torch.from_numpy(mu))
    classifier.ref_sigma.copy_(torch.from_numpy(sigma))
    return classifier


def uniform_noise(n, size):
    """n images of uniform noise, uint8 (n, size, size, 3): the ceiling's samples."""
    return np.random.default_rng(SEED).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def save_classifier(classifier, path, **info):
    """The classifier, its reference statistics and `info` (how it was made, its bounds), written to
    a temporary file and renamed into place: an interrupted run never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {"state_dict": classifier.state_dict(), "num_classes": classifier.num_classes,
             "image_size": classifier.image_size, "width": classifier.width, **info}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_classifier(path):
    """A Classifier saved by `quality.py train`, in eval mode; the file's other entries in .info."""
    if not os.path.isfile(path):
        raise ValueError(f"--classifier {path}: no such file; make one with quality.py train")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        classifier = Classifier(state["num_classes"], state["image_size"], state["width"])
        classifier.load_state_dict(state["state_dict"])
    except (RuntimeError, EOFError, KeyError, TypeError, pickle.UnpicklingError):
        raise ValueError(f"--classifier {path}: not a classifier from quality.py train") from None
    classifier.info = {k: v for k, v in state.items() if k != "state_dict"}
    return classifier.eval()


#################################################################################
#                                      CLI                                      #
#################################################################################

def train(args):
    """quality.py train: read and split the data, train, measure the floor and the ceiling, save."""
    if args.epochs < 1:
        raise ValueError(f"--epochs {args.epochs}: must be at least 1")
    if args.image_size < 4:
        raise ValueError(f"--image-size {args.image_size}: must be at least 4 (the classifier "
                         f"pools twice by 2)")
    if os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"--out {args.out} exists: pass --overwrite to replace it, or choose "
                         f"another")
    images, labels = real_images(args.data, args.image_size)
    reference, held = split(labels)
    if len(held) < 2:
        raise ValueError(f"--data {args.data}: {len(images)} images leave {len(held)} held out; "
                         f"the floor needs at least 2")
    num_classes = int(labels.max()) + 1
    print(f"{args.data} at {args.image_size} px: {len(reference)} images train the classifier (the "
          f"reference), {len(held)} held out, {num_classes} classes; {args.epochs} epochs, "
          f"{torch.get_num_threads()} thread(s)")
    start = time.perf_counter()
    classifier = train_classifier(images[reference], labels[reference], num_classes, args.epochs)
    seconds = time.perf_counter() - start
    floor = measure(images[held], labels[held], classifier)
    ceiling = measure(uniform_noise(len(held), args.image_size), labels[held], classifier)
    save_classifier(classifier, args.out, data=args.data, epochs=args.epochs, train_seconds=seconds,
                    held_out_accuracy=floor["accuracy"], floor=floor, ceiling=ceiling)
    print(f"trained in {seconds:.0f} s; held-out accuracy {floor['accuracy']:.4f}; distance of the "
          f"held-out images (floor) {floor['distance']:.4f}, of uniform noise (ceiling) "
          f"{ceiling['distance']:.4f}, each over {floor['n']} images; wrote {args.out}")


def score(args):
    """quality.py score: measure the samples of an .npz from sample.py; print, write the result."""
    classifier = load_classifier(args.classifier)
    if not os.path.isfile(args.samples):
        raise ValueError(f"SAMPLES {args.samples}: no such file")
    if not zipfile.is_zipfile(args.samples):
        raise ValueError(f"SAMPLES {args.samples}: not an .npz file (arr_0 images, arr_1 labels, "
                         f"as sample.py --out X.npz writes)")
    with np.load(args.samples) as f:
        if not {"arr_0", "arr_1"} <= set(f.files):
            raise ValueError(f"SAMPLES {args.samples}: needs arr_0 (images) and arr_1 (labels), "
                             f"found {', '.join(f.files)}; sample with labels, as sample.py does")
        images = f["arr_0"]
        labels = f["arr_1"]
    try:
        result = measure(images, labels, classifier)
    except ValueError as e:
        raise ValueError(f"SAMPLES {args.samples}: {e}") from None
    floor = classifier.info["floor"]
    ceiling = classifier.info["ceiling"]
    print(f"{args.samples}: distance {result['distance']:.4f}, class accuracy "
          f"{result['accuracy']:.4f} over {result['n']} images (floor {floor['distance']:.4f}, "
          f"ceiling {ceiling['distance']:.4f})")
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump({"samples": args.samples, "classifier": args.classifier, **result}, f)
        os.replace(args.out + ".tmp", args.out)               # whole or absent: the runner skips it
    return result


def parse_args(argv=None):
    """The command line -> its flags: `train` or `score` and theirs."""
    p = argparse.ArgumentParser(description="The CPU miniature's quality measure: a small "
                                "classifier trained on the real images; Fréchet distance of its "
                                "features and class accuracy of samples.")
    commands = p.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train the classifier, save it with its bounds")
    t.add_argument("--data", required=True, help="an .npz with x (uint8 N x H x W x 3) and y")
    t.add_argument("--image-size", type=int, required=True, help="the pixels the models sample at")
    t.add_argument("--out", required=True, help="the classifier file to write")
    t.add_argument("--epochs", type=int, default=EPOCHS, help=f"default {EPOCHS}")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s = commands.add_parser("score", help="distance and class accuracy of an .npz of samples")
    s.add_argument("samples", metavar="SAMPLES", help="an .npz from sample.py: arr_0, arr_1 labels")
    s.add_argument("--classifier", required=True, help="a file from quality.py train")
    s.add_argument("--out", help="also write the result here, as JSON")
    return p.parse_args(argv)


def main(argv=None):
    """quality.py train or score, as the command line says; bad input is one line."""
    args = parse_args(argv)
    try:
        return train(args) if args.command == "train" else score(args)
    except ValueError as e:
        raise SystemExit(f"quality.py: error: {e}")


if __name__ == "__main__":
    main()
