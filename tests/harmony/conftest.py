"""Fixtures for the harmony tests: our encoding, renderer, and the official `openai-harmony` oracle."""

from __future__ import annotations

import openai_harmony as oh
import pytest
import tiktoken

from harmony.encoding import load_harmony_encoding
from harmony.render import Renderer


@pytest.fixture(scope="session")
def enc() -> tiktoken.Encoding:
    return load_harmony_encoding()


@pytest.fixture(scope="session")
def renderer(enc: tiktoken.Encoding) -> Renderer:
    return Renderer(enc)


@pytest.fixture(scope="session")
def oracle() -> oh.HarmonyEncoding:
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
