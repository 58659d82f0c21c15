"""The session daemon (``studio-agent run``), one module per concern.

=================  ==========================================================
``main``           wires the parts together: start, run, stop; ``run()``
``checkpointer``   checkpoint policy: states, periodic ticks, final, stop budget
``models``         the documents of the API and the control plane (pydantic)
``openapi``        the API's contract, generated from the models and routes
``api``            the local HTTP API (aiohttp)
``api_token``      the API's bearer token: configured, or generated and saved
``lifecycle``      the status state machine (forward only)
``supervisor``     the IDE process: readiness probe, output ring, restarts
``reaper``         child subreaper: reaps orphans the IDE leaves behind
``control_plane``  heartbeats and status events, latest state only
``resources``      CPU, memory (cgroup-aware), disk, IDE RSS
``metrics``        Prometheus metrics in a per-daemon registry
``clock``          injectable time, so timing logic is testable
=================  ==========================================================
"""
