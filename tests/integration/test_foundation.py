"""Two-phase commit end to end on the real RabbitMQ and PostgreSQL (issue: foundation)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from coordinator.client import Client
from participant.units import SharedLog
from participant.worker import Participant, ParticipantWorker
from runtime.amqp import AmqpChannel
from runtime.driver import now_ms
from schemas import topology
from schemas.messages import Abort, Ack, Branch, Commit, OutcomeKind, Prepare, Vote, VoteKind
from twophase import bank
from twophase.testing import ProtocolPeer, running_coordinator

pytestmark = pytest.mark.integration


def balances(db: str, name: str) -> dict[str, tuple[int, int]]:
    import sqlalchemy as sa

    from runtime.store import database_url

    engine = sa.create_engine(database_url(db))
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT id, balance, held FROM {bank.table_name(name)}"))
        found = {r[0]: (int(r[1]), int(r[2])) for r in rows}
    engine.dispose()
    return found


def prepared_xacts(pg_url: str) -> list[str]:
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
        ).fetchall()
    return [r[0] for r in rows]


def wait_for(
    predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Bank:
    def __init__(self, name: str, db: str, participant: Participant) -> None:
        self.name, self.db, self.participant = name, db, participant

    def balances(self) -> dict[str, tuple[int, int]]:
        return balances(self.db, self.name)


@pytest.fixture
def banks(amqp_url: str, pg_url: str, tmp_path: Path) -> Iterator[dict[str, Bank]]:
    """bank-a and bank-b on native PostgreSQL branches, bank-c on a SQLite reservation."""
    layout = {
        "bank-a": (pg_url, "postgres"),
        "bank-b": (pg_url, "postgres"),
        "bank-c": (str(tmp_path / "bank-c.db"), "reservation"),
    }
    started: dict[str, Bank] = {}
    try:
        for name, (db, kind) in layout.items():
            bank.open_accounts(db, name, [(f"{name}-{i}", 100) for i in range(3)])
            app = bank.create_bank(
                name,
                db,
                resource=kind,
                amqp_url=amqp_url,
                log_url=str(tmp_path / f"{name}.log.db"),
                heartbeat_interval_s=0.2,
            )
            app.start()
            started[name] = Bank(name, db, app)
        yield started
    finally:
        for b in started.values():
            b.participant.stop()


@pytest.fixture
def coordinator(amqp_url: str, tmp_path: Path) -> Iterator[object]:
    with running_coordinator(amqp_url, str(tmp_path / "coordinator.log.db")) as service:
        yield service


def transfer(
    amount: int, payer: str = "bank-a", payee: str = "bank-b", fee: str = "bank-c"
) -> list[Branch]:
    return [
        Branch(payer, "debit", {"account": f"{payer}-0", "amount": amount + 1}),
        Branch(payee, "credit", {"account": f"{payee}-0", "amount": amount}),
        Branch(fee, "credit", {"account": f"{fee}-0", "amount": 1}),
    ]


def test_commit_across_three_participants_is_visible_in_their_databases(
    banks: dict[str, Bank], coordinator: object, amqp_url: str, pg_url: str
) -> None:
    with Client(amqp_url) as client:
        outcome = client.submit(transfer(10), timeout=10)
    assert outcome.outcome is OutcomeKind.COMMITTED, outcome
    wait_for(lambda: banks["bank-a"].balances()["bank-a-0"] == (89, 0), what="bank-a debit")
    wait_for(lambda: banks["bank-b"].balances()["bank-b-0"] == (110, 0), what="bank-b credit")
    wait_for(lambda: banks["bank-c"].balances()["bank-c-0"] == (101, 0), what="bank-c fee")
    assert prepared_xacts(pg_url) == []


def test_a_no_vote_rolls_every_branch_back(
    banks: dict[str, Bank], coordinator: object, amqp_url: str, pg_url: str
) -> None:
    with Client(amqp_url) as client:
        outcome = client.submit(transfer(500), timeout=10)  # bank-a-0 holds only 100
    assert outcome.outcome is OutcomeKind.ABORTED
    assert outcome.at_fault == "bank-a"
    assert "insufficient funds" in outcome.reason
    wait_for(lambda: prepared_xacts(pg_url) == [], what="no prepared branch left")
    for b in banks.values():

        def untouched(b: Bank = b) -> bool:
            return all(v == (100, 0) for v in b.balances().values())

        wait_for(untouched, what=b.name)


def test_unknown_participant_and_unknown_operation_abort_naming_them(
    banks: dict[str, Bank], coordinator: object, amqp_url: str
) -> None:
    with Client(amqp_url) as client:
        nobody = client.submit([*transfer(1)[:2], Branch("nobody", "credit", {})], timeout=5)
        bogus = client.submit([*transfer(1)[:2], Branch("bank-c", "teleport", {})], timeout=5)
    assert nobody.outcome is OutcomeKind.ABORTED and nobody.at_fault == "nobody"
    assert "nobody" in nobody.reason
    assert bogus.outcome is OutcomeKind.ABORTED and bogus.at_fault == "bank-c"
    assert "unknown operation 'teleport'" in bogus.reason


def test_a_retry_with_the_same_tx_id_returns_the_first_outcome(
    banks: dict[str, Bank], amqp_url: str, tmp_path: Path
) -> None:
    log_url = str(tmp_path / "coordinator.log.db")
    with running_coordinator(amqp_url, log_url), Client(amqp_url) as client:
        first = client.submit(transfer(10), tx_id="retry-1", timeout=10)
        again = client.submit(transfer(10), tx_id="retry-1", timeout=10)
        refused = client.submit(transfer(900), tx_id="retry-2", timeout=10)
    assert first.outcome is OutcomeKind.COMMITTED
    assert again == first
    # After a coordinator restart, from a new client, the log still answers.
    with running_coordinator(amqp_url, log_url), Client(amqp_url) as client:
        assert client.submit(transfer(10), tx_id="retry-1", timeout=10) == first
        assert client.submit(transfer(1), tx_id="retry-2", timeout=10) == refused
    wait_for(lambda: banks["bank-b"].balances()["bank-b-0"] == (110, 0), what="one credit")
    assert banks["bank-a"].balances()["bank-a-0"] == (89, 0)  # debited exactly once


@pytest.fixture
def lone_bank(amqp_url: str, tmp_path: Path) -> Iterator[Bank]:
    """One reservation bank and no coordinator: the test plays the coordinator."""
    db = str(tmp_path / "lone.db")
    bank.open_accounts(db, "lone", [("lone-0", 100)])
    app = bank.create_bank("lone", db, amqp_url=amqp_url, log_url=str(tmp_path / "lone.log.db"))
    app.start()
    yield Bank("lone", db, app)
    app.stop()


def prepare(tx_id: str, amount: int = 10) -> Prepare:
    return Prepare(
        tx_id=tx_id,
        participant="lone",
        operation="debit",
        args={"account": "lone-0", "amount": amount},
        deadline_ms=now_ms() + 30_000,
        participants=("lone",),
    )


def test_duplicated_prepare_commit_and_abort_change_nothing(lone_bank: Bank, amqp_url: str) -> None:
    peer = ProtocolPeer(amqp_url, topology.COORDINATOR_QUEUE)
    queue = topology.participant_queue("lone")
    try:
        peer.send(queue, prepare("dup-1"))
        assert peer.expect(Vote, tx_id="dup-1").vote is VoteKind.YES
        # A duplicate handled in the same batch as its original is simply absorbed; one that
        # comes later repeats the vote without running the handler again.
        peer.send(queue, prepare("dup-1"))
        assert peer.expect(Vote, tx_id="dup-1").vote is VoteKind.YES
        assert lone_bank.balances()["lone-0"] == (100, 10)
        peer.send(queue, Commit(tx_id="dup-1", participant="lone"))
        peer.send(queue, Commit(tx_id="dup-1", participant="lone"))
        peer.expect(Ack, tx_id="dup-1")
        peer.expect(Ack, tx_id="dup-1")
        assert lone_bank.balances()["lone-0"] == (90, 0)

        peer.send(queue, prepare("dup-2"))
        assert peer.expect(Vote, tx_id="dup-2").vote is VoteKind.YES
        peer.send(queue, Abort(tx_id="dup-2", participant="lone"))
        peer.send(queue, Abort(tx_id="dup-2", participant="lone"))
        peer.send(queue, prepare("dup-2"))  # a late duplicate PREPARE after the abort
        late = peer.expect(Vote, tx_id="dup-2")
        assert late.vote is VoteKind.NO
        assert lone_bank.balances()["lone-0"] == (90, 0)
        assert peer.quiet(0.5) == []
    finally:
        peer.close()


def test_an_abort_that_overtakes_its_prepare_makes_it_vote_no(
    lone_bank: Bank, amqp_url: str
) -> None:
    peer = ProtocolPeer(amqp_url, topology.COORDINATOR_QUEUE)
    queue = topology.participant_queue("lone")
    try:
        peer.send(queue, Abort(tx_id="early-1", participant="lone", reason="vote timeout"))
        peer.send(queue, prepare("early-1"))
        vote = peer.expect(Vote, tx_id="early-1")
        assert vote.vote is VoteKind.NO
        assert "aborted" in vote.reason
        assert lone_bank.balances()["lone-0"] == (100, 0)  # the handler never ran
    finally:
        peer.close()


def test_garbage_goes_to_the_dead_letter_queue_and_the_next_transaction_commits(
    banks: dict[str, Bank], coordinator: object, amqp_url: str
) -> None:
    channel = AmqpChannel(amqp_url, connection_name="twophase-test-garbage")
    try:
        channel.publish(topology.COORDINATOR_QUEUE, b"\x00not a message")
        channel.publish(topology.participant_queue("bank-c"), b'{"type": "prepare", "tx_id": 7}')
        channel.wait_for_confirms()
        with Client(amqp_url) as client:
            assert client.submit(transfer(5), timeout=10).outcome is OutcomeKind.COMMITTED
        channel.consume(topology.DEAD_LETTER_QUEUE)
        dead: list[tuple[bytes, str]] = []

        def two_dead_letters() -> bool:
            dead.extend(
                (d.body, d.headers.get(topology.ERROR_HEADER, "")) for d in channel.poll(0.2)
            )
            return len(dead) >= 2

        wait_for(two_dead_letters, what="two dead letters")
    finally:
        channel.close()
    bodies = {body: reason for body, reason in dead}
    assert bodies[b"\x00not a message"].startswith("undecodable: ")
    assert "tx_id" in bodies[b'{"type": "prepare", "tx_id": 7}']


def test_an_envelope_is_handled_message_by_message(lone_bank: Bank, amqp_url: str) -> None:
    from schemas.messages import Envelope, Enveloped

    peer = ProtocolPeer(amqp_url, topology.COORDINATOR_QUEUE)
    queue = topology.participant_queue("lone")
    try:
        both = Envelope(
            messages=(
                Enveloped(message=prepare("env-1", 30)),
                Enveloped(message=prepare("env-2", 80)),
            )
        )
        peer.send(queue, both)
        assert peer.expect(Vote, tx_id="env-1").vote is VoteKind.YES
        refused = peer.expect(Vote, tx_id="env-2")  # sees env-1's hold: 100 - 30 < 80
        assert refused.vote is VoteKind.NO and "insufficient funds" in refused.reason
    finally:
        peer.close()


def test_reservation_banks_with_their_logs_in_their_postgresql_database(
    amqp_url: str, pg_url: str, tmp_path: Path
) -> None:
    """One local transaction per batch (branches and records together) on a real server."""
    names = ("bank-s1", "bank-s2")
    apps = []
    try:
        for name in names:
            bank.open_accounts(pg_url, name, [(f"{name}-0", 100)])
            app = bank.create_bank(name, pg_url, amqp_url=amqp_url, log_url=pg_url)
            app.start()
            apps.append(app)
            assert app.worker is not None and isinstance(app.worker.unit, SharedLog)

        def pay(amount: int) -> OutcomeKind:
            branches = [
                Branch("bank-s1", "debit", {"account": "bank-s1-0", "amount": amount}),
                Branch("bank-s2", "credit", {"account": "bank-s2-0", "amount": amount}),
            ]
            return client.submit(branches, timeout=10).outcome

        coordinator_log = str(tmp_path / "coordinator.log.db")
        with running_coordinator(amqp_url, coordinator_log), Client(amqp_url) as client:
            assert [pay(30), pay(500), pay(20)] == [
                OutcomeKind.COMMITTED,
                OutcomeKind.ABORTED,  # insufficient funds: bank-s1 refuses, nothing is held
                OutcomeKind.COMMITTED,
            ]
            wait_for(lambda: balances(pg_url, "bank-s1")["bank-s1-0"] == (50, 0), what="debits")
            wait_for(lambda: balances(pg_url, "bank-s2")["bank-s2-0"] == (150, 0), what="credits")
            for app in apps:
                worker = app.worker
                assert worker is not None

                def finished(w: ParticipantWorker = worker) -> bool:
                    return not w.core.in_doubt()

                wait_for(finished, what="branches finished")
                assert worker.prepare_log.unfinished_branches() == []
    finally:
        for app in apps:
            app.stop()


def test_a_burst_of_submits_wakes_the_client_once(amqp_url: str) -> None:
    """Submits that find Begins already waiting ride along with them: one wake-up of the I/O
    thread and one envelope for the burst, not one of each per submit."""
    with Client(amqp_url) as client:
        wakes: list[None] = []
        wake = client._wake

        def counted_wake() -> None:
            wakes.append(None)
            wake()

        client._wake = counted_wake  # type: ignore[method-assign]
        held, holding = threading.Event(), threading.Event()

        def hold() -> None:  # runs on the I/O thread: it cannot take the queue meanwhile
            holding.set()
            held.wait(10)

        assert client._channel is not None
        client._channel.call_threadsafe(hold)
        assert holding.wait(10)
        futures = [client.submit_future([("bank-a", "debit", {"n": i})]) for i in range(50)]
        held.set()
        deadline = time.monotonic() + 10
        while client.protocol_messages_sent < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.protocol_messages_sent == 50
        assert client.messages_sent == 1  # one envelope
        assert len(wakes) == 1
        assert not any(f.done() for f in futures)  # no coordinator: still pending
