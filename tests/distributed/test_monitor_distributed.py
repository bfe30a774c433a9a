"""The monitor on 2 gloo ranks (ZeRO stage 3): the logged loss is the mean over ranks and
micro-batches, lr and samples are the engine's, memory is per rank, and only rank 0 writes."""
from __future__ import annotations

import csv
import glob
import json
import os

import pytest

from monitor_workers import CFG, GAS, MICRO, monitored_training
from shardwise.monitor import metrics as M
from shardwise.monitor.writers import csv_filename
from shardwise.testing import run_distributed

STEPS, EVERY = 5, 2  # intervals: steps 1-2, 3-4, and 5 (written by engine.destroy())
BOUNDS = [(0, 2), (2, 4), (4, 5)]


def test_two_ranks_log_the_mean_loss_and_only_rank_0_writes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from model import GPT, count_parameters

    ranks = run_distributed(monitored_training, 2, str(tmp_path), STEPS, EVERY)
    r0, r1 = ranks
    assert r0["writers"] == ["tensorboard", "csv_monitor", "run_log"] and r1["writers"] == []
    assert r0["intervals"] == r1["intervals"] == 3
    tbs = r0["train_batch_size"]
    assert tbs == 2 * MICRO * GAS
    samples = [b * tbs for _, b in BOUNDS]
    assert samples[-1] == r0["samples"]

    # the loss each rank computed itself, averaged over its micro-batches, then over the ranks
    want = []
    for lo, hi in BOUNDS:
        per_rank = [sum(r["losses"][lo * GAS:hi * GAS]) / ((hi - lo) * GAS) for r in ranks]
        want.append(sum(per_rank) / 2)

    log_dir = tmp_path / "job"
    events = glob.glob(str(log_dir / "events.out.tfevents.*"))
    assert len(events) == 1 and events[0].split(".")[-2] == str(r0["pid"])  # rank 0's file only
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    loss = acc.Scalars(M.LOSS)
    assert [e.step for e in loss] == samples
    assert [e.value for e in loss] == pytest.approx(want, rel=1e-6)
    assert [e.value for e in acc.Scalars(M.LR)] == pytest.approx([r0["lrs"][hi - 1] for _, hi in BOUNDS])
    for rank, r in enumerate(ranks):  # each rank's own model state, gathered to rank 0
        assert acc.Scalars(f"Memory/rank{rank}/total_bytes")[-1].value == r["memory"]
        assert acc.Scalars(f"Memory/rank{rank}/rss_bytes")[-1].value > 0
    # every rank took part in the same collectives: the same reduced loss and gathered memory
    timed = {M.SAMPLES_PER_S, M.TOKENS_PER_S, M.TFLOPS}
    assert [e for e in r0["last_events"] if e[0] not in timed] == [e for e in r1["last_events"] if e[0] not in timed]

    rows = list(csv.reader(open(log_dir / csv_filename(M.LOSS))))
    assert [int(x) for x, _ in rows[1:]] == samples
    assert [float(v) for _, v in rows[1:]] == pytest.approx(want, rel=1e-6)

    lines = [json.loads(s) for s in open(log_dir / "run.jsonl")]
    start = lines[0]
    assert (start["world_size"], start["dp_size"], start["start_samples"]) == (2, 2, 0)
    # stage 3: parameters counted with their full shapes, not this rank's shard
    assert start["parameters"] == count_parameters(GPT(CFG))
    # tokens of rank 0's data-parallel group: both ranks' input_ids
    assert [ln["tokens"] for ln in lines[1:]] == [2 * (hi - lo) * GAS * MICRO * CFG.seq_len for lo, hi in BOUNDS]
    assert sorted(os.listdir(log_dir)) == sorted(
        [os.path.basename(events[0]), "run.jsonl"] + [f for f in os.listdir(log_dir) if f.endswith(".csv")])
