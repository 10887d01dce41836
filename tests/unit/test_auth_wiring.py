"""Authentication wired into the drivers, the heartbeats and the configuration (docs/architecture.md
§11), on the in-memory broker: what is signed is served, what is forged is dead-lettered with its
reason and counted, and the driver goes on. The client's side, and real processes, are in
tests/integration/test_forgery.py.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from coordinator.client import Client
from coordinator.service import CoordinatorConfig, CoordinatorService
from participant.worker import ParticipantWorker
from runtime import auth, config
from runtime.auth import Auth, Keyring, SigningKey
from runtime.errors import ConfigurationError
from runtime.heartbeat import HeartbeatSender
from runtime.memory import MemoryBroker, MemoryChannel
from schemas import permissions, topology
from schemas.codec import decode_message, encode
from schemas.messages import (
    Begin,
    Branch,
    Commit,
    Envelope,
    Message,
    Outcome,
    OutcomeKind,
    Prepare,
    Vote,
    VoteKind,
)
from schemas.permissions import (
    BAD_SIGNATURE,
    NOT_PERMITTED,
    SENDER_HEADER,
    UNKNOWN_KEY,
    Identity,
    client_reply_queue,
)
from twophase import bank, cli

COORDINATOR = permissions.COORDINATOR
BANK_A = permissions.participant("bank-a")
BANK_B = permissions.participant("bank-b")
WEB = permissions.client("web")
REPLY = client_reply_queue("web", "test")
QUEUE_A = topology.participant_queue("bank-a")


class Keys:
    def __init__(self) -> None:
        self.keys = {i: auth.generate(i) for i in (COORDINATOR, BANK_A, BANK_B, WEB)}
        self.ring = Keyring.of((i, k.public) for i, k in self.keys.items())

    def of(self, identity: Identity) -> Auth:
        return Auth(self.keys[identity], self.ring)


class System:
    """A coordinator and two banks with keys, and a client channel that signs as ``web``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.broker, self.keys = tmp, MemoryBroker(), Keys()
        self.registry = CollectorRegistry()
        self.coordinator = CoordinatorService.connect(
            CoordinatorConfig(
                "amqp://memory/",
                str(tmp / "coordinator.log.db"),
                channel_factory=self.broker.channel,
                metrics_registry=self.registry,
                auth=self.keys.of(COORDINATOR),
            )
        )
        self.workers: dict[str, ParticipantWorker] = {}
        for identity in (BANK_A, BANK_B):
            name = identity.name
            db = str(tmp / f"{name}.db")
            bank.open_accounts(db, name, [(f"{name}-0", 100)])
            app = bank.create_bank(
                name,
                db,
                amqp_url="amqp://memory/",
                log_url=str(tmp / f"{name}.log.db"),
                metrics_registry=CollectorRegistry(),
                auth=self.keys.of(identity),
            )
            app.channel_factory = self.broker.channel
            self.workers[name] = ParticipantWorker.connect(app)
        self.client = MemoryChannel(self.broker)
        self.client.declare_queue(REPLY)
        self.client.consume(REPLY)
        for driver in self.drivers():
            driver.channel.consume(driver.queue)

    def drivers(self) -> list[CoordinatorService | ParticipantWorker]:
        return [self.coordinator, *self.workers.values()]

    def send(
        self, queue: str, message: Message, signer: Identity | None = WEB, *, tamper: bool = False
    ) -> None:
        body = encode(message)
        headers = {} if signer is None else self.keys.of(signer).sign(body, queue, message)
        if tamper:
            body = body.replace(b'"amount":1', b'"amount":9')
        self.client.publish(queue, body, headers=headers)

    def settle(self, turns: int = 20) -> None:
        for _ in range(turns):
            for driver in self.drivers():
                driver.turn()

    def replies(self) -> list[tuple[Outcome, dict[str, str]]]:
        found = []
        for delivery in self.client.poll(0):
            message = decode_message(delivery.body)
            inner = message.messages if isinstance(message, Envelope) else ()
            items: list[Message] = [i.message for i in inner] or [message]
            for item in items:
                assert isinstance(item, Outcome)
                found.append((item, delivery.headers))
        return found

    def dead_letters(self) -> list[str]:
        return [
            m.headers[topology.ERROR_HEADER]
            for m in self.broker.queues.get(topology.DEAD_LETTER_QUEUE, [])
        ]

    def counted(self, queue: str, reason: str) -> float:
        labels = {"queue": queue, "reason": reason}
        value = self.registry.get_sample_value("twophase_dead_letters_total", labels)
        return value or 0.0

    def balance(self, name: str) -> tuple[int, int]:
        return bank.totals(str(self.tmp / f"{name}.db"), name)


