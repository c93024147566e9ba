"""ModelConfig from both published config.json layouts, and refusals that name the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from model.config import PRESETS, ConfigError, ModelConfig

# openai/gpt-oss-20b's config.json as published on the Hub (main), spelled out here so that the parser is
# checked against the real thing rather than against our own writer.
PUBLISHED_HF_20B: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}

# openai/gpt-oss-20b's original/config.json.
PUBLISHED_ORIGINAL_20B: dict[str, Any] = {
    "num_hidden_layers": 24,
    "num_experts": 32,
    "experts_per_token": 4,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "swiglu_limit": 7.0,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "initial_context_length": 4096,
    "rope_theta": 150000,
    "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1,
    "rope_ntk_beta": 32,
}


def test_both_published_layouts_give_the_same_config() -> None:
    hf = ModelConfig.from_dict(PUBLISHED_HF_20B)
    original = ModelConfig.from_dict(PUBLISHED_ORIGINAL_20B)
    assert hf == original == PRESETS["20b"]
    assert hf.layer_sliding[:4] == (True, False, True, False)
    assert (hf.q_size, hf.kv_size, hf.qkv_size) == (4096, 512, 5120)
    assert [hf.window(n) for n in range(2)] == [128, 0]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("layout", ["hf", "original"])
def test_written_configs_read_back(preset: str, layout: str, tmp_path: Path) -> None:
    config = PRESETS[preset]
    raw = config.to_hf_json() if layout == "hf" else config.to_original_json()
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert ModelConfig.from_file(tmp_path / "config.json") == config


def hf_with(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(PUBLISHED_HF_20B)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = raw
        for parent in parents:
            target = target[parent]
        if value is DELETE:
            del target[key]
        else:
            target[key] = value
    return raw


DELETE = object()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (hf_with(architectures=["LlamaForCausalLM"]), "architectures"),
        (hf_with(model_type="llama"), "model_type"),
        (hf_with(quantization_config=[]), "quantization_config.quant_method"),
        (hf_with(quantization_config__quant_method="fp8"), "quantization_config.quant_method"),
        (hf_with(tie_word_embeddings=True), "tie_word_embeddings"),
        (hf_with(attention_bias=False), "attention_bias"),
        (hf_with(hidden_act="gelu"), "hidden_act"),
        (hf_with(num_local_experts=DELETE), "num_local_experts"),
        (hf_with(experts_per_token=2), "experts_per_token"),
        (hf_with(num_experts_per_tok=64, experts_per_token=64), "experts_per_token"),
        (hf_with(rope_scaling__rope_type="linear"), "rope_scaling.rope_type"),
        (hf_with(rope_scaling__truncate=True), "rope_scaling.truncate"),
        (hf_with(rope_scaling__mscale=1.0), "rope_scaling.mscale"),
        (hf_with(initial_context_length=8192), "initial_context_length"),
        (hf_with(layer_types=["sliding_attention"] * 23), "layer_types"),
        (hf_with(layer_types=["chunked_attention"] * 24), "layer_types[0]"),
        (hf_with(sliding_window=None), "sliding_window"),
        (hf_with(num_key_value_heads=7), "num_attention_heads"),
        (hf_with(head_dim=63), "head_dim"),
        (hf_with(hidden_size=2890), "hidden_size"),
        (hf_with(intermediate_size=100), "intermediate_size"),
        (hf_with(vocab_size=0), "vocab_size"),
        (hf_with(num_hidden_layers="24"), "num_hidden_layers"),
        (hf_with(rms_norm_eps=-1.0), "rms_norm_eps"),
        (hf_with(head_dim=4), "rope_scaling"),
        ({**PUBLISHED_ORIGINAL_20B, "num_experts_per_tok": 4}, "num_experts_per_tok"),
        ({k: v for k, v in PUBLISHED_ORIGINAL_20B.items() if k != "rope_theta"}, "rope_theta"),
        ({**PUBLISHED_ORIGINAL_20B, "swiglu_limit": 0.0}, "swiglu_limit"),
        ({**PUBLISHED_ORIGINAL_20B, "sliding_window": 0}, "sliding_window"),
    ],
)
def test_unsupported_or_inconsistent_configs_are_refused_naming_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(raw)
    assert field in str(info.value)


def test_a_config_without_layer_types_alternates_starting_with_a_sliding_layer() -> None:
    config = ModelConfig.from_dict(hf_with(layer_types=DELETE))
    assert config.layer_sliding == tuple(n % 2 == 0 for n in range(24))


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json"):
        ModelConfig.from_file(tmp_path / "config.json")


def test_a_config_saved_by_transformers_reads_back(
    checkpoints: dict[str, Path], tiny_config: ModelConfig
) -> None:
    """transformers 5 rewrites `rope_scaling`/`rope_theta` as `rope_parameters`; both spellings must parse."""
    from transformers import GptOssConfig

    saved = GptOssConfig.from_pretrained(str(checkpoints["hf"])).to_dict()
    assert ModelConfig.from_dict(saved) == tiny_config


def test_a_config_without_quantization_describes_a_fine_tune_with_plain_weights() -> None:
    config = ModelConfig.from_dict(hf_with(quantization_config=DELETE))
    assert config == ModelConfig.from_dict(hf_with())
