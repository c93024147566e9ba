"""Readers for the deployment files (the Dockerfile's instructions, YAML documents, the README's install) and
the health-check runner shared by the Dockerfile and Compose tests."""

from __future__ import annotations

import http.server
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"

# pip options that take a value; the value is where packages come from, not what is installed.
PIP_OPTIONS_WITH_VALUE = {
    "--index-url",
    "-i",
    "--extra-index-url",
    "--find-links",
    "-f",
    "-c",
    "--constraint",
}


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str  # the rest of the instruction, continuation lines joined
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined; comment lines dropped (also inside a continuation)."""
    out: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        joined = " ".join(buffer)
        buffer = []
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not buffer, "the Dockerfile ends inside a continuation line"
    return out


def pip_install_segments(command: str) -> list[list[str]]:
    """The argument lists (what follows `pip install`) of every pip install in shell command lines."""
    segments = []
    for part in re.split(r"&&|;|\|\||\n", command):
        words = shlex.split(part)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                segments.append(words[i + 2 :])
                break
    return segments


def split_pip_args(args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(what is installed, source options): `-e .` stays together; `--no-cache-dir` style flags go."""
    targets: list[str] = []
    options: dict[str, list[str]] = {}
    it = iter(args)
    for word in it:
        if word in ("-e", "--editable"):
            targets += ["-e", next(it)]
        elif word in PIP_OPTIONS_WITH_VALUE:
            options.setdefault(word, []).append(next(it))
        elif word.startswith("-"):
            name, _, value = word.partition("=")
            if value and name in PIP_OPTIONS_WITH_VALUE:
                options.setdefault(name, []).append(value)
        else:
            targets.append(word)
    return targets, options


def readme_install_command() -> str:
    """The README's first command, the one that installs and starts the server."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Start the server", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README: no sh block under 'Start the server'"
    return block.group(1).strip()


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomize_resources() -> list[Path]:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    return [KUBERNETES / name for name in kustomization["resources"]]


def manifests() -> list[dict]:
    return [doc for path in kustomize_resources() for doc in load_yaml_documents(path)]


def manifest(kind: str) -> dict:
    found = [doc for doc in manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/kubernetes, found {len(found)}"
    return found[0]


def server_env_vars() -> set[str]:
    """Every GPT_OSS_* variable the server reads: those its source names, and one per command-line setting."""
    from server.main import ENV_PREFIX, CliSettings

    source = "\n".join(p.read_text() for p in sorted((ROOT / "server").rglob("*.py")))
    named = set(re.findall(r"""["'](GPT_OSS_[A-Z0-9_]+)["']""", source))
    return named | {ENV_PREFIX + name.upper() for name in CliSettings.model_fields}


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    out = {}
    for i in instructions:
        if i.keyword == "ARG" and "=" in i.args:
            name, _, value = i.args.partition("=")
            out[name.strip()] = value.strip().strip('"')
    return out


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    out = {}
    for i in instructions:
        if i.keyword == "ENV":
            for word in shlex.split(i.args):
                name, _, value = word.partition("=")
                out[name] = value
    return out


class HealthHandler(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []  # noqa: RUF012

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def run_healthcheck(command: list[str], port: int) -> int:
    """Run an exec-form health check with this interpreter as the image's `python`."""
    assert command[0] == "python", command
    env = {**os.environ, "GPT_OSS_PORT": str(port)}
    return subprocess.run([sys.executable, *command[1:]], env=env, timeout=30, capture_output=True).returncode


def assert_healthcheck_follows_health(
    command: list[str], health_server: tuple[int, type[HealthHandler]]
) -> None:
    """The check needs no curl (the image has none), passes on /health's 200 and fails on its 503."""
    assert "curl" not in " ".join(command)
    port, handler = health_server
    handler.status = 200
    assert run_healthcheck(command, port) == 0
    handler.status = 503
    assert run_healthcheck(command, port) != 0
    assert handler.paths == ["/health", "/health"]
