"""shardwise ZeRO stages 0/1/2/3 vs torch DDP and FSDP2, side by side, on gloo CPU ranks.

Run from the repository root (see benchmarks/README.md)::

    .venv/bin/python benchmarks/compare.py                       # both models, ~2 min on a quiet machine
    .venv/bin/python benchmarks/compare.py --model 25m --steps 16
    .venv/bin/python benchmarks/compare.py --model 25m --bucket 5e5 2e6 6.25e6   # bucket sweep
    .venv/bin/python benchmarks/compare.py --model 1m --profile zero2            # where time goes

Setup (peers.md): ``--world`` ranks x 1 intra-op thread, fp32, global batch 8 sequences
(micro-batch 8/world per rank, no accumulation), AdamW lr 1e-3 with weight decay 0.01 set
explicitly on both sides (torch DDP: ``AdamW(fused=True)``; shardwise: the config's ``AdamW``,
fused on CPU), the same initial weights (one seed) and the same data (one seeded stream of
random tokens, rank r taking rows ``[r*mb, (r+1)*mb)`` of each global batch) for every system.

[Note: interleaved measurement]
Absolute step times drift by tens of percent between runs, even minutes apart, on these
machines, so every number is paired with a DDP number taken at the same time.

- ``--mode steps`` (default): all systems live in one process group (separate model copies in
  the same ranks) and take steps in turn, rotating who goes first; each step starts after a
  barrier and is timed as the max over ranks. Step i gives one paired sample per system; the
  ratio to DDP is the median over steps of ``t_system / t_ddp``. Peak RSS comes from one
  short extra launch of each system alone.
- ``--mode launches``: each system is its own process group (``run_distributed``: fresh gloo
  ranks), launched in rounds ``A B C D  A B C D ...``; a round gives one sample per system
  (median of its timed steps) and the ratio is the median over rounds.

A run during which other processes used more than ``BUSY_CORES`` of CPU is repeated
(``--busy-retries``) and otherwise flagged. Every system must end with the same loss as DDP.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(_ROOT), str(_ROOT / "examples" / "gpt")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

if not torch.cuda.is_available():
    # DeepSpeed rows: its CPU accelerator (gloo when oneCCL is absent), and this interpreter's
    # ninja first on PATH so its JIT-built ops are found in the cache rather than rebuilt
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

GLOBAL_BATCH = 8
LR = 1e-3
# set explicitly on both sides: torch's AdamW defaults to 0.01, DeepSpeed's (and so shardwise's)
# config AdamW to 0 -- left implicit, the two would train different problems
WEIGHT_DECAY = 0.01
SEED = 1234
DEFAULT_BUCKET = 2_000_000  # elements; see README.md "Bucket size"
# per mode and model: (rounds, warmup steps per launch, timed steps per launch)
DEFAULTS = {
    "steps": {"25m": (1, 2, 8), "1m": (1, 5, 40)},
    "launches": {"25m": (3, 2, 4), "1m": (5, 5, 25)},
}
import peers  # noqa: E402  (benchmarks/peers.py: fsdp2, plain, DeepSpeed)

SYSTEMS = ("ddp", "fsdp2", "zero0", "zero1", "zero2", "zero3", "plain") + (peers.DS_SYSTEMS if peers.HAVE_DEEPSPEED else ())
NO_BUCKET = ("ddp", "fsdp2", "plain")  # systems without a reduce-bucket size
BUSY_CORES = 0.25  # other processes' CPU use (cores) above which a round counts as disturbed


# -- ranks ---------------------------------------------------------------------------------
def _batches(cfg, n_steps: int, rank: int, world: int):
    """The same token stream for every system: rank r's slice of each global batch
    (``world=1``: the whole global batch, for ``plain``)."""
    g = torch.Generator().manual_seed(SEED + 1)
    mb = GLOBAL_BATCH // world
    out = []
    for _ in range(n_steps):
        tok = torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, cfg.seq_len + 1), generator=g)
        mine = tok[rank * mb : (rank + 1) * mb]
        out.append((mine[:, :-1].contiguous(), mine[:, 1:].contiguous()))
    return out


def _storage_bytes(tensors, seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        s = t.untyped_storage()
        if s.nbytes() > 0 and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (from /proc/stat; 0 where unavailable)."""
    try:
        f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    v = [int(x) for x in f]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _build(system: str, model_name: str, bucket: int, precision: str = "fp32"):
    """Model + optimizer for one system on this rank, from the shared seed.
    Returns ``(step(x, y, marks) -> loss, state_bytes() -> dict, n_params)``; ``step`` appends
    the clock after forward and after backward to ``marks``."""
    from model import GPT, GPTConfig

    world = dist.get_world_size()
    torch.manual_seed(SEED)
    model = GPT(GPTConfig.preset(model_name))
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    if system == "fsdp2":
        return (*peers.build_fsdp2(model, LR, WEIGHT_DECAY, precision), n_params)
    if system == "plain":
        return (*peers.build_plain(model, LR, WEIGHT_DECAY, precision), n_params)
    if system in peers.DS_SYSTEMS:
        return (*peers.build_deepspeed(model, int(system[-1]), bucket, LR, WEIGHT_DECAY, precision,
                                       GLOBAL_BATCH), n_params)
    if system == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model)  # gloo, default buckets (25 MiB, first bucket 1 MiB)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

        def step(x, y, marks):
            with peers._autocast(precision):  # bf16: autocast forward, fp32 params/grads/state
                loss = ddp(x, y)
            marks.append(time.perf_counter())
            loss.backward()
            marks.append(time.perf_counter())
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        def state_bytes() -> dict:
            # at the step's peak: params + grads + AdamW state. DDP's reducer buckets (another
            # 4 bytes/param with the default gradient_as_bucket_view=False) are not counted.
            seen: set[int] = set()
            uniq = list({id(p): p for p in model.parameters()}.values())
            params = _storage_bytes(uniq, seen)
            grads = 4 * n_params  # freed by zero_grad(set_to_none=True); live during step()
            state = _storage_bytes((v for st in opt.state.values() for v in st.values()), seen)
            return {"params": params, "grads": grads, "master_params": 0, "optimizer_state": state,
                    "total": params + grads + state}

        return step, state_bytes, n_params

    import shardwise

    engine, _, _, _ = shardwise.initialize(
        model=model, model_parameters=model.parameters(),
        config={
            "train_batch_size": GLOBAL_BATCH,
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY}},
            "zero_optimization": {"stage": int(system[-1]), "overlap_comm": True,
                                  # stage 3 reduces per fetch unit: no reduce bucket
                                  **({"reduce_bucket_size": int(bucket)} if system != "zero3" else {}),
                                  # extra zero_optimization keys for experiments, e.g.
                                  # ZERO_EXTRA='{"stage3_prefetch_bucket_size": 3e6}'
                                  **json.loads(os.environ.get("ZERO_EXTRA", "{}"))},
            "gradient_clipping": 0.0,  # explicit: no clipping, as the torch peers
            "steps_per_print": 1_000_000,  # (0 is refused by the config validator)
            **({"bf16": {"enabled": True}} if precision == "bf16" else {}),
        })

    return peers.engine_step(engine), lambda: dict(engine.memory_report()), n_params


