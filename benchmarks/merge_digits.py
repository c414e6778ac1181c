"""Merged signatures on digits-32: sum, mean, TIES and DARE side by side.

    python benchmarks/merge_digits.py      # about 3 minutes on 2 cores (1 thread)

Set-up (`examples/digits.py`, recipe `PAPER`, seed 0): VGG-16's 13 convs at 1/8 width; init
on clean digits-32, then std (clean) and one robust model per corruption (clean and
corrupted images, severity 5), all from init. Each robust model's 8-bit shallow-5 signature
(Eq. 1) is saved as a `.rws` file; for each pair of corruptions the two files are merged
with every method of `rwsfmt merge` (the library function behind it, reading the files),
and the merged signature is patched into std at each alpha of `ALPHAS`. Accuracy in percent
on the 539 held-out images, clean and with each corruption of the pair. Also measured: the
largest difference between `rwsfmt.merge(method="ties")` at 32 bits and
`peft.utils.merge_utils.ties` on the same float32 signatures (when PEFT is installed).

Writes `merge_digits.md` to `--out` (default `benchmarks/results/`). Deterministic for a
given seed, thread count and CPU code path.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import digits  # noqa: E402 - examples/digits.py

import rwsfmt  # noqa: E402

SEED = 0
SEVERITY = 5
LAYERS = 5
PAIRS = (("contrast", "snow"), ("gaussian_noise", "frost"))
ALPHAS = (0.5, 1.0, 1.5, 2.0)
# (row label, merge keyword arguments); weights are 1 each
METHODS: tuple[tuple[str, dict], ...] = (
    ("sum", {"method": "sum"}),
    ("mean", {"method": "mean"}),
    ("ties, density 0.5 (default)", {"method": "ties"}),
    ("ties, density 0.2 (TIES paper)", {"method": "ties", "density": 0.2}),
    ("dare, density 0.5 (default), seed 0", {"method": "dare"}),
    ("dare, density 0.2, seed 0", {"method": "dare", "density": 0.2}),
    ("dare_ties, density 0.5, seed 0", {"method": "dare_ties"}),
)
DARE_SEEDS = range(5)


def log(message: str) -> None:
    """Progress on stderr, so that stdout carries the report only."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Tests:
    """The held-out images: clean and each corruption, with their labels."""

    images: dict[str, torch.Tensor]  # "clean" or a corruption name
    labels: torch.Tensor

    def scores(
        self,
        std: torch.nn.Module,
        patch: Sequence[tuple[rwsfmt.Signature, float]],
        sets: Sequence[str],
    ) -> list[float]:
        """Accuracy of std patched with `patch` (nothing when empty) on each of `sets`."""
        with rwsfmt.patched(std, list(patch)) if patch else contextlib.nullcontext():
            return [digits.accuracy(std, self.images[s], self.labels) for s in sets]


def peft_difference(sigs: Sequence[rwsfmt.Signature]) -> float | None:
    """Largest |rwsfmt ties - PEFT ties| over the delta tensors of 32-bit merges (two
    densities, two weightings), or None without PEFT."""
    try:
        from peft.utils.merge_utils import ties
    except ImportError:
        return None
    exact = rwsfmt.QuantConfig(bits=32)
    worst = 0.0
    for density, weights in itertools.product((0.2, 0.5), ([1.0, 1.0], [0.7, 1.3])):
        merged = rwsfmt.merge(sigs, weights, method="ties", density=density, quant=exact)
        for name in merged.names:
            if merged.info(name).kind == "delta":
                inputs = [s.tensor(name) for s in sigs]
                ref = ties(inputs, torch.tensor(weights), density, "total")
                worst = max(worst, float((merged.tensor(name) - ref).abs().max()))
    return worst


