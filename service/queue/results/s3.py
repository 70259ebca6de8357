"""``s3://bucket/prefix``: images as objects in an S3-compatible store (AWS S3, MinIO, R2, GCS interop).

The endpoint and the credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) or
any other source boto3 reads (an instance role, ``~/.aws``). Clients get presigned GET URLs, so the
images never pass through the API. Objects expire by a lifecycle rule on the bucket (deploy/README.md).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from service.queue.results.base import ImageMissing, ObjectStore, StoreUnavailable, content_type

CONNECT_TIMEOUT_SECONDS = 2.0
READ_TIMEOUT_SECONDS = 5.0  # an upload of a large PNG on a slow link still fits; a hung store is noticed


class S3Store(ObjectStore):
    """Objects at ``s3://<bucket>/<prefix>/<job id>/<index>.<ext>`` through boto3."""

    scheme = "s3"

    def __init__(
        self, bucket: str, prefix: str = "", endpoint_url: str | None = None, public_endpoint: str | None = None
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.public_endpoint = public_endpoint
        self._clients: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Import boto3 and make the clients now (about 0.3 s of CPU), not on the first request."""
        self._made()

    def _made(self) -> tuple[Any, Any]:
        """(the client, the presigning client), made on first use: an API replica is ready before boto3 loads."""
        with self._lock:
            if self._clients is None:
                import boto3
                from botocore.config import Config

                config = Config(
                    connect_timeout=CONNECT_TIMEOUT_SECONDS,
                    read_timeout=READ_TIMEOUT_SECONDS,
                    retries={"max_attempts": 2, "mode": "standard"},  # the worker retries uploads itself, with backoff
                    signature_version="s3v4",
                    # MinIO, moto and most self-hosted endpoints are reached by host name or IP: path-style addressing
                    s3={"addressing_style": "path" if self.endpoint_url else "auto"},
                )
                session = boto3.session.Session()
                client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
                # presigned URLs name the host they are signed for: clients may reach the store by another name
                presigner = (
                    session.client("s3", endpoint_url=self.public_endpoint, config=config)
                    if self.public_endpoint
                    else client
                )
                self._clients = (client, presigner)
            return self._clients

    @property
    def client(self) -> Any:
        return self._made()[0]

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data, ContentType=content_type(key))
        except Exception as error:
            raise StoreUnavailable(f"upload of {key} to {self.describe()} failed: {error}") from error

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._object(key))
            data: bytes = response["Body"].read()
            return data
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ImageMissing(f"no object {key!r}") from error
            raise StoreUnavailable(f"reading {key} from {self.describe()} failed: {error}") from error
        except Exception as error:
            raise StoreUnavailable(f"reading {key} from {self.describe()} failed: {error}") from error

    def presigned_url(self, key: str, expires_in: int) -> str | None:
        # signed locally with the credentials: no request to the store
        url: str = self._made()[1].generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._object(key)}, ExpiresIn=expires_in
        )
        return url
