"""Digits-32: real images, real corruptions and a tiny CNN that trains in seconds on a CPU.

The 1,797 8x8 digits of scikit-learn, upsampled to 32x32 RGB, corrupted with the 19
corruptions of Hendrycks & Dietterich (`imagecorruptions-imaug`), and a 5-conv CNN with
BatchNorm. Used by the end-to-end test and the README demo:

    python examples/digits.py --corruption fog --out demo-output/
    rwsfmt extract demo-output/std.pt demo-output/fog.pt demo-output/init.pt -o fog.rws

Everything is deterministic for a given seed and thread count. Needs `pip install rwsfmt[demo]`.
"""

from __future__ import annotations

import argparse
import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

SIZE = 32
CLASSES = 10


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


def corrupt_images(
    images: np.ndarray, corruption: str, severity: int = 5, seed: int = 0
) -> np.ndarray:
    """Apply one ImageNet-C corruption to every uint8 (N, H, W, 3) image, deterministically.

    The corruptions draw from NumPy's global generator, so it is seeded here and restored.
    """
    from imagecorruptions import corrupt

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        out = np.stack(
            [
                np.asarray(corrupt(img, corruption_name=corruption, severity=severity))
                for img in images
            ]
        )
    finally:
        np.random.set_state(state)
    return np.clip(out, 0, 255).astype(np.uint8).reshape(images.shape)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) images as float32 (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


class TinyCNN(nn.Module):
    """Five 3x3 convs (each followed by BatchNorm and ReLU), global pooling, a linear head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        plan = [
            (3, w // 2, True),
            (w // 2, w, True),
            (w, w, False),
            (w, 2 * w, True),
            (2 * w, 2 * w, False),
        ]
        layers: list[nn.Module] = []
        for cin, cout, pool in plan:
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * w, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


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
    lr: float = 0.05,
    batch_size: int = 64,
) -> nn.Module:
    """SGD with momentum and cosine decay; batches shuffled by `seed`. Trains in place."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
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


@dataclass
class Trio:
    """init, then std (clean data) and robust (corrupted data) each trained from init."""

    init: TinyCNN
    std: TinyCNN
    robust: TinyCNN


def train_trio(
    corruption: str,
    *,
    severity: int = 5,
    init_epochs: int = 5,
    epochs: int = 10,
    seed: int = 0,
    width: int = 16,
) -> Trio:
    """Train the three models the method needs, on digits-32 and one corruption."""
    digits = load_digits32(seed)
    clean = to_tensor(digits.train_images)
    corrupted = to_tensor(corrupt_images(digits.train_images, corruption, severity, seed))
    torch.manual_seed(seed)
    init = train(TinyCNN(width), clean, digits.train_labels, epochs=init_epochs, seed=seed)
    std, robust = TinyCNN(width), TinyCNN(width)
    std.load_state_dict(init.state_dict())
    robust.load_state_dict(init.state_dict())
    train(std, clean, digits.train_labels, epochs=epochs, seed=seed + 1)
    train(robust, corrupted, digits.train_labels, epochs=epochs, seed=seed + 2)
    return Trio(init, std, robust)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corruption", default="fog")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo-output")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    trio = train_trio(args.corruption, severity=args.severity, seed=args.seed)
    for role, model in (("init", trio.init), ("std", trio.std), (args.corruption, trio.robust)):
        torch.save(model.state_dict(), os.path.join(args.out, f"{role}.pt"))
    digits = load_digits32(args.seed)
    test = to_tensor(digits.test_images)
    bad = to_tensor(
        corrupt_images(digits.test_images, args.corruption, args.severity, args.seed + 100)
    )
    for role, model in (("std", trio.std), ("robust", trio.robust)):
        print(
            f"{role:>6}: clean {accuracy(model, test, digits.test_labels):5.1f}%  "
            f"{args.corruption} {accuracy(model, bad, digits.test_labels):5.1f}%"
        )
    print(f"saved init.pt, std.pt and {args.corruption}.pt in {args.out}/")


if __name__ == "__main__":
    main()
