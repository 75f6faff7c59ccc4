"""Where a store's objects live: a local directory, or an S3-compatible bucket (through obstore,
the Rust object_store client: its calls run without the GIL, so many fetches overlap).

Both speak keys ("chunks/ab/abcd...", "snapshots/vm-7.json"); listing returns each key with its
modification time on the store's own clock."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from .address import split_store_url
from .errors import StoreError

# obstore retries on its own for up to this long before a call fails: our callers (push, the
# fetchers) add their own retries and deadlines on top.
S3_RETRY_SECONDS = 5.0


class Backend(Protocol):
    url: str

    def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError if there is none."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Store the object whole (a reader never sees part of it)."""
        ...

    def size(self, key: str) -> int | None:
        """The object's size, or None if there is none."""
        ...

    def delete(self, key: str) -> None:
        """Delete the object; no error if there is none."""
        ...

    def list(self, prefix: str) -> Iterator[tuple[str, float, int]]:
        """(key, modification time as a UNIX time, size) of every object under prefix."""
        ...


class FileBackend:
    """A directory. Objects are written to a temporary name and renamed into place."""

    def __init__(self, url: str, root: str) -> None:
        self.url = url
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def list(self, prefix: str) -> Iterator[tuple[str, float, int]]:
        top = self._path(prefix)
        for dirpath, _, files in os.walk(top):
            for name in files:
                if name.startswith("."):  # a write in progress
                    continue
                path = Path(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    st = path.stat()
                    yield path.relative_to(self.root).as_posix(), st.st_mtime, st.st_size


class S3Backend:
    """A bucket and prefix. Endpoint, region and credentials come from the AWS_* variables
    (AWS_ENDPOINT_URL may be http:// for a local store)."""

    def __init__(self, url: str, bucket: str, prefix: str, timeout: float = 30.0) -> None:
        from obstore.store import S3Store

        self.url = url
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")
        self.store = S3Store(
            bucket,
            prefix=prefix or None,
            client_options={
                "allow_http": endpoint.startswith("http://"),
                "connect_timeout": f"{min(timeout, 5.0)}s",
                "timeout": f"{timeout}s",
            },
            retry_config={
                "max_retries": 3,
                "retry_timeout": timedelta(seconds=min(timeout, S3_RETRY_SECONDS)),
                "backoff": {
                    "init_backoff": timedelta(milliseconds=50),
                    "max_backoff": timedelta(seconds=1),
                    "base": 2,
                },
            },
        )

    @contextlib.contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        """obstore's errors, as one line naming the store, the operation and the S3 error code
        (obstore's own messages run to dozens of lines). A missing object stays
        FileNotFoundError; a missing bucket is a StoreError saying so."""
        from obstore.exceptions import BaseError

        try:
            yield
        except (BaseError, OSError) as e:
            text = str(e)
            code = re.search(r"<Code>(\w+)</Code>", text)
            if code and code.group(1) == "NoSuchBucket":
                raise StoreError(errno.ENOENT, f"{self.url}: the bucket does not exist") from None
            if isinstance(e, FileNotFoundError):
                raise
            why = code.group(1) if code else text.split("\n", 1)[0][:300]
            raise StoreError(errno.EIO, f"{self.url}: {op} {key!r} failed: {why}") from None

    def get(self, key: str) -> bytes:
        import obstore

        with self._errors("GET", key):
            return bytes(obstore.get(self.store, key).bytes())

    def put(self, key: str, data: bytes) -> None:
        import obstore

        with self._errors("PUT", key):
            obstore.put(self.store, key, data)

    def size(self, key: str) -> int | None:
        import obstore

        try:
            with self._errors("HEAD", key):
                return int(obstore.head(self.store, key)["size"])
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError), self._errors("DELETE", key):
            obstore.delete(self.store, key)

    def list(self, prefix: str) -> Iterator[tuple[str, float, int]]:
        import obstore

        with self._errors("LIST", prefix):
            for batch in obstore.list(self.store, prefix):
                for meta in batch:
                    yield meta["path"], meta["last_modified"].timestamp(), int(meta["size"])


def open_backend(url: str, timeout: float = 30.0) -> Backend:
    """``timeout``: the longest one request to a remote store may take (a store that stopped
    answering must not hold a fetch past its deadline)."""
    scheme, where, prefix = split_store_url(url)
    if scheme == "file":
        return FileBackend(url, where)
    return S3Backend(url, where, prefix, timeout)


def server_now(backend: Backend, key: str) -> float:
    """The store's clock: the modification time of an object written just now at key."""
    backend.put(key, str(time.time()).encode())
    for found, mtime, _ in backend.list(key.rpartition("/")[0]):
        if found == key:
            return mtime
    return time.time()
