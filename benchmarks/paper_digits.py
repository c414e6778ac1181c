"""The paper's experiments in miniature on digits-32: Table 1, Figures 6-8, Table 3 and Eq. 1.

    python benchmarks/paper_digits.py                      # every study, seed 0, ~10 min on 2 cores
    python benchmarks/paper_digits.py --seeds 0 1 2 3 4    # Table 1 for each seed, ~30 min

Set-up (`examples/digits.py`, recipe `PAPER`): VGG-16's 13 convs without BatchNorm at 1/8 of
its widths; `init` trained on clean digits-32, then `std` (clean) and one robust model per
corruption of ImageNet-C's 19 at severity 5 (clean and corrupted images), all from `init`.
Signatures are extracted with `rwsfmt.extract` (the function behind `rwsfmt extract`), saved
as `.rws` files to measure storage, and patched into std with `rwsfmt.patched` at alpha 1
unless a study varies it. Accuracies are top-1 on the held-out 30% (539 images), in percent.

* Table 1: Standard; Data Augmentation (one model trained from init on the clean images and
  all 19 corrupted copies, one epoch: 1.25x the images a robust model sees); All Models (std
  and the 19 robust models, each used on its own corruption: the oracle); Standard + RWS of
  every layer; Standard + RWS of the 5 shallowest layers at 32, 16, 8 and 4 bits.
* Figure 6: mean corrupted accuracy and parameter share against the number of shallow layers.
* Figure 7: clean and corrupted accuracy for alpha 0 to 1.5, at severities 3 and 5.
* Figure 8: two to four signatures composed with different weights.
* Table 3: signatures of models trained on digits 0-4 applied to a std of the same backbone
  trained (from its own init, with its own 5-class head) on digits 5-9, and the reverse.
* Eq. 1: the projection against plain subtraction (robust - std, and robust - init, the task
  vector), single and composed.

Writes `paper_digits.md` and PNG figures to `--out` (default `benchmarks/results/`), or
`paper_digits_seeds.md` with `--seeds`. Needs `pip install -e ".[bench]"` (matplotlib).
Deterministic for a given seed, thread count and CPU code path; other machines train
differently, which is what `--seeds` measures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import fmean as mean

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import digits  # noqa: E402 - examples/digits.py

import rwsfmt  # noqa: E402

SHALLOW = 5  # the paper's default number of layers
BITS = (32, 16, 8, 4)
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
COMPOSED = ("motion_blur", "gaussian_blur", "fog", "contrast")  # the paper's Figure 8
HALVES = {"0-4": range(0, 5), "5-9": range(5, 10)}


def log(message: str) -> None:
    """Progress on stderr, so that stdout carries the report only."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Data:
    """Clean and corrupted images of one split (and class range), shared by every study."""

    seed: int
    classes: range
    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    corrupted_train: dict[str, torch.Tensor]
    corrupted_test: dict[tuple[str, int], torch.Tensor]  # (corruption, severity)

    @classmethod
    def load(
        cls,
        seed: int,
        corruptions: Sequence[str],
        severities: Sequence[int] = (5,),
        classes: range = range(digits.CLASSES),
    ) -> Data:
        """Split `seed`, its images of `classes`, each corruption at severity 5 for training
        and at `severities` for testing."""
        split = digits.load_digits32(seed)
        train = digits.keep_classes(
            digits.to_tensor(split.train_images), split.train_labels, classes
        )
        test = digits.keep_classes(digits.to_tensor(split.test_images), split.test_labels, classes)
        corrupted_train, corrupted_test = {}, {}
        for c in corruptions:
            bad = digits.corrupted("train", c, 5, seed)
            corrupted_train[c] = digits.keep_classes(bad, split.train_labels, classes)[0]
            for s in severities:
                bad = digits.corrupted("test", c, s, seed)
                corrupted_test[c, s] = digits.keep_classes(bad, split.test_labels, classes)[0]
        return cls(seed, classes, *train, *test, corrupted_train, corrupted_test)

    def accuracy(self, model: torch.nn.Module, corruption: str | None, severity: int = 5) -> float:
        """Test accuracy in percent on clean (`corruption` None) or corrupted images."""
        images = self.test if corruption is None else self.corrupted_test[corruption, severity]
        return digits.accuracy(model, images, self.test_labels)