def _max_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _mean_over_ranks(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _losses(system: str, values: list[float]) -> list[float]:
    """Mean over ranks, or rank 0's values for a rank-0-only system (losses, phases)."""
    if system in peers.RANK0_ONLY:
        t = torch.tensor(values, dtype=torch.float64)
        dist.broadcast(t, 0)
        return t.tolist()
    return _mean_over_ranks(values)


def rank_interleaved(specs: list[tuple[str, str, int]], model_name: str, warmup: int, steps: int,
                     precision: str = "fp32") -> dict:
    """All systems in one process group, stepping in turn: step i runs one step of every system,
    starting from system ``i mod n`` (rotating who goes first). Each system's step starts after
    a barrier; its time is the max over ranks. Module-level for ``run_distributed``."""
    from model import GPTConfig

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    t_build = time.perf_counter()
    built = {label: _build(system, model_name, bucket, precision) for label, system, bucket in specs}
    data = _batches(GPTConfig.preset(model_name), warmup + steps, rank, world)
    full = _batches(GPTConfig.preset(model_name), warmup + steps, 0, 1)  # for rank-0-only systems
    kind = {label: system for label, system, _ in specs}
    t_build = time.perf_counter() - t_build
    times: dict[str, list[float]] = {label: [] for label, _, _ in specs}
    phases: dict[str, list[list[float]]] = {label: [] for label, _, _ in specs}
    losses: dict[str, list[float]] = {label: [] for label, _, _ in specs}
    n = len(specs)
    for i, (x, y) in enumerate(data):
        for label, _, _ in specs[i % n:] + specs[: i % n]:
            step = built[label][0]
            if kind[label] in peers.RANK0_ONLY:
                x, y = full[i]
            else:
                x, y = data[i]
            marks: list[float] = []
            dist.barrier()
            t0 = time.perf_counter()
            loss = step(x, y, marks)
            t1 = time.perf_counter()
            times[label].append(t1 - t0)
            if i >= warmup:
                phases[label].append([marks[0] - t0, marks[1] - marks[0], t1 - marks[1]])
            losses[label].append(float(loss.detach()))
    out = {}
    for label, _, _ in specs:
        all_t = _max_over_ranks(times[label])
        out[label] = {
            "times": all_t[warmup:],
            "warmup_times": all_t[:warmup],
            # median over timed steps of (forward, backward, optimizer step) on this rank, mean over ranks
            "phases": _losses(kind[label], [statistics.median(col) for col in zip(*phases[label])]),
            "losses": _losses(kind[label], losses[label]),
            "mem": built[label][1](),
            "n_params": built[label][2],
        }
    return {"systems": out, "build_s": t_build, "cpu_s": _cpu_s()}


def rank_run(system: str, model_name: str, warmup: int, steps: int, bucket: int,
             profile: str | None = None, precision: str = "fp32") -> dict:
    """One system alone in its process group: ``warmup + steps`` steps. Used for per-system
    peak RSS, for ``--mode launches`` and for ``--profile``. Module-level for ``run_distributed``."""
    from model import GPTConfig

    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    rss_start = _rss_mib()
    step, state_bytes, n_params = _build(system, model_name, bucket, precision)
    if system in peers.RANK0_ONLY:
        rank, world = 0, 1  # the whole global batch
    data = _batches(GPTConfig.preset(model_name), warmup + steps, rank, world)
    rank = dist.get_rank()
    times, losses = [], []
    prof = None
    dist.barrier()
    for i, (x, y) in enumerate(data):
        if profile and i == warmup and rank == 0:
            prof = _start_profile(profile)
        t0 = time.perf_counter()
        loss = step(x, y, [])
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    if prof is not None:
        prof = _stop_profile(prof, profile, steps)
    return {
        # a step ends when the slowest rank ends; the loss is the global-batch mean
        "times": _max_over_ranks(times)[warmup:],
        "losses": _losses(system, losses),
        "mem": state_bytes(),
        "n_params": n_params,
        "rss_peak_mib": _rss_mib(),
        "rss_start_mib": rss_start,
        "cpu_s": _cpu_s(),
        "profile": prof,
    }


def _start_profile(kind: str):
    if kind.startswith("cprofile"):
        import cProfile

        p = cProfile.Profile()
        p.enable()
        return ("cprofile", p)
    from torch.profiler import ProfilerActivity, profile

    p = profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_stack=False)
    p.__enter__()
    return ("torch", p)


