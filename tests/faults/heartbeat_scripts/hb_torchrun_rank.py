"""One rank of hb_stress.sh's torchrun part: hb_jobs.job_min on one host (same collectives, the
heartbeat at its normal interval unless HB_INTERVAL is set)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HB_INTERVAL", "1.0")

import hb_jobs  # noqa: E402

hb_jobs.job_min()
