"""`gpt-oss-server` / `python -m server`: load a model, build the engine, serve the API.

With no `--model`, the server builds a small demo checkpoint with random weights, in the real gpt-oss format,
deterministically into a cache folder on first start, and serves that: the first command of the README works
on a laptop CPU with no download. It says plainly (log and `/v1/models`) that the demo's weights are random.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated, Literal, NoReturn

import torch
import uvicorn
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, CliApp, NoDecode, SettingsConfigDict

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.request import LoraRefused
from harmony.encoding import VocabularyError, load_harmony_encoding
from model.config import PRESETS
from model.gpt_oss import GptOss
from model.kernels import Kernels, cpu_mxfp4
from model.lora import AdapterError, Update, read_adapter
from model.make_checkpoint import write_checkpoint
from model.weights import resolve_model
from server import logs
from server.app import create_app
from server.builtin_tools import settings_problem
from server.settings import ServerSettings
from server.transport import header_timeout_protocol

logger = logging.getLogger("gpt_oss_server")

ENV_PREFIX = "GPT_OSS_"
DEMO_PRESET = "tiny"
DEMO_SEED = 0
DEMO_NOTE = "demo checkpoint with random weights: its output is noise; pass --model for a real gpt-oss model"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt-oss-server"


def demo_checkpoint(cache_dir: Path) -> Path:
    """The demo checkpoint, written once (atomically, so an interrupted first start is redone)."""
    target = cache_dir / f"demo-{DEMO_PRESET}-seed{DEMO_SEED}"
    if (target / "config.json").is_file():
        return target
    logger.info("building the demo checkpoint (random weights) in %s", target)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    write_checkpoint(PRESETS[DEMO_PRESET], partial, layout="hf", seed=DEMO_SEED)
    partial.rename(target)
    return target


class CliSettings(BaseSettings):
    """Every setting of the command line. Each flag (`--max-model-len`) also reads its environment variable
    (`GPT_OSS_MAX_MODEL_LEN`); a flag wins over the variable, which wins over the default."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        cli_prog_name="gpt-oss-server",
        cli_kebab_case=True,
        cli_implicit_flags=False,
        cli_exit_on_error=True,
    )

    model: str | None = Field(
        None,
        description="a local checkpoint directory or a Hugging Face id (openai/gpt-oss-20b); default: a "
        "small random-weight demo built on first start",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    served_model_name: str | None = Field(
        None, description="the model id clients send (default: the model directory's name, or gpt-oss-demo)"
    )
    device: Literal["cpu", "cuda"] | None = Field(
        None, description="cpu or cuda (default: cuda when available)"
    )
    dtype: Literal["bfloat16", "float32"] | None = Field(
        None,
        description="activation dtype (default: bfloat16 on cuda, and on a cpu whose fused MXFP4 kernel "
        "multiplies bfloat16 natively (AVX512-BF16); float32 on other cpus)",
    )
    experts: Literal["packed", "dequantized"] = Field(
        "packed",
        description="expert weights kept as MXFP4 and dequantized when used (least memory), or dequantized "
        "once at load (faster on a CPU; about 4x the experts' memory in bfloat16, 8x in float32)",
    )
    quantize: Literal["none", "mxfp4"] = Field(
        "none",
        description="a fine-tune's plain expert weights (and experts a merged LoRA adapter changes): kept as "
        "they are, or rounded to MXFP4 at load, so a fine-tune takes the packed model's memory",
    )
    merge_lora: str | None = Field(
        None, description="a LoRA adapter directory in PEFT's format, merged into the weights at load"
    )
    # NoDecode: the variable is comma-separated like the flag, not the JSON list pydantic-settings expects.
    lora: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="LoRA adapters served per request, NAME=PATH each (a PEFT directory; repeat the flag or "
        "separate them by commas): a request whose model is NAME runs with it, batched with the base model",
    )
    max_loras: int | None = Field(
        None,
        ge=0,
        description="most LoRA adapters loaded at once, those of --lora and those loaded at run time "
        "(POST /v1/load_lora_adapter) (default: the number of --lora adapters)",
    )
    max_lora_rank: int | None = Field(
        None,
        ge=1,
        description="highest LoRA rank served per request (default: 16, or the --lora adapters' highest)",
    )
    lora_experts: bool = Field(
        False,
        description="keep room for per-request adapters on the experts (PEFT target_parameters "
        "gate_up_proj / down_proj) as well as on attention: about fifteen times the attention adapters' "
        "memory (on by default when a --lora adapter targets the experts)",
    )
    kernels: Literal["torch", "triton"] = Field(
        "torch",
        description="on cuda, steps through torch ops, or through the Triton kernels (paged attention of "
        "every step read through the block tables, the decode MoE on MXFP4 decoded in registers)",
    )
    cuda_graphs: Literal["on", "off"] = Field(
        "off",
        description="on cuda with --kernels triton, decode steps replayed as one CUDA graph per batch size "
        "(padded to a bucket) from persistent input buffers: far fewer launches per step",
    )
    async_scheduling: Literal["auto", "on", "off"] = Field(
        "auto",
        description="launch each step before the host has handled the previous step's tokens (stops are "
        "then seen a step late and the extra token dropped), so the GPU does not wait on the host; a "
        "request with a grammar, a penalty or prompt logprobs runs in the plain order (auto: on with "
        "--kernels triton, whose steps make no host sync; the torch kernels' steps sync inside, so the "
        "overlap buys little there; on: samples on the device on a cpu too)",
    )
    max_model_len: int = Field(8192, ge=2, description="longest prompt plus output, in tokens")
    max_num_seqs: int = Field(64, ge=1, description="most requests decoded together")
    max_num_batched_tokens: int = Field(2048, ge=1, description="most tokens computed in one engine step")
    kv_cache_memory: float | None = Field(
        None, gt=0, description="GiB of KV cache (default: on cuda what a warm-up leaves free, on cpu 1 GiB)"
    )
    cache_dir: str | None = Field(
        None, description="where the demo checkpoint is built (default: ~/.cache/gpt-oss-server)"
    )
    api_key: str | None = Field(
        None,
        description="require Authorization: Bearer KEY on every route but /health (and /metrics, if public)",
    )
    metrics_access: Literal["public", "protected"] = Field(
        "public", description="whether /metrics needs the API key too (public: Prometheus scrapes it keyless)"
    )
    cors_origins: str | None = Field(None, description="comma-separated origins allowed by CORS, or *")
    chat_page: Literal["on", "off"] = Field(
        "on", description="the chat page at / (off: an API-only server, / answers 404)"
    )
    max_waiting_requests: int = Field(
        512, ge=0, description="requests queued beyond the running batch before a 429"
    )
    max_in_flight_per_client: int | None = Field(
        None,
        ge=1,
        description="requests one client may have in flight (running or queued) before its 429s, so that one "
        "client cannot take every slot (default: half of max-num-seqs + max-waiting-requests)",
    )
    client_id_header: str | None = Field(
        None,
        description="the header that names a request's client for its share (behind a proxy, e.g. "
        "X-Forwarded-For); without it, the peer's address",
    )
    max_request_bytes: int = Field(16 << 20, ge=1, description="largest request body accepted")
    max_prompt_chars: int = Field(
        1 << 20,
        ge=1,
        description="most characters of text in one request's prompt (refused before tokenizing)",
    )
    render_workers: int = Field(4, ge=1, description="threads that render and tokenize requests")
    thinking_token_budget: int | None = Field(
        None,
        ge=0,
        description="the most tokens a turn's reasoning may take when a request names no "
        "thinking_token_budget; past it the answer is forced to begin (0: no reasoning; default: no bound)",
    )
    thinking_token_budget_by_effort: str | None = Field(
        None,
        description="the same per reasoning effort, EFFORT=N separated by commas (low=256,medium=1024,"
        "high=4096): a request of an effort named here (its own, or medium) takes that budget, the others "
        "--thinking-token-budget's",
    )
    thinking_budget_closing: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="a short sentence written into the reasoning, on a line of its own, when it runs to its "
        "budget, before the answer begins (default: none, the reasoning is closed as it stands)",
    )
    grammar_compile_timeout: float = Field(
        2.0, gt=0, description="seconds a request's grammar (a schema, regex or Lark) may take to compile"
    )
    request_read_timeout: float = Field(
        30.0, gt=0, description="seconds a client may take to send a request's headers, and again its body"
    )
    max_sequences_per_request: int = Field(
        256, ge=1, description="most sequences (prompts x n) in one request; more is a 400"
    )
    max_unread_outputs: int = Field(
        4096,
        ge=1,
        description="outputs (about one per token) a client may leave unread before its request is aborted",
    )
    shutdown_grace: float = Field(
        30.0,
        ge=0,
        description="seconds streams may run on after SIGTERM before each ends with an error event",
    )
    ignore_unknown_fields: bool = Field(
        False,
        description="accept request fields the server does not know, log them and name them in the "
        "x-ignored-fields response header (default: a 400 naming them)",
    )
    python_sandbox: Literal["bwrap", "off"] = Field(
        "bwrap",
        description="the Responses code_interpreter tool: on by default where bubblewrap runs (probed at "
        "start; a request still has to ask for the tool), model code in a sandbox with no network, uid "
        "nobody, a size-capped /mnt/data; off: the tool is refused",
    )
    python_timeout: float = Field(
        30.0, gt=0, description="seconds one python cell may run (the model is told)"
    )
    python_memory_mb: int = Field(1024, ge=64, description="memory of one python session, in MiB")
    python_max_sessions: int = Field(
        32, ge=1, description="python sessions (containers) kept at once; the least recently used is closed"
    )
    python_idle_seconds: float = Field(1200.0, gt=0, description="seconds an unused python session is kept")
    browser_backend: Literal["local", "searxng", "exa", "brave", "you"] | None = Field(
        None,
        description="the Responses web_search tool's backend: local (a directory of .html/.md/.txt files, "
        "offline), searxng (a SearXNG instance), or a search API with its key from the environment: exa "
        "(EXA_API_KEY), brave (BRAVE_API_KEY), you (You.com, YDC_API_KEY); pages are fetched behind an SSRF "
        "guard; default: refused",
    )
    browser_corpus_dir: str | None = Field(None, description="the local browser backend's directory")
    searxng_url: str | None = Field(None, description="the SearXNG instance's base URL (searxng backend)")
    max_builtin_tool_calls: int = Field(
        20, ge=1, description="built-in tool calls one response may run before it ends as incomplete"
    )
    mcp_allow: str | None = Field(
        None,
        description="comma-separated networks (CIDR) whose MCP servers Responses mcp tools may reach, on any "
        "port (e.g. 10.0.0.0/8 for an intranet server); default: public addresses only, ports 80 and 443",
    )
    mcp_timeout: float = Field(30.0, gt=0, description="seconds one MCP tool listing or call may take")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="how much to log")

    @field_validator("lora", mode="before")
    @classmethod
    def _split_adapters(cls, value: object) -> object:
        return [part for part in value.split(",") if part] if isinstance(value, str) else value


