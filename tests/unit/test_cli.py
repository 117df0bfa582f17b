"""The raftchan command line: parsing, refusals and help, run in-process with CliRunner.

Every ``node`` invocation here is refused by the real NodeConfig.validate before anything
binds a port; the timeout marks bound the damage should one ever start a node instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from raftchan.cli import RAFT_TUNING_FLAGS, cli, format_table, leader_of, read_node_toml
from raftchan.config import RaftTuning

# 0.0.0.0 is not loopback, yet a node that wrongly accepted it would only ever dial the
# loopback peers below.
NON_LOOPBACK = "0.0.0.0:17201"
PEERS = "127.0.0.1:17202,127.0.0.1:17203"


def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(
        cli, list(args), env=env, catch_exceptions=False, prog_name="raftchan"
    )


def node_args(tmp_path: Path, **overrides: str) -> list[str]:
    options = {
        "--name": "n1",
        "--client-address": "127.0.0.1:17101",
        "--peer-address": "127.0.0.1:17201",
        "--peers": PEERS,
        "--data-dir": str(tmp_path / "n1"),
        **overrides,
    }
    return ["node", *(part for pair in options.items() for part in pair)]


@pytest.mark.timeout(30)
def test_node_refuses_non_loopback_peer_without_secret(tmp_path: Path) -> None:
    result = run(*node_args(tmp_path, **{"--peer-address": NON_LOOPBACK}))

    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Error: refusing to start: a non-loopback peer address needs")
    assert "--cluster-secret-file" in lines[0]
    assert not (tmp_path / "n1").exists()


@pytest.mark.timeout(30)
def test_node_refuses_an_empty_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("  \n")

    result = run(
        *node_args(tmp_path, **{"--peer-address": NON_LOOPBACK}),
        "--cluster-secret-file",
        str(secret),
    )

    assert result.exit_code == 2
    assert "cluster secret file" in result.output
    assert "is empty" in result.output


@pytest.mark.timeout(30)
def test_node_refuses_its_own_address_among_peers(tmp_path: Path) -> None:
    result = run(*node_args(tmp_path, **{"--peers": "127.0.0.1:17201,127.0.0.1:17202"}))

    assert result.exit_code == 2
    assert "--peers must list the OTHER nodes" in result.output


@pytest.mark.timeout(30)
def test_node_refuses_a_malformed_address(tmp_path: Path) -> None:
    result = run(*node_args(tmp_path, **{"--client-address": "no-port-here"}))

    assert result.exit_code == 2
    assert "is not HOST:PORT" in result.output


def test_help_works_for_every_command() -> None:
    top = run("--help")
    assert top.exit_code == 0
    for name in cli.commands:
        assert name in top.output
        result = run(name, "--help")
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"Usage: raftchan {name} ")


def test_hidden_test_aid_stays_out_of_node_help() -> None:
    assert "--record-synced" not in run("node", "--help").output


def test_every_raft_tuning_field_has_a_node_flag() -> None:
    fields = {f.name for f in dataclasses.fields(RaftTuning)}
    assert set(RAFT_TUNING_FLAGS) == fields
    help_text = run("node", "--help").output
    for flag in RAFT_TUNING_FLAGS.values():
        assert flag in help_text


#: A node config that passes validation (its data dir is relative to the file).
VALID_NODE_TOML = f"""
name = "n1"
client-address = "127.0.0.1:17101"
peer-address = "127.0.0.1:17201"
peers = "{PEERS}"
data-dir = "n1"
"""


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_toml_keys_mirror_the_flags(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path / "n1.toml",
        """
        name = "n1"
        client-address = "127.0.0.1:17101"
        peer_address = "127.0.0.1:17201"
        peers = ["127.0.0.1:17202", "127.0.0.1:17203"]
        data-dir = "data/n1"
        raft-min-timeout = 0.3
        fsync = "never"
        """,
    )

    values = read_node_toml(config)

    assert values == {
        "name": "n1",
        "client_address": "127.0.0.1:17101",
        "peer_address": "127.0.0.1:17201",
        "peers": "127.0.0.1:17202,127.0.0.1:17203",
        "data_dir": str(tmp_path / "data" / "n1"),
        "raft_min_timeout": 0.3,
        "fsync": "never",
    }


@pytest.mark.timeout(30)
def test_toml_config_reaches_validation(tmp_path: Path) -> None:
    # The file lists the node's own Raft address among its peers: only a config that was
    # read and built in full can be refused for that.
    config = write_toml(
        tmp_path / "n1.toml",
        """
        name = "n1"
        client-address = "127.0.0.1:17101"
        peer-address = "127.0.0.1:17201"
        peers = ["127.0.0.1:17201", "127.0.0.1:17202"]
        data-dir = "n1"
        """,
    )

    result = run("node", "--config", str(config))

    assert result.exit_code == 2
    assert "--peers must list the OTHER nodes" in result.output


@pytest.mark.timeout(30)
def test_flags_win_over_the_toml_config(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "n1.toml", VALID_NODE_TOML)

    result = run("node", "--config", str(config), "--peer-address", NON_LOOPBACK)

    assert result.exit_code == 2
    assert "non-loopback peer address" in result.output


def test_toml_config_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "n1.toml", 'name = "n1"\nelection-timeout = 3\n')

    result = run("node", "--config", str(config))

    assert result.exit_code == 2
    assert "--election-timeout is not a node option" in result.output


def test_toml_config_that_does_not_parse_is_refused(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "n1.toml", "name = \n")

    result = run("node", "--config", str(config))

    assert result.exit_code == 2
    assert "cannot read" in result.output


def settings_lines(output: str) -> dict[str, tuple[str, str]]:
    """``--check-config`` output as {setting: (value, source)}."""
    lines = {}
    for line in output.splitlines():
        if line.endswith(")") and " (" in line:
            head, _, source = line.rpartition(" (")
            name, _, value = head.partition(" ")
            lines[name] = (value.strip(), source.rstrip(")"))
    return lines


@pytest.mark.timeout(30)
def test_check_config_reports_each_setting_and_where_it_came_from(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path / "n1.toml", VALID_NODE_TOML + 'fsync = "never"\nmax-channels = 7\n'
    )
    env = {"RAFTCHAN_MAX_CHANNELS": "9", "RAFTCHAN_RAFT_MIN_TIMEOUT": "0.4"}

    result = run("node", "--config", str(config), "--max-channels", "11", "--check-config", env=env)

    assert result.exit_code == 0, result.output
    assert "configuration of node n1 is valid" in result.output
    settings = settings_lines(result.output)
    assert settings["max-channels"] == ("11", "flag")  # flag beats environment and file
    assert settings["raft-min-timeout"] == ("0.4", "environment")
    assert settings["fsync"] == ("never", "config file")
    assert settings["compaction-min-entries"] == ("5000", "default")
    assert not (tmp_path / "n1").exists(), "checking a config must not create the data dir"


@pytest.mark.timeout(30)
def test_environment_beats_the_config_file_and_loses_to_flags(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "n1.toml", "max-sessions = 5\n")
    env = {"RAFTCHAN_MAX_SESSIONS": "6", "RAFTCHAN_NAME": "from-env"}
    args = node_args(tmp_path)
    args.remove("--name")
    args.remove("n1")

    result = run(*args, "--config", str(config), "--check-config", env=env)
    settings = settings_lines(result.output)
    assert settings["max-sessions"] == ("6", "environment")
    assert settings["name"] == ("from-env", "environment")

    result = run(*args, "--config", str(config), "--max-sessions", "8", "--check-config", env=env)
    assert settings_lines(result.output)["max-sessions"] == ("8", "flag")


@pytest.mark.timeout(30)
def test_the_whole_node_config_can_come_from_the_environment(tmp_path: Path) -> None:
    env = {
        "RAFTCHAN_NAME": "n1",
        "RAFTCHAN_CLIENT_ADDRESS": "127.0.0.1:17101",
        "RAFTCHAN_PEER_ADDRESS": NON_LOOPBACK,
        "RAFTCHAN_PEERS": PEERS,
        "RAFTCHAN_DATA_DIR": str(tmp_path / "n1"),
    }
    # Read and validated in full: the non-loopback peer without a secret is refused.
    result = run("node", "--check-config", env=env)
    assert result.exit_code == 2
    assert "non-loopback peer address" in result.output

    result = run("node", "--check-config", env={**env, "RAFTCHAN_PEER_ADDRESS": "127.0.0.1:17201"})
    assert result.exit_code == 0, result.output


@pytest.mark.timeout(30)
def test_check_config_refuses_a_data_dir_it_could_not_use(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    # Under a plain file: no directory can ever be made there (root or not).
    result = run(*node_args(tmp_path, **{"--data-dir": str(blocker / "n1")}), "--check-config")

    assert result.exit_code == 2
    assert "cannot be created" in result.output


def test_up_refuses_a_non_loopback_host(tmp_path: Path) -> None:
    result = run("up", "--host", "0.0.0.0", "--data-dir", str(tmp_path))

    assert result.exit_code == 2
    assert "local cluster" in result.output
    assert not any(tmp_path.iterdir())


def test_operator_tools_need_an_address() -> None:
    result = run("status", env={"RAFTCHAN_ADDRESS": None})

    assert result.exit_code == 2
    assert "no cluster address" in result.output


def test_status_table_marks_unknown_readiness_and_finds_the_leader() -> None:
    nodes: list[dict[str, Any]] = [
        {"name": "n1", "client_address": "127.0.0.1:1", "role": "follower", "term": 3,
         "commit_index": 7, "applied_index": 7, "leader": "127.0.0.1:2"},
        {"name": "n2", "client_address": "127.0.0.1:2", "role": "leader", "term": 3,
         "commit_index": 7, "applied_index": 6, "leader": "127.0.0.1:2"},
        {"client_address": "127.0.0.1:3", "role": "unreachable"},
    ]  # fmt: skip

    # The columns, and a row for each node, are checked in test_metrics.py.
    table = format_table(nodes).splitlines()

    assert table[2].split() == ["n2", "leader", "3", "7", "6", "1", "-", "127.0.0.1:2"]
    assert leader_of(nodes) == "127.0.0.1:2"
    # Without the leader's own answer, the leader the others name.
    assert leader_of([nodes[0], nodes[2]]) == "127.0.0.1:2"
    assert leader_of([nodes[2]]) is None


@pytest.mark.timeout(30)
@pytest.mark.parametrize("value", ["nan", "inf", "-0.5"])
def test_node_refuses_a_compaction_growth_that_is_not_a_finite_number_from_zero(
    tmp_path: Path, value: str
) -> None:
    result = run(*node_args(tmp_path, **{"--compaction-growth": value}))

    assert result.exit_code == 2
    assert "--compaction-growth" in result.output
    assert not (tmp_path / "n1").exists()
