"""The command line: flags and their environment variables, and the embedded demo checkpoint."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.kernels import cpu_mxfp4
from model.kernels.prepacked import plain as plain_weight
from server.main import (
    DEMO_NOTE,
    CliSettings,
    build,
    demo_checkpoint,
    effort_budgets,
    engine_async_scheduling,
    parse_args,
)

FIELDS = sorted(CliSettings.model_fields)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return "GPT_OSS_" + name.upper()


def _sample(name: str) -> tuple[str, object]:
    """A value to pass for the setting, and what it parses to."""
    annotation = str(CliSettings.model_fields[name].annotation)
    if "Literal" in annotation:
        choice = re.findall(r"'([^']+)'", annotation)[-1]
        return choice, choice
    if "int" in annotation:
        return "4321", 4321
    if "float" in annotation:
        return "2.5", 2.5
    if annotation == "<class 'bool'>":
        return "true", True
    if annotation.startswith("list"):
        return "some-value", ["some-value"]
    return "some-value", "some-value"


@pytest.mark.parametrize("name", FIELDS)
def test_every_flag_and_its_environment_variable(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for other in FIELDS:
        monkeypatch.delenv(_env(other), raising=False)
    raw, expected = _sample(name)
    assert getattr(parse_args([_flag(name), raw]), name) == expected
    monkeypatch.setenv(_env(name), raw)
    assert getattr(parse_args([]), name) == expected
    if "Literal" in str(CliSettings.model_fields[name].annotation) or raw == "4321":
        with pytest.raises(SystemExit):
            parse_args([_flag(name), "nonsense"])
        monkeypatch.setenv(_env(name), "nonsense")
        with pytest.raises(SystemExit):
            parse_args([])


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for other in FIELDS:
        monkeypatch.delenv(_env(other), raising=False)
    monkeypatch.setenv("GPT_OSS_PORT", "9001")
    assert parse_args([]).port == 9001
    assert parse_args(["--port", "9002"]).port == 9002
    monkeypatch.delenv("GPT_OSS_PORT")
    defaults = parse_args([])
    assert (defaults.model, defaults.host, defaults.port, defaults.max_model_len) == (
        None,
        "127.0.0.1",
        8000,
        8192,
    )


def test_help_documents_every_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "server", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in FIELDS:
        assert _flag(name) in out
        assert _env(name) in out


def test_demo_checkpoint_is_built_once_and_served_with_its_note(tmp_path: Path) -> None:
    first = demo_checkpoint(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert demo_checkpoint(tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    args = ["--cache-dir", str(tmp_path), "--device", "cpu", "--max-model-len", "256"]
    reasoning = [
        "--thinking-token-budget-by-effort",
        "low=0, high=4096",
        "--thinking-budget-closing",
        "Done.",
    ]
    engine, settings = build(parse_args([*args, "--ignore-unknown-fields", "true", *reasoning]))
    assert settings.ignore_unknown_fields
    assert settings.thinking_token_budget_by_effort == {"low": 0, "high": 4096}
    assert settings.thinking_budget_closing == "Done."
    assert settings.served_model_name == "gpt-oss-demo"
    assert settings.model_note == DEMO_NOTE
    assert engine.max_model_len == 256
    assert engine.token_bytes is not None
    assert engine.model.block[0].mlp.mlp1_weight.dense is None  # packed by default


@pytest.mark.parametrize("spec", ["low", "fast=1", "low=-1", "low=1,low=2", "high=lots"])
def test_a_malformed_budget_per_effort_stops_the_start(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        effort_budgets(spec)
    assert "thinking-token-budget-by-effort" in capsys.readouterr().err


def test_triton_kernels_need_cuda(tmp_path: Path) -> None:
    args = ["--cache-dir", str(tmp_path), "--device", "cpu", "--kernels", "triton"]
    with pytest.raises(SystemExit) as exit_info:
        build(parse_args(args))
    assert exit_info.value.code == 2


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_the_cpu_default_dtype_follows_the_kernel_and_is_stated(
    native: bool,
    expected: torch.dtype,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """bfloat16 where the fused kernel multiplies it natively, float32 elsewhere; the start-up log says which
    and how much memory the loaded server holds."""
    monkeypatch.setattr(cpu_mxfp4, "native_bf16", lambda: native)
    args = ["--cache-dir", str(tmp_path), "--device", "cpu", "--max-model-len", "256"]
    with caplog.at_level(logging.INFO, logger="gpt_oss_server"):
        engine, _ = build(parse_args(args))
    assert engine.model.dtype == expected
    name = str(expected).removeprefix("torch.")
    assert re.search(rf"cpu in {name} \(the default here\): \d+\.\d\d GB resident", caplog.text)
    engine, _ = build(parse_args([*args, "--dtype", "float32"]))
    assert engine.model.dtype == torch.float32


def test_cuda_graphs_need_the_triton_kernels(tmp_path: Path) -> None:
    args = ["--cache-dir", str(tmp_path), "--device", "cpu", "--cuda-graphs", "on"]
    with pytest.raises(SystemExit) as exit_info:
        build(parse_args(args))
    assert exit_info.value.code == 2


def test_async_scheduling_setting_reaches_the_engine(tmp_path: Path) -> None:
    """auto is off on a cpu; on turns the device sampler on with it."""
    assert parse_args([]).async_scheduling == "auto"
    args = ["--cache-dir", str(tmp_path), "--device", "cpu", "--max-model-len", "256"]
    engine, _ = build(parse_args([*args, "--async-scheduling", "on"]))
    assert engine.async_scheduling
    assert engine.runner.device_sampling
    engine, _ = build(parse_args(args))
    assert not engine.async_scheduling
    assert not engine.runner.device_sampling


def test_async_scheduling_auto_is_left_to_the_engine_only_with_the_triton_kernels() -> None:
    """auto: the engine decides (on where the device samples) with the Triton kernels; off with the torch
    kernels, whose steps sync inside; on and off as said."""
    assert engine_async_scheduling(parse_args(["--kernels", "triton"])) is None
    assert engine_async_scheduling(parse_args([])) is False
    assert engine_async_scheduling(parse_args(["--async-scheduling", "on"])) is True
    assert engine_async_scheduling(parse_args(["--kernels", "triton", "--async-scheduling", "off"])) is False


def test_experts_setting_reaches_the_model(tmp_path: Path) -> None:
    args = ["--cache-dir", str(tmp_path), "--device", "cpu", "--max-model-len", "256"]
    engine, _ = build(parse_args([*args, "--experts", "dequantized"]))
    mlp = engine.model.block[0].mlp
    assert mlp.mlp1_weight.dense is not None
    assert mlp.mlp1_weight.blocks.numel() == 0


def test_a_fine_tune_and_a_merged_adapter_load_from_the_command_line(tmp_path: Path) -> None:
    """--quantize and --merge-lora reach the loader: the demo checkpoint saved plain by transformers (as a
    fine-tune is) serves dense experts, or packed ones with --quantize mxfp4; a PEFT adapter changes the
    weights it targets."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssForCausalLM, Mxfp4Config

    demo = demo_checkpoint(tmp_path / "cache")
    plain = GptOssForCausalLM.from_pretrained(
        str(demo), dtype=torch.bfloat16, quantization_config=Mxfp4Config(dequantize=True)
    )
    plain.save_pretrained(str(tmp_path / "finetune"))
    adapted = get_peft_model(plain, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.1)
    adapted.save_pretrained(str(tmp_path / "adapter"))

    base = ["--device", "cpu", "--max-model-len", "256", "--cache-dir", str(tmp_path / "cache")]
    dense, _ = build(parse_args([*base, "--model", str(tmp_path / "finetune")]))
    assert dense.model.block[0].mlp.mlp1_weight.dense is not None
    packed, _ = build(parse_args([*base, "--model", str(tmp_path / "finetune"), "--quantize", "mxfp4"]))
    assert packed.model.block[0].mlp.mlp1_weight.dense is None
    assert packed.model.block[0].mlp.mlp1_weight.blocks.dtype == torch.uint8
    merged, _ = build(parse_args([*base, "--merge-lora", str(tmp_path / "adapter")]))
    unmerged, _ = build(parse_args(base))

    # bfloat16 weights on a CPU may be prepacked for oneDNN (model.kernels.prepacked): compared as plain matrices.
    first_qkv = [plain_weight(engine.model.block[0].attn.qkv.weight) for engine in (merged, unmerged)]
    assert not torch.equal(*first_qkv)


