"""CPU benchmark: this server's CPU path against llama.cpp on the same 20b-shaped checkpoint, in one run on
the same machine and threads; and the fused MXFP4 kernel (model/kernels/cpu_mxfp4.py) against
dequantize-per-step.

    python benchmarks/cpu_bench.py [--layers 4] [--prompt 128] [--decode-steps 16] [--threads N]
                                   [--impls fused,unfused] [--dtypes bfloat16,float32] [--no-llama-cpp]
                                   [--ppl-chunks 2] [--ppl-ctx 128] [--profile] [--rounds 1]
    python benchmarks/cpu_bench.py [--kernels] [--matrix-tokens 64,256,512,1024] [--repeats 7]

The default (quick) mode writes once, under .cache/model_bench/, the random 20b-shaped checkpoint slice that
benchmarks/model_bench.py uses (hidden 2880, 32 experts, top-4, the real vocabulary, `--layers` layers), then
runs each implementation and dtype in its own process (so peak RSS is that run's alone) and prints, per run:
prefill tokens/s for one `--prompt`-token sequence, decode tokens/s at batch 1 after that prompt (the best
step and the median of `--decode-steps`; and the median CPU time of a step, which other load on a shared
machine does not inflate), peak RSS (and in the JSON line how much of it is on huge pages), and the
perplexity of README.md's first `--ppl-chunks` chunks of `--ppl-ctx` tokens (scored as llama-perplexity
scores them: the second half of each chunk).
`--profile` adds, per run, the top operators of one more decode step under torch.profiler. `--impls` names the
runs: fused (the CPU's default path), unfused (the same kernels with each block's small operators and the
attention in torch, no fused decode layer: its baseline) and grouped (experts dequantized per step).

`--rounds N` runs the whole sequence (every run, then llama.cpp) N times in turn and reports each figure's
median over the rounds, with the decode ratio of every round: the machine's memory speed drifts by a fifth
or more over minutes, and alternating spreads that drift over both sides (the two models do not fit in
memory together, so each round loads them again).

llama.cpp (unless `--no-llama-cpp`) is built once from the `llama-cpp-python` source package (it vendors
llama.cpp; `pip download`, then cmake and ninja: llama-bench and llama-perplexity, for this CPU) and cached
under ~/.cache/gpt-oss-server/llama-cpp/, with the checkpoint converted by llama.cpp's own
convert_hf_to_gguf.py (its `gguf` package from the same source; the tokenizer file it reads written from this
project's vocabulary; MXFP4 experts, bf16 the rest). llama-bench then measures prefill (`-p`) and decode
after the prompt (`-n` at depth `-d`), weights read into memory (no mmap, so RSS counts them), and its CPU
time per decoded token: the decode run's CPU time less that of the same run with one token, per token of the
difference (both runs repeat 3 times). CPU times compare best at `--threads 1` (they add up the threads,
and llama.cpp's spin at barriers). llama-perplexity scores the same text. These tools are benchmark-only:
nothing in the server needs them.

`--kernels` times one MoE layer's experts alone (no checkpoint): batch 1 (one token, 4 experts) and a
`--prompt`-token prefill, each implementation and dtype, the minimum of `--repeats` runs (the machine may be
shared: other load only ever adds time); at one token also the fused kernel called once per expert and matrix
(the grouped path), against the fused path's one call for the token's experts. `--matrix-tokens` adds one
expert's first matrix (5760 x 2880) at those token counts, dequantized then multiplied (oneDNN) against fused:
where the two cross is the fused path's token limit per expert (`FUSED_MAX_ROWS` in model/kernels/experts.py).
At one token the table also has the time to read the routed experts' bytes once (blocks and scales of both
matrices, summed by torch: a plain pass over memory), the floor for any kernel on them, the same minimum of
`--repeats`.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from model_bench import checkpoint_dir, proc_status  # noqa: E402

from harmony.encoding import load_harmony_encoding, write_vocabulary  # noqa: E402
from model.config import PRESETS  # noqa: E402
from model.gpt_oss import AttentionMetadata, ContiguousKVCache, GptOss, MLPBlock  # noqa: E402
from model.kernels import Kernels, cpu_fused, cpu_mxfp4, prepacked  # noqa: E402
from model.kernels.attention import TorchAttention, sdpa_sink_from_lse  # noqa: E402
from model.kernels.experts import Experts, _fused_linear, experts_fused, experts_grouped  # noqa: E402
from model.kernels.mxfp4 import dequantize  # noqa: E402

logger = logging.getLogger("cpu_bench")

IMPLS: dict[str, Experts] = {"grouped": experts_grouped, "fused": experts_fused}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def kernels_for(impl: str) -> Kernels:
    """The CPU's fast paths with the experts implementation `impl`; "unfused" is "fused" with each block's
    small operators and the attention in torch (no fused decode layer: model/kernels/cpu_fused.py), the
    baseline the fused layer is measured against."""
    if impl in ("fused", "unfused") and not cpu_mxfp4.available():
        raise SystemExit("the fused kernel did not build here (see the warning above)")
    if impl == "unfused":
        return Kernels(TorchAttention(sdpa_sink_from_lse), experts_fused)
    default = Kernels.for_device("cpu")
    return Kernels(default.attention, IMPLS[impl], default.fused)


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def read_experts(mlp: MLPBlock, indices: torch.Tensor) -> None:
    """One plain pass over the routed experts' bytes (both matrices' blocks and scales): a torch sum of each
    as int64."""
    for weight in (mlp.mlp1_weight, mlp.mlp2_weight):
        for expert in indices.flatten().tolist():
            for packed in (weight.blocks[expert], weight.scales[expert]):
                packed.reshape(-1).view(torch.int64).sum()


def bench_kernels(args: argparse.Namespace) -> None:
    """One 20b-shaped MoE layer's experts, random MXFP4 weights of trained-like scales, random routing."""
    config = PRESETS["20b"]
    g = torch.Generator().manual_seed(0)
    mlp = MLPBlock(config, experts_grouped)
    for weight in (mlp.mlp1_weight, mlp.mlp2_weight):
        weight.blocks.copy_(torch.randint(0, 256, weight.blocks.shape, generator=g, dtype=torch.uint8))
        weight.scales.copy_(torch.randint(118, 128, weight.scales.shape, generator=g, dtype=torch.uint8))
    cpu_mxfp4.available()
    # The same weights in row pairs, as a bfloat16 model lays them out at load where the kernel multiplies
    # bfloat16 natively ("pairs"); "fused" reads them in the checkpoint's layout.
    paired = MLPBlock(config, experts_fused)
    for weight, source in ((paired.mlp1_weight, mlp.mlp1_weight), (paired.mlp2_weight, mlp.mlp2_weight)):
        weight.blocks.copy_(source.blocks)  # into the block's own buffer: no second copy of the layer
        weight.scales = source.scales
        weight.pair_rows()
    # At one token the fused path takes all k experts, their SwiGLU and sum in one call; "per expert" is the
    # same kernel called once per expert and matrix through the grouped path.
    per_expert = functools.partial(experts_grouped, linear=_fused_linear)
    head = f"{'experts of one 20b layer':34}{'dequantize (ms)':>16}{'per expert (ms)':>16}{'fused (ms)':>12}"
    lines = [f"{head}{'speed-up':>10}{'read (ms)':>11}{'pairs (ms)':>12}"]
    for dtype_name, dtype in DTYPES.items():
        mlp.mlp1_bias.data = torch.randn(mlp.mlp1_bias.shape, generator=g).to(dtype) * 0.1
        mlp.mlp2_bias.data = torch.randn(mlp.mlp2_bias.shape, generator=g).to(dtype) * 0.1
        paired.mlp1_bias.data, paired.mlp2_bias.data = mlp.mlp1_bias.data, mlp.mlp2_bias.data
        for tokens in (1, args.prompt):
            t = torch.randn(tokens, config.hidden_size, generator=g).to(dtype)
            logits = torch.randn(tokens, config.num_experts, generator=g)
            top = torch.topk(logits, config.experts_per_token, dim=-1)
            indices, weights = top.indices, torch.softmax(top.values, -1).to(dtype)
            ms = {
                name: 1e3 * best(lambda f=fn, a=(mlp, t, indices, weights): f(*a), args.repeats)
                for name, fn in IMPLS.items()
            }
            one = read = pairs = "-"
            if tokens == 1:
                one = f"{1e3 * best(lambda a=(mlp, t, indices, weights): per_expert(*a), args.repeats):.2f}"
                read = f"{1e3 * best(lambda i=indices: read_experts(mlp, i), args.repeats):.2f}"
            if dtype == torch.bfloat16 and cpu_mxfp4.native_bf16():
                pairs_s = best(lambda a=(paired, t, indices, weights): experts_fused(*a), args.repeats)
                pairs = f"{1e3 * pairs_s:.2f}"
            label = f"{dtype_name}, {tokens} token{'s' if tokens > 1 else ''}"
            speed_up = ms["grouped"] / ms["fused"]
            lines.append(
                f"{label:34}{ms['grouped']:16.1f}{one:>16}{ms['fused']:12.2f}{speed_up:9.1f}x{read:>11}{pairs:>12}"
            )
    logger.info("threads %d, min of %d\n%s", torch.get_num_threads(), args.repeats, "\n".join(lines))


