"""Schemathesis fuzzes every operation of /openapi.json: no 500s, and every answer (status,
content type, headers, body) matches the documented schema. A fast fake editor does the edits."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import checks  # noqa: E402
from service_helpers import AUTH, FakeFactory, make_settings  # noqa: E402

from engine.server import create_app  # noqa: E402

MAX_EXAMPLES = 25


APP = create_app(make_settings(queue_size=4), editor_factory=FakeFactory())
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def running_workers():
    from fastapi.testclient import TestClient

    with TestClient(APP):  # one set of workers for every example (lifespans nest)
        yield


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_api_matches_its_schema(case):
    # Random bytes are "valid" for a binary field yet not a PNG, so positive_data_acceptance
    # (schema-valid input must be accepted) does not apply to this API; the rest do.
    case.call_and_validate(
        headers=AUTH,
        checks=[
            checks.not_a_server_error,
            checks.status_code_conformance,
            checks.content_type_conformance,
            checks.response_headers_conformance,
            checks.response_schema_conformance,
            checks.negative_data_rejection,
        ],
    )
