"""The session daemon (``studio-agent run``), one module per concern.

=================  ==========================================================
``main``           composes the rest: start, run, stop; ``run()`` for the CLI
``lifecycle``      the status state machine (forward only)
``supervisor``     the IDE process: readiness probe, output ring, restarts
``reaper``         child subreaper: reaps orphans the IDE leaves behind
``api``            the local HTTP API (aiohttp)
``openapi``        the API's contract, checked against the app by tests
``control_plane``  heartbeats and status events, latest state only
``resources``      CPU, memory (cgroup-aware), disk, IDE RSS
``metrics``        Prometheus metrics in a per-daemon registry
``clock``          injectable time, so timing logic is testable
=================  ==========================================================
"""