def test_sigterm_lets_a_stream_finish_then_exits_cleanly(tmp_path: Path) -> None:
    import json
    import signal
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--port",
            str(port),
            "--cache-dir",
            str(tmp_path),
            "--device",
            "cpu",
            "--max-model-len",
            "512",
            "--shutdown-grace",
            "60",
            "--log-level",
            "warning",
        ],
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {
            "model": "gpt-oss-demo",
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": True,
            "max_tokens": 40,
            "temperature": 0,
        }
        events = []
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            events.append(next(lines))
            process.send_signal(signal.SIGTERM)  # mid-stream
            events.extend(lines)
        data = [line[6:] for line in events if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        finishes = [c["choices"][0]["finish_reason"] for c in map(json.loads, data[:-1]) if c["choices"]]
        assert finishes[-1] in ("stop", "length")
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_a_kv_pool_too_small_for_the_context_stops_the_start_with_one_line(tmp_path: Path) -> None:
    args = [
        "--cache-dir",
        str(tmp_path),
        "--device",
        "cpu",
        "--max-model-len",
        "8192",
        "--kv-cache-memory",
        "0.0001",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot start:" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_busy_port_stops_the_start_before_the_model_loads(tmp_path: Path) -> None:
    import socket
    import time

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "server",
                "--port",
                str(port),
                "--cache-dir",
                str(tmp_path),
                "--device",
                "cpu",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert "Traceback" not in done.stderr
    # Refused before the demo checkpoint is even built (the import of torch is most of the time).
    assert list(tmp_path.iterdir()) == []
    assert elapsed < 60


def test_an_unreadable_checkpoint_stops_the_start_with_one_line(tmp_path: Path) -> None:
    """A failure that is not a refusal of a setting (here safetensors on a corrupt file) is one line too; the
    traceback comes with --log-level debug."""
    import shutil
    import socket

    demo = demo_checkpoint(tmp_path / "cache")
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(demo / "config.json", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "server", "--model", str(broken), "--device", "cpu", "--port", str(port)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert "cannot start:" in line
    assert "--log-level debug" in line
    assert "Traceback" not in done.stderr
    debug = subprocess.run(
        [*command, "--log-level", "debug"], capture_output=True, text=True, timeout=300, check=False
    )
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr
