"""Schema-driven fuzzing of the live local API: no 5xx, no response that breaks the document.

The server runs on this test's event loop; schemathesis sends blocking
requests, so the fuzzing runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import schemathesis
from daemon_helpers import TOKEN, Harness, fake_ide
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from agent.settings import Settings

HarnessFactory = Callable[..., Awaitable[Harness]]

_EXAMPLES = 60


def _fuzz(doc: dict[str, Any], base_url: str) -> list[str]:
    # the token as the document's bearer scheme, so schemathesis knows when it left it out
    config = schemathesis.Config.from_dict({"auth": {"openapi": {"bearer": {"bearer": TOKEN}}}})
    schema = schemathesis.openapi.from_dict(doc, config=config)
    covered: list[str] = []
    for path, methods in doc["paths"].items():
        for method in methods:
            if path == "/v1/stop":
                continue  # it ends the session; sent last, on its own
            op = schema[path][method.upper()]
            # a following log stream lasts as long as the session: fuzz the tail only
            query = {"follow": "0"} if path == "/v1/logs" else None
            spec = methods[method]
            has_input = bool(spec.get("parameters") or spec.get("requestBody"))
            modes = [GenerationMode.POSITIVE]
            if has_input:  # nothing to negate in a request without inputs
                modes.append(GenerationMode.NEGATIVE)
            for mode in modes:
                strategy = op.as_strategy(generation_mode=mode, query=query)

                @given(case=strategy)
                @settings(
                    max_examples=_EXAMPLES,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                def run(case: schemathesis.Case[Any]) -> None:
                    case.call_and_validate(base_url=base_url, timeout=30)

                run()
            covered.append(f"{method.upper()} {path}")
    stop = schema["/v1/stop"]["POST"]

    @given(case=stop.as_strategy())
    @settings(max_examples=1, deadline=None, database=None)
    def run_stop(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(base_url=base_url, timeout=30)

    run_stop()
    covered.append("POST /v1/stop")
    return covered


async def test_the_live_api_keeps_its_openapi_promises(
    make_settings: Callable[..., Settings], harness: HarnessFactory
) -> None:
    h = await harness(make_settings(), fake_ide())
    await h.wait_status("running")
    code, doc = await h.get("/v1/openapi.json")
    assert code == 200
    covered = await asyncio.to_thread(_fuzz, doc, h.base)
    assert len(covered) == sum(len(m) for m in doc["paths"].values())
    # the fuzzer was let in (the token applied), and wrote real checkpoints
    manual = h.daemon.metrics.registry.get_sample_value(
        "studio_checkpoint_duration_seconds_count", {"kind": "manual"}
    )
    assert manual and manual > 0
    assert await h.wait_exit() == 0  # the fuzzed stop stopped it cleanly
