"""Floor 4, the tools: the ``twophase`` command (cli, admin_cli), demo, bench, chaos, fuzz, the
example bank, process helpers and test helpers. Built on every floor below (docs/architecture.md).
"""
