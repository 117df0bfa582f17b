"""Client authentication and TLS: the token check on the node, and both ends' SSL contexts.

A node may require a token (``raftchan node --token-file``): the client sends it in its
hello, and the node compares it with each token its file lists, in constant time, before
it reads any request. A node may serve TLS (``--tls-cert-file``/``--tls-key-file``); the
client then verifies the node's certificate against the CAs it trusts and checks that the
certificate names the host it dialled.
"""

from __future__ import annotations

import hmac
import os
import ssl
from pathlib import Path

from raftchan.config import ConfigError

__all__ = [
    "TLS_CA_ENV",
    "TOKEN_ENV",
    "ClientTLS",
    "client_ssl_context",
    "read_tokens",
    "resolve_token",
    "server_ssl_context",
    "token_accepted",
]

#: The token a client sends when none is given in code.
TOKEN_ENV = "RAFTCHAN_TOKEN"
#: A CA bundle a client trusts (and so turns TLS on) when no ``tls=`` is given in code.
TLS_CA_ENV = "RAFTCHAN_TLS_CA_FILE"

#: What a client's ``tls=`` may be: off (None/False; None also reads $RAFTCHAN_TLS_CA_FILE),
#: the system's CAs (True), a CA bundle file, or a ready context.
ClientTLS = bool | str | os.PathLike[str] | ssl.SSLContext | None


def resolve_token(token: str | None) -> str | None:
    """The token a client sends: ``token`` if given, else ``$RAFTCHAN_TOKEN`` if set."""
    if token is not None:
        return token
    return os.environ.get(TOKEN_ENV) or None


def client_ssl_context(tls: ClientTLS) -> ssl.SSLContext | None:
    """The context a client dials with, or None for plain TCP.

    A certificate must verify against the trusted CAs and name the host dialled.
    Raises ConfigError for a CA file that cannot be read.
    """
    if tls is None:
        tls = os.environ.get(TLS_CA_ENV) or None
    if tls is None or tls is False:
        return None
    if isinstance(tls, ssl.SSLContext):
        return tls
    try:
        if tls is True:
            context = ssl.create_default_context()
        else:
            context = ssl.create_default_context(cafile=os.fspath(tls))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS CA file {tls}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def server_ssl_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The node's TLS context; ConfigError if the certificate or key cannot be loaded."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=cert_file, keyfile=key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS certificate {cert_file} with key {key_file}: {exc}"
        ) from None
    return context


def read_tokens(path: Path) -> tuple[bytes, ...]:
    """The tokens a node accepts: one per non-empty line of ``path``.

    Several lines let an operator rotate tokens: add the new one, move the clients, drop
    the old one. Raises ConfigError for an unreadable file or one without any token.
    """
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc}") from None
    tokens = tuple(line.strip() for line in lines if line.strip())
    if not tokens:
        raise ConfigError(f"the token file {path} lists no token")
    return tokens


def token_accepted(given: object, tokens: tuple[bytes, ...]) -> bool:
    """True if ``given`` (a hello's ``token`` field) is one of ``tokens``.

    Every token is compared, each in constant time, so the answer's timing tells nothing
    about which one came close.
    """
    if isinstance(given, str):
        candidate = given.encode()
    elif isinstance(given, bytes):
        candidate = given
    else:
        return False
    accepted = False
    for token in tokens:
        accepted |= hmac.compare_digest(candidate, token)
    return accepted