@dataclass
class Zoo:
    """init, std and one robust model per corruption, all trained from init on `data`, and
    their signatures (each extracted once)."""

    data: Data
    models: digits.Models
    signatures: dict[tuple[str, int | str, int, str], rwsfmt.Signature] = field(
        default_factory=dict
    )

    @classmethod
    def train(cls, data: Data, recipe: digits.Recipe) -> Zoo:
        start = time.perf_counter()
        models = digits.train_models(
            recipe, data.train, data.train_labels, data.corrupted_train, data.seed,
            len(data.classes),
        )  # fmt: skip
        log(
            f"trained init, std and {len(models.robust)} robust models (digits "
            f"{data.classes.start}-{data.classes.stop - 1}) in {time.perf_counter() - start:.0f} s"
        )
        return cls(data, models)

    @property
    def init(self) -> torch.nn.Module:
        return self.models.init

    @property
    def std(self) -> torch.nn.Module:
        return self.models.std

    @property
    def robust(self) -> dict[str, torch.nn.Module]:
        return self.models.robust

    def signature(
        self, corruption: str, layers: int | str = SHALLOW, bits: int = 8, method: str = "project"
    ) -> rwsfmt.Signature:
        """The signature of one robust model (method 'task-vector': robust - init)."""
        key = (corruption, layers, bits, method)
        if key not in self.signatures:
            robust = self.robust[corruption]
            if method == "task-vector":
                sig = rwsfmt.extract(self.init, robust, layers=layers, bits=bits, method="subtract")
            else:
                sig = rwsfmt.extract(
                    self.std, robust, self.init, layers=layers, bits=bits, method=method
                )
            self.signatures[key] = sig
        return self.signatures[key]


def scores(
    model: torch.nn.Module,
    data: Data,
    sigs: Sequence[tuple[rwsfmt.Signature, float]],
    tests: Sequence[tuple[str | None, int]],
) -> list[float]:
    """Accuracy of `model` patched with `sigs` on each (corruption or None for clean, severity)."""
    with rwsfmt.patched(model, list(sigs)) if sigs else contextlib.nullcontext():
        return [data.accuracy(model, c, s) for c, s in tests]


def share(gain: float, of: float) -> float:
    return gain / of if of else float("nan")


# --- Table 1 -------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of Table 1: storage in bytes, clean (TA) and mean corrupted (RA) accuracy."""

    name: str
    storage: int
    ta: float
    ra: float
    per_corruption: dict[str, float]
    ta_patched: float | None = None  # mean clean accuracy while each signature is patched
    exact: str = ""  # "19/19" when removing every patch gave std back bit for bit
    bits: int | None = None
    tensor_bytes: int = 0  # the weights, plus the signatures' tensor data without headers


def train_augmented(zoo: Zoo, recipe: digits.Recipe) -> torch.nn.Module:
    """Data Augmentation: one model from init on the clean images and all corrupted copies."""
    data = zoo.data
    images = torch.cat([data.train, *data.corrupted_train.values()])
    labels = data.train_labels.repeat(len(data.corrupted_train) + 1)
    start = time.perf_counter()
    model = digits.train_from(zoo.init, dataclasses.replace(recipe, epochs=1), images, labels, 7)
    log(f"trained the data augmentation model in {time.perf_counter() - start:.0f} s")
    return model


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def table1(zoo: Zoo, augmented: torch.nn.Module, folder: str) -> list[Row]:
    """Every row of Table 1, signatures saved in `folder` to measure their files."""
    data, std = zoo.data, zoo.std
    names = list(zoo.robust)
    size = model_bytes(std)
    ta_std = data.accuracy(std, None)

    def plain(name: str, model_of: Callable[[str], torch.nn.Module], storage: int) -> Row:
        per = {c: data.accuracy(model_of(c), c) for c in names}
        ta = ta_std if name == "All Models" else data.accuracy(model_of(names[0]), None)
        return Row(name, storage, ta, mean(per.values()), per)

    rows = [
        plain("Standard", lambda c: std, size),
        plain("Data Augmentation", lambda c: augmented, size),
        plain("All Models", lambda c: zoo.robust[c], size * (len(names) + 1)),
    ]
    before = {k: v.clone() for k, v in std.state_dict().items()}
    variants = [("Standard + RWS, all layers", "all", 32)]
    variants += [(f"Standard + RWS, shallow, {b}-bit", SHALLOW, b) for b in BITS]
    for name, layers, bits in variants:
        storage, tensor_bytes, per, clean, exact = size, size, {}, [], 0
        for c in names:
            sig = zoo.signature(c, layers=layers, bits=bits)
            path = os.path.join(folder, f"{c}-{layers}-{bits}.rws")
            rwsfmt.save(sig, path)
            storage += os.path.getsize(path)
            tensor_bytes += sum(info.length for info in sig.infos)
            ta_patched, per[c] = scores(std, data, [(sig, 1.0)], [(None, 5), (c, 5)])
            clean.append(ta_patched)
            exact += all(torch.equal(v, before[k]) for k, v in std.state_dict().items())
        rows.append(
            Row(name, storage, data.accuracy(std, None), mean(per.values()), per,
                mean(clean), f"{exact}/{len(names)}", bits, tensor_bytes)
        )  # fmt: skip
        log(f"table 1: {name}")
    return rows


