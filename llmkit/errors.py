"""The error tree. Adapters raise these; the HTTP layer maps them to responses in one place.

::

    LLMKitError                      500 api_error
    ├── InternalError                500
    ├── InvalidRequestError          400 invalid_request_error
    │   ├── BodyTooLargeError        413
    │   ├── MethodNotAllowedError    405
    │   ├── HeaderTooLargeError      431
    │   └── UnprocessableError       422
    ├── AuthenticationError          401 authentication_error
    ├── PermissionDeniedError        403 permission_error
    ├── NotFoundError                404 not_found_error (model_not_found)
    ├── RequestTimeoutError          408 timeout_error
    ├── RateLimitError               429 rate_limit_error (+ Retry-After)
    └── UpstreamError                502 upstream_error
        ├── UpstreamTimeoutError     504
        ├── BadUpstreamResponseError 502
        └── ServiceUnavailableError  503

Messages are written for the caller and never carry credentials: adapters build them
from status codes and the upstream's own error text, never from request headers.
"""

from __future__ import annotations

import math


class LLMKitError(Exception):
    """Base of every error a request can end with."""

    status = 500
    type = "api_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.param = param
        self.retry_after = retry_after
        # Extra response headers the error must carry (x-ratelimit-* on a 429 ...).
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI-style error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def retry_after_header(self) -> str | None:
        """``Retry-After`` in whole seconds, rounded up, or None."""
        if self.retry_after is None:
            return None
        return str(max(1, math.ceil(self.retry_after)))


class InternalError(LLMKitError):
    status = 500
    code = "internal_error"


class InvalidRequestError(LLMKitError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class BodyTooLargeError(InvalidRequestError):
    status = 413
    code = "request_too_large"


class UnprocessableError(InvalidRequestError):
    status = 422
    code = "unprocessable_entity"


class AuthenticationError(LLMKitError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(LLMKitError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFoundError(LLMKitError):
    status = 404
    type = "not_found_error"
    code = "model_not_found"


class HeaderTooLargeError(InvalidRequestError):
    status = 431
    code = "request_header_too_large"


class MethodNotAllowedError(InvalidRequestError):
    status = 405
    code = "method_not_allowed"


class RequestTimeoutError(LLMKitError):
    status = 408
    type = "timeout_error"
    code = "request_timeout"


class RateLimitError(LLMKitError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(LLMKitError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    code = "upstream_timeout"


class BadUpstreamResponseError(UpstreamError):
    status = 502
    code = "bad_upstream_response"


class ServiceUnavailableError(UpstreamError):
    status = 503
    code = "service_unavailable"


_BY_STATUS: dict[int, type[LLMKitError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: RequestTimeoutError,
    413: BodyTooLargeError,
    422: UnprocessableError,
    429: RateLimitError,
    502: BadUpstreamResponseError,
    503: ServiceUnavailableError,
    504: UpstreamTimeoutError,
}


def error_for_status(status: int, message: str, retry_after: float | None = None) -> LLMKitError:
    """The most specific error for an upstream HTTP status (other 5xx: 502)."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = InvalidRequestError if 400 <= status < 500 else UpstreamError
        return cls(message, retry_after=retry_after, status=status if status < 500 else 502)
    return cls(message, retry_after=retry_after)
