"""Where a call's files end up: the local archive, or an S3-compatible bucket.

`ARCHIVE_URL=file:///path` (or unset: `ARCHIVE_DIR`) keeps them where the recorder wrote
them (`FileStore`). `ARCHIVE_URL=s3://bucket/prefix` puts each one at
`<prefix>/<call dir>/<file>` (`S3Store`), on AWS or on any S3-compatible store named by
`S3_ENDPOINT_URL` (MinIO, SeaweedFS, R2), with one aiobotocore client per process.

A file counts as stored once the store has confirmed it: PutObject succeeded with a
Content-MD5 the store checked against the bytes it received, and a HEAD of the key
answers the size we sent and the ETag the PUT returned. Only then may the spool copy go.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlsplit

from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from app.config import Settings

__all__ = ["FileStore", "Link", "S3Store", "Store", "StoreError", "make_store"]

# HTTP statuses worth retrying: the store is busy or briefly broken. Any other 4xx
# (bad credentials, no such bucket, access denied) will answer the same next time.
_TRANSIENT = frozenset({408, 429, 500, 502, 503, 504})
_TYPES = {".wav": "audio/wav", ".json": "application/json"}


class StoreError(Exception):
    """The store did not take or confirm a file. The message is safe to log (no
    secrets, no signed URLs); `permanent` says a retry will not help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class Link:
    """Where a stored file can be fetched; `expires_at` None when the link does not expire."""

    url: str
    expires_at: datetime | None


class Store(Protocol):
    """Somewhere call files are kept. Keys are `<call dir>/<file name>`."""

    @property
    def remote(self) -> bool:
        """True when the files leave the spool (and the spool copy may go once stored)."""
        ...

    def describe(self) -> str:
        """Where, for logs (no credentials)."""
        ...

    async def start(self) -> None: ...

    async def put(self, key: str, path: Path) -> None:
        """Store the file at `path` under `key`; returns once the store confirmed it,
        else raises `StoreError` (or `OSError` when the local file cannot be read)."""
        ...

    async def link(self, key: str, ttl_s: int) -> Link: ...

    async def close(self) -> None: ...


class FileStore:
    """The local archive: the recorder already wrote the files where they belong."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return self.root.resolve().as_uri()

    async def start(self) -> None:
        return None

    async def put(self, key: str, path: Path) -> None:
        await asyncio.to_thread(self._put, self.root / key, path)

    @staticmethod
    def _put(target: Path, path: Path) -> None:
        if target.exists() and target.samefile(path):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(path, partial)
        partial.replace(target)

    async def link(self, key: str, ttl_s: int) -> Link:
        return Link((self.root / key).resolve().as_uri(), None)

    async def close(self) -> None:
        return None


class S3Store:
    """An S3 bucket (AWS or compatible), through one aiobotocore client."""

    remote = True

    def __init__(self, settings: Settings, *, concurrency: int = 4) -> None:
        assert settings.archive_url is not None
        parts = urlsplit(settings.archive_url)
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self._settings = settings
        self._concurrency = concurrency
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        endpoint = self._settings.s3_endpoint_url
        return f"{where} at {endpoint}" if endpoint else where

    async def start(self) -> None:
        """Create the client (no request is made: a store that is down now is retried
        later, call by call)."""
        settings = self._settings
        secret, token = settings.aws_secret_access_key, settings.aws_session_token
        config = AioConfig(
            signature_version="s3v4",  # presigned links are SigV4 (SigV2's are legacy)
            connect_timeout=5,
            read_timeout=30,
            retries={"total_max_attempts": 1},  # the spool retries, with its backoff
            max_pool_connections=self._concurrency,
            # No SHA-256 of the body, which botocore computes on the loop over plain http:
            # the signed Content-MD5 covers the body's integrity (over https botocore
            # already skips it when Content-MD5 is there).
            s3={"payload_signing_enabled": False},
            # Checksums only where an operation requires them: many S3-compatible stores
            # refuse botocore's default flexible checksums (docs/object-storage.md).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = get_session().create_client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.aws_region or "us-east-1",
            aws_access_key_id=settings.aws_access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            aws_session_token=token.get_secret_value() if token else None,
            config=config,
        )
        self._client = await self._stack.enter_async_context(client)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    async def put(self, key: str, path: Path) -> None:
        """The body streams from the file (a whole hour of call in one bytes object would
        be copied on the loop, stalling it ~50 ms); its MD5 is computed off the loop."""
        size, md5, body = await asyncio.to_thread(_open, path)
        name = self._key(key)
        try:
            sent = await self._client.put_object(
                Bucket=self.bucket,
                Key=name,
                Body=body,
                ContentLength=size,
                ContentMD5=md5,
                ContentType=_TYPES.get(path.suffix, "application/octet-stream"),
            )
            head = await self._client.head_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            raise _refused(exc) from None
        except BotoCoreError as exc:  # no connection, a timeout
            raise StoreError(f"{type(exc).__name__}: {exc}") from None
        finally:
            body.close()
        if head.get("ContentLength") != size or head.get("ETag") != sent.get("ETag"):
            raise StoreError(
                f"{name}: the store holds {head.get('ContentLength')} bytes, "
                f"ETag {head.get('ETag')}; sent {size} bytes, ETag {sent.get('ETag')}"
            )

    async def link(self, key: str, ttl_s: int) -> Link:
        """A presigned GET, valid `ttl_s` seconds (SigV4: at most 7 days; with temporary
        credentials, no longer than they last)."""
        url = await self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=ttl_s
        )
        return Link(url, datetime.fromtimestamp(time.time() + ttl_s, UTC))

    async def close(self) -> None:
        await self._stack.aclose()


def _open(path: Path) -> tuple[int, str, BinaryIO]:
    """The file's size, base64 MD5 (the Content-MD5 header) and an open handle at its
    start; run off the loop."""
    body = path.open("rb")
    try:
        md5 = hashlib.file_digest(body, "md5").digest()
        size = body.tell()
        body.seek(0)
    except BaseException:
        body.close()
        raise
    return size, base64.b64encode(md5).decode(), body


def _refused(exc: ClientError) -> StoreError:
    """The store's answer, by code and status (its message too: it carries no secret)."""
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    code = error.get("Code", "unknown")
    message = str(error.get("Message", ""))[:200]
    return StoreError(f"{code} (HTTP {status}): {message}", permanent=status not in _TRANSIENT)


def make_store(settings: Settings) -> Store:
    """The store ARCHIVE_URL names (unset or file://: the local archive, ARCHIVE_DIR)."""
    if settings.archive_url and urlsplit(settings.archive_url).scheme == "s3":
        return S3Store(settings)
    return FileStore(settings.archive_dir)