def _stop_profile(handle, kind: str, steps: int) -> str:
    import io

    what, p = handle
    if what == "cprofile":
        import pstats

        p.disable()
        buf = io.StringIO()
        st = pstats.Stats(p, stream=buf).sort_stats("cumulative")
        st.print_stats(45)
        buf.write("\n---- by tottime ----\n")
        st.sort_stats("tottime").print_stats(30)
        return f"cProfile over {steps} steps (rank 0)\n" + buf.getvalue()
    p.__exit__(None, None, None)
    return (f"torch.profiler over {steps} steps (rank 0)\n"
            + p.key_averages().table(sort_by="cpu_time_total", row_limit=40))


# -- driver --------------------------------------------------------------------------------
def _systems(names: list[str], buckets: list[int]) -> list[tuple[str, str, int]]:
    """(label, system, bucket) in launch order."""
    out = []
    for s in names:
        if s in NO_BUCKET:
            out.append((s, s, 0))
        else:
            for b in buckets:
                label = s if len(buckets) == 1 else f"{s}@{b:g}"
                out.append((label, s, b))
    return out


def _launch(fn, args, *fargs, timeout: float, **fkw):
    """run_distributed + how much CPU (in cores) anything other than our ranks used meanwhile."""
    from shardwise.testing import run_distributed

    b0, w0 = _busy_s(), time.perf_counter()
    res = run_distributed(fn, args.world, *fargs, timeout_s=timeout, **fkw)
    foreign = (_busy_s() - b0 - sum(x["cpu_s"] for x in res)) / (time.perf_counter() - w0)
    return res, max(0.0, foreign)


