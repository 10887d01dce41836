"""Issue 14's must-show: the hostile broker user, holding bank-b's key and a client's key, forges
while real transfers run, and nothing forged is obeyed (docs/architecture.md §11).

A coordinator, bank-a and bank-b run as real processes with their keys, in a virtual host of
this test's own (the ``amqp_url`` fixture). A keyed ``Client`` moves money between the banks;
meanwhile the test publishes COMMIT, ABORT and PREPARE to bank-a, votes and a heartbeat for
bank-a, and Outcomes to another client's reply queue, signed with the wrong key, with an unknown
key, unsigned or tampered. Then: the banks hold what the real outcomes say (money is conserved),
and every forged message is in the dead-letter queue with the reason it was refused for.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pika
import pytest

from coordinator.client import Client
from runtime import auth
from runtime.amqp import AmqpChannel
from runtime.auth import SigningKey
from schemas import permissions, topology
from schemas.codec import encode
from schemas.messages import (
    Abort,
    Branch,
    Commit,
    Heartbeat,
    Message,
    Outcome,
    OutcomeKind,
    Prepare,
    Vote,
    VoteKind,
)
from schemas.permissions import BAD_SIGNATURE, NOT_PERMITTED, UNKNOWN_KEY
from twophase import bank, cli
from twophase.processes import ServiceGroup

BANK_A_QUEUE = topology.participant_queue("bank-a")
COORDINATOR_QUEUE = topology.COORDINATOR_QUEUE
ACCOUNTS, BALANCE = 4, 100
TRANSFERS = 40


class Hostile:
    """The broker user with bank-b's and web's keys: publishes forgeries and remembers each
    body with the reason it must be refused for."""

    def __init__(self, amqp_url: str, keys: Path) -> None:
        self.channel = AmqpChannel(amqp_url, connection_name="twophase-test-hostile")
        self.bank_b = auth.read_secret_key(keys / "participant-bank-b.key")
        self.web = auth.read_secret_key(keys / "client-web.key")
        # claims to be the coordinator, with a key no keyring holds
        self.stranger = auth.generate(permissions.COORDINATOR)
        self.expected: dict[bytes, str] = {}
        self.lock = threading.Lock()

    def forge(
        self,
        queue: str,
        message: Message,
        key: SigningKey | None,
        reason: str,
        *,
        tamper: Callable[[bytes, dict[str, str]], tuple[bytes, dict[str, str]]] | None = None,
    ) -> None:
        body = encode(message)
        headers = {} if key is None else key.sign(body, queue, permissions.kinds_text(message))
        if tamper is not None:
            body, headers = tamper(body, headers)
        with self.lock:
            assert body not in self.expected  # each forgery is found by its body
            self.expected[body] = reason
            self.channel.publish(queue, body, headers=headers)
            self.channel.wait_for_confirms()

    def against_bank_a(self, tx_id: str, n: int) -> None:
        """One of each forgery to bank-a and to the coordinator, about real transaction
        ``tx_id`` (``n`` makes the invented transactions' ids unique)."""

        def minting(tx: str, amount: int = 5000) -> Prepare:
            args = {"account": "bank-a-0", "amount": amount}
            # valid in every other way: refused for who signed it, not for what it says
            deadline = int(time.time() * 1000) + 60_000
            return Prepare(tx, "bank-a", "credit", args, deadline, ("bank-a",), one_phase=True)

        q = BANK_A_QUEUE
        self.forge(q, Commit(tx_id, "bank-a"), self.bank_b, NOT_PERMITTED)
        self.forge(q, Abort(tx_id, "bank-a"), self.web, NOT_PERMITTED)
        self.forge(q, minting(f"mint-b-{n}"), self.bank_b, NOT_PERMITTED)
        self.forge(q, minting(f"mint-unsigned-{n}"), None, BAD_SIGNATURE)
        self.forge(q, Abort(tx_id, "bank-a", reason=f"s{n}"), self.stranger, UNKNOWN_KEY)

        def more(body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
            return body.replace(b'"amount":1', b'"amount":5000'), headers

        self.forge(q, minting(f"mint-tampered-{n}", 1), self.bank_b, BAD_SIGNATURE, tamper=more)

        def as_coordinator(body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
            return body, {**headers, permissions.SENDER_HEADER: "coordinator"}

        prepare = minting(f"mint-claimed-{n}")
        self.forge(q, prepare, self.bank_b, UNKNOWN_KEY, tamper=as_coordinator)
        c = COORDINATOR_QUEUE
        self.forge(c, Vote(tx_id, "bank-a", VoteKind.YES, f"b{n}"), self.bank_b, NOT_PERMITTED)
        self.forge(c, Vote(tx_id, "bank-a", VoteKind.NO, f"w{n}"), self.web, NOT_PERMITTED)
        beat = Heartbeat("bank-a", int(time.time() * 1000) + n, 1000)
        self.forge(c, beat, self.bank_b, NOT_PERMITTED)

    def outcomes_to(self, queue: str, tx_id: str) -> None:
        """A COMMITTED Outcome of ``tx_id`` to another client's reply queue, three ways."""
        self.forge(queue, Outcome(tx_id, OutcomeKind.COMMITTED, "web"), self.web, NOT_PERMITTED)
        self.forge(queue, Outcome(tx_id, OutcomeKind.COMMITTED, "none"), None, BAD_SIGNATURE)
        stranger = Outcome(tx_id, OutcomeKind.COMMITTED, "stranger")
        self.forge(queue, stranger, self.stranger, UNKNOWN_KEY)

    def dead_letters(self) -> int:
        counts = self.channel.queue_counts(topology.DEAD_LETTER_QUEUE)
        return 0 if counts is None else counts[0]


def read_dead_letters(amqp_url: str) -> dict[bytes, str]:
    """Every dead-lettered body with its x-twophase-error header (the queue is emptied)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        found: dict[bytes, str] = {}
        while True:
            method, props, body = channel.basic_get(topology.DEAD_LETTER_QUEUE, auto_ack=True)
            if method is None:
                return found
            error = (props.headers or {}).get(topology.ERROR_HEADER, "")
            found[body] = error.decode() if isinstance(error, bytes) else str(error)
    finally:
        connection.close()


def wait_until(done: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def transfer(i: int) -> tuple[str, str, int]:
    """(from bank, to bank, amount): some overdraw their account and abort."""
    source = "bank-a" if i % 2 == 0 else "bank-b"
    return source, "bank-b" if source == "bank-a" else "bank-a", 15 + (i * 37) % 70


def branches(source: str, target: str, amount: int, account: int) -> list[Branch]:
    return [
        Branch(source, "debit", {"account": f"{source}-{account}", "amount": amount}),
        Branch(target, "credit", {"account": f"{target}-{account}", "amount": amount}),
    ]


def test_forgeries_are_refused_while_real_transfers_run(amqp_url: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    identities = ["--coordinator", "--participant", "bank-a", "--participant", "bank-b"]
    assert (
        cli.main(["keys", "init", str(keys), *identities, "--client", "web", "--client", "other"])
        == 0
    )
    keyring = str(keys / "keyring")
    dbs = {name: str(tmp_path / f"{name}.db") for name in ("bank-a", "bank-b")}
    for name, db in dbs.items():
        bank.open_accounts(db, name, [(f"{name}-{i}", BALANCE) for i in range(ACCOUNTS)])
    expected = {name: ACCOUNTS * BALANCE for name in dbs}

    def balances() -> dict[str, int]:
        return {name: bank.totals(db, name)[0] for name, db in dbs.items()}

    services = ServiceGroup(
        amqp_url,
        tmp_path,
        # a bank paused below must not be called down while the outcome forgeries arrive
        extra_env={"TWOPHASE_KEYRING": keyring, "TWOPHASE_LIVENESS_TIMEOUT": "60"},
    )
    with services:
        services.start_coordinator(TWOPHASE_KEY_FILE=str(keys / "coordinator.key"))
        for name, db in dbs.items():
            services.start_bank(name, db, TWOPHASE_KEY_FILE=str(keys / f"participant-{name}.key"))
        services.wait_ready([COORDINATOR_QUEUE, *map(topology.participant_queue, dbs)])
        hostile = Hostile(amqp_url, keys)
        web = Client(amqp_url, key_file=str(keys / "client-web.key"), keyring=keyring)
        other = Client(amqp_url, key_file=str(keys / "client-other.key"), keyring=keyring)
        try:
            assert web.reply_queue.startswith(topology.client_queue("web") + ".")
            # ---- real transfers, forgeries about each of them meanwhile ----
            plans = {f"real-{i}": transfer(i) for i in range(TRANSFERS)}
            futures = {}
            for n, (tx_id, (source, target, amount)) in enumerate(plans.items()):
                account = n % ACCOUNTS
                futures[tx_id] = web.submit_future(
                    branches(source, target, amount, account), tx_id=tx_id, timeout=20
                )
                hostile.against_bank_a(tx_id, n)
            for tx_id, future in futures.items():
                source, target, amount = plans[tx_id]
                if future.result(60).outcome is OutcomeKind.COMMITTED:
                    expected[source] -= amount
                    expected[target] += amount
            outcomes = {f.result().outcome for f in futures.values()}
            assert outcomes == {OutcomeKind.COMMITTED, OutcomeKind.ABORTED}  # both were tried

            # ---- Outcomes forged to another client while it waits ----
            forged = len(hostile.expected)
            wait_until(lambda: hostile.dead_letters() >= forged, "the services' refusals")
            services.processes["bank-a"].send_signal(signal.SIGSTOP)
            try:
                before = hostile.dead_letters()
                pending = other.submit_future(
                    branches("bank-a", "bank-b", 10_000, 0), tx_id="overdraft", timeout=20
                )
                hostile.outcomes_to(other.reply_queue, "overdraft")

                def refused() -> bool:
                    return hostile.dead_letters() >= before + 3

                wait_until(lambda: refused() or pending.done(), "the client's refusals")
                assert not pending.done(), pending.result()  # no forged COMMITTED got through
                assert refused()
            finally:
                os.kill(services.processes["bank-a"].pid, signal.SIGCONT)
            assert pending.result(60).outcome is OutcomeKind.ABORTED
        finally:
            web.close()
            other.close()
        # the banks apply a decision after the client hears of it: wait for them to catch up
        with contextlib.suppress(AssertionError):
            wait_until(lambda: balances() == expected, "the banks to apply every decision")
        wait_until(lambda: hostile.dead_letters() >= len(hostile.expected), "every forgery refused")
        hostile.channel.close()
    assert balances() == expected
    assert sum(expected.values()) == 2 * ACCOUNTS * BALANCE
    assert all(bank.totals(db, name)[1] == 0 for name, db in dbs.items())  # no hold left
    dead = read_dead_letters(amqp_url)
    missing = [body for body in hostile.expected if body not in dead]
    assert not missing, f"{len(missing)} forgeries not dead-lettered, e.g. {missing[0]!r}"
    wrong = {
        body: (dead[body], reason)
        for body, reason in hostile.expected.items()
        if not dead[body].startswith(f"{reason}: ")
    }
    assert not wrong, wrong
    reasons = set(hostile.expected.values())
    assert reasons == {BAD_SIGNATURE, UNKNOWN_KEY, NOT_PERMITTED}


@pytest.fixture(autouse=True)
def _no_key_in_the_test_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys go to the services by their environment, never through this process's."""
    monkeypatch.delenv(auth.KEY_FILE_VARIABLE, raising=False)
    monkeypatch.delenv(auth.KEYRING_VARIABLE, raising=False)
