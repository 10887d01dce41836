"""Floor 2, the I/O shell: everything the pure cores leave to their drivers.

RabbitMQ (``amqp``), the logs' databases (``store``, ``pgbatch``, ``journal``), the batch loop
(``driver``), outages and retries (``outages``), configuration (``config``), logging (``logs``),
every error under one root (``errors``), tracing, metrics, heartbeats, crash points, and the
in-memory broker that tests use in place of RabbitMQ (``memory``). It imports ``schemas`` and
libraries only; ``coordinator`` and ``participant`` build on it, and the tools in ``twophase`` on
all of them (docs/architecture.md).
"""
