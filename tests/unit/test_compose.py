"""The docker compose demo (compose/) agrees with the code: parsed, never run (no Docker engine).

Checked: the compose file, the Dockerfile, the RabbitMQ definitions' topology and the PostgreSQL
init script, against ``schemas/topology.py``, the environment variables the code reads, the CLI,
and the example bank; and the keys: the one-shot service ``keys`` makes one per identity the stack
uses, each service mounts its own and the keyring only, and none runs without (its script is run
here, in a temporary directory, with the real ``twophase keys``). The RabbitMQ accounts are
checked in ``test_compose_rabbitmq.py``, with the helpers defined here.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from runtime import auth
from schemas import topology
from schemas.permissions import COORDINATOR, Identity
from schemas.permissions import client as client_identity
from schemas.permissions import participant as participant_identity

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
DEFINITIONS_FILE = COMPOSE_DIR / "rabbitmq" / "definitions.json"
RABBITMQ_CONF = COMPOSE_DIR / "rabbitmq" / "rabbitmq.conf"
INIT_SQL = COMPOSE_DIR / "postgres" / "init.sql"
SOURCE_PACKAGES = ("twophase", "runtime", "coordinator", "participant")
#: the packages the wheel holds, as pyproject.toml lists them: the image needs every one
PACKAGES = tuple(
    name.rstrip("*")
    for name in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
)

#: TWOPHASE_* variables the compose file sets before the code reads them: planned by the
#: observability work (metrics endpoint, structured logs). Remove a name once the code reads it;
#: ``test_planned_variables_are_still_planned`` warns when that is the case.
PLANNED_BY_OBSERVABILITY: frozenset[str] = frozenset()  # everything compose sets is read now

METRICS_PORT = 9464
EXPECTED_PORTS = {  # service -> container ports published on the same host port
    "rabbitmq": {5672, 15672},
    "jaeger": {16686, 4318},
    "coordinator": {METRICS_PORT},
}
SERVICES = {"keys", "rabbitmq", "postgres", "jaeger", "coordinator", "bank-a", "bank-b"}
INFRASTRUCTURE = ("rabbitmq", "postgres")
DEFAULT_EXCHANGE = "amq.default"  # how RabbitMQ names "" in permission checks
CLIENT = "web"  # the client identity of the compose account "client"

KEYS_SERVICE = "keys"  # the one-shot service that makes the keys
KEYS_VOLUME = "keys"  # the named volume they live in
#: where the keys service mounts the volume: the image's data directory, which the image's user
#: owns (Dockerfile), so that the empty volume takes that owner and the user may write the keys
DATA_DIR = "/var/lib/twophase"
KEYS_DIR = "keys"  # in the volume: KEYS_DIR/<identity file stem>/ and KEYS_DIR/keyring/
NEW_KEYS_DIR = "keys.new"  # where they are made before the rename to KEYS_DIR


# ---- loading ----------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    with COMPOSE_FILE.open() as f:
        data: dict[str, Any] = yaml.safe_load(f)
    return data


@cache
def definitions() -> dict[str, Any]:
    with DEFINITIONS_FILE.open() as f:
        data: dict[str, Any] = json.load(f)
    return data


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose()["services"]
    return result


def env(service: str) -> dict[str, str]:
    """The service's environment, whether written as a mapping or as a list of NAME=VALUE."""
    raw = services()[service].get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) for item in raw)
        return {name: value for name, value in pairs}
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def command(service: str) -> list[str]:
    raw = services()[service].get("command") or []
    return shlex.split(raw) if isinstance(raw, str) else [str(part) for part in raw]


def image_services() -> list[str]:
    """Services that run the project's image."""
    return sorted(name for name, svc in services().items() if "build" in svc)


def app_services() -> list[str]:
    """Services that run the project's image as it is, the ``twophase`` CLI: every one but the
    one-shot ``keys``, whose entrypoint is a shell."""
    return [name for name in image_services() if "entrypoint" not in services()[name]]


def participant_services() -> list[str]:
    return [name for name in app_services() if command(name)[:1] == ["participant"]]


def published_ports(service: str) -> dict[int, int]:
    """container port -> host port, from the short syntax [IP:]HOST:CONTAINER[/PROTO]."""
    result: dict[int, int] = {}
    for entry in services()[service].get("ports") or []:
        if isinstance(entry, dict):
            target = int(entry["target"])
            result[target] = int(entry.get("published") or target)
            continue
        spec = str(entry).split("/", 1)[0]
        parts = spec.rsplit(":", 2)
        container = int(parts[-1])
        result[container] = int(parts[-2]) if len(parts) >= 2 else container
    return result