def _with_retries(what: str, args, attempt_fn):
    """Run ``attempt_fn() -> (result, foreign_cores, line)``; repeat while the machine was busy."""
    for attempt in range(args.busy_retries + 1):
        result, busy, line = attempt_fn()
        flag = ""
        if busy > BUSY_CORES:
            flag = "  <-- BUSY MACHINE" + (", repeating" if attempt < args.busy_retries else "")
        print(f"{what}: {line} (other load up to {busy:.2f} cores){flag}", flush=True)
        if busy <= BUSY_CORES:
            break
    return result, busy


def bench_model(model_name: str, args) -> dict:
    from benchmarks.compare import rank_interleaved, rank_run  # importable by module name in ranks

    d = DEFAULTS[args.mode][model_name]
    rounds = args.rounds or d[0]
    warmup = args.warmup if args.warmup is not None else d[1]
    steps = args.steps or d[2]
    systems = _systems(args.systems, args.bucket)
    labels = [label for label, _, _ in systems]
    per_step = 2.5 if model_name == "25m" else 0.15
    timeout = 120 + 3 * per_step * (warmup + steps) * (len(systems) if args.mode == "steps" else 1)
    samples: dict[str, list[float]] = {label: [] for label in labels}   # one per paired round
    losses: dict[str, list[list[float]]] = {label: [] for label in labels}  # per launch
    mems: dict[str, dict] = {}
    phases: dict[str, list[float]] = {}
    n_params = 0
    busy_rounds: list[float] = []
    t0 = time.perf_counter()

    if args.mode == "steps":
        # [Note: interleaved measurement], steps mode
        for r in range(rounds):
            def attempt():
                res, busy = _launch(rank_interleaved, args, systems, model_name, warmup, steps, timeout=timeout,
                                    precision=args.precision)
                sysres = res[0]["systems"]
                line = "  ".join(f"{k}={1e3 * statistics.median(v['times']):.0f}ms" for k, v in sysres.items())
                warm = sum(sum(v["warmup_times"]) for v in sysres.values())
                return sysres, busy, line + (f"  (build {res[0]['build_s']:.0f} s, warmup {warm:.0f} s; "
                                             f"at {time.perf_counter() - t0:.0f} s)")

            sysres, busy = _with_retries(f"[{model_name}] interleaved run {r + 1}/{rounds}", args, attempt)
            busy_rounds.append(busy)
            for label in labels:
                samples[label].extend(sysres[label]["times"])
                losses[label].append(sysres[label]["losses"])
                mems[label] = sysres[label]["mem"]
                phases[label] = sysres[label]["phases"]
                n_params = sysres[label]["n_params"]
        rss: dict[str, list[float]] = {}
        rss_start: list[float] = []
        for label, system, bucket in systems:  # each system alone, for its own peak RSS
            res, _ = _launch(rank_run, args, system, model_name, 1, 1, bucket, timeout=timeout,
                             precision=args.precision)
            rss[label] = [x["rss_peak_mib"] for x in res]
            rss_start = [x["rss_start_mib"] for x in res]
    else:
        # [Note: interleaved measurement], launches mode
        runs: dict[str, list[dict]] = {label: [] for label in labels}
        for r in range(rounds):
            def attempt():
                round_runs, busy = {}, 0.0
                for label, system, bucket in systems:
                    res, foreign = _launch(rank_run, args, system, model_name, warmup, steps, bucket,
                                           precision=args.precision,
                                           timeout=timeout)
                    res[0]["rss_ranks"] = [x["rss_peak_mib"] for x in res]
                    round_runs[label] = res[0]
                    busy = max(busy, foreign)
                line = "  ".join(f"{k}={1e3 * statistics.median(v['times']):.0f}ms" for k, v in round_runs.items())
                return round_runs, busy, line + f"  ({time.perf_counter() - t0:.0f} s)"

            round_runs, busy = _with_retries(f"[{model_name}] round {r + 1}/{rounds}", args, attempt)
            busy_rounds.append(busy)
            for label in labels:
                runs[label].append(round_runs[label])
                samples[label].append(statistics.median(round_runs[label]["times"]))
                losses[label].append(round_runs[label]["losses"])
                mems[label] = round_runs[label]["mem"]
                n_params = round_runs[label]["n_params"]
        rss = {label: [max(x["rss_ranks"][k] for x in runs[label]) for k in range(args.world)] for label in labels}
        rss_start = [runs[labels[0]][0]["rss_start_mib"]]

    base = "ddp" if "ddp" in samples else labels[0]
    tokens = GLOBAL_BATCH * _seq_len(model_name)
    ref_loss = losses[base][0][-1]
    rows = []
    for label, system, bucket in systems:
        ratios = [s / b for s, b in zip(samples[label], samples[base])]
        last = [lo[-1] for lo in losses[label]]
        ideal = peers.ideal_bytes(system, n_params, args.world, args.precision)
        med = statistics.median(samples[label])
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        rows.append({
            "system": label,
            "stage": int(system[-1]) if system[-1].isdigit() and system != "fsdp2" else None,
            "bucket_elements": bucket or None,
            "median_step_s": med,
            "samples_s": samples[label],
            "ratio_vs_ddp": statistics.median(ratios),
            "ratio_iqr": [q[0], q[2]],
            "ratio_of_medians": med / statistics.median(samples[base]),
            "phases_s": dict(zip(("forward", "backward", "step"), phases[label])) if label in phases else None,
            "paired_ratios": ratios,
            "tokens_per_s": tokens / med,
            "model_state_bytes": mems[label]["total"],
            "model_state_breakdown": mems[label],
            "ideal_bytes": ideal,
            "state_vs_ideal": mems[label]["total"] / ideal,
            "peak_rss_mib_ranks": rss[label],
            "last_loss": last[0],
            "last_loss_spread_across_launches": max(last) - min(last),
            "loss_rel_diff_vs_ddp": abs(last[0] - ref_loss) / abs(ref_loss),
            "losses": losses[label][0],
        })
    out = {"model": model_name, "n_params": n_params, "seq_len": _seq_len(model_name),
           "world": args.world, "precision": args.precision, "mode": args.mode, "rounds": rounds,
           "warmup": warmup, "steps": steps,
           "elapsed_s": time.perf_counter() - t0, "other_load_cores": busy_rounds,
           "rss_at_rank_start_mib": rss_start, "rows": rows}
    _print_table(out)
    if args.profile:
        label, system, bucket = next(s for s in systems if args.profile in (s[0], s[1]))
        res, _ = _launch(rank_run, args, system, model_name, warmup, steps, bucket,
                         precision=args.precision,
                         profile=args.profile_kind, timeout=timeout * 4)
        print(f"\n### profile of {label} ({model_name}), rank 0\n{res[0]['profile']}")
        out["profile"] = {label: res[0]["profile"]}
    return out


