"""Key rotation under load (issue 14; README "Keys", docs/architecture.md §11): a participant's
key and the coordinator's key are each rotated while a client moves money between two banks.

A process reads its keyring once, when it starts: there is no reload. A rotation is therefore a
rolling restart, the one `twophase keys rotate` prints and §11 documents:

1. ``twophase keys rotate DIR --participant bank-a`` writes ``participant-bank-a.next.key`` and
   adds its public key to the keyring;
2. the receivers of that identity's messages are restarted (a coordinator's receivers are every
   participant and every client): they accept both keys;
3. the next key is moved over the key file and its process restarted: it signs with the new key;
4. once nothing signed with the old key waits in a queue, ``twophase keys retire DIR OLD_ID`` and
   the receivers are restarted again: the old key is refused as ``unknown key``.

Every service is a real process, stopped by PID with SIGTERM (which, having no handler, is a
crash). A thread submits transfers all along, a few at a time. Then: every transfer has a
definite outcome (the client's, or, for one the client stopped waiting for across a restart, the
coordinator's answer to a status query), the banks hold what the outcomes say, and the
dead-letter queue holds the forgeries signed with the retired key, each an ``unknown key``, and no
other refusal of a signature or a sender: nothing signed with a valid key was refused for it.
Nothing else is dead-lettered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import pika
import pytest

from coordinator.client import Client
from runtime import auth
from runtime.amqp import AmqpChannel
from runtime.auth import SigningKey
from runtime.errors import ClientClosed, OutcomeUnknown
from schemas import permissions, topology
from schemas.codec import encode
from schemas.messages import (
    Abort,
    Branch,
    Heartbeat,
    Message,
    Outcome,
    OutcomeKind,
)
from schemas.permissions import BAD_SIGNATURE, NOT_PERMITTED, UNKNOWN_KEY, Identity
from twophase import bank, cli
from twophase.processes import Keys, ServiceGroup

pytestmark = pytest.mark.integration

BANKS = ("bank-a", "bank-b")
ACCOUNTS, BALANCE = 4, 1000
#: transfers in flight at once (each on an account of its own)
WINDOW = 4
#: the vote timeout the coordinator enforces (the client re-sends a Begin 1 s after it)
VOTE_TIMEOUT_S = 2.0
#: how long the load waits for an outcome before it counts the transfer as unknown
OUTCOME_WAIT_S = 12.0
#: committed transfers wanted in each phase of a rotation: what shows each key was accepted
COMMITS_PER_PHASE = 3
FINAL = (OutcomeKind.COMMITTED, OutcomeKind.ABORTED)
#: the refusals of a signature or of a sender (docs/architecture.md §11)
AUTH_REASONS = tuple(f"{reason}: " for reason in (BAD_SIGNATURE, UNKNOWN_KEY, NOT_PERMITTED))


def wait_until(done: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclasses.dataclass
class Transfer:
    tx_id: str
    source: str
    target: str
    amount: int
    account: int
    #: the step of the rotation it was submitted in
    phase: str
    #: None: not known yet, or the client stopped waiting (then asked by status query)
    outcome: OutcomeKind | None = None
    by_status_query: bool = False

    def branches(self) -> list[Branch]:
        debit = {"account": f"{self.source}-{self.account}", "amount": self.amount}
        credit = {"account": f"{self.target}-{self.account}", "amount": self.amount}
        return [Branch(self.source, "debit", debit), Branch(self.target, "credit", credit)]


class Load:
    """Transfers from a thread of its own, WINDOW at a time, until stopped. The test names the
    phase each is submitted in, and may hand it a new client (one made with a new keyring: a
    client is a receiver of the coordinator's key): it is taken between two rounds, when the
    old client waits for no outcome."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.phase = "before"
        self.transfers: list[Transfer] = []
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._next: Client | None = None
        self._taken = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rotation-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                with self._lock:
                    if self._next is not None:
                        self.client, self._next = self._next, None
                        self._taken.set()
                    client, phase = self.client, self.phase
                batch: list[tuple[Transfer, Future[Outcome]]] = []
                for account in range(WINDOW):
                    source, target = BANKS if n % 2 == 0 else BANKS[::-1]
                    t = Transfer(f"rot-{n}", source, target, 1 + (n * 7) % 40, account, phase)
                    future = client.submit_future(
                        t.branches(), tx_id=t.tx_id, timeout=VOTE_TIMEOUT_S
                    )
                    with self._lock:
                        self.transfers.append(t)
                    batch.append((t, future))
                    n += 1
                deadline = time.monotonic() + OUTCOME_WAIT_S
                for t, future in batch:
                    try:
                        outcome = future.result(max(0.0, deadline - time.monotonic())).outcome
                    except (FutureTimeout, ClientClosed):
                        continue  # unknown to the client: asked by status query at the end
                    with self._lock:
                        t.outcome = outcome
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def use(self, client: Client) -> Client:
        """Hand the load ``client``; the one it used, once it is no longer used (to close)."""
        with self._lock:
            old, self._next = self.client, client
            self._taken.clear()
        if not self._taken.wait(OUTCOME_WAIT_S + 10):
            raise AssertionError("the load did not take the new client")
        return old

    def committed(self, phase: str) -> int:
        with self._lock:
            return sum(
                1 for t in self.transfers if t.phase == phase and t.outcome is OutcomeKind.COMMITTED
            )

    def enter(self, phase: str) -> None:
        """Name the next phase, after COMMITS_PER_PHASE transfers committed in the current one
        (submitted after it began: so with its keys)."""
        current = self.phase
        wait_until(
            lambda: self.committed(current) >= COMMITS_PER_PHASE or self.error is not None,
            f"{COMMITS_PER_PHASE} transfers committed in phase {current!r}",
        )
        if self.error is not None:
            raise AssertionError(f"the load failed in phase {current!r}") from self.error
        with self._lock:
            self.phase = phase

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2 * OUTCOME_WAIT_S)
        assert not self._thread.is_alive(), "the load thread did not stop"
        if self.error is not None:
            raise self.error


