"""Quantization round trips: every bits x symmetric/affine x granularity x source dtype,
checked against the quantizer's own error bound and, bit for bit, against the reference
reader written from the spec."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import reference_reader
import torch

import rwsfmt
from rwsfmt.errors import RwsError
from rwsfmt.quant import QuantConfig

SOURCE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LINEAR = list(itertools.product([4, 8, 16], [True, False], ["tensor", "channel", "group"]))


def _tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    conv = 0.05 * torch.randn(8, 3, 3, 3, generator=g)
    conv[5] = 0  # an all-zero channel: scale 0, no division by zero
    shifted = torch.randn(5, 11, generator=g) + 3  # all positive: affine zero point 0
    return {
        "conv": conv.to(dtype),
        "linear": torch.randn(6, 17, generator=g).to(dtype),
        "bias": torch.randn(7, generator=g).to(dtype),
        "shifted": shifted.to(dtype),
        "scalar": torch.tensor(-0.3).to(dtype),
        "zeros": torch.zeros(3, 4, dtype=dtype),
        "empty": torch.zeros(0, 4, dtype=dtype),
    }


def _groups(x: torch.Tensor, quant: dict) -> list[torch.Tensor]:
    """The element sets that share one scale, per the spec's granularity table."""
    flat = x.reshape(-1)
    if quant["granularity"] == "channel":
        return list(x.reshape(x.shape[0], math.prod(x.shape[1:])))
    if quant["granularity"] == "group":
        return list(flat.split(quant["group_size"]))
    return [flat]


def _check_bound(x: torch.Tensor, y: torch.Tensor, quant: dict) -> None:
    """Symmetric: every error <= scale/2. Affine: <= scale (the zero point is rounded too).
    Plus float32 rounding of the decoded value (a few ulps of the group's largest value)."""
    bits, symmetric = quant["bits"], quant["symmetric"]
    for gx, gy in zip(_groups(x, quant), _groups(y, quant), strict=True):
        if gx.numel() == 0:
            continue
        if symmetric:
            bound = float(gx.abs().max()) / (2 ** (bits - 1) - 1) / 2
        else:
            span = float(gx.max().clamp(min=0) - gx.min().clamp(max=0))
            bound = span / (2**bits - 1)
        ulps = 4 * float(torch.finfo(torch.float32).eps) * float(gx.abs().max())
        assert float((gx - gy).abs().max()) <= bound + ulps + 1e-30


@pytest.mark.parametrize("dtype", SOURCE_DTYPES, ids=str)
@pytest.mark.parametrize(("bits", "symmetric", "granularity"), LINEAR)
def test_linear_round_trip(tmp_path, dtype, bits, symmetric, granularity):
    tensors = _tensors(dtype)
    config = QuantConfig(bits=bits, symmetric=symmetric, granularity=granularity, group_size=16)
    path = tmp_path / "q.rws"
    rwsfmt.save(rwsfmt.from_tensors(tensors, label="t", quant=config), path)
    _, reference = reference_reader.read(str(path))
    with rwsfmt.load(path) as sig:
        for name, x in tensors.items():
            info = sig.info(name)
            y = sig.tensor(name)
            assert y.dtype == torch.float32 and y.shape == x.shape
            assert info.dtype == str(dtype).removeprefix("torch.")
            assert info.bits == bits and info.quant["symmetric"] is symmetric
            _check_bound(x.float(), y, info.quant)
            assert np.array_equal(y.numpy().view(np.uint32), reference[name].view(np.uint32))
            if name in ("zeros", "empty"):
                assert not y.any()
            assert info.stats["quant_rel_error"] == pytest.approx(
                _rel(y, x.float()), rel=1e-4, abs=1e-12
            )
        assert sig.info("conv").granularity == granularity
        assert sig.info("bias").granularity == (
            "tensor" if granularity == "channel" else granularity
        )


