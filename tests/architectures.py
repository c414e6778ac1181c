"""Real architectures built in code, with the exact module names of torchvision and timm.

Neither package can be installed beside the pinned torch here, so the module trees are
rebuilt: same names, same registration order, same kinds of layers (widths scaled down by
`width` so tests stay fast). Hugging Face models come from `transformers` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def conv_norm_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: 0 conv, 1 BatchNorm, 2 activation."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.SiLU(),
    )


# ---------------------------------------------------------------- torchvision


def vgg16(width: int = 4, classes: int = 10) -> nn.Module:
    """torchvision.models.vgg16: features.{0,2,5,7,10,...} convs, classifier.{0,3,6}."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers: list[nn.Module] = []
    cin = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v // width, 3, padding=1), nn.ReLU()]
            cin = v // width
    model = nn.Module()
    model.features = nn.Sequential(*layers)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    hidden = 4096 // (width * 8)
    model.classifier = nn.Sequential(
        nn.Linear(cin, hidden), nn.ReLU(), nn.Dropout(),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(),
        nn.Linear(hidden, classes),
    )  # fmt: skip
    return model


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        mid = cout // 4
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )


def _resnet(block: Callable, depths: list[int], expansion: int, width: int, classes: int):
    model = nn.Module()
    stem = 64 // width
    model.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(stem)
    model.relu = nn.ReLU()
    model.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = stem
    for i, depth in enumerate(depths, 1):
        cout = (64 * 2 ** (i - 1) * expansion) // width
        blocks = []
        for j in range(depth):
            blocks.append(block(cin, cout, 2 if (j == 0 and i > 1) else 1))
            cin = cout
        setattr(model, f"layer{i}", nn.Sequential(*blocks))
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.fc = nn.Linear(cin, classes)
    return model


def resnet18(width: int = 4, classes: int = 10) -> nn.Module:
    """torchvision.models.resnet18: conv1, bn1, layer1-4 of BasicBlocks, fc."""
    return _resnet(_BasicBlock, [2, 2, 2, 2], 1, width, classes)


def resnet50(width: int = 4, classes: int = 10) -> nn.Module:
    """torchvision.models.resnet50: Bottleneck blocks with conv1-3, bn1-3, downsample."""
    return _resnet(_Bottleneck, [3, 4, 6, 3], 4, width, classes)


class LayerNorm2d(nn.LayerNorm):
    """torchvision's channels-first LayerNorm (same parameters as nn.LayerNorm)."""


class _CNBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim),
            nn.Identity(),  # Permute
            nn.LayerNorm(dim),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            nn.Identity(),
        )
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))


def convnext_tiny(width: int = 4, classes: int = 10) -> nn.Module:
    """torchvision.models.convnext_tiny: features.0 stem (conv, LayerNorm2d), stages of
    CNBlocks (layer_scale, block.{0,2,3,5}), downsampling (LayerNorm2d, conv), classifier."""
    dims = [96 // width, 192 // width, 384 // width, 768 // width]
    layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))]
    for i, (dim, depth) in enumerate(zip(dims, [3, 3, 9, 3], strict=True)):
        layers.append(nn.Sequential(*(_CNBlock(dim) for _ in range(depth))))
        if i < 3:
            layers.append(nn.Sequential(LayerNorm2d(dim), nn.Conv2d(dim, dims[i + 1], 2, 2)))
    model = nn.Module()
    model.features = nn.Sequential(*layers)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(
        LayerNorm2d(dims[-1]), nn.Flatten(1), nn.Linear(dims[-1], classes)
    )
    return model