class Rotation:
    """A keyed coordinator and two banks as real processes in this test's virtual host, a
    keyed client ``web``, and the steps of a rotation."""

    def __init__(self, amqp_url: str, tmp_path: Path) -> None:
        self.amqp_url = amqp_url
        self.dir = tmp_path / "keys"
        identities = ["--coordinator", "--participant", "bank-a", "--participant", "bank-b"]
        assert cli.main(["keys", "init", str(self.dir), *identities, "--client", "web"]) == 0
        # the same files, seen through processes.Keys: each service started with its own
        self.keys = Keys(self.dir, BANKS, ["web"])
        self.dbs = {name: str(tmp_path / f"{name}.db") for name in BANKS}
        for name, db in self.dbs.items():
            bank.open_accounts(db, name, [(f"{name}-{i}", BALANCE) for i in range(ACCOUNTS)])
        # no participant is called down while it restarts: each restart here is deliberate
        self.services = ServiceGroup(
            amqp_url, tmp_path, keys=self.keys, extra_env={"TWOPHASE_LIVENESS_TIMEOUT": "60"}
        )
        self.probe = AmqpChannel(amqp_url, connection_name="twophase-test-rotation")
        self.restarts = 0
        #: every forgery published, by body
        self.forged: dict[bytes, str] = {}

    def start(self) -> None:
        self.services.start_coordinator()
        for name, db in self.dbs.items():
            self.services.start_bank(name, db)
        self.services.wait_ready([topology.COORDINATOR_QUEUE, *self.bank_queues()])

    @staticmethod
    def bank_queues() -> list[str]:
        return [topology.participant_queue(name) for name in BANKS]

    def client(self) -> Client:
        """A client with the keyring as it is now (a Client reads it once, as a service does)."""
        key_file, keyring = self.keys.client("web")
        return Client(self.amqp_url, key_file=key_file, keyring=keyring)

    def keys_cli(self, *argv: str) -> None:
        assert cli.main(["keys", *argv]) == 0, argv

    def key_path(self, identity: Identity, *, following: bool = False) -> Path:
        return auth.secret_key_path(self.dir, identity, following=following)

    def restart(self, name: str) -> None:
        """Stop ``name`` by its PID and start it again with the same command: it reads the key
        file and the keyring again (the only way a running service learns of new keys)."""
        coordinator = name == "coordinator"
        queue = topology.COORDINATOR_QUEUE if coordinator else topology.participant_queue(name)
        self.services.kill(name, signal.SIGTERM)
        wait_until(lambda: self.consumers(queue) == 0, f"{name}'s consumer to go")
        self.services.restart(name)
        self.services.wait_ready([queue])
        self.restarts += 1

    def consumers(self, queue: str) -> int:
        counts = self.probe.queue_counts(queue)
        return 0 if counts is None else counts[1]

    def drained(self, queues: list[str]) -> None:
        """Until nothing waits in ``queues``: what the retired key signed has been read."""
        for queue in queues:
            wait_until(lambda: self.ready(queue) == 0, f"{queue} to be drained")  # noqa: B023

    def ready(self, queue: str) -> int:
        counts = self.probe.queue_counts(queue)
        return 0 if counts is None else counts[0]

    def forge(self, queue: str, message: Message, key: SigningKey) -> None:
        """Publish ``message`` to ``queue`` signed with ``key`` (a retired one)."""
        body = encode(message)
        self.forged[body] = queue
        headers = key.sign(body, queue, permissions.kinds_text(message))
        self.probe.publish(queue, body, headers=headers)
        self.probe.wait_for_confirms()

    def dead_letters(self) -> int:
        return self.ready(topology.DEAD_LETTER_QUEUE)

    def enter(self, load: Load, phase: str) -> None:
        """``load.enter(phase)``; if the load stalls, what was dead-lettered, by reason (a
        step of the rotation missed shows as ``unknown key`` refusals)."""
        try:
            load.enter(phase)
        except AssertionError as exc:
            dead = read_dead_letters(self.amqp_url).values()
            reasons = Counter(error.split(":")[0] for _, error in dead)
            raise AssertionError(f"{exc}; dead-lettered meanwhile: {dict(reasons)}") from None

    def balances(self) -> dict[str, tuple[int, int]]:
        return {name: bank.totals(db, name) for name, db in self.dbs.items()}

    def check(self, load: Load, client: Client) -> None:
        """Every transfer decided, money where the decisions say, and the dead-letter queue
        holding the forgeries, each as ``unknown key``, and nothing else."""
        unknown = [t for t in load.transfers if t.outcome is None]
        # only a transfer in flight across a deliberate restart may be unknown to the client
        assert len(unknown) <= WINDOW * self.restarts, [t.tx_id for t in unknown]
        for t in unknown:
            t.outcome, t.by_status_query = status(client, t.tx_id), True
        assert all(t.outcome in FINAL for t in load.transfers)
        outcomes = {t.outcome for t in load.transfers}
        assert OutcomeKind.COMMITTED in outcomes
        expected = {name: ACCOUNTS * BALANCE for name in BANKS}
        for t in load.transfers:
            if t.outcome is OutcomeKind.COMMITTED:
                expected[t.source] -= t.amount
                expected[t.target] += t.amount
        assert sum(expected.values()) == len(BANKS) * ACCOUNTS * BALANCE
        settled = {name: (total, 0) for name, total in expected.items()}
        # a bank applies a decision after the client hears of it: wait for them to catch up
        with contextlib.suppress(AssertionError):  # the assertion below says how they differ
            wait_until(lambda: self.balances() == settled, "the banks to apply every decision")
        assert self.balances() == settled  # money conserved, every hold released

        wait_until(lambda: self.dead_letters() >= len(self.forged), "the forgeries' refusals")
        dead = read_dead_letters(self.amqp_url)
        missing = [body for body in self.forged if body not in dead]
        assert not missing, f"forgeries not dead-lettered: {missing}"
        wrong = {
            body[:120]: error
            for body, (_, error) in dead.items()
            if body in self.forged and not error.startswith(f"{UNKNOWN_KEY}: ")
        }
        assert not wrong, f"forgeries refused for another reason: {wrong}"
        others = {body: refused for body, refused in dead.items() if body not in self.forged}
        # nothing signed with a valid key (the old one during the overlap, the new one) refused
        refused_signed = {
            body[:120]: refused
            for body, refused in others.items()
            if refused[1].startswith(AUTH_REASONS)
        }
        assert not refused_signed, f"valid signatures refused: {refused_signed}"
        unexplained = {body[:1000]: refused for body, refused in others.items()}
        assert not unexplained, f"dead-lettered, not forged: {unexplained}"
        committed = sum(1 for t in load.transfers if t.outcome is OutcomeKind.COMMITTED)
        print(
            f"{len(load.transfers)} transfers, {committed} committed, {len(unknown)} unknown "
            f"to the client across {self.restarts} restarts (resolved by status query), "
            f"{len(self.forged)} forgeries with the retired key dead-lettered as {UNKNOWN_KEY}"
        )

    def close(self) -> None:
        self.services.stop_all()
        self.probe.close()


