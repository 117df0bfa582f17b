"""The ``raftchan`` command: argument parsing only; the work is done by the modules it calls.

``raftchan node`` runs one node, ``raftchan up`` a local cluster in the foreground, and
``status``, ``append`` and ``tail`` are operator tools that reach a cluster through
``--address`` or ``$RAFTCHAN_ADDRESS``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from raftchan.config import ConfigError, NodeConfig, RaftTuning, is_loopback, parse_addresses
from raftchan.errors import RaftchanError
from raftchan.limits import DEFAULT_LIMITS
from raftchan.logs import LOG_FORMATS, configure_logging
from raftchan.security import read_tokens, server_ssl_context

if TYPE_CHECKING:
    from cluster.harness import LocalCluster
    from raftchan.sync import Client

F = TypeVar("F", bound=Callable[..., Any])

#: The ``raftchan node`` flag that sets each :class:`~raftchan.config.RaftTuning` field.
RAFT_TUNING_FLAGS: dict[str, str] = {
    "min_timeout": "--raft-min-timeout",
    "max_timeout": "--raft-max-timeout",
    "append_entries_period": "--append-entries-period",
    "leader_fallback_timeout": "--leader-fallback-timeout",
    "connection_retry": "--connection-retry",
    "compaction_min_entries": "--compaction-min-entries",
    "compaction_min_time": "--compaction-min-time",
    "compaction_growth": "--compaction-growth",
    "compaction_min_bytes": "--compaction-min-bytes",
}

_TUNING_HELP = {
    "min_timeout": "Shortest randomised election timeout, seconds.",
    "max_timeout": "Longest randomised election timeout, seconds.",
    "append_entries_period": "Leader heartbeat period, seconds.",
    "leader_fallback_timeout": "How long a leader cut off from the majority still believes "
    "it leads, seconds.",
    "connection_retry": "How soon a lost peer connection is dialled again, seconds.",
    "compaction_min_entries": "Raft log entries that trigger a snapshot (once past "
    "--compaction-growth).",
    "compaction_min_time": "Seconds after the last snapshot that trigger one, whatever the "
    "log holds.",
    "compaction_min_bytes": "Bytes of Raft log that trigger a snapshot (once past "
    "--compaction-growth).",
    "compaction_growth": "No snapshot by entries or bytes until the log holds this many "
    "times the last snapshot's bytes (0: no such wait).",
}

# Tuning values that may be 0 (the others must be above it).
_TUNING_ZERO_ALLOWED = frozenset({"compaction_growth"})

#: The ``raftchan node`` flags that set :class:`~raftchan.limits.Limits` fields.
LIMIT_FLAGS: dict[str, str] = {
    "max_item_bytes": "--max-item-bytes",
    "max_frame_bytes": "--max-frame-bytes",
    "max_channels": "--max-channels",
    "max_sessions": "--max-sessions",
}

_LIMIT_HELP = {
    "max_item_bytes": "Largest item, as its msgpack encoding, bytes.",
    "max_frame_bytes": "Largest wire frame, bytes.",
    "max_channels": "Most channels in the cluster at once.",
    "max_sessions": "Most client sessions remembered for de-duplication.",
}

#: The type of every option that names a file the node reads (config, secrets, TLS).
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

#: How long ``raftchan up`` gives its nodes to stop after SIGTERM before SIGKILL.
_UP_STOP_TIMEOUT = 15.0


class _ConfigProblem(click.ClickException):
    """A configuration the node refuses: printed as one ``Error:`` line, exit status 2."""

    exit_code = 2


def _param_name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


# -----------------------------------------------------------------------------------------
# The group


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="raftchan")
def cli() -> None:
    """raftchan: named, totally ordered channels kept by a Raft group of nodes."""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``raftchan`` console script and of ``python -m raftchan``."""
    cli.main(args=argv, prog_name="raftchan")


# -----------------------------------------------------------------------------------------
# raftchan node