def bench_matrix(args: argparse.Namespace) -> None:
    """One expert's first matrix (5760 x 2880, random MXFP4) at each of `--matrix-tokens` token counts."""
    g = torch.Generator().manual_seed(0)
    rows, cols = 2 * PRESETS["20b"].intermediate_size, PRESETS["20b"].hidden_size
    blocks = torch.randint(0, 256, (rows, cols // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 128, (rows, cols // 32), generator=g, dtype=torch.uint8)
    cpu_mxfp4.available()
    lines = [f"{'one expert matrix 5760 x 2880':34}{'dequantize (ms)':>16}{'fused (ms)':>12}"]
    for dtype_name, dtype in DTYPES.items():
        bias = torch.randn(rows, generator=g).to(dtype)
        for tokens in map(int, args.matrix_tokens.split(",")):
            x = torch.randn(tokens, cols, generator=g).to(dtype)
            old = best(
                lambda x=x, d=dtype, b=bias: prepacked.linear(x, dequantize(blocks, scales, d), b),
                args.repeats,
            )
            new = best(lambda x=x, b=bias: cpu_mxfp4.mxfp4_linear(x, blocks, scales, b), args.repeats)
            lines.append(f"{f'{dtype_name}, {tokens} tokens':34}{1e3 * old:16.1f}{1e3 * new:12.1f}")
    logger.info("threads %d, min of %d\n%s", torch.get_num_threads(), args.repeats, "\n".join(lines))


LLAMA_CACHE = Path.home() / ".cache" / "gpt-oss-server" / "llama-cpp"
LLAMA_TOOLS = ("llama-bench", "llama-perplexity")
PPL_TEXT = ROOT / "README.md"


def llama_cpp_source() -> Path:
    """llama.cpp's source as vendored by the newest `llama-cpp-python` source package, downloaded and unpacked
    once."""
    LLAMA_CACHE.mkdir(parents=True, exist_ok=True)
    archives = sorted(LLAMA_CACHE.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        logger.info("downloading the llama-cpp-python source package")
        download = ["download", "--no-binary", ":all:", "--no-deps", "-d", str(LLAMA_CACHE)]
        subprocess.run([sys.executable, "-m", "pip", *download, "llama-cpp-python"], check=True)
        archives = sorted(LLAMA_CACHE.glob("llama_cpp_python-*.tar.gz"))
    archive = archives[-1]
    unpacked = LLAMA_CACHE / archive.name.removesuffix(".tar.gz")
    if not unpacked.is_dir():
        with tarfile.open(archive) as tar:
            tar.extractall(LLAMA_CACHE, filter="data")
    return unpacked / "vendor" / "llama.cpp"


def llama_cpp_tools(source: Path) -> Path:
    """The folder of llama-bench and llama-perplexity, built for this CPU (GGML_NATIVE) on the first run."""
    build = source / "build"
    bin_dir = build / "bin"
    if all((bin_dir / tool).is_file() for tool in LLAMA_TOOLS):
        return bin_dir
    if shutil.which("cmake") is None:
        raise SystemExit(
            "building llama.cpp needs cmake (Debian/Ubuntu: apt-get install cmake), or --no-llama-cpp"
        )
    logger.info("building llama.cpp in %s (once; several minutes on two cores)", build)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    options = ["TESTS", "EXAMPLES", "SERVER", "APP"]  # only the tools: LLAMA_BUILD_<option>=OFF
    configure = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]
    configure += [f"-DLLAMA_BUILD_{option}=OFF" for option in options]
    command = ["cmake", "-S", str(source), "-B", str(build), *generator, *configure]
    subprocess.run(command, check=True, capture_output=True)
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", str(build), "-j", jobs, "--target", *LLAMA_TOOLS], check=True)
    return bin_dir


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """The Hugging Face tokenizer files llama.cpp's converter reads, from this project's o200k_harmony
    vocabulary (its special tokens up to the model's vocabulary size)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = load_harmony_encoding()
    special = {text: i for text, i in encoding._special_tokens.items() if i < vocab_size}
    vocab_file = write_vocabulary(folder)
    converted = TikTokenConverter(
        vocab_file=str(vocab_file), pattern=encoding._pat_str, extra_special_tokens=special
    ).converted()
    converted.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,  # llama-perplexity then scores the text's own tokens, as this server does
        "add_eos_token": False,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def llama_cpp_model(source: Path, checkpoint: Path) -> Path:
    """The checkpoint converted to GGUF by llama.cpp's own converter (MXFP4 experts kept, bf16 the rest)."""
    out = LLAMA_CACHE / "models" / f"{checkpoint.name}.gguf"
    if out.is_file():
        return out
    staged = LLAMA_CACHE / "models" / checkpoint.name
    staged.mkdir(parents=True, exist_ok=True)
    # The config and every shard, with the index that names them where the checkpoint has several (the whole
    # 20b is over one shard's bound).
    for source_file in [*checkpoint.glob("*.safetensors"), *checkpoint.glob("*.json")]:
        if not (staged / source_file.name).exists():
            (staged / source_file.name).symlink_to(source_file)
    write_tokenizer(staged, json.loads((checkpoint / "config.json").read_text())["vocab_size"])
    logger.info("converting %s to GGUF with llama.cpp's converter", checkpoint)
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    partial = out.with_suffix(".partial")
    convert = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(staged), "--outtype", "bf16"]
    subprocess.run([*convert, "--outfile", str(partial)], check=True, env=env, capture_output=True)
    partial.replace(out)
    return out


def run_measured(command: list[str]) -> tuple[str, float, float]:
    """`command`'s output (stdout and stderr), its own peak RSS in GB (wait4's, not this process's) and the
    CPU seconds it used (user and system)."""
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read()
    if process.returncode:
        raise SystemExit(f"{command[0]} failed ({process.returncode}):\n{text[-2000:]}")
    return text, usage.ru_maxrss * 1024 / 1e9, usage.ru_utime + usage.ru_stime


def llama_cpp(args: argparse.Namespace, checkpoint: Path) -> dict[str, float]:
    """llama.cpp's prefill and decode tokens/s, peak RSS and perplexity on the same checkpoint and threads."""
    source = llama_cpp_source()
    tools = llama_cpp_tools(source)
    model = llama_cpp_model(source, checkpoint)
    common = [str(model), "-t", str(args.threads), "-lm", "none", "-r", "3", "-o", "jsonl"]
    out: dict[str, float] = {}
    text, prefill_rss, _ = run_measured(
        [str(tools / "llama-bench"), "-m", *common, "-p", str(args.prompt), "-n", "0"]
    )
    out["prefill_tok_s"] = json.loads(text.strip().splitlines()[-1])["avg_ts"]
    decode = [str(tools / "llama-bench"), "-m", *common, "-p", "0", "-d", str(args.prompt)]
    text, decode_rss, decode_cpu = run_measured([*decode, "-n", str(args.decode_steps)])
    out["decode_tok_s_median"] = json.loads(text.strip().splitlines()[-1])["avg_ts"]
    out["peak_rss_gb"] = max(prefill_rss, decode_rss)
    # CPU time per decoded token, which other load on the machine does not inflate (it only delays): the same
    # run with one token less than `--decode-steps` differs by that many tokens in each of its 3 repetitions.
    _, _, one_cpu = run_measured([*decode, "-n", "1"])
    out["decode_cpu_ms"] = 1e3 * (decode_cpu - one_cpu) / (3 * (args.decode_steps - 1))
    if not args.ppl_chunks:
        drop_from_page_cache(model)
        return out
    ppl = [str(tools / "llama-perplexity"), "-m", str(model), "-t", str(args.threads), "-f", str(PPL_TEXT)]
    ppl += ["-c", str(args.ppl_ctx), "-b", str(args.ppl_ctx), "--chunks", str(args.ppl_chunks)]
    text, _, _ = run_measured(ppl)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", text)
    if found is None:
        raise SystemExit(f"llama-perplexity printed no estimate:\n{text[-2000:]}")
    out["perplexity"] = float(found.group(1))
    drop_from_page_cache(model)
    return out


def drop_from_page_cache(path: Path) -> None:
    """Drop `path`'s pages from the page cache (where the platform can): llama.cpp's GGUF, read just before,
    would otherwise hold the free 2 MB blocks our next load needs for its weights' huge pages, as the
    server's own loading drops the checkpoint's (model/weights.py)."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def anon_huge_pages() -> int:
    """Bytes of this process's memory on transparent huge pages (AnonHugePages of /proc/self/smaps_rollup; 0
    where there is no such file): how much of the weights the kernel did back with 2 MB pages, which decode
    streams faster (model/host_memory.py)."""
    try:
        lines = Path("/proc/self/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


def perplexity(model: GptOss, args: argparse.Namespace) -> float:
    """The perplexity of PPL_TEXT as llama-perplexity computes it: chunks of `--ppl-ctx` tokens, each run
    alone, the predictions of its second half scored."""
    tokens = load_harmony_encoding().encode_ordinary(PPL_TEXT.read_text())
    ctx, first = args.ppl_ctx, args.ppl_ctx // 2
    nll, count = 0.0, 0
    for chunk in range(args.ppl_chunks):
        ids = torch.tensor(tokens[chunk * ctx : (chunk + 1) * ctx])
        logits = model(ids, AttentionMetadata.build([ctx]), logits_indices=torch.arange(first, ctx - 1))
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        nll -= logprobs.gather(1, ids[first + 1 :, None]).sum().item()
        count += ctx - 1 - first
    return math.exp(nll / count)


def profile_decode(model: GptOss, cache: ContiguousKVCache, token: torch.Tensor, length: int) -> None:
    """One more decode step under torch.profiler: its top operators by self CPU time, on stderr (the worker's
    stdout carries only its JSON line). The extension's kernels are no torch operators: each is wrapped in a
    labelled range for the profile, so it is counted apart from the step's own Python."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def labelled(name: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def run(*args: object, **kwargs: object) -> torch.Tensor:
            with record_function(name):
                return fn(*args, **kwargs)

        return run

    meta = AttentionMetadata.build([1], [length], cache_slots=[0])
    modules = {
        cpu_mxfp4: ("bf16_gemv", "mxfp4_linear", "mxfp4_experts_one", "experts_one_token"),
        cpu_fused: ("norm_qkv_rope", "paged_attention", "out_residual", "route"),
    }
    kernels = [(module, name, getattr(module, name)) for module, names in modules.items() for name in names]
    try:
        for module, name, fn in kernels:
            setattr(module, name, labelled(f"{module.__name__.rpartition('.')[2]}.{name}", fn))
        with profile(activities=[ProfilerActivity.CPU]) as prof, record_function("decode step"):
            model(token, meta, cache)
    finally:
        for module, name, fn in kernels:
            setattr(module, name, fn)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40)
    sys.stderr.write(f"profile of one decode step, {torch.get_num_threads()} thread(s):\n{table}\n")


