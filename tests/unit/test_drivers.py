"""The real drivers on the in-memory broker, stepped turn by turn (no RabbitMQ needed)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa

from coordinator.log import DecisionLog
from coordinator.service import CoordinatorConfig, CoordinatorService
from participant.log import PrepareLog
from participant.units import SharedLog
from participant.worker import ParticipantWorker
from runtime import crashpoints
from runtime import driver as driver_module
from runtime.errors import ConnectionLost, UnknownOperation
from runtime.memory import MemoryBroker, MemoryChannel
from schemas import topology
from schemas.codec import decode_message, encode
from schemas.messages import (
    Ack,
    Begin,
    Branch,
    Commit,
    Envelope,
    Enveloped,
    Outcome,
    OutcomeKind,
    Protocol,
    Vote,
    VoteKind,
)
from schemas.records import (
    BranchPrepared,
    CoordinatorRecord,
    ParticipantRecord,
    TxCommitting,
)
from twophase import bank

REPLY = topology.client_queue("test")
BANKS = ("bank-a", "bank-b", "bank-c")


class System:
    """Coordinator and three banks; ``shared``: each bank's prepare log lives in its database."""

    def __init__(self, tmp: Path, broker: MemoryBroker, *, shared: bool = False) -> None:
        self.tmp, self.broker, self.shared = tmp, broker, shared
        self.coordinator = CoordinatorService.connect(
            CoordinatorConfig(
                "amqp://memory/",
                str(tmp / "coordinator.log.db"),
                channel_factory=broker.channel,
                metrics_port=0,
            )
        )
        self.workers: dict[str, ParticipantWorker] = {}
        for name in BANKS:
            db = str(tmp / f"{name}.db")
            bank.open_accounts(db, name, [(f"{name}-0", 100)])
            app = bank.create_bank(
                name, db, amqp_url="amqp://memory/", log_url=log_path(tmp, name, shared)
            )
            app.channel_factory = broker.channel
            self.workers[name] = ParticipantWorker.connect(app)
        self.client = MemoryChannel(broker)
        self.client.declare_queue(REPLY)
        self.client.consume(REPLY)
        for driver in self.drivers():
            driver.channel.consume(driver.queue)

    def drivers(self) -> list[Any]:
        return [self.coordinator, *self.workers.values()]

    def settle(self, turns: int = 30) -> None:
        for _ in range(turns):
            for driver in self.drivers():
                driver.turn()

    def outcomes(self) -> list[Outcome]:
        found: list[Outcome] = []
        deliveries = self.client.poll(0)
        for message in unwrap([decode_message(d.body) for d in deliveries]):
            assert isinstance(message, Outcome)
            found.append(message)
        self.client.ack(deliveries)
        return found

    def balance(self, name: str) -> tuple[int, int]:
        return bank.totals(str(self.tmp / f"{name}.db"), name)


def log_path(tmp: Path, name: str, shared: bool) -> str:
    return str(tmp / (f"{name}.db" if shared else f"{name}.log.db"))


def unwrap(messages: list[Any]) -> list[Protocol]:
    out: list[Protocol] = []
    for m in messages:
        out += [i.message for i in m.messages] if isinstance(m, Envelope) else [m]
    return out


def transfer(tx_id: str, amount: int = 10) -> Begin:
    return Begin(
        tx_id=tx_id,
        branches=(
            Branch("bank-a", "debit", {"account": "bank-a-0", "amount": amount + 1}),
            Branch("bank-b", "credit", {"account": "bank-b-0", "amount": amount}),
            Branch("bank-c", "credit", {"account": "bank-c-0", "amount": 1}),
        ),
        timeout_ms=30_000,
        reply_to=REPLY,
    )


def credit(tx_id: str, bank_name: str = "bank-b", amount: int = 1) -> Begin:
    """A single-branch transaction: committed in one phase."""
    branch = Branch(bank_name, "credit", {"account": f"{bank_name}-0", "amount": amount})
    return Begin(tx_id=tx_id, branches=(branch,), timeout_ms=30_000, reply_to=REPLY)


