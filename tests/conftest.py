"""Shared test set-up: the vocabulary, offline, for both our encoding and the official oracle."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from harmony.encoding import write_vocabulary


def _offline_vocab_dir() -> Path:
    """The vocabulary written once where openai-harmony can read it offline."""
    cache = Path(os.environ.get("GPT_OSS_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache"))
    return write_vocabulary(cache / "vocab").parent


# Under pytest-xdist every worker is a process of its own: one intra-op thread each, or the workers' thread
# pools fight over the cores and small ops (the tiny models' MoE, the sampler) get many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Without a GPU the Triton kernels run under Triton's interpreter, which is chosen when a kernel is defined:
# set before any test module imports one. With CUDA the same tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# openai-harmony reads the variable inside `load_harmony_encoding`, and never downloads when it is set.
VOCAB_DIR = _offline_vocab_dir()
os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(VOCAB_DIR))


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    return VOCAB_DIR


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run where CUDA is present; elsewhere they are deselected, not skipped, so that a CPU
    run's summary lists no skip that stands for nothing but the missing device (it counts them as
    "deselected"). `-m gpu` on a GPU machine runs only them."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


# -- the reliability suite's summary lines ----------------------------------------------------------------------
# Here, not in tests/reliability: under pytest-xdist only the root conftest is sure to be loaded by the
# controller, which prints the end-of-run report.
SUMMARY_KEY = "reliability"
_summary_lines: list[tuple[str, str, str]] = []  # (test id, outcome, line)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call" and not (report.when == "setup" and report.failed):
        return
    for key, line in report.user_properties:
        if key == SUMMARY_KEY:
            _summary_lines.append((report.nodeid.split("::")[-1], report.outcome.upper(), str(line)))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _summary_lines:
        return
    terminalreporter.section("reliability checks")
    for name, outcome, line in sorted(_summary_lines):
        terminalreporter.write_line(f"{outcome:6} {name}: {line}")
