"""What `sctd assess` reads of a target before Ray starts (``ray_data.probe_target``), on a real
SeaweedFS S3: the probe by byte ranges (the Parquet footer, then the first data page) against
the same probe reading the whole split, as before session 11. Same target as scan_bench.py.

    python bench/target_probe_bench.py [--samples 10000] [--image-size 224] [--repeats 3]

Prints, per repeat, the seconds of both and the bytes each read from S3.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))


def main():
    from s3server import SeaweedS3
    from scan_bench import make_target

    import sctd_ray.data.ray_data as ray_data
    from sctd_ray.data import targets
    from sctd_ray.zoo.store import S3Store, open_store

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--image-size", type=int, default=224, help="JPEG size (0: the 28x28 PNGs)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp, SeaweedS3() as s3:
        local = make_target(Path(tmp) / "target", args.samples, args.image_size or None)
        os.environ.update(s3.env())
        s3.make_bucket("probe-bench")
        uri = "s3://probe-bench/target"
        store = open_store(uri)
        size = 0
        for p in sorted(local.glob("*.parquet")):
            store.write_bytes(p.name, p.read_bytes())
            size += p.stat().st_size if p.name == "train.parquet" else 0
        print(f"target: {args.samples} images, train.parquet {size / 2**20:.1f} MiB on SeaweedFS")

        read = [0]
        real_range, real_bytes = S3Store.read_range, S3Store.read_bytes

        def counted_range(self, key, start, length):
            data = real_range(self, key, start, length)
            read[0] += len(data)
            return data

        def counted_bytes(self, key):
            data = real_bytes(self, key)
            read[0] += len(data)
            return data
        S3Store.read_range, S3Store.read_bytes = counted_range, counted_bytes
        by_ranges = targets.parquet_split
        whole = lambda store, split, whole=True: by_ranges(store, split, True)  # noqa: E731
        for _ in range(args.repeats):
            row = []
            for label, route in (("by ranges", by_ranges), ("whole split", whole)):
                ray_data.parquet_split = route
                read[0] = 0
                t0 = time.perf_counter()
                probe = ray_data.probe_target(uri)
                row.append(f"{label} {time.perf_counter() - t0:.3f} s, {read[0] / 2**20:.1f} MiB read")
            ray_data.parquet_split = by_ranges
            print(f"probe {probe.shape}: " + "; ".join(row))


if __name__ == "__main__":
    main()
