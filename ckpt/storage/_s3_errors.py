"""How ckpt reads S3 failures: the error code and HTTP status anywhere in an exception's
chain, whether trying again may succeed, and the builtin or ckpt error each one means."""

from __future__ import annotations

import errno
from collections.abc import Callable

from ckpt.errors import StorageError, StoragePermissionError

# Error codes that mean "try again later" (S3 and S3-compatible servers).
TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded", "ServiceUnavailable",
    "InternalError", "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete",
    "OperationAborted", "BadGateway", "GatewayTimeout", "EC2ThrottledException",
    "ConditionalRequestConflict",  # two conditional writes of one key raced (AWS: retry)
    "500", "502", "503", "504", "429", "408",
}
PRECONDITION_CODES = {"PreconditionFailed", "412"}
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


def no_bucket(bucket: str, endpoint_url: str | None, what: str, where: str) -> StorageError:
    return StorageError(
        f"bucket {bucket!r} does not exist (while {what})", path=where,
        hint="create the bucket, or check the bucket name and the endpoint "
             f"({endpoint_url or 'AWS'}; set by endpoint_url= or AWS_ENDPOINT_URL_S3)",
    )


def translate(exc: BaseException, what: str, where: str, *, bucket: str, endpoint_url: str | None,
              scrub: Callable[[str], str]) -> Exception:
    """An s3fs/botocore error as the builtin or ckpt error it means (``scrub`` removes
    secrets from the text)."""
    code = error_code(exc)
    if code == "NoSuchBucket":
        return no_bucket(bucket, endpoint_url, what, where)
    if code in NOT_FOUND_CODES or (code is None and isinstance(exc, FileNotFoundError)):
        return FileNotFoundError(errno.ENOENT, "no such object", where)
    names = {t.__name__ for t in type(exc).__mro__}
    if code in PERMISSION_CODES or names & CREDENTIAL_ERRORS or isinstance(exc, PermissionError):
        detail = code or type(exc).__name__
        return StoragePermissionError(
            f"S3 refused access while {what} ({detail})", path=where,
            hint="check the credentials (key=/secret=, AWS_ACCESS_KEY_ID, AWS_PROFILE) "
                 "and the bucket's policy",
        )
    text = scrub(str(exc)) or type(exc).__name__
    return StorageError(f"S3 request failed while {what}: {text}", path=where,
                        hint="check the endpoint and the network; retrying is safe")
