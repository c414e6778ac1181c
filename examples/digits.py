"""Digits-32: real images, real corruptions and small CNNs that train in seconds on a CPU.

The 1,797 8x8 digits of scikit-learn, upsampled to 32x32 RGB, corrupted with the 19
corruptions of Hendrycks & Dietterich (`imagecorruptions-imaug`), and the paper's set-up in
miniature (`Recipe`, `PAPER`): VGG-16's 13 convs without normalization at 1/8 of its widths;
init trained on clean images, then std (clean) and robust models (clean and corrupted images,
the paper's data augmentation) trained from init:

    python examples/digits.py --corruption fog --out demo-output/
    rwsfmt extract demo-output/std.pt demo-output/fog.pt demo-output/init.pt -o fog.rws

Everything is deterministic for a given seed and thread count. Needs `pip install rwsfmt[demo]`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

SIZE = 32
CLASSES = 10
PIXEL_MEAN, PIXEL_STD = 0.31, 0.32  # of the clean digits-32 pixels (every split, to 0.01)


@dataclass(frozen=True)
class Digits:
    """A deterministic train/test split: uint8 images (N, 32, 32, 3) and int64 labels (N,)."""

    train_images: np.ndarray
    train_labels: torch.Tensor
    test_images: np.ndarray
    test_labels: torch.Tensor


@functools.lru_cache(maxsize=4)
def load_digits32(seed: int = 0, test_fraction: float = 0.3) -> Digits:
    """scikit-learn digits resized to 32x32 (bilinear), grey copied to RGB, split by `seed`."""
    from sklearn.datasets import load_digits

    data = load_digits()
    small = torch.from_numpy(data.images).float()[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    big = F.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    rgb = (big.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    images = rgb.permute(0, 2, 3, 1).contiguous().numpy()  # (N, 32, 32, 3) uint8
    labels = torch.from_numpy(data.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).numpy()
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Digits(images[train], labels[train], images[test], labels[test])


def corruption_names() -> tuple[str, ...]:
    """The 19 corruptions of ImageNet-C (Hendrycks & Dietterich), in their usual order."""
    from imagecorruptions import get_corruption_names

    return tuple(get_corruption_names("all"))


def corrupt_images(
    images: np.ndarray, corruption: str, severity: int = 5, seed: int = 0
) -> np.ndarray:
    """Apply one ImageNet-C corruption to every uint8 (N, H, W, 3) image, deterministically.

    The corruptions draw from NumPy's global generator, so it is seeded here and restored;
    the two that ignore it (impulse_noise and glass_blur draw fresh OS entropy unless given
    `seed=`) get a seed per image drawn from it.
    """
    from imagecorruptions import corrupt, corruption_dict

    takes_seed = "seed" in inspect.signature(corruption_dict[corruption]).parameters

    def one(image: np.ndarray) -> np.ndarray:
        extra = {"seed": int(np.random.randint(2**31))} if takes_seed else {}
        return np.asarray(corrupt(image, severity, corruption_name=corruption, **extra))

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        out = np.stack([one(image) for image in images])
    finally:
        np.random.set_state(state)
    return np.clip(out, 0, 255).astype(np.uint8).reshape(images.shape)


@functools.cache
def corrupted(part: str, corruption: str, severity: int = 5, seed: int = 0) -> torch.Tensor:
    """The 'train' or 'test' images of split `seed` with one corruption, as float (N, 3, 32, 32).

    Cached: a study over 19 corruptions computes each once. The training images' corruption
    is seeded with `seed`, the test images' with `seed + 100`.
    """
    digits = load_digits32(seed)
    images = {"train": digits.train_images, "test": digits.test_images}[part]
    noise_seed = seed if part == "train" else seed + 100
    return to_tensor(corrupt_images(images, corruption, severity, noise_seed))


def keep_classes(
    images: torch.Tensor, labels: torch.Tensor, classes: range
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of `classes` only, labels renumbered from 0 (e.g. digits 5-9 as 0-4)."""
    mask = (labels >= classes.start) & (labels < classes.stop)
    return images[mask], labels[mask] - classes.start


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) images as float32 (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def held_out(
    corruption: str, severity: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The test images of split `seed`, clean and corrupted, and their labels."""
    digits = load_digits32(seed)
    bad = corrupted("test", corruption, severity, seed)
    return to_tensor(digits.test_images), bad, digits.test_labels


class MiniVGG16(nn.Module):
    """VGG-16 in miniature: its 13 3x3 convs with ReLU and 5 max-pools, no normalization.

    Widths w, w | 2w, 2w | 4w x3 | 8w x3 | 8w x3 (VGG-16's 64 ... 512 divided by 64/w), a
    pool after each group (32 pixels down to 1), then one linear head. As in VGG-16 the 5
    shallowest layers, the default selection, hold under 4% of the parameters (8,936 of
    231,218 at w = 8; VGG-16: 555,328 of 14.7M), and without BatchNorm the weights are the
    whole model. Inputs are standardized with fixed constants rather than buffers, so the
    state dict holds weights only.
    """

    def __init__(self, width: int = 8, classes: int = CLASSES) -> None:
        super().__init__()
        groups = [(width, 2), (2 * width, 2), (4 * width, 3), (8 * width, 3), (8 * width, 3)]
        layers: list[nn.Module] = []
        cin = 3
        for cout, repeat in groups:
            for _ in range(repeat):
                conv = nn.Conv2d(cin, cout, 3, padding=1)
                # He initialization: from PyTorch's default a deep plain ReLU stack barely trains
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                layers += [conv, nn.ReLU()]
                cin = cout
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - PIXEL_MEAN) / PIXEL_STD).flatten(1))


class _BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv + BatchNorm, and a 1x1 conv + BatchNorm shortcut
    when the shape changes (registered after the block's convs, as in torchvision)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class MiniResNet(nn.Module):
    """A ResNet in miniature, with BatchNorm: a 3x3 stem conv + BN, four stages of one basic
    block each (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2: 32 pixels down to 4), global
    average pooling and a linear head. 12 convs (9 on the main path, 3 shortcuts), each
    followed by BatchNorm, so the 5 shallowest layers (stem, stage 1, stage 2's first conv)
    carry weights, BN affine parameters and BN running statistics. 78,002 parameters at w = 8.
    """

    def __init__(self, width: int = 8, classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        widths = [width, 2 * width, 4 * width, 8 * width]
        blocks, cin = [], width
        for i, cout in enumerate(widths):
            blocks.append(_BasicBlock(cin, cout, stride=1 if i == 0 else 2))
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.stem((x - PIXEL_MEAN) / PIXEL_STD)))
        out = self.layers(out)
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


ARCHITECTURES: dict[str, type[nn.Module]] = {"vgg": MiniVGG16, "resnet": MiniResNet}


def conv_names(model: nn.Module) -> list[str]:
    """Names of the conv modules, shallowest first (the layers a signature patches)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    lr: float = 1e-3,
    batch_size: int = 64,
) -> nn.Module:
    """AdamW (weight decay 0.01) with cosine decay; batches shuffled by `seed`. In place.

    AdamW trains the plain (unnormalized) `MiniVGG16` for every seed we tried, where SGD
    with momentum diverged for some.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * -(-len(labels) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=gen).split(batch_size):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(images[idx]), labels[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent, in eval mode (BatchNorm uses its running statistics)."""
    model.eval()
    predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(512)])
    return 100.0 * float((predictions == labels).float().mean())


@dataclass(frozen=True)
class Recipe:
    """How models are built and trained: the paper's set-up in miniature by default.

    `ARCHITECTURES[arch](width, classes)`; `init` trains on clean images for `init_epochs`,
    then std (clean images) and every robust model (the clean and the corrupted images, each
    once per epoch: the paper's data augmentation) train from init for `epochs` each.
    """

    arch: str = "vgg"
    width: int = 8
    lr: float = 1e-3
    init_epochs: int = 8
    epochs: int = 8

    def build(self, classes: int = CLASSES) -> nn.Module:
        """A new, untrained model (its initialization follows torch's global seed)."""
        return ARCHITECTURES[self.arch](self.width, classes)

    def describe(self) -> str:
        """One line of settings, for printed reports."""
        return (
            f"{self.arch} width {self.width}, AdamW lr {self.lr:g}, init {self.init_epochs} "
            f"epochs on clean images, then std and robust {self.epochs} epochs each from init"
        )


PAPER = Recipe()


def train_init(
    recipe: Recipe, images: torch.Tensor, labels: torch.Tensor, seed: int, classes: int = CLASSES
) -> nn.Module:
    """The common starting point: a model seeded by `seed`, trained on clean images."""
    torch.manual_seed(seed)
    model = recipe.build(classes)
    return train(model, images, labels, epochs=recipe.init_epochs, seed=seed, lr=recipe.lr)


def train_from(
    init: nn.Module,
    recipe: Recipe,
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
) -> nn.Module:
    """A copy of `init` trained on `images` for `recipe.epochs` (batches shuffled by `seed`)."""
    model = copy.deepcopy(init)
    return train(model, images, labels, epochs=recipe.epochs, seed=seed, lr=recipe.lr)


def robust_data(
    clean: torch.Tensor, corrupted: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's data augmentation: every training image clean and corrupted, once each."""
    return torch.cat([clean, corrupted]), labels.repeat(2)


@dataclass
class Models:
    """init, then std (clean images) and one robust model per corruption (clean and
    corrupted images), all trained from init."""

    init: nn.Module
    std: nn.Module
    robust: dict[str, nn.Module]


def train_models(
    recipe: Recipe,
    clean: torch.Tensor,
    labels: torch.Tensor,
    corrupted_images: Mapping[str, torch.Tensor],
    seed: int,
    classes: int = CLASSES,
) -> Models:
    """The models the method needs: init (seed `seed`), std (batches by `seed + 1`) and a
    robust model for each corruption of `corrupted_images`, in order (`seed + 2 + i`)."""
    init = train_init(recipe, clean, labels, seed, classes)
    std = train_from(init, recipe, clean, labels, seed + 1)
    robust = {
        c: train_from(init, recipe, *robust_data(clean, bad, labels), seed + 2 + i)
        for i, (c, bad) in enumerate(corrupted_images.items())
    }
    return Models(init, std, robust)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corruption", default="fog")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo-output")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    split = load_digits32(args.seed)
    bad = corrupted("train", args.corruption, args.severity, args.seed)
    models = train_models(
        PAPER, to_tensor(split.train_images), split.train_labels, {args.corruption: bad}, args.seed
    )
    robust = models.robust[args.corruption]
    for role, model in (("init", models.init), ("std", models.std), (args.corruption, robust)):
        torch.save(model.state_dict(), os.path.join(args.out, f"{role}.pt"))
    test, bad, labels = held_out(args.corruption, args.severity, args.seed)
    for role, model in (("std", models.std), ("robust", robust)):
        print(
            f"{role:>6}: clean {accuracy(model, test, labels):5.1f}%  "
            f"{args.corruption} {accuracy(model, bad, labels):5.1f}%"
        )
    print(f"saved init.pt, std.pt and {args.corruption}.pt in {args.out}/")


if __name__ == "__main__":
    main()