@dataclass
class PairResult:
    """One pair's accuracies: rows of (label, {alpha: [clean, first, second]})."""

    pair: tuple[str, str]
    std: list[float]
    rows: list[tuple[str, dict[float, list[float]]]]
    dare_seeds: list[list[float]]  # the default dare at alpha 1, one entry per seed
    peft: float | None

    def beats_std(self, scores: list[float]) -> bool:
        """Better than std on both corruptions at once."""
        return all(x > b for x, b in zip(scores[1:], self.std[1:], strict=True))


def study(pair: tuple[str, str], sigs: dict[str, rwsfmt.Signature], std, tests: Tests):
    """Every single signature and merge of `pair`, patched into std at every alpha."""
    sets = ["clean", *pair]

    def sweep(sig: rwsfmt.Signature) -> dict[float, list[float]]:
        return {a: tests.scores(std, [(sig, a)], sets) for a in ALPHAS}

    rows = [(f"{c} alone", sweep(sigs[c])) for c in pair]
    both = [sigs[c] for c in pair]
    rows += [(label, sweep(rwsfmt.merge(both, **kwargs))) for label, kwargs in METHODS]
    seeds = [
        tests.scores(std, [(rwsfmt.merge(both, method="dare", seed=s), 1.0)], sets)
        for s in DARE_SEEDS
    ]
    return PairResult(pair, tests.scores(std, [], sets), rows, seeds, peft_difference(both))


def cells(scores: Sequence[float]) -> str:
    return " / ".join(f"{x:.1f}" for x in scores)