def _load_config_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    """Make the TOML file's keys the defaults of the other options, so flags win."""
    if value is None:
        return
    values = read_node_toml(value)
    known = {p.name for p in ctx.command.params if p.name != param.name}
    for name in values:
        if name not in known:
            flag = "--" + name.replace("_", "-")
            raise click.BadParameter(f"{value}: {flag} is not a node option", param_hint="--config")
    ctx.default_map = {**(ctx.default_map or {}), **values}


def read_node_toml(path: Path) -> dict[str, Any]:
    """Read a node's TOML config as ``node`` option values, keyed by parameter name.

    Keys are the ``raftchan node`` flags without their dashes (``client-address`` or
    ``client_address``). ``peers`` may be a list. Relative ``data-dir`` and
    ``cluster-secret-file`` paths are taken relative to the file's folder. Raises
    click.BadParameter for a file that cannot be read or parsed.
    """
    try:
        table = _parse_toml(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="--config") from None
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = _param_name(key)
        if name == "peers" and isinstance(value, list):
            value = ",".join(str(item) for item in value)
        if name in ("data_dir", "cluster_secret_file") and isinstance(value, str):
            value = str(path.parent / value)  # joining keeps an absolute value as it is
        values[name] = value
    return values


def _parse_toml(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib.loads(text)
    try:  # Python 3.10 has no tomllib; the backport reads the same files
        import tomli
    except ImportError:
        raise click.UsageError("--config needs Python 3.11 or the 'tomli' package") from None
    return dict(tomli.loads(text))


def _tuning_options(func: F) -> F:
    defaults = RaftTuning()
    for field_name, flag in reversed(RAFT_TUNING_FLAGS.items()):
        default = getattr(defaults, field_name)
        kind: click.ParamType = (
            click.IntRange(min=1)
            if isinstance(default, int)
            else click.FloatRange(min=0, min_open=field_name not in _TUNING_ZERO_ALLOWED)
        )
        option = click.option(
            flag,
            type=kind,
            default=default,
            show_default=True,
            help=_TUNING_HELP[field_name],
            callback=_finite,
        )
        func = option(func)
    return func


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """Refuse ``nan`` and ``inf``, which the range types let through."""
    if not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, not {value}")
    return value


def _limit_options(func: F) -> F:
    for field_name, flag in reversed(LIMIT_FLAGS.items()):
        option = click.option(
            flag,
            type=click.IntRange(min=1),
            default=getattr(DEFAULT_LIMITS, field_name),
            show_default=True,
            help=_LIMIT_HELP[field_name],
        )
        func = option(func)
    return func


@cli.command()
@click.option(
    "--config",
    type=EXISTING_FILE,
    is_eager=True,
    expose_value=False,
    callback=_load_config_file,
    help="TOML file whose keys mirror these flags (client-address = ...); flags win.",
)
@click.option("--name", required=True, help="Node name, for logs and `raftchan status`.")
@click.option("--client-address", required=True, metavar="HOST:PORT", help="Client listener.")
@click.option("--peer-address", required=True, metavar="HOST:PORT", help="This node's Raft port.")
@click.option(
    "--peers", required=True, metavar="HOST:PORT,...", help="The OTHER nodes' Raft addresses."
)
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Journal, snapshot and meta files.",
)
@click.option(
    "--cluster-secret-file",
    type=EXISTING_FILE,
    help="File holding the shared secret that encrypts Raft traffic "
    "(required for any non-loopback peer address).",
)
@click.option(
    "--dask-scheduler", metavar="tcp://HOST:PORT", help="Scheduler whose futures to keep."
)
@click.option(
    "--fsync",
    type=click.Choice(["always", "never"]),
    default="always",
    show_default=True,
    help="'always': fsync the journal before acknowledging; 'never': survive process kills only.",
)
@_tuning_options
@_limit_options
@click.option(
    "--log-level",
    type=click.Choice(_LOG_LEVELS, case_sensitive=False),
    default="INFO",
    show_default=True,
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="text",
    show_default=True,
    help="'json': one JSON object per line (time, level, logger, message, node, exception).",
)
@click.option(
    "--http-address",
    metavar="HOST:PORT",
    help="Serve GET /health and /metrics (Prometheus) here; port 0 picks a free one. "
    "[default: no HTTP endpoint]",
)
@click.option(
    "--tls-cert-file",
    type=EXISTING_FILE,
    help="Serve clients over TLS with this certificate chain (PEM); needs --tls-key-file.",
)
@click.option(
    "--tls-key-file",
    type=EXISTING_FILE,
    help="The private key (PEM) of --tls-cert-file.",
)
@click.option(
    "--token-file",
    type=EXISTING_FILE,
    help="Require clients to present one of the tokens this file lists, one per line "
    "(clients: token= or $RAFTCHAN_TOKEN).",
)
@click.option(
    "--check-config",
    is_flag=True,
    help="Validate the settings, print each with where it came from, and exit without "
    "starting (status 0 if the node would start, 2 if not).",
)
@click.option("--record-synced", is_flag=True, hidden=True)
@click.option("--fault-injection", is_flag=True, hidden=True)
@click.option("--unsafe-local-reads", is_flag=True, hidden=True)
def node(**options: Any) -> None:
    """Run one node in the foreground until SIGTERM or Ctrl-C.

    Each setting comes from, in this order of precedence: its flag, its environment
    variable (RAFTCHAN_ and the flag's name in capitals, underscores for dashes: for
    example RAFTCHAN_CLIENT_ADDRESS), the --config file, the built-in default.
    """
    try:
        config = _node_config(options)
        # run_node validates too; doing it here first gives a one-line error without
        # importing the server and its dependencies.
        config.validate()
        if config.tls_cert_file is not None and config.tls_key_file is not None:
            server_ssl_context(config.tls_cert_file, config.tls_key_file)  # loads, or says why
        if options["check_config"]:
            check_node_paths(config)
    except ConfigError as exc:
        raise _ConfigProblem(str(exc)) from None
    if options["check_config"]:
        _print_settings(click.get_current_context(), options)
        click.echo(f"configuration of node {config.name} is valid")
        return
    configure_logging(options["log_level"], options["log_format"], config.name)
    from raftchan.server import run_node

    try:
        run_node(config)
    except ConfigError as exc:
        raise _ConfigProblem(str(exc)) from None


