"""TLSStore (the CA) from Python and the CLI's CA flags: generation, PEM round trips with
`cryptography`, key file permissions, mismatched pairs, --ca-dir / --print-ca / --export-ca."""

from __future__ import annotations

import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("cryptography")
import segproxy
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from segproxy import TLSStore, _engine, load_or_create_ca


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_generate_ca_with_asyncio_https_proxy_parameters():
    store = TLSStore.generate_ca(
        country="FR", state="IDF", locality="Paris", organization="Lab", common_name="Lab CA"
    )
    cert = x509.load_pem_x509_certificate(store.get_ca_pem())
    subject = cert.subject
    assert subject.get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "FR"
    assert subject.get_attributes_for_oid(NameOID.STATE_OR_PROVINCE_NAME)[0].value == "IDF"
    assert subject.get_attributes_for_oid(NameOID.LOCALITY_NAME)[0].value == "Paris"
    assert subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Lab"
    assert subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Lab CA"
    assert cert.issuer == subject
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    # Defaults work too.
    x509.load_pem_x509_certificate(TLSStore.generate_ca().get_ca_pem())
    x509.load_pem_x509_certificate(TLSStore().get_ca_pem())


def test_save_load_round_trip(tmp_path):
    store = TLSStore.generate_ca(common_name="round trip CA")
    key, cert = tmp_path / "ca.key", tmp_path / "ca.crt"
    store.save_ca_to_disk(key, cert)
    assert mode(key) == 0o600
    # The files interoperate with cryptography.
    loaded_cert = x509.load_pem_x509_certificate(cert.read_bytes())
    loaded_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert loaded_key.public_key().public_numbers() == loaded_cert.public_key().public_numbers()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0600 key is not warned about
        again = TLSStore.load_ca_from_disk(key, cert)
    assert again.get_ca_pem() == store.get_ca_pem()
    # The loaded CA mints certificates that chain to the saved certificate.
    leaf = x509.load_pem_x509_certificate(again.get_cert_pem("example.test"))
    leaf.verify_directly_issued_by(loaded_cert)
    assert again.minted == 1
    again.get_cert_pem("example.test")
    assert again.minted == 1  # cached


def test_mismatched_key_and_cert_rejected_clearly(tmp_path):
    a, b = TLSStore.generate_ca(), TLSStore.generate_ca()
    a.save_ca_to_disk(tmp_path / "a.key", tmp_path / "a.crt")
    b.save_ca_to_disk(tmp_path / "b.key", tmp_path / "b.crt")
    with pytest.raises(ValueError) as info:
        TLSStore.load_ca_from_disk(tmp_path / "a.key", tmp_path / "b.crt")
    assert "match" in str(info.value).lower(), info.value
    with pytest.raises(ValueError, match=r"(?i)match"):
        TLSStore.from_pem(a.get_ca_key_pem(), b.get_ca_pem())


def test_missing_or_garbage_files_rejected_clearly(tmp_path):
    store = TLSStore.generate_ca()
    store.save_ca_to_disk(tmp_path / "ca.key", tmp_path / "ca.crt")
    with pytest.raises(ValueError, match=r"nope\.key"):
        TLSStore.load_ca_from_disk(tmp_path / "nope.key", tmp_path / "ca.crt")
    (tmp_path / "junk.crt").write_text("not a certificate\n")
    with pytest.raises(ValueError):
        TLSStore.load_ca_from_disk(tmp_path / "ca.key", tmp_path / "junk.crt")


def test_key_file_readable_by_others_is_warned_about(tmp_path):
    store = TLSStore.generate_ca()
    key, cert = tmp_path / "ca.key", tmp_path / "ca.crt"
    store.save_ca_to_disk(key, cert)
    key.chmod(0o644)
    with pytest.warns(UserWarning, match="ca.key") as record:
        loaded = TLSStore.load_ca_from_disk(key, cert)
    assert loaded.get_ca_pem() == store.get_ca_pem()
    text = str(record[0].message).lower()
    assert "read" in text or "permission" in text or "0600" in text or "others" in text, text
    assert record[0].filename == __file__  # the warning points at the caller's line
    (tmp_path / "dir").mkdir()
    store.save_ca_to_disk(tmp_path / "dir" / "ca-key.pem", tmp_path / "dir" / "ca-cert.pem")
    (tmp_path / "dir" / "ca-key.pem").chmod(0o644)
    with pytest.warns(UserWarning, match="ca-key.pem") as record:
        load_or_create_ca(tmp_path / "dir")
    assert record[0].filename == __file__


