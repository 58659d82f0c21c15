"""Prometheus metrics of one daemon, in a registry of its own.

A registry per daemon (not the global one) keeps tests that run several
daemons in one process from seeing each other's counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import Enum as EnumMetric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent.daemon.lifecycle import Status

_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_SIZE_BUCKETS = tuple(float(1 << n) for n in range(10, 36, 2))  # 1 KiB .. 32 GiB

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.status = EnumMetric(
            "studio_session_status",
            "The session's status.",
            states=[s.value for s in Status],
            registry=r,
        )
        self.checkpoint_duration = Histogram(
            "studio_checkpoint_duration_seconds",
            "Time to write a checkpoint, by kind (periodic, final, manual).",
            ["kind"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.checkpoint_layer_bytes = Histogram(
            "studio_checkpoint_layer_bytes",
            "Compressed size of the layer a checkpoint wrote.",
            ["kind"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.checkpoint_size = Gauge(
            "studio_checkpoint_size_bytes",
            "Total compressed size of the session checkpoint's layers.",
            registry=r,
        )
        self.checkpoint_unchanged = Counter(
            "studio_checkpoint_unchanged_total",
            "Periodic checkpoints skipped because nothing changed.",
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "studio_checkpoint_failures_total",
            "Checkpoints that failed, by kind.",
            ["kind"],
            registry=r,
        )
        self.restore_duration = Gauge(
            "studio_restore_duration_seconds",
            "Time the session start (restore included) took.",
            registry=r,
        )
        self.restore_bytes = Gauge(
            "studio_restore_bytes", "Bytes restored at session start.", registry=r
        )
        self.ide_restarts = Counter(
            "studio_ide_restarts_total", "Times the IDE was restarted.", registry=r
        )
        self.heartbeat_failures = Counter(
            "studio_heartbeat_failures_total",
            "Heartbeats the control plane did not accept.",
            registry=r,
        )
        self.event_failures = Counter(
            "studio_event_failures_total",
            "Event posts the control plane did not accept (retried).",
            registry=r,
        )
        self.status.state(Status.STARTING.value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
