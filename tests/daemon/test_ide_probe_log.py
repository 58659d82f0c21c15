"""An IDE that listens somewhere else than it is probed says so in the log, every few
seconds, instead of leaving the session silently in ``starting`` until ready_timeout."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from daemon_helpers import eventually, fake_ide, free_port

from agent.daemon.clock import ManualClock
from agent.daemon.supervisor import PROBE_NOTE_EVERY, IdeState, RingBuffer, Supervisor


class _Events(logging.Handler):
    """The agent's log events as dicts: the event name and its fields."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append({"event": record.getMessage(), **getattr(record, "fields", {})})


@pytest.fixture
def logged() -> Iterator[list[dict[str, object]]]:
    agent_logger = logging.getLogger("studio_agent")
    handler, level = _Events(), agent_logger.level
    agent_logger.addHandler(handler)
    agent_logger.setLevel(logging.INFO)
    try:
        yield handler.events
    finally:
        agent_logger.removeHandler(handler)
        agent_logger.setLevel(level)


async def test_a_probe_without_answer_is_logged_every_few_seconds(
    logged: list[dict[str, object]],
) -> None:
    clock = ManualClock()
    listens, probed = free_port(), free_port()
    url = f"http://127.0.0.1:{probed}/"
    sup = Supervisor(
        fake_ide(),
        {"PATH": "/usr/bin:/bin", "CONNECT_TOOL_PORT": str(listens)},  # not the probed port
        url,
        clock=clock,
        output=RingBuffer(clock),
        ready_timeout=300.0,
        stop_timeout=5.0,
        max_failures=1,
        failure_window=60.0,
        probe_interval=0.5,
    )
    task = asyncio.create_task(sup.run())

    def notes() -> list[dict[str, object]]:
        return [e for e in logged if e["event"] == "ide.not_answering"]

    try:
        await eventually(lambda: any(e["event"] == "ide.probing" for e in logged), what="probe")
        assert next(e for e in logged if e["event"] == "ide.probing")["url"] == url
        for want in (1, 2, 3):
            while len(notes()) < want:
                await clock.wait_for_sleepers()
                await clock.advance(0.5)
            waited = float(str(notes()[-1]["waited"]))
            assert want * PROBE_NOTE_EVERY <= waited < want * PROBE_NOTE_EVERY + 1
        assert all(n["url"] == url and n["http_status"] is None for n in notes())
        assert sup.state is IdeState.STARTING
    finally:
        stopper = asyncio.create_task(sup.stop())
        await eventually(lambda: stopper.done(), tick=lambda: clock.advance(1.0), what="stop")
        await asyncio.gather(task, return_exceptions=True)