@pytest.fixture(params=[False, True], ids=["own-log-db", "log-in-resource-db"])
def system(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[System]:
    yield System(tmp_path, MemoryBroker(), shared=request.param)


def test_a_transfer_commits_through_the_real_drivers(system: System) -> None:
    assert isinstance(system.workers["bank-a"].unit, SharedLog) is system.shared
    system.client.publish(topology.COORDINATOR_QUEUE, encode(transfer("t1")))
    system.settle()
    assert [o.outcome for o in system.outcomes()] == [OutcomeKind.COMMITTED]
    assert system.balance("bank-a") == (89, 0)
    assert system.balance("bank-b") == (110, 0)
    assert system.balance("bank-c") == (101, 0)


def test_a_batch_is_one_log_transaction_and_one_envelope_per_destination(system: System) -> None:
    begins = tuple(Enveloped(message=transfer(f"t{i}", 1)) for i in range(5))
    system.client.publish(topology.COORDINATOR_QUEUE, encode(Envelope(messages=begins)))
    before = system.coordinator.journal.flushes
    system.coordinator.turn()  # one batch: five Begins
    assert system.coordinator.journal.flushes == before + 1  # group commit
    for name in BANKS:  # five Prepares to each bank, in one AMQP message each
        bodies = system.broker.bodies(topology.participant_queue(name))
        assert len(bodies) == 1
        prepared = decode_message(bodies[0])
        assert isinstance(prepared, Envelope) and len(prepared.messages) == 5
    system.settle()
    assert [o.outcome for o in system.outcomes()] == [OutcomeKind.COMMITTED] * 5


class AuditingChannel(MemoryChannel):
    """Checks the write-ahead rules at the moment a message is published."""

    def __init__(self, broker: MemoryBroker, tmp: Path, shared: bool) -> None:
        super().__init__(broker)
        self.tmp, self.shared = tmp, shared
        self.checked = 0

    def publish(self, routing_key: str, body: bytes, **kwargs: Any) -> None:
        for message in unwrap([decode_message(body)]):
            if isinstance(message, Commit):  # rule 2
                decided = self.decisions(message.tx_id)
                assert any(isinstance(r, TxCommitting) for r in decided), message
                self.checked += 1
            if isinstance(message, Vote) and message.vote is VoteKind.YES:  # rule 1
                prepared = self.branch_records(message.participant, message.tx_id)
                assert any(isinstance(r, BranchPrepared) for r in prepared), message
                self.checked += 1
            committed_vote = isinstance(message, Vote) and message.vote is VoteKind.COMMITTED
            if isinstance(message, Ack) or committed_vote:  # rule 6, and one phase's commit
                assert isinstance(message, Ack | Vote)
                db = sqlite3.connect(self.tmp / f"{message.participant}.db")
                state = db.execute(
                    "SELECT state FROM twophase_reservation WHERE participant = ? AND tx_id = ?",
                    (message.participant, message.tx_id),
                ).fetchone()
                db.close()
                assert state == ("committed",), message
                self.checked += 1
            if isinstance(message, Outcome) and message.outcome is OutcomeKind.COMMITTED:
                decided = self.decisions(message.tx_id)  # rule 7
                assert any(isinstance(r, TxCommitting) for r in decided), message
                self.checked += 1
        super().publish(routing_key, body, **kwargs)

    def decisions(self, tx_id: str) -> list[CoordinatorRecord]:
        log = DecisionLog(str(self.tmp / "coordinator.log.db"))
        try:
            return log.history([tx_id]).get(tx_id, [])
        finally:
            log.close()

    def branch_records(self, participant: str, tx_id: str) -> list[ParticipantRecord]:
        log = PrepareLog(log_path(self.tmp, participant, self.shared), participant)
        try:
            return log.history([tx_id]).get(tx_id, [])
        finally:
            log.close()


@pytest.mark.parametrize("shared", [False, True], ids=["own-log-db", "log-in-resource-db"])
def test_commits_votes_and_acks_leave_only_after_what_they_promise_is_durable(
    tmp_path: Path, shared: bool
) -> None:
    broker = MemoryBroker()
    channels: list[AuditingChannel] = []

    def auditing(*_args: object, **_kwargs: object) -> AuditingChannel:
        channel = AuditingChannel(broker, tmp_path, shared)
        channels.append(channel)
        return channel

    broker.channel = auditing  # type: ignore[method-assign]
    system = System(tmp_path, broker, shared=shared)
    for i in range(3):
        system.client.publish(topology.COORDINATOR_QUEUE, encode(transfer(f"w{i}", 1)))
        system.client.publish(topology.COORDINATOR_QUEUE, encode(credit(f"o{i}", BANKS[i])))
    system.settle()
    assert {o.outcome for o in system.outcomes()} == {OutcomeKind.COMMITTED}
    # 3 transfers: 9 YES votes, 9 COMMITs, 9 ACKs, 3 answers; 3 one-phase credits: 3 COMMITTED
    # votes, 3 answers
    assert sum(c.checked for c in channels) == 3 * 10 + 3 * 2


def test_garbage_is_dead_lettered_and_the_driver_goes_on(system: System) -> None:
    system.client.publish(topology.COORDINATOR_QUEUE, b"{not json")
    system.client.publish(topology.COORDINATOR_QUEUE, encode(transfer("after-garbage")))
    system.settle()
    assert [o.tx_id for o in system.outcomes()] == ["after-garbage"]
    assert system.broker.bodies(topology.DEAD_LETTER_QUEUE) == [b"{not json"]


def test_a_connection_lost_while_publishing_loses_and_doubles_nothing(system: System) -> None:
    coordinator = system.coordinator
    channel = coordinator.channel
    assert isinstance(channel, MemoryChannel)
    real_publish = channel.publish
    calls = {"n": 0}

    def flaky_publish(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:  # the batch's records are durable; its messages are not out yet
            channel.drop_connection()
            raise ConnectionLost("kicked by the test")
        real_publish(*args, **kwargs)

    channel.publish = flaky_publish
    system.client.publish(topology.COORDINATOR_QUEUE, encode(transfer("kicked")))
    with pytest.raises(ConnectionLost):
        coordinator.turn()
    channel.reconnect()
    coordinator.driver.republish()
    system.settle()
    outcomes = system.outcomes()
    assert [o.outcome for o in outcomes] == [OutcomeKind.COMMITTED]
    assert system.balance("bank-a") == (89, 0)  # debited once
    assert system.balance("bank-b") == (110, 0)


def test_a_reconnect_that_found_its_lock_taken_rebuilds_from_the_log(system: System) -> None:
    """Another instance may have served while this one was cut off (runtime/instances.py): the
    driver does not trust its memory, it rebuilds it from the log, as after a restart."""
    coordinator = system.coordinator
    channel = coordinator.channel
    assert isinstance(channel, MemoryChannel)
    contested = iter([True])
    channel.take_lock_contested = lambda: next(contested, False)
    system.client.publish(topology.COORDINATOR_QUEUE, encode(transfer("cut-off")))
    channel.drop_connection()
    restarts = coordinator.driver.stats.restarts
    coordinator.step()
    assert coordinator.driver.stats.restarts == restarts + 1  # rebuilt, not only republished
    system.settle()
    assert [o.outcome for o in system.outcomes()] == [OutcomeKind.COMMITTED]
    assert system.balance("bank-b") == (110, 0)


def _count_commits(engine: sa.Engine) -> list[int]:
    commits: list[int] = []
    sa.event.listen(engine, "commit", lambda _conn: commits.append(1))
    return commits


def _prepares_queued_for(system: System, name: str, count: int) -> None:
    begins = tuple(Enveloped(message=transfer(f"u{i}", 1)) for i in range(count))
    system.client.publish(topology.COORDINATOR_QUEUE, encode(Envelope(messages=begins)))
    system.coordinator.turn()
    assert len(system.broker.bodies(topology.participant_queue(name))) == 1


def test_with_the_log_in_the_resource_database_a_batch_is_one_commit(tmp_path: Path) -> None:
    system = System(tmp_path, MemoryBroker(), shared=True)
    worker = system.workers["bank-b"]
    worker.turn()  # idle: runs the start-up chores (log GC commits on the log's own engine)
    resource_commits = _count_commits(worker.resource._engine)  # type: ignore[attr-defined]
    log_commits = _count_commits(worker.prepare_log.log.engine)
    _prepares_queued_for(system, "bank-b", 5)
    flushes = worker.journal.flushes
    worker.turn()  # five branches prepared, five PREPARED records, five YES votes
    assert (len(resource_commits), len(log_commits)) == (1, 0)
    assert worker.journal.flushes == flushes + 1
    for other in ("bank-a", "bank-c"):
        system.workers[other].turn()
    system.coordinator.turn()  # decides; five COMMITs to bank-b in one envelope
    worker.turn()  # five reservations committed, five COMPLETED records, five ACKs
    assert (len(resource_commits), len(log_commits)) == (2, 0)
    system.settle()
    assert [o.outcome for o in system.outcomes()] == [OutcomeKind.COMMITTED] * 5
    assert system.balance("bank-b") == (105, 0)


def test_a_batch_that_fails_before_its_commit_leaves_nothing_and_is_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = System(tmp_path, MemoryBroker(), shared=True)
    worker = system.workers["bank-a"]
    _prepares_queued_for(system, "bank-a", 3)

    def failing(_unit: object, _records: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(worker.prepare_log, "append_in", failing)
    with pytest.raises(OSError, match="disk gone"):
        worker.turn()
    assert worker.resource.prepared() == set()  # the reservations were rolled back too
    assert worker.prepare_log.unfinished_branches() == []
    assert system.broker.bodies(topology.COORDINATOR_QUEUE) == []  # no vote left
    # the process dies; a new one recovers and gets the unacknowledged PREPAREs again
    worker.channel.close()
    app = worker.app
    app.channel_factory = system.broker.channel
    system.workers["bank-a"] = restarted = ParticipantWorker.connect(app)
    restarted.channel.consume(restarted.queue)
    system.settle()
    assert [o.outcome for o in system.outcomes()] == [OutcomeKind.COMMITTED] * 3
    assert system.balance("bank-a") == (94, 0)


def test_a_credit_to_a_missing_account_aborts_alone_in_its_batch(system: System) -> None:
    """The bank checks a batch's credits with one query; a missing account refuses only its
    own transaction, which is aborted naming it."""
    begins = [transfer(f"m{i}", 1) for i in range(3)]
    bad = begins[1].branches[2]
    begins[1] = msgspec.structs.replace(
        begins[1],
        branches=(
            *begins[1].branches[:2],
            Branch(bad.participant, bad.operation, {"account": "bank-c-404", "amount": 1}),
        ),
    )
    envelope = Envelope(messages=tuple(Enveloped(message=b) for b in begins))
    system.client.publish(topology.COORDINATOR_QUEUE, encode(envelope))
    system.settle()
    outcomes = {o.tx_id: o for o in system.outcomes()}
    assert outcomes["m0"].outcome is outcomes["m2"].outcome is OutcomeKind.COMMITTED
    assert outcomes["m1"].outcome is OutcomeKind.ABORTED
    assert outcomes["m1"].at_fault == "bank-c" and "bank-c-404" in outcomes["m1"].reason
    assert system.balance("bank-c") == (102, 0)


def test_an_operation_no_longer_registered_is_a_typed_error(system: System) -> None:
    worker = system.workers["bank-a"]
    assert worker.side.spec("debit").name == "debit"
    with pytest.raises(UnknownOperation, match="bank-a: operation 'withdraw' is no longer"):
        worker.side.spec("withdraw")


def test_the_drivers_pass_only_crash_points_that_can_be_armed(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached: set[str] = set()
    monkeypatch.setattr(driver_module, "crashpoint", reached.add)
    system.client.publish(topology.COORDINATOR_QUEUE, encode(transfer("t1")))
    system.settle()
    assert [o.outcome for o in system.outcomes()] == [OutcomeKind.COMMITTED]
    assert reached <= set(crashpoints.NAMES)
    assert {"coordinator.after_persist", "participant.after_publish"} <= reached
