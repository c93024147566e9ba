"""The python tool's sandbox: what a notebook does, and what hostile code cannot do (each escape a test)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.python_sandbox import (
    ExecResult,
    Limits,
    PythonSandbox,
    Session,
    SessionPool,
    SessionUnknown,
    _Cgroup,
)

LIMITS = Limits(
    wall_seconds=8, cpu_seconds=8, memory_bytes=512 << 20, data_bytes=16 << 20, read_bytes=256 << 10
)


def run_cells(*cells: str, limits: Limits = LIMITS) -> list[ExecResult]:
    async def go() -> list[ExecResult]:
        session = PythonSandbox(limits).session()
        try:
            return [await session.run(cell) for cell in cells]
        finally:
            await session.close()

    return asyncio.run(go())


def test_the_probe_sees_uid_nobody_and_a_small_root() -> None:
    seen = asyncio.run(PythonSandbox(LIMITS).probe())
    assert seen.startswith("65534 ")
    assert "'home'" not in seen
    assert "'work'" not in seen


def test_cells_share_state_like_a_notebook() -> None:
    results = run_cells(
        "x = 41",
        "x + 1",
        "print('hi')\nNone",
        "open('/mnt/data/f.txt', 'w').write('kept'); import os; os.listdir('/mnt/data')",
        "open('f.txt').read()",
    )
    assert [r.output for r in results] == ["", "42\n", "hi\n", "['f.txt']\n", "'kept'\n"]


def test_an_error_shows_the_cells_traceback_only() -> None:
    (result,) = run_cells("def f():\n    return 1 / 0\nf()")
    assert "ZeroDivisionError" in result.output
    assert "<cell>" in result.output
    assert "_KERNEL" not in result.output
    assert "exec(" not in result.output


def test_a_cell_over_the_wall_clock_restarts_the_session_and_says_so() -> None:
    results = run_cells("x = 1", "import time; time.sleep(60)", "x", limits=Limits(wall_seconds=2))
    assert results[1].timed_out
    assert "timed out after 2 s" in results[1].for_model(Limits(wall_seconds=2))
    assert results[2].restarted
    assert "NameError" in results[2].output


def test_an_output_flood_is_cut_and_the_session_restarted() -> None:
    (flood, after) = run_cells("while True: print('x' * 1000)", "print('alive')")
    assert flood.truncated
    assert len(flood.output) <= LIMITS.read_bytes
    assert after.restarted
    assert after.output == "alive\n"


def test_model_text_keeps_head_and_tail_of_long_output() -> None:
    text = ExecResult("a" * 30_000 + "END").for_model(Limits(output_chars=1000))
    assert text.startswith("a" * 500)
    assert text.endswith("END")
    assert "characters cut" in text
    assert ExecResult("").for_model(LIMITS).startswith("[no output")


# -- hostile code --------------------------------------------------------------------------------------------


def test_host_files_and_the_servers_secrets_are_out_of_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVER_SECRET", "s3cr3t-value")
    Path("/tmp/gpt-oss-host-file").write_text("host data")
    (result,) = run_cells(
        "import os, glob\n"
        "found = []\n"
        "for path in ['/etc/shadow', '/etc/passwd', '/root/.bashrc', '/tmp/gpt-oss-host-file', "
        "'/work', '/home']:\n"
        "    found.append((path, os.path.exists(path)))\n"
        "print(found)\n"
        "print('SERVER_SECRET' in os.environ, sorted(os.environ))\n"
        "leaks = []\n"
        "for env in glob.glob('/proc/*/environ'):\n"
        "    try:\n"
        "        leaks.append(b's3cr3t' in open(env, 'rb').read())\n"
        "    except OSError:\n"
        "        pass\n"
        "print(any(leaks), sorted(p for p in os.listdir('/proc') if p.isdigit()))"
    )
    lines = result.output.splitlines()
    assert all(" True)" not in item for item in lines[0].split("),")), lines[0]
    assert lines[1].startswith("False "), lines[1]
    assert lines[2].startswith("False "), lines[2]
    assert len(eval(lines[2].split(" ", 1)[1])) <= 4  # only the sandbox's own few processes are visible


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP server on the host's loopback, standing in for the server's own port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.close()
    assert not accepted, "the sandbox reached a port on the host"


def test_the_hosts_loopback_and_network_are_unreachable(listener: int) -> None:
    (result,) = run_cells(
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {listener}), timeout=2)\n"
        "    print('connected')\n"
        "except OSError as error:\n"
        "    print('refused', type(error).__name__)\n"
        "import os; print(sorted(os.listdir('/sys/class/net')) if os.path.exists('/sys/class/net') else [])"
    )
    assert result.output.startswith("refused"), result.output


def test_a_fork_bomb_hits_the_process_limit() -> None:
    # The process limit must stop the bomb, not the wall clock: on a loaded machine 64 forks can take longer
    # than the other tests' 8 s, and the cell would end as a timeout with nothing shown about the limit.
    sandbox = PythonSandbox(dataclasses.replace(LIMITS, wall_seconds=60))
    cgroup = _Cgroup("gpt-oss-probe", LIMITS)
    has_cgroup = bool(cgroup.paths)
    cgroup.remove()
    assert has_cgroup, "no writable cgroup here: a fork bomb would not be bounded"
    markers: list[str] = []
    during: list[int] = []

    async def go() -> tuple[ExecResult, ExecResult]:
        session = Session(sandbox)
        try:
            bomb = await session.run(
                "import os\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
                "            import time; time.sleep(30)\n        n += 1\nexcept OSError as error:\n"
                "    print('stopped after', n, type(error).__name__)"
            )
            after = await session.run("print('alive')")
            markers.append(session._marker)  # on every process of the session's: forks keep the command line
            during.extend(_processes_running(session._marker))  # the bomb's children, asleep
            return bomb, after
        finally:
            await session.close()

    bomb, after = asyncio.run(go())
    assert "stopped after" in bomb.output, bomb.output
    assert int(bomb.output.split()[2]) < LIMITS.processes
    assert after.output.endswith("alive\n")
    # Nothing of the session is left once it is closed. Counted by its own processes, not the machine's:
    # other work on the machine starts and ends processes meanwhile.
    assert len(during) > 10, "the check below would not see the session's processes"
    assert _processes_running(markers[0]) == []


def _processes_running(marker: str) -> list[int]:
    """The host's processes whose command line holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:  # it ended meanwhile
                continue
            if marker.encode() in cmdline:
                found.append(int(entry))
    return found