def test_path_keywords_of_both_spellings(tmp_path):
    """key_file/cert_file (asyncio-https-proxy) and key_path/cert_path name the same paths."""
    store = TLSStore.generate_ca(
        country="FR", state="IDF", locality="Paris", organization="o", common_name="kw CA"
    )
    store.save_ca_to_disk(key_path=tmp_path / "k.pem", cert_path=tmp_path / "c.pem")
    store.save_ca_to_disk(key_file=tmp_path / "k2.pem", cert_file=tmp_path / "c2.pem")
    for loaded in (
        TLSStore.load_ca_from_disk(key_path=tmp_path / "k.pem", cert_path=tmp_path / "c.pem"),
        TLSStore.load_ca_from_disk(key_file=tmp_path / "k2.pem", cert_file=tmp_path / "c2.pem"),
        TLSStore.load_ca_from_disk(tmp_path / "k.pem", cert_path=tmp_path / "c.pem"),
    ):
        assert loaded.get_ca_pem() == store.get_ca_pem()
    with pytest.raises(TypeError, match="once each"):
        TLSStore.load_ca_from_disk(
            tmp_path / "k.pem", tmp_path / "c.pem", key_path=tmp_path / "k.pem"
        )
    with pytest.raises(TypeError, match="needs"):
        TLSStore.load_ca_from_disk(tmp_path / "k.pem")


def test_load_or_create_ca_creates_then_reuses(tmp_path):
    d = tmp_path / "cadir"
    first = load_or_create_ca(d)
    assert (d / "ca-key.pem").exists() and (d / "ca-cert.pem").exists()
    assert mode(d / "ca-key.pem") == 0o600
    second = load_or_create_ca(d)
    assert second.get_ca_pem() == first.get_ca_pem()
    (d / "ca-cert.pem").unlink()
    with pytest.raises(ValueError, match="only one"):
        load_or_create_ca(d)


def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "segproxy", *args], capture_output=True, timeout=60
    )


def test_cli_ca_dir_print_and_export(tmp_path):
    d = tmp_path / "ca"
    r = run_cli("--ca-dir", str(d), "--print-ca")
    assert r.returncode == 0, r.stderr
    pem = r.stdout
    assert (
        pem.startswith(b"-----BEGIN CERTIFICATE-----") and pem == (d / "ca-cert.pem").read_bytes()
    )
    x509.load_pem_x509_certificate(pem)
    assert mode(d / "ca-key.pem") == 0o600
    key_before = (d / "ca-key.pem").read_bytes()
    # Reused, not recreated.
    out = tmp_path / "exported.pem"
    r = run_cli("--ca-dir", str(d), "--export-ca", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == pem
    assert (d / "ca-key.pem").read_bytes() == key_before
    r = run_cli("--ca-dir", str(d), "--print-ca")
    assert r.stdout == pem
    # Without --ca-dir: a usage error.
    r = run_cli("--print-ca")
    assert r.returncode == 2 and b"--ca-dir" in r.stderr
    # A key others can read still works, with a plain warning naming the file.
    (d / "ca-key.pem").chmod(0o644)
    r = run_cli("--ca-dir", str(d), "--print-ca")
    assert r.returncode == 0 and r.stdout == pem
    assert (
        r.stderr.decode().startswith("segproxy: warning: ") and "ca-key.pem" in r.stderr.decode()
    ), r.stderr


def test_engine_minting_timer_available():
    mint, cached = _engine.time_minting(TLSStore().engine_ca, 10)
    assert 0 < cached < mint < 1.0


def test_start_proxy_server_refuses_a_non_store():
    import asyncio

    async def start():
        return await segproxy.start_proxy_server(port=0, tls_store="ca.pem")

    with pytest.raises(TypeError):
        asyncio.run(start())