#: Options that are never read from the environment: test aids, and the ones that only
#: make sense typed for one run.
_NO_ENVVAR = frozenset({"record_synced", "fault_injection", "unsafe_local_reads", "check_config"})


def node_envvar(param_name: str) -> str:
    """The environment variable that sets the ``raftchan node`` option ``param_name``."""
    return "RAFTCHAN_" + param_name.upper()


def _read_options_from_environment(command: click.Command) -> None:
    # Click reads an option's envvar after the command line and before default_map (the
    # --config file), which is exactly the documented precedence.
    for param in command.params:
        if isinstance(param, click.Option) and param.name and param.name not in _NO_ENVVAR:
            param.envvar = node_envvar(param.name)
            param.show_envvar = True


_read_options_from_environment(node)


def check_node_paths(config: NodeConfig) -> None:
    """Raise ConfigError if the node could not use its data directory.

    The directory must exist and be writable, or be creatable (its nearest existing
    parent writable). Nothing is created: checking a config changes nothing on disk.
    """
    path = config.data_dir.absolute()
    if path.exists():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"--data-dir {config.data_dir} is not writable")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--data-dir {config.data_dir} cannot be created: {parent} is not a writable directory"
        )


_SOURCE_NAMES = {
    click.core.ParameterSource.COMMANDLINE: "flag",
    click.core.ParameterSource.ENVIRONMENT: "environment",
    click.core.ParameterSource.DEFAULT_MAP: "config file",
    click.core.ParameterSource.DEFAULT: "default",
}