def table1_markdown(rows: list[Row]) -> list[str]:
    by = {r.name: r for r in rows}
    std, oracle = by["Standard"], by["All Models"]
    full_gain = oracle.ra - std.ra
    gain32 = by["Standard + RWS, shallow, 32-bit"].ra - std.ra
    out = [
        "| Method | Storage (MB) | × model | × model, tensor data only | TA, removed (%) | RA (%) "
        "| share of All-Models gain | gain kept vs 32-bit | TA while patched (%) | removal "
        "bit-exact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        kept = f"{share(r.ra - std.ra, gain32):.3f}" if r.bits in (16, 8, 4) else ""
        patched = f"{r.ta_patched:.2f}" if r.ta_patched is not None else ""
        data_only = f"{r.tensor_bytes / std.storage:.2f}" if r.tensor_bytes else ""
        out.append(
            f"| {r.name} | {r.storage / 1e6:.3f} | {r.storage / std.storage:.2f} | {data_only} | "
            f"{r.ta:.2f} | {r.ra:.2f} | {share(r.ra - std.ra, full_gain):.3f} | {kept} | "
            f"{patched} | {r.exact} |"
        )
    return out


def per_corruption_markdown(rows: list[Row]) -> list[str]:
    """Appendix table: RA per corruption for Standard, All Models and shallow 32/8-bit."""
    pick = ["Standard", "Data Augmentation", "All Models"]
    pick += ["Standard + RWS, shallow, 32-bit", "Standard + RWS, shallow, 8-bit"]
    by = {r.name: r for r in rows}
    out = ["| Corruption | " + " | ".join(pick) + " |", "|---|" + "---:|" * len(pick)]
    for c in by["Standard"].per_corruption:
        out.append(f"| {c} | " + " | ".join(f"{by[p].per_corruption[c]:.1f}" for p in pick) + " |")
    return out


# --- Figures 6, 7 and 8 ----------------------------------------------------------------------


def figure6(zoo: Zoo) -> tuple[list[int], list[float], list[float], dict[str, list[float]]]:
    """Mean corrupted accuracy and parameter share for 1..all layers (32-bit signatures)."""
    data, std = zoo.data, zoo.std
    total = sum(p.numel() for p in std.parameters())
    n_layers = len(digits.conv_names(std)) + 1  # every conv and the head
    counts, ra, params = list(range(1, n_layers + 1)), [], []
    per: dict[str, list[float]] = {c: [] for c in zoo.robust}
    for n in counts:
        accs = []
        for c in zoo.robust:
            sig = zoo.signature(c, layers=n, bits=32)
            (acc,) = scores(std, data, [(sig, 1.0)], [(c, 5)])
            per[c].append(acc)
            accs.append(acc)
        params.append(100.0 * sum(info.numel for info in sig.infos) / total)
        ra.append(mean(accs))
    log("figure 6")
    return counts, ra, params, per


def figure7(zoo: Zoo) -> dict[str, list[float]]:
    """Mean clean, severity-3 and severity-5 accuracy for each alpha (8-bit shallow)."""
    data, std = zoo.data, zoo.std
    sigs = {c: zoo.signature(c) for c in zoo.robust}
    out: dict[str, list[float]] = {"clean": [], "severity 3": [], "severity 5": []}
    for alpha in ALPHAS:
        rows = [scores(std, data, [(sigs[c], alpha)], [(None, 5), (c, 3), (c, 5)]) for c in sigs]
        for key, values in zip(out, zip(*rows, strict=True), strict=True):
            out[key].append(mean(values))
    log("figure 7")
    return out


def compositions() -> list[tuple[float, ...]]:
    """Weights for COMPOSED: singles, pairs and triples at 1, then all four at several mixes."""
    combos: list[tuple[float, ...]] = []
    n = len(COMPOSED)
    for size in (1, 2, 3):
        for chosen in itertools.combinations(range(n), size):
            combos.append(tuple(1.0 if i in chosen else 0.0 for i in range(n)))
    combos += [(1.0,) * n, (0.5,) * n, (1.0, 0.5, 0.5, 0.25), (0.25, 0.5, 1.0, 1.0)]
    return combos


def figure8(
    zoo: Zoo,
    method: str = "project",
    bits: int = 8,
    combos: Sequence[tuple[float, ...]] = (),
    others: bool = True,
) -> list[tuple[tuple[float, ...], list[float]]]:
    """Accuracy on clean, on each composed corruption and (`others`) the mean over the other
    corruptions, for std and for each weight vector of `combos` (default `compositions()`)."""
    data, std = zoo.data, zoo.std
    sigs = [zoo.signature(c, bits=bits, method=method) for c in COMPOSED]
    rest = [c for c in zoo.robust if c not in COMPOSED] if others else []
    tests = [(None, 5)] + [(c, 5) for c in COMPOSED] + [(c, 5) for c in rest]
    out = []
    for weights in [(0.0,) * len(COMPOSED), *(combos or compositions())]:
        entries = [(s, w) for s, w in zip(sigs, weights, strict=True) if w]
        accs = scores(std, data, entries, tests)
        head = accs[: 1 + len(COMPOSED)]
        out.append((weights, head + [mean(accs[1 + len(COMPOSED) :])] if rest else head))
    log(f"figure 8 ({method})")
    return out


def combo_label(weights: tuple[float, ...]) -> str:
    parts = [f"{w:g}·{c}" for c, w in zip(COMPOSED, weights, strict=True) if w]
    return " + ".join(parts) or "std (no signature)"


# --- Table 3 and Eq. 1 -------------------------------------------------------------------------


def table3(seed: int, recipe: digits.Recipe, corruptions: Sequence[str]) -> list[str]:
    """Signatures from one half of the digits patched into std of the other half."""
    zoos = {
        h: Zoo.train(Data.load(seed, corruptions, classes=r), recipe) for h, r in HALVES.items()
    }
    sigs = {h: {c: z.signature(c) for c in corruptions} for h, z in zoos.items()}
    out = [
        "| Signatures from ↓ / std trained on → | "
        + " | ".join(f"digits {h}" for h in zoos)
        + " |",
        "|---|" + "---:|" * len(zoos),
    ]
    cells: dict[tuple[str, str], float] = {}
    for target, z in zoos.items():
        for source in zoos:
            cells[source, target] = mean(
                scores(z.std, z.data, [(sigs[source][c], 1.0)], [(c, 5)])[0] for c in corruptions
            )
    baselines = {
        t: (mean(z.data.accuracy(z.std, c) for c in corruptions),
            mean(z.data.accuracy(z.robust[c], c) for c in corruptions),
            z.data.accuracy(z.std, None))
        for t, z in zoos.items()
    }  # fmt: skip
    out.append("| none (std) | " + " | ".join(f"{b[0]:.2f}" for b in baselines.values()) + " |")
    for source in zoos:
        row = []
        for target, (std_ra, oracle_ra, _) in baselines.items():
            kept = share(cells[source, target] - std_ra, oracle_ra - std_ra)
            row.append(f"{cells[source, target]:.2f} ({kept:.0%} of oracle gain)")
        out.append(f"| digits {source} | " + " | ".join(row) + " |")
    out.append(
        "| own robust models (oracle) | "
        + " | ".join(f"{b[1]:.2f}" for b in baselines.values())
        + " |"
    )
    out.append(
        "| std, clean (TA) | " + " | ".join(f"{b[2]:.2f}" for b in baselines.values()) + " |"
    )
    log("table 3")
    return out


METHODS = {
    "project": "projection, Eq. 1 (rwsfmt's default)",
    "subtract": "robust - std (`--method subtract`)",
    "task-vector": "robust - init (task vector)",
}


def projection_study(zoo: Zoo) -> list[str]:
    """Eq. 1 against plain subtraction: single signatures, and compositions of COMPOSED."""
    data, std = zoo.data, zoo.std
    pairs = [w for w in compositions() if sum(1 for x in w if x) == 2]
    out = [
        "| Signature | RA, single (%) | TA while patched, single (%) | pairs: accuracy on "
        "their 2 corruptions (%) | pairs: TA (%) | all 4 at 1: accuracy on the 4 (%) | "
        "all 4: TA (%) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, label in METHODS.items():
        single = [
            scores(
                std, data, [(zoo.signature(c, bits=32, method=method), 1.0)], [(None, 5), (c, 5)]
            )
            for c in zoo.robust
        ]
        combos = figure8(zoo, method, 32, [*pairs, (1.0,) * len(COMPOSED)], others=False)[1:]
        pair_acc = [
            mean(a for a, w in zip(accs[1:5], weights, strict=True) if w)
            for weights, accs in combos[:-1]
        ]
        four = combos[-1][1]
        out.append(
            f"| {label} | {mean(s[1] for s in single):.2f} | {mean(s[0] for s in single):.2f} | "
            f"{mean(pair_acc):.2f} | {mean(accs[0] for _, accs in combos[:-1]):.2f} | "
            f"{mean(four[1:5]):.2f} | {four[0]:.2f} |"
        )
    return out


# --- figures -------------------------------------------------------------------------------


def plot_figure6(path: str, fig6: tuple) -> None:
    import matplotlib.pyplot as plt

    counts, ra, params, per = fig6
    fig, left = plt.subplots(figsize=(7, 4))
    left.bar(counts, ra, color="#8fb3d9", label=f"mean corrupted accuracy ({len(per)} corruptions)")
    for c in [c for c in ("contrast", "fog", "motion_blur", "gaussian_noise") if c in per]:
        left.plot(counts, per[c], marker=".", label=c)
    left.set_xlabel("number of shallowest layers in the signature")
    left.set_ylabel("accuracy, std + RWS at alpha 1 (%)")
    left.set_xticks(counts)
    right = left.twinx()
    right.plot(counts, params, color="black", linestyle="--", marker="s", label="parameters (%)")
    right.set_ylabel("share of the model's parameters (%)")
    lines = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    left.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower right")
    left.set_title("Figure 6: how many shallow layers a signature needs")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_figure7(path: str, fig7: dict[str, list[float]]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    for i, (key, values) in enumerate(fig7.items()):
        xs = [j + (i - 1) * width for j in range(len(ALPHAS))]
        ax.bar(xs, values, width, label=key)
    ax.set_xticks(range(len(ALPHAS)), [f"{a:g}" for a in ALPHAS])
    ax.set_xlabel("alpha")
    ax.set_ylabel("mean accuracy over every signature (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Figure 7: alpha trades clean accuracy for robustness")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_figure8(path: str, fig8: list) -> None:
    import matplotlib.pyplot as plt

    labels = [combo_label(w) for w, _ in fig8]
    values = [accs for _, accs in fig8]
    columns = ["clean", *COMPOSED, "the others (mean)"]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(labels) + 1.5))
    ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=20, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 60 else "black")  # fmt: skip
    ax.set_title("Figure 8: composed signatures (8-bit, 5 shallowest layers), accuracy %")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# --- reports -------------------------------------------------------------------------------


