"""Client authentication by token and client TLS, against real node processes.

A node started with ``--token-file`` answers a hello without one of its tokens with
``unauthorized`` and reads nothing more from that connection; the client raises
:class:`raftchan.Unauthorized` at once instead of retrying to its deadline. A node started
with ``--tls-cert-file``/``--tls-key-file`` serves TLS; the client verifies the certificate
against the CA it was given and the address it dialled.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import raftchan
from cluster.fixtures import started_cluster
from cluster.harness import LocalCluster
from cluster.tls import CertificateFiles, make_certificates
from raftchan.security import TLS_CA_ENV, TOKEN_ENV

CLIENT_TIMEOUT = 20.0
TOKENS = ("first-token", "second-token")


@pytest.fixture(name="token_cluster")
def token_cluster_fixture(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LocalCluster]:
    token_file = tmp_path / "tokens"
    token_file.write_text("\n".join(TOKENS) + "\n")
    # The harness asks the nodes for their status through a client: it needs a token too.
    monkeypatch.setenv(TOKEN_ENV, TOKENS[1])
    with started_cluster(
        request, tmp_path / "cluster", extra_args=["--token-file", str(token_file)]
    ) as local:
        yield local


def test_any_listed_token_is_accepted(token_cluster: LocalCluster) -> None:
    for token in TOKENS:
        with raftchan.Client(token_cluster.addresses, token=token, timeout=CLIENT_TIMEOUT) as c:
            chan = c.channel("tokens")
            chan.append(token)
            chan.flush()
    # No token= given: $RAFTCHAN_TOKEN is used.
    with raftchan.Client(token_cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
        assert list(client.channel("tokens").data) == list(TOKENS)


@pytest.mark.parametrize("token", ["wrong-token", "first-token-but-longer", None])
def test_a_client_without_a_valid_token_gets_unauthorized_and_changes_nothing(
    token_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch, token: str | None
) -> None:
    if token is None:
        monkeypatch.delenv(TOKEN_ENV)
    intruder = raftchan.Client(token_cluster.addresses, token=token, timeout=CLIENT_TIMEOUT)
    monkeypatch.setenv(TOKEN_ENV, TOKENS[0])
    with intruder:
        with pytest.raises(raftchan.Unauthorized) as refused:
            intruder.channel("guarded")  # opening a channel creates it: a write
        assert "requires a token" in str(refused.value)
        # The refusal is final: the next call fails at once too, without a new attempt.
        with pytest.raises(raftchan.Unauthorized):
            intruder.channel("guarded")

    with raftchan.Client(token_cluster.addresses, timeout=CLIENT_TIMEOUT) as client:
        statuses = client.status()
    assert [s.get("channels") for s in statuses] == [0, 0, 0], statuses


# ------------------------------------------------------------------------------------ TLS


@pytest.fixture(name="certificates")
def certificates_fixture(tmp_path: Path) -> CertificateFiles:
    return make_certificates(tmp_path / "tls", ["127.0.0.1"])


@pytest.fixture(name="tls_cluster")
def tls_cluster_fixture(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    certificates: CertificateFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[LocalCluster]:
    monkeypatch.setenv(TLS_CA_ENV, str(certificates.ca_file))
    tls_args = [
        "--tls-cert-file",
        str(certificates.cert_file),
        "--tls-key-file",
        str(certificates.key_file),
    ]
    with started_cluster(request, tmp_path / "cluster", extra_args=tls_args) as local:
        yield local


def test_a_client_that_trusts_the_ca_works_over_tls(
    tls_cluster: LocalCluster, certificates: CertificateFiles
) -> None:
    with raftchan.Client(
        tls_cluster.addresses, tls=certificates.ca_file, timeout=CLIENT_TIMEOUT
    ) as client:
        chan = client.channel("over-tls")
        assert chan.put({"secret": "payload"}) == 0
        assert list(chan.data) == [{"secret": "payload"}]
        seen = []
        for item in chan:  # long polls ride the same TLS connections
            seen.append(item)
            break
        assert seen == [{"secret": "payload"}]


def test_a_node_signed_by_another_ca_is_not_trusted(
    tls_cluster: LocalCluster, tmp_path: Path
) -> None:
    other = make_certificates(tmp_path / "other", ["127.0.0.1"], ca_name="someone else")
    with (
        raftchan.Client(tls_cluster.addresses, tls=other.ca_file, timeout=CLIENT_TIMEOUT) as c,
        pytest.raises(raftchan.NodeNotTrusted),
    ):
        c.channel("never")


def test_a_certificate_must_name_the_address_dialled(
    tls_cluster: LocalCluster, certificates: CertificateFiles
) -> None:
    # Same node, same CA, but dialled as "localhost": the certificate names only 127.0.0.1.
    addresses = tls_cluster.addresses.replace("127.0.0.1", "localhost")
    with (
        raftchan.Client(addresses, tls=certificates.ca_file, timeout=CLIENT_TIMEOUT) as c,
        pytest.raises(raftchan.NodeNotTrusted),
    ):
        c.channel("never")


def test_a_plain_client_gets_nothing_from_a_tls_node(tls_cluster: LocalCluster) -> None:
    with (
        raftchan.Client(tls_cluster.addresses, tls=False, timeout=3.0) as client,
        # Every node drops the handshake; which of the two the deadline ends with depends
        # on where the last attempt was.
        pytest.raises((raftchan.NoLeader, raftchan.Timeout)),
    ):
        client.channel("never")
