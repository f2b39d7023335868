"""TLS for the control port from certificate files, so the token never crosses a network in the clear."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class TlsSettingsError(Exception):
    """Certificate settings the server cannot start with; the message says which file and why."""


def control_tls_enabled(settings: Mapping[str, Any]) -> bool:
    """Whether the control port speaks HTTPS."""
    return bool(settings["control_tls_cert"] or settings["control_tls_key"])


def server_context(settings: Mapping[str, Any]) -> ssl.SSLContext | None:
    """The context the control port serves with, or None for plain HTTP.

    Raises TlsSettingsError for one file without the other, a file that cannot be read, or a key that does
    not belong to the certificate: a server that was asked for TLS never falls back to plain HTTP.
    """
    cert, key = settings["control_tls_cert"], settings["control_tls_key"]
    if not (cert or key):
        return None
    if not (cert and key):
        missing = "CONTROL_TLS_KEY" if cert else "CONTROL_TLS_CERT"
        msg = (
            f"{missing} is not set: CONTROL_TLS_CERT and CONTROL_TLS_KEY go together "
            "(the certificate and its private key), set both or neither"
        )
        raise TlsSettingsError(msg)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for name, path in (("CONTROL_TLS_CERT", cert), ("CONTROL_TLS_KEY", key)):
        try:
            with Path(path).open("rb"):  # only to tell which file is missing or unreadable
                pass
        except OSError as err:
            msg = f"{name} {path} cannot be read: {err.strerror or err}"
            raise TlsSettingsError(msg) from err
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            msg = f"the key CONTROL_TLS_KEY {key} does not belong to the certificate CONTROL_TLS_CERT {cert}"
        else:
            msg = f"CONTROL_TLS_CERT {cert} / CONTROL_TLS_KEY {key} are no PEM certificate and key ({err.reason})"
        raise TlsSettingsError(msg) from err
    return context


def local_client_context(settings: Mapping[str, Any]) -> ssl.SSLContext:
    """For this machine's own calls to its control port (`whisper-gpu health`, `models list`).

    The server's own certificate is the only trust anchor: the answer must come from whoever holds its key.
    The host name is not checked, because the loopback address is rarely among a certificate's names
    (cert-manager issues it for the Service's DNS names).
    """
    context = ssl.create_default_context(cafile=settings["control_tls_cert"])
    context.check_hostname = False
    # The certificate may be a leaf signed by a CA this machine does not know: trust it as it is.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context