def environment(recipe: digits.Recipe, seeds: Sequence[int]) -> list[str]:
    return [
        f"- set-up: {recipe.describe()}; robust models on clean + corrupted images "
        f"(severity 5); seeds {', '.join(map(str, seeds))}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}), Python {platform.python_version()}",
    ]


def full_study(seed: int, recipe: digits.Recipe, corruptions: Sequence[str], out: str) -> list[str]:
    """Every study on one seed; writes the figures to `out`, returns the markdown report."""
    start, n = time.perf_counter(), len(corruptions)
    data = Data.load(seed, corruptions, severities=(3, 5))
    log(f"corrupted the digits in {time.perf_counter() - start:.0f} s")
    zoo = Zoo.train(data, recipe)
    augmented = train_augmented(zoo, recipe)
    with tempfile.TemporaryDirectory() as folder:
        rows = table1(zoo, augmented, folder)
    fig6, fig7, fig8 = figure6(zoo), figure7(zoo), figure8(zoo)
    eq1 = projection_study(zoo)
    tab3 = table3(seed, recipe, corruptions)
    plot_figure6(os.path.join(out, "paper_digits_fig6_layers.png"), fig6)
    plot_figure7(os.path.join(out, "paper_digits_fig7_alpha.png"), fig7)
    plot_figure8(os.path.join(out, "paper_digits_fig8_composition.png"), fig8)

    counts, ra, params, _ = fig6
    eight = next(r for r in rows if r.bits == 8)
    header_bytes = (eight.storage - eight.tensor_bytes) / n
    lines = [
        f"# The paper in miniature: digits-32, VGG-16 at 1/8 width, {n} corruptions",
        "",
        'Regenerate with `python benchmarks/paper_digits.py` (needs `pip install -e ".[bench]"`);',
        "the variation over seeds is in [paper_digits_seeds.md](paper_digits_seeds.md).",
        "",
        *environment(recipe, [seed]),
        f"- wall time: {time.perf_counter() - start:.0f} s",
        "",
        "## Table 1: storage, clean accuracy (TA) and mean corrupted accuracy (RA)",
        "",
        f"RA: mean over the {n} corruptions at severity 5 (All Models and RWS: the matching model "
        "or signature, alpha 1). TA of RWS rows: std after the signatures are removed. Storage: "
        f"float32 weights, plus the {n} `.rws` files as written; tensor data only: without "
        f"each file's header ({header_bytes / 1e3:.1f} KB on average at 8 bits: names, "
        "quantization, checksums, provenance), which outweighs a 5-layer signature of this "
        "miniature (8,936 parameters) but not of VGG-16 (555,328 parameters).",
        "",
        *table1_markdown(rows),
        "",
        "## Figure 6: number of shallow layers",
        "",
        "![Figure 6](paper_digits_fig6_layers.png)",
        "",
        "| layers | " + " | ".join(map(str, counts)) + " |",
        "|---|" + "---:|" * len(counts),
        "| RA (%) | " + " | ".join(f"{v:.1f}" for v in ra) + " |",
        "| parameters (%) | " + " | ".join(f"{v:.1f}" for v in params) + " |",
        "",
        "## Figure 7: alpha, at severities 3 and 5 (8-bit, 5 shallowest layers)",
        "",
        "![Figure 7](paper_digits_fig7_alpha.png)",
        "",
        "| alpha | " + " | ".join(f"{a:g}" for a in ALPHAS) + " |",
        "|---|" + "---:|" * len(ALPHAS),
        *(f"| {k} (%) | " + " | ".join(f"{v:.1f}" for v in vs) + " |" for k, vs in fig7.items()),
        "",
        "## Figure 8: composition (8-bit, 5 shallowest layers)",
        "",
        "![Figure 8](paper_digits_fig8_composition.png)",
        "",
        "| weights | clean | " + " | ".join(COMPOSED) + f" | other {n - len(COMPOSED)} (mean) |",
        "|---|" + "---:|" * (len(COMPOSED) + 2),
        *(
            f"| {combo_label(w)} | " + " | ".join(f"{v:.1f}" for v in accs) + " |"
            for w, accs in fig8
        ),
        "",
        "## Table 3: signatures moved to a std trained on other digits (8-bit, shallow 5)",
        "",
        f"Each half has its own init, std and {n} robust models (5-class heads). Mean corrupted "
        f"accuracy over the {n} corruptions of the target half's test images, alpha 1.",
        "",
        *tab3,
        "",
        "## Eq. 1: projection against plain subtraction (32-bit, 5 shallowest layers, alpha 1)",
        "",
        *eq1,
        "",
        "## Appendix: RA per corruption",
        "",
        *per_corruption_markdown(rows),
    ]
    return lines


