"""The run report (ARCHITECTURE: report/): one self-contained HTML page per run.

    data.py     run folder -> ReportData (ranking, run facts, distillation search, bridges)
    bridge.py   a teacher/target label-space bridge: cost M and mean transport plan (SPEC 1-2)
    figures.py  matplotlib (Agg) figures -> base64 PNG
    render.py   ReportData -> HTML (escaped, inline CSS, images as data: URIs)
    command.py  write_report() and the ``sctd report`` command
"""

from .command import add_report_args, cmd_report, write_report
from .data import collect_report_data

__all__ = ["add_report_args", "cmd_report", "collect_report_data", "write_report"]
