"""Depth order: a model's tensors from input to output, which "the shallowest N layers" needs.

Where the order comes from (`OrderSource`):

- `checkpoint`: PyTorch files keep the state dict in module registration order, which is
  the order the paper's rule is defined on.
- `reference`: given by the user, for files that lost it: a PyTorch checkpoint, state dict
  or module of the same architecture, or a text file listing tensor names one per line.
  Names missing from the reference follow it, in rule order.
- `rules`: safetensors files store names sorted, so `classifier.*` would come before
  `features.*`. `rule_order` rebuilds registration order from naming conventions, level by
  level of the dotted names:

  1. a module's own tensors (`cls_token`, `layer_scale`) before its submodules, as in
     every state dict;
  2. sibling submodules that are all known block members (`attention` < `intermediate` <
     `output`, `ln_1` < `attn` < `ln_2` < `mlp`, `query` < `key` < `value`, `embeddings` <
     `encoder` < `pooler`, ...) in the conventional order of `KNOWN_ORDER`;
  3. otherwise: output heads (`HEADS`: `classifier`, `fc`, `lm_head`, ...) last; before
     them numbered names by number (`0` < `2` < `10`, `conv1` < `bn1` < `conv2`), then the
     rest; at equal number, a layer (a module owning a >=2-D weight) before a module
     without one (a norm) before a container.

  Tested on torchvision-style VGG, ResNet, ConvNeXt, EfficientNet and ViT module trees,
  timm-style ViT and ConvNeXt, and Hugging Face BERT, RoBERTa, DistilBERT, GPT-2, ViT,
  LLaMA, T5, CLIP and ConvNeXt: the default selection is the same as from the PyTorch
  file of the same model. For other models pass a reference.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import RwsError
from .names import natural_key, strip_wrappers

# Sibling modules in the order model code registers them (one list: the pairs that occur
# together in real models are consistent with it). Used only when every sibling is listed.
KNOWN_ORDER = (
    # top levels: embeddings, body, final norm, pooler, heads
    "shared",
    "embeddings",
    "embedder",
    "embed_tokens",
    "embed_positions",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "wte",
    "wpe",
    "patch_embed",
    "patch_embeddings",
    "conv_proj",
    "stem",
    "pre_layrnorm",
    "pre_layernorm",
    "transformer",
    "encoder",
    "decoder",
    "stages",
    "h",
    "shortcut",
    "downsampling_layer",
    "layer",
    "layers",
    "downsample",
    "blocks",
    "block",
    # inside a transformer block
    "ln_1",
    "norm1",
    "attention",
    "attn",
    "self_attention",
    "self_attn",
    "SelfAttention",
    "EncDecAttention",
    "self",
    "query",
    "q",
    "q_proj",
    "q_lin",
    "key",
    "k",
    "k_proj",
    "k_lin",
    "value",
    "v",
    "v_proj",
    "v_lin",
    "qkv",
    "c_attn",
    "q_norm",
    "k_norm",
    "o",
    "o_proj",
    "out_lin",
    "dense",
    "out_proj",
    "proj",
    "relative_attention_bias",
    "ls1",
    "layernorm_before",
    "layer_norm1",
    "sa_layer_norm",
    "ln_2",
    "norm2",
    "layernorm_after",
    "dwconv",
    "layernorm",
    "pwconv1",
    "pwconv2",
    "intermediate",
    "mlp",
    "ffn",
    "feed_forward",
    "DenseReluDense",
    "c_fc",
    "c_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "wi",
    "wi_0",
    "wi_1",
    "wo",
    "ls2",
    "layer_norm2",
    "output_layer_norm",
    "input_layernorm",
    "post_attention_layernorm",
    "layer_norm",
    "output",
    "LayerNorm",
    # after the body
    "ln_f",
    "norm",
    "final_layer_norm",
    "post_layernorm",
    "ln",
    "fc_norm",
    "pooler",
    "pre_logits",
    "head",
    "heads",
    "pre_classifier",
    "classifier",
    "cls",
    "lm_head",
    "score",
    "qa_outputs",
)
_KNOWN_RANK = {name: i for i, name in enumerate(KNOWN_ORDER)}

# Output heads: last among their siblings when the order is not fully known.
HEADS = frozenset(
    {
        "classifier",
        "fc",
        "head",
        "heads",
        "lm_head",
        "pooler",
        "cls",
        "score",
        "qa_outputs",
        "pre_logits",
        "fc_norm",
        "ln_f",
        "final_layer_norm",
        "pre_classifier",
        "last_linear",
    }
)

_TRAILING_NUMBER = re.compile(r"(\d+)$")


class OrderSource(str, enum.Enum):
    """Where a depth order came from (recorded in the provenance)."""

    CHECKPOINT = "checkpoint"
    REFERENCE = "reference"
    RULES = "rules"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class DepthOrder:
    """Tensor names from input to output, and how that order was obtained."""

    names: list[str]
    source: OrderSource
    reference: str | None = None  # the reference's file name (or kind), for `reference`
    unplaced: list[str] = field(default_factory=list)  # names the reference did not list

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"depth_order": self.source.value}
        if self.reference is not None:
            out["order_reference"] = self.reference
        if self.unplaced:
            out["order_unplaced"] = len(self.unplaced)
        return out


def describe_order(selection: Mapping[str, Any]) -> str:
    """One line for people from a provenance `selection` object (torch-free, for inspect)."""
    source = selection.get("depth_order")
    if source == OrderSource.CHECKPOINT:
        return "checkpoint (the file's own module registration order)"
    if source == OrderSource.RULES:
        return "naming rules (safetensors stores names sorted)"
    if source == OrderSource.REFERENCE:
        unplaced = selection.get("order_unplaced")
        extra = f", {unplaced} names not in it placed by rules" if unplaced else ""
        return f"reference {selection.get('order_reference')}{extra}"
    return str(source) if source else "-"


OrderReference = str | os.PathLike | Mapping[str, Any] | Sequence[str] | Any


def depth_order(
    names: Sequence[str],
    *,
    ordered: bool,
    is_layer_weight: Callable[[str], bool],
    reference: OrderReference | None = None,
) -> DepthOrder:
    """The depth order of `names` (normalized tensor names).

    `ordered`: the names already follow registration order (a PyTorch file). A `reference`
    (see `read_reference`) takes precedence over both the file's order and the rules.
    """
    if reference is None:
        if ordered:
            return DepthOrder(list(names), OrderSource.CHECKPOINT)
        return DepthOrder(rule_order(names, is_layer_weight), OrderSource.RULES)
    listed, label = read_reference(reference)
    known = set(names)
    placed = [n for n in listed if n in known]
    if not placed:
        raise RwsError(
            f"the order reference {label} shares no tensor name with the checkpoint",
            fix="give a checkpoint (or a list of names) of the same architecture",
        )
    seen = set(placed)
    rest = [n for n in names if n not in seen]
    rest = rest if ordered else rule_order(rest, is_layer_weight)
    return DepthOrder(placed + rest, OrderSource.REFERENCE, label, rest)


def read_reference(reference: OrderReference) -> tuple[list[str], str]:
    """(normalized tensor names in depth order, a label) from a module, a state dict, a list
    of names, a PyTorch checkpoint file or folder, or a text file of names (one per line,
    `#` comments)."""
    import torch

    from .io import open_checkpoint

    if isinstance(reference, torch.nn.Module):
        return [strip_wrappers(n) for n in reference.state_dict()], type(reference).__name__
    if isinstance(reference, (list, tuple)):
        return [strip_wrappers(str(n)) for n in reference], "<list of names>"
    if isinstance(reference, Mapping):
        with open_checkpoint(reference) as ckpt:
            return ckpt.names, "<state dict>"
    path = os.fspath(reference)
    label = os.path.basename(os.path.normpath(path))
    if os.path.isfile(path) and _is_text(path):
        with open(path, encoding="utf-8") as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
        return [strip_wrappers(n) for n in lines if n], label
    with open_checkpoint(path) as ckpt:
        if not ckpt.ordered:
            raise RwsError(
                "a safetensors file stores names sorted, so it cannot give a depth order",
                path=path,
                fix="give a PyTorch checkpoint of the same architecture, or a text file "
                "listing the tensor names in order",
            )
        return ckpt.names, label


def _is_text(path: str) -> bool:
    """A UTF-8 text file (a list of names), not a checkpoint."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if b"\0" in head or head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------- naming rules


