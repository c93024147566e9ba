"""LoRA adapters in PEFT's format merged at load, against transformers + peft on the same base and adapter."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GptOssForCausalLM, Mxfp4Config

from model.batch import AttentionMetadata
from model.gpt_oss import GptOss
from model.lora import AdapterError
from tests.model.test_oracles import prompt

logger = logging.getLogger(__name__)

TARGETS = {
    "attention": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "experts": {
        "target_modules": [],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    },
    "everything": {
        "target_modules": ["q_proj", "v_proj", "o_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "use_rslora": True,
    },
}


def _base(path: Path) -> GptOssForCausalLM:
    return GptOssForCausalLM.from_pretrained(
        str(path),
        dtype=torch.float32,
        attn_implementation="eager",
        quantization_config=Mxfp4Config(dequantize=True),
    ).eval()


@pytest.fixture(scope="module")
def adapters(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters made with peft on the published tiny checkpoint, their B matrices random (PEFT starts them
    at zero, which would make every adapter a no-op)."""
    out = {}
    for name, targets in TARGETS.items():
        model = get_peft_model(_base(checkpoints["hf"]), LoraConfig(r=4, lora_alpha=8, **targets))
        generator = torch.Generator().manual_seed(len(name))
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        directory = tmp_path_factory.mktemp(f"lora-{name}")
        model.save_pretrained(str(directory))
        out[name] = directory
    return out


@pytest.mark.parametrize("name", list(TARGETS))
def test_a_merged_adapter_gives_peft_s_logits(
    checkpoints: dict[str, Path], adapters: dict[str, Path], name: str
) -> None:
    peft_model = PeftModel.from_pretrained(_base(checkpoints["hf"]), str(adapters[name])).eval()
    ours = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, lora=adapters[name], progress=False)
    base = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, progress=False)
    ids = prompt(31)
    meta = AttentionMetadata.build([len(ids)])
    with torch.no_grad():
        expected = peft_model(input_ids=ids[None]).logits[0]
    got = ours(ids, meta)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-3 * scale
    # And the adapter does change the model (a no-op adapter would pass the comparison above too).
    assert (base(ids, meta) - expected).abs().max().item() > 1e-2 * scale


def test_experts_an_adapter_touches_stay_packed_with_quantize(
    checkpoints: dict[str, Path], adapters: dict[str, Path]
) -> None:
    dense = GptOss.from_checkpoint(
        checkpoints["hf"], dtype=torch.float32, lora=adapters["experts"], progress=False
    )
    packed = GptOss.from_checkpoint(
        checkpoints["hf"], dtype=torch.float32, lora=adapters["experts"], quantize=True, progress=False
    )
    assert dense.block[0].mlp.mlp1_weight.dense is not None
    assert packed.block[0].mlp.mlp1_weight.dense is None
    assert packed.block[0].mlp.mlp1_weight.blocks.dtype == torch.uint8
    ids = prompt(32)
    meta = AttentionMetadata.build([len(ids)])
    exact, rounded = dense(ids, meta), packed(ids, meta)
    drift = ((rounded - exact).norm() / exact.norm()).item()
    logger.info("LoRA merged then rounded to MXFP4: relative logit drift %.4f", drift)
    assert 0 < drift < 0.3


def test_bad_adapters_are_named(
    checkpoints: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    def broken(edit_config: dict | None = None, edit_tensors: object = None) -> Path:
        target = tmp_path / f"broken-{len(list(tmp_path.iterdir()))}"
        target.mkdir()
        config = json.loads((adapters["attention"] / "adapter_config.json").read_text())
        config.update(edit_config or {})
        (target / "adapter_config.json").write_text(json.dumps(config))
        tensors = load_file(str(adapters["attention"] / "adapter_model.safetensors"))
        if callable(edit_tensors):
            edit_tensors(tensors)
        save_file(tensors, str(target / "adapter_model.safetensors"))
        return target

    def load(path: Path) -> GptOss:
        return GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, lora=path, progress=False)

    with pytest.raises(AdapterError, match="rank 8"):
        load(broken({"r": 8}))
    with pytest.raises(AdapterError, match="use_dora"):
        load(broken({"use_dora": True}))

    def drop_a(tensors: dict) -> None:
        del tensors[next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))]

    with pytest.raises(AdapterError, match="lora_A and lora_B"):
        load(broken(edit_tensors=drop_a))

    def other_model(tensors: dict) -> None:
        tensors["base_model.model.model.layers.0.self_attn.qkv_fused.lora_A.weight"] = torch.zeros(4, 64)
        tensors["base_model.model.model.layers.0.self_attn.qkv_fused.lora_B.weight"] = torch.zeros(64, 4)

    with pytest.raises(AdapterError, match="qkv_fused: adapting this module is not supported"):
        load(broken(edit_tensors=other_model))
    with pytest.raises(AdapterError, match=r"adapter_config\.json"):
        load(tmp_path / "missing")
