"""The python tool's sandbox: what a call costs, against a bare interpreter started the same way.

    python benchmarks/sandbox_bench.py [--runs 20]

Medians of: a bare `python -I -c "print(1)"` subprocess (the baseline: what any fresh process costs), a
one-shot sandboxed run of the same code (bubblewrap, cgroup and session start included), and a cell in a
session that is already running.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.python_sandbox import PythonSandbox


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


async def main(runs: int) -> None:
    sandbox = PythonSandbox()
    bare, oneshot, cell = [], [], []
    session = sandbox.session()
    await session.run("0")
    for _ in range(runs):
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            str(sandbox.python), "-I", "-c", "print(1)", stdout=asyncio.subprocess.PIPE
        )
        await process.communicate()
        bare.append(time.perf_counter() - started)
        started = time.perf_counter()
        result = await sandbox.run("print(1)")
        oneshot.append(time.perf_counter() - started)
        assert result.output == "1\n", result.output
        started = time.perf_counter()
        await session.run("print(1)")
        cell.append(time.perf_counter() - started)
    await session.close()
    baseline = statistics.median(bare)
    out(f"sandbox_bench: {runs} runs each, medians")
    out(f"   bare interpreter (baseline)   {baseline * 1e3:7.1f} ms")
    for name, times in (("one-shot sandboxed run", oneshot), ("cell in a running session", cell)):
        median = statistics.median(times)
        out(f"   {name:<29} {median * 1e3:7.1f} ms   {median / baseline:5.2f}x the baseline")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    asyncio.run(main(parser.parse_args().runs))