def report(results: Sequence[PairResult], wall: float) -> list[str]:
    """The markdown report: alpha 1 side by side, the alpha sweep, DARE's seeds, PEFT."""
    lines = [
        "# Merged signatures on digits-32: sum, mean, TIES and DARE",
        "",
        "Generated by `python benchmarks/merge_digits.py` (writes this file). Do not edit by hand.",
        "",
        f"- set-up: {digits.PAPER.describe()}; robust models on clean + corrupted images "
        f"(severity {SEVERITY}), seed {SEED}; 8-bit shallow-{LAYERS} signatures (Eq. 1) saved as "
        "`.rws` files, merged from the files with weights 1 each (8-bit, as the inputs)",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}), Python {platform.python_version()}",
        f"- wall time: {wall:.0f} s",
        "- accuracy in percent on the 539 held-out images; *both > std*: better than std on both "
        "corruptions of the pair at once. The merged signature is patched into std with "
        "`rwsfmt.patched` at strength alpha: for `sum` alpha 1 adds each signature once; "
        "`mean` halves each; TIES averages the entries that agree, so alpha (or `--lambda`) 2 "
        "puts it on `sum`'s scale.",
        "",
        "## At alpha 1",
        "",
    ]
    header, rule = "| merge |", "|---|"
    for r in results:
        header += f" clean | {r.pair[0]} | {r.pair[1]} | both > std |"
        rule += "---:|---:|---:|:---:|"
    lines += [header, rule]
    body = [("std", [r.std for r in results])]
    body += [
        ("first alone" if i == 0 else "second alone", [r.rows[i][1][1.0] for r in results])
        for i in range(2)
    ]
    for j, (label, _) in enumerate(METHODS, start=2):
        body.append((label, [r.rows[j][1][1.0] for r in results]))
    for label, per_pair in body:
        row = f"| {label} |"
        for r, scores in zip(results, per_pair, strict=True):
            mark = "" if label == "std" else ("yes" if r.beats_std(scores) else "**no**")
            row += " " + " | ".join(f"{x:.1f}" for x in scores) + f" | {mark} |"
        lines.append(row)
    lines += [
        "",
        "*first alone*, *second alone*: the pair's first (contrast, gaussian_noise) or second "
        "(snow, frost) signature on its own.",
        "",
        "## Alpha sweep",
        "",
        "Each cell: clean / first corruption / second corruption; bold: not better than std on "
        "both corruptions.",
    ]
    for r in results:
        lines += [
            "",
            f"### {r.pair[0]} + {r.pair[1]} (std: {cells(r.std)})",
            "",
            "| merge | " + " | ".join(f"alpha {a:g}" for a in ALPHAS) + " |",
            "|---|" + "---:|" * len(ALPHAS),
        ]
        for label, sweep in r.rows:
            shown = [cells(v) if r.beats_std(v) else f"**{cells(v)}**" for v in sweep.values()]
            lines.append(f"| {label} | " + " | ".join(shown) + " |")
    lines += [
        "",
        f"## DARE's randomness (default density, alpha 1, seeds {DARE_SEEDS.start}-"
        f"{DARE_SEEDS.stop - 1})",
        "",
        "| pair | clean | first | second | both > std |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lo, hi = (list(map(f, zip(*r.dare_seeds, strict=True))) for f in (min, max))
        won = sum(r.beats_std(s) for s in r.dare_seeds)
        spans = " | ".join(f"{a:.1f}-{b:.1f}" for a, b in zip(lo, hi, strict=True))
        lines.append(f"| {' + '.join(r.pair)} | {spans} | {won} of {len(r.dare_seeds)} |")
    lines += ["", "## TIES against PEFT", ""]
    for r in results:
        diff = "PEFT not installed" if r.peft is None else f"{r.peft:.3g}"
        lines.append(
            f"- {' + '.join(r.pair)}: largest absolute difference between "
            '`rwsfmt.merge(method="ties")` (32-bit output) and '
            '`peft.utils.merge_utils.ties(..., majority_sign_method="total")` on the same '
            f"float32 signatures, densities 0.2 and 0.5, weights (1, 1) and (0.7, 1.3): {diff}"
        )
    return lines


def trained(
    folder: str | None,
    train: torch.Tensor,
    labels: torch.Tensor,
    bad: dict[str, torch.Tensor],
) -> digits.Models:
    """init, std and the robust models: trained, or read from `folder` when it holds them."""
    roles = ["init", "std", *bad]
    files = {r: os.path.join(folder, f"{r}.pt") for r in roles} if folder else {}
    if files and all(os.path.exists(f) for f in files.values()):
        states = {r: torch.load(f, weights_only=True) for r, f in files.items()}
        built = {r: digits.PAPER.build() for r in roles}
        for r, model in built.items():
            model.load_state_dict(states[r])
            model.eval()
        return digits.Models(built["init"], built["std"], {c: built[c] for c in bad})
    models = digits.train_models(digits.PAPER, train, labels, bad, SEED)
    if folder:
        os.makedirs(folder, exist_ok=True)
        for r, model in zip(roles, [models.init, models.std, *models.robust.values()], strict=True):
            torch.save(model.state_dict(), files[r])
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument(
        "--models", metavar="DIR", help="keep the trained models in DIR and reuse them there"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    corruptions = [c for pair in PAIRS for c in pair]
    split = digits.load_digits32(SEED)
    train, labels = digits.to_tensor(split.train_images), split.train_labels
    bad = {c: digits.corrupted("train", c, SEVERITY, SEED) for c in corruptions}
    tests = Tests(
        {"clean": digits.to_tensor(split.test_images)}
        | {c: digits.corrupted("test", c, SEVERITY, SEED) for c in corruptions},
        split.test_labels,
    )
    log(f"corrupted the digits in {time.perf_counter() - started:.0f} s")
    models = trained(args.models, train, labels, bad)
    log(f"init, std and {len(corruptions)} robust models ready")
    with tempfile.TemporaryDirectory() as folder:
        sigs = {}
        for c in corruptions:
            path = os.path.join(folder, f"{c}.rws")
            rwsfmt.save(
                rwsfmt.extract(models.std, models.robust[c], models.init, layers=LAYERS, label=c),
                path,
            )
            sigs[c] = rwsfmt.load(path)
        results = []
        for pair in PAIRS:
            results.append(study(pair, sigs, models.std, tests))
            log(f"merged {' + '.join(pair)}")
        for sig in sigs.values():
            sig.close()
    lines = report(results, time.perf_counter() - started)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "merge_digits.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
