"""The import rules of docs/architecture.md §1: import-linter contracts, and a stricter AST check.

The import-linter contracts are the ones in ``pyproject.toml``. Two things keep the file from being
run exactly as written today, so the test runs a generated copy and warns about each adaptation:

* forbidden contracts that name external modules (pika, time, ...) need
  ``include_external_packages = true`` at the top level, or import-linter refuses to run;
* import-linter fails with "Module 'coordinator.client' does not exist" for an internal forbidden
  module that is not written yet. A module that does not exist cannot be imported, so dropping it
  from the copy loses nothing.

Once ``pyproject.toml`` needs neither adaptation, the copy is identical to it.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "runtime", "coordinator", "participant", "twophase")

_RUN_LINTER = (
    "import sys\n"
    "from importlinter.cli import lint_imports\n"
    "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))\n"
)


# ---- import-linter --------------------------------------------------------------------------


def _module_exists(root: Path, name: str) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def linter_config(root: Path) -> tuple[dict[str, Any], list[str]]:
    """``[tool.importlinter]`` of pyproject.toml, adapted to run; and the adaptations made."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        config: dict[str, Any] = tomllib.load(f)["tool"]["importlinter"]
    config = json.loads(json.dumps(config))  # deep copy
    roots = set(config.get("root_packages", [config.get("root_package")]))
    adaptations: list[str] = []

    def is_internal(name: str) -> bool:
        return name.split(".")[0] in roots

    uses_externals = any(
        not is_internal(module)
        for contract in config["contracts"]
        if contract["type"] == "forbidden"
        for module in contract["forbidden_modules"]
    )
    if uses_externals and not config.get("include_external_packages"):
        config["include_external_packages"] = True
        adaptations.append("set include_external_packages = true (external forbidden modules)")

    for contract in config["contracts"]:
        if contract["type"] != "forbidden":
            continue
        missing = [
            m
            for m in contract["forbidden_modules"]
            if is_internal(m) and "*" not in m and not _module_exists(root, m)
        ]
        if missing:
            contract["forbidden_modules"] = [
                m for m in contract["forbidden_modules"] if m not in missing
            ]
            adaptations.append(f"{contract['name']!r}: dropped not-yet-existing {missing}")
    return config, adaptations


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML here")


def to_toml(config: dict[str, Any]) -> str:
    lines = ["[tool.importlinter]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in config.items() if k != "contracts"]
    for contract in config["contracts"]:
        lines += ["", "[[tool.importlinter.contracts]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in contract.items()]
    return "\n".join(lines) + "\n"


def run_linter(
    root: Path, config: dict[str, Any], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    config_file = tmp_path / "importlinter.toml"
    config_file.write_text(to_toml(config))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", _RUN_LINTER, str(config_file)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_linter_contracts_are_kept(tmp_path: Path) -> None:
    config, adaptations = linter_config(ROOT)
    for adaptation in adaptations:
        warnings.warn(
            f"import-linter config adapted from pyproject.toml: {adaptation}", stacklevel=1
        )
    result = run_linter(ROOT, config, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"import-linter contracts broken:\n{output}"
    assert f"{len(config['contracts'])} kept, 0 broken" in output, output


def test_import_linter_contracts_catch_violations(tmp_path: Path) -> None:
    """The contracts really see stdlib and third-party imports (a vacuous pass would be useless)."""
    copy = tmp_path / "repo"
    for package in PACKAGES:
        if (ROOT / package).is_dir():
            shutil.copytree(
                ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__")
            )
    violations = {
        "coordinator/core/__init__.py": "import time",
        "participant/core/__init__.py": "import coordinator.core",
        "schemas/__init__.py": "import pika",
    }
    for path, line in violations.items():
        with (copy / path).open("a") as f:
            f.write(f"\n{line}  # injected by test_architecture\n")
    config, _ = linter_config(copy)
    result = run_linter(copy, config, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "coordinator.core -> time" in output, output
    assert "schemas -> pika" in output, output
    assert "participant.core -> coordinator.core" in output, output


# ---- the cores: an explicit allow-list, checked on the source -------------------------------

CORE_ALLOWED = ("schemas", "__future__", "typing", "collections", "dataclasses", "enum")
CORES = ("coordinator.core", "participant.core")


def _is_within(module: str, allowed: str) -> bool:
    return module == allowed or module.startswith(allowed + ".")


def imported_modules(path: Path, package: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                yield node.lineno, node.module
                continue
            parts = package.split(".")
            up = node.level - 1 if is_package else node.level
            if up > len(parts):
                yield node.lineno, "." * node.level + (node.module or "")
                continue
            base = parts[: len(parts) - up] if up else parts
            yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
        ):
            yield node.lineno, "__import__()"


def _module_of(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(path: Path) -> str:
    module = _module_of(path)
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _sources(package: str) -> list[Path]:
    directory = ROOT.joinpath(*package.split("."))
    files = sorted(directory.rglob("*.py"))
    assert files, f"no sources found for {package} in {directory}"
    return files


@pytest.mark.parametrize("core", CORES)
def test_cores_import_only_schemas_and_pure_stdlib(core: str) -> None:
    allowed = (*CORE_ALLOWED, core)
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in _sources(core)
        for line, module in imported_modules(path, _package_of(path))
        if not any(_is_within(module, a) for a in allowed)
    ]
    assert not bad, (
        f"{core} must stay pure (docs/architecture.md §1): it may import only {allowed}; "
        "time and ids come in as inputs. Found:\n" + "\n".join(bad)
    )


def test_schemas_import_only_stdlib_and_msgspec() -> None:
    allowed_roots = set(sys.stdlib_module_names) | {"msgspec", "schemas", "__future__"}
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in _sources("schemas")
        for line, module in imported_modules(path, _package_of(path))
        if module.split(".")[0] not in allowed_roots
    ]
    assert not bad, "schemas imports the standard library and msgspec only:\n" + "\n".join(bad)


def test_ast_scan_resolves_relative_imports(tmp_path: Path) -> None:
    source = tmp_path / "__init__.py"
    source.write_text(
        "from . import machine\nfrom .events import X\nfrom .. import service\n"
        "import collections.abc, time\nfrom collections import abc\n__import__('os')\n"
    )
    found = [m for _, m in imported_modules(source, "coordinator.core")]
    assert found == [
        "coordinator.core",
        "coordinator.core.events",
        "coordinator",
        "collections.abc",
        "time",
        "collections",
        "__import__()",
    ]
    allowed = (*CORE_ALLOWED, "coordinator.core")
    assert [m for m in found if not any(_is_within(m, a) for a in allowed)] == [
        "coordinator",
        "time",
        "__import__()",
    ]


# ---- no import cycles between modules -------------------------------------------------------


def _import_cycles(packages: tuple[str, ...]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), imports of every kind
    counted: inside functions and under TYPE_CHECKING too, so that no cycle is hidden."""
    import grimp

    graph = grimp.build_graph(*packages)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_module_of_the_product_imports_itself_through_others() -> None:
    assert _import_cycles(PACKAGES) == []


def test_the_cycle_check_finds_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from cyclic import b\n")
    (package / "b.py").write_text("from cyclic import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _import_cycles(("cyclic",)) == [["cyclic.a", "cyclic.b"]]
