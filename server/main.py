"""`gpt-oss-server` / `python -m server`: load a model, build the engine, serve the API.

With no `--model`, the server builds a small demo checkpoint with random weights, in the real gpt-oss format,
deterministically into a cache folder on first start, and serves that: the first command of the README works
on a laptop CPU with no download. It says plainly (log and `/v1/models`) that the demo's weights are random.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import uvicorn

from harmony.encoding import VocabularyError, load_harmony_encoding
from model.config import PRESETS
from model.engine import Engine, EngineConfig
from model.gpt_oss import GptOss
from model.make_checkpoint import write_checkpoint
from model.weights import resolve_model
from server.app import create_app
from server.settings import ServerSettings

logger = logging.getLogger("gpt_oss_server")

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


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its flag, the environment variable that sets it when the flag is absent, and its help."""

    flag: str
    type: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def env(self) -> str:
        return "GPT_OSS_" + self.flag.removeprefix("--").replace("-", "_").upper()


OPTIONS = (
    Option(
        "--model",
        str,
        None,
        "a local checkpoint directory or a Hugging Face id (openai/gpt-oss-20b); "
        "default: a small random-weight demo built on first start",
    ),
    Option("--host", str, "127.0.0.1", "address to listen on"),
    Option("--port", int, 8000, "port to listen on"),
    Option(
        "--served-model-name",
        str,
        None,
        "the model id clients send (default: the model directory's name, or gpt-oss-demo)",
    ),
    Option("--device", str, None, "cpu or cuda (default: cuda when available)", ("cpu", "cuda")),
    Option(
        "--dtype",
        str,
        None,
        "activation dtype (default: bfloat16 on cuda, float32 on cpu)",
        ("bfloat16", "float32"),
    ),
    Option("--max-model-len", int, 8192, "longest prompt plus output, in tokens"),
    Option("--max-num-seqs", int, 64, "most requests decoded together"),
    Option("--max-num-batched-tokens", int, 2048, "most tokens computed in one engine step"),
    Option(
        "--kv-cache-memory",
        float,
        None,
        "GiB of KV cache (default: on cuda what a warm-up leaves free, on cpu 1 GiB)",
    ),
    Option("--cache-dir", str, None, "where the demo checkpoint is built (default: ~/.cache/gpt-oss-server)"),
    Option("--api-key", str, None, "require Authorization: Bearer KEY on /v1/*"),
    Option("--cors-origins", str, None, "comma-separated origins allowed by CORS, or *"),
    Option("--max-waiting-requests", int, 512, "requests queued beyond the running batch before a 429"),
    Option("--max-request-bytes", int, 16 << 20, "largest request body accepted"),
    Option("--shutdown-grace", float, 30.0, "seconds in-flight streams may take to finish after SIGTERM"),
    Option(
        "--log-level", str, "info", "debug, info, warning or error", ("debug", "info", "warning", "error")
    ),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags win over their GPT_OSS_* environment variables, which win over the defaults."""
    parser = argparse.ArgumentParser(
        prog="gpt-oss-server", description="OpenAI-compatible server for gpt-oss models."
    )
    for option in OPTIONS:
        raw = os.environ.get(option.env)
        default = option.default if raw is None else option.type(raw)
        parser.add_argument(
            option.flag,
            type=option.type,
            default=default,
            choices=option.choices,
            help=f"{option.help} (env {option.env})",
        )
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for option in OPTIONS:  # a value from the environment is checked like a flag's
        value = getattr(args, option.flag.removeprefix("--").replace("-", "_"))
        if option.choices and value is not None and value not in option.choices:
            parser.error(f"{option.env}={value!r} is not one of {', '.join(option.choices)}")
    return args


def build(args: argparse.Namespace) -> tuple[Engine, ServerSettings]:
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    note = None
    if args.model is None:
        path, name, note = demo_checkpoint(cache_dir), "gpt-oss-demo", DEMO_NOTE
        logger.warning("no --model given: serving the %s", DEMO_NOTE)
    else:
        path = resolve_model(args.model)
        name = args.model.rstrip("/").split("/")[-1]
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    )
    model = GptOss.from_checkpoint(path, device=args.device, dtype=dtype)
    encoding = load_harmony_encoding()
    kv_bytes = None if args.kv_cache_memory is None else int(args.kv_cache_memory * 2**30)
    engine = Engine(
        model,
        EngineConfig(
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_memory=kv_bytes,
        ),
        token_bytes=encoding.decode_single_token_bytes,
    )
    settings = ServerSettings(
        served_model_name=args.served_model_name or name,
        model_note=note,
        api_key=args.api_key or None,
        max_waiting_requests=args.max_waiting_requests,
        max_request_bytes=args.max_request_bytes,
        shutdown_grace=args.shutdown_grace,
        cors_origins=[o.strip() for o in args.cors_origins.split(",")] if args.cors_origins else [],
    )
    return engine, settings


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        load_harmony_encoding()  # a missing vocabulary fails here, at start-up, not on the first request
    except VocabularyError as error:
        logger.error("%s", error)
        raise SystemExit(2) from error
    engine, settings = build(args)
    app = create_app(engine, settings)
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
    )


if __name__ == "__main__":
    main()