def mounts(service: str) -> dict[Path, str]:
    """Bind mounts of local files: resolved source -> target path in the container."""
    result: dict[Path, str] = {}
    for entry in services()[service].get("volumes") or []:
        if isinstance(entry, dict):
            if entry["type"] == "bind":
                result[(COMPOSE_DIR / entry["source"]).resolve()] = entry["target"]
            continue
        source, target = str(entry).split(":")[:2]
        if source.startswith((".", "/")):
            result[(COMPOSE_DIR / source).resolve()] = target
    return result


@dataclasses.dataclass(frozen=True)
class VolumeMount:
    """A named volume mounted in a service: ``subpath`` "" for the whole volume."""

    volume: str
    target: str
    subpath: str
    read_only: bool


#: what the long syntax of a volume mount may say here; anything else is a typo, or an option
#: this file does not check (compose-spec: services.volumes, type "volume")
VOLUME_MOUNT_KEYS = {"type", "source", "target", "read_only", "volume"}
VOLUME_OPTION_KEYS = {"subpath", "nocopy"}


def volume_mounts(service: str) -> list[VolumeMount]:
    """The named volumes ``service`` mounts, in either syntax."""
    result = []
    for entry in services()[service].get("volumes") or []:
        if isinstance(entry, dict):
            if entry["type"] != "volume":
                continue
            assert set(entry) <= VOLUME_MOUNT_KEYS, f"{service}: {sorted(entry)}"
            options = entry.get("volume") or {}
            assert set(options) <= VOLUME_OPTION_KEYS, f"{service}: {sorted(options)}"
            result.append(
                VolumeMount(
                    str(entry["source"]),
                    str(entry["target"]),
                    str(options.get("subpath", "")),
                    entry.get("read_only") is True,
                )
            )
            continue
        source, target, *mode = str(entry).split(":")
        if not source.startswith((".", "/")):
            result.append(VolumeMount(source, target, "", "ro" in ",".join(mode).split(",")))
    return result


def users() -> dict[str, dict[str, Any]]:
    return {u["name"]: u for u in definitions()["users"]}


def permissions(user: str, vhost: str = "/") -> dict[str, str]:
    found = [p for p in definitions()["permissions"] if p["user"] == user and p["vhost"] == vhost]
    assert len(found) == 1, f"expected one permission entry for {user!r} on vhost {vhost!r}"
    return {kind: str(found[0][kind]) for kind in ("configure", "write", "read")}


def topic_permissions(user: str, vhost: str = "/") -> dict[str, str]:
    """The routing keys ``user`` may publish with ("write") and bind with ("read") on the
    protocol exchange."""
    found = [
        t
        for t in definitions()["topic_permissions"]
        if (t["user"], t["vhost"], t["exchange"]) == (user, vhost, topology.EXCHANGE)
    ]
    assert len(found) == 1, f"expected one topic permission entry for {user!r} on {vhost!r}"
    return {kind: str(found[0][kind]) for kind in ("write", "read")}


def allowed(regex: str, name: str) -> bool:
    """RabbitMQ matches a permission regex anywhere in the name (re:run), '' meaning '^$'."""
    return re.search(regex or "^$", name) is not None


def amqp_user(url: str) -> tuple[str, str, str]:
    """(user, password, vhost) of an AMQP URL, the way pika reads it."""
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    return unquote(parts.username or ""), unquote(parts.password or ""), vhost


# ---- the variables the code reads ---------------------------------------------------------------


@cache
def string_literals() -> frozenset[str]:
    """Every string constant in the Python sources of the runtime packages."""
    found: set[str] = set()
    for package in SOURCE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            found.update(
                node.value
                for node in ast.walk(tree)
                if isinstance(node, ast.Constant) and isinstance(node.value, str)
            )
    return frozenset(found)


def twophase_variables() -> Iterator[tuple[str, str]]:
    for service in services():
        for name in env(service):
            if name.startswith("TWOPHASE_"):
                yield service, name


# ---- the compose file -----------------------------------------------------------------------