def transfer(tx_id: str, amount: int = 1) -> Begin:
    return Begin(
        tx_id=tx_id,
        branches=(
            Branch("bank-a", "debit", {"account": "bank-a-0", "amount": amount}),
            Branch("bank-b", "credit", {"account": "bank-b-0", "amount": amount}),
        ),
        timeout_ms=30_000,
        reply_to=REPLY,
    )


@pytest.fixture
def system(tmp_path: Path) -> System:
    return System(tmp_path)


def test_signed_traffic_commits_and_every_message_is_signed_by_its_sender(system: System) -> None:
    system.send(topology.COORDINATOR_QUEUE, transfer("t1"))
    system.settle()
    [(outcome, headers)] = system.replies()
    assert outcome.outcome is OutcomeKind.COMMITTED
    assert headers[SENDER_HEADER] == "coordinator"
    assert system.dead_letters() == []
    assert system.balance("bank-a") == (99, 0) and system.balance("bank-b") == (101, 0)


def test_forgeries_are_dead_lettered_with_their_reason_counted_and_the_driver_goes_on(
    system: System,
) -> None:
    commit = Commit(tx_id="x1", participant="bank-a")
    prepare = Prepare(
        tx_id="x2",
        participant="bank-a",
        operation="debit",
        args={"account": "bank-a-0", "amount": 1},
        deadline_ms=2**50,
        participants=("bank-a",),
        one_phase=True,
    )
    system.send(QUEUE_A, commit, BANK_B)  # a participant may not decide
    system.send(QUEUE_A, prepare, None)  # unsigned
    system.send(QUEUE_A, prepare, COORDINATOR, tamper=True)  # the body changed after signing
    vote = Vote(tx_id="x3", participant="bank-a", vote=VoteKind.YES)
    system.send(topology.COORDINATOR_QUEUE, vote, BANK_B)  # a vote for another participant
    stranger = SigningKey(COORDINATOR, "0123456789abcdef", auth.generate(COORDINATOR).secret)
    body = encode(commit)
    system.client.publish(QUEUE_A, body, headers=stranger.sign(body, QUEUE_A, "commit"))
    system.send(topology.COORDINATOR_QUEUE, transfer("after"))  # served all the same
    system.settle()
    assert [o.tx_id for o, _ in system.replies()] == ["after"]
    assert system.balance("bank-a") == (99, 0)
    reasons = sorted(r.split(":")[0] for r in system.dead_letters())
    assert reasons == sorted(
        [NOT_PERMITTED, BAD_SIGNATURE, BAD_SIGNATURE, NOT_PERMITTED, UNKNOWN_KEY]
    )
    assert system.counted(topology.COORDINATOR_QUEUE, NOT_PERMITTED) == 1


def test_heartbeats_are_signed_and_a_forged_one_is_refused(system: System) -> None:
    channel = MemoryChannel(system.broker)
    beats = HeartbeatSender(
        "bank-a", 1.0, lambda: channel, lambda: 0.0, auth=system.keys.of(BANK_A)
    )
    beats._beat(channel, 1000)
    forged = HeartbeatSender("bank-a", 1.0, lambda: channel, lambda: 0.0)  # unsigned
    forged._beat(channel, 1000)
    system.coordinator.turn()
    assert [r.split(":")[0] for r in system.dead_letters()] == [BAD_SIGNATURE]
    assert "bank-a" in system.coordinator.core.liveness