class _SqueezeExcitation(nn.Module):
    def __init__(self, dim: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(dim, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, dim, 1)


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_norm_act(cin, mid, 1))
        layers.append(conv_norm_act(mid, mid, k, stride, groups=mid))
        layers.append(_SqueezeExcitation(mid, max(1, cin // 4)))
        layers.append(nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = nn.Identity()


def efficientnet_b0(width: int = 4, classes: int = 10) -> nn.Module:
    """torchvision.models.efficientnet_b0: features.0 stem, MBConv stages (block.{0..3},
    squeeze-excitation fc1/fc2), features.8 head conv, classifier.1."""
    stages = [(1, 16, 1, 3, 1), (6, 24, 2, 3, 2), (6, 40, 2, 5, 2), (6, 80, 3, 3, 2),
              (6, 112, 3, 5, 1), (6, 192, 4, 5, 2), (6, 320, 1, 3, 1)]  # fmt: skip
    cin = 32 // width
    layers: list[nn.Module] = [conv_norm_act(3, cin, 3, 2)]
    for expand, cout, repeats, k, stride in stages:
        cout //= width
        blocks = []
        for j in range(repeats):
            blocks.append(_MBConv(cin, cout, expand, k, stride if j == 0 else 1))
            cin = cout
        layers.append(nn.Sequential(*blocks))
    layers.append(conv_norm_act(cin, 1280 // width, 1))
    model = nn.Module()
    model.features = nn.Sequential(*layers)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280 // width, classes))
    return model


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.dropout = nn.Dropout()
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(), nn.Linear(4 * dim, dim), nn.Dropout()
        )


def vit_b_16(width: int = 8, classes: int = 10, depth: int = 4) -> nn.Module:
    """torchvision.models.vit_b_16: class_token, conv_proj, encoder.pos_embedding,
    encoder.layers.encoder_layer_N.{ln_1, self_attention, ln_2, mlp.{0,3}}, encoder.ln,
    heads.head."""
    dim = 768 // width
    model = nn.Module()
    model.conv_proj = nn.Conv2d(3, dim, 16, 16)
    model.class_token = nn.Parameter(torch.zeros(1, 1, dim))
    encoder = nn.Module()
    encoder.pos_embedding = nn.Parameter(torch.randn(1, 197, dim) * 0.02)
    encoder.dropout = nn.Dropout()
    encoder.layers = nn.Sequential()
    for i in range(depth):
        encoder.layers.add_module(f"encoder_layer_{i}", _EncoderBlock(dim))
    encoder.ln = nn.LayerNorm(dim)
    model.encoder = encoder
    model.heads = nn.Sequential()
    model.heads.add_module("head", nn.Linear(dim, classes))
    return model


# ---------------------------------------------------------------- timm


class _TimmAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class _TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class _TimmBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _TimmAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _TimmMlp(dim, 4 * dim)


def timm_vit(width: int = 8, classes: int = 10, depth: int = 4) -> nn.Module:
    """timm's vit_base_patch16_224: cls_token, pos_embed, patch_embed.proj,
    blocks.N.{norm1, attn.{qkv, proj}, norm2, mlp.{fc1, fc2}}, norm, head."""
    dim = 768 // width
    model = nn.Module()
    model.patch_embed = nn.Module()
    model.patch_embed.proj = nn.Conv2d(3, dim, 16, 16)
    model.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    model.pos_embed = nn.Parameter(torch.randn(1, 197, dim) * 0.02)
    model.blocks = nn.Sequential(*(_TimmBlock(dim) for _ in range(depth)))
    model.norm = nn.LayerNorm(dim)
    model.head = nn.Linear(dim, classes)
    return model


class _TimmConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = _TimmMlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))


def timm_convnext(width: int = 4, classes: int = 10) -> nn.Module:
    """timm's convnext_tiny: stem.{0,1}, stages.N.{downsample.{0,1}, blocks.M.{gamma,
    conv_dw, norm, mlp.{fc1, fc2}}}, head.{norm, fc}."""
    dims = [96 // width, 192 // width, 384 // width, 768 // width]
    model = nn.Module()
    model.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))
    model.stages = nn.Sequential()
    for i, (dim, depth) in enumerate(zip(dims, [3, 3, 9, 3], strict=True)):
        stage = nn.Module()
        if i > 0:
            stage.downsample = nn.Sequential(
                LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, 2)
            )
        stage.blocks = nn.Sequential(*(_TimmConvNeXtBlock(dim) for _ in range(depth)))
        model.stages.append(stage)
    model.head = nn.Module()
    model.head.norm = nn.LayerNorm(dims[-1])
    model.head.fc = nn.Linear(dims[-1], classes)
    return model


CODE_BUILT: dict[str, Callable[[], nn.Module]] = {
    "torchvision-vgg16": vgg16,
    "torchvision-resnet18": resnet18,
    "torchvision-resnet50": resnet50,
    "torchvision-convnext_tiny": convnext_tiny,
    "torchvision-efficientnet_b0": efficientnet_b0,
    "torchvision-vit_b_16": vit_b_16,
    "timm-vit_base_patch16": timm_vit,
    "timm-convnext_tiny": timm_convnext,
}


# ---------------------------------------------------------------- Hugging Face


def hugging_face() -> dict[str, Callable[[], nn.Module]]:
    """Tiny real `transformers` models (random weights, built from configs), or {} when
    transformers is not installed."""
    try:
        import transformers as tf
    except ImportError:
        return {}
    tf.logging.set_verbosity_error()
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return {
        "hf-bert": lambda: tf.BertForSequenceClassification(
            tf.BertConfig(vocab_size=100, max_position_embeddings=64, **small)
        ),
        "hf-roberta": lambda: tf.RobertaForMaskedLM(
            tf.RobertaConfig(vocab_size=100, max_position_embeddings=70, **small)
        ),
        "hf-distilbert": lambda: tf.DistilBertForSequenceClassification(
            tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
        ),
        "hf-gpt2": lambda: tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)
        ),
        "hf-vit": lambda: tf.ViTForImageClassification(
            tf.ViTConfig(image_size=32, patch_size=8, **small)
        ),
        "hf-llama": lambda: tf.LlamaForCausalLM(
            tf.LlamaConfig(vocab_size=100, num_key_value_heads=2, **small)
        ),
        "hf-t5": lambda: tf.T5ForConditionalGeneration(
            tf.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
        ),
        "hf-clip-vision": lambda: tf.CLIPVisionModel(
            tf.CLIPVisionConfig(image_size=32, patch_size=8, **small)
        ),
        "hf-convnext": lambda: tf.ConvNextForImageClassification(
            tf.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[2, 2])
        ),
        "hf-resnet": lambda: tf.ResNetForImageClassification(
            tf.ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[2, 2])
        ),
    }


def tiny_bert_config(**overrides: Any) -> Any:
    """A transformers BERT config of width 16, 2 blocks and 64 words (`overrides` change it)."""
    import transformers

    settings = {
        "vocab_size": 64,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 16,
    }
    return transformers.BertConfig(**{**settings, **overrides})
