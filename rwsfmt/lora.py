"""PEFT LoRA adapters as the weight differences they stand for.

PEFT's `get_peft_model(model, LoraConfig(...)).save_pretrained(dir)` writes `dir/` with
`adapter_config.json` and `adapter_model.safetensors`, whose tensors are the low-rank factors
`base_model.model.MODULE.lora_A.weight` (r x in) and `...lora_B.weight` (out x r), or for an
embedding `MODULE.lora_embedding_A` (r x num) and `..._B` (dim x r). Each pair stands for the
delta PEFT's `merge_and_unload()` adds to `MODULE.weight`:

    delta = scale * B @ A,   scale = alpha / r   (use_rslora: alpha / sqrt(r))

with r the pair's rank and alpha `lora_alpha` (or its `alpha_pattern` entry for MODULE);
transposed for `fan_in_fan_out` layers (GPT-2's Conv1D) and for embeddings; for a Conv2d,
A's kernel composed with B's 1x1. Other saved tensors (`modules_to_save` copies, biases
trained with `bias=...`) are whole values, not differences: they are left out and listed.
DoRA adapters (`use_dora`) are refused: their delta depends on the base weights.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from .errors import RwsError, spell
from .inputs import open_input, strict_json
from .io.safetensors import SafetensorsCheckpoint

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAX_CONFIG = 1 << 20  # bytes; real configs are a few KB
# MODULE.lora_A.weight / MODULE.lora_B.weight, or MODULE.lora_embedding_A / _B, each with the
# adapter's name (".default") when saved without PEFT's renaming
_FACTOR = re.compile(
    r"(?P<module>.+)\.(?P<kind>lora_|lora_embedding_)(?P<factor>[AB])(?:\.[^.]+){0,2}"
)


@dataclass(frozen=True)
class LoraDelta:
    """One adapted module: the base weight it changes and the names of its two factors."""

    name: str  # the base model's weight, e.g. 'bert.encoder.layer.0.attention.self.query.weight'
    module: str
    a: str
    b: str
    embedding: bool


def is_lora(names: list[str]) -> bool:
    """Whether tensors named `names` are LoRA factors (some name ends in lora_A/lora_B)."""
    return any(_match(n) is not None for n in names)


def adapter_files(path: str) -> tuple[str, str]:
    """(weights file, config file) of a PEFT adapter given as its folder or its
    adapter_model.safetensors; `RwsError` naming what is missing."""
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    weights = os.path.join(folder, WEIGHTS_FILE) if os.path.isdir(path) else path
    config = os.path.join(folder, CONFIG_FILE)
    if os.path.isdir(path) and not any(map(os.path.lexists, (weights, config))):
        raise RwsError(
            f"is a folder without a PEFT LoRA adapter ({WEIGHTS_FILE}, {CONFIG_FILE}); import "
            "reads one safetensors file of differences or a LoRA adapter's folder",
            path=path,
            fix="for a fine-tuned model, extract its difference from the base: "
            + spell(
                "rwsfmt extract BASE FINETUNED --method subtract",
                "rwsfmt.extract(base, finetuned, method='subtract')",
            )
            + "; for a safetensors file of differences, give the file",
        )
    for needed, what in ((weights, "weights"), (config, "configuration")):
        if not os.path.isfile(needed):
            raise RwsError(
                f"a PEFT LoRA adapter needs its {what}, {os.path.basename(needed)}, which is "
                f"not in {folder}",
                path=path,
                fix=f"give the folder PEFT's save_pretrained wrote ({WEIGHTS_FILE} and "
                f"{CONFIG_FILE} side by side)",
            )
    return weights, config


def read_config(path: str) -> dict[str, Any]:
    """The adapter's configuration, checked to be a LoRA one this module can expand."""
    with open_input(path, "an adapter configuration") as f:
        data = f.read(MAX_CONFIG + 1)

    def bad(problem: str, fix: str) -> RwsError:
        return RwsError(problem, path=path, fix=fix)

    try:
        config = strict_json(data.decode("utf-8")) if len(data) <= MAX_CONFIG else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"is not valid JSON ({exc})", "save the adapter again") from None
    if not isinstance(config, dict):
        raise bad("is not a JSON object under 1 MiB", "save the adapter again")
    if config.get("peft_type", "LORA") != "LORA":
        raise bad(
            f"describes a {config.get('peft_type')!r} adapter; only LoRA adapters stand for "
            "weight differences B @ A",
            "merge it with PEFT (merge_and_unload), save the model, and extract a signature",
        )
    if config.get("use_dora"):
        raise bad(
            "describes a DoRA adapter (use_dora), whose change depends on the base weights",
            "merge it with PEFT (merge_and_unload), save the model, and extract a signature "
            "against the base model (method 'subtract')",
        )
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise bad(f"has lora_alpha {alpha!r}, not a number", "save the adapter again")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in patterns.values()
    ):
        raise bad(f"has alpha_pattern {patterns!r}, not a map of names to numbers", "save it again")
    return config


