"""One error root: every error the product raises on purpose is a TwophaseError."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys

import pytest

from participant.operations import Refuse
from runtime import errors
from schemas.errors import ProtocolError, TwophaseError

PACKAGES = ("schemas", "runtime", "coordinator", "participant", "twophase")


def product_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}."):
            if not info.name.endswith("__main__"):
                names.append(info.name)
    return names


def test_every_public_error_of_the_product_is_under_the_root() -> None:
    found: dict[str, type[BaseException]] = {}
    for name in product_modules():
        for attribute, value in vars(importlib.import_module(name)).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and not attribute.startswith("_")
            ):
                found[f"{name}.{attribute}"] = value
    assert found.pop("participant.operations.Refuse") is Refuse  # a NO vote, not an error
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, TwophaseError))
    assert outside == []
    assert {"schemas.codec.DecodeError", "schemas.validation.InvalidMessage"} <= {
        name for name, cls in found.items() if issubclass(cls, ProtocolError)
    }
    assert len(found) >= 20


def test_each_error_is_defined_once() -> None:
    defined = [name for name in product_modules() for name in _class_names(name)]
    twice = sorted({n for n in defined if defined.count(n) > 1 and n.endswith(("Error", "Hazard"))})
    assert twice == []


def _class_names(module: str) -> list[str]:
    found = vars(importlib.import_module(module)).items()
    return [a for a, v in found if inspect.isclass(v) and v.__module__ == module]


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (errors.PublishRefused, ValueError),
        (errors.LimitExceeded, ValueError),
        (errors.ResourceUnavailable, ConnectionError),
        (errors.OutcomeUnknown, TimeoutError),
        (errors.ClientClosed, RuntimeError),
        (errors.UnknownOperation, RuntimeError),
    ],
)
def test_errors_keep_the_builtin_base_they_had(
    error: type[Exception], builtin: type[Exception]
) -> None:
    assert issubclass(error, TwophaseError) and issubclass(error, builtin)


def test_the_error_modules_import_the_standard_library_only() -> None:
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import runtime.errors\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(result.stdout)
    ours = {"runtime", "runtime.errors", "schemas", "schemas.errors"}
    others = [m for m in loaded if m not in ours and m.split(".")[0] not in sys.stdlib_module_names]
    assert others == []
    assert ours <= set(loaded)


def test_the_documented_client_errors_are_still_the_clients() -> None:
    from coordinator import client

    assert client.OutcomeUnknown is errors.OutcomeUnknown
    assert client.LimitExceeded is errors.LimitExceeded
    assert client.ClientClosed is errors.ClientClosed
    assert {"OutcomeUnknown", "LimitExceeded", "ClientClosed"} <= set(client.__all__)
