"""The gateway's OpenAPI 3.1 document (``GET /openapi.json``) and its docs page (``/docs``).

Written from the pydantic models the endpoints validate with, so the document cannot
drift from what the code accepts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from rewardq.broker.schemas import ScoreItem, ScoreResult
from rewardq.gateway.openrlhf import OpenRLHFReply, OpenRLHFRequest
from rewardq.gateway.schemas import EndLine, ErrorBody, ResultLine, ScoreRequest, ScoreResponse
from rewardq.gateway.slime import SlimeRequest

_MODELS: tuple[type[BaseModel], ...] = (
    ScoreItem, ScoreResult, ScoreRequest, ScoreResponse, ResultLine, EndLine, ErrorBody,
    OpenRLHFRequest, OpenRLHFReply, SlimeRequest)
_REF = "#/components/schemas/{model}"

DOCS_HTML = """<!doctype html>
<html><head><title>rewardq gateway</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
</body></html>
"""


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": _ERROR_TEXT[c], "content": _json(_ref(ErrorBody))}
            for c in codes}


_ERROR_TEXT = {400: "Not JSON", 401: "No valid token", 413: "Body or item count too large",
               422: "Invalid request, items (each named; nothing enqueued) or remote-RM label",
               429: "The token's queue is over its item or byte bounds; see Retry-After "
                    "(within them requests wait their turn)",
               502: "An item failed for good (remote-RM endpoints; `items` names it)",
               503: "No live worker, or Redis unreachable, until the deadline",
               504: "Not every item final by the deadline (transient failures were retried "
                    "until then)"}
_SCORING_ERRORS = (400, 401, 413, 422, 429, 503, 504)


def _post(summary: str, request: type[BaseModel], reply: dict[str, Any],
          errors: tuple[int, ...], description: str = "") -> dict[str, Any]:
    return {"post": {"summary": summary, "description": description,
                     "security": [{"bearer": []}, {"basic": []}],
                     "requestBody": {"required": True, "content": _json(_ref(request))},
                     "responses": {"200": reply, **_errors(*errors)}}}


def _get(summary: str, content_type: str, description: str = "") -> dict[str, Any]:
    return {"get": {"summary": summary, "description": description,
                    "responses": {"200": {"description": "OK",
                                          "content": {content_type: {}}}}}}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of every endpoint."""
    _, schemas = models_json_schema([(m, "serialization" if m in (ScoreResult, ScoreResponse)
                                          else "validation") for m in _MODELS],
                                    ref_template=_REF)
    ndjson = {"application/x-ndjson": {"schema": {"oneOf": [_ref(ResultLine),
                                                            _ref(EndLine)]}}}
    paths = {
        "/v1/score": _post(
            "Score items; one result per item, in input order", ScoreRequest,
            {"description": "Results", "content": _json(_ref(ScoreResponse))},
            _SCORING_ERRORS),
        "/v1/score/stream": _post(
            "Score items; each result as an NDJSON line as soon as it is known",
            ScoreRequest, {"description": "ResultLine per item, then one EndLine",
                           "content": ndjson}, _SCORING_ERRORS),
        "/get_reward": _post(
            "OpenRLHF remote reward model (--reward.remote_url)", OpenRLHFRequest,
            {"description": "Rewards", "content": _json(_ref(OpenRLHFReply))},
            (*_SCORING_ERRORS, 502),
            "Query parameters label_as=reference|metadata, response_from=strip_prompt|query, "
            "failed_reward=<number>, no_answer_reward=<number>, extra_logs=0|1 and "
            "timeout_s=<seconds> override the deployment's mapping and deadline "
            "(extra_logs=0 for OpenRLHF 0.8.x)."),
        "/slime/reward": _post(
            "slime remote reward model (--rm-type remote_rm --rm-url)", SlimeRequest,
            {"description": "The reward: a bare number (?reply=dict: an object)",
             "content": _json({"type": "number"})}, (*_SCORING_ERRORS, 502),
            "Query parameters as /get_reward, and reply=dict."),
        "/healthz": _get("The process is up", "application/json"),
        "/readyz": _get("Redis reachable and at least one live worker (else 503)",
                        "application/json"),
        "/metrics": _get("Prometheus metrics (needs a token when tokens are configured)",
                         "text/plain"),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "rewardq gateway", "version": "1",
                 "description": "LLM-judge reward scoring through the rewardq fleet."},
        "paths": paths,
        "components": {"schemas": schemas.get("$defs", {}), "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "basic": {"type": "http", "scheme": "basic",
                      "description": "password = the token (for clients that only take a "
                                     "URL: http://NAME:TOKEN@host/...)"}}},
    }