def _print_settings(ctx: click.Context, options: Mapping[str, Any]) -> None:
    # A secret's file name is shown, never its contents.
    for param in ctx.command.params:
        name = param.name
        if not isinstance(param, click.Option) or param.hidden or name not in options:
            continue
        if name == "check_config" or options[name] is None:
            continue
        source = ctx.get_parameter_source(name)
        origin = _SOURCE_NAMES.get(source, str(source)) if source is not None else "?"
        click.echo(f"{name.replace('_', '-'):<28} {options[name]!s:<40} ({origin})")


def _node_config(options: Mapping[str, Any]) -> NodeConfig:
    """Build the NodeConfig the ``node`` options describe; ConfigError if they cannot."""
    tuning = RaftTuning(
        **{field: options[_param_name(flag)] for field, flag in RAFT_TUNING_FLAGS.items()}
    )
    limits = dataclasses.replace(
        DEFAULT_LIMITS, **{field: options[_param_name(flag)] for field, flag in LIMIT_FLAGS.items()}
    )
    peers = tuple(item.strip() for item in options["peers"].split(",") if item.strip())
    return NodeConfig(
        name=options["name"],
        client_address=options["client_address"],
        peer_address=options["peer_address"],
        peers=peers,
        data_dir=options["data_dir"],
        cluster_secret=_read_secret(options["cluster_secret_file"]),
        fsync=options["fsync"],
        dask_scheduler=options["dask_scheduler"],
        limits=limits,
        raft=tuning,
        record_synced=options["record_synced"],
        fault_injection=options["fault_injection"],
        unsafe_local_reads=options["unsafe_local_reads"],
        http_address=options["http_address"],
        tls_cert_file=options["tls_cert_file"],
        tls_key_file=options["tls_key_file"],
        tokens=read_tokens(options["token_file"]) if options["token_file"] else (),
    )


def _read_secret(path: Path | None) -> bytes | None:
    # Bytes, not text: a secret made of random bytes is as good as a passphrase. Trailing
    # whitespace is dropped so that an editor's final newline does not change the key.
    if path is None:
        return None
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the cluster secret file {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"the cluster secret file {path} is empty")
    return secret


# -----------------------------------------------------------------------------------------
# raftchan up


@cli.command()
@click.option(
    "--nodes",
    default=3,
    show_default=True,
    type=click.IntRange(3, 99),
    help="Number of nodes (below 100: Raft ports sit 100 above the client ports).",
)
@click.option(
    "--base-port",
    default=7101,
    show_default=True,
    type=click.IntRange(1, 65_000),
    help="Client ports are BASE, BASE+1, ...; Raft ports BASE+100, BASE+101, ...",
)
@click.option(
    "--data-dir",
    default="./raftchan-data",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="One folder and one log file per node; kept between runs.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="A loopback address.")
@click.option("--demo/--no-demo", default=True, show_default=True, help="Run the short demo.")
@click.option("--exit-after-demo", is_flag=True, help="Stop the cluster once the demo is done.")
@click.option(
    "--ready-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to wait for the nodes to start and elect a leader.",
)
@click.option(
    "--dask",
    "start_dask",
    is_flag=True,
    help="Also start a local Dask scheduler with two workers (threads of this process) and "
    "have the nodes keep its futures.",
)
@click.option(
    "--dask-scheduler",
    metavar="tcp://HOST:PORT",
    help="Have the nodes keep the futures of this running Dask scheduler.",
)
def up(
    nodes: int,
    base_port: int,
    data_dir: Path,
    host: str,
    demo: bool,
    exit_after_demo: bool,
    ready_timeout: float,
    start_dask: bool,
    dask_scheduler: str | None,
) -> None:
    """Run a local cluster on loopback in the foreground; Ctrl-C stops it.

    Prints one line RAFTCHAN_ADDRESS=... once a leader is elected (and, with --dask, one
    line DASK_SCHEDULER_ADDRESS=... before it).
    """
    if not is_loopback(host):
        raise click.BadParameter(
            "up runs a local cluster; for other addresses run `raftchan node` on each machine "
            "with --cluster-secret-file",
            param_hint="--host",
        )
    if start_dask and dask_scheduler:
        raise click.BadParameter(
            "give either --dask (start one) or --dask-scheduler (use a running one)",
            param_hint="--dask",
        )
    with contextlib.ExitStack() as stack:
        if start_dask:
            dask_scheduler = stack.enter_context(_local_dask(host))
            click.echo(f"DASK_SCHEDULER_ADDRESS={dask_scheduler}")
        _up(nodes, base_port, data_dir, host, demo, exit_after_demo, ready_timeout, dask_scheduler)


@contextmanager
def _local_dask(host: str) -> Iterator[str]:
    """A Dask scheduler and two workers of two threads in this process; yields its address."""
    import distributed

    _note("starting a local Dask scheduler and 2 workers")
    # Threads, not processes: `up` is a demo, and worker processes would outlive a
    # SIGKILLed `up`. TCP (not inproc) so that nodes and other processes can connect.
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=2,
        processes=False,
        protocol="tcp",
        host=host,
        dashboard_address=None,
    ) as dask:
        yield dask.scheduler_address


