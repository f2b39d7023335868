"""Real self-signed certificates made with the openssl command line (no extra Python dependency)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CertificateFiles:
    """A PEM certificate and its private key."""

    cert: Path
    key: Path

    @property
    def pem(self) -> str:
        """The certificate as PEM text (what a client is given as its CA)."""
        return self.cert.read_text(encoding="ascii")


def self_signed(
    directory: Path, name: str = "server", *, ip: str = "127.0.0.1", dns: str = "localhost"
) -> CertificateFiles:
    """A certificate for `ip` and `dns`, valid for a day, signed by its own EC key."""
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command line makes the test certificates"
    directory.mkdir(parents=True, exist_ok=True)
    files = CertificateFiles(directory / f"{name}.crt", directory / f"{name}.key")
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-days", "1", "-subj", f"/CN={dns}", "-addext", f"subjectAltName=DNS:{dns},IP:{ip}",
            "-keyout", str(files.key), "-out", str(files.cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return files


def issued_by_a_ca(directory: Path, *, ip: str = "127.0.0.1", dns: str = "localhost") -> tuple[CertificateFiles, Path]:
    """A leaf certificate (not a CA) issued by a CA made here, as cert-manager writes it: tls.crt holds the leaf
    and then the CA. Returns the server's files and the CA certificate (ca.crt)."""
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command line makes the test certificates"
    ca = self_signed(directory, "ca", dns="test-ca")
    leaf_key, request, leaf = directory / "tls.key", directory / "leaf.csr", directory / "leaf.crt"
    extensions = directory / "leaf.ext"
    extensions.write_text(
        f"basicConstraints=CA:FALSE\nsubjectAltName=DNS:{dns},IP:{ip}\nextendedKeyUsage=serverAuth\n", encoding="ascii"
    )
    run = lambda *args: subprocess.run([openssl, *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={dns}",
        "-keyout", str(leaf_key), "-out", str(request))  # fmt: skip
    run("x509", "-req", "-in", str(request), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
        "-days", "1", "-extfile", str(extensions), "-out", str(leaf))  # fmt: skip
    chain = directory / "tls.crt"
    chain.write_text(leaf.read_text(encoding="ascii") + ca.pem, encoding="ascii")
    return CertificateFiles(chain, leaf_key), ca.cert
