"""The gpt-oss architecture hyperparameters, read from either published `config.json` layout.

Two layouts exist for the same weights:

* the Hugging Face one (``openai/gpt-oss-20b`` main): ``architectures: ["GptOssForCausalLM"]``,
  ``num_local_experts``, ``num_experts_per_tok``, ``layer_types``, ``rope_scaling`` (YaRN) and a
  ``quantization_config`` with ``quant_method: "mxfp4"`` (or none: a fine-tune saved with plain weights);
* the ``original/`` one: exactly the fields of the OpenAI reference ``ModelConfig``.

Both are mapped onto one :class:`ModelConfig`. Anything this implementation cannot run faithfully is refused
with a :class:`ConfigError` that names the offending field, instead of being silently ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Every MXFP4 scale covers this many consecutive values along a weight's input axis.
MXFP4_BLOCK = 32

HF_ARCHITECTURE = "GptOssForCausalLM"
SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(ValueError):
    """A config.json this implementation refuses; the message names the field."""


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """Architecture of a gpt-oss model. Defaults are gpt-oss-120b's, as in the OpenAI reference."""

    num_hidden_layers: int = 36
    num_experts: int = 128
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    # Per layer: True where the layer attends through the sliding window. The published models alternate,
    # starting with a sliding layer at index 0.
    layer_sliding: tuple[bool, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.layer_sliding:
            object.__setattr__(
                self, "layer_sliding", tuple(i % 2 == 0 for i in range(self.num_hidden_layers))
            )
        self.validate()

    # -- derived sizes ------------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    def window(self, layer: int) -> int:
        """Keys a query of `layer` may see (itself included); 0 means unbounded (full causal attention)."""
        return self.sliding_window if self.layer_sliding[layer] else 0

    # -- checks -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        positive = (
            "num_hidden_layers",
            "num_experts",
            "experts_per_token",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "head_dim",
            "num_attention_heads",
            "num_key_value_heads",
            "initial_context_length",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("swiglu_limit", "swiglu_alpha", "rope_theta", "rms_norm_eps", "rope_scaling_factor"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.experts_per_token > self.num_experts:
            raise ConfigError(
                f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"head_dim must be even for the half-split rotary embedding, got {self.head_dim}"
            )
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % MXFP4_BLOCK:
                raise ConfigError(
                    f"{name} ({getattr(self, name)}) must be a multiple of {MXFP4_BLOCK}: "
                    "MXFP4 experts are quantized in blocks of 32 along it"
                )
        if isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int):
            raise ConfigError(f"sliding_window must be an integer, got {self.sliding_window!r}")
        if self.sliding_window <= 0 and any(self.layer_sliding):
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window}")
        if len(self.layer_sliding) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_sliding)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        if self.rope_scaling_factor > 1.0:
            low, high = yarn_ramp_bounds(self)
            if not 0 < low < high < self.head_dim / 2 - 1:
                raise ConfigError(
                    "rope_scaling: YaRN correction range "
                    f"({low:.3f}, {high:.3f}) is degenerate for head_dim {self.head_dim}"
                )

    # -- serialisation ------------------------------------------------------------------------------------
    def to_original_json(self) -> dict[str, Any]:
        """The `original/config.json` dict (the OpenAI reference `ModelConfig` fields)."""
        if list(self.layer_sliding) != [i % 2 == 0 for i in range(self.num_hidden_layers)]:
            raise ConfigError("layer_types: the original layout can only express alternating layers")
        values = asdict(self)
        return {key: values[key] for key in ORIGINAL_KEYS}

    def to_hf_json(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict, shaped like the published openai/gpt-oss-20b one."""
        return {
            "architectures": [HF_ARCHITECTURE],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": 200002,
            "experts_per_token": self.experts_per_token,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.initial_context_length,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": [SLIDING if s else FULL for s in self.layer_sliding],
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "gpt_oss",
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.experts_per_token,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_experts,
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
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "factor": self.rope_scaling_factor,
                "original_max_position_embeddings": self.initial_context_length,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    # -- parsing ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Either layout's config dict; the layout is recognised by its keys."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(raw).__name__}")
        if "architectures" in raw or "model_type" in raw or "num_local_experts" in raw:
            return cls._from_hf(raw)
        return cls._from_original(raw)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)

    @classmethod
    def _from_original(cls, raw: dict[str, Any]) -> ModelConfig:
        known = set(ORIGINAL_KEYS)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{unknown[0]}: not a field of the original gpt-oss config")
        missing = sorted(known - set(raw))
        if missing:
            raise ConfigError(f"{missing[0]}: required by the original gpt-oss config but missing")
        return cls(**{key: raw[key] for key in ORIGINAL_KEYS})

    @classmethod
    def _from_hf(cls, raw: dict[str, Any]) -> ModelConfig:
        architectures = raw.get("architectures", [HF_ARCHITECTURE])
        if architectures != [HF_ARCHITECTURE]:
            raise ConfigError(f"architectures: expected [{HF_ARCHITECTURE!r}], got {architectures!r}")
        if raw.get("model_type", "gpt_oss") != "gpt_oss":
            raise ConfigError(f"model_type: expected 'gpt_oss', got {raw['model_type']!r}")
        # No quantization_config: a fine-tune saved with plain weights (the reader finds its experts).
        quant = raw.get("quantization_config")
        if quant is not None and (not isinstance(quant, dict) or quant.get("quant_method") != "mxfp4"):
            got = quant.get("quant_method") if isinstance(quant, dict) else quant
            raise ConfigError(
                f"quantization_config.quant_method: only 'mxfp4' checkpoints or plain weights are supported, "
                f"got {got!r}"
            )
        if raw.get("tie_word_embeddings", False):
            raise ConfigError("tie_word_embeddings: gpt-oss has separate embedding and unembedding")
        if not raw.get("attention_bias", True):
            raise ConfigError("attention_bias: gpt-oss attention projections always have biases")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act: expected 'silu' (the clamped SwiGLU), got {raw['hidden_act']!r}")
        for name in ("num_hidden_layers", "num_local_experts", "hidden_size", "vocab_size"):
            if name not in raw:
                raise ConfigError(f"{name}: required but missing")
        top_k = raw.get("num_experts_per_tok", raw.get("experts_per_token", 4))
        if "experts_per_token" in raw and raw["experts_per_token"] != top_k:
            raise ConfigError(
                f"experts_per_token ({raw['experts_per_token']}) disagrees with num_experts_per_tok ({top_k})"
            )
        rope = raw.get("rope_scaling") or raw.get("rope_parameters")
        theta = raw.get("rope_theta", (rope or {}).get("rope_theta", 150000.0))
        if rope is None:
            factor, beta_fast, beta_slow = 1.0, 32.0, 1.0
            original_ctx = raw.get("initial_context_length", 4096)
        else:
            if rope.get("rope_type", rope.get("type")) != "yarn":
                raise ConfigError(
                    f"rope_scaling.rope_type: only 'yarn' is supported, got {rope.get('rope_type')!r}"
                )
            if rope.get("truncate", False):
                raise ConfigError("rope_scaling.truncate: gpt-oss uses untruncated YaRN bounds (false)")
            for name in ("mscale", "mscale_all_dim", "attention_factor"):
                if rope.get(name) is not None:
                    raise ConfigError(f"rope_scaling.{name}: not used by gpt-oss and not supported")
            factor = rope.get("factor", 32.0)
            beta_fast = rope.get("beta_fast", 32.0)
            beta_slow = rope.get("beta_slow", 1.0)
            original_ctx = rope.get("original_max_position_embeddings", 4096)
            if "initial_context_length" in raw and raw["initial_context_length"] != original_ctx:
                raise ConfigError(
                    f"initial_context_length ({raw['initial_context_length']}) disagrees with "
                    f"rope_scaling.original_max_position_embeddings ({original_ctx})"
                )
        layers = raw["num_hidden_layers"]
        layer_types = raw.get("layer_types")
        if layer_types is None:
            sliding = tuple(i % 2 == 0 for i in range(layers))
        else:
            if not isinstance(layer_types, list):
                raise ConfigError(f"layer_types must be a list, got {layer_types!r}")
            for i, kind in enumerate(layer_types):
                if kind not in (SLIDING, FULL):
                    raise ConfigError(f"layer_types[{i}]: unknown attention type {kind!r}")
            sliding = tuple(kind == SLIDING for kind in layer_types)
        window = raw.get("sliding_window", 128)
        if window is None:
            if any(sliding):
                raise ConfigError("sliding_window: null but layer_types contains sliding_attention")
            window = 0
        return cls(
            num_hidden_layers=layers,
            num_experts=raw["num_local_experts"],
            experts_per_token=top_k,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw.get("intermediate_size", raw["hidden_size"]),
            swiglu_limit=raw.get("swiglu_limit", 7.0),
            swiglu_alpha=raw.get("swiglu_alpha", 1.702),
            head_dim=raw.get("head_dim", 64),
            num_attention_heads=raw.get("num_attention_heads", 64),
            num_key_value_heads=raw.get("num_key_value_heads", 8),
            sliding_window=window,
            initial_context_length=original_ctx,
            rope_theta=theta,
            rope_scaling_factor=factor,
            rope_ntk_alpha=beta_slow,
            rope_ntk_beta=beta_fast,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            max_position_embeddings=raw.get("max_position_embeddings", 131072),
            layer_sliding=sliding,
        )


ORIGINAL_KEYS = (
    "num_hidden_layers",
    "num_experts",
    "experts_per_token",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "swiglu_limit",
    "head_dim",
    "num_attention_heads",
    "num_key_value_heads",
    "sliding_window",
    "initial_context_length",
    "rope_theta",
    "rope_scaling_factor",
    "rope_ntk_alpha",
    "rope_ntk_beta",
)


def yarn_ramp_bounds(config: ModelConfig) -> tuple[float, float]:
    """YaRN's NTK-by-parts correction range, in rotary-pair indices (low from beta, high from alpha)."""
    half = config.head_dim / 2

    def bound(rotations: float) -> float:
        return (
            half
            * math.log(config.initial_context_length / (rotations * 2 * math.pi))
            / math.log(config.rope_theta)
        )

    return bound(config.rope_ntk_beta), bound(config.rope_ntk_alpha)


PRESETS: dict[str, ModelConfig] = {
    "20b": ModelConfig(num_hidden_layers=24, num_experts=32),
    "120b": ModelConfig(num_hidden_layers=36, num_experts=128),
    # Small enough for unit tests (seconds on 2 CPU cores) yet every axis is exercised: GQA (2 query heads
    # per kv head), 4 of 8 experts, two blocks of 32 along each MXFP4 axis, both attention kinds twice, and
    # the real vocabulary so the harmony tokenizer's ids are valid.
    "tiny": ModelConfig(
        num_hidden_layers=4,
        num_experts=8,
        experts_per_token=4,
        hidden_size=64,
        intermediate_size=64,
        head_dim=32,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}