def _up(
    nodes: int,
    base_port: int,
    data_dir: Path,
    host: str,
    demo: bool,
    exit_after_demo: bool,
    ready_timeout: float,
    dask_scheduler: str | None,
) -> None:
    from cluster.harness import LocalCluster

    extra_args = ["--dask-scheduler", dask_scheduler] if dask_scheduler else []
    # Default Raft timing: this is the cluster people try first, not a test cluster.
    local = LocalCluster(
        nodes, data_dir, host=host, base_port=base_port, tuning=None, extra_args=extra_args
    )
    # SIGTERM stops `up` the way Ctrl-C does. The nodes run in process groups of their
    # own, so a terminal's Ctrl-C reaches only this process, which then stops them.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        _run_local_cluster(
            local, ready_timeout, demo=demo, exit_after_demo=exit_after_demo, dask=dask_scheduler
        )
    except KeyboardInterrupt:
        pass
    finally:
        with _signals_ignored():  # a second Ctrl-C must not cut the (bounded) stop short
            _note("stopping the cluster")
            local.stop(_UP_STOP_TIMEOUT)
            local.close()
        signal.signal(signal.SIGTERM, previous)


def _run_local_cluster(
    local: LocalCluster,
    ready_timeout: float,
    *,
    demo: bool,
    exit_after_demo: bool,
    dask: str | None = None,
) -> None:
    from cluster.harness import ClusterNotReady, NodeExited, PortInUse

    try:
        local.start()
    except PortInUse as exc:
        raise click.ClickException(f"{exc} (another cluster? try another --base-port)") from None
    try:
        leader = local.wait_ready(ready_timeout)
    except (ClusterNotReady, NodeExited) as exc:
        click.echo(f"Error: the cluster did not come up: {exc}", err=True)
        local.dump_logs(file=sys.stderr)
        sys.exit(1)
    click.echo(f"RAFTCHAN_ADDRESS={local.addresses}")
    sys.stdout.flush()
    _note(f"{local.size} nodes up, leader {local.names[leader]}; data and logs in {local.base_dir}")
    if demo:
        try:
            _run_demo(local, leader)
            if dask:
                _run_dask_demo(local, dask)
        except RaftchanError as exc:
            click.echo(f"Error: the demo failed: {type(exc).__name__}: {exc}", err=True)
            local.dump_logs(file=sys.stderr)
            sys.exit(1)
    if not exit_after_demo:
        _note("press Ctrl-C to stop the cluster")
        _watch(local)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _note(message: str) -> None:
    """Progress for people goes to stderr; stdout holds the address line and the demo."""
    click.echo(f"raftchan up: {message}", err=True)


