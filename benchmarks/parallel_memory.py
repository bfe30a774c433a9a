"""Per-rank memory at (dp 2), (tp 2), (pp 2) and ZeRO-3 over dp 2: measured vs the planner.

    .venv/bin/python benchmarks/parallel_memory.py [--json out.json] [--rows dp2,tp2,pp2,zero3]
    shardwise run --nproc-per-node 2 benchmarks/parallel_memory.py --throughput tp2   # GPUs: tokens/s

One small GPT (examples/gpt/model.py; ``--preset``, default a 4-block d_model 64 one), fp32,
AdamW, 2 gloo ranks per row (4 for the tp2dp2 / tp2dp2z3 / tp2pp2 extras; ``shardwise.testing.run_distributed``). Each rank builds its
engine, takes one optimizer step (``gradient_accumulation_steps`` micro-batches: pp needs
several), then reports ``engine.memory_report()`` (model states) and the bytes autograd saves
for backward (``torch.autograd.graph.saved_tensors_hooks``: each storage once, parameters left
out, a DTensor counted by its local tensor) around one micro-batch's forward (pp: the rank's
stage module on its stage's input, the loss on the last), and, for pp, the peak of the saved
bytes alive during one whole ``train_batch`` (the micro-batches a 1F1B stage holds at once).
Next to each: ``shardwise.planner_parallel.plan_parallel`` for the same mesh on a meta-device
copy, and the ratio measured / planned. A row that fails is reported and skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(_ROOT / "examples" / "gpt"), str(_ROOT / "src")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

ROWS = {  # name -> (tp, pp, dp, ZeRO stage); the first four by default (2 ranks), the rest on request
    "dp2": (1, 1, 2, 1), "tp2": (2, 1, 1, 1), "pp2": (1, 2, 1, 1), "zero3": (1, 1, 2, 3),
    "tp2dp2": (2, 1, 2, 1), "tp2dp2z3": (2, 1, 2, 3), "tp2pp2": (2, 2, 1, 1)}
DEFAULT_ROWS = "dp2,tp2,pp2,zero3"
# the pipeline GPT's (examples/gpt/pipeline.py) names for the tp plan of model.GPT (tensor_parallel/plans.py)
PIPE_TP_PLAN = {"tied_modules.embed": "rowwise", "*.attn.q": "colwise", "*.attn.k": "colwise", "*.attn.v": "colwise",
                "*.attn.proj": "rowwise", "*.mlp.fc": "colwise", "*.mlp.proj": "rowwise"}
MICRO, GAS = 2, 4
FIELDS = ("params", "grads", "master_params", "optimizer_state", "total")


def gpt_config(preset: str):
    from model import GPTConfig

    if preset == "small":  # a little larger than "tiny": 4 blocks, d_model 64
        return GPTConfig(vocab_size=128, seq_len=32, n_layer=4, n_head=4, d_model=64)
    return GPTConfig.preset(preset)


def engine_config(tp: int, pp: int, stage: int, dp: int) -> dict:
    cfg = {"train_batch_size": MICRO * GAS * dp, "train_micro_batch_size_per_gpu": MICRO,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "steps_per_print": 10**9,
           "zero_optimization": {"stage": stage}}
    if tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": tp, **({"tp_plan": PIPE_TP_PLAN} if pp > 1 else {})}
    if pp > 1:
        cfg["pipeline"] = {"stages": pp, "partition": "parameters"}
    return cfg


class Saved:
    """Bytes autograd saves (each storage once, parameter storages left out); ``peak``: the most
    alive at once (a saved tensor is alive until autograd drops it)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.seen, self.live, self.now, self.peak = module, {}, {}, 0, 0

    def _params(self) -> set[int]:
        from shardwise.tensor_parallel import local_tensor

        out = set()
        for p in self.module.parameters():
            try:  # a released ZeRO-3 parameter has no valid storage
                out.add(local_tensor(p).untyped_storage().data_ptr())
            except RuntimeError:
                pass
        return out

    def _key(self, t: torch.Tensor) -> tuple[int, int]:
        from shardwise.tensor_parallel import is_dtensor

        st = (t._local_tensor if is_dtensor(t) else t).untyped_storage()
        return st.data_ptr(), st.nbytes()

    def pack(self, t: torch.Tensor):
        ptr, n = self._key(t)
        if n and ptr not in self._params():
            self.seen[ptr] = n
            if not self.live.get(ptr):
                self.now += n
                self.peak = max(self.peak, self.now)
            self.live[ptr] = self.live.get(ptr, 0) + 1
        return t

    def unpack(self, t: torch.Tensor):
        """A saved tensor is alive until backward unpacks it (then autograd drops it)."""
        ptr, n = self._key(t)
        if self.live.get(ptr):
            self.live[ptr] -= 1
            if not self.live[ptr]:
                self.now -= n
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def inside_stage3(self):
        """ZeRO-3 runs each forward under its own saved-tensor hooks (they replace gathered
        parameters by handles), which hide the outer ones: count in front of its pack."""
        from contextlib import contextmanager

        from shardwise.zero.hooks import Stage3Hooks

        @contextmanager
        def patched():
            orig = Stage3Hooks._pack
            Stage3Hooks._pack = lambda hooks, t: orig(hooks, self.pack(t))
            try:
                yield
            finally:
                Stage3Hooks._pack = orig
        return patched()