@pytest.mark.parametrize("dtype", SOURCE_DTYPES, ids=str)
def test_float32_is_exact(tmp_path, dtype):
    tensors = _tensors(dtype)
    info = torch.finfo(dtype)  # negative zero, a subnormal, the most negative value
    special = [-0.0, info.smallest_normal / 4, -info.max, 1.5]
    tensors["special"] = torch.tensor(special, dtype=torch.float64).to(dtype)
    path = tmp_path / "f.rws"
    rwsfmt.save(rwsfmt.from_tensors(tensors, label="t", quant=QuantConfig(bits=32)), path)
    _, reference = reference_reader.read(str(path))
    with rwsfmt.load(path) as sig:
        for name, x in tensors.items():
            y = sig.tensor(name)
            want = x.float().numpy().view(np.uint32)
            assert np.array_equal(y.numpy().view(np.uint32), want), name
            assert np.array_equal(reference[name].view(np.uint32), want), name


def _rel(y: torch.Tensor, x: torch.Tensor) -> float:
    norm = float(x.double().norm())
    return float((y.double() - x.double()).norm()) / norm if norm else 0.0


@pytest.mark.parametrize(("bits", "limit"), [(8, 1e-2), (16, 1e-4)])
def test_error_bounds_on_gaussian_data(bits, limit):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "conv": torch.randn(64, 32, 3, 3, generator=g),
        "fc": torch.randn(128, 256, generator=g),
    }
    sig = rwsfmt.from_tensors(tensors, label="g", quant=QuantConfig(bits=bits))
    for name, x in tensors.items():
        error = _rel(sig.tensor(name), x)
        assert error <= limit, (name, error)
        assert sig.info(name).stats["quant_rel_error"] == pytest.approx(error, rel=1e-4)


def test_targets_are_exact_whatever_the_delta_bits():
    var = torch.rand(16) * 1e-3 + 1e-7  # running_var close to zero: quantizing would hurt
    builder = rwsfmt.SignatureBuilder("t", QuantConfig(bits=4))
    builder.add("bn.running_var", var, kind="target")
    sig = builder.build()
    assert sig.info("bn.running_var").quant == {"scheme": "float", "bits": 32}
    assert torch.equal(sig.tensor("bn.running_var"), var)


def test_group_size_far_larger_than_the_tensor_allocates_nothing_big():
    config = QuantConfig(bits=8, granularity="group", group_size=2**31)
    x = torch.randn(10)
    sig = rwsfmt.from_tensors({"x": x}, label="t", quant=config)
    assert sig.info("x").n_scales == 1
    assert _rel(sig.tensor("x"), x) < 1e-2


def test_nibble_order_and_padding_follow_the_spec():
    # symmetric 4-bit per tensor, scale = 7/7 = 1: codes are x + 8 exactly
    x = torch.tensor([-7.0, -1.0, 0.0, 3.0, 7.0])
    sig = rwsfmt.from_tensors({"x": x}, label="t", quant=QuantConfig(bits=4, granularity="tensor"))
    payload = bytes(sig.payload("x"))
    assert payload[:4] == np.float32(1.0).tobytes()
    assert payload[4:] == bytes([1 | 7 << 4, 8 | 11 << 4, 15])  # low nibble first, pad 0
    assert torch.equal(sig.tensor("x"), x)


def test_writer_rounds_half_to_even_and_clamps():
    # scale = 127/127 = 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (half to even); -127 stays in range
    x = torch.tensor([0.5, 1.5, 2.5, -127.0, 127.0])
    sig = rwsfmt.from_tensors({"x": x}, label="t", quant=QuantConfig(bits=8, granularity="tensor"))
    codes = list(bytes(sig.payload("x"))[4:])
    assert codes == [128, 130, 130, 1, 255]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_refused(bad):
    with pytest.raises(RwsError, match="NaN or infinite"):
        rwsfmt.from_tensors({"x": torch.tensor([1.0, bad])}, label="t")


@pytest.mark.parametrize("kwargs", [{"bits": 3}, {"granularity": "row"}, {"group_size": 0}])
def test_bad_quant_config_is_refused(kwargs):
    with pytest.raises(RwsError):
        QuantConfig(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("bits", "symmetric", "granularity"), LINEAR)
def test_cuda_decode_is_bit_exact(bits, symmetric, granularity):
    config = QuantConfig(bits=bits, symmetric=symmetric, granularity=granularity, group_size=16)
    sig = rwsfmt.from_tensors(_tensors(torch.float32), label="t", quant=config)
    for name in sig.names:
        on_gpu = sig.tensor(name, device="cuda")
        assert on_gpu.device.type == "cuda"
        assert torch.equal(on_gpu.cpu(), sig.tensor(name))
