"""Signed `.rws` files (spec section 14): keys, `sign`, `verify --key`, `apply --key`, and the
goal: every random single-byte change to a signed file fails verification against its key."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import reference_reader
import torch
from click.testing import CliRunner
from conftest import assemble, small_tensors, split, write_small
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

import rwsfmt
from rwsfmt.container import read_header
from rwsfmt.errors import IntegrityError, RwsError, SignatureError
from rwsfmt.signing import block as sigblock
from rwsfmt_cli.main import main

serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa  # noqa: E402

REGIONS = ("preamble", "header", "data", "signature block")


def run(*args: object, env: dict | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return result.exit_code, result.output


@pytest.fixture
def keys(tmp_path):
    """Two key pairs on disk: (tmp_path / "key", "key.pub") and ("other", "other.pub")."""
    for name in ("key", "other"):
        rwsfmt.generate_key(tmp_path / name)
    return tmp_path / "key", tmp_path / "other"


@pytest.fixture
def signed(tmp_path, keys):
    """A signed copy of the small test file, and the unsigned original's bytes."""
    path = write_small(tmp_path / "fog.rws")
    unsigned = path.read_bytes()
    rwsfmt.sign(path, keys[0])
    return path, unsigned


def regions(data: bytes) -> dict[str, range]:
    """The byte ranges of a signed file's four parts."""
    header_len, data_len = split_lengths(data)
    end = 64 + header_len + data_len
    return {
        "preamble": range(0, 64),
        "header": range(64, 64 + header_len),
        "data": range(64 + header_len, end),
        "signature block": range(end, len(data)),
    }


def split_lengths(data: bytes) -> tuple[int, int]:
    """(header_length, data_length) from a file's preamble."""
    return int.from_bytes(data[16:24], "little"), int.from_bytes(data[24:32], "little")


def fails(path, key) -> bool:
    """Whether `rwsfmt verify --key` would fail (exit 1 or 2) on `path`."""
    try:
        return not rwsfmt.verify(path, key=key).ok
    except RwsError:
        return True


# --------------------------------------------------------------------------- the goal


def test_every_random_single_byte_change_fails_verify_with_the_key(signed, keys, tmp_path):
    """1,000 seeded single-byte changes, 250 in each part of the file (preamble, header, data
    section, signature block with its key and signature bytes): every one must fail."""
    path, _ = signed
    good = path.read_bytes()
    public = rwsfmt.signing.load_public_key(f"{keys[0]}.pub")
    assert rwsfmt.verify(path, key=public).ok
    parts = regions(good)
    assert len(parts["signature block"]) == sigblock.BLOCK_BYTES
    rng = random.Random(20240601)
    damaged = tmp_path / "damaged.rws"
    detected, tried = 0, 0
    for i in range(1000):
        where = parts[REGIONS[i % 4]]
        pos = rng.choice(where)
        data = bytearray(good)
        data[pos] = (data[pos] + rng.randrange(1, 256)) % 256  # always a different byte
        damaged.write_bytes(data)
        tried += 1
        detected += fails(damaged, public)
    print(f"\nsingle-byte changes detected by verify --key: {detected} of {tried}")
    assert (detected, tried) == (1000, 1000)