def measure(preset: str, tp: int, pp: int, dp: int, stage: int) -> dict:
    """On each rank: memory_report() after one step, and saved bytes of one micro-batch."""
    import torch.distributed as dist

    import shardwise
    from model import GPT

    rank = dist.get_rank()
    cfg = gpt_config(preset)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1 + rank)
    batches = [torch.randint(0, cfg.vocab_size, (MICRO, cfg.seq_len + 1), generator=g) for _ in range(GAS)]
    batches = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in batches]  # ids and targets apart
    out: dict = {"rank": rank}
    if pp > 1:
        from pipeline import gpt_pipeline

        model = gpt_pipeline(cfg, num_stages=pp, partition_method="parameters")
        engine, *_ = shardwise.initialize(model=model, config=engine_config(tp, pp, stage, dp))
        stage_mod = model.stage_modules()[0]
        first, last = engine.is_first_stage(), engine.is_last_stage()
        x = batches[0][0] if first else torch.randn(MICRO, cfg.seq_len, cfg.d_model, requires_grad=True)
        one = Saved(model)
        with one.hooks():
            y = stage_mod(x)
            if last:
                model.loss_fn(y, batches[0][1])
        del y
        engine.train_batch(iter(batches))  # the first step also sets the stages up (shape inference)
        whole = Saved(model)
        with whole.hooks():
            engine.train_batch(iter(batches))
        out |= {"pp_rank": model.stage_id, "activations_per_micro_batch": one.total,
                "activations_peak": whole.peak, "activations_never_unpacked": whole.now}
    else:
        model = GPT(cfg)
        engine, *_ = shardwise.initialize(model=model, config=engine_config(tp, pp, stage, dp))
        one = Saved(model)
        for i, b in enumerate(batches):
            if i == 0:
                with one.hooks(), (one.inside_stage3() if stage == 3 else one.hooks()):
                    loss = engine(*b)
            else:
                loss = engine(*b)
            engine.backward(loss)
            engine.step()
        out |= {"pp_rank": 0, "activations_per_micro_batch": one.total, "activations_peak": one.peak}
    ctx = engine.ctx if hasattr(engine, "ctx") else None
    out["tp_rank"] = ctx.tp.rank if ctx is not None else 0
    out["dp_rank"] = ctx.dp.rank if ctx is not None else rank
    report, out["memory_report_source"] = memory_report(engine)
    out["memory_report"] = {k: int(v) for k, v in report.items() if isinstance(v, (int, float))}
    return out


