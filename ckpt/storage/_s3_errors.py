"""How ckpt reads S3 failures: the error code and HTTP status anywhere in an exception's
chain, and whether trying again may succeed."""

from __future__ import annotations

# Error codes that mean "try again later" (S3 and S3-compatible servers).
TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded", "ServiceUnavailable",
    "InternalError", "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete",
    "OperationAborted", "BadGateway", "GatewayTimeout", "EC2ThrottledException",
    "500", "502", "503", "504", "429", "408",
}
PERMISSION_CODES = {
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AccountProblem", "403",
}
NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                      "ProfileNotFound", "UnauthorizedSSOTokenError", "TokenRetrievalError"}


def error_code(exc: BaseException | None) -> str | None:
    """The S3 error code of a botocore ClientError anywhere in ``exc``'s chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        resp = getattr(exc, "response", None)
        if isinstance(resp, dict):
            code = resp.get("Error", {}).get("Code")
            if code:
                return str(code)
        exc = exc.__cause__ or exc.__context__
    return None


def brief(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


def http_status(exc: BaseException | None) -> int | None:
    """The HTTP status of a botocore ClientError anywhere in ``exc``'s chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        resp = getattr(exc, "response", None)
        if isinstance(resp, dict):
            status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if status:
                return int(status)
        exc = exc.__cause__ or exc.__context__
    return None


def error_chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and all(exc is not x for x in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def is_timeout(exc: BaseException) -> bool:
    """The attempt ran out of the deadline (fsspec's sync timeout)."""
    names = {t.__name__ for e in error_chain(exc) for t in type(e).__mro__}
    return "FSTimeoutError" in names or (isinstance(exc, TimeoutError) and str(exc) == "no time left")


def retryable(exc: BaseException) -> bool:
    """Whether trying again may succeed: throttling, 5xx, connection trouble, cut bodies."""
    code = error_code(exc)
    if code in NOT_FOUND_CODES or code in PERMISSION_CODES or code in ("NoSuchBucket", "NoSuchUpload"):
        return False
    if code in TRANSIENT_CODES:
        return True
    status = http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    for e in error_chain(exc):
        names = {t.__name__ for t in type(e).__mro__}
        if names & {"HTTPClientError", "ConnectionError", "ConnectionClosedError", "EndpointConnectionError",
                    "ReadTimeoutError", "ConnectTimeoutError", "IncompleteReadError", "ResponseStreamingError",
                    "ResponseParserError", "IncompleteRead", "ClientPayloadError", "ClientConnectionError",
                    "ServerDisconnectedError", "ClientOSError", "ServerTimeoutError", "RemoteDisconnected"}:
            return True
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if "reduce your request rate" in str(e) or "SlowDown" in str(e):
            return True
    return False
