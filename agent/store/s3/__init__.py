"""The S3 checkpoint store: the same layout as the local store, in a bucket.

Blobs go straight to their content address (the engine computed the digest),
large ones as multipart uploads with bounded concurrency that are aborted on
any failure (``upload``); big blobs come back as parallel ranged GETs, every
byte checked against its digest and size (``download``).  Refs are replaced
with S3 conditional writes, so two writers of one studio cannot overwrite each
other (``refs``); leases the same way (``leases``).  ``listing`` pages through
blobs, studios and names (ListObjectsV2), ``cleanup`` deletes blobs and aborts
the multipart uploads writers left.  ``client`` configures the clients and runs
every request, ``errors`` says what S3's failures mean, ``files`` streams blob
files by offset and ``store`` composes them behind the ``Store`` interface.

Credentials, region and endpoint come from the standard AWS configuration
chain (``AWS_ENDPOINT_URL_S3`` points it at an S3-compatible store, which must
honour conditional PutObject and DeleteObject for refs to be safe).  The policy
the agent needs on ``<prefix>/.studios/checkpoints/*`` is s3:GetObject,
s3:PutObject, s3:DeleteObject and s3:AbortMultipartUpload, plus s3:ListBucket
(and, to clean up after lost answers, s3:ListBucketMultipartUploads) on the
bucket.  gc also needs s3:ListMultipartUploadParts, to say how large the
uploads it aborts are.  A bucket lifecycle rule ``AbortIncompleteMultipartUpload``
is the backstop for uploads whose abort could not reach S3 (the agent killed
mid-upload).
"""

from agent.store.s3.store import S3Store

__all__ = ["S3Store"]