def _run_demo(local: LocalCluster, leader: int) -> None:
    import raftchan

    values: list[Any] = ["hello", {"x": 123}, [1, 2, 3]]
    with raftchan.Client(local.addresses) as client:
        chan = client.channel("demo")
        for value in values:
            chan.append(value)
        chan.flush()
        click.echo(f"demo: appended {values!r} to channel 'demo'; flush() returned")
        snapshot = list(chan.data)
        click.echo(f"demo: list(chan.data) = {snapshot!r}")
    follower = next(i for i in range(local.size) if i != leader)
    address = local.client_addresses[follower]
    # A client that knows only a follower: reads that follow the channel may be served
    # by any node, so this one can be answered by the follower itself.
    with raftchan.Client(address) as client:
        chan = client.channel("demo")
        click.echo(
            f"demo: a client given only follower {local.names[follower]} ({address}) iterates:"
        )
        for item in islice(chan, len(snapshot)):
            click.echo(f"  {item!r}")
    sys.stdout.flush()


def _run_dask_demo(local: LocalCluster, scheduler: str) -> None:
    import operator

    import distributed

    import raftchan

    with (
        distributed.Client(scheduler, set_as_default=False) as dask,
        raftchan.Client(local.addresses, dask_client=dask) as client,
    ):
        chan = client.channel("demo-futures")
        future = dask.submit(operator.add, 40, 2)
        chan.append(future)
        chan.flush()
        click.echo(f"demo: appended a Dask future ({future.key}) to channel 'demo-futures'")
        del future
    # Another Dask client, as another program would have: the channel kept the key alive.
    with (
        distributed.Client(scheduler, set_as_default=False) as dask,
        raftchan.Client(local.addresses, dask_client=dask) as client,
    ):
        [read] = client.channel("demo-futures").read()[-1:]
        click.echo(f"demo: another Dask client reads it back: result() = {read.result(30)!r}")
    sys.stdout.flush()


def _watch(local: LocalCluster) -> None:
    """Wait for Ctrl-C or SIGTERM (KeyboardInterrupt), saying once if a node exits by
    itself; exit with status 1 once no node is left."""
    exited: set[int] = set()
    while len(exited) < local.size:
        for i in range(local.size):
            if i not in exited and not local.is_running(i):
                exited.add(i)
                _note(f"node {local.names[i]} exited; see {local.nodes[i].spec.log_path}")
        time.sleep(1.0)
    raise click.ClickException("every node has exited")


# -----------------------------------------------------------------------------------------
# Operator tools


def _address_option(func: F) -> F:
    option = click.option(
        "--address",
        metavar="HOST:PORT,...",
        help="Client addresses of the cluster's nodes [default: $RAFTCHAN_ADDRESS].",
    )
    return option(func)


#: The client's own default (RetryPolicy.timeout), said in --help.
_DEFAULT_WAIT = "30"
#: Seconds an operator tool's client may take to close (what it appended is flushed).
_CLOSE_WAIT = 5.0


def _timeout_option(func: F) -> F:
    option = click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        metavar="SECONDS",
        help=f"How long to wait for the cluster, retries included [default: {_DEFAULT_WAIT}].",
    )
    return option(func)


def _addresses(address: str | None) -> list[str]:
    try:
        return parse_addresses(address)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


@contextmanager
def _connected(address: str | None, timeout: float | None = None) -> Iterator[Client]:
    """A raftchan.Client for ``--address`` whose calls wait up to ``timeout`` seconds
    (``None``: the client's default); a RaftchanError becomes a one-line error, exit 1."""
    addresses = _addresses(address)
    import raftchan

    try:
        client = raftchan.Client(addresses, timeout=timeout)
        try:
            yield client
        finally:
            # After a timeout, closing must not wait for the cluster all over again.
            client.close(_CLOSE_WAIT if timeout is None else min(timeout, _CLOSE_WAIT))
    except RaftchanError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None


