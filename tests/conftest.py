"""Shared pytest fixtures. Keep each group narrow and named after what it provides."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers, whatever the import mode
from s3server import SeaweedS3  # noqa: E402

# -- S3 (SeaweedFS) ------------------------------------------------------------------
# `s3`: one real SeaweedFS S3 server per test session, requiring credentials.
# `s3_env`: points boto3 at it for one test (os.environ via monkeypatch); returns the
#           variables, to pass to subprocesses as env={**os.environ, **s3_env}.
# `s3_bucket`: a fresh, empty bucket for one test, as "s3://<name>" (env applied).


@pytest.fixture(scope="session")
def s3():
    """A running SeaweedS3 (see tests/s3server.py) that refuses wrong credentials."""
    server = SeaweedS3(require_auth=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch) -> dict[str, str]:
    """Environment for boto3 to use the `s3` server, applied to os.environ for this test."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                 "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    env = s3.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_bucket(s3, s3_env) -> str:
    """A new empty bucket on the `s3` server, as an uri "s3://<name>"."""
    return "s3://" + s3.make_bucket("t-" + uuid.uuid4().hex[:24])


# -- demo zoo and Ray ----------------------------------------------------------------
# `demo_zoo`: the small demo zoo (8 real teachers, 2 targets), built once per session; tests
#             copy it before changing anything. $SCTD_TEST_DEMO_ZOO reuses a zoo built earlier.
# `ray_local`: one local Ray for the in-process tests (2 CPUs), shut down at session end.


@pytest.fixture(scope="session")
def demo_zoo(tmp_path_factory) -> str:
    import os

    from sctd_ray.zoo.demo import build_demo

    path = os.environ.get("SCTD_TEST_DEMO_ZOO") or str(tmp_path_factory.mktemp("demo") / "zoo")
    build_demo(path, preset="small", seed=0, log=lambda *_: None)
    return path


@pytest.fixture(scope="session")
def ray_local(s3):
    """Ray workers get their S3 credentials the way a cluster's do: from their own
    environment, inherited here from the driver's at start (the `s3` server's)."""
    import os

    from sctd_ray.assess.scan import ensure_ray

    saved = dict(os.environ)
    os.environ.update(s3.env())
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray = ensure_ray(None)
    os.environ.clear()
    os.environ.update(saved)
    yield ray
    ray.shutdown()


@pytest.fixture
def no_host_reads(monkeypatch):
    """``with no_host_reads(): ...`` fails when the block reads a tensor's value back into
    Python (``item``, ``bool``, ``float``, ``int``, ``tolist``, ``numpy``): on a GPU each of
    those is a host-device synchronisation. Python-level reads only; for code meant to queue
    GPU work without waiting."""
    import contextlib

    import torch

    def forbidden(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"tensor read back on the host via {name}")
        return read

    @contextlib.contextmanager
    def guard():
        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"):
                m.setattr(torch.Tensor, name, forbidden(name))
            yield

    return guard
