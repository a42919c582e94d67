"""Schemathesis against the app's own OpenAPI schema: no generated request may cause a server error, and
every response must match the schema (status codes, content types, bodies).

Valid (positive) and invalid (negative) requests are generated for every operation. Bounded: a dozen
examples per operation and mode, no deadline (a shared 2-core machine), in-process through ASGI (no
network). Strategies are driven with Hypothesis directly: schemathesis' pytest plugin loader does not run
under pytest 9.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from bloodcell.serve.app import create_app

OPERATIONS = ["GET /healthz", "GET /v1/model", "POST /v1/predict", "POST /v1/predict/batch"]
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE) for label in OPERATIONS if label.startswith("POST")  # GETs take no input
]
MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def api_schema(tiny_model: Path):
    app = create_app(tiny_model, max_upload_bytes=128 * 1024, max_side=512, max_batch_files=4)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_every_operation_is_fuzzed(api_schema) -> None:
    labels = sorted(f"{r.ok().method.upper()} {r.ok().path}" for r in api_schema.get_all_operations())
    assert labels == sorted(OPERATIONS)


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_generated_requests_get_no_server_error(api_schema, label: str, mode: GenerationMode) -> None:
    operation = api_schema.find_operation_by_label(label)
    statuses: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def check(case) -> None:
        response = case.call()
        statuses.append(response.status_code)
        assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:300]}"
        # Status codes, content types and bodies must match the schema. Two checks judge requests by the
        # schema alone and cannot hold for an image API: schema-valid bytes that are not an image are
        # rightly refused (422), and a multipart file part cannot be "the wrong JSON type".
        case.validate_response(response, excluded_checks=[positive_data_acceptance, negative_data_rejection])

    check()
    assert statuses, "no request was generated"
