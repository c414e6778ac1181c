"""Quantization round trips: every bits x symmetric/affine x granularity x source dtype,
checked against the quantizer's own error bound and, bit for bit, against the reference
reader written from the spec."""

from __future__ import annotations

import itertools
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import reference_reader
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


# --------------------------------------------------------------------------- zero and extreme rows

SETTINGS = [QuantConfig(bits=32)] + [
    QuantConfig(bits=b, symmetric=s, granularity=g, group_size=64) for b, s, g in LINEAR
]
ZERO_ROWS = [0, 1, 2, 97, 200, 254, 255]  # first, consecutive, middle, last


def _dead_channel_tensors() -> dict[str, torch.Tensor]:
    """Real layer shapes with hundreds of output channels (the vectorised CPU path, where
    torch.maximum(+0.0, -0.0) is -0.0) and all-zero rows at every position."""
    g = torch.Generator().manual_seed(11)
    conv = 0.05 * torch.randn(256, 8, 3, 3, generator=g)
    conv[ZERO_ROWS] = 0.0
    fc = 0.1 * torch.randn(300, 32, generator=g)
    fc[[0, 150, 151, 299]] = 0.0
    embedding = torch.randn(512, 8, generator=g)
    embedding[-100:] = 0.0  # BERT-style unused rows
    bias = torch.randn(256, generator=g)
    bias[ZERO_ROWS] = 0.0
    dead = torch.zeros_like(conv)  # a layer training never changed
    return {"conv": conv, "fc": fc, "embedding": embedding, "bias": bias, "dead": dead}


