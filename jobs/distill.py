"""Ray job: distill the top teachers of an assessed run into a student (`sctd distill`).

    ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml \\
        -- python jobs/distill.py --config job.yaml      # or the options of `sctd distill --help`

Takes exactly the options of `sctd distill`, or `--config FILE` (YAML, keys = option names);
`--out` is s3://, or a local path that every node sees (checked). Resubmitting with the same `--out`
resumes. Progress and the final status line are in `ray job logs`; see jobs/sctd_job.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout, if not installed

from sctd_job import main  # noqa: E402

if __name__ == "__main__":
    main("distill")
