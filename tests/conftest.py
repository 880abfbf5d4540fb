"""Shared fixtures: the wire vectors, keys from fixed seeds, settings on a temporary data dir."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from dsproxy.config import Settings, load_settings
from dsproxy.wire.envelope import Address
from dsproxy.wire.event import public_key_of

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("thorough", max_examples=2_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

VECTORS_PATH = Path(__file__).parent / "fixtures" / "wire.json"

CONTROLLER_SECRET = "c1" * 32
BACKEND_SECRET = "b1" * 32
STRANGER_SECRET = "5e" * 32
MACHINE_SECRET = "3a" * 32
SESSION = "dephy-dsproxy-controller"


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    return json.loads(VECTORS_PATH.read_text())


@pytest.fixture(scope="session")
def address() -> Address:
    return Address(SESSION, public_key_of(MACHINE_SECRET))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def node_env(data_dir: Path, address: Address) -> dict[str, str]:
    """Environment variables for a node that trusts the test controller and backend."""
    return {
        "DSPROXY_DATA_DIR": str(data_dir),
        "DSPROXY_SESSION": address.session,
        "DSPROXY_MACHINE_PUBKEY": address.machine,
        "DSPROXY_TRUSTED_CONTROLLERS": public_key_of(CONTROLLER_SECRET),
        "DSPROXY_TRUSTED_BACKENDS": public_key_of(BACKEND_SECRET),
    }


@pytest.fixture
def node_settings(node_env: dict[str, str]) -> Settings:
    return load_settings(node_env)
