"""The monitors in one process: TensorBoard events, DeepSpeed-style CSVs, W&B offline, run.jsonl,
the no-host-sync rule and ``shardwise report`` (2 ranks: tests/distributed/test_monitor.py)."""
from __future__ import annotations

import csv
import glob
import json
import os

import pytest
import torch

import shardwise
from model import GPT, GPTConfig, count_parameters
from shardwise.monitor import Monitor, MonitorError
from shardwise.monitor import metrics as M
from shardwise.monitor.report import load_run, report, summarize
from shardwise.monitor.writers import CsvWriter, csv_filename
from shardwise.observers import StepRecord

CFG = GPTConfig.preset("tiny")  # V=64, T=16
MICRO, GAS = 2, 2


def _train(tmp_path, steps=5, every=2, peak=None, **sections):
    """Train ``steps`` optimizer steps; the engine, its Monitor and every micro-batch loss."""
    torch.manual_seed(0)
    model = GPT(CFG)
    conf = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "steps_per_print": every,
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3,
                                                         "warmup_num_steps": 4}}, **sections}
    if peak is not None:
        conf["peak_tflops"] = peak
    engine, _, _, _ = shardwise.initialize(model=model, model_parameters=model.parameters(), config=conf)
    losses, lrs = [], []
    g = torch.Generator().manual_seed(1)
    for _ in range(steps * GAS):
        x = torch.randint(0, CFG.vocab_size, (MICRO, CFG.seq_len), generator=g)
        loss = engine(x, x)
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            lrs.append(engine.get_lr()[0])  # the lr this step uses (logged as such)
        engine.step()
        losses.append(loss.item())
    return engine, engine.observers.find(Monitor), losses, lrs


def _writer(tmp_path, job="job"):
    return {"enabled": True, "output_path": str(tmp_path), "job_name": job}


def _interval_means(losses, steps=5, every=2):
    """Mean micro-batch loss of each written interval: steps 1-2, 3-4, then 5 (on destroy)."""
    per_step = GAS
    bounds = list(range(every, steps + 1, every)) + ([steps] if steps % every else [])
    out, lo = [], 0
    for b in bounds:
        chunk = losses[lo * per_step:b * per_step]
        out.append(sum(chunk) / len(chunk))
        lo = b
    return out