def _seq_len(model_name: str) -> int:
    from model import GPTConfig

    return GPTConfig.preset(model_name).seq_len


def _print_table(out: dict) -> None:
    mib = 2**20
    how = ("steps interleaved in one process group" if out["mode"] == "steps"
           else "systems launched in interleaved rounds")
    n_pairs = len(out["rows"][0]["paired_ratios"])
    print(f"\n#### {out['model']} model ({out['n_params'] / 1e6:.2f}M params, seq {out['seq_len']}), "
          f"{out['world']} ranks x 1 thread, global batch {GLOBAL_BATCH}, {out['precision']}; {how}: {out['rounds']} x "
          f"({out['warmup']} warmup + {out['steps']} timed steps), {n_pairs} paired samples; "
          f"{out['elapsed_s']:.0f} s\n")
    print("| system | bucket (elems) | median step | vs DDP (median of paired ratios) | IQR of ratios | tokens/s "
          "| model state / rank | ideal | state / ideal | peak RSS / rank | last loss | rel. diff vs DDP |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in out["rows"]:
        print(f"| {r['system']} | {'' if r['bucket_elements'] is None else '%.3g' % r['bucket_elements']} "
              f"| {1e3 * r['median_step_s']:.1f} ms | {r['ratio_vs_ddp']:.3f}x "
              f"| {r['ratio_iqr'][0]:.2f}-{r['ratio_iqr'][1]:.2f} | {r['tokens_per_s']:,.0f} "
              f"| {r['model_state_bytes'] / mib:.1f} MiB | {r['ideal_bytes'] / mib:.1f} MiB "
              f"| {r['state_vs_ideal']:.3f} | {' / '.join('%.0f' % x for x in r['peak_rss_mib_ranks'])} MiB "
              f"| {r['last_loss']:.6f} | {r['loss_rel_diff_vs_ddp']:.1e} |")
    diffs = [r["loss_rel_diff_vs_ddp"] for r in out["rows"]]
    spread = max(r["last_loss_spread_across_launches"] for r in out["rows"])
    print(f"\nmax relative difference of last losses vs DDP: {max(diffs):.2e} "
          f"(a system's last loss varies across launches by up to {spread:.1e}); peak RSS includes the "
          f"torch runtime (~{max(out['rss_at_rank_start_mib']):.0f} MiB at rank start)")
    if max(diffs) > 1e-5:
        print(f"WARNING: last losses differ from DDP's by up to {max(diffs):.1e} (relative): the systems "
              "did not train the same problem (initialisation, data or optimizer settings differ)")
    if out["rows"][0]["phases_s"]:
        print("\nwhere a step's time goes (median ms per phase, mean over ranks; 'step' = optimizer step "
              "incl. waits for gradient reductions and the parameter all-gather):\n")
        print("| system | forward | backward (incl. hooks, overlapped reductions) | step | sum |")
        print("|---|---:|---:|---:|---:|")
        for r in out["rows"]:
            ph = r["phases_s"]
            print(f"| {r['system']} | {1e3 * ph['forward']:.1f} | {1e3 * ph['backward']:.1f} "
                  f"| {1e3 * ph['step']:.1f} | {1e3 * sum(ph.values()):.1f} |")
    busy = max(out["other_load_cores"])
    if busy > BUSY_CORES:
        print(f"WARNING: other processes used up to {busy:.2f} cores during the timed runs; "
              "numbers are unreliable, rerun on a quiet machine")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("25m", "1m", "both"), default=None,
                    help="default: both for fp32, 1m for bf16 (bf16 is ~10x slower on CPU)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: shardwise/DeepSpeed bf16 config; DDP/FSDP2/plain autocast the forward")
    ap.add_argument("--mode", choices=("steps", "launches"), default="steps",
                    help="steps: all systems in one process group taking steps in turn (default; "
                         "paired per step); launches: each system its own process group, rounds of launches")
    dflt = "; ".join(f"{m}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for m, d in DEFAULTS.items())
    ap.add_argument("--rounds", type=int, default=None, help=f"launches per system ({dflt}; (rounds, warmup, steps))")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per launch")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per launch")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--bucket", type=float, nargs="+", default=[DEFAULT_BUCKET],
                    help="shardwise reduce_bucket_size in elements; several values = a sweep "
                         f"(default {DEFAULT_BUCKET:g})")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--busy-retries", type=int, default=1,
                    help="repeat a timed launch/round up to this many times when other processes loaded "
                         "the machine (more than %.2f cores)" % BUSY_CORES)
    ap.add_argument("--profile", default=None,
                    help="afterwards, profile one more launch of this system (e.g. zero2) on rank 0")
    ap.add_argument("--profile-kind", default="cprofile", choices=("cprofile", "torch"))
    ap.add_argument("--out", default=str(_ROOT / "benchmarks" / "results.json"))
    args = ap.parse_args(argv)
    args.bucket = [int(b) for b in args.bucket]
    if GLOBAL_BATCH % args.world:
        ap.error(f"--world must divide the global batch {GLOBAL_BATCH}")

    t0 = time.perf_counter()
    if args.model is None:
        args.model = "both" if args.precision == "fp32" else "1m"
    models = ["25m", "1m"] if args.model == "both" else [args.model]
    results = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "cpu": _cpu_name(), "cores": os.cpu_count(), "precision": args.precision, "models": {}}
    for m in models:
        results["models"][m] = bench_model(m, args)
    results["elapsed_s"] = time.perf_counter() - t0
    print(f"\n[compare.py ran in {results['elapsed_s']:.0f} s; torch {torch.__version__}; "
          f"{results['cpu']}, {results['cores']} cores]")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return results


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
