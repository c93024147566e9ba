"""schemathesis over the served OpenAPI document (/openapi.json of the real app on loopback): for every
operation, a bounded number of generated requests, schema-conforming and schema-violating: no answer >= 500.

The engine runs with a 128-token context, so that whatever a generated request asks for, generation is short
(the check is about the server's answers, not the model's output)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import hypothesis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from schemathesis import GenerationMode

from tests.reliability.conftest import MODEL, serve

EXAMPLES = 12  # per operation and generation mode
CALL_TIMEOUT = 30


def _pin_model(mode: GenerationMode) -> Callable[[schemathesis.Case], schemathesis.Case]:
    """Conforming bodies name the served model, or nearly all of them stop at the model check (a 404)."""

    def pin(case: schemathesis.Case) -> schemathesis.Case:
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL
        return case

    return pin


def test_no_5xx_over_the_openapi_document(checkpoint: Path, summary: Callable[[str], None]) -> None:
    started = time.perf_counter()
    server_errors: list[str] = []
    calls: dict[str, int] = {}
    statuses: dict[int, int] = {}
    no_negative: list[str] = []
    with serve(checkpoint, engine={"max_model_len": 128}, hook=False) as served:
        schema = schemathesis.openapi.from_url(served.base_url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 8, f"only {len(operations)} operations in the served document"
        with requests.Session() as session:
            for operation in operations:
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                    @hypothesis.settings(
                        max_examples=EXAMPLES,
                        deadline=None,
                        database=None,
                        derandomize=True,
                        phases=[Phase.explicit, Phase.generate],
                        suppress_health_check=list(HealthCheck),
                    )
                    @given(case=operation.as_strategy(generation_mode=mode).map(_pin_model(mode)))
                    def call(case: schemathesis.Case) -> None:
                        label = case.operation.label
                        calls[label] = calls.get(label, 0) + 1
                        try:
                            response = case.call(
                                base_url=served.base_url, session=session, timeout=CALL_TIMEOUT
                            )
                        except requests.RequestException as error:
                            server_errors.append(f"{label}: {type(error).__name__}: {error}")
                            return
                        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                        if response.status_code >= 500:
                            body = case.body if not isinstance(case.body, bytes) else case.body[:200]
                            server_errors.append(
                                f"{label}: {response.status_code} {response.text[:120]!r} for body {str(body)[:200]}"
                            )

                    try:
                        call()
                    except hypothesis.errors.Unsatisfiable:
                        # Nothing can violate the schema of an operation that takes no input (GET /health).
                        assert mode is GenerationMode.NEGATIVE, f"no positive example for {operation.label}"
                        no_negative.append(operation.label)
    elapsed = time.perf_counter() - started
    total = sum(calls.values())
    summary(
        f"{len(operations)} operations, {total} generated requests (<= {EXAMPLES} per operation and mode, "
        f"positive and negative; {len(no_negative)} take no input to violate): {len(server_errors)} answered >= 500 or failed; statuses "
        f"{dict(sorted(statuses.items()))}; {elapsed:.1f} s"
    )
    assert not server_errors, f"{len(server_errors)} of {total} requests answered >= 500:\n" + "\n".join(
        server_errors[:20]
    )
