"""OpenAI's error envelope: every error body is {"error": {"message", "type", "param", "code"}}.

Status discipline (DESIGN.md): client mistakes are 4xx and never 5xx (SDKs retry 5xx, multiplying
load); overload is 429/503 with Retry-After; a deadline is 504 when the server ran out of time,
408 when the client's upload did (its body not in within the request's deadline). A client that
hangs up mid-upload is a 499 that only the access log and metrics see.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """An error the API answers with; raise it anywhere in the request path."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return ErrorBody(error=self.detail).model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist.",
        param="model",
        code="model_not_found",
    )


def service_unavailable(
    message: str, retry_after_s: int = 1, code: str = "service_unavailable"
) -> APIError:
    return APIError(
        503, message, type="server_error", code=code, headers={"Retry-After": str(retry_after_s)}
    )


def too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than the limit of {limit} bytes.",
        code="request_too_large",
    )


def client_closed_request() -> APIError:
    # The client hung up before its request arrived: nobody reads this answer, it is for the
    # access log and metrics, where nginx's 499 keeps it apart from a bad request and from the
    # server's own failures (5xx).
    return APIError(
        499,
        "The client closed the connection before the request body arrived.",
        code="client_closed_request",
    )


def body_timeout(timeout_s: float) -> APIError:
    # The client's upload stalled: a few such connections held every router slot (Serve's
    # max_ongoing_requests) while the rest got 503s.
    return APIError(
        408,
        f"The request body did not arrive within {timeout_s:g} s.",
        type="timeout",
        code="request_body_timeout",
    )


def request_timeout(timeout_s: float) -> APIError:
    # 504, not 408: the server (not the client's upload) ran out of time; SDKs retry both.
    return APIError(
        504,
        f"The request did not finish within {timeout_s:g} s.",
        type="timeout",
        code="request_timeout",
    )


def internal_error(message: str = "The server had an error processing the request.") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def from_validation_error(error: ValidationError) -> APIError:
    """The first bad field's error as a 400, with `param` the dotted path of the bad field.

    A union field (a prompt: text, token ids, texts, ...) has errors for each of its members,
    the text member's first: "Input should be a valid string" for token ids of which one is
    negative. Named instead: a member whose shape the value has (its errors lie inside the
    value, not on it), the one that got deepest into the value, then the one with the fewest
    errors; the first error when no member fits."""
    errors = error.errors(include_url=False)
    field = errors[0]["loc"][:1]
    members: dict[str | None, list[Any]] = {}
    for e in errors:
        if e["loc"][:1] == field:
            tag = next((str(p) for p in e["loc"] if isinstance(p, str) and _is_type_tag(p)), None)
            members.setdefault(tag, []).append(e)
    fitting = [
        group
        for tag, group in members.items()
        if tag is None or not any(e["loc"][-1] == tag for e in group)
    ]
    first = (
        min(fitting, key=lambda group: (-len(group[0]["loc"]), len(group)))[0]
        if fitting
        else errors[0]
    )
    # Union members add their type names to the path (e.g. messages.0.str); keep only field names
    # and indexes, which is what a client can act on.
    path = [str(p) for p in first["loc"] if isinstance(p, int) or not _is_type_tag(str(p))]
    param = ".".join(path) or None
    # Our validators' messages without pydantic's "Value error, " in front.
    reason = first["msg"].removeprefix("Value error, ")
    message = reason if param is None else f"{param}: {reason}"
    return bad_request(message, param=param)


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "list", "dict", "none"} or (
        part.startswith(("list[", "function-", "tagged-union[")) or "[" in part
    )
