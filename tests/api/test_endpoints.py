"""The small endpoints: `/v1/models/{id}` (the SDK's `models.retrieve()`), vLLM's `/version` and
`/tokenizer_info`."""

from __future__ import annotations

import importlib.metadata

import httpx
import openai
import pytest

from tests.api.conftest import MODEL, Served


@pytest.fixture
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0)


def test_models_retrieve(client: openai.OpenAI) -> None:
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "gpt-oss-server")
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.body["param"] == "model"  # type: ignore[index]
    assert info.value.body["type"] == "not_found_error"  # type: ignore[index]


def test_version(served: Served) -> None:
    assert httpx.get(served.base_url + "/version").json() == {
        "version": importlib.metadata.version("gpt-oss-server")
    }


def test_tokenizer_info(served: Served) -> None:
    info = httpx.get(served.base_url + "/tokenizer_info").json()
    assert info["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert info["model_max_length"] == served.engine.max_model_len
    assert (info["bos_token"], info["eos_token"], info["pad_token"]) == (
        "<|startoftext|>",
        "<|return|>",
        "<|endoftext|>",
    )
    assert info["vocab_size"] == served.encoding.n_vocab
