"""Stores: one small interface over a local folder and an S3 prefix, plus a content cache.

    store = open_store("s3://bucket/zoo")          # or "./zoo", "/abs/zoo", "file:///abs/zoo"
    header = store.read_range("teachers/a/model.safetensors", 0, 8)
    path = ContentCache().fetch(store, "teachers/a/model.safetensors", sha256)

Keys are '/'-separated and relative to the store's root. Every write is atomic: a reader
never sees a half-written file under a key. Errors are the typed errors of
`sctd_ray.errors` with one clear line; credentials never appear in them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sctd_ray.errors import BucketNotFound, NotFound, StoreAuthError, StoreError, StoreUnreachable

Callback = Callable[[int], Any]  # called with a number of bytes just transferred

TMP_SUFFIX = ".sctd-tmp"  # temp files of in-flight atomic writes; never listed as keys
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def md5_file(path: str | os.PathLike) -> str:
    """Hex md5 of a file's content (what a single-part S3 ETag is)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_key(key: str) -> str:
    """A key must be relative, '/'-separated, without empty, '.' or '..' parts."""
    parts = key.split("/") if isinstance(key, str) else None
    if (not key or not parts or any(p in ("", ".", "..") for p in parts) or "\\" in key
            or key.endswith(TMP_SUFFIX)):
        raise StoreError(f"invalid key {key!r}: expected a relative path like 'a/b.json'")
    return key


def _check_prefix(prefix: str) -> str:
    if prefix and any(p in (".", "..") for p in prefix.split("/")):
        raise StoreError(f"invalid prefix {prefix!r}: '.' and '..' are not allowed")
    return prefix.lstrip("/")


