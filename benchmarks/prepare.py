"""What ``compare.py`` does before anything timed or hang-guarded.

1. **DeepSpeed's ops** (only when a ``ds*`` system is asked for). On the CPU accelerator
   DeepSpeed 0.19.8 JIT-compiles two C++ ops the first time they are used, into
   ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), 2-8 minutes on 2 busy cores:

   - ``fused_adam``: the config's ``"AdamW"`` without offload is ``deepspeed.ops.adam.FusedAdam``
     (``DeepSpeedEngine.get_optimizer_configuration``), whose CPU builder is
     ``op_builder/cpu/fused_adam.py`` (``csrc/cpu/adam/fused_adam.cpp``);
   - ``deepspeed_shm_comm``: built by ``deepspeed.comm.torch.TorchBackend.__init__``
     (``build_shm_op``) when ``deepspeed.initialize`` sets up its comm backend, on Linux.

   ``build_deepspeed_ops`` loads both builders in a child interpreter (what DeepSpeed itself
   would do, so the cache entries are the ones the ranks will find), printing a line every
   ``HEARTBEAT_S`` meanwhile, under its own ``BUILD_TIMEOUT_S``; then one short launch of every
   requested DeepSpeed stage (1M model, 1 step) catches anything else it would build or fail on.
   Before this existed, the build ran inside the first timed run and could trip its hang guard.
2. **Calibration**: one short launch of each system alone (1 warmup + 1 timed step). Its peak
   RSS goes into the table (as before); its pace predicts how long the timed runs take, and the
   hang guard is ``GUARD_BASE_S + GUARD_FACTOR x`` that prediction instead of a fixed guess.
   A system whose calibration launch fails is reported and left out of the timed runs.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import ranks

BUILD_TIMEOUT_S = 1800.0  # DeepSpeed's op build and its check launch (first run: 2-8 min)
HEARTBEAT_S = 30.0
CAL_TIMEOUT_S = {"25m": 600.0, "1m": 300.0}  # one calibration launch (~5-30 s when quiet)
GUARD_BASE_S = 120.0
GUARD_FACTOR = 4.0
DS_OPS = ("fused_adam", "deepspeed_shm_comm")

# run in a child interpreter (``python -c``): the driver itself never imports deepspeed
_BUILD_SCRIPT = r"""
import time
from deepspeed.accelerator import get_accelerator
from deepspeed.comm.torch import build_shm_op

t = time.perf_counter()
b = get_accelerator().create_op_builder("FusedAdamBuilder")
b.load()
print(f"[prepare] DeepSpeed op {b.NAME}: ready ({time.perf_counter() - t:.0f} s)", flush=True)
t = time.perf_counter()
op = build_shm_op()
print(f"[prepare] DeepSpeed op deepspeed_shm_comm: {'ready' if op is not None else 'not used here'} "
      f"({time.perf_counter() - t:.0f} s)", flush=True)
"""


def extensions_dir() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")


def _cached(name: str) -> bool:
    return any(extensions_dir().glob(f"*/{name}/{name}*.so"))


def short_error(e: BaseException) -> str:
    """The first line of a ``RankFailedError`` (which rank, which function) and the last line of
    the rank's traceback (the exception), for one-line reports."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1].strip()}"


def build_deepspeed_ops(timeout_s: float = BUILD_TIMEOUT_S) -> dict:
    """Build (or load from the cache) every op DeepSpeed JIT-compiles here, in a child process
    whose output goes to the terminal; ``{"ok", "seconds", "cached_before", "error"}``."""
    cached = all(_cached(n) for n in DS_OPS)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT], env=dict(os.environ))
    next_beat = HEARTBEAT_S
    while proc.poll() is None:
        elapsed = time.perf_counter() - t0
        if elapsed > timeout_s:
            proc.kill()
            proc.wait()
            return {"ok": False, "seconds": elapsed, "cached_before": cached,
                    "error": f"building DeepSpeed's ops took more than {timeout_s:.0f} s (killed)"}
        if elapsed >= next_beat:
            print(f"[prepare] ... still building DeepSpeed's CPU ops ({elapsed:.0f} s; the compiler "
                  "prints nothing until it ends)", flush=True)
            next_beat += HEARTBEAT_S
        time.sleep(0.5)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"ok": False, "seconds": elapsed, "cached_before": cached,
                "error": f"building DeepSpeed's ops failed (exit code {proc.returncode}; output above)"}
    return {"ok": True, "seconds": elapsed, "cached_before": cached, "error": None}


