"""BatchNorm, measured: how a signature's running statistics should compose, on digits-32.

    python benchmarks/batchnorm_digits.py [--corruptions all|N] [--out FILE.md]

A ResNet in miniature with BatchNorm after every conv (`examples/digits.py`, `MiniResNet`,
12 convs) on the scikit-learn digits at 32x32: init trained on clean images, std (clean) and
one robust model per corruption (clean + corrupted images, severity 5) trained from init.
Shallow-5 signatures (`rwsfmt.extract`, the paper's default: stem, stage 1 and stage 2's
first conv, with their five BatchNorm layers) at 8 and 32 bits. A signature stores the
robust model's running_mean / running_var as *target* entries; the `stats` rule of
`rwsfmt.apply` says how they compose:

    sum     std + sum_i alpha_i (target_i - std)          (rwsfmt <= 0.1.0)
    convex  weights alpha_i / max(1, sum_i alpha_i): inside the hull of std and the targets
    keep    std's statistics untouched (deltas still apply)

and two references that are not library rules because they need more than the files:

    robust stats, all BN   the robust model's statistics in *every* BatchNorm layer (what
                           the authors' ResNet code does: it needs the robust checkpoint)
    re-estimated           statistics of the patched BN layers recomputed on the corrupted
                           *test* images, unlabeled (test-time adaptation: needs the data)

Measured, all on held-out test images (539): (1) one signature at alpha 1, mean over the
corruptions of the accuracy on its corruption and on clean images while patched; (2) an
alpha sweep; (3) composition of 2, 3 and 4 signatures (motion_blur, gaussian_blur, fog,
contrast) at 0.8 and 1.0 each: clean accuracy, accuracy on each composed corruption, and how
many running_var elements end up negative; (4) every corruption at alpha 1.

Fixed seeds; one thread (`torch.set_num_threads(1)`) so the numbers repeat on this machine.
With all 19 corruptions it takes about 8 minutes on one core. Writes the tables to
`benchmarks/results/batchnorm_digits.md` (and prints them). Needs `pip install -e .[demo]`.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from statistics import fmean as mean

import torch
from torch import nn

import rwsfmt
from rwsfmt.statsrule import DEFAULT_STATS, StatsRule

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import digits  # noqa: E402 - examples/digits.py

SEED = 0
SEVERITY = 5
LAYERS = 5
RECIPE = digits.Recipe(arch="resnet", width=8, lr=3e-3, init_epochs=4, epochs=4)
ALPHAS = (0.0, 0.5, 1.0, 1.25, 1.5)
COMPOSED = ("motion_blur", "gaussian_blur", "fog", "contrast")
WEIGHTS = (0.8, 1.0)
RULES = (StatsRule.SUM, StatsRule.CONVEX, StatsRule.KEEP)
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "batchnorm_digits.md")

State = dict[str, torch.Tensor]


class Evaluator:
    """Accuracy of a state dict on a named test set; a state evaluated before is not run
    again (keyed by a SHA-256 of all its floating tensors), so rules that give identical
    tensors (sum and convex whenever the alphas sum to at most 1) cost one evaluation."""

    def __init__(self, template: nn.Module, sets: dict[str, torch.Tensor], labels: torch.Tensor):
        self.net = copy.deepcopy(template).eval()
        self.sets, self.labels = sets, labels
        self.cache: dict[tuple[str, str], float] = {}
        self.runs = 0

    def __call__(self, state: State, where: str) -> float:
        key = (digest(state), where)
        if key not in self.cache:
            self.net.load_state_dict(state)
            self.cache[key] = digits.accuracy(self.net, self.sets[where], self.labels)
            self.runs += 1
        return self.cache[key]


def digest(state: State) -> str:
    h = hashlib.sha256()
    for name, t in state.items():
        if t.is_floating_point():
            h.update(name.encode())
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def target_modules(sig: rwsfmt.Signature) -> list[str]:
    """The BatchNorm modules whose statistics `sig` carries as target entries."""
    return sorted({n.rpartition(".")[0] for n in sig.names if sig.info(n).kind == "target"})


@torch.no_grad()
def reestimate(net: nn.Module, state: State, modules: Iterable[str], images: torch.Tensor) -> State:
    """`state` with the running statistics of `modules` recomputed on `images` (one pass,
    cumulative average over batches of 128, the other layers in eval mode)."""
    net.load_state_dict(state)
    net.eval()
    bns = [net.get_submodule(m) for m in modules]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    for chunk in images.split(128):
        net(chunk)
    for bn, momentum in zip(bns, saved, strict=True):
        bn.momentum = momentum
    net.eval()
    return {k: v.clone() for k, v in net.state_dict().items()}


def robust_stats_everywhere(state: State, robust: State) -> State:
    out = dict(state)
    for k in out:
        if k.endswith(("running_mean", "running_var")):
            out[k] = robust[k].clone()
    return out


def negative_vars(state: State, modules: Iterable[str]) -> int:
    return sum(int((state[f"{m}.running_var"] < 0).sum()) for m in modules)


def table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _cell(c: object) -> str:
    return f"{c:.1f}" if isinstance(c, float) else str(c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corruptions", default="all", help="'all' (19) or N: the first N (plus the composed)"
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="markdown file to write")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()

    names = digits.corruption_names()
    if args.corruptions != "all":
        first = list(names[: int(args.corruptions)])
        names = tuple(first + [c for c in COMPOSED if c not in first])
    data = digits.load_digits32(SEED)
    settings = (
        f"digits-32 (seed {SEED}: {len(data.train_labels)} train, "
        f"{len(data.test_labels)} test images), severity {SEVERITY}, "
        f"{len(names)} corruptions; {RECIPE.describe()}; shallow-{LAYERS} signatures "
        f"(Eq. 1), 8-bit (default: symmetric, per channel) and 32-bit; 1 thread"
    )
    print(settings, flush=True)

    clean_train, labels = digits.to_tensor(data.train_images), data.train_labels
    sets = {"clean": digits.to_tensor(data.test_images)}
    sets.update({c: digits.corrupted("test", c, SEVERITY, SEED) for c in names})
    bad = {c: digits.corrupted("train", c, SEVERITY, SEED) for c in names}
    models = digits.train_models(RECIPE, clean_train, labels, bad, SEED)
    trained = time.time() - started
    print(f"trained init, std and {len(names)} robust models in {trained:.0f} s", flush=True)
    init_sd, std_sd = models.init.state_dict(), models.std.state_dict()
    evaluate = Evaluator(models.std, sets, data.test_labels)
    robust: dict[str, State] = {c: m.state_dict() for c, m in models.robust.items()}
    sigs = {
        (c, bits): rwsfmt.extract(std_sd, robust[c], init_sd, layers=LAYERS, bits=bits, label=c)
        for c in names
        for bits in (8, 32)
    }
    modules = target_modules(sigs[names[0], 8])
    patched_names = sigs[names[0], 8].names
    print(f"signature tensors: {', '.join(patched_names)}", flush=True)

    # (1) + (4): one signature at alpha 1, and (2) the sweep
    per: dict[str, dict[str, tuple[float, float]]] = {c: {} for c in names}
    sweep: dict[tuple[float, StatsRule], list[tuple[float, float]]] = {}
    for c in names:
        per[c]["std"] = (evaluate(std_sd, c), evaluate(std_sd, "clean"))
        per[c]["robust"] = (evaluate(robust[c], c), evaluate(robust[c], "clean"))
        for alpha in ALPHAS:
            for rule in RULES:
                state = rwsfmt.apply(std_sd, [(sigs[c, 8], alpha)], stats=rule)
                acc = (evaluate(state, c), evaluate(state, "clean"))
                sweep.setdefault((alpha, rule), []).append(acc)
                if alpha == 1.0:
                    per[c][f"{rule.value} 8"] = acc
        for rule in RULES:
            state = rwsfmt.apply(std_sd, [(sigs[c, 32], 1.0)], stats=rule)
            per[c][f"{rule.value} 32"] = (evaluate(state, c), evaluate(state, "clean"))
        keep = rwsfmt.apply(std_sd, [(sigs[c, 8], 1.0)], stats=StatsRule.KEEP)
        swapped = robust_stats_everywhere(keep, robust[c])
        per[c]["swap"] = (evaluate(swapped, c), evaluate(swapped, "clean"))
        adapted = reestimate(evaluate.net, keep, modules, sets[c])
        per[c]["reest"] = (evaluate(adapted, c), evaluate(adapted, "clean"))
        adapted = reestimate(evaluate.net, std_sd, modules, sets[c])
        per[c]["std reest"] = (evaluate(adapted, c), evaluate(adapted, "clean"))

    def avg(key: str) -> tuple[float, float]:
        return mean([per[c][key][0] for c in names]), mean([per[c][key][1] for c in names])

    single_rows = [
        ("std (no patch)", *avg("std"), "", ""),
        ("robust model, each on its own corruption (all models)", *avg("robust"), "", ""),
    ]
    for rule in RULES:
        label = f"patch, `--stats {rule.value}`" + (" (default)" if rule is DEFAULT_STATS else "")
        single_rows.append((label, *avg(f"{rule.value} 8"), *avg(f"{rule.value} 32")))
    single_rows += [
        ("patch + robust model's statistics in every BN layer (ref.)", *avg("swap"), "", ""),
        ("patch + statistics re-estimated on corrupted test images (ref.)", *avg("reest"), "", ""),
        ("std (no patch) + statistics re-estimated likewise (ref.)", *avg("std reest"), "", ""),
    ]

    sweep_rows = []
    for alpha in ALPHAS:
        row: list[object] = [f"{alpha:g}"]
        for rule in RULES:
            accs = sweep[alpha, rule]
            row += [mean([a for a, _ in accs]), mean([b for _, b in accs])]
        sweep_rows.append(row)

    # (3) composition
    comp_rows = []
    for k in (2, 3, 4):
        group = COMPOSED[:k]
        for w in WEIGHTS:
            entries = [(sigs[c, 8], w) for c in group]
            configs: list[tuple[str, State]] = []
            for rule in RULES:
                configs.append((f"`{rule.value}`", rwsfmt.apply(std_sd, entries, stats=rule)))
            keep = rwsfmt.apply(std_sd, entries, stats=StatsRule.KEEP)
            mixed = torch.cat([sets[c] for c in group])
            configs.append(("re-estimated (ref.)", reestimate(evaluate.net, keep, modules, mixed)))
            for how, state in configs:
                accs = {c: evaluate(state, c) for c in group}
                row = [f"{k}", f"{w:g}", how, evaluate(state, "clean")]
                row += [accs.get(c, "") for c in COMPOSED]
                row += [mean(list(accs.values())), negative_vars(state, modules)]
                comp_rows.append(row)
    ref_rows = [
        ["-", "-", "std (no patch)", evaluate(std_sd, "clean")]
        + [evaluate(std_sd, c) for c in COMPOSED]
        + [mean([evaluate(std_sd, c) for c in COMPOSED]), 0],
        ["-", "-", "robust models, each on its own (all models)", ""]
        + [evaluate(robust[c], c) for c in COMPOSED]
        + [mean([evaluate(robust[c], c) for c in COMPOSED]), 0],
    ]

    per_rows = []
    for c in names:
        p = per[c]
        per_rows.append(
            [c, *p["std"][:1], *p["robust"][:1]]
            + [p[f"{r.value} 8"][0] for r in RULES]
            + [p["swap"][0], p["reest"][0], p["std reest"][0], p["std"][1]]
            + [p[f"{r.value} 8"][1] for r in RULES]
        )

    elapsed = time.time() - started
    command = "python benchmarks/batchnorm_digits.py" + (
        f" --corruptions {shlex.quote(args.corruptions)}" if args.corruptions != "all" else ""
    )
    machine = (
        f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs "
        f"(1 thread used), Python {platform.python_version()}, torch {torch.__version__}"
    )
    parts = [
        "# BatchNorm, measured: composing running statistics (digits-32, MiniResNet)",
        "",
        f"Generated by `{command}` (writes this file; about {elapsed / 60:.0f} minutes, "
        f"{trained:.0f} s of it training {len(names) + 2} models). Do not edit by hand.",
        "",
        f"- Settings: {settings}.",
        f"- Signature tensors (shallow {LAYERS}): {', '.join(f'`{n}`' for n in patched_names)}.",
        f"- Machine: {machine}.",
        f"- Library default: `--stats {DEFAULT_STATS.value}`. Accuracies in percent on the "
        f"{len(data.test_labels)} held-out test images (clean, or with the corruption).",
        "- References (ref.) are not library rules: *robust model's statistics* needs the "
        "robust checkpoint, *re-estimated* recomputes the statistics of the 5 patched BN "
        "layers from the unlabeled corrupted test images (test-time adaptation).",
        "",
        f"## 1. One signature at alpha 1 (mean over {len(names)} corruptions)",
        "",
        table(
            ["", "corrupted, 8-bit", "clean, 8-bit", "corrupted, 32-bit", "clean, 32-bit"],
            single_rows,
        ),
        "",
        "At alpha 1 with one signature `convex` and `sum` give the same tensors by definition.",
        "",
        f"## 2. Alpha sweep, one 8-bit signature (mean over {len(names)} corruptions)",
        "",
        table(
            ["alpha"] + [f"{r.value}: {w}" for r in RULES for w in ("corrupted", "clean")],
            sweep_rows,
        ),
        "",
        "## 3. Composition of 8-bit signatures",
        "",
        "Signatures of the first k of " + ", ".join(COMPOSED) + ", each at the weight "
        "given; accuracy on clean images and on each composed corruption; `var < 0`: "
        "running_var elements below zero in the patched BN layers (NaN outputs).",
        "",
        table(
            ["k", "weight", "statistics", "clean", *COMPOSED, "mean composed", "var < 0"],
            ref_rows + comp_rows,
            align="lll" + "r" * (len(COMPOSED) + 3),
        ),
        "",
        "## 4. Every corruption, one 8-bit signature at alpha 1",
        "",
        table(
            ["corruption", "std", "robust"]
            + [f"`{r.value}`" for r in RULES]
            + ["robust stats (ref.)", "re-est. (ref.)", "std re-est. (ref.)", "clean: std"]
            + [f"clean: `{r.value}`" for r in RULES],
            per_rows,
        ),
        "",
        f"{evaluate.runs} distinct evaluations; {elapsed:.0f} s in all.",
        "",
    ]
    text = "\n".join(parts)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