def plan(ckpt: SafetensorsCheckpoint, names: list[str]) -> tuple[list[LoraDelta], list[str]]:
    """(the deltas the factors among `names` stand for, in `names`' order of their A factor;
    the tensors that are not factors: whole values, left out). A factor without its partner,
    or a pair of mismatched ranks, is an `RwsError`."""
    factors: dict[tuple[str, bool], dict[str, str]] = {}
    others = []
    for n in names:
        m = _match(n)
        if m is None:
            others.append(n)
            continue
        key = (m["module"], m["kind"] == "lora_embedding_")
        factors.setdefault(key, {})[m["factor"]] = n
    deltas = []
    for (module, embedding), pair in factors.items():
        if set(pair) != {"A", "B"}:
            have = next(iter(pair.values()))
            raise RwsError(
                f"LoRA factor {have!r} has no partner {'B' if 'A' in pair else 'A'}",
                path=ckpt.path,
                fix="save the adapter again with PEFT's save_pretrained",
            )
        base = module.removeprefix(PREFIX)
        deltas.append(LoraDelta(f"{base}.weight", base, pair["A"], pair["B"], embedding))
    return deltas, others


def expand(ckpt: SafetensorsCheckpoint, delta: LoraDelta, config: dict[str, Any]) -> torch.Tensor:
    """The float32 delta `delta` stands for (see the module docstring)."""
    a = ckpt.tensor(delta.a).to(torch.float32)
    b = ckpt.tensor(delta.b).to(torch.float32)
    rank = a.shape[0]
    if b.dim() < 2 or b.shape[1] != rank or (a.dim() not in (2, 4)) or (a.dim() != b.dim()):
        raise RwsError(
            f"LoRA factors of {delta.module!r} do not compose: A {list(a.shape)}, "
            f"B {list(b.shape)} (expected A r x in and B out x r, or Conv2d kernels)",
            path=ckpt.path,
            fix="save the adapter again with PEFT's save_pretrained",
        )
    alpha = _pattern(config.get("alpha_pattern") or {}, delta.module, config["lora_alpha"])
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    if a.dim() == 4:  # Conv2d: A's kernel, then B's 1x1 mixing
        out = torch.nn.functional.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3)
    else:
        out = b @ a
        if delta.embedding or config.get("fan_in_fan_out"):
            out = out.T
    return (out * scale).contiguous()


def describe(config: dict[str, Any]) -> dict[str, Any]:
    """What the provenance records of the adapter's configuration."""
    keys = ("r", "lora_alpha", "use_rslora", "fan_in_fan_out", "alpha_pattern", "rank_pattern")
    record = {k: config[k] for k in keys if config.get(k) not in (None, {}, [])}
    rule = "lora_alpha / sqrt(r)" if config.get("use_rslora") else "lora_alpha / r"
    return {**record, "delta": f"scale * B @ A, scale = {rule}"}


def _match(name: str) -> re.Match[str] | None:
    m = _FACTOR.fullmatch(name)
    if m is None:
        return None
    # lora_A.weight, or lora_A.ADAPTER.weight; embeddings carry no ".weight"
    if m["kind"] == "lora_" and not name.endswith(".weight"):
        return None
    return m


def _pattern(patterns: dict[str, float], module: str, default: float) -> float:
    """The value of the first key of `patterns` that names `module` (as PEFT matches them:
    the key is the module's name, or its end after a '.'), else `default`."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return float(value)
    return float(default)