def _temp_path(final: Path) -> Path:
    """A fresh, hidden, empty temp file next to `final` (same folder, so os.replace is
    atomic), with the umask's usual permissions (mkstemp's 0600 would hide shared zoos)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temp file next to {final}")


def _commit(tmp: Path, final: Path) -> None:
    """fsync `tmp` and atomically move it to `final`."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class Store(ABC):
    """A flat key -> bytes store rooted at `uri`. Picklable; safe to share across threads."""

    @property
    @abstractmethod
    def uri(self) -> str:
        """The store's root: an absolute local path or `s3://bucket[/prefix]`."""

    @abstractmethod
    def join(self, key: str) -> str:
        """The full uri (local path or s3:// url) of `key`."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with `prefix` (a plain string prefix, as in S3), recursive, sorted."""
        return sorted(self.modified(prefix))

    @abstractmethod
    def modified(self, prefix: str = "") -> dict[str, float]:
        """``list``'s keys with their last-modified times (Unix seconds), from the same listing."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Up to `length` bytes from offset `start` (fewer at the end, b"" past it)."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write `data` under `key`, atomically (replaces an existing key)."""

    @abstractmethod
    def download(self, key: str, local_path: str | os.PathLike,
                 callback: Callback | None = None) -> Path:
        """Copy `key` to a local file (atomically); returns the local path."""

    @abstractmethod
    def upload(self, local_path: str | os.PathLike, key: str,
               callback: Callback | None = None, sha256: str | None = None) -> None:
        """Copy a local file to `key` (atomically). `sha256` saves re-hashing when known."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; removing a missing key is not an error (as in S3)."""

    @abstractmethod
    def info(self, key: str) -> dict[str, Any]:
        """`size` plus change markers: `mtime` (local) or `etag`, `mtime`, `sha256` (S3,
        sha256 is None unless the object was written by this module)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


# -- local folder --------------------------------------------------------------------


def _real_and_above(path: str) -> set[str]:
    """The real path of ``path`` and of every folder above it."""
    real = Path(os.path.realpath(path))
    return {str(real), *map(str, real.parents)}


class LocalStore(Store):
    """A folder on the local file system (or a shared mount)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.abspath(os.path.expanduser(root)))
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store root is a file, not a folder: {self.root}")

    @property
    def uri(self) -> str:
        return str(self.root)

    def path(self, key: str) -> Path:
        """The local path of `key`."""
        return self.root / _check_key(key)

    def join(self, key: str) -> str:
        return str(self.path(key))

    def _error(self, exc: OSError, path: Path) -> StoreError:
        if isinstance(exc, FileNotFoundError):
            return NotFound(f"not found: {path}")
        if isinstance(exc, IsADirectoryError):
            return NotFound(f"not a file (a folder): {path}")
        if isinstance(exc, PermissionError):
            return StoreError(f"permission denied: {path}")
        return StoreError(f"{path}: {exc.strerror or exc}")

    def _stat(self, key: str) -> os.stat_result:
        path = self.path(key)
        try:
            st = path.stat()
        except OSError as exc:
            raise self._error(exc, path) from exc
        if not path.is_file():
            raise NotFound(f"not a file (a folder): {path}")
        return st

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        return self._stat(key).st_size

    def info(self, key: str) -> dict[str, Any]:
        st = self._stat(key)
        return {"size": st.st_size, "mtime": st.st_mtime}

    def _walk(self, prefix: str):
        """(key, path) of each file under ``prefix``: only the deepest folder the prefix names
        is walked, then keys are filtered by string prefix. A linked folder is walked like any
        other (a zoo may link its teachers in, as it may link files), except a link back to a
        folder above it, which would loop."""
        prefix = _check_prefix(prefix)
        base = str(self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root)
        # each folder walked: the real paths of the folders it is in, on disk (a link to the
        # zoo's root or to / is one too, not only a link to a folder walked) and through links
        above = {base: _real_and_above(base)}
        real_of = {base: os.path.realpath(base)}
        for folder, dirs, files in os.walk(base, followlinks=True):
            chain, here = above.pop(folder), real_of.pop(folder)
            keep = []
            for name in dirs:
                path = os.path.join(folder, name)
                # a plain folder's real path is its parent's plus its name (no realpath's lstat
                # per path component): only a link can lead back above itself
                real = os.path.realpath(path) if os.path.islink(path) else os.path.join(here, name)
                if real not in chain:
                    keep.append(name)
                    above[path] = chain | ({real} if os.path.dirname(real) in chain
                                           else _real_and_above(real))
                    real_of[path] = real
            dirs[:] = keep
            rel = Path(folder).relative_to(self.root).as_posix()
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.endswith(TMP_SUFFIX) and key.startswith(prefix):
                    yield key, os.path.join(folder, name)

    def list(self, prefix: str = "") -> list[str]:
        return sorted(key for key, _path in self._walk(prefix))   # no stat per file

    def modified(self, prefix: str = "") -> dict[str, float]:
        keys = {}
        for key, path in self._walk(prefix):
            try:
                keys[key] = os.stat(path).st_mtime
            except FileNotFoundError:   # removed while listed
                pass
        return keys

    def read_bytes(self, key: str) -> bytes:
        path = self.path(key)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise self._error(exc, path) from exc

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"start and length must be >= 0, got {start}, {length}")
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(length)
        except OSError as exc:
            raise self._error(exc, path) from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        final = self.path(key)
        try:
            tmp = _temp_path(final)
        except OSError as exc:
            raise self._error(exc, final.parent) from exc
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise self._error(exc, final) from exc
            raise

    def download(self, key: str, local_path: str | os.PathLike,
                 callback: Callback | None = None) -> Path:
        return _copy_file(self.path(key), Path(local_path), callback, self._error)

    def upload(self, local_path: str | os.PathLike, key: str,
               callback: Callback | None = None, sha256: str | None = None) -> None:
        _copy_file(Path(local_path), self.path(key), callback, self._error)

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise self._error(exc, path) from exc


def _copy_file(src: Path, dst: Path, callback: Callback | None, on_error) -> Path:
    """Copy src to dst atomically (temp file next to dst, then os.replace)."""
    if not src.is_file():
        raise NotFound(f"not found: {src}")
    try:
        tmp = _temp_path(dst)
    except OSError as exc:
        raise on_error(exc, dst.parent) from exc
    try:
        shutil.copyfile(src, tmp)
        _commit(tmp, dst)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise on_error(exc, src if isinstance(exc, FileNotFoundError) else dst) from exc
        raise
    if callback is not None:
        callback(dst.stat().st_size)
    return dst


