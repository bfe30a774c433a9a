"""The CUDA path in one process, one report: what ``benchmarks/gpu_check.sh`` runs on a lent GPU.

    python3 benchmarks/gpu_report.py --out DIR            # on a GPU (NCCL, world size 1), ~7 min
    python3 benchmarks/gpu_report.py --cpu-dry-run --out DIR   # the same code at tiny sizes on CPU (gloo)

Writes ``DIR/gpu_report.json`` and ``DIR/gpu_report.md`` after every part (a run killed by the
time guard still leaves the parts it finished). Parts, each guarded (an exception is recorded
as the part's ``error``, the next part runs) and each with a time budget (``BUDGET_S``):

1. ``parity``: shardwise stages 0-3 against plain PyTorch (AdamW, same init and batches) on a
   world of 1 over NCCL: fp32 (losses rtol 1e-5, parameters atol 1e-4, or 4x plain PyTorch's
   own run-to-run difference: [Note: parity on a GPU]) and bf16 against a bf16 model with fp32
   masters (2e-2, as tests/distributed/test_parity.py).
2. ``collectives``: NCCL's all-reduce, reduce-scatter and all-gather on device tensors at world
   1 (a copy each; the multi-rank NCCL path needs 2 GPUs) and the policy shardwise picks for
   the backend ([Note: reduce-to-shard implementation] in comm/context.py).
3. ``checkpoint_rng``: save, draw from the CUDA generator, load, draw again: the same numbers
   (checkpoint/rng.py keeps ``torch.cuda`` RNG state when CUDA is used).
4. ``throughput``: a ~1B GPT (18 layers, d 2048, vocab 50304, seq 1024) in bf16: plain PyTorch
   (bf16 weights, fp32 masters, fused AdamW), FSDP2 (``fully_shard`` per block + root, bf16
   params, fp32 reduce) and shardwise stages 0-3, one after another (each freed before the
   next). Median step time of the timed steps, tokens/s, MFU = 6 N tokens / time / peak
   (989 TFLOP/s dense bf16 for H100/H200, the datasheet figure; attention FLOPs not counted),
   peak device memory (``max_memory_allocated`` from the build on) against
   ``shardwise.estimate.model_states`` (states + activations) and ``engine.memory_report()``.
5. ``offload``: the same model at stage 2 with ``offload_optimizer: cpu`` (pinned fp32 masters
   and Adam state in host memory): tokens/s and the forward / backward / step split of
   ``wall_clock_breakdown`` (device-synchronised timers), against stage 2 on the device.
6. ``launcher``: the bundled example (examples/gpt) through ``shardwise run --nproc-per-node 1``
   (torchrun; NCCL on a GPU) in a child process: ZeRO-2, then ZeRO-3 built under ``zero.Init``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

T0 = time.monotonic()  # before torch's import: the report's wall time is the process's
ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "examples" / "gpt"), str(ROOT / "src")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from gpu_report_format import BUDGET_S, PARTS, SCHEMA, markdown, validate  # noqa: E402
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def log(msg: str) -> None:
    print(f"[gpu_report {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


class PartTimeout(Exception):
    """A part ran past its budget (raised from SIGALRM between Python operations)."""


def _alarm(signum, frame):  # noqa: ARG001
    raise PartTimeout("the part ran past its time budget")


# -- sizes --------------------------------------------------------------------------------------
def sizes(dry: bool) -> dict:
    from model import GPTConfig

    if dry:  # the same code paths, tiny
        tiny = GPTConfig.preset("tiny")
        return {"parity_cfg": tiny, "parity_batch": 4, "parity_steps": 3,
                "big_cfg": tiny, "micro": 2, "warmup": 1, "steps": 2, "offload_steps": 2, "launcher_steps": 2}
    return {"parity_cfg": GPTConfig.preset("25m"), "parity_batch": 8, "parity_steps": 5,
            "big_cfg": GPTConfig(vocab_size=50304, seq_len=1024, n_layer=18, n_head=16, d_model=2048),
            "micro": 8, "warmup": 2, "steps": 10, "offload_steps": 4, "launcher_steps": 10}


def device() -> torch.device:
    from shardwise.comm.context import pick_device

    return pick_device(int(os.environ.get("LOCAL_RANK", 0)))[0]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free() -> None:
    """Give the last system's device memory back before the next one (cycles first). Nothing on
    CPU: the dry run's tensors are tiny, and a collection there costs ~0.2 s each time."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def world_of_one() -> None:
    """A process group of one rank (NCCL on CUDA, gloo on CPU) made by shardwise itself."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import shardwise

    shardwise.init_distributed()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    except OSError:
        return platform.machine()


def env_info(dry: bool) -> dict:
    import torch.distributed as dist

    pin = None
    mk = ROOT / "Makefile"
    if mk.exists():
        m = re.search(r"torch==([0-9][0-9a-z.+]*)", mk.read_text())
        pin = m.group(1) if m else None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    commit = commit or os.environ.get("SHARDWISE_COMMIT")  # the device copy of the tree has no .git
    cuda = torch.cuda.is_available()
    return {"mode": "cpu-dry-run" if dry else "cuda", "torch": torch.__version__, "torch_pin": pin,
            "torch_matches_pin": pin is not None and torch.__version__.split("+")[0] == pin,
            "cuda_runtime": torch.version.cuda, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "device_count": torch.cuda.device_count() if cuda else 0,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "python": platform.python_version(), "host_cpu": _cpu_model(),
            "shardwise_commit": commit}


# -- part 1: parity -----------------------------------------------------------------------------
def _batches(cfg, batch: int, steps: int, dev: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=g).to(dev) for _ in range(steps)]


def _snapshot(model) -> dict:
    import shardwise.zero

    with shardwise.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}


def _reference(cfg, data, dtype: torch.dtype, dev: torch.device) -> dict:
    from model import GPT

    torch.manual_seed(0)
    model = GPT(cfg).to(dev, dtype)
    params = list(model.parameters())
    master = params if dtype == torch.float32 else [p.detach().float().clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(master, lr=1e-3, weight_decay=0.01, fused=True)
    losses = []
    for x in data:
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        if dtype != torch.float32:
            for m, p in zip(master, params):
                m.grad, p.grad = p.grad.float(), None
        opt.step()
        opt.zero_grad()
        if dtype != torch.float32:
            with torch.no_grad():
                for m, p in zip(master, params):
                    p.copy_(m)
        losses.append(loss.item())
    return {"losses": losses, "params": _snapshot(model)}


def _shardwise_run(cfg, data, stage: int, bf16: bool) -> dict:
    import shardwise
    from model import GPT

    torch.manual_seed(0)
    model = GPT(cfg)
    engine, *_ = shardwise.initialize(model=model, config={
        "train_batch_size": data[0].shape[0], "steps_per_print": 10**6, "gradient_clipping": 0.0,
        "bf16": {"enabled": bf16}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage}})
    losses = []
    for x in data:
        loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    out = {"losses": losses, "params": _snapshot(model)}
    engine.destroy()
    return out


def _diffs(run: dict, ref: dict) -> tuple[float, float]:
    """(largest relative loss difference, largest absolute parameter difference)."""
    loss = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(run["losses"], ref["losses"]))
    return loss, max(float((run["params"][k] - ref["params"][k]).abs().max()) for k in ref["params"])


# [Note: parity on a GPU]
# On CPU at world size 1 shardwise matches plain PyTorch bitwise. On a GPU some kernels are not
# run-to-run deterministic (atomics in the embedding and attention backward), so plain PyTorch
# differs from itself, and Adam's first steps (about sign(g) * lr) turn a near-zero gradient's
# noise into a visible parameter difference. So the reference runs twice: the tolerance is the
# fixed one (fp32: losses rtol 1e-5, parameters atol 1e-4; bf16: 2e-2) or 4x the reference's own
# difference, whichever is larger, and both figures are in the report.
def part_parity(sz: dict, dev: torch.device, deadline: float) -> dict:
    cfg = sz["parity_cfg"]
    data = _batches(cfg, sz["parity_batch"], sz["parity_steps"], dev)
    rows, ok = [], True
    for precision, dtype, rtol, atol in (("fp32", torch.float32, 1e-5, 1e-4), ("bf16", torch.bfloat16, 2e-2, 2e-2)):
        ref = _reference(cfg, data, dtype, dev)
        noise_loss, noise_param = _diffs(_reference(cfg, data, dtype, dev), ref)
        loss_tol, param_tol = max(rtol, 4 * noise_loss), max(atol, 4 * noise_param)
        for stage in (0, 1, 2, 3):
            if time.monotonic() > deadline:
                raise PartTimeout(f"budget spent before {precision} stage {stage}")
            run = _shardwise_run(cfg, data, stage, precision == "bf16")
            loss_rel, param_abs = _diffs(run, ref)
            passed = loss_rel <= loss_tol and param_abs <= param_tol
            ok &= passed
            rows.append({"precision": precision, "stage": stage, "steps": len(data), "loss_max_rel_diff": loss_rel,
                         "param_max_abs_diff": param_abs, "rtol": loss_tol, "atol": param_tol,
                         "reference_noise": {"loss_max_rel_diff": noise_loss, "param_max_abs_diff": noise_param},
                         "pass": passed, "final_loss": run["losses"][-1], "reference_final_loss": ref["losses"][-1]})
            log(f"parity {precision} stage {stage}: loss rel {loss_rel:.2e}, params abs {param_abs:.2e} "
                f"(reference vs itself {noise_loss:.1e} / {noise_param:.1e}) {'ok' if passed else 'MISMATCH'}")
            free()
    return {"status": "pass" if ok else "fail", "model_params": sum(v.numel() for v in ref["params"].values()),
            "rows": rows}


# -- part 2: collectives ------------------------------------------------------------------------
def part_collectives(sz: dict, dev: torch.device, deadline: float) -> dict:
    import torch.distributed as dist

    from shardwise.comm import collectives as sw
    from shardwise.comm.context import CommPolicy

    backend = dist.get_backend()
    n = 1 << 20
    x = torch.arange(n, dtype=torch.float32, device=dev)
    checks = {}
    y = x.clone()
    dist.all_reduce(y)
    checks["all_reduce"] = bool(torch.equal(y, x))
    if backend == "nccl":  # gloo has no reduce_scatter_tensor: shardwise all-reduces there
        out = torch.empty(n, device=dev)
        sw._reduce_scatter_single(out, x)  # the torch entry point shardwise calls
        checks["reduce_scatter_single"] = bool(torch.equal(out, x))
    out = torch.empty(n, device=dev)
    sw._all_gather_single(out, x)
    checks["all_gather_single"] = bool(torch.equal(out, x))
    sync(dev)
    policy = CommPolicy.for_backend(backend)
    expect_rs = backend != "gloo"
    checks["policy_reduce_scatter"] = (not policy.reduce_scatter_via_all_reduce) == expect_rs
    return {"status": "pass" if all(checks.values()) else "fail", "backend": backend, "world_size": dist.get_world_size(),
            "checks": checks, "policy": {"reduce_scatter_via_all_reduce": policy.reduce_scatter_via_all_reduce,
                                         "all_gather_via_broadcast": policy.all_gather_via_broadcast},
            "note": "world size 1: each collective is a copy; multi-rank NCCL needs 2+ GPUs (untested)"}


# -- part 3: torch.cuda RNG through a checkpoint ------------------------------------------------
def part_checkpoint_rng(sz: dict, dev: torch.device, deadline: float) -> dict:
    import shardwise
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    engine, *_ = shardwise.initialize(model=GPT(GPTConfig.preset("tiny")), config={
        "train_batch_size": 2, "steps_per_print": 10**6,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}})
    with tempfile.TemporaryDirectory() as d:
        if dev.type == "cuda":
            torch.cuda.manual_seed(7)
        torch.manual_seed(7)
        path = engine.save_checkpoint(d, tag="rng")
        first = torch.rand(8, device=dev).cpu()
        engine.load_checkpoint(d, tag="rng")
        again = torch.rand(8, device=dev).cpu()
        manifest = "".join(p.read_text(errors="replace") for p in Path(path).rglob("*.json"))
    engine.destroy()
    checks = {"same_draw_after_load": bool(torch.equal(first, again)),
              "cuda_state_saved": ('"cuda"' in manifest) if dev.type == "cuda" else None}
    ok = checks["same_draw_after_load"] and checks["cuda_state_saved"] is not False
    return {"status": "pass" if ok else "fail", "generator": f"{dev.type} default generator", "checks": checks}


# -- part 4: throughput and memory --------------------------------------------------------------
def peak_tflops(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _plain(cfg, dev):
    from model import GPT

    with torch.device(dev):
        model = GPT(cfg).to(torch.bfloat16)
    params = list(model.parameters())
    master = [p.detach().float().clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(master, lr=1e-4, fused=True)

    def step(x):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        for m, p in zip(master, params):
            m.grad, p.grad = p.grad.float(), None
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in zip(params, master):
                p.copy_(m)
        return loss
    return step, None, None


def _fsdp2(cfg, dev):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from model import GPT

    mesh = init_device_mesh(dev.type, (1,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    with torch.device(dev):
        model = GPT(cfg)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")

    def step(x):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step, None, None


def _zero(cfg, dev, stage: int, micro: int, offload: bool = False):
    import shardwise
    from model import GPT

    with torch.device(dev):
        model = GPT(cfg)
    zero = {"stage": stage, **({"reduce_bucket_size": 5e7} if stage < 3 else {})}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    engine, *_ = shardwise.initialize(model=model, config={
        "train_batch_size": micro, "bf16": {"enabled": True}, "gradient_clipping": 0.0,
        "steps_per_print": 1 if offload else 10**6, "wall_clock_breakdown": offload,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "zero_optimization": zero})

    def step(x):
        loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        engine.step()
        return loss
    return step, engine, model


def _timed(step, x, dev, warmup: int, steps: int, deadline: float, after_step=None) -> list[float]:
    for _ in range(warmup):
        step(x)
    times = []
    for i in range(steps):
        if i and time.monotonic() > deadline:
            break  # the system's share of the budget is spent: keep what was measured
        sync(dev)
        t = time.perf_counter()
        loss = step(x)
        sync(dev)
        times.append(time.perf_counter() - t)
        if after_step is not None:
            after_step()
    if not torch.isfinite(loss.detach().float()).item():
        raise FloatingPointError(f"non-finite loss {loss.item()}")
    return times


def _estimates(cfg, micro: int) -> dict:
    from shardwise.estimate import build_on_meta, model_states
    from model import GPT

    meta = build_on_meta(lambda: GPT(cfg))
    return {s: model_states(meta, 1, s, precision="bf16", micro_batch=micro, seq_len=cfg.seq_len) for s in range(4)}


def _row(name, times, n_params, tokens, dev, peak_mem, est=None, report=None) -> dict:
    med = statistics.median(times)
    peak = peak_tflops(dev)
    row = {"system": name, "timed_steps": len(times), "median_step_s": med, "tokens_per_s": tokens / med,
           "mfu": 6 * n_params * tokens / med / (peak * 1e12) if peak else None, "peak_memory_bytes": peak_mem}
    if est is not None:
        row["estimate_bytes"] = est["total"]
        row["estimate_states_bytes"] = est["total"] - (est["activations"] or 0)
        row["peak_over_estimate"] = peak_mem / est["total"] if peak_mem and est["total"] else None
    if report is not None:
        row["memory_report_bytes"] = {k: v for k, v in report.items() if isinstance(v, int)}
        if est is not None:  # [Note: estimate semantics]: the estimator's states are memory_report's, exactly
            row["states_match_estimate"] = report.get("total") == row["estimate_states_bytes"]
    return row


def part_throughput(sz: dict, dev: torch.device, deadline: float, results: dict) -> dict:
    cfg, micro = sz["big_cfg"], sz["micro"]
    x = _batches(cfg, micro, 1, dev)[0]
    tokens = micro * cfg.seq_len
    n_params = _meta_numel(cfg)  # the tied head counted once
    est = _estimates(cfg, micro)
    systems = [("plain", lambda: _plain(cfg, dev)), ("fsdp2", lambda: _fsdp2(cfg, dev))]
    systems += [(f"zero{s}", lambda s=s: _zero(cfg, dev, s, micro)) for s in range(4)]
    rows, errors = [], {}
    results["throughput_rows"] = rows  # the offload part compares with zero2
    for i, (name, build) in enumerate(systems):
        share = (deadline - time.monotonic()) / (len(systems) - i)
        if share < 5:
            errors[name] = "skipped: the part's time budget is spent"
            continue
        mine = time.monotonic() + share
        engine = None
        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            built = build()  # (step function, engine or None, model or None)
            step, engine = built[0], built[1]
            times = _timed(step, x, dev, sz["warmup"], sz["steps"], mine)
            peak_mem = int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None
            stage = int(name[4:]) if name.startswith("zero") else None
            rows.append(_row(name, times, n_params, tokens, dev, peak_mem,
                             est[stage] if stage is not None else None,
                             engine.memory_report() if engine is not None else None))
            r = rows[-1]
            log(f"throughput {name}: {r['median_step_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s"
                + (f", MFU {r['mfu']:.1%}" if r["mfu"] else "")
                + (f", peak {peak_mem / 2**30:.1f} GiB" if peak_mem else ""))
            if engine is not None:
                engine.destroy()
        except PartTimeout as exc:  # keep the rows measured so far
            errors[name] = f"PartTimeout: {exc}"
            log(f"throughput {name}: {errors[name]}")
            break
        except Exception as exc:  # noqa: BLE001 - one system failing must not hide the others
            errors[name] = f"{type(exc).__name__}: {exc}"
            log(f"throughput {name}: ERROR {errors[name]}")
            if engine is not None:  # e.g. out of memory in a step: release its files and threads too
                try:
                    engine.destroy()
                except Exception:  # noqa: BLE001 - the first error is the one reported
                    pass
        step = engine = built = None  # drop this system's tensors before the next one
        free()
    return {"status": "pass" if rows and not errors else ("error" if not rows else "fail"),
            "model": {"params": n_params, "layers": cfg.n_layer, "d_model": cfg.d_model, "vocab": cfg.vocab_size,
                      "seq_len": cfg.seq_len, "micro_batch": micro, "dtype": "bf16"},
            "mfu_peak_tflops": peak_tflops(dev), "rows": rows, "errors": errors}


def _meta_numel(cfg) -> int:
    from model import GPT, count_parameters

    with torch.device("meta"):
        return count_parameters(GPT(cfg))


# -- part 5: CPU offload ------------------------------------------------------------------------
def part_offload(sz: dict, dev: torch.device, deadline: float, results: dict) -> dict:
    from shardwise.profiling.timers import WallClockBreakdown

    cfg, micro = sz["big_cfg"], sz["micro"]
    x = _batches(cfg, micro, 1, dev)[0]
    tokens = micro * cfg.seq_len
    step, engine, _ = _zero(cfg, dev, 2, micro, offload=True)
    timer = engine.observers.find(WallClockBreakdown)
    splits = []
    times = _timed(step, x, dev, 1, sz["offload_steps"], deadline - 5,
                   after_step=lambda: splits.append(timer.last_interval_ms()))
    opt = getattr(engine, "optimizer", None)
    host = [p for g in getattr(opt, "param_groups", []) for p in g["params"] if p.device.type == "cpu"]
    pinned = all(p.is_pinned() for p in host) if host and dev.type == "cuda" else None
    report = engine.memory_report()
    engine.destroy()
    med = statistics.median(times)
    split = {k: statistics.median(s[k] for s in splits if s) for k in ("forward", "backward", "step")} if any(
        splits) else None
    on_device = next((r for r in results.get("throughput_rows", []) if r["system"] == "zero2"), None)
    return {"status": "fail" if pinned is False else "pass", "config": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
            "timed_steps": len(times), "median_step_s": med, "tokens_per_s": tokens / med,
            "split_ms": split, "host_masters_pinned": pinned, "host_tensors": len(host),
            "memory_report_bytes": {k: v for k, v in report.items() if isinstance(v, int)},
            "zero2_on_device_tokens_per_s": on_device["tokens_per_s"] if on_device else None}


# -- part 6: the launcher ----------------------------------------------------------------------
def part_launcher(sz: dict, dev: torch.device, deadline: float) -> dict:
    """The bundled example through ``shardwise run`` (torchrun, one rank; NCCL on CUDA), in a child:
    ZeRO-2, then ZeRO-3 (built under ``zero.Init``)."""
    steps = sz["launcher_steps"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    runs = []
    for config in ("ds_zero2.json", "ds_zero3.json"):
        cmd = [sys.executable, "-c", "from shardwise.cli import main; raise SystemExit(main())", "run",
               "--nproc-per-node", "1", str(ROOT / "examples" / "gpt" / "train.py"),
               "--config", str(ROOT / "examples" / "gpt" / config), "--steps", str(steps),
               "--log-every", str(max(steps // 2, 1)), "--metrics-csv", ""]
        row = {"config": config, "command": cmd[3:]}
        left = deadline - time.monotonic()
        if left < 5:
            runs.append({**row, "pass": False, "returncode": None, "tail": "not started: the part's budget is spent"})
            continue
        with tempfile.TemporaryDirectory() as d:
            try:
                p = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=left)
            except subprocess.TimeoutExpired as exc:
                runs.append({**row, "pass": False, "returncode": None, "tail": f"no exit within {exc.timeout:.0f} s"})
                continue
        text = p.stdout + p.stderr
        lines = [ln.strip() for ln in text.splitlines() if "loss" in ln.lower()]
        ok = p.returncode == 0 and bool(lines)
        runs.append({**row, "pass": ok, "returncode": p.returncode, "loss_lines": lines[-2:],
                     "tail": None if ok else text[-1500:]})
        log(f"launcher {config}: exit {p.returncode}{', ' + lines[-1] if lines else ''}")
    return {"status": "pass" if all(r["pass"] for r in runs) else "fail", "runs": runs}


# -- the report ------------------------------------------------------------------------------
def write(rep: dict, out: Path) -> None:
    rep["wall_s"] = time.monotonic() - T0
    rep["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_report.json").write_text(json.dumps(rep, indent=1, default=str))
    (out / "gpu_report.md").write_text(markdown(rep))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks"),
                    help="folder for gpu_report.json / .md (default: $OUT, else benchmarks/)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on CPU (gloo): the same code paths")
    ap.add_argument("--budget-s", type=float, default=float(sum(BUDGET_S.values())),
                    help="global time guard for all parts (default: the sum of the part budgets)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = ap.parse_args(argv)
    dry, out = args.cpu_dry_run, Path(args.out)
    if not dry and not torch.cuda.is_available():
        print("gpu_report: no CUDA device here; use --cpu-dry-run to exercise the script on CPU", file=sys.stderr)
        return 2
    if dry:  # before anything asks CUDA: the CPU path even on a GPU machine
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    world_of_one()
    dev = device()
    sz = sizes(dry)
    deadline = T0 + args.budget_s
    rep = {"schema": SCHEMA, "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "budget_total_s": args.budget_s, "budget_s": dict(BUDGET_S), "env": env_info(dry), "parts": {}}
    log(f"{rep['env']['device']}, torch {torch.__version__}, backend {rep['env']['backend']}, "
        f"budget {args.budget_s:.0f} s")
    results: dict = {}
    wanted = [p for p in args.parts.split(",") if p]
    for name in PARTS:
        if name not in wanted:
            continue
        left = deadline - time.monotonic()
        if left < 3:
            rep["parts"][name] = {"status": "skipped", "seconds": 0.0, "error": "global time guard"}
            write(rep, out)
            continue
        budget = min(BUDGET_S[name], left)
        log(f"part {name} (budget {budget:.0f} s)")
        t = time.monotonic()
        fn = globals()[f"part_{name}"]
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(budget) + 15)  # a soft stop past the budget; gpu_check.sh's timeout is the hard one
        try:
            kwargs = {"results": results} if name in ("throughput", "offload") else {}
            res = fn(sz, dev, t + budget, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported, the other parts still run
            res = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(limit=8)}
            if name == "throughput":  # the systems measured before the stop
                res["rows"] = results.get("throughput_rows", [])
            log(f"part {name}: ERROR {res['error']}")
        finally:
            signal.alarm(0)
        res["seconds"] = time.monotonic() - t
        rep["parts"][name] = res
        log(f"part {name}: {res['status']} in {res['seconds']:.1f} s")
        free()
        write(rep, out)
    write(rep, out)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - the report is written; say it and go on
        log(f"destroy_process_group: {type(exc).__name__}: {exc}")
    problems = validate(rep)
    for p in problems:
        log(f"report schema: {p}")
    log(f"report: {out / 'gpu_report.json'} and {out / 'gpu_report.md'}")
    return 0 if not problems and all(p["status"] == "pass" for p in rep["parts"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
