"""Measure the end-to-end test's set-up (tests/test_digits_e2e.py) over seeds and thread counts.

Training diverges between machines (other SIMD paths, other thread counts, other float
rounding), so a threshold in that test must hold for every draw, not for one seed. This script
trains `digits.PAPER_LIKE` trios for each seed and torch thread count, extracts 32- and 8-bit
signatures of the default 5 shallowest layers, patches std at alpha 1 and prints one row each:

  * accuracy of std, robust and std patched (32 / 8 bit) on the corrupted test images
    (`_bad`), and of std and std patched at 32 bit on the clean ones (`_clean`);
  * gain32, gain8: patched minus std on corrupted images, in points;
  * recovered: gain32 / (robust - std), the share of the robust model's advantage patched in;
  * kept8: gain8 / gain32, what 8-bit storage keeps of the float32 gain;

then the minimum, mean, maximum and standard deviation of each column. Other SIMD paths can
be simulated with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` or with
`ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41` (the capability in use is printed).

    python benchmarks/digits_seeds.py [--seeds 0 1 2 3 4] [--threads 1 2] [--alpha 1.0]

Extraction here calls `rwsfmt.extract`, the function behind `rwsfmt extract`, with the same
defaults. About 15 s per row on 2 idle cores (AVX-512), 35 s on the SSE4.1 path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import digits  # noqa: E402 - examples/digits.py

import rwsfmt  # noqa: E402

COLUMNS = (
    "std_clean", "std_bad", "robust_bad", "p32_clean", "p32_bad", "p8_bad",
    "gain32", "gain8", "recovered", "kept8", "seconds",
)  # fmt: skip


def measure(corruption: str, seed: int, alpha: float) -> dict[str, float]:
    """One row: train the trio for `seed`, extract, patch std and score it (see the module doc)."""
    start = time.perf_counter()
    trio = digits.train_trio(corruption, seed=seed, recipe=digits.PAPER_LIKE)
    clean, bad, labels = digits.held_out(corruption, seed=seed)
    std = trio.std
    row = {
        "std_clean": digits.accuracy(std, clean, labels),
        "std_bad": digits.accuracy(std, bad, labels),
        "robust_bad": digits.accuracy(trio.robust, bad, labels),
    }
    for bits in (32, 8):
        sig = rwsfmt.extract(trio.std, trio.robust, trio.init, bits=bits)
        with rwsfmt.patched(std, sig, alpha):
            row[f"p{bits}_clean"] = digits.accuracy(std, clean, labels)
            row[f"p{bits}_bad"] = digits.accuracy(std, bad, labels)
    row["gain32"] = row["p32_bad"] - row["std_bad"]
    row["gain8"] = row["p8_bad"] - row["std_bad"]
    row["recovered"] = _ratio(row["gain32"], row["robust_bad"] - row["std_bad"])
    row["kept8"] = _ratio(row["gain8"], row["gain32"])
    row["seconds"] = time.perf_counter() - start
    return row


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corruption", default="contrast")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--alpha", type=float, default=1.0)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{args.corruption} severity 5, alpha {args.alpha}; accuracies in percent"
    )
    header = f"{'seed':>4} {'thr':>3} " + " ".join(f"{c:>10}" for c in COLUMNS)
    print(header)
    rows = []
    for seed in args.seeds:
        for threads in args.threads:
            torch.set_num_threads(threads)
            row = measure(args.corruption, seed, args.alpha)
            rows.append(row)
            print(f"{seed:>4} {threads:>3} " + " ".join(f"{row[c]:10.3g}" for c in COLUMNS))
    stats = {"min": min, "mean": statistics.fmean, "max": max}
    if len(rows) > 1:
        stats["sd"] = statistics.stdev
    for name, stat in stats.items():
        print(f"{name:>8} " + " ".join(f"{stat(r[c] for r in rows):10.3g}" for c in COLUMNS))


if __name__ == "__main__":
    main()