_STATUS_COLUMNS = (
    ("NAME", "name"),
    ("ROLE", "role"),
    ("TERM", "term"),
    ("COMMIT", "commit_index"),
    ("APPLIED", "applied_index"),
    ("LAG", "lag"),
    ("READY", "ready"),
    ("CLIENT ADDRESS", "client_address"),
)


@cli.command()
@_address_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="How long each node may take to connect, and to answer [default: 10].",
)
def status(address: str | None, as_json: bool, timeout: float | None) -> None:
    """Show each node's role, term, commit and applied index, lag and readiness, and the leader.

    LAG is how many entries the leader has committed that the node has not applied yet
    ("-" when no reachable node leads). Below the table, why each unreachable node could
    not be asked.

    Exits with status 1 when no node is reachable.
    """
    addresses = _addresses(address)
    with _connected(address) as client:
        nodes = [dict(entry) for entry in client.status(timeout)]
    for entry, requested in zip(nodes, addresses, strict=False):
        entry.setdefault("client_address", requested)
    leader = leader_of(nodes)
    if as_json:
        click.echo(json.dumps({"leader": leader, "nodes": nodes}, indent=2, default=str))
    else:
        click.echo(format_table(nodes))
        for entry in nodes:
            if entry.get("role") == "unreachable":
                click.echo(f"{entry.get('client_address')}: {entry.get('error') or 'no answer'}")
        click.echo(f"leader: {leader or 'none known'}")
    if all(entry.get("role") == "unreachable" for entry in nodes):
        sys.exit(1)


@cli.group()
def member() -> None:
    """List, add and remove the cluster's members (one change at a time, via the leader).

    To add a node: start it with an empty --data-dir and --peers listing the current
    members' Raft addresses (``raftchan member list``), then ``raftchan member add``.
    To remove one: ``raftchan member remove``, then stop it and delete its data folder.
    """


_MEMBER_TIMEOUT = 120.0


