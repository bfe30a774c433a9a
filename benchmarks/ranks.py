"""What runs inside the benchmark's gloo ranks (``run_distributed`` targets, module-level so the
ranks can import them by name): building each system from the shared seed, the shared token
stream, the interleaved and the single-system timed loops, and their progress lines.

The driver is ``compare.py``; see its docstring and benchmarks/README.md.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE), str(_HERE.parent), str(_HERE.parent / "examples" / "gpt")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import peers  # noqa: E402  (benchmarks/peers.py: fsdp2, plain, DeepSpeed)

if not torch.cuda.is_available():
    # DeepSpeed rows: its CPU accelerator (gloo when oneCCL is absent), and this interpreter's
    # ninja first on PATH so its JIT-built ops are found in the cache rather than rebuilt. Set at
    # import, in the driver, before any rank starts: the ranks (and prepare.py's build) inherit it.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _bin = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(_bin + os.pathsep):
        os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")

GLOBAL_BATCH = 8
LR = 1e-3
# set explicitly on both sides: torch's AdamW defaults to 0.01, DeepSpeed's (and so shardwise's)
# config AdamW to 0 -- left implicit, the two would train different problems
WEIGHT_DECAY = 0.01
SEED = 1234
PROGRESS_EVERY_S = 10.0  # rank 0 prints a progress line at most this often (and at the first/last step)


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


class _Progress:
    """Rank 0's progress lines (``"[25m] interleaved run 1/1: step 4/10, 38 s elapsed, ETA 57 s"``),
    printed with ``flush=True`` (the ranks share the driver's stdout: forkserver children inherit
    its file descriptors), at most every ``PROGRESS_EVERY_S`` plus the first and the last step."""

    def __init__(self, tag: str | None, total: int, warmup: int, t_start: float):
        self.tag = tag if tag and dist.get_rank() == 0 else None
        self.total, self.warmup, self.t_start = total, warmup, t_start
        self.t_steps = t_start  # when the steps began (after the build): see begin()
        self.t_first = None  # end of the first step: the ETA uses the pace after it
        self.last = 0.0

    def begin(self) -> None:
        self.t_steps = time.perf_counter()

    def say(self, text: str) -> None:
        if self.tag:
            print(f"{self.tag}: {text}", flush=True)

    def step(self, i: int, now: float | None = None) -> None:
        if not self.tag:
            return
        now = time.perf_counter() if now is None else now
        if self.t_first is None:
            self.t_first = now
        done = i + 1
        if done not in (1, self.total) and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        if done > 1:
            eta = (now - self.t_first) / (done - 1) * (self.total - done)
        else:
            eta = (now - self.t_steps) * (self.total - done)  # the first step: includes warm-up costs
        what = " (warmup)" if done <= self.warmup else ""
        self.say(f"step {done}/{self.total}{what}, {now - self.t_start:.0f} s elapsed, ETA {eta:.0f} s")


def rank_interleaved(specs: list[tuple[str, str, int]], model_name: str, warmup: int, steps: int,
                     precision: str = "fp32", progress: str | None = None) -> dict:
    """All systems in one process group, stepping in turn: step i runs one step of every system,
    starting from system ``i mod n`` (rotating who goes first). Each system's step starts after
    a barrier; its time is the max over ranks. ``progress``: the tag of rank 0's progress lines
    (None: silent)."""
    from model import GPTConfig

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    prog = _Progress(progress, warmup + steps, warmup, t_start)
    built = {label: _build(system, model_name, bucket, precision) for label, system, bucket in specs}
    data = _batches(GPTConfig.preset(model_name), warmup + steps, rank, world)
    full = _batches(GPTConfig.preset(model_name), warmup + steps, 0, 1)  # for rank-0-only systems
    kind = {label: system for label, system, _ in specs}
    t_build = time.perf_counter() - t_start
    prog.say(f"built {len(specs)} systems in {t_build:.0f} s; {warmup} warmup + {steps} timed steps of each, in turn")
    prog.begin()
    times: dict[str, list[float]] = {label: [] for label, _, _ in specs}
    phases: dict[str, list[list[float]]] = {label: [] for label, _, _ in specs}
    losses: dict[str, list[float]] = {label: [] for label, _, _ in specs}
    n = len(specs)
    for i in range(warmup + steps):
        for label, _, _ in specs[i % n:] + specs[: i % n]:
            step = built[label][0]
            x, y = full[i] if kind[label] in peers.RANK0_ONLY else data[i]
            marks: list[float] = []
            dist.barrier()
            t0 = time.perf_counter()
            loss = step(x, y, marks)
            t1 = time.perf_counter()
            times[label].append(t1 - t0)
            if i >= warmup:
                phases[label].append([marks[0] - t0, marks[1] - marks[0], t1 - marks[1]])
            losses[label].append(float(loss.detach()))
        prog.step(i)
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
             profile: str | None = None, precision: str = "fp32", progress: str | None = None) -> dict:
    """One system alone in its process group: ``warmup + steps`` steps. Used for the calibration
    launches (pace and peak RSS), for ``--mode launches`` and for ``--profile``."""
    from model import GPTConfig

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    rss_start = _rss_mib()
    prog = _Progress(progress, warmup + steps, warmup, t_start)
    step, state_bytes, n_params = _build(system, model_name, bucket, precision)
    t_build = time.perf_counter() - t_start
    if system in peers.RANK0_ONLY:
        rank, world = 0, 1  # the whole global batch
    data = _batches(GPTConfig.preset(model_name), warmup + steps, rank, world)
    rank = dist.get_rank()
    times, losses = [], []
    prof = None
    dist.barrier()
    prog.begin()
    for i, (x, y) in enumerate(data):
        if profile and i == warmup and rank == 0:
            prof = _start_profile(profile)
        t0 = time.perf_counter()
        loss = step(x, y, [])
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        prog.step(i)
    if prof is not None:
        prof = _stop_profile(prof, profile, steps)
    all_t = _max_over_ranks(times)
    return {
        # a step ends when the slowest rank ends; the loss is the global-batch mean
        "times": all_t[warmup:],
        "warmup_times": all_t[:warmup],
        "losses": _losses(system, losses),
        "mem": state_bytes(),
        "n_params": n_params,
        "build_s": _max_over_ranks([t_build])[0],
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



def seq_len(model_name: str) -> int:
    from model import GPTConfig

    return GPTConfig.preset(model_name).seq_len
