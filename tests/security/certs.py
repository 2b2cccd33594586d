"""Certificates for the TLS tests, made with the ``openssl`` command: a CA, a server
certificate for 127.0.0.1/localhost signed by it, and a client certificate for mutual TLS."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(where: Path) -> Certs:
    """A fresh CA and two leaf certificates under ``where`` (each test session its own)."""
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests need the openssl command (apt-get install openssl)")
    where.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=pluto-test-ca", "-keyout", "ca.key", "-out", "ca.pem", cwd=where)
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                   "extendedKeyUsage=serverAuth,clientAuth\n")
    for leaf in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=pluto-test-{leaf}",
                 "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr", cwd=where)
        _openssl("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", f"{leaf}.pem",
                 cwd=where)
    return Certs(where / "ca.pem", where / "server.pem", where / "server.key",
                 where / "client.pem", where / "client.key")
