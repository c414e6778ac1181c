"""Patching on a GPU: on-device dequantization, bit-exact removal, `apply --device cuda`."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_patch import assert_bit_equal, make_net, make_sig, snapshot

import rwsfmt
import rwsfmt.signature
from rwsfmt_cli.main import main

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_patch_on_cuda_matches_cpu_and_removes_bit_for_bit(dtype):
    cpu_model = make_net(dtype=dtype)
    model = make_net(dtype=dtype).cuda()
    original = snapshot(model)
    params = dict(model.named_parameters())
    sigs = [make_sig(cpu_model, s, label=f"s{s}") for s in (1, 2)]
    first = rwsfmt.patch(model, sigs[0], 0.8)
    second = rwsfmt.patch(model, sigs[1], 0.4)
    assert all(p.is_cuda and p is params[n] for n, p in model.named_parameters())
    expected = rwsfmt.apply(cpu_model.state_dict(), [(sigs[0], 0.8), (sigs[1], 0.4)])
    for name, value in model.state_dict().items():
        assert value.dtype == expected[name].dtype
        torch.testing.assert_close(value.cpu(), expected[name], rtol=1e-2, atol=1e-5)
    first.remove()  # out of order
    second.remove()
    assert_bit_equal(snapshot(model), original)


def test_signature_is_dequantized_on_the_device(monkeypatch):
    model = make_net().cuda()
    sig = make_sig(make_net(), 1)
    seen = []
    real = rwsfmt.signature.decode

    def spy(payload, info, device=None):
        seen.append((type(payload).__name__, torch.device(device).type))
        return real(payload, info, device)

    monkeypatch.setattr(rwsfmt.signature, "decode", spy)
    with rwsfmt.patched(model, [(sig, 0.8)]):
        pass
    assert len(seen) == len(sig.names)
    assert {device for _, device in seen} == {"cuda"}  # only payload bytes were on the host


def test_apply_cli_on_cuda(tmp_path):
    model = make_net()
    save_file(model.state_dict(), tmp_path / "std.safetensors")
    rwsfmt.save(make_sig(model, 1), tmp_path / "fog.rws")
    args = ["apply", str(tmp_path / "std.safetensors"), str(tmp_path / "fog.rws"), "-a", "0.8"]
    result = CliRunner().invoke(main, [*args, "--device", "cuda", "-o", str(tmp_path / "g.st")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "c.st")])
    assert result.exit_code == 0, result.output
    on_gpu, on_cpu = load_file(tmp_path / "g.st"), load_file(tmp_path / "c.st")
    patched = {c for c in on_cpu if not torch.equal(on_cpu[c], model.state_dict()[c])}
    for name, value in on_gpu.items():
        if name in patched:
            torch.testing.assert_close(value, on_cpu[name], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(value, on_cpu[name]), name