def seeds_study(
    seeds: Sequence[int], recipe: digits.Recipe, corruptions: Sequence[str]
) -> list[str]:
    """Table 1 for each seed, then its spread: what a threshold in a test may rely on."""
    start = time.perf_counter()
    table: list[dict[str, float]] = []
    gains: dict[str, list[float]] = {c: [] for c in corruptions}
    for seed in seeds:
        zoo = Zoo.train(Data.load(seed, corruptions), recipe)
        augmented = train_augmented(zoo, recipe)
        with tempfile.TemporaryDirectory() as folder:
            rows = {r.name: r for r in table1(zoo, augmented, folder)}
        std, oracle = rows["Standard"], rows["All Models"]
        shallow = {b: rows[f"Standard + RWS, shallow, {b}-bit"] for b in BITS}
        gain = {b: shallow[b].ra - std.ra for b in BITS}
        table.append({
            "seed": seed, "TA std": std.ta, "RA std": std.ra,
            "RA DA": rows["Data Augmentation"].ra, "RA All Models": oracle.ra,
            "RA RWS all": rows["Standard + RWS, all layers"].ra,
            **{f"RA RWS {b}": shallow[b].ra for b in BITS},
            "share 8 of AM": share(gain[8], oracle.ra - std.ra),
            **{f"kept {b}/32": share(gain[b], gain[32]) for b in (16, 8, 4)},
            "× model 8": shallow[8].storage / std.storage,
            "TA patched 8": shallow[8].ta_patched,
        })  # fmt: skip
        for c in corruptions:
            gains[c].append(shallow[8].per_corruption[c] - std.per_corruption[c])
        log(f"seed {seed} done")
    keys = [k for k in table[0] if k != "seed"]
    lines = [
        f"# Table 1 over seeds: digits-32, VGG-16 at 1/8 width, {len(corruptions)} corruptions",
        "",
        f"Regenerate with `python benchmarks/paper_digits.py --seeds {' '.join(map(str, seeds))}`. "
        "Each seed draws another train/test split, other corrupted images, another init and "
        f"other batches; RA is the mean over the {len(corruptions)} corruptions (severity 5, "
        "alpha 1).",
        "",
        *environment(recipe, seeds),
        f"- wall time: {time.perf_counter() - start:.0f} s",
        "",
        "| seed | " + " | ".join(keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for row in table:
        lines.append(f"| {row['seed']} | " + " | ".join(f"{row[k]:.3g}" for k in keys) + " |")
    stats: dict[str, Callable] = {"min": min, "mean": statistics.fmean, "max": max}
    if len(table) > 1:
        stats["sd"] = statistics.stdev
    for name, stat in stats.items():
        lines.append(
            f"| **{name}** | " + " | ".join(f"{stat(r[k] for r in table):.3g}" for k in keys) + " |"
        )
    lines += [
        "",
        "## Gain of the 8-bit shallow signature per corruption (points of accuracy)",
        "",
        "| corruption | " + " | ".join(f"seed {s}" for s in seeds) + " | min | mean |",
        "|---|" + "---:|" * (len(seeds) + 2),
    ]
    for c, values in gains.items():
        cells = " | ".join(f"{v:.1f}" for v in values)
        lines.append(f"| {c} | {cells} | {min(values):.1f} | {statistics.fmean(values):.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="the seed of the full study")
    parser.add_argument("--seeds", type=int, nargs="+", help="run Table 1 for each seed instead")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--corruptions", nargs="+", choices=digits.corruption_names(), metavar="NAME",
        help="a subset of the 19 (a quicker look); Figure 8 and Eq. 1 need " + ", ".join(COMPOSED),
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    recipe, corruptions = digits.PAPER, tuple(args.corruptions or digits.corruption_names())
    if args.seeds:
        lines, name = seeds_study(args.seeds, recipe, corruptions), "paper_digits_seeds.md"
    else:
        if not set(COMPOSED) <= set(corruptions):
            parser.error(f"--corruptions must include {', '.join(COMPOSED)} (Figure 8, Eq. 1)")
        lines, name = full_study(args.seed, recipe, corruptions, args.out), "paper_digits.md"
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
