"""The HTTP service fuzzed from its own OpenAPI document (schemathesis, in the dev extra): every
operation it documents, a bounded number of generated requests each, valid and invalid. No
answer may be a 5xx, every 4xx body must match the documented error schema, and the server
must be ready afterwards, with no traceback in its log."""

from __future__ import annotations

import pytest

from tests.bentoml_server import bentoml_server
from tests.error_bodies import ErrorBodies

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

EXAMPLES = 40  # per operation: a couple of minutes for all of them on 2 cores


@pytest.fixture(scope="module")
def fuzzed(models_root, tmp_path_factory):
    """A real ``bentoml serve`` and the OpenAPI document it serves."""
    import httpx

    env = {
        "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml_home")),
        "MODECONN_ARTIFACTS": str(models_root),
        "MODECONN_MAX_BATCH": "64",
        "MODECONN_MAX_BODY_MB": "64",  # explicitly: a module may have set 1 in os.environ
    }
    log_file = tmp_path_factory.mktemp("server") / "server.log"
    with bentoml_server(env, log_file) as running:
        spec = httpx.get(f"{running['url']}/docs.json", timeout=30).json()
        yield {**running, "spec": spec, "bodies": ErrorBodies(spec)}


def _document() -> dict:
    """The OpenAPI document the server serves at /docs.json, made here (no server needed to
    collect the tests; the test checks that the server serves the same)."""
    from service.openapi import openapi_document
    from service.schemas import ExportRequest, PathsRequest
    from service.service import ModeConnService

    return openapi_document(
        ModeConnService.openapi_spec.asdict(),
        {"/paths": PathsRequest, "/export": ExportRequest},
        key_required=False,
    )


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.mark.slow
@schema.parametrize()
@hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same requests every run
    suppress_health_check=list(hypothesis.HealthCheck),
    database=None,
)
def test_fuzzed_requests_get_no_5xx(case, fuzzed):
    assert fuzzed["spec"]["paths"].keys() == DOCUMENT["paths"].keys()
    response = case.call(base_url=fuzzed["url"], timeout=120)
    where = f"{case.method} {case.path}: {response.request.body!r:.300}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:500]}"
    if 400 <= response.status_code < 500 and case.method != "HEAD":
        fuzzed["bodies"].check(response.status_code, response.content, where)


@pytest.mark.slow
def test_server_is_ready_after_fuzzing(fuzzed):
    import httpx

    assert httpx.get(f"{fuzzed['url']}/readyz", timeout=30).status_code == 200
    assert fuzzed["proc"].poll() is None
    log = fuzzed["log"].read_text()
    assert "Traceback" not in log, log[log.find("Traceback") - 2000 :][:6000]