def memory_report(engine) -> tuple[dict, str]:
    """``engine.memory_report()``; where it cannot read a DTensor parameter's storage (a wrapper
    subclass has none), the same count with each DTensor read as its local tensor."""
    try:
        return engine.memory_report(), "memory_report()"
    except RuntimeError as exc:
        if "invalid python storage" not in str(exc):
            raise
    from shardwise.strategy import memory_totals
    from shardwise.tensor_parallel import local_tensor

    st = engine.strategy
    seen: set[int] = st.tier.excluded()

    def nbytes(tensors) -> int:
        total = 0
        for t in tensors:
            if isinstance(t, torch.Tensor):
                s = local_tensor(t).untyped_storage()
                if s.data_ptr() not in seen and s.nbytes() > 0:
                    seen.add(s.data_ptr())
                    total += s.nbytes()
        return total

    report = memory_totals(nbytes(engine.module.parameters()), nbytes(st.grad_sync.tensors()),
                           nbytes(b.opt_param for b in st.buckets),
                           nbytes(v for state in st.optimizer.state.values() for v in state.values()))
    return report, "memory_report() with DTensors read locally (strategy.memory_report fails on DTensor params)"


def planned(preset: str, tp: int, pp: int, dp: int, stage: int):
    from model import GPT

    from shardwise.planner_parallel import Mesh, plan_parallel

    with torch.device("meta"):
        model = GPT(gpt_config(preset))
    cfg = gpt_config(preset)
    return plan_parallel(model, Mesh(tp, pp, dp, partition="parameters"), stage, micro_batch=MICRO,
                         seq_len=cfg.seq_len, gradient_accumulation_steps=GAS)


def run_row(name: str, preset: str) -> list[dict]:
    from shardwise.testing import run_distributed

    tp, pp, dp, stage = ROWS[name]
    t0 = time.perf_counter()
    ranks = run_distributed(measure, tp * pp * dp, preset, tp, pp, dp, stage, timeout_s=600)
    plan = planned(preset, tp, pp, dp, stage)
    out = []
    for r in ranks:
        want = plan.rank_states(r["pp_rank"], r["tp_rank"], r["dp_rank"])  # model states only
        srow = plan.stages[r["pp_rank"]]
        got = r["memory_report"]
        out.append({"row": name, "tp": tp, "pp": pp, "dp": dp, "zero": stage, "rank": r["rank"],
                     "coords": f"pp={r['pp_rank']} dp={r['dp_rank']} tp={r['tp_rank']}",
                     "source": r["memory_report_source"],
                     "measured": {k: got.get(k) for k in FIELDS}, "planned": {k: want[k] for k in FIELDS},
                     "act_measured": r["activations_per_micro_batch"],
                     "act_planned": srow.activations_per_micro_batch,
                     "act_peak_measured": r["activations_peak"], "act_peak_planned": srow.activations,
                     "in_flight": srow.in_flight, "seconds": round(time.perf_counter() - t0, 1)})
    return out


def ratio(a, b) -> str:
    return "-" if not b or a is None else f"{a / b:.4f}"


def print_table(rows: list[dict]) -> None:
    head = ["row", "rank", "coords", "states meas", "states plan", "ratio", "act/mb meas", "act/mb plan", "ratio",
            "act peak meas", "act peak plan", "ratio"]
    lines = [[r["row"], str(r["rank"]), r["coords"], str(r["measured"]["total"]), str(r["planned"]["total"]),
              ratio(r["measured"]["total"], r["planned"]["total"]), str(r["act_measured"]), str(r["act_planned"]),
              ratio(r["act_measured"], r["act_planned"]), str(r["act_peak_measured"]), str(r["act_peak_planned"]),
              ratio(r["act_peak_measured"], r["act_peak_planned"])] for r in rows]
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    for line in [head] + lines:
        print("  ".join(x.rjust(w) for x, w in zip(line, widths)))
    print("bytes per rank; states: memory_report() total (params + grads + master + optimizer state) after one step;"
          " act/mb: saved for backward by one micro-batch's forward; act peak: most alive at once in one step")
    for r in rows:
        if r["source"] != "memory_report()":
            print(f"  {r['row']} rank {r['rank']}: {r['source']}")
    for r in rows:
        diff = {k: (r["measured"][k], r["planned"][k]) for k in FIELDS if r["measured"][k] != r["planned"][k]}
        if diff:
            print(f"  {r['row']} rank {r['rank']}: fields that differ (measured, planned): {diff}")


