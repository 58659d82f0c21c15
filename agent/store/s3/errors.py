"""What S3's failures mean, as the agent's errors.

A refusal names the IAM action the operation needs and where, so the fix is
in the message; throttling and broken connections that outlast their retries
say how many tries were made.
"""

from __future__ import annotations

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from agent.errors import (
    AgentError,
    NotFound,
    PermissionDenied,
    RefConflict,
    StoreError,
    StoreUnavailable,
)
from agent.store.retry import RetriesExhausted, error_code, http_status, is_transient

# The IAM action each operation needs, for PermissionDenied messages.
_ACTIONS = {
    "HeadObject": "s3:GetObject",
    "GetObject": "s3:GetObject",
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload",
    "ListMultipartUploads": "s3:ListBucketMultipartUploads",
    "DeleteObject": "s3:DeleteObject",
    "CopyObject": "s3:PutObject",
    "UploadPartCopy": "s3:PutObject",
    "ListParts": "s3:ListMultipartUploadParts",
    "ListObjectsV2": "s3:ListBucket",
}
# 403s that mean the credentials themselves are bad, not a missing permission.
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "RequestTimeTooSkewed",
    }
)


class Missing(NotFound):
    """The object does not exist (404); callers turn it into None or BlobMissing."""


class PreconditionFailed(RefConflict):
    """A conditional write or delete lost (412, or 409 while a rival one was in flight)."""


def location(bucket: str, key: str | None) -> str:
    return f"s3://{bucket}/{key}" if key is not None else f"s3://{bucket}"


def describe(e: BaseException) -> str:
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = err.get("Code") or str(http_status(e))
        message = err.get("Message", "")
        return f"{code} ({http_status(e)}){': ' + message if message else ''}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def failure(
    e: Exception, op: str, bucket: str, key: str | None, detail: str, max_attempts: int
) -> AgentError | None:
    """The ``AgentError`` that ``e``, met running S3 ``op`` on ``key``, means.

    None for an error that is not S3's (one the operation raised itself, a
    ``DigestMismatch`` say), which the caller raises as it is.
    """
    where = location(bucket, key)
    if isinstance(e, RetriesExhausted):
        return _unavailable(op, where, detail, e.attempts, e.last)
    if isinstance(e, ClientError):
        return _translate(op, bucket, key, detail, e)
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return StoreError(
            f"no usable AWS credentials for S3 {op} of {where}: {e} (set them in "
            "the environment, the shared credentials file, or a container/instance role)"
        )
    if is_transient(e):
        return _unavailable(op, where, detail, max_attempts, e)
    if isinstance(e, BotoCoreError):
        return StoreError(f"S3 {op} of {where}{detail} failed: {e}")
    return None


def _unavailable(
    op: str, where: str, detail: str, attempts: int, e: BaseException
) -> StoreUnavailable:
    return StoreUnavailable(
        f"S3 {op} of {where}{detail} failed after {attempts} "
        f"{'try' if attempts == 1 else 'tries'}: {describe(e)}"
    )


def _translate(op: str, bucket: str, key: str | None, detail: str, e: ClientError) -> AgentError:
    code, status = error_code(e), http_status(e)
    where = location(bucket, key)
    retries = int(e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0))
    if code in _CREDENTIAL_CODES:
        return StoreError(f"S3 rejected the credentials for {op} of {where}: {describe(e)}")
    if status == 403 or code in ("AccessDenied", "AllAccessDisabled"):
        action = _ACTIONS.get(op, f"s3:{op}")
        bucket_wide = action in ("s3:ListBucket", "s3:ListBucketMultipartUploads")
        resource = location(bucket, None) if bucket_wide else where
        hint = ""
        if op == "HeadObject":
            hint = " (without s3:ListBucket, S3 also answers 403 for a missing object)"
        elif op == "DeleteObject":
            hint = " (a conditional delete also needs s3:GetObject)"
        return PermissionDenied(
            f"permission denied: S3 {op} needs {action} on {resource}{hint}: {describe(e)}"
        )
    if code == "NoSuchBucket":
        return StoreError(f"S3 bucket {bucket} does not exist ({op} of {where})")
    if code in ("NoSuchKey", "NotFound") or (status == 404 and code in ("", "404")):
        return Missing(f"{where} does not exist")
    if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
        return PreconditionFailed(f"S3 {op} of {where}: {describe(e)}")
    if is_transient(e):
        return _unavailable(op, where, detail, retries + 1, e)
    return StoreError(f"S3 {op} of {where}{detail} failed: {describe(e)}")
