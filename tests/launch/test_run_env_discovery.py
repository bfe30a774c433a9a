"""A script started without torchrun, with Open MPI's environment (2 real processes, gloo)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "mpi_style_script.py"


def test_two_ranks_from_openmpi_variables(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PET_", "TORCHELASTIC_", "SLURM_", "OMPI_", "PMI_", "MV2_", "SHARDWISE_"))
            and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    procs = []
    for r in range(2):
        env = {**base, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port), "OMPI_COMM_WORLD_RANK": str(r),
               "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": str(r), "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(g["rank"], g["world"], g["local_rank"], g["sum"]) for g in got] == [(0, 2, "0", 3.0), (1, 2, "1", 3.0)]
    assert {g["source"] for g in got} == {"openmpi"} and {g["master"] for g in got} == {"127.0.0.1"}