def status(client: Client, tx_id: str) -> OutcomeKind:
    """The coordinator's final answer about ``tx_id`` (PENDING is asked again)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            outcome = client.status(tx_id, wait=5).outcome
        except OutcomeUnknown:
            outcome = None
        if outcome in FINAL or time.monotonic() > deadline:
            assert outcome in FINAL, f"{tx_id}: {outcome}"
            return outcome
        time.sleep(0.2)


def read_dead_letters(amqp_url: str) -> dict[bytes, tuple[str, str]]:
    """Every dead-lettered body with the queue it was refused on and its x-twophase-error
    header (the queue is emptied)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        found: dict[bytes, tuple[str, str]] = {}
        while True:
            method, props, body = channel.basic_get(topology.DEAD_LETTER_QUEUE, auto_ack=True)
            if method is None:
                return found
            error = (props.headers or {}).get(topology.ERROR_HEADER, "")
            text = error.decode() if isinstance(error, bytes) else str(error)
            found[body] = (str(method.routing_key), text)
    finally:
        connection.close()


@pytest.fixture
def rotation(amqp_url: str, tmp_path: Path) -> Iterator[Rotation]:
    rotation = Rotation(amqp_url, tmp_path)
    try:
        rotation.start()
        yield rotation
    finally:
        rotation.close()


