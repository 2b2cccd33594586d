"""Where the bytes of uploaded files live: a folder (the default, ``PLUTO_FILES_DIR``) or an
S3-compatible bucket (``PLUTO_FILES_URL=s3://bucket/prefix``, with ``PLUTO_S3_ENDPOINT_URL``
for MinIO, Ceph, moto, ...; credentials and region from boto3's usual chain:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_REGION``, a profile or a role).

Either way an upload is first streamed to a local spool file (so the size limit holds and a
reader never sees half a file), then :meth:`put` makes it the file's content at once: a rename
on disk, one ``upload_file`` to the bucket (whose object appears only when complete). A file
is named by numbers only (``<run>/<file id>``): a client's file name never becomes a path or a
key. Downloads pass through the backend (its signed URL), so a bucket needs no public access
and the SDK never needs the bucket's address.

Errors: a bucket that cannot be reached, or that answers 5xx or throttles, is
:class:`Unavailable` (the route answers 503 and the client retries); a missing object is
"not found"; any other refusal (no such bucket, access denied) is a misconfiguration and
raised as is.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from ._settings import ServerSettings

CHUNK = 1 << 20


class Unavailable(Exception):
    """The file store cannot be reached just now: worth retrying."""


class Blobs(Protocol):
    def spool(self, run: int) -> Path:
        """A folder to stream an upload into before :meth:`put`."""

    def put(self, run: int, file_id: int, spooled: Path) -> None:
        """Make the complete file ``spooled`` the content of file ``file_id`` (it is moved)."""

    def delete(self, run: int, file_id: int) -> None: ...

    def chunks(self, run: int, file_id: int) -> Iterator[bytes] | None:
        """The file's bytes in chunks, or None if it is not there."""


class FolderBlobs:
    """``<folder>/<run>/<file id>``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder).expanduser().resolve()

    def spool(self, run: int) -> Path:
        path = self.folder / str(run)
        path.mkdir(parents=True, exist_ok=True)
        return path  # the same folder: the rename below is atomic

    def put(self, run: int, file_id: int, spooled: Path) -> None:
        os.replace(spooled, self.folder / str(run) / str(file_id))

    def delete(self, run: int, file_id: int) -> None:
        (self.folder / str(run) / str(file_id)).unlink(missing_ok=True)

    def chunks(self, run: int, file_id: int) -> Iterator[bytes] | None:
        path = self.folder / str(run) / str(file_id)
        if not path.is_file():
            return None
        return _file_chunks(path)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


class S3Blobs:
    """``s3://<bucket>/<prefix>/<run>/<file id>``; boto3 is imported here, not on import."""

    def __init__(self, url: str, endpoint: str, spool_dir: str) -> None:
        import boto3
        from botocore.config import Config

        parts = urlsplit(url)
        self.bucket, self.prefix = parts.netloc, parts.path.strip("/")
        self.client: Any = boto3.client(
            "s3", endpoint_url=endpoint or None,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5,
                          read_timeout=30))
        self.spool_dir = Path(spool_dir).expanduser().resolve() / ".spool"

    def _key(self, run: int, file_id: int) -> str:
        return f"{self.prefix}/{run}/{file_id}" if self.prefix else f"{run}/{file_id}"

    def spool(self, run: int) -> Path:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        return self.spool_dir

    def put(self, run: int, file_id: int, spooled: Path) -> None:
        try:
            with _translated():
                self.client.upload_file(str(spooled), self.bucket, self._key(run, file_id))
        finally:
            spooled.unlink(missing_ok=True)

    def delete(self, run: int, file_id: int) -> None:
        with _translated():
            self.client.delete_object(Bucket=self.bucket, Key=self._key(run, file_id))

    def chunks(self, run: int, file_id: int) -> Iterator[bytes] | None:
        from botocore.exceptions import ClientError

        try:
            with _translated():
                body = self.client.get_object(Bucket=self.bucket,
                                              Key=self._key(run, file_id))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return _closing(body.iter_chunks(CHUNK), body)


def _closing(chunks: Iterator[bytes], body: Any) -> Iterator[bytes]:
    try:
        yield from chunks
    finally:
        body.close()


@contextmanager
def _translated() -> Iterator[None]:
    """Connection failures, timeouts, throttling and 5xx of the bucket become
    :class:`Unavailable`; everything else passes through."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    try:
        yield
    except (ConnectionError, HTTPClientError) as exc:
        raise Unavailable(f"the file store cannot be reached: {exc}") from exc
    except ClientError as exc:
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if status >= 500 or exc.response.get("Error", {}).get("Code") in ("SlowDown",
                                                                          "Throttling"):
            raise Unavailable(f"the file store is unavailable: {exc}") from exc
        raise


@lru_cache(maxsize=8)
def open_blobs(settings: ServerSettings) -> Blobs:
    """The file store ``settings`` name (one per settings: boto3 clients are thread-safe)."""
    if settings.files_url:
        return S3Blobs(settings.files_url, settings.s3_endpoint, settings.files_dir)
    return FolderBlobs(settings.files_dir)


def spool_file(folder: Path, file_id: int) -> tuple[int, Path]:
    """A new temporary file in ``folder`` for an upload: ``(fd, path)``."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{file_id}.")
    return fd, Path(name)
