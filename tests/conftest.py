"""Shared fixtures: the golden data, a loopback HTTP server, and deterministic checkpoints."""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from helpers import GOLDEN  # noqa: E402
from helpers.durations import long_tests  # noqa: E402
from helpers.http_server import LocalServer  # noqa: E402


def pytest_collection_modifyitems(config, items) -> None:
    # `long`: tests measured at 1 s or more (tests/data/durations.json); `make test-fast` leaves them out with the
    # `slow` ones, so that it runs in a few minutes. The marker changes what is selected, never how a test runs.
    measured = long_tests()
    for item in items:
        if item.nodeid in measured:
            item.add_marker(pytest.mark.long)


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    return GOLDEN


@pytest.fixture(scope="session")
def layout() -> list:
    return json.loads((GOLDEN / "state_dict_layout.json").read_text())


@pytest.fixture(scope="session")
def golden_state_dict(layout):
    """NVIDIA-layout weights from the golden recipe, salt 0 (the weights behind forward.npz)."""
    from helpers.checkpoints import golden_state_dict as make

    return make(layout)


@pytest.fixture(scope="session")
def forward_golden():
    return dict(np.load(GOLDEN / "forward.npz"))


@pytest.fixture(scope="session")
def decode_golden():
    return dict(np.load(GOLDEN / "decode.npz"))


@pytest.fixture()
def http_server():
    server = LocalServer()
    yield server
    server.stop()


@pytest.fixture()
def hub_dir(tmp_path, monkeypatch):
    """An empty torch.hub directory, and no SSD_CHECKPOINT from the environment."""
    import torch

    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    monkeypatch.delenv("SSD_CHECKPOINT", raising=False)
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Every registered model with detecting weights, its checkpoint and its ONNX export, each made once a session
    (helpers.zoo)."""
    from helpers.zoo import Zoo

    return Zoo(tmp_path_factory.mktemp("zoo"))