# -- S3 ------------------------------------------------------------------------------

S3_MAX_ATTEMPTS = 6  # botocore "standard" retries: throttling, 5xx, transient errors
S3_CONNECT_ATTEMPTS = 2  # but an endpoint that refuses/does not answer fails fast
S3_CONNECT_TIMEOUT = 3
S3_READ_TIMEOUT = 60
S3_PROBE_READ_TIMEOUT = 5  # the first request of a client: an endpoint that never answers fails fast
S3_THREADS = 8
MB = 1 << 20
S3_READ_PART = 16 * MB  # byte-range size of ``S3Store.read_bytes`` (AWS's guidance: 8 or 16 MB)

_AUTH_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "AllAccessDisabled",
    "InvalidToken", "ExpiredToken", "TokenRefreshRequired", "InvalidClientTokenId",
    "AuthorizationHeaderMalformed", "MissingSecurityHeader", "403", "Forbidden",
}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchBucket"}


def _resolve_endpoint(s3_endpoint: str | None) -> str | None:
    endpoint = (s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or None)
    if endpoint and "://" not in endpoint:
        raise StoreError(f"S3 endpoint must be a URL like http://host:9000, got {endpoint!r}")
    return endpoint.rstrip("/") if endpoint else None


def _range_total(content_range: str | None) -> int | None:
    """The object size from a Content-Range header such as ``bytes 0-15/1000``."""
    if not content_range or "/" not in content_range:
        return None
    size = content_range.rsplit("/", 1)[1]
    return int(size) if size.isdigit() else None


def _transient_read_errors() -> tuple[type[Exception], ...]:
    """What a response body's read raises when the connection breaks off mid-body."""
    from botocore.exceptions import (IncompleteReadError, ReadTimeoutError,
                                     ResponseStreamingError)
    from urllib3.exceptions import HTTPError as Urllib3Error

    return (IncompleteReadError, ReadTimeoutError, ResponseStreamingError, Urllib3Error,
            ConnectionError, TimeoutError)


def _fail_fast_on_connect(caught_exception=None, attempts=0, **_kwargs):
    """needs-retry hook: stop retrying connection failures after S3_CONNECT_ATTEMPTS.

    botocore's retry policy treats a refused connection like a throttle; raising here
    cuts the back-off short so an unreachable endpoint fails within seconds.
    """
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(caught_exception, BotoConnectionError) and attempts >= S3_CONNECT_ATTEMPTS:
        raise caught_exception


