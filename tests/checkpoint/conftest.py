import pytest

import ckpt_workers as W
from shardwise.testing import run_distributed


@pytest.fixture(scope="session")
def two_rank(tmp_path_factory):
    """``(root, results)``: the small model saved at world 2 / ZeRO-1 (``root/pristine``, two
    shard files; used by the integrity table and the fuzz test) and the 2-rank failed-load cases."""
    root = tmp_path_factory.mktemp("two_rank")
    return root, run_distributed(W.two_rank_cases, 2, str(root))
