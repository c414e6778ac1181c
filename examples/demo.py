"""End to end on built-in data: train, extract signatures, inspect, apply, compose, remove.

    python examples/demo.py [OUT_DIR]          # default demo-output/, about a minute on 2 cores

1. Trains the tiny CNN of `examples/digits.py` on scikit-learn's digits (32x32 RGB):
   `init`, then `std` (clean) and one robust model per corruption, all from `init`.
2. Saves the checkpoints and extracts one signature per corruption with the command line
   (`rwsfmt extract std.pt fog.pt init.pt -o fog.rws`), then shows one (`rwsfmt inspect`).
3. Applies the signatures with `rwsfmt apply` (a patched file) and with the Python API
   (`rwsfmt.patched`, at several strengths and composed), and prints clean and corrupted
   test accuracy side by side; the last row is the model after the patches are removed.

No download: the digits ship inside scikit-learn, the corruptions are computed locally.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import digits  # noqa: E402 - examples/digits.py, beside this file

import rwsfmt  # noqa: E402

ALPHAS = (0.4, 0.8, 1.2)


def rwsfmt_cli(*args: str) -> str:
    """Run `python -m rwsfmt ARGS` as a user would; fail loudly with its message."""
    env = {**os.environ, "COLUMNS": "150"}  # tables as wide as a terminal's, not 80
    proc = subprocess.run(
        [sys.executable, "-m", "rwsfmt", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"rwsfmt {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="demo-output", help="output folder")
    parser.add_argument("--corruptions", nargs="+", default=["fog", "contrast"])
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out, seed = args.out, args.seed
    os.makedirs(out, exist_ok=True)
    path = lambda name: os.path.join(out, name)  # noqa: E731
    start = time.perf_counter()

    # 1. data and training: init, std and one robust model per corruption, all from init
    data = digits.load_digits32(seed)
    clean_train = digits.to_tensor(data.train_images)
    tests = {"clean": digits.to_tensor(data.test_images)}
    for c in args.corruptions:
        tests[c] = digits.to_tensor(
            digits.corrupt_images(data.test_images, c, args.severity, seed + 100)
        )
    torch.manual_seed(seed)
    init = digits.train(digits.TinyCNN(), clean_train, data.train_labels, epochs=5, seed=seed)
    torch.save(init.state_dict(), path("init.pt"))

    def from_init(images: torch.Tensor, train_seed: int) -> digits.TinyCNN:
        model = digits.TinyCNN()
        model.load_state_dict(init.state_dict())
        return digits.train(model, images, data.train_labels, epochs=10, seed=train_seed)

    std = from_init(clean_train, seed + 1)
    torch.save(std.state_dict(), path("std.pt"))
    robust = {}
    for i, c in enumerate(args.corruptions):
        images = digits.corrupt_images(data.train_images, c, args.severity, seed)
        robust[c] = from_init(digits.to_tensor(images), seed + 2 + i)
        torch.save(robust[c].state_dict(), path(f"{c}.pt"))
    print(
        f"trained init, std and {len(robust)} robust models in {time.perf_counter() - start:.0f} s"
    )

    # 2. one signature per corruption, extracted with the command line; inspect the first
    for c in args.corruptions:
        rwsfmt_cli(
            "extract", path("std.pt"), path(f"{c}.pt"), path("init.pt"),
            "-o", path(f"{c}.rws"), "--name", c, "--corruption", c,
            "--severity", str(args.severity), "--dataset", "digits-32",
        )  # fmt: skip
    first = args.corruptions[0]
    print(f"\n$ rwsfmt inspect {path(first + '.rws')}")
    print(rwsfmt_cli("inspect", path(f"{first}.rws")))

    # 3. apply: a patched file with the command line, then live patches with the Python API
    print(rwsfmt_cli("apply", path("std.pt"), path(f"{first}.rws"), "-a", "0.8",
                     "-o", path(f"std+{first}.pt")))  # fmt: skip
    from_file = digits.TinyCNN()
    from_file.load_state_dict(torch.load(path(f"std+{first}.pt"), weights_only=True))

    def scores(model: torch.nn.Module) -> list[float]:
        return [digits.accuracy(model, x, data.test_labels) for x in tests.values()]

    rows = [("std", scores(std))]
    rows += [(f"robust ({c})", scores(m)) for c, m in robust.items()]
    rows.append((f"std + {first} x 0.8 (rwsfmt apply, file)", scores(from_file)))
    sigs = {c: rwsfmt.load(path(f"{c}.rws")) for c in args.corruptions}
    original = {k: v.clone() for k, v in std.state_dict().items()}
    for c, sig in sigs.items():
        for alpha in ALPHAS:
            with rwsfmt.patched(std, [(sig, alpha)]):
                rows.append((f"std + {c} x {alpha}", scores(std)))
    composed = [(sig, 0.8) for sig in sigs.values()]
    with rwsfmt.patched(std, composed):
        label = " + ".join(f"{c} x 0.8" for c in sigs)
        rows.append((f"std + {label}", scores(std)))
    exact = all(torch.equal(v, original[k]) for k, v in std.state_dict().items())
    rows.append((f"std, patches removed ({'bit-exact' if exact else 'NOT EXACT'})", scores(std)))

    width = max(len(name) for name, _ in rows)
    header = "".join(f"{name:>10}" for name in tests)
    print(f"test accuracy, percent (severity {args.severity})\n{'model':<{width}}{header}")
    for name, values in rows:
        print(f"{name:<{width}}" + "".join(f"{v:10.1f}" for v in values))
    print(f"\nfiles in {out}/; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