class S3Store(Store):
    """Objects under `s3://bucket/prefix`, through one thread-safe boto3 client."""

    def __init__(self, bucket: str, prefix: str = "", s3_endpoint: str | None = None):
        if not bucket:
            raise StoreError("S3 uri has no bucket: expected s3://bucket[/prefix]")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = _resolve_endpoint(s3_endpoint)
        self._client = None
        self._unreachable: StoreError | None = None    # the probe's failure, said once
        self._pool: ThreadPoolExecutor | None = None   # the parts of ``read_bytes``
        self._lock = threading.Lock()

    # pickling ships the location only; the client (and so any credential) is rebuilt
    # lazily from the standard credential chain where the store is unpickled.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_client"] = state["_pool"] = state["_unreachable"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def client(self):
        """The boto3 S3 client, created on first use. An endpoint found unreachable then
        stays so for this store: later calls (other threads, other keys) raise the same
        error at once instead of probing again."""
        if self._client is None:
            with self._lock:
                if self._unreachable is not None:
                    raise self._unreachable
                if self._client is None:
                    try:
                        self._client = self._make_client()
                    except StoreError as exc:
                        self._unreachable = exc
                        raise
        return self._client

    def _make_client(self):
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=S3_CONNECT_TIMEOUT,
            read_timeout=S3_READ_TIMEOUT,
            retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
            max_pool_connections=4 * S3_THREADS,
            # S3-compatible servers (SeaweedFS, MinIO, Ceph) address buckets by path
            s3={"addressing_style": "path"} if self.endpoint else None,
        )
        probe_config = config.merge(Config(read_timeout=S3_PROBE_READ_TIMEOUT,
                                           retries={"mode": "standard",
                                                    "total_max_attempts": S3_CONNECT_ATTEMPTS}))
        try:
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=self.endpoint, config=config)
            probe = session.client("s3", endpoint_url=self.endpoint, config=probe_config)
        except Exception as exc:  # bad profile, bad region, malformed endpoint...
            raise StoreError(f"cannot configure S3 client for {self.uri}: {exc}") from exc
        client.meta.events.register_first("needs-retry.s3", _fail_fast_on_connect)
        probe.meta.events.register_first("needs-retry.s3", _fail_fast_on_connect)
        self._check_answers(probe)
        return client

    def _check_answers(self, probe) -> None:
        """One HEAD of the bucket with a short read timeout before the real client is used:
        an endpoint that accepts connections but never answers (a wrong port, a stuck proxy)
        would otherwise hold every call for ``S3_READ_TIMEOUT`` x ``S3_MAX_ATTEMPTS``. Any
        answer, even 403 or 404, will do: the real call reports those."""
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import ReadTimeoutError

        try:
            probe.head_bucket(Bucket=self.bucket)
        except ReadTimeoutError:
            raise StoreUnreachable(
                f"S3 endpoint {self.endpoint or '(AWS default endpoint)'} accepts connections but "
                f"did not answer ({S3_CONNECT_ATTEMPTS} tries of {S3_PROBE_READ_TIMEOUT} s): check --s3-endpoint or "
                "AWS_ENDPOINT_URL_S3") from None
        except BotoConnectionError as exc:
            raise self._error(exc) from None
        except Exception:
            pass

    @property
    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=16 * MB, multipart_chunksize=16 * MB,
                              max_concurrency=S3_THREADS, use_threads=True)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _full(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def join(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _error(self, exc: Exception, key: str | None = None) -> StoreError | None:
        """Map a boto3/botocore/transfer exception to one typed, credential-free line.

        None for anything else (a bug should surface as itself, not as a StoreError).
        """
        import s3transfer.exceptions
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import (BotoCoreError, ClientError, NoCredentialsError,
                                         PartialCredentialsError)
        from botocore.exceptions import ConnectionError as BotoConnectionError

        where = self.join(key) if key else self.uri
        endpoint = self.endpoint or "(AWS default endpoint)"
        if isinstance(exc, StoreError):
            return exc
        if isinstance(exc, Boto3Error) or type(exc).__module__ == s3transfer.exceptions.__name__:
            # boto3's managed transfers wrap the real error (S3UploadFailedError, ...)
            inner = (getattr(exc, "last_exception", None) or exc.__cause__
                     or exc.__context__)
            mapped = self._error(inner, key) if inner is not None else None
            return mapped or StoreError(f"S3 transfer failed for {where}: {exc}")
        if isinstance(exc, BotoConnectionError):
            reason = str(exc.kwargs.get("error") or exc)
            if "[Errno" in reason:
                reason = reason[reason.index("[Errno"):].rstrip(")'\"")
            return StoreUnreachable(f"cannot reach S3 endpoint {endpoint}: {reason}")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreAuthError(
                f"no usable S3 credentials for {where}: set AWS_ACCESS_KEY_ID and"
                " AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _AUTH_CODES or status == 403:
                # the server's message is left out: it may echo request details
                return StoreAuthError(
                    f"S3 refused access to {where} ({code or status}) at {endpoint}:"
                    " check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or"
                    " AWS_PROFILE) and their permissions")
            if code == "NoSuchBucket":
                return BucketNotFound(f"bucket not found: s3://{self.bucket} at {endpoint}")
            if code in _NOT_FOUND_CODES or status == 404:
                return NotFound(f"not found: {where}")
            return StoreError(f"S3 error on {where}: {code or status}: "
                              f"{error.get('Message', '')}".rstrip(": "))
        if isinstance(exc, BotoCoreError):
            return StoreError(f"S3 error on {where}: {exc}")
        if isinstance(exc, OSError):  # local side of a transfer
            return StoreError(f"local file error while transferring {where}: {exc}")
        return None

    def _call(self, key: str | None, fn, *args, **kwargs):
        """Run one client call, mapping its errors."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            mapped = self._error(exc, key)
            if mapped is None:
                raise
            raise mapped from exc

    def _head(self, key: str) -> dict:
        return self._call(key, self.client.head_object, Bucket=self.bucket,
                          Key=self._full(key))

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except NotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def info(self, key: str) -> dict[str, Any]:
        head = self._head(key)
        return {
            "size": int(head["ContentLength"]),
            "etag": head.get("ETag", "").strip('"'),
            "mtime": head["LastModified"].timestamp() if head.get("LastModified") else None,
            "sha256": head.get("Metadata", {}).get("sha256"),
        }

    def modified(self, prefix: str = "") -> dict[str, float]:
        prefix = _check_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        keys = {}

        def page_through():
            keys.clear()     # a retried listing starts over
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix):
                for obj in page.get("Contents", ()):
                    key = obj["Key"][len(root):]
                    if key and not key.endswith("/"):
                        when = obj.get("LastModified")
                        keys[key] = when.timestamp() if when else 0.0

        self._call(None, page_through)
        return keys

    def read_bytes(self, key: str) -> bytes:
        """The whole object as byte-range GETs of ``S3_READ_PART`` bytes, ``S3_THREADS`` at a
        time once the first response's headers give the size. One S3 connection carries
        roughly 80-100 MB/s; AWS's performance guidelines fetch large objects as concurrent
        8-16 MB ranges. An object of one part costs the one request it always did; a part whose
        body breaks off is fetched again; an object that changes between parts (its ETag) is
        refused."""
        resp = self._ranged_get(key, 0, S3_READ_PART)
        if resp is None:                  # an empty object
            return b""
        total = _range_total(resp.get("ContentRange"))
        if total is None or total <= S3_READ_PART:   # one part, or all of it (Range ignored)
            return self._get_part(key, 0, total or int(resp["ContentLength"]), resp=resp)[0]
        etag = resp.get("ETag")
        rest = [self._read_pool().submit(self._get_part, key, s, min(S3_READ_PART, total - s), etag)
                for s in range(S3_READ_PART, total, S3_READ_PART)]
        try:   # the first part's body arrives here while the pool fetches the others
            parts = [self._get_part(key, 0, S3_READ_PART, etag, resp=resp)[0]]
            parts += [f.result()[0] for f in rest]
        finally:
            for f in rest:
                f.cancel()
        return b"".join(parts)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"start and length must be >= 0, got {start}, {length}")
        if length == 0:
            self._head(key)  # still NotFound for a missing key
            return b""
        return self._get_part(key, start, length)[0]

    def _read_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(S3_THREADS, thread_name_prefix="s3-read")
        return self._pool

    def _get_part(self, key: str, start: int, length: int, etag: str | None = None,
                  resp: dict | None = None) -> tuple[bytes, int, str | None]:
        """Bytes ``[start, start + length)`` of the object (fewer at its end, none past it),
        its total size and its ETag; ``resp``: this range's response when already requested.
        botocore retries a request that fails before its body (throttling, 5xx); this retries
        one whose body breaks off or comes short, up to ``S3_MAX_ATTEMPTS`` times. With
        ``etag``, a part of another version is refused."""
        for attempt in range(1, S3_MAX_ATTEMPTS + 1):
            if resp is None or attempt > 1:
                resp = self._ranged_get(key, start, length)
            if resp is None:              # at or past the end (or an empty object): nothing
                return b"", start, etag
            got = resp.get("ETag")
            if etag is not None and got is not None and got != etag:
                raise StoreError(f"{self.join(key)} changed while it was being read "
                                 f"(ETag {etag} -> {got}); read it again")
            try:
                data = resp["Body"].read()
            except _transient_read_errors() as exc:
                if attempt == S3_MAX_ATTEMPTS:
                    raise StoreError(f"S3 read of {self.join(key)} kept breaking off "
                                     f"({S3_MAX_ATTEMPTS} attempts): {exc}") from exc
                time.sleep(min(2.0, 0.1 * 2 ** attempt))
                continue
            except Exception as exc:      # e.g. a checksum that does not match: one line
                mapped = self._error(exc, key)
                if mapped is None:
                    raise
                raise mapped from exc
            total = _range_total(resp.get("ContentRange"))
            if total is None:             # a server that ignores Range sends everything
                total, data = len(data), data[start:start + length]
            if len(data) == min(length, max(0, total - start)):
                return data, total, got
            if attempt == S3_MAX_ATTEMPTS:
                raise StoreError(f"S3 read of {self.join(key)} came short ({len(data)} bytes "
                                 f"at {start} of {total}) {S3_MAX_ATTEMPTS} times")
        raise AssertionError("unreachable")

    def _ranged_get(self, key: str, start: int, length: int) -> dict | None:
        """One ranged GetObject response (its body not read yet); None for a range that starts
        at or past the object's end."""
        def get():
            from botocore.exceptions import ClientError

            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._full(key),
                                              Range=f"bytes={start}-{start + length - 1}")
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return None
                raise

        return self._call(key, get)

    def write_bytes(self, key: str, data: bytes) -> None:
        sha = hashlib.sha256(data).hexdigest()
        self._call(key, self.client.put_object, Bucket=self.bucket, Key=self._full(key),
                   Body=bytes(data), Metadata={"sha256": sha})

    def download(self, key: str, local_path: str | os.PathLike,
                 callback: Callback | None = None) -> Path:
        final = Path(local_path)
        try:
            tmp = _temp_path(final)
        except OSError as exc:
            raise StoreError(f"cannot write {final}: {exc.strerror or exc}") from exc
        try:
            self._call(key, self.client.download_file, self.bucket, self._full(key),
                       str(tmp), Callback=callback, Config=self._transfer_config)
            _commit(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return final

    def upload(self, local_path: str | os.PathLike, key: str,
               callback: Callback | None = None, sha256: str | None = None) -> None:
        path = Path(local_path)
        if not path.is_file():
            raise NotFound(f"not found: {path}")
        sha = sha256 or sha256_file(path)
        self._call(key, self.client.upload_file, str(path), self.bucket, self._full(key),
                   ExtraArgs={"Metadata": {"sha256": sha}}, Callback=callback,
                   Config=self._transfer_config)

    def delete(self, key: str) -> None:
        self._call(key, self.client.delete_object, Bucket=self.bucket, Key=self._full(key))


# -- opening -------------------------------------------------------------------------


def open_store(uri: str | os.PathLike, s3_endpoint: str | None = None) -> Store:
    """A store for a local folder (path or file:// url) or `s3://bucket[/prefix]`.

    The S3 endpoint is `s3_endpoint`, else env AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL,
    else boto3's default; credentials come from boto3's standard chain.
    """
    uri = os.fspath(uri)
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        return S3Store(bucket, prefix, s3_endpoint=s3_endpoint)
    if uri.startswith("file://"):
        return LocalStore(uri[len("file://"):] or "/")
    if "://" in uri:
        raise StoreError(
            f"unsupported store uri {uri!r}: expected a local path or s3://bucket/prefix")
    if not uri:
        raise StoreError("empty store uri: expected a local path or s3://bucket/prefix")
    return LocalStore(uri)


# -- content cache -------------------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get("SCTD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sctd-ray" / "blobs"


class ContentCache:
    """Local files addressed by sha256: each blob is downloaded once and verified."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def path(self, sha256: str) -> Path:
        """Where the blob with this sha256 lives (whether or not it is cached)."""
        sha = sha256.lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise StoreError(f"invalid sha256 {sha256!r}: expected 64 hex digits")
        return self.root / sha[:2] / sha

    def fetch(self, store: Store, key: str, sha256: str) -> Path:
        """A local file with content `sha256`: cached, or downloaded from `store`/`key`."""
        final = self.path(sha256)
        if final.is_file():
            return final
        try:
            tmp = _temp_path(final)
        except OSError as exc:
            raise StoreError(f"cannot write to cache {self.root}: {exc.strerror or exc}") from exc
        try:
            store.download(key, tmp)
            got = sha256_file(tmp)
            if got != sha256.lower():
                raise StoreError(f"sha256 mismatch for {store.join(key)}: expected"
                                 f" {sha256.lower()}, got {got}")
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return final
