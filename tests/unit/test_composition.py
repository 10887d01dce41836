"""Each process's composition root: a start that fails closes everything it had opened."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from coordinator.service import CoordinatorConfig, CoordinatorService
from participant.worker import Participant, ParticipantWorker
from runtime.errors import ConfigurationError
from runtime.memory import MemoryBroker
from twophase import bank


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        yield held.getsockname()[1]


def _recording_closes(closed: list[str], name: str, target: object) -> None:
    real = target.close  # type: ignore[attr-defined]

    def close() -> None:
        closed.append(name)
        real()

    target.close = close  # type: ignore[attr-defined]


def _bank(tmp_path: Path) -> Participant:
    db = str(tmp_path / "bank-a.db")
    bank.open_accounts(db, "bank-a", [("bank-a-0", 100)])
    return bank.create_bank(
        "bank-a", db, amqp_url="amqp://memory/", log_url=str(tmp_path / "bank-a.log.db")
    )


def test_a_coordinator_whose_metrics_port_is_taken_closes_its_channel_and_log(
    tmp_path: Path, taken_port: int
) -> None:
    service = CoordinatorService.connect(
        CoordinatorConfig(
            "amqp://memory/",
            str(tmp_path / "coordinator.log.db"),
            channel_factory=MemoryBroker().channel,
            metrics_port=taken_port,
            metrics_registry=CollectorRegistry(),
        )
    )
    closed: list[str] = []
    _recording_closes(closed, "channel", service.channel)
    _recording_closes(closed, "log", service.decision_log)
    with pytest.raises(ConfigurationError, match=f"port {taken_port}"):
        service.serve_forever()
    assert sorted(closed) == ["channel", "log"]


def test_a_participant_whose_metrics_port_is_taken_closes_its_channel_and_log(
    tmp_path: Path, taken_port: int
) -> None:
    app = _bank(tmp_path)
    app.channel_factory = MemoryBroker().channel
    app.metrics_port = taken_port
    app.metrics_registry = CollectorRegistry()
    worker = ParticipantWorker.connect(app)
    closed: list[str] = []
    _recording_closes(closed, "channel", worker.channel)
    _recording_closes(closed, "log", worker.prepare_log)
    with pytest.raises(ConfigurationError, match=f"port {taken_port}"):
        worker.serve_forever()
    assert sorted(closed) == ["channel", "log"]


def test_a_participant_that_cannot_connect_closes_its_resource(tmp_path: Path) -> None:
    app = _bank(tmp_path)

    def refused(*_args: object, **_kwargs: object) -> object:
        raise ConfigurationError("no such broker")

    app.channel_factory = refused
    closed: list[str] = []
    _recording_closes(closed, "resource", app.resource)
    with pytest.raises(ConfigurationError, match="no such broker"):
        app.run()
    assert closed == ["resource"]