def test_tensorboard_and_csv_write_deepspeed_tags_on_the_samples_axis(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    engine, mon, losses, lrs = _train(tmp_path, peak=100.0, tensorboard=_writer(tmp_path),
                                      csv_monitor=_writer(tmp_path))
    engine.destroy()  # writes the last, one-step interval (step 5)
    log_dir = tmp_path / "job"
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    must = {M.LOSS, M.LR, M.SAMPLES_PER_S, M.TOKENS_PER_S, M.TFLOPS, M.MFU, M.SKIPPED, M.GRAD_NORM,
            "Memory/rank0/total_bytes", "Memory/rank0/rss_bytes"}
    assert must <= tags
    assert M.LOSS_SCALE not in tags  # fp32: DeepSpeed logs the loss scale only with fp16
    samples = [MICRO * GAS * s for s in (2, 4, 5)]
    loss_ev = acc.Scalars(M.LOSS)
    assert [e.step for e in loss_ev] == samples
    assert [e.value for e in loss_ev] == pytest.approx(_interval_means(losses), rel=1e-6)
    assert [e.value for e in acc.Scalars(M.LR)] == pytest.approx([lrs[1], lrs[3], lrs[4]])
    assert [e.value for e in acc.Scalars(M.SKIPPED)] == [0.0, 0.0, 0.0]
    mem = engine.memory_report()["total"]
    assert [e.value for e in acc.Scalars("Memory/rank0/total_bytes")] == [mem] * 3
    tflops = [e.value for e in acc.Scalars(M.TFLOPS)]
    assert [e.value for e in acc.Scalars(M.MFU)] == pytest.approx([t / 100.0 for t in tflops])

    # csv_monitor: DeepSpeed's layout, one file per tag, header step,<last part of the tag>
    path = log_dir / csv_filename(M.LOSS)
    assert path.name == "Train_Samples_train_loss.csv"
    rows = list(csv.reader(open(path)))
    assert rows[0] == ["step", "train_loss"]
    assert [int(r[0]) for r in rows[1:]] == samples
    assert [float(r[1]) for r in rows[1:]] == pytest.approx(_interval_means(losses), rel=1e-6)
    assert (log_dir / "Memory_rank0_total_bytes.csv").exists()

    # run.jsonl: the start line and one line per interval, tokens and parameters for the report
    lines = [json.loads(s) for s in open(log_dir / "run.jsonl")]
    assert lines[0]["event"] == "start" and lines[0]["start_samples"] == 0
    assert lines[0]["parameters"] == count_parameters(engine.module) and lines[0]["world_size"] == 1
    assert [ln["tokens"] for ln in lines[1:]] == [2 * GAS * MICRO * CFG.seq_len] * 2 + [GAS * MICRO * CFG.seq_len]
    assert lines[-1]["scalars"][M.LOSS] == pytest.approx(_interval_means(losses)[-1], rel=1e-6)


def test_fp16_logs_the_loss_scale_as_deepspeed_does(tmp_path):
    engine, mon, _, _ = _train(tmp_path, steps=2, every=2, csv_monitor=_writer(tmp_path), fp16={"enabled": True})
    engine.destroy()
    rows = list(csv.reader(open(tmp_path / "job" / csv_filename(M.LOSS_SCALE))))
    assert rows == [["step", "loss_scale"], [str(2 * MICRO * GAS), repr(engine.loss_scale())]]


class _Reads:
    """Counts host reads of tensor values (``.item()``, ``float()``, ``.tolist()``, ``bool()``)."""

    NAMES = ("item", "__float__", "tolist", "__bool__", "__int__", "numpy")

    def __init__(self, monkeypatch):
        self.n = 0
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def wrapped(t, *a, _orig=orig, **k):
                self.n += 1
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


def _record(step, every_samples=4, skipped=0):
    return StepRecord(step=step, samples=step * every_samples, micro_steps=step, lr=(0.5,), loss_scale=1.0,
                      grad_norm=1.0, applied=True, skipped_steps=skipped, train_batch_size=every_samples,
                      memory_report=lambda: {"total": 123})


def test_the_loss_stays_on_the_device_until_the_print_interval(tmp_path, monkeypatch):
    engine, mon, _, _ = _train(tmp_path, steps=1, every=3, csv_monitor=_writer(tmp_path))
    m = mon.metrics
    base = mon.intervals
    reads = _Reads(monkeypatch)
    x = torch.randint(0, CFG.vocab_size, (MICRO, CFG.seq_len))
    for step in range(2, 8):  # the engine is at step 1; 3 and 6 are print steps
        for _ in range(GAS):
            mon.forward_begin((x, x), {})
            mon.backward_begin(torch.tensor(2.0, requires_grad=True) * 1.5)
        before = reads.n
        mon.step_end(_record(step))
        if step % 3:
            assert reads.n == before == 0, f"step {step}: a host read outside the print interval"
            assert isinstance(m.cur.loss_sum, torch.Tensor) and m.cur.loss_sum.dim() == 0
        else:
            assert reads.n > before  # the interval's one read
            reads.n = 0
    monkeypatch.undo()
    assert mon.intervals == base + 2
    ev = dict((t, v) for t, v, _ in mon.last_events)
    assert ev[M.LOSS] == pytest.approx(3.0)  # mean of the 6 losses of steps 4-6
    assert ev["Memory/rank0/total_bytes"] == 123
    engine.destroy()


def test_count_tokens_takes_the_first_integer_batch_tensor():
    ids = torch.zeros(3, 7, dtype=torch.long)
    assert M.count_tokens((ids, ids), {}) == 21
    assert M.count_tokens((torch.randn(3, 7),), {"input_ids": ids}) == 21
    assert M.count_tokens(({"input_ids": ids, "mask": torch.ones(3, 7)},), {}) == 21
    # class labels (1-d) are not tokens; no integer input: samples only
    assert M.count_tokens((torch.randn(3, 5), torch.zeros(3, dtype=torch.long)), {}) is None
    assert M.count_tokens((torch.randn(3, 5),), {}) is None


def test_csv_writer_starts_afresh_from_sample_zero_and_appends_on_resume(tmp_path):
    def run(start, xs):
        w = CsvWriter(str(tmp_path))
        w.begin(start, {})
        for x in xs:
            w.write([(M.LOSS, float(x), x)], {"samples": x})

    run(0, [1, 2])
    run(0, [1, 2, 3])  # a new run replaces the old file
    assert [r[0] for r in csv.reader(open(tmp_path / csv_filename(M.LOSS)))] == ["step", "1", "2", "3"]
    run(3, [4])  # resumed at sample 3: appended, no second header
    assert [r[0] for r in csv.reader(open(tmp_path / csv_filename(M.LOSS)))] == ["step", "1", "2", "3", "4"]


def test_wandb_offline_run_has_the_logged_keys(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                 "WANDB_CONFIG_DIR": str(tmp_path / "cfg"), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                 "WANDB_DISABLE_GIT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(k, v)
    wandb_dir = tmp_path / "job"
    engine, mon, _, _ = _train(tmp_path, steps=2, every=1, csv_monitor=_writer(tmp_path),
                               wandb={"enabled": True, "project": "shardwise-test"})
    engine.destroy()
    runs = glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, os.listdir(wandb_dir)
    history = _wandb_history(runs[0])
    assert [step for step, _ in history] == [MICRO * GAS, 2 * MICRO * GAS]  # W&B's step axis: samples
    for _, row in history:
        assert {M.LOSS, M.LR, M.TOKENS_PER_S, "Memory/rank0/total_bytes"} <= set(row)
    assert history[-1][1][M.LOSS] == pytest.approx(dict((t, v) for t, v, _ in mon.last_events)[M.LOSS])


def _wandb_history(path):
    """The history rows of an offline ``run-*.wandb`` file: W&B's record log (a 7-byte file
    header, then LevelDB-log blocks of 32 KiB holding protobuf ``Record``s)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = open(path, "rb").read(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768  # block trailer
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                out.append((rec.history.step.num, row))
    return out


def test_a_log_dir_that_cannot_be_created_fails_at_initialize(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(MonitorError, match=r"tensorboard.output_path.*cannot create.*writable directory"):
        _train(tmp_path, steps=1, tensorboard={"enabled": True, "output_path": str(blocker), "job_name": "j"})


# -- shardwise report ---------------------------------------------------------------------------
def _synthetic_run(d, resume=True):
    d.mkdir(parents=True, exist_ok=True)
    lines = [{"event": "start", "start_samples": 0, "world_size": 2, "dp_size": 2, "parameters": 1000,
              "config": "cfg.json"}]
    for i in range(1, 11):
        lines.append({"event": "interval", "step": 10 * i, "samples": 160 * i, "steps": 10, "seconds": 2.0,
                      "tokens": 10000, "scalars": {
                          M.LOSS: 5.0 - 0.3 * i + (0.5 if i == 10 else 0.0), M.LR: 1e-3 * min(1, i / 3),
                          M.TOKENS_PER_S: 5000.0, M.SAMPLES_PER_S: 80.0, M.SKIPPED: float(i >= 7),
                          M.GRAD_NORM: 1.0 / i, M.TFLOPS: 0.01,
                          **{M.memory_tag(r, "total_bytes"): (r + 1) * 2.0 ** 20 for r in range(2)},
                          **{M.memory_tag(r, "rss_bytes"): 300 * 2.0 ** 20 + i * 2.0 ** 20 for r in range(2)}}})
    if resume:  # resumed from the checkpoint at sample 800: lines after it are replaced
        lines.append({"event": "start", "start_samples": 800, "world_size": 2, "dp_size": 2, "parameters": 1000,
                      "config": "cfg.json"})
        lines.append({**lines[10], "step": 60, "samples": 960})
        lines[-1]["scalars"] = {**lines[-1]["scalars"], M.LOSS: 1.5}
    with open(d / "run.jsonl", "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n")


def test_report_writes_a_png_and_a_markdown_summary(tmp_path, capsys):
    from shardwise.cli import main

    run_dir = tmp_path / "run"
    _synthetic_run(run_dir)
    assert main(["report", str(run_dir)]) == 0
    png, md = capsys.readouterr().out.split()
    assert png == str(run_dir / "report.png") and md == str(run_dir / "report.md")
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    text = open(md).read()
    # the resumed run: steps 10-50 of the first run, then step 60 of the second
    s = summarize(load_run(str(run_dir)))
    assert (s["steps"], s["samples"], s["intervals"]) == (60, 960, 6)
    assert "| optimizer steps | 60 |" in text and "| samples | 960 |" in text
    assert "4.7 / 1.5 / 1.5" in text  # first / final / min loss
    assert "| mean tokens/s | 5,000 |" in text  # 60000 tokens in 12 s
    assert "| skipped steps | 1 |" in text
    assert "| config | cfg.json |" in text and "2 runs joined" in text
    assert "| 0 | 1.00 | 310.00 | n/a |" in text and "| 1 | 2.00 | 310.00 | n/a |" in text  # peak MiB per rank


def test_report_follows_one_run_when_two_share_the_directory(tmp_path):
    from shardwise.monitor.writers import RunLogWriter

    a, b = RunLogWriter(str(tmp_path)), RunLogWriter(str(tmp_path))
    a.run_id, b.run_id = "a", "b"
    a.begin(0, {"parameters": 1})
    a.write([(M.LOSS, 9.0, 10)], {"step": 1, "samples": 10})
    b.begin(0, {"parameters": 2})  # a second run starts in the same directory, a goes on
    b.write([(M.LOSS, 5.0, 4)], {"step": 1, "samples": 4})
    a.write([(M.LOSS, 8.0, 20)], {"step": 2, "samples": 20})
    for w in (a, b):
        w.close()
    run = load_run(str(tmp_path))
    assert run.meta["parameters"] == 1 and run.series(M.LOSS) == ([10, 20], [9.0, 8.0]) and run.others == 1


def test_report_reads_a_deepspeed_csv_monitor_directory(tmp_path):
    d = tmp_path / "csvonly"
    w = CsvWriter(str(d))
    w.begin(0, {})
    for i, x in enumerate((16, 32, 48)):
        w.write([(M.LOSS, 3.0 - i, x), (M.LR, 0.1, x), (M.memory_tag(1, "total_bytes"), 2.0 ** 21, x)],
                {"samples": x})
    png, md = report(str(d))
    assert os.path.getsize(png) > 0
    text = open(md).read()
    assert "| samples | 48 |" in text and "3 / 1 / 1" in text and "| 1 | 2.00 |" in text


def test_report_on_an_empty_directory_says_what_to_do(tmp_path, capsys):
    from shardwise.cli import main

    (tmp_path / "job").mkdir()
    _synthetic_run(tmp_path / "job" / "inner", resume=False)
    assert main(["report", str(tmp_path / "job")]) == 2
    err = capsys.readouterr().err
    assert "no run.jsonl or csv_monitor files" in err and "inner" in err
    with pytest.raises(MonitorError, match="no such directory"):
        report(str(tmp_path / "missing"))
