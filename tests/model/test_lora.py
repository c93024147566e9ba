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
from model.lora import AdapterError, lora_delta, lora_delta_reference, read_adapter
from tests.model.test_oracles import prompt

logger = logging.getLogger(__name__)

TARGETS = {
    "attention": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "attention_qv": {"target_modules": ["q_proj", "v_proj"], "r": 8},
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
        model = get_peft_model(_base(checkpoints["hf"]), LoraConfig(**{"r": 4, "lora_alpha": 8, **targets}))
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


def test_the_batched_lora_delta_equals_the_per_row_loop() -> None:
    generator = torch.Generator().manual_seed(5)
    slots, width, inp, out = 3, 6, 24, 40
    a = torch.randn(slots, width, inp, generator=generator)
    b = torch.randn(out, slots, width, generator=generator)
    x = torch.randn(9, inp, generator=generator)
    rows = torch.tensor([0, 1, 2, 3, 0, 3, 3, 1, 0])
    column_slot = torch.arange(1, slots + 1).repeat_interleave(width)
    got = lora_delta(x, a, b, column_slot, rows)
    expected = lora_delta_reference(x, a, b, rows)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got[[0, 4, 8]].abs().max() == 0  # slot 0: no adapter, no update


def test_per_request_adapters_in_one_batch_give_each_row_its_merged_model(
    checkpoints: dict[str, Path], adapters: dict[str, Path]
) -> None:
    """Base, and two adapters of different ranks and modules, in one forward (adapters unmerged in slots 2
    and 1): every sequence's logits are those of the model with its adapter merged."""
    served = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, progress=False)
    served.enable_lora(max_loras=2, max_rank=8)
    served.set_lora(2, read_adapter(adapters["attention"], served.config))
    served.set_lora(1, read_adapter(adapters["attention_qv"], served.config))
    references = [
        served,
        GptOss.from_checkpoint(
            checkpoints["hf"], dtype=torch.float32, lora=adapters["attention"], progress=False
        ),
        GptOss.from_checkpoint(
            checkpoints["hf"], dtype=torch.float32, lora=adapters["attention_qv"], progress=False
        ),
    ]
    ids = [prompt(40, 21), prompt(41, 13), prompt(42, 17)]
    slots = [0, 2, 1]
    meta = AttentionMetadata.build([len(i) for i in ids])
    per_token = torch.cat([torch.full((len(i),), s) for i, s in zip(ids, slots, strict=True)])
    batched = served(torch.cat(ids), meta, lora=per_token).split([len(i) for i in ids])
    for seq, reference, got in zip(ids, references, batched, strict=True):
        expected = reference(seq, AttentionMetadata.build([len(seq)]))
        scale = expected.abs().max().item()
        assert (got - expected).abs().max().item() <= 1e-4 * scale
    # The adapters do change the rows they serve.
    assert (batched[1] - served(ids[1], AttentionMetadata.build([len(ids[1])]))).abs().max() > 1e-3


def test_per_request_adapters_refuse_what_the_stacks_cannot_hold(
    checkpoints: dict[str, Path], adapters: dict[str, Path]
) -> None:
    served = GptOss.from_checkpoint(checkpoints["hf"], dtype=torch.float32, progress=False)
    served.enable_lora(max_loras=1, max_rank=4)
    with pytest.raises(AdapterError, match="targets the experts"):
        served.set_lora(1, read_adapter(adapters["experts"], served.config))
    with pytest.raises(AdapterError, match="rank 8 is above the largest served, 4"):
        served.set_lora(1, read_adapter(adapters["attention_qv"], served.config))
