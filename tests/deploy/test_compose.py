"""docker-compose.yml against the Compose Specification's JSON schema (as shipped in check-jsonschema), and what
it must say: the GPU reservation, the port, the model cache volume, the env file, the health check."""

from __future__ import annotations

import copy
import importlib.resources
import json
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy.deployfiles import (
    ROOT,
    assert_healthcheck_follows_health,
    env_values,
    parse_dockerfile,
    server_env_vars,
)


@cache
def compose_schema() -> dict:
    # The compose-spec project's schema (Apache-2.0), vendored inside the check-jsonschema package.
    resource = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(resource.read_text())


def validator() -> jsonschema.protocols.Validator:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.fixture
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture
def server(compose: dict) -> dict:
    return compose["services"]["server"]


def test_schema_is_the_compose_specification() -> None:
    schema = compose_schema()
    assert schema["title"] == "Compose Specification"
    assert "services" in schema["properties"]


def test_compose_file_validates(compose: dict) -> None:
    errors = sorted(validator().iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c["services"]["server"].update(healthcheck_typo={}),
        lambda c: c["services"]["server"]["deploy"]["resources"]["reservations"].update(devices="gpu"),
        lambda c: c["services"]["server"]["healthcheck"].update(retries=[3]),
        lambda c: c.update(volumes=["model-cache"]),
    ],
    ids=["unknown-key", "devices-not-a-list", "retries-not-a-number", "volumes-not-a-map"],
)
def test_schema_rejects_a_broken_file(compose: dict, break_it) -> None:
    broken = copy.deepcopy(compose)
    break_it(broken)
    assert list(validator().iter_errors(broken)), "the schema let a broken file through"


def test_reserves_an_nvidia_gpu(server: dict) -> None:
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices


def test_builds_this_repository_and_publishes_the_port(server: dict) -> None:
    assert server["build"] in (".", {"context": "."})
    port = server["environment"]["GPT_OSS_PORT"]
    assert any(str(p).endswith(f":{port}") for p in server["ports"]), server["ports"]
    assert server["environment"]["GPT_OSS_HOST"] == "0.0.0.0"


def test_model_cache_is_a_named_volume_on_the_images_volume(compose: dict, server: dict) -> None:
    image_env = env_values(parse_dockerfile((ROOT / "Dockerfile").read_text()))
    (mount,) = server["volumes"]
    name, _, target = mount.partition(":")
    assert name in compose["volumes"]
    for variable in ("GPT_OSS_CACHE_DIR", "HF_HOME"):
        assert Path(server["environment"][variable]).is_relative_to(target)
        assert server["environment"][variable] == image_env[variable]


def env_file_keys(path: Path) -> list[str]:
    keys = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line.partition("=")[0])
    return keys


def test_env_file_exists_and_sets_only_server_settings(server: dict) -> None:
    (env_file,) = server["env_file"]
    path = ROOT / env_file
    assert path.is_file()
    keys = env_file_keys(path)
    assert "GPT_OSS_MODEL" in keys
    known = server_env_vars()
    for key in [*keys, *server["environment"]]:
        assert key in known or key.startswith("HF_"), f"{key} is read by neither the server nor Hugging Face"


def test_healthcheck_reads_health(server: dict, health_server) -> None:
    check = server["healthcheck"]
    kind, *command = check["test"]
    assert kind == "CMD"
    assert check["start_period"]
    assert_healthcheck_follows_health(command, health_server)


def test_stop_grace_covers_the_servers_drain(server: dict) -> None:
    """`docker compose stop` must not SIGKILL the server while it drains: its shutdown grace + 5 s cleanup."""
    from server.main import parse_args

    grace = float(server["environment"].get("GPT_OSS_SHUTDOWN_GRACE", parse_args([]).shutdown_grace))
    stop = server["stop_grace_period"]
    assert stop.endswith("s")
    assert stop[-2].isdigit(), f"write stop_grace_period in seconds: {stop}"
    assert float(stop[:-1]) >= grace + 5