# ---- configuration ----------------------------------------------------------------------------


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    argv = ["keys", "init", str(directory), "--coordinator", "--participant", "bank-a"]
    assert cli.main([*argv, "--client", "web"]) == 0
    return directory


@pytest.fixture
def no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """No key in the environment, and not the test suite's TWOPHASE_INSECURE (tests/conftest.py)."""
    monkeypatch.delenv(auth.KEY_FILE_VARIABLE, raising=False)
    monkeypatch.delenv(auth.KEYRING_VARIABLE, raising=False)
    monkeypatch.delenv(config.INSECURE_VARIABLE, raising=False)
    monkeypatch.setattr(config, "_warned_auth_off", False)


@pytest.mark.usefixtures("no_key")
def test_a_service_without_a_key_starts_only_when_told_insecure(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError, match=r"^no key: set TWOPHASE_KEY_FILE.*--insecure"):
        config.auth(None, None, COORDINATOR)
    with pytest.raises(ConfigurationError, match="no key"):
        config.auth(None, None, BANK_A, warn=False)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="twophase.config"):
        assert config.auth(None, None, COORDINATOR, insecure=True) is None
        monkeypatch.setenv(config.INSECURE_VARIABLE, "on")
        assert config.auth(None, None, BANK_A) is None
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "authentication off (--insecure)"
    ]
    monkeypatch.setenv(config.INSECURE_VARIABLE, "maybe")
    with pytest.raises(ConfigurationError, match="TWOPHASE_INSECURE must be on or off"):
        config.auth(None, None, COORDINATOR)


@pytest.mark.usefixtures("no_key")
def test_a_client_without_a_key_is_not_refused(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="twophase.config"):
        assert config.auth(None, None, None, required=False) is None
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["authentication off"]


@pytest.mark.usefixtures("no_key")
def test_the_library_services_refuse_to_start_without_a_key(tmp_path: Path) -> None:
    broker = MemoryBroker()
    keyless = CoordinatorConfig(
        "amqp://memory/", str(tmp_path / "c.log.db"), channel_factory=broker.channel
    )
    with pytest.raises(ConfigurationError, match=r"the coordinator has no key.*insecure=True"):
        CoordinatorService.connect(keyless)
    db = str(tmp_path / "bank-a.db")
    app = bank.create_bank("bank-a", db, amqp_url="amqp://memory/", log_url=db)
    with pytest.raises(ConfigurationError, match="no key"):
        app.configure_auth()
    app.configure_auth(insecure=True)
    assert app.auth is None and app.insecure
    service = CoordinatorService.connect(dataclasses.replace(keyless, insecure=True))
    service.channel.close()
    service.decision_log.close()


def test_flags_win_over_the_environment_and_the_identity_is_checked(
    key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyring = str(key_dir / "keyring")
    monkeypatch.setenv(auth.KEY_FILE_VARIABLE, str(key_dir / "nothing-here.key"))
    monkeypatch.setenv(auth.KEYRING_VARIABLE, keyring)
    found = config.auth(str(key_dir / "participant-bank-a.key"), None, BANK_A)
    assert found is not None and found.identity == BANK_A
    with pytest.raises(ConfigurationError, match=r"nothing-here\.key"):
        config.auth(None, None, COORDINATOR)
    with pytest.raises(ConfigurationError, match="not of coordinator"):
        config.auth(str(key_dir / "participant-bank-a.key"), keyring, COORDINATOR)


def test_a_client_needs_a_client_key_and_replies_in_a_queue_its_key_owns(key_dir: Path) -> None:
    keyring = str(key_dir / "keyring")
    with pytest.raises(ConfigurationError, match="client:NAME"):  # before any connection
        Client(key_file=str(key_dir / "participant-bank-a.key"), keyring=keyring)


def test_the_services_take_key_flags(key_dir: Path) -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["coordinator", "--key-file", "k", "--keyring", "r", "--insecure"])
    assert (args.key_file, args.keyring, args.insecure) == ("k", "r", True)
    args = parser.parse_args(["participant", "--app", "m:o", "--insecure"])
    assert (args.key_file, args.keyring, args.insecure) == (None, None, True)
