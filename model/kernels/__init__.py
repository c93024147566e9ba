"""The model's compute kernels, each fast path beside its plain reference twin (compared in tests only).

* :mod:`model.kernels.attention` — store into the KV cache and attend, with sinks and a sliding window.
* :mod:`model.kernels.experts` — the MoE experts and their MXFP4 weight storage.
* :mod:`model.kernels.mxfp4` — MXFP4 (de)quantization.
* :mod:`model.kernels.prepacked` — the oneDNN prepacked linear for bf16 weights on the CPU.

:class:`Kernels` names the implementations a model runs: :meth:`Kernels.for_device` the fast paths of a
device, :data:`REFERENCE` the twins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.kernels.attention import (
    HAS_CPU_FLASH_LSE,
    Attention,
    TorchAttention,
    attention_reference,
    sdpa_sink_as_key,
    sdpa_sink_from_lse,
)
from model.kernels.experts import Experts, experts_batched, experts_grouped, experts_reference


@dataclass(frozen=True, slots=True)
class Kernels:
    """The attention and experts implementations a :class:`~model.gpt_oss.GptOss` is built with."""

    attention: Attention
    experts: Experts

    @classmethod
    def for_device(cls, device: torch.device | str) -> Kernels:
        """The fast paths for `device`. The CPU: experts grouped by expert (no padding) and the sinks from the
        fused kernel's log-sum-exp (no copy of the keys); elsewhere: experts in batched matmuls (few
        launches) and the sinks as an extra key (any fused kernel)."""
        if torch.device(device).type == "cpu":
            sdpa = sdpa_sink_from_lse if HAS_CPU_FLASH_LSE else sdpa_sink_as_key
            return cls(TorchAttention(sdpa), experts_grouped)
        return cls(TorchAttention(sdpa_sink_as_key), experts_batched)


REFERENCE = Kernels(attention_reference, experts_reference)