def test_compose_file_parses_and_has_the_services() -> None:
    assert isinstance(compose(), dict)
    assert set(services()) >= SERVICES
    assert set(app_services()) == {"coordinator", "bank-a", "bank-b"}
    assert set(image_services()) == {KEYS_SERVICE, *app_services()}


def test_every_service_has_an_image_or_a_buildable_dockerfile() -> None:
    for name, svc in services().items():
        assert "image" in svc or "build" in svc, name
        if "image" in svc:
            assert re.fullmatch(r"[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9._-]+)?", svc["image"]), name
        build = svc.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (COMPOSE_DIR / build.get("context", ".")).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: no {dockerfile}"
        assert context == ROOT, f"{name}: the image is built from the repository root"


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    froms = [line.split()[1] for line in instructions if line.upper().startswith("FROM ")]
    assert froms and all(image == "python:3.11-slim" for image in froms)
    assert any(re.search(r"pip install '\.\[tracing\]'$", line) for line in instructions)
    assert instructions.count('ENTRYPOINT ["twophase"]') == 1
    users_set = [line.split()[1] for line in instructions if line.upper().startswith("USER ")]
    assert users_set and users_set[-1].split(":")[0] not in ("root", "0"), "must run as non-root"
    copied = set()
    for line in instructions:  # everything COPY'd from the context exists
        if line.upper().startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
                copied.add(source)
    assert set(PACKAGES) <= copied, f"the image lacks {set(PACKAGES) - copied}"


def test_dockerignore_keeps_what_the_build_needs() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    needed = {"pyproject.toml", "README.md", *PACKAGES}
    assert not ignored & needed
    assert {".git", "tests"} <= ignored


def test_app_commands_are_valid_cli_invocations() -> None:
    from twophase.cli import build_parser

    parser = build_parser()
    assert command("coordinator") == ["coordinator"]
    for name in participant_services():
        args = parser.parse_args(command(name))
        module_name, _, attribute = args.app.partition(":")
        module = __import__(module_name, fromlist=[attribute])
        assert callable(getattr(module, attribute)), f"{name}: --app {args.app}"
    for name in app_services():
        parser.parse_args(command(name))


def test_twophase_variables_are_read_by_the_code() -> None:
    literals = string_literals()
    unknown = sorted(
        f"{service}: {name}"
        for service, name in twophase_variables()
        if name not in literals and name not in PLANNED_BY_OBSERVABILITY
    )
    assert not unknown, f"set in compose but read nowhere in {SOURCE_PACKAGES}: {unknown}"