def test_memory_bombs_fail_alone_and_together() -> None:
    (single, many) = run_cells(
        "try:\n    bytearray(4 << 30)\nexcept MemoryError:\n    print('MemoryError')",
        # Four processes of 200 MB each: within every process's address-space limit, over the session's 512 MB.
        "import os\nkids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
        "        block = bytearray(200 << 20)\n        for i in range(0, len(block), 4096): block[i] = 1\n"
        "        import time; time.sleep(3); os._exit(0)\n    kids.append(pid)\n"
        "print(sorted(os.waitpid(k, 0)[1] for k in kids))",
    )
    assert single.output == "MemoryError\n"
    statuses = eval(many.output.strip().splitlines()[-1]) if "[" in many.output else []
    assert statuses, many.output
    assert any(s != 0 for s in statuses), "four 200 MB children all survived a 512 MB session"


def test_the_disk_is_a_small_private_tmpfs() -> None:
    (result,) = run_cells(
        "try:\n    with open('/mnt/data/big', 'wb') as f:\n"
        "        for _ in range(64): f.write(b'x' * (1 << 20))\n    print('wrote all')\n"
        "except OSError as error:\n    print('stopped', error.errno)"
    )
    assert result.output.startswith("stopped"), result.output


def test_the_server_cannot_be_signalled() -> None:
    (result,) = run_cells(
        "import os, signal\n"
        f"try:\n    os.kill({os.getpid()}, signal.SIGKILL)\n    print('sent')\n"
        "except ProcessLookupError:\n    print('no such process')\n"
        "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass"
    )
    assert result.output.startswith("no such process")  # and this test process is still here to see it


