"""guidellm, the load generator, as its users run it: its command line, a short synchronous run of synthetic
prompts against the server, its JSON report read back. guidellm exits 0 even when every request failed, so
the report is what the test checks: all requests succeeded, and the token counts came from the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.api.conftest import MODEL
from tests.clients.conftest import ScriptedServer, always

REQUESTS = 4
OUTPUT_TOKENS = 8
# The model's answer to every request: longer than the output budget, so each one ends at its `max_tokens`.
LONG_ANSWER = "<|channel|>final<|message|>" + " word" * 40 + "<|return|>"


def test_synchronous_run(scripted: ScriptedServer, hf_tokenizer: Path, tmp_path: Path) -> None:
    scripted.model.script = always(LONG_ANSWER)
    report = tmp_path / "benchmarks.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "guidellm",
            "run",
            f"--backend=kind=openai_http,target={scripted.base_url},model={MODEL}",
            "--profile=kind=synchronous",
            f"--constraint=kind=max_requests,count={REQUESTS}",
            f"--data=kind=synthetic_text,prompt_tokens=32,output_tokens={OUTPUT_TOKENS}",
            f"--tokenizer=kind=huggingface_auto,model={hf_tokenizer}",
            f"--output=kind=json,path={report}",
            "--disable-console-interactive",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    benchmarks = json.loads(report.read_text())["benchmarks"]
    assert len(benchmarks) == 1
    requests: dict[str, Any] = benchmarks[0]["requests"]
    assert requests["errored"] == [], done.stdout + done.stderr
    assert requests["incomplete"] == []
    assert len(requests["successful"]) == REQUESTS
    for request in requests["successful"]:
        assert request["output_metrics"]["text_tokens"] == OUTPUT_TOKENS
        assert request["prompt_tokens"] >= 32
    sent = scripted.requests("/v1/chat/completions") or scripted.requests("/v1/completions")
    assert len(sent) == REQUESTS