@pytest.mark.parametrize("config", SETTINGS, ids=lambda c: str(c.to_json()))
def test_dead_channels_give_files_both_readers_accept(tmp_path, config):
    tensors = _dead_channel_tensors()
    path = tmp_path / "dead.rws"
    rwsfmt.save(rwsfmt.from_tensors(tensors, label="dead", quant=config), path)
    report = rwsfmt.verify(path)
    assert report.ok, report.problems
    _, reference = reference_reader.read(str(path))
    with rwsfmt.load(path) as sig:
        for name, x in tensors.items():
            y = sig.tensor(name)
            assert np.array_equal(y.numpy().view(np.uint32), reference[name].view(np.uint32))
            assert not y[x == 0].numpy().view(np.uint32).any(), name  # +0.0, never -0.0
            info = sig.info(name)
            if info.bits == 32:
                assert torch.equal(y, x)
                continue
            _check_bound(x, y, info.quant)
            numbers = np.frombuffer(sig.payload(name), "<u4", count=info.values_offset // 4)
            assert not (numbers >> 31).any(), name  # no scale or zero point is -0.0
            whole_rows = name != "bias" and info.granularity != "tensor"
            if name == "dead" or whole_rows:  # all-zero groups, so zero scales, were there
                assert (numbers[: info.n_scales] == 0).any(), name


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
TINY = float(torch.finfo(torch.float32).smallest_normal)


def _extremes() -> dict[str, torch.Tensor]:
    """Rows at the float32 limit, subnormal rows, a constant row, mixed magnitudes."""
    g = torch.Generator().manual_seed(5)
    huge = torch.rand(64, 20, generator=g) * FLOAT32_MAX
    huge[::2] *= -1
    huge[3, 7], huge[4, 2] = FLOAT32_MAX, -FLOAT32_MAX
    tiny = torch.randn(64, 20, generator=g) * TINY / 8  # subnormal
    tiny[5, 0] = 1e-45  # the smallest subnormal
    mixed = torch.randn(64, 20, generator=g)
    mixed[1] = FLOAT32_MAX
    mixed[2] = 1e-44
    mixed[3] = -7.5  # constant
    mixed[4] = 0.0
    return {"huge": huge, "tiny": tiny, "mixed": mixed}


@pytest.mark.parametrize("config", SETTINGS, ids=lambda c: str(c.to_json()))
def test_extreme_values_decode_finite_or_are_refused_before_writing(tmp_path, config):
    """Symmetric and exact storage take any finite tensor; affine may refuse, clearly and
    before writing, only values within a step of the float32 limit."""
    for name, x in _extremes().items():
        path = tmp_path / f"{name}.rws"
        try:
            sig = rwsfmt.from_tensors({name: x}, label="x", quant=config)
        except RwsError as exc:
            assert not config.symmetric and config.bits != 32 and name in ("huge", "mixed")
            assert f"tensor {name!r}" in str(exc) and "bits=32" in str(exc)
            continue
        rwsfmt.save(sig, path)
        assert rwsfmt.verify(path).ok
        _, reference = reference_reader.read(str(path))
        y = rwsfmt.load(path).tensor(name)
        assert torch.isfinite(y).all()
        assert np.array_equal(y.numpy().view(np.uint32), reference[name].view(np.uint32))
        error = sig.info(name).stats["quant_rel_error"]
        assert math.isfinite(error) and error == pytest.approx(_rel(y, x), rel=1e-4, abs=1e-12)
        if name == "huge" and config.bits != 32:  # no worse than the grid, far from overflow
            assert error < 2 / (2 ** (config.bits - 1) - 1)


def test_affine_refusal_names_the_tensor_and_the_fix():
    x = torch.tensor([FLOAT32_MAX, -FLOAT32_MAX, 1.0])
    with pytest.raises(RwsError, match=r"(?s)tensor 'w'.*float32 limit.*bits=32.*symmetric"):
        rwsfmt.from_tensors({"w": x}, label="t", quant=QuantConfig(symmetric=False))
    one_sided = torch.tensor([FLOAT32_MAX, 0.0, 1.0])  # zero point 0: the grid ends at the max
    sig = rwsfmt.from_tensors({"w": one_sided}, label="t", quant=QuantConfig(symmetric=False))
    assert torch.isfinite(sig.tensor("w")).all()


def test_symmetric_scales_round_toward_zero():
    """qmax * scale never exceeds max|x|, so the largest value cannot decode past it."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(500, 7, generator=g)
    x *= torch.logspace(-30, 38, 500)[:, None] / x.abs().amax(dim=1, keepdim=True)
    for bits in (4, 8, 16):
        sig = rwsfmt.from_tensors({"x": x}, label="t", quant=QuantConfig(bits=bits))
        scales = np.frombuffer(sig.payload("x"), "<f4", count=500).astype(np.float64)
        qmax = 2 ** (bits - 1) - 1
        assert (qmax * scales <= x.abs().amax(dim=1).double().numpy()).all()
        assert (scales > 0).all()


# --------------------------------------------------------------------------- property


def _row(kind: str, width: int, seed: int) -> torch.Tensor:
    """One row of the property test's tensors: zero, constant, tiny, huge or normal values."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (width,), generator=g) * 2.0 - 1
    if kind == "zero":
        return torch.zeros(width)
    if kind == "constant":
        return torch.full((width,), float(torch.randn(1, generator=g)) * 10.0 ** (seed % 40 - 20))
    if kind == "tiny":  # subnormal: below 1.2e-38, down to 1.4e-45
        return signs * torch.rand(width, generator=g) * TINY
    if kind == "huge":  # up to the float32 limit
        return signs * (1 - torch.rand(width, generator=g) / 2) * FLOAT32_MAX
    return torch.randn(width, generator=g) * 10.0 ** (seed % 20 - 10)


ROWS = st.lists(
    st.tuples(st.sampled_from(["zero", "constant", "tiny", "huge", "normal"]), st.integers(0, 999)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, derandomize=True, deadline=None)
@given(
    rows=ROWS,
    width=st.integers(0, 40),
    split=st.sampled_from([None, 2, 4]),
    bits=st.sampled_from([4, 8, 16, 32]),
    symmetric=st.booleans(),
    granularity=st.sampled_from(["tensor", "channel", "group"]),
    group_size=st.sampled_from([1, 3, 16, 64]),
)
def test_whatever_save_writes_both_readers_decode_to_the_same_finite_bits(
    rows, width, split, bits, symmetric, granularity, group_size
):
    """Random row mixes and shapes: `save` either writes a file that verify and the reference
    reader accept, decoding to identical finite float32 bits, or raises a clear RwsError
    before writing anything (only for affine storage of values near the float32 limit)."""
    x = torch.stack([_row(kind, width, seed) for kind, seed in rows])
    if split and width % split == 0:
        x = x.reshape(len(rows), split, width // split)  # a rank-3, conv-like shape
    config = QuantConfig(bits, symmetric, granularity, group_size)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.rws"
        try:
            sig = rwsfmt.from_tensors({"x": x, "flat": x.reshape(-1)}, label="p", quant=config)
            rwsfmt.save(sig, path)
        except RwsError as exc:
            assert not symmetric and bits != 32 and "huge" in {kind for kind, _ in rows}
            assert "tensor '" in str(exc) and "fix: " in str(exc)
            assert not path.exists()
            return
        assert rwsfmt.verify(path).ok
        _, reference = reference_reader.read(str(path))
        with rwsfmt.load(path) as sig:
            for name in ("x", "flat"):
                y = sig.tensor(name).numpy()
                assert np.isfinite(y).all()
                assert np.array_equal(y.view(np.uint32), reference[name].view(np.uint32))
                assert math.isfinite(sig.info(name).stats["quant_rel_error"])
