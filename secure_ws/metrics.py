"""Prometheus metrics, in a registry of our own so several apps in one process (tests) never collide.

With several workers each process exposes its own numbers on ``/metrics``;
scrape every worker (or sum them at the load balancer), as with any
prometheus-client service not running in multiprocess mode.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS = Gauge("secure_ws_connections_active", "Open authenticated WebSocket connections", registry=REGISTRY)
HANDSHAKES = Counter(
    "secure_ws_handshakes_total", "WebSocket handshakes by result", ["result"], registry=REGISTRY
)


class Stats:
    """Per-frame counters as plain integers: an attribute increment instead of a locked
    prometheus ``Counter.inc`` on the hot path; exported at scrape time by :class:`_StatsCollector`."""

    __slots__ = ("messages", "rate_limited")

    def __init__(self) -> None:
        self.messages = 0
        self.rate_limited = 0


STATS = Stats()


class _StatsCollector:
    def collect(self):  # noqa: ANN201 (prometheus collector protocol)
        yield CounterMetricFamily(
            "secure_ws_messages", "Inbound frames on authenticated connections", value=STATS.messages
        )
        yield CounterMetricFamily(
            "secure_ws_rate_limited", "Inbound frames refused by the rate limit", value=STATS.rate_limited
        )


REGISTRY.register(_StatsCollector())
CLOSES = Counter("secure_ws_closes_total", "Connections closed by the server, by close code", ["code"], registry=REGISTRY)
HANDSHAKE_SECONDS = Histogram(
    "secure_ws_handshake_seconds",
    "Time to authenticate a handshake",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
    registry=REGISTRY,
)


def exposition() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
FRAME_SECONDS = Histogram(
    "secure_ws_frame_seconds",
    "Time to handle one accepted inbound frame (parse, dispatch, reply), sampled 1 in 8",
    buckets=(0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
    registry=REGISTRY,
)
