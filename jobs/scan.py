"""Ray job: assess every teacher, distill the best, write the report (`sctd scan`).

    ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/scan.py --config job.yaml      # or the options of `sctd scan --help`

Takes exactly the options of `sctd scan`, or `--config FILE` (YAML, keys = option names);
`--out` is s3://, or a local path that every node sees (checked). Resubmitting with the same `--out`
resumes. Progress and the final status line are in `ray job logs`; see jobs/sctd_job.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout, if not installed

from sctd_job import main  # noqa: E402

if __name__ == "__main__":
    main("scan")
