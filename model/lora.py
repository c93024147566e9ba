"""LoRA adapters in PEFT's format, merged into the model's weights at load.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. PEFT names each pair
``base_model.model.model.layers.N.<module>.lora_A.weight`` ``[r, in]`` and ``lora_B.weight`` ``[out, r]``,
and the update of the module's ``[out, in]`` weight is ``scaling · B @ A`` with ``scaling = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA). The attention projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``)
are plain modules. The experts are targeted as parameters (PEFT's ``target_parameters``:
``mlp.experts.gate_up_proj`` ``[E, H, 2I]`` and ``down_proj`` ``[E, I, H]``), one pair for all experts: A is
``[E·r, in]`` with expert e's rows ``e·r ..``, B is ``[out, r·E]`` with rank j of expert e in column
``j·E + e``; when both parameters are targeted PEFT nests the wrappers (``experts.base_layer.lora_*`` is one,
``experts.lora_*`` the other), which are told apart here by their shapes.

:func:`read_adapter` returns the updates by the model's own parameter names and orientation (``[out, in]``,
the q, k and v rows of the fused ``qkv``), and :meth:`model.gpt_oss.GptOss.merge_lora` adds them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.config import ModelConfig


class AdapterError(ValueError):
    """An adapter this model cannot take; the message names the file, tensor or setting at fault."""


@dataclass(frozen=True, slots=True)
class Update:
    """`scaling · B @ A` for the rows `rows` of the parameter `name` (all rows when None); for experts,
    `a [E, r, in]`, `b [E, out, r]`."""

    name: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    rows: slice | None = None

    def delta(self) -> torch.Tensor:
        """The dense update, `[out, in]` (or `[E, out, in]`), in float32."""
        return (self.b.float() @ self.a.float()) * self.scaling


_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight")
_PLAIN = {"self_attn.o_proj": "attn.out.weight"}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_EXPERTS = ("mlp.experts", "mlp.experts.base_layer")


def read_adapter(path: str | Path, config: ModelConfig) -> list[Update]:
    """The updates an adapter directory makes to a model of `config`, checked against its shapes."""
    root = Path(path)
    try:
        settings = json.loads((root / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise AdapterError(f"{root / 'adapter_config.json'}: {error}") from error
    if settings.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type: only LORA adapters are supported, got {settings['peft_type']!r}")
    for unsupported in ("use_dora", "lora_bias"):
        if settings.get(unsupported):
            raise AdapterError(f"{unsupported}: not supported")
    if settings.get("rank_pattern") or settings.get("alpha_pattern"):
        raise AdapterError("rank_pattern / alpha_pattern: per-module ranks are not supported")
    rank, alpha = int(settings["r"]), float(settings["lora_alpha"])
    scaling = alpha / (math.sqrt(rank) if settings.get("use_rslora") else rank)
    try:
        tensors = load_file(str(root / "adapter_model.safetensors"))
    except (OSError, ValueError) as error:
        raise AdapterError(f"{root / 'adapter_model.safetensors'}: {error}") from error
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"{key}: not a LoRA weight of a gpt-oss layer")
        layer, module, side = int(match.group(1)), match.group(2), match.group(3)
        if layer >= config.num_hidden_layers:
            raise AdapterError(f"{key}: layer {layer}, but the model has {config.num_hidden_layers}")
        pairs.setdefault((layer, module), {})[side] = tensor
    updates = []
    for (layer, module), pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {module}: lora_A and lora_B must both be present")
        a, b = pair["A"], pair["B"]
        updates.append(_update(config, layer, module, a, b, rank, scaling))
    return updates


def _update(
    config: ModelConfig, layer: int, module: str, a: torch.Tensor, b: torch.Tensor, rank: int, scaling: float
) -> Update:
    prefix = f"block.{layer}."
    where = f"layer {layer} {module}"
    h, e, i = config.hidden_size, config.num_experts, config.intermediate_size
    if module in _EXPERTS:
        # gate_up_proj maps H to 2I, down_proj I to H: the shapes say which parameter a pair adapts.
        shapes = {(e * rank, h, 2 * i): "mlp.mlp1_weight", (e * rank, i, h): "mlp.mlp2_weight"}
        name = shapes.get((a.shape[0], a.shape[1], b.shape[0]))
        if name is None or b.shape[1] != rank * e:
            raise AdapterError(
                f"{where}: lora_A {list(a.shape)} and lora_B {list(b.shape)} fit neither gate_up_proj nor "
                f"down_proj with rank {rank} and {e} experts"
            )
        experts_a = a.reshape(e, rank, a.shape[1])  # [E, r, in]
        experts_b = b.reshape(b.shape[0], rank, e).permute(2, 0, 1)  # [E, out, r]
        return Update(prefix + name, experts_a, experts_b, scaling)
    if module in _QKV:
        index = _QKV.index(module)
        sizes = (config.q_size, config.kv_size, config.kv_size)
        start = sum(sizes[:index])
        expected = (sizes[index], h)
        rows: slice | None = slice(start, start + sizes[index])
        name = prefix + "attn.qkv.weight"
    elif module in _PLAIN:
        name = prefix + _PLAIN[module]
        expected = (h, config.q_size)
        rows = None
    else:
        raise AdapterError(f"{where}: adapting this module is not supported")
    if a.shape != (rank, expected[1]) or b.shape != (expected[0], rank):
        raise AdapterError(
            f"{where}: lora_A {list(a.shape)} and lora_B {list(b.shape)}, expected {[rank, expected[1]]} and "
            f"{[expected[0], rank]} (rank {rank})"
        )
    return Update(name, a, b, scaling, rows)