def test_changes_with_every_checksum_recomputed_fail_on_the_signature(signed, keys, tmp_path):
    """An attacker who recomputes every checksum (blob SHA-256, header digest, block
    checksum) is caught by the signature alone."""
    path, _ = signed
    good = path.read_bytes()
    public = f"{keys[0]}.pub"
    fields, doc, data = split(good)
    block = good[-sigblock.BLOCK_BYTES :]

    def rewrite(new_doc: dict, new_data: bytes, new_block: bytes = block) -> str:
        forged = assemble(new_doc, new_data, minor=1, flags=1) + new_block
        path.write_bytes(forged)
        report = rwsfmt.verify(path, key=public)
        assert not report.ok and rwsfmt.verify(path).ok  # intact, but not what was signed
        return report.problems[-1]

    relabelled = json.loads(json.dumps(doc))
    relabelled["label"] = "snow"
    assert "does not verify" in rewrite(relabelled, data)

    first = doc["tensors"][0]  # stored raw: its last byte is a quantized value, any is valid
    assert first["codec"] == "raw"
    tampered = bytearray(data)
    tampered[first["length"] - 1] ^= 1
    retagged = json.loads(json.dumps(doc))
    retagged["tensors"][0]["sha256"] = hashlib.sha256(tampered[: first["length"]]).hexdigest()
    assert "does not verify" in rewrite(retagged, bytes(tampered))

    rng = random.Random(7)
    for offset in range(16, 112):  # every byte of the public key and the signature
        body = bytearray(block[:112])
        body[offset] ^= 1 << rng.randrange(8)
        problem = rewrite(doc, data, bytes(body) + hashlib.sha256(body).digest())
        assert ("not by the given key" if offset < 48 else "does not verify") in problem

    mine = ed25519.Ed25519PrivateKey.generate()  # a valid signature, by another key
    forged = sigblock.SignatureBlock(
        mine.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        mine.sign(sigblock.signed_message(good[32:64])),
    )
    assert "not by the given key" in rewrite(doc, data, forged.to_bytes())

    path.write_bytes(assemble(doc, data))  # signature stripped: a valid unsigned file
    assert rwsfmt.verify(path).ok
    assert "not signed" in rwsfmt.verify(path, key=public).problems[0]


# --------------------------------------------------------------------------- the layout


def test_a_signed_file_is_the_unsigned_file_plus_a_block(signed, keys):
    path, unsigned = signed
    data = path.read_bytes()
    block = data[len(unsigned) :]
    assert len(block) == sigblock.BLOCK_BYTES and block.startswith(b"RWSSIG\0\0")
    assert data[:10] == unsigned[:10]  # magic and major
    assert data[10:16] == (1).to_bytes(2, "little") + (1).to_bytes(4, "little")  # 1.1, TRAILER
    assert data[16:32] == unsigned[16:32] and data[64 : len(unsigned)] == unsigned[64:]
    assert (
        data[32:64] == hashlib.sha256(data[:32] + data[64 : 64 + split_lengths(data)[0]]).digest()
    )
    public = ed25519.Ed25519PublicKey.from_public_bytes(block[16:48])
    public.verify(block[48:112], b"rwsfmt-signature-v1\0" + data[32:64])  # spec 14.2
    assert block[112:] == hashlib.sha256(block[:112]).digest()
    fingerprint = "sha256:" + hashlib.sha256(block[16:48]).hexdigest()
    assert rwsfmt.verify(path, key=f"{keys[0]}.pub").signed_by == fingerprint


def test_a_1_0_reader_reads_a_signed_file(signed):
    path, unsigned = signed
    doc, tensors = reference_reader.read(str(path))  # written from spec 1.0: ignores the block
    (path.parent / "plain.rws").write_bytes(unsigned)
    plain_doc, plain_tensors = reference_reader.read(str(path.parent / "plain.rws"))
    assert doc == plain_doc
    assert all((tensors[n].view("u4") == plain_tensors[n].view("u4")).all() for n in tensors)
    report = rwsfmt.verify(path)  # no key: every byte checked, the signature shown
    assert report.ok and report.version == "1.1" and report.signature_verified is None
    with rwsfmt.load(path) as sig:
        assert torch.equal(
            sig.tensor("fc.weight"), rwsfmt.load(path.parent / "plain.rws").tensor("fc.weight")
        )


def test_signing_is_deterministic_and_rewriting_drops_the_signature(signed, keys, tmp_path):
    path, unsigned = signed
    once = path.read_bytes()
    rwsfmt.sign(path, keys[0])  # the same key again: the same bytes
    assert path.read_bytes() == once
    copy = tmp_path / "copy.rws"
    rwsfmt.save(rwsfmt.load(path), copy)  # a new file: unsigned, version 1.0 as before
    assert copy.read_bytes() == unsigned


def test_another_keys_signature_is_replaced_only_when_asked(signed, keys):
    path, _ = signed
    before = path.read_bytes()
    code, out = run("sign", path, "--key", keys[1])
    assert code == 2 and "already signed by another key" in out and "--replace" in out
    assert path.read_bytes() == before
    code, out = run("sign", path, "--key", keys[1], "--replace")
    assert code == 0, out
    assert rwsfmt.verify(path, key=f"{keys[1]}.pub").ok
    assert not rwsfmt.verify(path, key=f"{keys[0]}.pub").ok


