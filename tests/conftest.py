"""Shared test set-up: the vocabulary, offline, for both our encoding and the official oracle."""

from __future__ import annotations

import os
from pathlib import Path

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
