"""Loading a participant service given as ``module:object`` (``--app``)."""

from __future__ import annotations

import importlib
from typing import Any

from runtime.errors import ConfigurationError


def load_app(spec: str) -> Any:
    """``module:object``; the object is a Participant or a callable that returns one."""
    from participant.worker import Participant

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"--app {spec!r} must look like package.module:object")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"--app {spec!r}: cannot import {module_name!r}: {exc}") from exc
    target = getattr(module, attribute, None)
    if target is None:
        raise ConfigurationError(f"--app {spec!r}: {module_name} has no attribute {attribute!r}")
    app = target if isinstance(target, Participant) else target()
    if not isinstance(app, Participant):
        raise ConfigurationError(f"--app {spec!r} did not give a participant.Participant")
    return app