def test_two_sessions_never_see_each_others_files() -> None:
    async def go() -> tuple[str, str]:
        sandbox = PythonSandbox(LIMITS)
        first, second = sandbox.session(), sandbox.session()
        try:
            await first.run("open('/mnt/data/mine.txt', 'w').write('first')")
            seen = await second.run("import os; print(os.listdir('/mnt/data'), os.listdir('/tmp'))")
            mine = await first.run("print(open('/mnt/data/mine.txt').read())")
            return seen.output, mine.output
        finally:
            await first.close()
            await second.close()

    seen, mine = asyncio.run(go())
    assert seen == "[] []\n"
    assert mine == "first\n"


def test_the_pool_keeps_sessions_by_id_and_closes_the_least_recently_used() -> None:
    async def go() -> None:
        pool = SessionPool(PythonSandbox(LIMITS), max_sessions=2)
        try:
            first, second = await pool.create(), await pool.create()
            await pool.run(first.id, "x = 'first'")
            await pool.run(second.id, "x = 'second'")
            await pool.run(first.id, "x")  # first is now the most recently used
            third = await pool.create()
            assert len(pool) == 2
            with pytest.raises(SessionUnknown):
                await pool.run(second.id, "x")
            assert (await pool.run(first.id, "x")).output == "'first'\n"
            assert (await pool.run(third.id, "1 + 1")).output == "2\n"
        finally:
            await pool.close_all()

    asyncio.run(go())


def test_idle_sessions_expire() -> None:
    async def go() -> None:
        pool = SessionPool(PythonSandbox(LIMITS), idle_seconds=0.3)
        try:
            session = await pool.create()
            await pool.run(session.id, "x = 1")
            await asyncio.sleep(0.5)
            with pytest.raises(SessionUnknown):
                await pool.run(session.id, "x")
            assert len(pool) == 0
        finally:
            await pool.close_all()

    asyncio.run(go())


def test_cells_beyond_the_running_limit_wait_their_turn() -> None:
    async def go() -> float:
        pool = SessionPool(PythonSandbox(LIMITS), max_running=1)
        try:
            a, b = await pool.create(), await pool.create()
            await asyncio.gather(pool.run(a.id, "0"), pool.run(b.id, "0"))  # started, outside the timing
            started = asyncio.get_running_loop().time()
            await asyncio.gather(
                pool.run(a.id, "import time; time.sleep(0.6)"), pool.run(b.id, "import time; time.sleep(0.6)")
            )
            return asyncio.get_running_loop().time() - started
        finally:
            await pool.close_all()

    assert asyncio.run(go()) >= 1.2


def test_a_session_created_under_a_chosen_id_twice_is_one_session() -> None:
    async def go() -> None:
        pool = SessionPool(PythonSandbox(LIMITS))
        try:
            first, again = await asyncio.gather(pool.create("cntr_chosen"), pool.create("cntr_chosen"))
            assert first is again
            assert first.id == "cntr_chosen"
            assert "cntr_chosen" in pool
            assert "cntr_other" not in pool
            assert len(pool) == 1
        finally:
            await pool.close_all()

    asyncio.run(go())


def test_a_cell_whose_caller_left_kills_the_session_and_the_next_cell_says_so() -> None:
    """A response cancelled mid-cell: the cell's late output must not be read as the next cell's."""

    async def go() -> None:
        pool = SessionPool(PythonSandbox(LIMITS))
        try:
            session = await pool.create()
            await pool.run(session.id, "x = 1")
            cell = asyncio.create_task(pool.run(session.id, "import time\ntime.sleep(2)\nprint('late')"))
            await asyncio.sleep(0.5)
            cell.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cell
            result = await pool.run(session.id, "print('next')")
            assert result.output == "next\n"
            assert result.restarted
        finally:
            await pool.close_all()

    asyncio.run(go())