def prepare_deepspeed(ds_specs: list[tuple[str, str, int]], args, launch) -> dict:
    """Step 1 of the module docstring for the requested DeepSpeed systems ``ds_specs``
    (label, system, bucket); ``launch`` is ``compare._launch``. Never raises for a failed build
    or launch: the result says ``ok: False`` and why, and the caller drops the DeepSpeed rows."""
    from shardwise.testing.distributed import RankFailedError

    names = " ".join(label for label, _, _ in ds_specs)
    if all(_cached(n) for n in DS_OPS):
        print(f"\n[prepare] DeepSpeed's CPU ops: found in the cache ({extensions_dir()}); loading them to "
              "check, before anything timed...", flush=True)
    else:
        print(f"\n[prepare] building DeepSpeed's CPU ops (first run only, ~2 min; up to 8 on a busy machine) "
              f"into {extensions_dir()}, before anything timed...", flush=True)
    res = build_deepspeed_ops()
    if res["ok"]:
        print(f"[prepare] a short launch of {names} (1M model, 1 step) to check that nothing else is built...",
              flush=True)
        t0 = time.perf_counter()
        try:
            launch(ranks.rank_interleaved, args, list(ds_specs), "1m", 0, 1, timeout=BUILD_TIMEOUT_S,
                   precision=args.precision)
            res["check_launch_s"] = time.perf_counter() - t0
        except RankFailedError as e:
            res.update(ok=False, error=f"the check launch of {names} failed: {short_error(e)}",
                       error_detail=str(e))
    if res["ok"]:
        print(f"[prepare] DeepSpeed ready: ops in {res['seconds']:.0f} s, check launch "
              f"{res['check_launch_s']:.0f} s", flush=True)
    else:
        print(f"[prepare] FAILED: {res['error']}\n[prepare] the DeepSpeed rows ({names}) are skipped; the "
              "other systems still run", flush=True)
    return res


def calibrate(model_name: str, specs: list[tuple[str, str, int]], args, launch) -> dict[str, dict]:
    """Step 2 of the module docstring: ``{label: {"ok", "step_s", "first_step_s", "build_s",
    "startup_s", "wall_s", "rss", "rss_start", "mem", "n_params", "error"}}``."""
    from shardwise.testing.distributed import RankFailedError

    out: dict[str, dict] = {}
    tag = f"[{model_name}] calibration"
    for k, (label, system, bucket) in enumerate(specs):
        t0 = time.perf_counter()
        try:
            res, foreign = launch(ranks.rank_run, args, system, model_name, 1, 1, bucket,
                                  timeout=CAL_TIMEOUT_S.get(model_name, 600.0), precision=args.precision)
        except RankFailedError as e:
            out[label] = {"ok": False, "error": short_error(e), "error_detail": str(e),
                          "wall_s": time.perf_counter() - t0}
            print(f"{tag} {k + 1}/{len(specs)} {label}: FAILED ({short_error(e)}); left out of the timed runs",
                  flush=True)
            continue
        wall = time.perf_counter() - t0
        r0 = res[0]
        step = max(r0["times"])
        first = max(r0["warmup_times"] or [step])
        build = r0.get("build_s", 0.0)
        out[label] = {
            "ok": True, "step_s": step, "first_step_s": first, "build_s": build, "wall_s": wall,
            "startup_s": max(0.0, wall - build - first - step), "other_load_cores": foreign,
            "rss": [x["rss_peak_mib"] for x in res], "rss_start": [x["rss_start_mib"] for x in res],
            "mem": r0["mem"], "n_params": r0["n_params"], "error": None,
        }
        print(f"{tag} {k + 1}/{len(specs)} {label}: build {build:.1f} s, first step {1e3 * first:.0f} ms, "
              f"step {1e3 * step:.0f} ms, peak RSS {' / '.join('%.0f' % x for x in out[label]['rss'])} MiB "
              f"(launch {wall:.0f} s)", flush=True)
    return out


def predict_interleaved(cal: list[dict], warmup: int, steps: int) -> float:
    """Seconds one ``rank_interleaved`` launch of these calibrated systems should take: rank start,
    every system's build, a first step each, then ``warmup + steps - 1`` steps of each."""
    if not cal:
        return 0.0
    return (max(c["startup_s"] for c in cal) + sum(c["build_s"] + c["first_step_s"] for c in cal)
            + (warmup + steps - 1) * sum(c["step_s"] for c in cal))


def predict_launch(cal: dict, warmup: int, steps: int) -> float:
    """Seconds one ``rank_run`` launch of this system should take."""
    return predict_interleaved([cal], warmup, steps)


def guard(predicted_s: float) -> float:
    """The hang guard (``run_distributed``'s ``timeout_s``) for a launch predicted to take
    ``predicted_s``: generous, since the pace may drop when other work starts on the machine."""
    return float(math.ceil(GUARD_BASE_S + GUARD_FACTOR * predicted_s))


__all__ = ["build_deepspeed_ops", "prepare_deepspeed", "calibrate", "predict_interleaved", "predict_launch",
           "guard", "short_error"]