def test_a_participants_key_is_rotated_under_load(rotation: Rotation) -> None:
    """bank-a's key: its one receiver, the coordinator, is restarted around the switch."""
    bank_a = permissions.participant("bank-a")
    old = auth.read_secret_key(rotation.key_path(bank_a))
    client = rotation.client()
    load = Load(client)
    try:
        # 1. a next key, in the keyring beside the old one
        rotation.enter(load, "rotated")
        rotation.keys_cli("rotate", str(rotation.dir), "--participant", "bank-a")
        new = auth.read_secret_key(rotation.key_path(bank_a, following=True))
        assert new.key_id != old.key_id
        # 2. the receiver reads the keyring again: both keys accepted; bank-a signs with the old
        rotation.restart("coordinator")
        rotation.enter(load, "overlap, old key signs")
        # 3. bank-a switches: the next key becomes its key file
        os.replace(rotation.key_path(bank_a, following=True), rotation.key_path(bank_a))
        rotation.restart("bank-a")
        rotation.enter(load, "overlap, new key signs")
        # 4. what the old key signed has been read: retire it, the receiver reads the keyring
        rotation.drained([topology.COORDINATOR_QUEUE])
        rotation.keys_cli("retire", str(rotation.dir), old.key_id)
        rotation.restart("coordinator")
        rotation.enter(load, "retired")
        # the old key is refused now (a heartbeat: harmless if it were obeyed)
        beat = Heartbeat("bank-a", int(time.time() * 1000), 1000)
        rotation.forge(topology.COORDINATOR_QUEUE, beat, old)
        rotation.enter(load, "done")
    finally:
        load.stop()
    try:
        rotation.check(load, client)
    finally:
        client.close()


def test_the_coordinators_key_is_rotated_under_load(rotation: Rotation) -> None:
    """The coordinator's key: every participant and every client verifies it, so all of them
    are restarted (the client made anew) before the coordinator switches, and after the old key
    is retired."""
    coordinator = permissions.COORDINATOR
    old = auth.read_secret_key(rotation.key_path(coordinator))
    load = Load(rotation.client())
    try:
        # 1. a next key, in the keyring beside the old one
        rotation.enter(load, "rotated")
        rotation.keys_cli("rotate", str(rotation.dir), "--coordinator")
        new = auth.read_secret_key(rotation.key_path(coordinator, following=True))
        assert new.key_id != old.key_id
        # 2. every receiver reads the keyring again: the banks restarted, the client made anew
        for name in BANKS:
            rotation.restart(name)
        load.use(rotation.client()).close()
        rotation.enter(load, "overlap, old key signs")
        # 3. the coordinator switches
        os.replace(rotation.key_path(coordinator, following=True), rotation.key_path(coordinator))
        rotation.restart("coordinator")
        rotation.enter(load, "overlap, new key signs")
        # 4. what the old key signed has been read: retire it, the receivers read the keyring
        rotation.drained(rotation.bank_queues())
        rotation.keys_cli("retire", str(rotation.dir), old.key_id)
        for name in BANKS:
            rotation.restart(name)
        load.use(rotation.client()).close()
        rotation.enter(load, "retired")
        # the old key is refused now, by a bank and by a client (harmless if obeyed: no such tx)
        rotation.forge(topology.participant_queue("bank-a"), Abort("forged-old-key", "bank-a"), old)
        forged = Outcome("forged-old-key", OutcomeKind.COMMITTED, "signed with the retired key")
        rotation.forge(load.client.reply_queue, forged, old)
        rotation.enter(load, "done")
    finally:
        load.stop()
    try:
        rotation.check(load, load.client)
    finally:
        load.client.close()


@pytest.fixture(autouse=True)
def _no_key_in_the_test_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys go to the services by their environment, never through this process's."""
    monkeypatch.delenv(auth.KEY_FILE_VARIABLE, raising=False)
    monkeypatch.delenv(auth.KEYRING_VARIABLE, raising=False)