# The help names each setting's variable too.
for _name, _field in CliSettings.model_fields.items():
    _field.description = f"{_field.description} (env {ENV_PREFIX}{_name.upper()})"
CliSettings.model_rebuild(force=True)


def parse_args(argv: list[str] | None = None) -> CliSettings:
    """The settings from `argv` (default: the process's arguments) and the environment; exits with a message
    on a bad value."""
    try:
        args = CliApp.run(CliSettings, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        sys.stderr.write(f"gpt-oss-server: invalid settings: {problems}\n")
        raise SystemExit(2) from error
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def check_port(host: str, port: int) -> None:
    """Bind `host:port` once and let it go: an `OSError` (the port is taken, the address is not this
    machine's) says now what uvicorn would only find after the model has loaded. SO_REUSEADDR as uvicorn
    binds, so a port in TIME_WAIT after a restart passes."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)


def _invalid(problem: str) -> NoReturn:
    sys.stderr.write(f"gpt-oss-server: invalid settings: {problem}\n")
    raise SystemExit(2)


def engine_async_scheduling(args: CliSettings) -> bool | None:
    """The engine's `async_scheduling` for --async-scheduling: auto leaves it to the engine (on where the
    device samples, CUDA) with the Triton kernels, and off with the torch kernels, whose MoE reads its counts
    back inside every step: the host would wait there anyway."""
    if args.async_scheduling == "auto":
        return None if args.kernels == "triton" else False
    return args.async_scheduling == "on"


def effort_budgets(spec: str | None) -> dict[str, int]:
    """--thinking-token-budget-by-effort's EFFORT=N list as a mapping; a malformed one stops the start."""
    budgets: dict[str, int] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        effort, _, number = (part.strip() for part in item.partition("="))
        if effort not in ("low", "medium", "high") or not (number.isascii() and number.isdigit()):
            _invalid(
                f"thinking-token-budget-by-effort: {item.strip()!r} is not EFFORT=N with EFFORT low, "
                "medium or high and N a whole number"
            )
        if effort in budgets:
            _invalid(f"thinking-token-budget-by-effort: {effort} is given twice")
        budgets[effort] = int(number)
    return budgets


