"""End to end on built-in data: train, extract signatures, inspect, apply, compose, remove.

    python examples/demo.py [OUT_DIR]          # default demo-output/, about a minute on 2 cores

1. Trains the paper's set-up in miniature (`examples/digits.py`: VGG-16's 13 convs without
   BatchNorm at 1/8 width) on scikit-learn's digits at 32x32: `init` on clean images, then
   `std` (clean) and one robust model per corruption (clean and corrupted images), all from
   `init`.
2. Saves the checkpoints and extracts one signature of the 5 shallowest layers per corruption
   with the command line (`rwsfmt extract std.pt contrast.pt init.pt -o contrast.rws`), then
   shows one (`rwsfmt inspect`).
3. Patches std with the command line (`rwsfmt apply`, one signature and then all of them
   composed, each into a new file) and with the Python API (`rwsfmt.patched`, at several
   strengths and composed), prints clean and corrupted test accuracy side by side, and removes
   the patches again, checking that std comes back bit for bit.

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

CORRUPTIONS = ("contrast", "snow", "defocus_blur")
ALPHAS = (0.5, 1.0)


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


def load_model(path: str) -> torch.nn.Module:
    """A model built from the demo's recipe with the weights of a `.pt` file."""
    model = digits.PAPER.build()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="demo-output", help="output folder")
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out, seed, recipe = args.out, args.seed, digits.PAPER
    os.makedirs(out, exist_ok=True)
    path = lambda name: os.path.join(out, name)  # noqa: E731
    start = time.perf_counter()
    print(f"set-up: {recipe.describe()}; severity {args.severity}, seed {seed}")

    # 1. data and training: init, std and one robust model per corruption, all from init
    split = digits.load_digits32(seed)
    clean, labels = digits.to_tensor(split.train_images), split.train_labels
    tests = {"clean": digits.to_tensor(split.test_images)}
    for c in args.corruptions:
        tests[c] = digits.corrupted("test", c, args.severity, seed)
    bad = {c: digits.corrupted("train", c, args.severity, seed) for c in args.corruptions}
    models = digits.train_models(recipe, clean, labels, bad, seed)
    std, robust = models.std, models.robust
    for name, model in (("init", models.init), ("std", std), *robust.items()):
        torch.save(model.state_dict(), path(f"{name}.pt"))
    print(
        f"trained init, std and {len(robust)} robust models in {time.perf_counter() - start:.0f} s"
    )

    # 2. one signature per corruption, extracted with the command line; inspect the first
    for c in args.corruptions:
        rwsfmt_cli(
            "extract", path("std.pt"), path(f"{c}.pt"), path("init.pt"),
            "-o", path(f"{c}.rws"), "--name", c, "--corruption", c,
            "--severity", str(args.severity), "--dataset", "digits-32", "--quiet",
        )  # fmt: skip
    first = args.corruptions[0]
    print(f"\n$ rwsfmt inspect {path(first + '.rws')}")
    print(rwsfmt_cli("inspect", path(f"{first}.rws")))

    # 3. apply: patched files with the command line, then live patches with the Python API
    sig_files = [path(f"{c}.rws") for c in args.corruptions]
    composed_file = path("std+" + "+".join(args.corruptions) + ".pt")
    print(f"$ rwsfmt apply {path('std.pt')} {sig_files[0]} --alpha 1 -o {path(f'std+{first}.pt')}")
    print(
        rwsfmt_cli("apply", path("std.pt"), sig_files[0], "-a", "1", "-o", path(f"std+{first}.pt"))
    )
    print(f"$ rwsfmt apply {path('std.pt')} {' '.join(sig_files)} --alpha 1 -o {composed_file}")
    print(rwsfmt_cli("apply", path("std.pt"), *sig_files, "-a", "1", "-o", composed_file))

    def scores(model: torch.nn.Module) -> list[float]:
        return [digits.accuracy(model, x, split.test_labels) for x in tests.values()]

    rows = [("std", scores(std))]
    rows += [(f"robust model for {c}", scores(m)) for c, m in robust.items()]
    rows.append(
        (f"std + {first} x 1 (rwsfmt apply, file)", scores(load_model(path(f"std+{first}.pt"))))
    )
    original = {k: v.clone() for k, v in std.state_dict().items()}
    sigs = {c: rwsfmt.load(path(f"{c}.rws")) for c in args.corruptions}
    for c, sig in sigs.items():
        for alpha in ALPHAS:
            with rwsfmt.patched(std, sig, alpha):
                rows.append((f"std + {c} x {alpha:g}", scores(std)))
    with rwsfmt.patched(std, [(sig, 0.5) for sig in sigs.values()]):
        rows.append(("std + " + " + ".join(f"{c} x 0.5" for c in sigs), scores(std)))
    label = " + ".join(f"{c} x 1" for c in sigs)
    rows.append((f"std + {label} (rwsfmt apply, file)", scores(load_model(composed_file))))
    exact = all(torch.equal(v, original[k]) for k, v in std.state_dict().items())
    rows.append((f"std, patches removed ({'bit-exact' if exact else 'NOT EXACT'})", scores(std)))

    width = max(len(name) for name, _ in rows)
    header = "".join(f"{name:>13}" for name in tests)
    print(f"test accuracy, percent ({len(split.test_labels)} images, severity {args.severity})")
    print(f"{'model':<{width}}{header}")
    for name, values in rows:
        print(f"{name:<{width}}" + "".join(f"{v:13.1f}" for v in values))
    print(f"\nfiles in {out}/; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