def test_sign_refuses_a_damaged_file_and_keeps_the_mode(tmp_path, keys):
    path = write_small(tmp_path / "fog.rws")
    os.chmod(path, 0o640)
    rwsfmt.sign(path, keys[0])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    data = bytearray(path.read_bytes())
    data[-sigblock.BLOCK_BYTES - 3] ^= 0xFF  # in the last blob
    path.write_bytes(data)
    code, out = run("sign", path, "--key", keys[0])
    assert code == 2 and "damaged" in out and "must not vouch" in out
    assert path.read_bytes() == data


def test_bytes_after_the_data_section_must_be_one_valid_block(signed):
    path, _ = signed
    good = path.read_bytes()
    body = bytearray(good[-sigblock.BLOCK_BYTES : -32])
    body[8] = 2  # block version 2, checksum recomputed: a newer writer's block
    path.write_bytes(good[: -sigblock.BLOCK_BYTES] + body + hashlib.sha256(body).digest())
    with pytest.raises(RwsError, match="(?s)version 2.*upgrade") as caught:
        rwsfmt.load(path)
    assert not isinstance(caught.value, IntegrityError)
    for tail, message in [(good + b"\0", "bytes follow"), (good[:-1], "bytes follow")]:
        path.write_bytes(tail)
        with pytest.raises(IntegrityError, match=message):
            rwsfmt.load(path)
    path.write_bytes(good[:-10] + b"\xff" + good[-9:])  # damage in the block, no key needed
    assert "signature block checksum" in rwsfmt.verify(path).problems[0]


def _flagged_file() -> bytes:
    """The small test file with the TRAILER flag set and nothing after its data section."""
    with tempfile.TemporaryDirectory() as folder:
        _, doc, data = split(write_small(Path(folder) / "x.rws").read_bytes())
    return assemble(doc, data, minor=1, flags=1)


FLAGGED = _flagged_file()
VALID_BLOCK = sigblock.SignatureBlock(bytes(range(32)), bytes(64)).to_bytes()


@given(st.one_of(st.binary(max_size=300), st.just(VALID_BLOCK)))
def test_any_trailing_bytes_are_refused_cleanly_or_read(trailer):
    """Whatever follows the data section, the reader raises RwsError or parses one block."""
    with tempfile.TemporaryFile() as f:
        f.write(FLAGGED + trailer)
        try:
            header = read_header(f, "fuzz.rws")
        except RwsError:
            return
    assert header.signature is not None and header.signature.to_bytes() == trailer


# --------------------------------------------------------------------------- the commands


def test_keygen_sign_verify_inspect_round_trip(tmp_path):
    key = tmp_path / "release"
    code, out = run("keygen", "-o", key)
    assert code == 0, out
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    public_line = (tmp_path / "release.pub").read_text()
    assert public_line.startswith("ssh-ed25519 ")
    fingerprint = out.split("key fingerprint: ")[1].split()[0]
    assert public_line.rstrip().endswith(fingerprint)

    code, out = run("keygen", "-o", key)
    assert code == 2 and "already exists" in out and "--force" in out
    code, _ = run("keygen", "-o", key, "--force")
    assert code == 0 and stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert (tmp_path / "release.pub").read_text() != public_line

    path = write_small(tmp_path / "fog.rws")
    code, out = run("verify", path, "--key", f"{key}.pub")
    assert code == 1 and "not signed" in out
    code, out = run("sign", path, "--key", key)
    assert code == 0 and "signed" in out
    code, out = run("verify", path, "--key", f"{key}.pub")
    assert code == 0 and "signature verified" in out, out
    code, out = run("verify", path)
    assert code == 0 and "not checked: pass --key" in out
    code, out = run("verify", "--json", path, "--key", f"{key}.pub")
    report = json.loads(out)["files"][0]
    assert code == 0 and report["signature_verified"] is True
    code, out = run("inspect", "--json", path)
    assert json.loads(out)["signature"]["algorithm"] == "ed25519"
    code, out = run("inspect", path)
    assert code == 0 and "signed by" in out and "check with verify --key" in out