@member.command("list")
@_address_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_timeout_option
def member_list(address: str | None, as_json: bool, timeout: float | None) -> None:
    """Show every member's Raft address, name and client address, as the leader has them."""
    with _connected(address, timeout) as client:
        answer = client.members()
    if as_json:
        click.echo(json.dumps(answer, indent=2))
        return
    rows = [("RAFT ADDRESS", "NAME", "CLIENT ADDRESS")]
    leader = answer.get("leader")
    for entry in answer.get("members", []):
        raft = entry.get("raft_address") or "-"
        rows.append(
            (
                raft + (" (leader)" if raft == leader else ""),
                entry.get("name") or "-",
                entry.get("client_address") or "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if answer.get("change_pending"):
        click.echo("a membership change is not committed yet")


@member.command("add")
@_address_option
@click.argument("raft_address")
@click.option(
    "--client-address", required=True, metavar="HOST:PORT", help="The new node's client listener."
)
@click.option("--name", help="The new node's name [default: its Raft address].")
@click.option(
    "--timeout", type=float, default=_MEMBER_TIMEOUT, show_default=True, help="Seconds to wait."
)
def member_add(
    address: str | None, raft_address: str, client_address: str, name: str | None, timeout: float
) -> None:
    """Add the node whose Raft port is RAFT_ADDRESS; returns once the change is committed.

    Fails (exit 1, nothing changed) if it already is a member or another change is in
    flight. On a timeout the change may still commit: check with ``raftchan member list``.
    """
    with _connected(address) as client:
        members = client.add_member(raft_address, client_address, name, timeout=timeout)
    click.echo(f"added {raft_address}; members: {','.join(members)}")


@member.command("remove")
@_address_option
@click.argument("raft_address")
@click.option(
    "--timeout", type=float, default=_MEMBER_TIMEOUT, show_default=True, help="Seconds to wait."
)
def member_remove(address: str | None, raft_address: str, timeout: float) -> None:
    """Remove the node whose Raft port is RAFT_ADDRESS; returns once the change is committed.

    Fails (exit 1, nothing changed) if it is not a member, is the leader (stop that node
    first: another member takes over), would leave a single member, or another change is
    in flight. Stop the removed node afterwards; its data folder cannot rejoin.
    """
    with _connected(address) as client:
        members = client.remove_member(raft_address, timeout=timeout)
    click.echo(f"removed {raft_address}; members: {','.join(members)}")


def leader_of(nodes: Sequence[Mapping[str, Any]]) -> str | None:
    """The leader's client address: the node claiming leadership in the highest term,
    else the leader most reachable nodes name (the leader may not be among the nodes
    asked), else None."""
    claims = [entry for entry in nodes if entry.get("role") == "leader"]
    if claims:
        address = max(claims, key=lambda entry: entry.get("term") or 0).get("client_address")
        return address if isinstance(address, str) else None
    named = Counter(entry["leader"] for entry in nodes if isinstance(entry.get("leader"), str))
    return named.most_common(1)[0][0] if named else None


def lags(nodes: Sequence[Mapping[str, Any]]) -> list[int | None]:
    """Per node, the leader's commit index minus the node's applied index (at least 0).

    The leader is the node claiming leadership in the highest term. ``None`` for a node
    that reported no applied index (unreachable), and for every node when none leads.
    The nodes answer at slightly different moments, so a small lag on a healthy follower
    is normal; a lag that keeps growing is not.
    """
    claims = [n for n in nodes if n.get("role") == "leader"]
    leader = max(claims, key=lambda n: n.get("term") or 0) if claims else None
    commit = None if leader is None else leader.get("commit_index")
    return [
        max(0, commit - n["applied_index"])
        if isinstance(commit, int) and isinstance(n.get("applied_index"), int)
        else None
        for n in nodes
    ]


def format_table(nodes: Sequence[Mapping[str, Any]]) -> str:
    """The status rows as an aligned text table, one row per node (see :func:`lags`)."""
    rows = [[title for title, _ in _STATUS_COLUMNS]]
    for n, lag in zip(nodes, lags(nodes), strict=True):
        values = {**n, "lag": lag}
        if isinstance(n.get("ready"), bool):
            values["ready"] = "yes" if n["ready"] else "no"
        rows.append(
            ["-" if values.get(key) is None else str(values[key]) for _, key in _STATUS_COLUMNS]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(_STATUS_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


@cli.command()
@click.argument("channel")
@click.argument("values", nargs=-1, required=True)
@_address_option
@click.option("--json-values", is_flag=True, help="Parse each VALUE as JSON, not as a string.")
@_timeout_option
def append(
    channel: str,
    values: tuple[str, ...],
    address: str | None,
    json_values: bool,
    timeout: float | None,
) -> None:
    """Append VALUES to CHANNEL (created if missing) and wait until a majority has
    committed them. On a timeout they may still be committed: check with tail."""
    items: list[Any] = list(values)
    if json_values:
        try:
            items = [json.loads(value) for value in values]
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="VALUES") from None
    with _connected(address, timeout) as client:
        chan = client.channel(channel)
        for item in items:
            chan.append(item)
        chan.flush()
        length = len(chan)
    click.echo(f"appended {len(items)} item(s) to {channel!r}; it now holds {length}")


@cli.command()
@click.argument("channel")
@click.option("--from", "start", type=click.IntRange(min=0), help="First index to print.")
@click.option(
    "--follow/--no-follow", default=False, show_default=True, help="Keep printing new items."
)
@_address_option
@_timeout_option
def tail(
    channel: str, start: int | None, follow: bool, address: str | None, timeout: float | None
) -> None:
    """Print CHANNEL's items one per line as JSON (from the oldest retained one by default).

    A channel that does not exist is an error (exit 1): tail never creates one.
    """
    with _connected(address, timeout) as client:
        chan = client.channel(channel, create=False)
        items = chan.iterate(start) if follow else chan.read(start=start)
        try:
            for item in items:
                click.echo(json.dumps(item, default=_json_fallback))
        except KeyboardInterrupt:
            pass


def _json_fallback(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return repr(value)