def worker(args: argparse.Namespace) -> None:
    """One implementation and dtype on the checkpoint slice; prints its figures as one JSON line."""
    impl, dtype_name = args.worker.split(":")
    path = checkpoint_dir(args.layers, 32)
    started = time.perf_counter()
    model = GptOss.from_checkpoint(path, dtype=DTYPES[dtype_name], kernels=kernels_for(impl), progress=False)
    out: dict[str, float] = {"load_s": time.perf_counter() - started}
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    warm = torch.randint(0, vocab, (8,), generator=g)
    model(warm, AttentionMetadata.build([8]), logits_indices=torch.tensor([7]))  # one-time costs
    cache = ContiguousKVCache(model.config, 1, args.prompt + args.decode_steps + 1, dtype=model.dtype)
    prompt = torch.randint(0, vocab, (args.prompt,), generator=g)
    meta = AttentionMetadata.build([args.prompt], cache_slots=[0])
    started = time.perf_counter()
    token = model(prompt, meta, cache, logits_indices=torch.tensor([args.prompt - 1])).argmax(-1)
    out["prefill_tok_s"] = args.prompt / (time.perf_counter() - started)
    steps, cpu = [], []
    for n in range(args.decode_steps):
        meta = AttentionMetadata.build([1], [args.prompt + n + 1], cache_slots=[0])
        started, started_cpu = time.perf_counter(), time.process_time()
        token = model(token, meta, cache).argmax(-1)
        steps.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    out["decode_tok_s_best"] = 1 / min(steps)
    out["decode_tok_s_median"] = 1 / statistics.median(steps)
    out["decode_cpu_ms"] = 1e3 * statistics.median(cpu)
    if args.profile:
        profile_decode(model, cache, token, args.prompt + args.decode_steps + 1)
    # VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak (checkpoint writing).
    out["peak_rss_gb"] = proc_status("VmHWM") / 1e9
    out["huge_pages_gb"] = anon_huge_pages() / 1e9
    if args.ppl_chunks:
        out["perplexity"] = perplexity(model, args)
    sys.stdout.write(json.dumps(out) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--impls", default="fused")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp comparison")
    parser.add_argument("--ppl-chunks", type=int, default=2, help="perplexity chunks (0: none)")
    parser.add_argument("--ppl-ctx", type=int, default=128)
    parser.add_argument("--kernels", action="store_true", help="time one layer's experts alone")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--matrix-tokens", default="", help="time one matrix at these token counts")
    parser.add_argument("--profile", action="store_true", help="print a profile of one decode step per run")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every run and llama.cpp in turn")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        if args.kernels or args.matrix_tokens:
            if args.kernels:
                bench_kernels(args)
            if args.matrix_tokens:
                bench_matrix(args)
            return
        if args.worker:
            worker(args)
            return

    path = checkpoint_dir(args.layers, 32)
    logger.info("checkpoint %s (%d layers of gpt-oss-20b), %d threads", path, args.layers, args.threads)
    rounds: list[dict[str, dict[str, float]]] = []
    for number in range(args.rounds):
        results: dict[str, dict[str, float]] = {}
        for dtype_name in args.dtypes.split(","):
            for impl in args.impls.split(","):
                run = f"{impl}:{dtype_name}"
                command = [sys.executable, __file__, "--worker", run, *sys.argv[1:]]
                done = subprocess.run(command, check=True, capture_output=True, text=True)
                results[run] = json.loads(done.stdout.strip().splitlines()[-1])
                if args.profile:
                    logger.info("%s:\n%s", run, done.stderr[done.stderr.find("profile of one decode step") :])
                logger.info("round %d, %s: %s", number + 1, run, json.dumps(results[run]))
        if not args.no_llama_cpp:
            results["llama.cpp"] = llama_cpp(args, path)
            logger.info("round %d, llama.cpp: %s", number + 1, json.dumps(results["llama.cpp"]))
        rounds.append(results)
    results = {
        run: {key: statistics.median(r[run][key] for r in rounds) for key in figures}
        for run, figures in rounds[0].items()
    }

    header = (
        f"{'':18}{'prefill tok/s':>14}{'decode tok/s best':>19}{'median':>8}{'CPU ms/token':>14}"
        f"{'peak RSS GB':>13}{'ppl':>10}"
    )
    lines = [header]
    for run, r in results.items():
        best_decode = f"{r['decode_tok_s_best']:19.2f}" if "decode_tok_s_best" in r else f"{'-':>19}"
        lines.append(
            f"{run:18}{r['prefill_tok_s']:14.1f}{best_decode}{r['decode_tok_s_median']:8.2f}"
            f"{r['decode_cpu_ms']:14.1f}{r['peak_rss_gb']:13.2f}{r.get('perplexity', math.nan):10.1f}"
        )
    for dtype_name in args.dtypes.split(","):
        new = results.get(f"fused:{dtype_name}")
        for base in ("grouped", "unfused"):
            old = results.get(f"{base}:{dtype_name}")
            if new and old:
                lines.append(
                    f"fused / {base}, {dtype_name}: prefill "
                    f"{new['prefill_tok_s'] / old['prefill_tok_s']:.2f}x, decode (best) "
                    f"{new['decode_tok_s_best'] / old['decode_tok_s_best']:.2f}x, decode (median) "
                    f"{new['decode_tok_s_median'] / old['decode_tok_s_median']:.2f}x"
                )
    peer = results.get("llama.cpp")
    for run, r in results.items():
        if peer and run != "llama.cpp":
            lines.append(
                f"{run} / llama.cpp: prefill {r['prefill_tok_s'] / peer['prefill_tok_s']:.2f}x, "
                f"decode (median) {r['decode_tok_s_median'] / peer['decode_tok_s_median']:.2f}x, decode by "
                f"CPU time per token {peer['decode_cpu_ms'] / r['decode_cpu_ms']:.2f}x, peak RSS "
                f"{r['peak_rss_gb'] / peer['peak_rss_gb']:.2f}x"
            )
            if len(rounds) > 1:
                decode = "decode_tok_s_median"
                ratios = [x[run][decode] / x["llama.cpp"][decode] for x in rounds]
                lines.append(f"  decode ratio by round: {', '.join(f'{q:.2f}x' for q in ratios)}")
    if len(rounds) > 1:
        lines.insert(0, f"medians over {len(rounds)} rounds")
    logger.info("\n%s", "\n".join(lines))


if __name__ == "__main__":
    main()
