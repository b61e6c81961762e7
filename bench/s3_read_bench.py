"""Reading one large object from S3 (a teacher's model.safetensors): ``S3Store.read_bytes``,
the first 16 MB and then concurrent byte-range GETs, against one whole-object GET (the store's
read before session 12), on a real SeaweedFS server, directly on loopback and through a proxy
that gives each connection what a connection to S3 over a network gets: a bounded rate and a
first-byte latency.

One connection to S3 carries roughly 80-100 MB/s however fast the machine's network is; AWS's
performance guidelines fetch large objects as concurrent 8-16 MB byte ranges for that reason.
Loopback has no such bound: there both reads are bounded by this machine's CPUs.

    python bench/s3_read_bench.py [--mb 100] [--conn-mbps 80] [--latency-ms 20] [--repeats 3]

Prints, per repeat and endpoint, the seconds of both reads (alternating), then the median ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def serve_proxy(port: int, upstream_port: int, rate: float, latency: float) -> None:
    """A TCP proxy on 127.0.0.1:port to 127.0.0.1:upstream_port. Each response (the bytes that
    come back after a request went out) starts ``latency`` seconds late and flows at ``rate``
    bytes per second on its connection; requests pass unchanged."""

    async def handle(client_r, client_w):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream_port)
        asked = asyncio.Event()

        async def requests():
            while data := await client_r.read(1 << 16):
                asked.set()
                up_w.write(data)
                await up_w.drain()
            up_w.close()

        async def responses():
            loop = asyncio.get_running_loop()
            start, sent = loop.time(), 0
            while data := await up_r.read(1 << 16):
                if asked.is_set():        # the first bytes of a response
                    asked.clear()
                    await asyncio.sleep(latency)
                    start, sent = loop.time(), 0
                sent += len(data)
                wait = start + sent / rate - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        try:
            await asyncio.gather(requests(), responses())
        except (ConnectionError, OSError):
            client_w.close()
            up_w.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the proxy did not listen on port {port}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=100, help="object size (resnet50 in float32: ~98 MB)")
    ap.add_argument("--conn-mbps", type=float, default=80, help="MB/s per connection through the proxy")
    ap.add_argument("--latency-ms", type=float, default=20, help="first-byte latency per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--serve-proxy", nargs=2, type=int, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_proxy:
        return serve_proxy(*args.serve_proxy, args.conn_mbps * 1e6, args.latency_ms / 1e3)

    from s3server import SeaweedS3, _free_port

    from sctd_ray.zoo.store import S3_READ_PART, S3_THREADS, S3Store

    with SeaweedS3() as s3:
        os.environ.update(s3.env())
        bucket = s3.make_bucket("read-bench-" + uuid.uuid4().hex[:8])
        endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
        data = os.urandom(int(args.mb * 1e6))
        S3Store(bucket).write_bytes("model.safetensors", data)
        port = _free_port()
        proxy = subprocess.Popen([sys.executable, __file__, "--serve-proxy", str(port),
                                  endpoint.rsplit(":", 1)[1], "--conn-mbps", str(args.conn_mbps),
                                  "--latency-ms", str(args.latency_ms)])
        try:
            _wait_port(port)
            print(f"object: {len(data) / 1e6:.0f} MB on SeaweedFS; parts of {S3_READ_PART >> 20} MiB, "
                  f"{S3_THREADS} at a time; proxy: {args.conn_mbps:g} MB/s per connection, "
                  f"{args.latency_ms:g} ms to first byte")
            ratios = {}
            for name, url in (("loopback", endpoint), ("proxy", f"http://127.0.0.1:{port}")):
                store = S3Store(bucket, s3_endpoint=url)
                store.read_range("model.safetensors", 0, 8)      # client and a connection up

                def one_get():
                    return store.client.get_object(Bucket=bucket, Key="model.safetensors")["Body"].read()

                ratios[name] = []
                for r in range(args.repeats):
                    t0 = time.perf_counter()
                    single = one_get()
                    t1 = time.perf_counter()
                    ranged = store.read_bytes("model.safetensors")
                    t2 = time.perf_counter()
                    assert single == data and ranged == data, "a read returned other bytes"
                    a, b = t1 - t0, t2 - t1
                    ratios[name].append(a / b)
                    print(f"{name:8s} repeat {r + 1}: one GET {a:6.3f} s ({len(data) / a / 1e6:5.0f} MB/s)   "
                          f"ranged GETs {b:6.3f} s ({len(data) / b / 1e6:5.0f} MB/s)   one / ranged {a / b:5.2f}")
            for name, rs in ratios.items():
                print(f"{name}: one GET / ranged GETs, median {statistics.median(rs):.2f} "
                      f"(range {min(rs):.2f}-{max(rs):.2f}) over {len(rs)} repeats")
        finally:
            proxy.terminate()
            proxy.wait()


if __name__ == "__main__":
    main()