def read_adapters(specs: list[str], model: GptOss) -> list[tuple[str, str, list[Update]]]:
    """The --lora adapters (`NAME=PATH` each), read and checked against the model: a bad one stops."""
    adapters = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            _invalid(f"lora: {spec!r} is not NAME=PATH")
        try:
            adapters.append((name, path, read_adapter(path, model.config)))
        except AdapterError as error:
            _invalid(f"lora: {name}: {error}")
    return adapters


def default_dtype(device: str) -> torch.dtype:
    """bfloat16 on CUDA. On a CPU, bfloat16 where the fused MXFP4 kernel multiplies it natively: there it
    beat float32 at decode and prefill, the experts and the rest of the step (half the bytes per weight;
    benchmarks/README.md, cpu_bench.py). Elsewhere float32, the kernel's native input there (bfloat16 would
    be converted for every expert matmul)."""
    if device == "cuda" or cpu_mxfp4.native_bf16():
        return torch.bfloat16
    return torch.float32


def resident_gb() -> float:
    """This process's resident memory now, in GB (VmRSS; 0 where /proc is not there)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return 0.0
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def build(args: CliSettings) -> tuple[EngineCore, ServerSettings]:
    if args.kernels == "triton" and args.device != "cuda":
        _invalid("kernels: 'triton' needs --device cuda")
    if args.cuda_graphs == "on" and args.kernels != "triton":
        _invalid("cuda_graphs: 'on' needs --kernels triton (and --device cuda)")
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    note = None
    if args.model is None:
        path, name, note = demo_checkpoint(cache_dir), "gpt-oss-demo", DEMO_NOTE
        logger.warning("no --model given: serving the %s", DEMO_NOTE)
    else:
        path = resolve_model(args.model)
        name = args.model.rstrip("/").split("/")[-1]
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(args.device)
    model = GptOss.from_checkpoint(
        path,
        device=args.device,
        dtype=dtype,
        expert_mode=args.experts,
        kernels=Kernels.triton() if args.kernels == "triton" else None,
        quantize=args.quantize == "mxfp4",
        lora=args.merge_lora,
    )
    adapters = read_adapters(args.lora, model)
    ranks = [u.rank for _, _, updates in adapters for u in updates]
    on_experts = any(u.on_experts for _, _, updates in adapters for u in updates)
    encoding = load_harmony_encoding()
    kv_bytes = None if args.kv_cache_memory is None else int(args.kv_cache_memory * 2**30)
    engine = EngineCore(
        model,
        EngineConfig(
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_memory=kv_bytes,
            max_loras=len(adapters) if args.max_loras is None else args.max_loras,
            max_lora_rank=args.max_lora_rank or max([16, *ranks]),
            lora_experts=args.lora_experts or on_experts,
            cuda_graphs=args.cuda_graphs == "on",
            async_scheduling=engine_async_scheduling(args),
        ),
        token_bytes=encoding.decode_single_token_bytes,
    )
    for adapter, adapter_path, updates in adapters:
        try:
            engine.load_lora(adapter, updates, adapter_path)
        except (AdapterError, LoraRefused) as error:
            _invalid(f"lora: {adapter}: {error}")
    logger.info(
        "%s in %s%s: %.2f GB resident with the weights and the KV cache",
        args.device,
        str(dtype).removeprefix("torch."),
        "" if args.dtype else " (the default here)",
        resident_gb(),
    )
    settings = ServerSettings(
        served_model_name=args.served_model_name or name,
        model_note=note,
        api_key=args.api_key or None,
        metrics_access=args.metrics_access,
        max_waiting_requests=args.max_waiting_requests,
        max_in_flight_per_client=args.max_in_flight_per_client,
        client_id_header=args.client_id_header,
        max_request_bytes=args.max_request_bytes,
        max_prompt_chars=args.max_prompt_chars,
        render_workers=args.render_workers,
        thinking_token_budget=args.thinking_token_budget,
        thinking_token_budget_by_effort=effort_budgets(args.thinking_token_budget_by_effort),
        thinking_budget_closing=args.thinking_budget_closing,
        grammar_compile_timeout=args.grammar_compile_timeout,
        request_read_timeout=args.request_read_timeout,
        max_sequences_per_request=args.max_sequences_per_request,
        max_unread_outputs=args.max_unread_outputs,
        shutdown_grace=args.shutdown_grace,
        cors_origins=[o.strip() for o in args.cors_origins.split(",")] if args.cors_origins else [],
        chat_page=args.chat_page == "on",
        ignore_unknown_fields=args.ignore_unknown_fields,
        python_sandbox=args.python_sandbox,
        python_timeout=args.python_timeout,
        python_memory_mb=args.python_memory_mb,
        python_max_sessions=args.python_max_sessions,
        python_idle_seconds=args.python_idle_seconds,
        browser_backend=args.browser_backend,
        browser_corpus_dir=args.browser_corpus_dir,
        searxng_url=args.searxng_url,
        max_builtin_tool_calls=args.max_builtin_tool_calls,
        mcp_allow=[n.strip() for n in args.mcp_allow.split(",") if n.strip()] if args.mcp_allow else [],
        mcp_timeout=args.mcp_timeout,
    )
    if settings.served_model_name in engine.loras:
        _invalid(f"lora: {settings.served_model_name!r} is the base model's name")
    problem = settings_problem(settings)
    if problem is not None:
        raise ValueError(problem)
    return engine, settings


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logs.configure(args.log_level)
    try:
        load_harmony_encoding()  # a missing vocabulary fails here, at start-up, not on the first request
    except VocabularyError as error:
        logger.error("%s", error)
        raise SystemExit(2) from error
    try:
        # Before the model loads (minutes for a large one): a busy port fails now, not after the loading.
        check_port(args.host, args.port)
    except OSError as error:
        logger.error(
            "cannot start: cannot listen on %s:%d: %s (is another server running there? pick another --port)",
            args.host,
            args.port,
            error.strerror or error,
        )
        raise SystemExit(2) from error
    try:
        engine, settings = build(args)
    except ValueError as error:
        # A checkpoint, config, adapter or KV size the server cannot serve: one line saying what to change
        # (every such refusal is a ValueError), the traceback only when debugging.
        logger.error("cannot start: %s", error, exc_info=logger.isEnabledFor(logging.DEBUG))
        raise SystemExit(2) from error
    except Exception as error:
        # Anything else at start-up (a file that cannot be read, the GPU out of memory): still one line, with
        # the error's kind, and the traceback only when debugging.
        debug = logger.isEnabledFor(logging.DEBUG)
        logger.error(
            "cannot start: %s: %s%s",
            type(error).__name__,
            str(error) or "(no message)",
            "" if debug else " (--log-level debug shows where)",
            exc_info=debug,
        )
        raise SystemExit(2) from error
    app = create_app(engine, settings)
    # The python tool is on by default wherever bubblewrap runs here: find out now, not at the first request.
    app.state.server.ready().responses.builtin.probe_at_start()
    logger.info("serving %s on http://%s:%d/v1", settings.served_model_name, args.host, args.port)
    # uvicorn restores the handlers it found and re-raises the signal once it has shut down; with this one in
    # place a SIGTERM ends the process with status 0, not as killed by the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: logger.info("stopped on SIGTERM"))
    # On SIGTERM uvicorn stops accepting, lets in-flight requests (streams too) finish for the grace period,
    # then cancels them (each cancel aborts its request in the engine) and runs the app's shutdown.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=args.shutdown_grace + 5,  # streams get the grace period, then cleanup
        # uvicorn times only idle keep-alive connections; this also times each request's headers.
        http=header_timeout_protocol(args.request_read_timeout),
    )


if __name__ == "__main__":
    main()