def throughput(mode: str, steps: int = 10, warmup: int = 3, cfg=None) -> None:
    """``shardwise run --nproc-per-node 2 benchmarks/parallel_memory.py --throughput dp2|tp2|pp2``
    (benchmarks/gpu_check.sh): tokens/s of a ~110M-parameter example GPT in bf16 on 2 GPUs, the
    same global batch (16 sequences of 512 tokens per step) at every mesh; rank 0 prints it."""
    import torch.distributed as dist

    import shardwise
    from model import GPT, GPTConfig

    tp, pp, dp, _ = ROWS[mode]
    micro, gas = 4, 4 // dp
    cfg = cfg or GPTConfig(vocab_size=12288, seq_len=512, n_layer=8, n_head=16, d_model=1024)
    config = {**engine_config(tp, pp, 1, dp), "train_batch_size": micro * gas * dp,
              "train_micro_batch_size_per_gpu": micro, "bf16": {"enabled": True}}
    shardwise.init_distributed()
    torch.manual_seed(0)
    if pp > 1:
        from pipeline import gpt_pipeline

        model = gpt_pipeline(cfg, num_stages=pp, partition_method="parameters")
    else:
        model = GPT(cfg)
    engine, *_ = shardwise.initialize(model=model, config=config)
    g = torch.Generator().manual_seed(dist.get_rank() // (tp * pp))
    data = [(x[:, :-1].contiguous(), x[:, 1:].contiguous()) for x in
            (torch.randint(0, cfg.vocab_size, (micro, cfg.seq_len + 1), generator=g) for _ in range(gas))]

    def step() -> None:
        if pp > 1:
            engine.train_batch(iter(data))
            return
        for x, y in data:
            engine.backward(engine(x, y))
            engine.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    secs = (time.perf_counter() - t0) / steps
    if dist.get_rank() == 0:
        tokens = micro * gas * dp * cfg.seq_len
        print(f"{mode}: tp {tp} pp {pp} dp {dp}: {tokens / secs:,.0f} tokens/s ({secs * 1e3:.1f} ms per step of "
              f"{tokens} tokens; {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'})",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help='"small" (4 blocks, d_model 64) or a GPTConfig preset')
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated of {list(ROWS)} (default {DEFAULT_ROWS})")
    p.add_argument("--json", help="write the rows (and failures) to this file")
    p.add_argument("--throughput", choices=["dp2", "tp2", "pp2"],
                   help="under `shardwise run --nproc-per-node 2`: tokens/s of one mesh (benchmarks/gpu_check.sh)")
    args = p.parse_args(argv)
    if args.throughput:
        throughput(args.throughput)
        return 0
    rows, failed = [], {}
    for name in [x.strip() for x in args.rows.split(",") if x.strip()]:
        tp, pp, dp, stage = ROWS[name]
        print(f"== {name}: tp {tp}, pp {pp}, dp {dp}, ZeRO-{stage} ({tp * pp * dp} ranks) ...", flush=True)
        try:
            got = run_row(name, args.preset)
        except Exception as exc:  # noqa: BLE001 -- a row that fails is reported and skipped
            failed[name] = f"{type(exc).__name__}: {exc}".strip()[:2000]
            print(f"   FAILED (skipped): {failed[name].splitlines()[0][:300]}", flush=True)
            traceback.print_exc(limit=3)
            continue
        rows += got
        print(f"   done in {got[-1]['seconds']} s", flush=True)
    if rows:
        print_table(rows)
    for name, why in failed.items():
        print(f"{name}: FAILED: {why.splitlines()[0][:300]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "micro_batch": MICRO,
                                               "gradient_accumulation_steps": GAS, "rows": rows,
                                               "failed": failed}, indent=1))
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
