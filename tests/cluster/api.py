"""The REST surface of a Determined 0.38.1 master, read from the client's own bindings.

`determined.common.api.bindings` is generated from the master's protobuf API: every
``get_X`` / ``post_X`` / ... function names the HTTP method, the path template, the request
body type and the response type of one master route. `ROUTES` is that table, so the stand-in
master matches a request to the exact binding a real client used, parses its body with the
binding's request class and checks its answer with the binding's response class
(``from_json``: a missing required field fails there, in the stand-in, not later in a client).

A request that matches no binding, or a binding the stand-in does not implement, is answered
with HTTP 501 and gRPC code 12 (Unimplemented), the way the master's gRPC gateway answers an
unimplemented method, and is recorded so the test that caused it fails.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import re
from dataclasses import dataclass
from typing import Any

from determined.common.api import bindings

# gRPC status codes (google.golang.org/grpc/codes) and the HTTP status the gateway maps them to.
GRPC_CODES = {
    400: (3, "InvalidArgument"),
    401: (16, "Unauthenticated"),
    403: (7, "PermissionDenied"),
    404: (5, "NotFound"),
    409: (9, "FailedPrecondition"),
    500: (13, "Internal"),
    501: (12, "Unimplemented"),
}


class ApiError(Exception):
    """An error answer, rendered as the master's gRPC gateway renders one (grpcutil/errors.go):
    ``{"error": {"code": <grpc code>, "reason": "<code name>", "error": "<message>"}}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict[str, Any]:
        code, reason = GRPC_CODES.get(self.status, (2, "Unknown"))
        return {"error": {"code": code, "reason": reason, "error": self.message}}


@dataclass(frozen=True)
class Route:
    method: str
    template: str  # "/api/v1/experiments/{experimentId}"
    binding: str  # "GetExperiment"
    regex: re.Pattern[str]
    request_type: str | None  # "v1CreateExperimentRequest" (the ``body`` parameter)
    response_type: str | None  # "v1GetExperimentResponse"; None for bodiless answers
    stream: bool  # the binding reads newline-delimited {"result": ...} objects

    def parse_body(self, raw: bytes) -> Any:
        """The request body through the binding's request class (so a malformed request fails
        here, as it would in the master's gateway); raw JSON when the body has no class."""
        obj = json.loads(raw or b"{}")
        if self.request_type and hasattr(bindings, self.request_type):
            return getattr(bindings, self.request_type).from_json(obj)
        return obj

    def check_response(self, obj: Any) -> None:
        """Raise if ``obj`` is not a valid instance of the binding's response type."""
        if self.response_type and hasattr(bindings, self.response_type):
            getattr(bindings, self.response_type).from_json(obj)


def _build_routes() -> list[Route]:
    routes = []
    for name, fn in vars(bindings).items():
        m = re.fullmatch(r"(get|post|put|patch|delete)_([A-Z]\w*)", name)
        if not m or not callable(fn):
            continue
        src = inspect.getsource(fn)
        path = re.search(r'path=f?"([^"]+)"', src)
        method = re.search(r'method="(\w+)"', src)
        if not path or not method:
            continue
        template = path.group(1)
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
        annotations = getattr(fn, "__annotations__", {})
        body = annotations.get("body")
        response = str(annotations.get("return", ""))
        response_type = re.search(r"(v1\w+|trialv1\w+)", response)
        routes.append(
            Route(
                method=method.group(1),
                template=template,
                binding=m.group(2),
                regex=re.compile(pattern),
                request_type=str(body).strip("'\"") if body else None,
                response_type=response_type.group(1) if response_type else None,
                stream="typing.Iterable" in response,
            )
        )
    # Literal segments win over parameters: /trials/metrics/trial_metrics before /trials/{id}.
    routes.sort(key=lambda r: (r.template.count("{"), -len(r.template)))
    return routes


ROUTES = _build_routes()


def match(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    for route in ROUTES:
        if route.method == method:
            m = route.regex.fullmatch(path)
            if m:
                return route, m.groupdict()
    return None


def now() -> str:
    """RFC 3339 with a Z, as the master writes timestamps."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_json(obj: Any) -> Any:
    """A bindings object (or plain data) as JSON-ready data."""
    if hasattr(obj, "to_json"):
        return obj.to_json(omit_unset=True)
    return obj
