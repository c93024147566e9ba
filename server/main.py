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
from pathlib import Path

import torch
import uvicorn

from harmony.encoding import load_harmony_encoding
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="gpt-oss-server", description="OpenAI-compatible server for gpt-oss models."
    )
    p.add_argument(
        "--model",
        default=env("GPT_OSS_MODEL"),
        help="a local checkpoint directory or a Hugging Face id (openai/gpt-oss-20b); "
        "default: a small random-weight demo built on first start (env GPT_OSS_MODEL)",
    )
    p.add_argument(
        "--host", default=env("GPT_OSS_HOST", "127.0.0.1"), help="address to listen on (env GPT_OSS_HOST)"
    )
    p.add_argument(
        "--port", type=int, default=int(env("GPT_OSS_PORT", "8000")), help="port (env GPT_OSS_PORT)"
    )
    p.add_argument(
        "--served-model-name",
        default=env("GPT_OSS_SERVED_MODEL_NAME"),
        help="the model id clients send (default: the model's directory name, or gpt-oss-demo)",
    )
    p.add_argument(
        "--device",
        default=env("GPT_OSS_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"),
        help="cpu or cuda (env GPT_OSS_DEVICE)",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=env("GPT_OSS_DTYPE"),
        help="activation dtype (default: bfloat16 on cuda, float32 on cpu)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=int(env("GPT_OSS_MAX_MODEL_LEN", "8192")),
        help="longest prompt plus output, in tokens (env GPT_OSS_MAX_MODEL_LEN)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=int(env("GPT_OSS_MAX_NUM_SEQS", "64")),
        help="most requests decoded together (env GPT_OSS_MAX_NUM_SEQS)",
    )
    p.add_argument(
        "--kv-cache-memory",
        type=float,
        default=None,
        help="GiB of KV cache (default: on cuda what a warm-up leaves free, on cpu 1 GiB)",
    )
    p.add_argument("--cache-dir", default=env("GPT_OSS_CACHE_DIR"), help="where the demo checkpoint is built")
    p.add_argument(
        "--api-key",
        default=env("GPT_OSS_API_KEY"),
        help="require Authorization: Bearer KEY on /v1/* (env GPT_OSS_API_KEY)",
    )
    p.add_argument(
        "--cors-origins",
        default=env("GPT_OSS_CORS_ORIGINS"),
        help="comma-separated origins allowed by CORS, or * (env GPT_OSS_CORS_ORIGINS)",
    )
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=int(env("GPT_OSS_MAX_WAITING_REQUESTS", "512")),
        help="requests queued beyond the running batch before new ones get a 429",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=float(env("GPT_OSS_SHUTDOWN_GRACE", "30")),
        help="seconds in-flight requests may take to finish after SIGTERM (env GPT_OSS_SHUTDOWN_GRACE)",
    )
    p.add_argument(
        "--log-level", default=env("GPT_OSS_LOG_LEVEL", "info"), help="debug, info, warning, error"
    )
    return p.parse_args(argv)


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
            max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, kv_cache_memory=kv_bytes
        ),
        token_bytes=encoding.decode_single_token_bytes,
    )
    settings = ServerSettings(
        served_model_name=args.served_model_name or name,
        model_note=note,
        api_key=args.api_key or None,
        max_waiting_requests=args.max_waiting_requests,
        shutdown_grace=args.shutdown_grace,
        cors_origins=[o.strip() for o in args.cors_origins.split(",")] if args.cors_origins else [],
    )
    return engine, settings


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    load_harmony_encoding()  # a missing vocabulary fails here, at start-up, not on the first request
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
