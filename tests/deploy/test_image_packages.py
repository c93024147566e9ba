"""The image copies every package the project installs: a package left out would build an image whose
`pip install -e .` succeeds and whose server then fails to import at start."""

from __future__ import annotations

import fnmatch
import tomllib

from tests.deploy.deployfiles import ROOT, parse_dockerfile


def _installed_packages() -> set[str]:
    """Top-level packages that setuptools' `packages.find.include` patterns select in the repository."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
    return {
        path.parent.name
        for path in ROOT.glob("*/__init__.py")
        if any(fnmatch.fnmatch(path.parent.name, pattern) for pattern in patterns)
    }


def test_every_installed_package_is_copied_into_the_image() -> None:
    copied = {
        src.rstrip("/")
        for instruction in parse_dockerfile((ROOT / "Dockerfile").read_text())
        if instruction.keyword == "COPY"
        for src in instruction.args.split()[:-1]
    }
    packages = _installed_packages()
    assert {"harmony", "model", "engine", "server"} <= packages
    assert packages - copied == set()
