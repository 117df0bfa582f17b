"""The node's HTTP endpoint for operators: ``/health`` and ``/metrics``.

Served by tornado's HTTP server on the node's own asyncio loop (tornado comes with
distributed). Both handlers only read figures the node already has, so a request never
waits on Raft or the disk. Anything else is refused by tornado without touching the node:
an unknown path gets 404, another method 405, a malformed or oversized request is dropped
(and logged at debug level by tornado).

``GET /health`` answers a small JSON object::

    {"name": "n1", "role": "follower", "ready": true, "leader_known": true,
     "leader": "10.0.0.2:7101", "term": 3, "commit_index": 120, "applied_index": 120}

- **200**: the node has caught up with the log (``ready``) and leads or heard from its
  leader within one election timeout (``leader_known``): it serves long polls, and
  redirects writes and linearizable reads to a live leader. Point a Kubernetes
  *readiness* probe here.
- **503** (same body): still catching up after a start, or cut off from the leader (no
  leader elected, or this node is on the minority side of a partition). A leader cut off
  from the majority still answers 200 until it steps down, at most the leader fallback
  timeout later. Restarting such a node does not help, so do not use ``/health`` as a
  *liveness* probe; ``/metrics`` answers 200 for as long as the node's loop runs.

``GET /metrics`` answers the Prometheus text format (:mod:`raftchan.metrics`).
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from raftchan.config import split_address
from raftchan.metrics import NodeSample

logger = logging.getLogger(__name__)

#: Bounds a request's header block; the endpoints take no body.
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 16 * 1024
#: Seconds an idle keep-alive connection is kept, and a request body is waited for.
IDLE_TIMEOUT = 60.0
BODY_TIMEOUT = 10.0


def health_report(sample: NodeSample) -> tuple[int, dict[str, Any]]:
    """The ``/health`` status code and body for ``sample`` (see the module docstring)."""
    body = {
        "name": sample.name,
        "role": sample.role,
        "ready": sample.ready,
        "leader_known": sample.leader_known,
        "leader": sample.leader,
        "term": sample.term,
        "commit_index": sample.commit_index,
        "applied_index": sample.applied_index,
    }
    return (200 if sample.ready and sample.leader_known else 503), body


class _HealthHandler(RequestHandler):
    def initialize(self, sample: Callable[[], NodeSample]) -> None:
        self._sample = sample

    def get(self) -> None:
        status, body = health_report(self._sample())
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body))


class _MetricsHandler(RequestHandler):
    def initialize(self, render: Callable[[], tuple[bytes, str]]) -> None:
        self._render = render

    def get(self) -> None:
        body, content_type = self._render()
        self.set_header("Content-Type", content_type)
        self.set_header("Cache-Control", "no-store")
        self.finish(body)


def _log_request(handler: RequestHandler) -> None:
    # Probes and scrapes arrive every few seconds: keep them out of the INFO log.
    request = handler.request
    logger.debug(
        "%s %s %s -> %d", request.remote_ip, request.method, request.uri, handler.get_status()
    )


class HttpEndpoint:
    """``/health`` and ``/metrics`` on ``address`` (``HOST:PORT``; port 0 picks a free one).

    Args:
        address: where to listen.
        sample: builds the node's current :class:`~raftchan.metrics.NodeSample`.
        render: renders the metrics as ``(body, content type)``.

    Both callables run on the event loop for each request and must be quick.
    """

    def __init__(
        self,
        address: str,
        *,
        sample: Callable[[], NodeSample],
        render: Callable[[], tuple[bytes, str]],
    ) -> None:
        self.address = address
        application = Application(
            [
                (r"/health", _HealthHandler, {"sample": sample}),
                (r"/metrics", _MetricsHandler, {"render": render}),
            ],
            log_function=_log_request,
        )
        self._server = HTTPServer(
            application,
            max_header_size=MAX_HEADER_BYTES,
            max_body_size=MAX_BODY_BYTES,
            idle_connection_timeout=IDLE_TIMEOUT,
            body_timeout=BODY_TIMEOUT,
        )
        self._sockets: list[socket.socket] = []
        #: ``HOST:PORT`` actually bound (the chosen port when 0 was asked), once started.
        self.bound_address: str | None = None

    def start(self) -> str:
        """Bind and start serving on the running loop; returns the bound ``HOST:PORT``.

        Raises OSError when the address cannot be bound (in use, not local).
        """
        host, port = split_address(self.address, allow_zero=True)
        self._sockets = bind_sockets(port, host)
        self._server.add_sockets(self._sockets)
        bound_port = self._sockets[0].getsockname()[1]
        self.bound_address = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
        return self.bound_address

    async def close(self) -> None:
        """Stop listening and close open connections (requests in progress are dropped)."""
        self._server.stop()
        await self._server.close_all_connections()
