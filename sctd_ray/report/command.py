"""``sctd report RUN``: write the run's self-contained HTML report (RUN/report.html by default).

RUN and ``--out`` may be local or ``s3://``; the page is written through the store.
"""

from __future__ import annotations

import os

REPORT_FILE = "report.html"


def _destination(run_uri: str, out: str | None, s3_endpoint: str | None):
    """(store, key) to write the page to: RUN/report.html, or the file ``out`` names
    (a name ending in '/' is a folder and gets report.html inside it)."""
    from ..zoo.store import open_store

    if out is None:
        return open_store(run_uri, s3_endpoint=s3_endpoint), REPORT_FILE
    out = os.fspath(out)
    if out.endswith("/"):
        return open_store(out, s3_endpoint=s3_endpoint), REPORT_FILE
    if "://" in out:
        parent, _, name = out.rpartition("/")
        if parent.endswith(":/"):  # "s3://name": a bucket, not a file
            return open_store(out, s3_endpoint=s3_endpoint), REPORT_FILE
        return open_store(parent, s3_endpoint=s3_endpoint), name
    path = os.path.abspath(os.path.expanduser(out))
    return open_store(os.path.dirname(path)), os.path.basename(path)


def write_report(run_uri: str, out: str | None = None, s3_endpoint: str | None = None,
                 device: str | None = None) -> str:
    """Collect the run's data, render the page, write it; returns where it was written.

    Raises SctdError (one clear line) when RUN is not a scan run folder or cannot be written.
    """
    from .data import collect_report_data
    from .render import render_html

    data = collect_report_data(run_uri, s3_endpoint=s3_endpoint, device=device)
    page = render_html(data)
    store, key = _destination(run_uri, out, s3_endpoint)
    store.write_bytes(key, page.encode("utf-8"))
    return store.join(key)


def add_report_args(parser) -> None:
    """Arguments of ``sctd report`` (includes --s3-endpoint)."""
    parser.add_argument("run", metavar="RUN", help="run folder of a scan (local or s3://)")
    parser.add_argument("--out", default=None,
                        help="where to write the page (local or s3://; default RUN/report.html)")
    parser.add_argument("--s3-endpoint", default=None,
                        help="S3 endpoint URL (default: $AWS_ENDPOINT_URL_S3 or AWS's)")


def cmd_report(args) -> int:
    """``sctd report``: write the page and print where it went."""
    where = write_report(args.run, out=args.out, s3_endpoint=args.s3_endpoint)
    print(f"report: {where}")
    return 0
