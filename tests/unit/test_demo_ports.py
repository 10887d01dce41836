"""The demo's metrics: with TWOPHASE_METRICS_PORT=P, a port per service (P, P+1, ...), since the
services it starts would otherwise all take P and all but one fail; without it, the defaults."""

from __future__ import annotations

import pytest

from runtime.errors import ConfigurationError
from twophase import demo


def test_a_port_per_service_from_the_base() -> None:
    assert demo.metrics_ports(9500) == {
        "coordinator": 9500,
        "bank-a": 9501,
        "bank-b": 9502,
        "bank-c": 9503,
    }


def test_no_base_no_ports() -> None:
    assert demo.metrics_ports(0) == {}


def test_a_base_too_high_for_every_service() -> None:
    assert demo.metrics_ports(65532)["bank-c"] == 65535
    with pytest.raises(ConfigurationError, match="TWOPHASE_METRICS_PORT 65533"):
        demo.metrics_ports(65533)
