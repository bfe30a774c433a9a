"""``shardwise.comm`` is DeepSpeed's ``deepspeed.comm`` (issue 14, item 2): the calls scripts
make, with torch.distributed's arguments, on 2 ranks."""
from __future__ import annotations

from backward_workers import comm_surface_run
from shardwise.testing import run_distributed


def test_deepspeed_comm_calls_on_two_ranks():
    for rank, r in enumerate(run_distributed(comm_surface_run, 2)):
        assert r["world"] == 2 and r["sum"] == 3.0 and r["bcast"] == 10.0
        assert r["gather"] == r["flat"] == [0.0, 1.0]
        assert r["rs"] == 2 * rank + 1  # sum over ranks of (arange + rank), this rank's element
        assert r["backend"] == "gloo" and r["local_rank"] == rank
        assert r["logged"] == (2, 32)  # comms_logger sees the script's own all_reduce calls
