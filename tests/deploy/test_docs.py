"""The deployment docs name files that exist and commands that match the files."""

from __future__ import annotations

import re

from tests.deploy.deployfiles import DEPLOY, ROOT


def deployment_section() -> str:
    readme = (ROOT / "README.md").read_text()
    assert "\n## Deployment\n" in readme
    return readme.split("\n## Deployment\n", 1)[1].split("\n## ", 1)[0]


def test_paths_named_in_the_deployment_docs_exist() -> None:
    for text in (deployment_section(), (DEPLOY / "README.md").read_text()):
        paths = re.findall(r"`((?:deploy/|\.\./)?[\w./-]+\.(?:ya?ml|env|md)|Dockerfile)`", text)
        assert paths, "no file names found: the pattern does not match how the docs write them"
        for path in paths:
            candidates = [ROOT / path, DEPLOY / path, DEPLOY / "kubernetes" / path]
            assert any(p.exists() for p in candidates), f"the docs name {path}, which does not exist"


def test_readme_section_and_deploy_readme_agree_on_the_image_run() -> None:
    run = (
        "docker run --gpus all -p 8000:8000 -v gpt-oss-cache:/cache gpt-oss-server --model openai/gpt-oss-20b"
    )
    assert run in deployment_section()
    assert run in (DEPLOY / "README.md").read_text()
    assert "deploy/README.md" in deployment_section()


def test_deploy_readme_explains_replicas_behind_the_service() -> None:
    text = (DEPLOY / "README.md").read_text()
    assert "### N replicas behind the Service" in text
    assert "kubectl scale deployment/gpt-oss-server --replicas=N" in text.replace("\n  ", " ")