def test_infrastructure_is_healthy_before_the_services_start() -> None:
    for name in INFRASTRUCTURE:
        assert services()[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in app_services():
        depends = services()[name].get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for needed in INFRASTRUCTURE:
            assert depends.get(needed, {}).get("condition") == "service_healthy", (name, needed)
        for other, spec in depends.items():
            assert other in services(), f"{name} depends on unknown {other}"
            if spec.get("condition") == "service_healthy":
                assert services()[other].get("healthcheck"), f"{other} has no healthcheck"


def test_ports_are_the_defaults() -> None:
    for name, ports in EXPECTED_PORTS.items():
        published = published_ports(name)
        for port in ports:
            assert published.get(port) == port, f"{name}: {port} is not published as {port}"
    assert env("coordinator")["TWOPHASE_METRICS_PORT"] == str(METRICS_PORT)
    for name in app_services():  # a metrics port that is set is published
        metrics_port = env(name).get("TWOPHASE_METRICS_PORT")
        if metrics_port is not None:
            assert int(metrics_port) in published_ports(name), name


def test_postgres_allows_prepared_transactions() -> None:
    assert services()["postgres"]["image"].startswith("postgres:15")
    cmd = command("postgres")
    settings = dict(cmd[i + 1].split("=", 1) for i, part in enumerate(cmd) if part == "-c")
    assert int(settings["max_prepared_transactions"]) > 0
    assert mounts("postgres").get(INIT_SQL.resolve(), "").startswith("/docker-entrypoint-initdb.d/")


def test_tracing_goes_to_jaeger_over_otlp_http() -> None:
    jaeger = services()["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one")
    assert str(env("jaeger").get("COLLECTOR_OTLP_ENABLED")).lower() == "true"
    names = []
    for name in app_services():
        variables = env(name)
        endpoint = urlsplit(variables["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert (endpoint.scheme, endpoint.hostname, endpoint.port) == ("http", "jaeger", 4318)
        assert variables.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "http/protobuf"
        names.append(variables["OTEL_SERVICE_NAME"])
    assert len(set(names)) == len(names), "every service needs its own OTEL_SERVICE_NAME"


def test_log_format_values() -> None:
    for name in app_services():
        assert env(name).get("TWOPHASE_LOG_FORMAT", "text") in ("json", "text"), name


# ---- keys -------------------------------------------------------------------------------------


def service_identity(service: str) -> Identity:
    """The identity a twophase service's key must be (``runtime.config.auth``'s ``identity``)."""
    if command(service)[:1] == ["participant"]:
        return participant_identity(env(service)["TWOPHASE_PARTICIPANT_NAME"])
    assert command(service) == ["coordinator"], f"{service}: which identity?"
    return COORDINATOR


def stack_identities() -> set[Identity]:
    """Every identity of the stack: its services', and the client of the user's commands."""
    return {service_identity(name) for name in app_services()} | {client_identity(CLIENT)}


def keys_script() -> str:
    """The keys service's script as the shell gets it (compose turns ``$$`` into ``$``)."""
    svc = services()[KEYS_SERVICE]
    assert svc.get("entrypoint") == ["sh", "-ec"], "a shell that stops at the first failure"
    raw = svc.get("command")
    assert isinstance(raw, list) and len(raw) == 1, "one argument: the script"
    text = str(raw[0])
    assert "$" not in text.replace("$$", ""), "compose would interpolate a single $"
    return text.replace("$$", "$")


def script_commands() -> list[list[str]]:
    return [
        shlex.split(line)
        for line in keys_script().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def keys_init_calls() -> dict[str, Identity]:
    """The directory each ``twophase keys init`` of the script writes -> the identity it makes
    (read with the CLI's own parser)."""
    from twophase.cli import build_parser

    made: dict[str, Identity] = {}
    for words in script_commands():
        if words[:1] != ["twophase"]:
            continue
        assert words[1:3] == ["keys", "init"], f"the script runs {words}"
        args = build_parser().parse_args(words[1:])
        chosen = [COORDINATOR] if args.coordinator else []
        chosen += [participant_identity(name) for name in args.participant]
        chosen += [client_identity(name) for name in args.client]
        assert len(chosen) == 1, f"one identity per directory, so one secret per mount: {words}"
        assert str(args.dir) not in made, f"{args.dir} twice"
        made[str(args.dir)] = chosen[0]
    return made


def test_the_keys_service_makes_the_keys_once() -> None:
    svc = services()[KEYS_SERVICE]
    lines = [line.strip() for line in keys_script().splitlines() if line.strip()]
    assert lines[0] == f"cd {DATA_DIR}"
    # kept once made: `keys init` would refuse (it never replaces a key) and the stack not start
    assert re.fullmatch(rf"if \[ -d {KEYS_DIR} \]; then .*; exit 0; fi", lines[1]), lines[1]
    # made aside and renamed once complete: an interrupted run leaves no half-made keys dir
    assert f"rm -rf {NEW_KEYS_DIR}" in lines
    assert lines[-1] == f"mv {NEW_KEYS_DIR} {KEYS_DIR}"
    assert volume_mounts(KEYS_SERVICE) == [VolumeMount(KEYS_VOLUME, DATA_DIR, "", False)]
    assert KEYS_VOLUME in (compose().get("volumes") or {}), "a named volume: kept across `up`s"
    # the data directory is the image user's, so the fresh volume mounted there is too
    dockerfile = (ROOT / "Dockerfile").read_text()
    user = re.findall(r"^USER (\S+)", dockerfile, flags=re.MULTILINE)[-1].split(":")[0]
    assert re.search(rf"chown {user}:\S+ {re.escape(DATA_DIR)}$", dockerfile, flags=re.MULTILINE)
    assert "user" not in svc, "the keys are the image user's, who runs the services"
    assert svc.get("network_mode") == "none"
    assert not svc.get("ports") and not svc.get("depends_on")
    assert svc.get("restart", "no") == "no"


def test_the_keys_service_makes_exactly_the_identities_of_the_stack() -> None:
    made = keys_init_calls()
    assert sorted(map(str, made.values())) == sorted(map(str, stack_identities()))
    private, linked = set(), set()
    for words in script_commands():
        if words[:3] == ["mkdir", "-m", "700"]:
            private.update(words[3:])
        elif words[:2] == ["ln", "-s"]:
            assert words[2:3] == ["../keyring"], words
            linked.add(str(PurePosixPath(words[3]).parent))
        elif words[:3] == ["twophase", "keys", "init"]:
            directory = words[3]
            identity = made[directory]
            assert PurePosixPath(directory) == PurePosixPath(NEW_KEYS_DIR, identity.file_stem)
            assert directory in private, f"{directory}: not made owner-only"
            # its keyring is the shared one (so that `keys rotate|retire DIR` work on it)
            assert directory in linked, f"{directory}/keyring is not ../keyring (yet)"


def test_each_service_mounts_its_own_key_and_the_keyring_only() -> None:
    for name in app_services():
        identity = service_identity(name)
        key_file = PurePosixPath(env(name)[auth.KEY_FILE_VARIABLE])
        keyring = PurePosixPath(env(name)[auth.KEYRING_VARIABLE])
        assert key_file.name == auth.secret_key_path(Path(), identity).name, name
        mounted = {m.target: m for m in volume_mounts(name) if m.volume == KEYS_VOLUME}
        own = mounted.get(str(key_file.parent))
        assert own is not None, f"{name}: {key_file.parent} is not a mount of {KEYS_VOLUME}"
        assert own.subpath == f"{KEYS_DIR}/{identity.file_stem}", f"{name}: not its own key"
        ring = mounted.get(str(keyring))
        assert ring is not None, f"{name}: {keyring} is not a mount of {KEYS_VOLUME}"
        assert ring.subpath == f"{KEYS_DIR}/keyring", name
        assert set(mounted) == {str(key_file.parent), str(keyring)}, f"{name}: more of the keys"
        assert all(m.read_only for m in mounted.values()), f"{name}: keys mounted writable"
        # its files arrive by the subpaths, which exist only once the keys service is done
        assert "configs" not in services()[name] and "secrets" not in services()[name], name
    for name in services().keys() - {KEYS_SERVICE, *app_services()}:
        assert all(m.volume != KEYS_VOLUME for m in volume_mounts(name)), name


def test_services_start_once_the_keys_exist() -> None:
    for name in app_services():
        depends = services()[name].get("depends_on") or {}
        condition = depends.get(KEYS_SERVICE, {}).get("condition")
        assert condition == "service_completed_successfully", name


def test_no_service_runs_without_authentication() -> None:
    for name in services():
        assert "TWOPHASE_INSECURE" not in env(name), name
        assert not any("--insecure" in part for part in command(name)), name
    for name in app_services():
        assert env(name).get(auth.KEY_FILE_VARIABLE), name
        assert env(name).get(auth.KEYRING_VARIABLE), name


def test_the_readme_copies_the_client_key_from_where_it_is() -> None:
    readme = (COMPOSE_DIR / "README.md").read_text()
    stem = client_identity(CLIENT).file_stem
    for source in (f"{KEYS_DIR}/{stem}", f"{KEYS_DIR}/keyring"):
        assert f"cp {KEYS_SERVICE}:{DATA_DIR}/{source} " in readme, source
    assert f'key_file=f"{{KEYS}}/{stem}/{stem}.key"' in readme


def in_volume(volume: Path, service: str, path: str) -> Path:
    """Where ``path`` of ``service``'s container is in the keys volume (at ``volume``)."""
    for mount in volume_mounts(service):
        if mount.volume == KEYS_VOLUME and PurePosixPath(path).is_relative_to(mount.target):
            return volume / mount.subpath / PurePosixPath(path).relative_to(mount.target)
    raise AssertionError(f"{service}: {path} is not in the volume {KEYS_VOLUME}")


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_the_keys_script_makes_keys_each_service_loads(tmp_path: Path) -> None:
    """The keys service's script, run by ``sh`` with the real ``twophase keys`` in a directory
    standing for the volume; each service's key and keyring read through its mounts as it reads
    them; a second run keeps them; a rotation as compose/README.md says works on the layout."""
    volume, bin_dir = tmp_path / "volume", tmp_path / "bin"
    volume.mkdir()
    bin_dir.mkdir()
    shim = bin_dir / "twophase"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m twophase "$@"\n')
    shim.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    environ = {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT)}

    def run(script: str) -> str:
        done = subprocess.run(
            ["sh", "-ec", script],
            cwd=volume,
            env=environ,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    script = keys_script()
    assert script.startswith(f"cd {DATA_DIR}\n")
    script = script.replace(f"cd {DATA_DIR}\n", "", 1)  # run in the stand-in (cwd)
    run(script)
    assert not (volume / NEW_KEYS_DIR).exists()
    for name in app_services():
        key_file = in_volume(volume, name, env(name)[auth.KEY_FILE_VARIABLE])
        keyring = in_volume(volume, name, env(name)[auth.KEYRING_VARIABLE])
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, name
        # what the mount of its own directory shows: its secret, no other
        assert sorted(p.name for p in key_file.parent.iterdir()) == sorted(
            [key_file.name, "keyring"]
        )
        loaded = auth.load_auth(
            str(key_file), str(keyring), identity=service_identity(name), environ={}
        )
        assert loaded is not None and loaded.keyring.identities() == stack_identities()
    client = client_identity(CLIENT)  # the key the user copies out for the client
    client_dir = volume / KEYS_DIR / client.file_stem
    client_key = auth.secret_key_path(client_dir, client)
    loaded = auth.load_auth(str(client_key), str(client_dir / "keyring"), environ={})
    assert loaded is not None and loaded.identity == client

    def contents() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in sorted(volume.rglob("*")) if p.is_file()}

    before = contents()
    assert "kept" in run(script)
    assert contents() == before

    # a rotation of bank-a's key, the commands of compose/README.md (cwd: the data directory)
    bank_a = participant_identity("bank-a")
    directory = f"{KEYS_DIR}/{bank_a.file_stem}"
    old = auth.read_secret_key(auth.secret_key_path(volume / directory, bank_a)).key_id
    run(f"twophase keys rotate {directory} --participant bank-a")
    ring = auth.read_keyring(volume / KEYS_DIR / "keyring")
    assert sum(1 for identity, _ in ring.keys if identity == bank_a) == 2
    stem = bank_a.file_stem
    run(f"mv {directory}/{stem}.next.key {directory}/{stem}.key")
    run(f"twophase keys retire {directory} {old}")
    ring = auth.read_keyring(volume / KEYS_DIR / "keyring")
    new = auth.read_secret_key(auth.secret_key_path(volume / directory, bank_a)).key_id
    assert [key_id for identity, key_id in ring.keys if identity == bank_a] == [new] != [old]


# ---- RabbitMQ: topology -----------------------------------------------------------------------


def test_rabbitmq_loads_the_definitions() -> None:
    targets = mounts("rabbitmq")
    conf_target = targets[RABBITMQ_CONF.resolve()]
    assert conf_target.startswith("/etc/rabbitmq/") and conf_target.endswith(".conf")
    conf = dict(
        (key.strip(), value.strip())
        for key, _, value in (
            line.partition("=")
            for line in RABBITMQ_CONF.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        )
    )
    assert conf["load_definitions"] == targets[DEFINITIONS_FILE.resolve()]
    assert services()["rabbitmq"]["image"].startswith("rabbitmq:3.13-management")


def test_definitions_vhost() -> None:
    assert [v["name"] for v in definitions()["vhosts"]] == ["/"]
    for kind in ("exchanges", "queues", "bindings", "permissions"):
        assert all(item["vhost"] == "/" for item in definitions()[kind]), kind


def test_exchanges_match_the_topology() -> None:
    exchanges = {e["name"]: e for e in definitions()["exchanges"]}
    assert set(exchanges) == {topology.EXCHANGE, topology.DEAD_LETTER_EXCHANGE}
    assert exchanges[topology.EXCHANGE]["type"] == topology.EXCHANGE_TYPE == "topic"
    assert exchanges[topology.DEAD_LETTER_EXCHANGE]["type"] == "fanout"
    for exchange in exchanges.values():  # as runtime/amqp.py declares them
        assert exchange["durable"] is True
        assert exchange["auto_delete"] is False
        assert exchange["internal"] is False
        assert exchange["arguments"] == {}


def test_queues_match_the_topology() -> None:
    queues = {q["name"]: q for q in definitions()["queues"]}
    expected_participants = {
        topology.participant_queue(env(name)["TWOPHASE_PARTICIPANT_NAME"])
        for name in participant_services()
    }
    assert set(queues) == {
        topology.DEAD_LETTER_QUEUE,
        topology.COORDINATOR_QUEUE,
        *expected_participants,
    }
    for queue in queues.values():
        assert queue["durable"] is True and queue["auto_delete"] is False, queue["name"]
        assert not queue["name"].startswith(topology.CLIENT_QUEUE_PREFIX)
    # runtime/amqp.py declares the dead-letter queue bounded, the others with these.
    assert queues[topology.DEAD_LETTER_QUEUE]["arguments"] == topology.dead_letter_queue_arguments()
    for name in queues.keys() - {topology.DEAD_LETTER_QUEUE}:
        assert queues[name]["arguments"] == topology.durable_queue_arguments(), name


def test_bindings_match_the_topology() -> None:
    bindings = {
        (b["source"], b["destination"], b["routing_key"])
        for b in definitions()["bindings"]
        if b["destination_type"] == "queue"
    }
    queues = {q["name"] for q in definitions()["queues"]}
    expected = {(topology.DEAD_LETTER_EXCHANGE, topology.DEAD_LETTER_QUEUE, "")} | {
        (topology.EXCHANGE, queue, queue) for queue in queues - {topology.DEAD_LETTER_QUEUE}
    }
    assert bindings == expected
    assert all(b["arguments"] == {} for b in definitions()["bindings"])


def test_each_participant_service_has_its_queue() -> None:
    queues = {q["name"] for q in definitions()["queues"]}
    assert participant_services() == ["bank-a", "bank-b"]
    for name in participant_services():
        participant = env(name)["TWOPHASE_PARTICIPANT_NAME"]
        assert topology.participant_queue(participant) in queues, name


# ---- PostgreSQL -------------------------------------------------------------------------------


@cache
def init_sql() -> str:
    return INIT_SQL.read_text()


def sql_roles() -> dict[str, str]:
    return dict(re.findall(r"CREATE ROLE (\w+) LOGIN PASSWORD '([^']*)'", init_sql()))


def sql_databases() -> dict[str, str]:
    return dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+)", init_sql()))


def sql_tables() -> dict[str, set[str]]:
    """database -> tables created in it after its \\connect."""
    tables: dict[str, set[str]] = {}
    for section in re.split(r"^\\connect\s+", init_sql(), flags=re.MULTILINE)[1:]:
        database = section.split()[0]
        tables[database] = set(re.findall(r"CREATE TABLE (\w+)", section))
    return tables


def postgres_urls() -> Iterator[tuple[str, str, str]]:
    for name in app_services():
        for variable in ("TWOPHASE_LOG_URL", "TWOPHASE_BANK_DB"):
            value = env(name).get(variable, "")
            if value.startswith(("postgresql://", "postgres://")):
                yield name, variable, value


def test_postgres_urls_match_init_sql() -> None:
    roles, databases = sql_roles(), sql_databases()
    assert set(databases.values()) <= set(roles)
    assert list(postgres_urls())
    for name, variable, url in postgres_urls():
        parts = urlsplit(url)
        assert (parts.hostname, parts.port) == ("postgres", 5432), (name, variable)
        database = parts.path.lstrip("/")
        assert database in databases, f"{name} {variable}: no database {database!r} in init.sql"
        assert parts.username == databases[database], f"{name}: connect as the database owner"
        assert roles[parts.username] == unquote(parts.password or ""), f"{name}: password"


def test_coordinator_log_is_in_postgres() -> None:
    url = env("coordinator")["TWOPHASE_LOG_URL"]
    assert url.startswith("postgresql://")


def test_banks_have_their_accounts() -> None:
    from twophase.bank import RESOURCE_KINDS, table_name

    resources = set()
    for name in participant_services():
        variables = env(name)
        assert variables["TWOPHASE_BANK_RESOURCE"] in RESOURCE_KINDS
        resources.add(variables["TWOPHASE_BANK_RESOURCE"])
        bank_db = variables["TWOPHASE_BANK_DB"]
        if not bank_db.startswith("postgresql://"):
            continue
        database = urlsplit(bank_db).path.lstrip("/")
        table = table_name(variables["TWOPHASE_PARTICIPANT_NAME"])
        assert table in sql_tables().get(database, set()), f"{name}: no {table} in {database}"
    assert env("bank-a")["TWOPHASE_BANK_RESOURCE"] == "postgres"
    assert resources == set(RESOURCE_KINDS), "the demo shows both resource kinds"
