"""Token checks, token files, TLS contexts and the node flags that configure them."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from click.testing import CliRunner

from cluster.tls import make_certificates
from raftchan.cli import cli
from raftchan.config import ConfigError
from raftchan.security import (
    TLS_CA_ENV,
    TOKEN_ENV,
    client_ssl_context,
    read_tokens,
    resolve_token,
    server_ssl_context,
    token_accepted,
)

TOKENS = (b"alpha", b"beta")


@pytest.mark.parametrize("given", ["alpha", "beta", b"beta"])
def test_a_listed_token_is_accepted(given: str | bytes) -> None:
    assert token_accepted(given, TOKENS)


@pytest.mark.parametrize("given", ["alph", "alphaa", "", None, 7, ["alpha"], "ALPHA"])
def test_anything_else_is_refused(given: object) -> None:
    assert not token_accepted(given, TOKENS)


def test_token_file_lists_one_token_per_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_bytes(b"alpha\n\n  beta  \r\n")
    assert read_tokens(path) == TOKENS


def test_a_token_file_without_tokens_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("\n  \n")
    with pytest.raises(ConfigError, match="lists no token"):
        read_tokens(path)


def test_token_comes_from_the_argument_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert resolve_token(None) is None
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert resolve_token(None) == "from-env"
    assert resolve_token("given") == "given"


def test_client_tls_is_off_unless_asked_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(TLS_CA_ENV, raising=False)
    assert client_ssl_context(None) is None
    assert client_ssl_context(False) is None
    system = client_ssl_context(True)
    assert system is not None and system.verify_mode == ssl.CERT_REQUIRED
    assert system.check_hostname
    certificates = make_certificates(tmp_path, ["127.0.0.1"])
    monkeypatch.setenv(TLS_CA_ENV, str(certificates.ca_file))
    from_env = client_ssl_context(None)
    assert from_env is not None and from_env.check_hostname
    assert client_ssl_context(False) is None  # explicit off beats the environment
    mine = ssl.create_default_context()
    assert client_ssl_context(mine) is mine


def test_unreadable_tls_files_are_config_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match="CA file"):
        client_ssl_context(junk)
    with pytest.raises(ConfigError, match="TLS certificate"):
        server_ssl_context(junk, junk)


def node_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "node",
        "--name=n1",
        "--client-address=127.0.0.1:17101",
        "--peer-address=127.0.0.1:17201",
        "--peers=127.0.0.1:17202,127.0.0.1:17203",
        f"--data-dir={tmp_path / 'n1'}",
        *extra,
        "--check-config",
    ]


@pytest.mark.timeout(30)
def test_node_flags_check_tls_and_token_files(tmp_path: Path) -> None:
    runner = CliRunner()
    certificates = make_certificates(tmp_path / "tls", ["127.0.0.1"])
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha\n")
    good = runner.invoke(
        cli,
        node_args(
            tmp_path,
            f"--tls-cert-file={certificates.cert_file}",
            f"--tls-key-file={certificates.key_file}",
            f"--token-file={tokens}",
        ),
    )
    assert good.exit_code == 0, good.output

    half = runner.invoke(cli, node_args(tmp_path, f"--tls-cert-file={certificates.cert_file}"))
    assert half.exit_code == 2
    assert "go together" in half.output

    mismatched = make_certificates(tmp_path / "other", ["127.0.0.1"])
    wrong_key = runner.invoke(
        cli,
        node_args(
            tmp_path,
            f"--tls-cert-file={certificates.cert_file}",
            f"--tls-key-file={mismatched.key_file}",
        ),
    )
    assert wrong_key.exit_code == 2
    assert "cannot load the TLS certificate" in wrong_key.output

    empty = tmp_path / "empty"
    empty.write_text("")
    no_tokens = runner.invoke(cli, node_args(tmp_path, f"--token-file={empty}"))
    assert no_tokens.exit_code == 2
    assert "lists no token" in no_tokens.output
