"""The model's compute kernels, each fast path beside its plain reference twin (compared in tests only).

* :mod:`model.kernels.attention` — store into the KV cache and attend, with sinks and a sliding window.
* :mod:`model.kernels.experts` — the MoE experts and their MXFP4 weight storage.
* :mod:`model.kernels.cpu_mxfp4` — the CPU experts' fused MXFP4 matmul (C++, built at first use).
* :mod:`model.kernels.mxfp4` — MXFP4 (de)quantization.
* :mod:`model.kernels.prepacked` — the oneDNN prepacked linear for bf16 weights on the CPU.
* :mod:`model.kernels.triton_attention`, :mod:`model.kernels.triton_moe` — the GPU path in Triton (paged
  attention through the block tables for every step, the decode MoE on MXFP4 decoded in registers), loaded
  on demand.

:class:`Kernels` names the implementations a model runs: :meth:`Kernels.for_device` the fast paths of a
device, :meth:`Kernels.triton` the Triton path, :data:`REFERENCE` the twins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.kernels import cpu_mxfp4
from model.kernels.attention import (
    HAS_CPU_FLASH_LSE,
    Attention,
    TorchAttention,
    attention_reference,
    sdpa_sink_as_key,
    sdpa_sink_from_lse,
)
from model.kernels.experts import Experts, experts_batched, experts_fused, experts_grouped, experts_reference


@dataclass(frozen=True, slots=True)
class Kernels:
    """The attention and experts implementations a :class:`~model.gpt_oss.GptOss` is built with."""

    attention: Attention
    experts: Experts

    @classmethod
    def for_device(cls, device: torch.device | str) -> Kernels:
        """The fast paths for `device`. The CPU: experts grouped by expert (no padding), multiplied from their
        packed bytes by the fused MXFP4 kernel where it builds (else dequantized per step, with a warning:
        :func:`model.kernels.cpu_mxfp4.available`), and the sinks from the fused attention kernel's
        log-sum-exp (no copy of the keys); elsewhere: experts in batched matmuls (few launches) and the sinks
        as an extra key (any fused kernel)."""
        if torch.device(device).type == "cpu":
            sdpa = sdpa_sink_from_lse if HAS_CPU_FLASH_LSE else sdpa_sink_as_key
            return cls(TorchAttention(sdpa), experts_fused if cpu_mxfp4.available() else experts_grouped)
        return cls(TorchAttention(sdpa_sink_as_key), experts_batched)

    @classmethod
    def triton(cls) -> Kernels:
        """The Triton kernels: attention of every step (:mod:`model.kernels.triton_attention`), the MoE of
        decode steps (:mod:`model.kernels.triton_moe`), larger MoE steps through the GPU's torch path.
        Imported here, on demand: CPU inference never needs Triton."""
        from model.kernels.triton_attention import TritonAttention
        from model.kernels.triton_moe import experts_triton

        return cls(TritonAttention(TorchAttention(sdpa_sink_as_key)), experts_triton)


REFERENCE = Kernels(attention_reference, experts_reference)