def test_verify_with_the_wrong_key_or_no_signature_exits_1(signed, keys, tmp_path):
    path, unsigned = signed
    code, out = run("verify", path, "--key", f"{keys[1]}.pub")
    assert code == 1 and "not by the given key" in out
    plain = tmp_path / "plain.rws"
    plain.write_bytes(unsigned)
    code, out = run("verify", path, plain, "--key", f"{keys[0]}.pub")
    assert code == 1 and "OK" in out and "not signed" in out


def test_bad_key_files_exit_2_with_a_clear_message(signed, keys, tmp_path):
    path, _ = signed
    garbage = tmp_path / "garbage.pub"
    garbage.write_bytes(b"\x00\x01not a key\n")
    model = tmp_path / "model.pt"  # a model, not a .rws in its place (refused before the key)
    torch.save({"w": torch.zeros(2)}, model)
    rsa_key = tmp_path / "rsa.pub"
    rsa_key.write_bytes(
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    cases = [
        (("verify", path, "--key", keys[0]), "is a private key"),
        (("verify", path, "--key", garbage), "is not a public key"),
        (("verify", path, "--key", rsa_key), "not an Ed25519 key"),
        (("verify", path, "--key", tmp_path / "missing.pub"), "no such file"),
        (("verify", path, "--key", tmp_path), "is a directory"),
        (("sign", path, "--key", f"{keys[0]}.pub"), "is a public key"),
        (("sign", path, "--key", garbage), "is not a private key"),
        (("apply", model, path, "-a", "1", "--dry-run", "--key", keys[0]), "is a private key"),
    ]
    for args, message in cases:
        code, out = run(*args)
        assert code == 2 and message in out and "Traceback" not in out, (args, out)


def test_a_tampered_public_key_file_fails(signed, keys):
    path, _ = signed
    public = keys[0].with_name("key.pub")
    kind, blob, comment = public.read_text().split(" ", 2)
    assert len(blob) == 68  # 51 bytes: no padding bits a decoder could ignore
    for i in range(len(blob)):
        other = "B" if blob[i] != "B" else "C"
        public.write_text(f"{kind} {blob[:i]}{other}{blob[i + 1 :]} {comment}")
        assert fails(path, public), i
    raw = bytearray(base64.b64decode(blob))
    raw[-1] ^= 1  # a well-formed key, just not the signer's
    public.write_text(f"{kind} {base64.b64encode(raw).decode()}")
    code, out = run("verify", path, "--key", public)
    assert code == 1 and "not by the given key" in out


def test_encrypted_and_openssh_private_keys(tmp_path):
    key = tmp_path / "locked"
    env = {"RWSFMT_KEY_PASSPHRASE": "correct horse"}
    code, out = run("keygen", "-o", key, "--encrypt", env=env)
    assert code == 0, out
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    path = write_small(tmp_path / "fog.rws")
    code, out = run("sign", path, "--key", key)  # no terminal to ask on
    assert code == 2 and "no passphrase" in out and "RWSFMT_KEY_PASSPHRASE" in out
    code, out = run("sign", path, "--key", key, env={"RWSFMT_KEY_PASSPHRASE": "wrong"})
    assert code == 2 and "check the passphrase" in out
    code, out = run("sign", path, "--key", key, env=env)
    assert code == 0 and rwsfmt.verify(path, key=f"{key}.pub").ok

    ssh = tmp_path / "id_ed25519"
    private = ed25519.Ed25519PrivateKey.generate()
    ssh.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    line = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    (tmp_path / "id_ed25519.pub").write_bytes(line + b" me@host\n")
    code, out = run("sign", path, "--key", ssh, "--replace")
    assert code == 0, out
    code, out = run("verify", path, "--key", tmp_path / "id_ed25519.pub")
    assert code == 0, out


# --------------------------------------------------------------------------- apply --key


@pytest.fixture
def model_and_sigs(tmp_path, keys):
    """A safetensors model, a signed and an unsigned signature of it."""
    from safetensors.torch import save_file
    from test_patch import make_net, make_sig

    model = make_net()
    save_file(model.state_dict(), tmp_path / "std.safetensors")
    rwsfmt.save(make_sig(model, 1, label="fog"), tmp_path / "fog.rws")
    rwsfmt.save(make_sig(model, 2, label="snow"), tmp_path / "snow.rws")
    rwsfmt.sign(tmp_path / "fog.rws", keys[0])
    return tmp_path


def test_apply_checks_signatures_before_any_work(model_and_sigs, keys):
    tmp = model_and_sigs
    model, fog, snow = tmp / "std.safetensors", tmp / "fog.rws", tmp / "snow.rws"
    out = tmp / "out.safetensors"
    public = f"{keys[0]}.pub"

    refused = [
        (("--require-signature",), snow, "needs --key"),
        (("--key", public, "--require-signature"), snow, "not signed"),
        (("--key", f"{keys[1]}.pub"), fog, "not by the given key"),
        (("--key", f"{keys[1]}.pub", "--require-signature"), fog, "not by the given key"),
    ]
    for options, sig, message in refused:
        code, text = run("apply", model, sig, "-a", "1", "-o", out, *options)
        assert code == 2 and message in text, (options, text)
        assert not out.exists()

    fields, doc, data = split(fog.read_bytes())  # a re-checksummed forgery
    doc["label"] = "forged"
    fog.write_bytes(assemble(doc, data, minor=1, flags=1) + fog.read_bytes()[-144:])
    code, text = run("apply", model, fog, "-a", "1", "-o", out, "--key", public)
    assert code == 2 and "does not verify" in text and not out.exists()

    rwsfmt.save(rwsfmt.load(snow), fog)  # fog.rws replaced by a file signed below
    rwsfmt.sign(fog, keys[0])
    code, text = run(
        "apply", model, fog, "-a", "1", "-o", out, "--key", public, "--require-signature"
    )
    assert code == 0, text
    checked = load_file(out)
    out.unlink()
    code, text = run("apply", model, snow, "-a", "1", "-o", out)
    # the check changes no tensor written (the record of what was applied names each file)
    assert code == 0 and all(torch.equal(checked[k], v) for k, v in load_file(out).items())

    result = CliRunner().invoke(
        main, ["apply", str(model), str(snow), "-a", "1", "-o", str(out), "--key", public]
    )
    assert result.exit_code == 0 and "is not signed; applied unchecked" in result.output


def test_load_with_a_key(signed, keys, tmp_path):
    path, unsigned = signed
    public = f"{keys[0]}.pub"
    with rwsfmt.load(path, key=public) as sig:
        assert sig.signed_by == rwsfmt.verify(path).signed_by
        assert torch.equal(sig.tensor("fc.weight"), rwsfmt.load(path).tensor("fc.weight"))
    plain = tmp_path / "plain.rws"
    plain.write_bytes(unsigned)
    with pytest.raises(SignatureError, match="not signed"):
        rwsfmt.load(plain, key=public)
    assert rwsfmt.load(plain, key=public, allow_unsigned=True).signed_by is None
    with pytest.raises(SignatureError, match="not by the given key"):
        rwsfmt.load(path, key=f"{keys[1]}.pub", allow_unsigned=True)
    assert rwsfmt.from_tensors(small_tensors(), label="x").signed_by is None


# --------------------------------------------------------------------------- no cryptography


def test_without_cryptography_signing_says_what_to_install(signed, keys, monkeypatch, tmp_path):
    path, _ = signed
    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RwsError, match=r"pip install 'rwsfmt\[sign\]'"):
        rwsfmt.generate_key(tmp_path / "new")
    for args in (
        ("keygen", "-o", tmp_path / "new"),
        ("sign", path, "--key", keys[0]),
        ("verify", path, "--key", f"{keys[0]}.pub"),
    ):
        code, out = run(*args)
        assert code == 2 and "pip install 'rwsfmt[sign]'" in out and "Traceback" not in out
    assert not (tmp_path / "new").exists()
    report = rwsfmt.verify(path)  # no key: no cryptography needed
    assert report.ok and report.signed_by.startswith("sha256:")
    code, out = run("inspect", path)
    assert code == 0 and "signed by" in out


def test_inspect_and_verify_without_a_key_import_no_cryptography(signed):
    path, _ = signed
    code = (
        "import sys\n"
        "from rwsfmt_cli.main import main\n"
        "for args in (['inspect', sys.argv[1]], ['verify', sys.argv[1]]):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), exc.code\n"
        "assert not any(m.startswith('cryptography') for m in sys.modules)\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
