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