class _Node:
    """One module in the tree of dotted names: its own tensors and its submodules."""

    def __init__(self) -> None:
        self.tensors: dict[str, str] = {}  # last name part -> full name
        self.children: dict[str, _Node] = {}


_LAYER, _OTHER, _CONTAINER = 0, 1, 2


def rule_order(names: Iterable[str], is_layer_weight: Callable[[str], bool]) -> list[str]:
    """`names` in registration order as far as naming conventions tell (module docstring).

    `is_layer_weight(name)` says whether a tensor is a >=2-D floating weight (a layer's).
    """
    root = _Node()
    for name in names:
        *modules, leaf = name.split(".")
        node = root
        for part in modules:
            node = node.children.setdefault(part, _Node())
        node.tensors[leaf] = name
    out: list[str] = []
    _walk(root, is_layer_weight, out)
    return out


def _walk(node: _Node, is_layer_weight: Callable[[str], bool], out: list[str]) -> None:
    out.extend(node.tensors[leaf] for leaf in sorted(node.tensors, key=_tensor_key))
    for name in _sorted_children(node.children, is_layer_weight):
        _walk(node.children[name], is_layer_weight, out)


def _tensor_key(leaf: str) -> tuple:
    """A module's own tensors: weights, then biases, then the rest (as modules register)."""
    kind = 0 if leaf.endswith("weight") else 1 if leaf.endswith("bias") else 2
    return (kind, natural_key(leaf))


def _sorted_children(
    children: Mapping[str, _Node], is_layer_weight: Callable[[str], bool]
) -> list[str]:
    if all(name in _KNOWN_RANK for name in children):
        return sorted(children, key=_KNOWN_RANK.__getitem__)

    def key(name: str) -> tuple:
        match = _TRAILING_NUMBER.search(name)
        number = int(match.group(1)) if match else float("inf")
        role = _role(children[name], is_layer_weight)
        known = _KNOWN_RANK.get(name, len(KNOWN_ORDER))
        return (name in HEADS, number, role, known, natural_key(name))

    return sorted(children, key=key)


def _role(node: _Node, is_layer_weight: Callable[[str], bool]) -> int:
    if node.children:
        return _CONTAINER
    if any(leaf.endswith("weight") and is_layer_weight(n) for leaf, n in node.tensors.items()):
        return _LAYER
    return _OTHER
