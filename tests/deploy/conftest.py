"""Fixtures of the deployment tests: the parsed Dockerfile, and a stand-in /health for running health checks."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from tests.deploy.deployfiles import ROOT, HealthHandler, Instruction, parse_dockerfile


@pytest.fixture(scope="session")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[HealthHandler]]]:
    handler = type("Handler", (HealthHandler,), {"paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()
