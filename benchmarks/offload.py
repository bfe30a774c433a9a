"""ZeRO-Offload / ZeRO-Infinity on one disk: the I/O engine against fio, the offloaded optimizer
step against the disk bound, the largest model that trains here, and DeepSpeed on the same config.

    .venv/bin/python benchmarks/offload.py --part io                    # engine vs fio, 4 GiB, 3 rounds (~3 min)
    .venv/bin/python benchmarks/offload.py --part step                  # 252M GPT, moments on disk (~1.5 min)
    .venv/bin/python benchmarks/offload.py --part model --params 2e7    # the big-model path at a tiny size (~20 s)
    .venv/bin/python benchmarks/offload.py --part model --params 1.5e9  # stepping stone, stage 1 (3-7 min)
    .venv/bin/python benchmarks/offload.py --part model --params 3e9    # 2x RAM: params + state on disk (15-30 min)
    .venv/bin/python benchmarks/offload.py --part deepspeed             # DeepSpeed 0.19.8 NVMe offload, subprocess

Parts (``--part``, several allowed; ``all`` = io step deepspeed, ``model`` only when named):

1. ``io``: shardwise's ``measure_bandwidth`` and a streaming ``IOEngine`` write/read (and
   read+write at once) of a ``--io-gib`` file, against ``fio`` (libaio, ``direct=1``, seq 1 MiB,
   iodepth 8; ``dd`` with ``oflag/iflag=direct`` at bs 1M and 8M when fio is missing), all in
   ``--dir``; the runs alternate shardwise, fio, shardwise, fio; medians and ratios.
2. ``step``: a GPT of ``--step-params`` (fp32, stage ``--stage``, 1 rank) with
   ``offload_optimizer`` nvme (pipeline_read/write, ``buffer_count`` for 3 tiles,
   ``sub_group_size`` ``--sub-group``). Per timed step: forward, backward, ``engine.step()``
   (``time.perf_counter``), the bytes the engine's ``IOEngine`` moved (counted at submission),
   then the same tile walk's reads and writes without the optimizer ("pure I/O", the walk's own
   buffers and schedule), then read / write / concurrent bandwidth of the same ``IOEngine`` on
   ``--bw-gib`` scratch files in the same directory. Disk bound = bytes read / read GB/s + bytes
   written / write GB/s. Medians of per-step figures and ratios.
3. ``model``: ``--params`` (<= 2e9: stage 1, moments on disk, parameters in RAM; above: stage 3,
   ``offload_param`` nvme + ``offload_optimizer`` nvme, built under
   ``shardwise.zero.Init(remote_device="nvme")``); micro-batch 1, ``--seq`` 64, vocab 256, a
   fixed batch repeated so the loss falls; per step loss, times, bytes, bound; peak RSS (VmHWM).
4. ``deepspeed``: DeepSpeed 0.19.8's ZeRO-3 NVMe optimizer offload on the part-2 config, in a
   child interpreter (``--ds-python``, default ``/work/ds-venv/bin/python``) under
   ``--ds-timeout``; when it cannot run, the error is recorded as it was raised.

Results go to ``--out`` (default ``benchmarks/offload_results.json``; each part replaces its own
key; model runs are keyed by size, step runs by stage and experiment). GB = 1e9 bytes. Progress
lines start with ``[offload <elapsed>]``. See the "Offload (ZeRO-Infinity)" section of
``benchmarks/README.md`` for what each figure means and the latest results.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _p in (str(_ROOT / "examples" / "gpt"), str(_ROOT / "src")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from shardwise.offload.aio import ALIGN, IOEngine, SwapFile, aligned_empty, measure_bandwidth  # noqa: E402

GB = 1e9
GIB = 1 << 30
MIB = 1 << 20
_T0 = time.perf_counter()
DEFAULT_DIR = "/var/tmp/shardwise-offload-bench"
DEFAULT_OUT = _ROOT / "benchmarks" / "offload_results.json"


def log(msg: str) -> None:
    print(f"[offload {time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rnd(x, n=4):
    return None if x is None else round(x, n)


# ---------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------
def _proc_kib(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def vm_hwm() -> int:
    return _proc_kib("/proc/self/status", "VmHWM") or 0


def vm_rss() -> int:
    return _proc_kib("/proc/self/status", "VmRSS") or 0


def page_cache() -> int:
    """The machine's page cache (/proc/meminfo Cached): O_DIRECT swap files should not grow it."""
    return _proc_kib("/proc/meminfo", "Cached") or 0


def mem_total() -> int:
    return _proc_kib("/proc/meminfo", "MemTotal") or 0


def _block_device(directory: str) -> dict:
    out: dict = {}
    try:
        src = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", directory], capture_output=True,
                             text=True, timeout=10).stdout.split()
        if src:
            out["device"], out["fstype"] = src[0], src[1] if len(src) > 1 else None
            name = os.path.basename(src[0])
            q = Path("/sys/block") / name / "queue"
            for k in ("scheduler", "rotational", "logical_block_size"):
                if (q / k).exists():
                    out[k] = (q / k).read_text().strip()
            size = Path("/sys/block") / name / "size"
            if size.exists():
                out["size_gb"] = round(int(size.read_text()) * 512 / GB, 1)
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        du = shutil.disk_usage(directory)
        out["free_gb"] = round(du.free / GB, 1)
    except OSError:
        pass
    return out


def machine(directory: str) -> dict:
    model = None
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "mem_total_bytes": mem_total(),
            "mem_total_gib": round(mem_total() / GIB, 2), "kernel": platform.release(),
            "disk": {"dir": directory, **_block_device(directory)}, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_avg": os.getloadavg()}


# ---------------------------------------------------------------------------------------------
# the I/O engine, streamed (a file larger than the buffer: one 64 MiB buffer, every request
# submitted at once, so the engine's pool keeps `threads` pieces in flight)
# ---------------------------------------------------------------------------------------------
class Counter:
    """Bytes submitted to some IOEngines' read/write (wraps the instances' methods), by who
    submitted them: the optimizer's tile walk (``walk``: its ``_issue_read``/``_issue_write``
    are wrapped to say so) or anything else (``param``: stage-3 parameter shards)."""

    def __init__(self, engines, walk=None):
        self.bytes = {"walk_read": 0, "walk_write": 0, "param_read": 0, "param_write": 0}
        self.on = True
        self.who = "param"
        self.engines = list({id(e): e for e in engines if e is not None}.values())
        for e in self.engines:
            for op in ("read", "write"):
                orig = getattr(e, op)

                def wrapped(f, offset, buf, _orig=orig, _op=op):
                    if self.on:
                        self.bytes[f"{self.who}_{_op}"] += buf.numel() * buf.element_size()
                    return _orig(f, offset, buf)

                setattr(e, op, wrapped)
        if walk is not None:
            for name in ("_issue_read", "_issue_write"):
                orig = getattr(walk, name)

                def as_walk(*a, _orig=orig, **kw):
                    prev, self.who = self.who, "walk"
                    try:
                        return _orig(*a, **kw)
                    finally:
                        self.who = prev

                setattr(walk, name, as_walk)

    def snap(self) -> dict:
        return dict(self.bytes)

    @staticmethod
    def diff(a: dict, b: dict) -> dict:
        return {k: b[k] - a[k] for k in a}


def _fill_random(buf: torch.Tensor) -> None:
    buf.view(torch.int64).random_()  # incompressible, not zeros (thin-provisioned disks skip zeros)


def _scratch(directory: str, tag: str) -> Path:
    return Path(directory) / f".offload-bench-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}.swp"


def _submit_all(op, f: SwapFile, nbytes: int, buf: torch.Tensor) -> list:
    chunk = buf.numel()
    return [op(f, off, buf[: min(chunk, nbytes - off)]) for off in range(0, nbytes, chunk)]


def _wait(handles) -> None:
    for h in handles:
        h.wait()


def stream_write(eng: IOEngine, f: SwapFile, nbytes: int, buf: torch.Tensor) -> tuple[float, float]:
    """(seconds until the writes completed, seconds including fsync + DONTNEED)."""
    t0 = time.perf_counter()
    _wait(_submit_all(eng.write, f, nbytes, buf))
    t1 = time.perf_counter()
    f.sync()
    return t1 - t0, time.perf_counter() - t0


def stream_read(eng: IOEngine, f: SwapFile, nbytes: int, buf: torch.Tensor) -> float:
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # (O_DIRECT: no cached pages anyway)
    t0 = time.perf_counter()
    _wait(_submit_all(eng.read, f, nbytes, buf))
    return time.perf_counter() - t0


def stream_both(eng: IOEngine, src: SwapFile, dst: SwapFile, nbytes: int, rbuf: torch.Tensor,
                wbuf: torch.Tensor) -> dict:
    """Read ``src`` while writing ``dst`` (requests interleaved): total GB/s and each direction's."""
    os.posix_fadvise(src.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    chunk = rbuf.numel()
    t0 = time.perf_counter()
    reads, writes = [], []
    for off in range(0, nbytes, chunk):
        n = min(chunk, nbytes - off)
        reads.append(eng.read(src, off, rbuf[:n]))
        writes.append(eng.write(dst, off, wbuf[:n]))
    done = {}
    # wait in completion order as well as we can: poll both lists
    pending = {"read": reads, "write": writes}
    while pending:
        for k in list(pending):
            if all(h.done() for h in pending[k]):
                _wait(pending.pop(k))
                if k == "write":
                    dst.sync()
                done[k] = time.perf_counter() - t0
        time.sleep(0.002)
    total = time.perf_counter() - t0
    return {"total_gbs": 2 * nbytes / total / GB, "read_gbs": nbytes / done["read"] / GB,
            "write_gbs": nbytes / done["write"] / GB, "seconds": total}


class EngineBandwidth:
    """Read / write / concurrent GB/s of one IOEngine on scratch files in ``directory``. Two
    files A, B alternate roles so a lone read is of a file written one round earlier."""

    def __init__(self, eng: IOEngine, directory: str, nbytes: int, chunk: int = 64 * MIB):
        self.eng, self.nbytes = eng, (nbytes + ALIGN - 1) // ALIGN * ALIGN
        self.files = [SwapFile(_scratch(directory, t), self.nbytes, rank=0) for t in ("bwA", "bwB")]
        self.wbuf = aligned_empty(chunk)
        _fill_random(self.wbuf)
        self.rbuf = aligned_empty(chunk)
        self.direct = all(f.direct for f in self.files)
        for f in self.files:  # both exist with data before the first round
            stream_write(eng, f, self.nbytes, self.wbuf)
        self.turn = 0

    def round(self) -> dict:
        old, new = self.files[self.turn % 2], self.files[(self.turn + 1) % 2]
        self.turn += 1
        r = stream_read(self.eng, old, self.nbytes, self.rbuf)
        w_io, w = stream_write(self.eng, new, self.nbytes, self.wbuf)
        both = stream_both(self.eng, new, old, self.nbytes, self.rbuf, self.wbuf)
        return {"read_gbs": self.nbytes / r / GB, "write_gbs": self.nbytes / w / GB,
                "write_gbs_before_fsync": self.nbytes / w_io / GB, "concurrent_total_gbs": both["total_gbs"],
                "concurrent_read_gbs": both["read_gbs"], "concurrent_write_gbs": both["write_gbs"]}

    def close(self) -> None:
        for f in self.files:
            f.close()
            f.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# part 1: the I/O engine against fio / dd
# ---------------------------------------------------------------------------------------------
def fio_run(directory: str, nbytes: int, *, block: str = "1M", depth: int = 8, concurrent: bool = False) -> dict:
    """fio seq write then seq read of one file (or read of one + write of another at once)."""
    a, b = _scratch(directory, "fioA"), _scratch(directory, "fioB")
    common = [f"--bs={block}", f"--iodepth={depth}", "--ioengine=libaio", "--direct=1", f"--size={nbytes}",
              "--output-format=json"]

    def run(jobs: list[list[str]]) -> tuple[dict, float]:
        cmd = ["fio", *common]
        for j in jobs:
            cmd += j
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if p.returncode:
            raise RuntimeError(f"fio failed ({p.returncode}): {p.stderr.strip()[-500:]}")
        return json.loads(p.stdout[p.stdout.index("{"):]), wall

    try:
        wj, wwall = run([["--name=write", f"--filename={a}", "--rw=write", "--end_fsync=1"]])
        w = wj["jobs"][0]["write"]
        out = {"write_gbs": w["bw_bytes"] / GB, "write_gbs_wall": nbytes / wwall / GB}
        if concurrent:
            # B must exist for nothing: it is written; A is read (written just above, like shardwise's)
            # two jobs at half the depth each: as many requests in flight as shardwise's one pool
            half = f"--iodepth={max(1, depth // 2)}"
            cj, cwall = run([["--name=read", f"--filename={a}", "--rw=read", half],
                             ["--name=write", f"--filename={b}", "--rw=write", "--end_fsync=1", half]])
            jobr = next(j for j in cj["jobs"] if j["jobname"] == "read")
            jobw = next(j for j in cj["jobs"] if j["jobname"] == "write")
            span = max(jobr["read"]["runtime"], jobw["write"]["runtime"]) / 1e3  # ms -> s: until both ended
            out.update(concurrent_total_gbs=2 * nbytes / span / GB, concurrent_total_gbs_wall=2 * nbytes / cwall / GB,
                       concurrent_read_gbs=jobr["read"]["bw_bytes"] / GB,
                       concurrent_write_gbs=jobw["write"]["bw_bytes"] / GB)
            rfile = b
        else:
            rfile = a
        rj, rwall = run([["--name=read", f"--filename={rfile}", "--rw=read"]])
        r = rj["jobs"][0]["read"]
        out.update(read_gbs=r["bw_bytes"] / GB, read_gbs_wall=nbytes / rwall / GB)
        return out
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)


def dd_run(directory: str, nbytes: int, block_mib: int) -> dict:
    """dd ``oflag=direct conv=fsync`` from /dev/zero (dd has no random source fast enough), then
    ``iflag=direct`` to /dev/null; GB/s from the wall clock."""
    a = _scratch(directory, f"dd{block_mib}")
    count = max(1, nbytes // (block_mib * MIB))
    try:
        t0 = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={a}", f"bs={block_mib}M", f"count={count}", "oflag=direct",
                        "conv=fsync", "status=none"], check=True, timeout=1800)
        w = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run(["dd", f"if={a}", "of=/dev/null", f"bs={block_mib}M", "iflag=direct", "status=none"],
                       check=True, timeout=1800)
        r = time.perf_counter() - t0
        n = count * block_mib * MIB
        return {"write_gbs": n / w / GB, "read_gbs": n / r / GB}
    finally:
        a.unlink(missing_ok=True)


def shardwise_stream(directory: str, nbytes: int, threads: int, block: int) -> dict:
    eng = IOEngine(threads=threads, block_size=block)
    files = []
    try:
        buf = aligned_empty(64 * MIB)
        _fill_random(buf)
        rbuf = aligned_empty(64 * MIB)
        a = SwapFile(_scratch(directory, "swA"), nbytes, rank=0)
        b = SwapFile(_scratch(directory, "swB"), nbytes, rank=0)
        files = [a, b]
        w_io, w = stream_write(eng, a, nbytes, buf)
        both = stream_both(eng, a, b, nbytes, rbuf, buf)
        r = stream_read(eng, b, nbytes, rbuf)
        return {"write_gbs": nbytes / w / GB, "write_gbs_before_fsync": nbytes / w_io / GB, "read_gbs": nbytes / r / GB,
                "concurrent_total_gbs": both["total_gbs"], "concurrent_read_gbs": both["read_gbs"],
                "concurrent_write_gbs": both["write_gbs"], "direct": a.direct}
    finally:
        eng.close()
        for f in files:
            f.close()
            f.path.unlink(missing_ok=True)


def part_io(args) -> dict:
    directory = args.dir
    nbytes = int(args.io_gib * GIB) // ALIGN * ALIGN
    base = args.baseline
    if base == "auto":
        base = "fio" if shutil.which("fio") else "dd"
    if base == "fio" and not shutil.which("fio"):
        raise SystemExit("fio is not installed (apt-get install -y fio), or use --baseline dd")
    log(f"part io: {nbytes / GIB:.1f} GiB files in {directory}, shardwise {args.threads} threads x "
        f"{args.block >> 10} KiB vs {base}; {args.rounds} rounds of (shardwise measure_bandwidth, {base}, "
        f"shardwise stream, {base})")
    rows: dict[str, list] = {"measure_bandwidth": [], "stream": [], base: [], "pairs": []}
    for i in range(args.rounds):
        seq = [("measure_bandwidth", None), (base, "a"), ("stream", None), (base, "b")]
        for name, tag in seq:
            t0 = time.perf_counter()
            if name == "measure_bandwidth":
                r, w = measure_bandwidth(directory, nbytes, threads=args.threads, block_size=args.block)
                res = {"read_gbs": r, "write_gbs": w}
            elif name == "stream":
                res = shardwise_stream(directory, nbytes, args.threads, args.block)
            elif name == "fio":
                res = fio_run(directory, nbytes, depth=args.threads, concurrent=(tag == "b"))
            else:
                res = {f"bs{bs}M": dd_run(directory, nbytes, bs) for bs in (1, 8)}
                res.update(read_gbs=res["bs1M"]["read_gbs"], write_gbs=res["bs1M"]["write_gbs"])
            res = {k: (rnd(v) if isinstance(v, float) else v) for k, v in res.items()}
            rows[name].append(res)
            log(f"  round {i + 1}/{args.rounds} {name:17s} write {res['write_gbs']:.3f} GB/s, read "
                f"{res['read_gbs']:.3f} GB/s" + (f", read+write at once {res['concurrent_total_gbs']:.3f} GB/s total"
                                                  if "concurrent_total_gbs" in res else "")
                + f" ({time.perf_counter() - t0:.0f} s)")
        # pair each shardwise run with the baseline run right after it
        rows["pairs"].append({"measure_bandwidth/base": {k: rnd(rows["measure_bandwidth"][-1][k] / rows[base][-2][k])
                                                          for k in ("read_gbs", "write_gbs")},
                              "stream/base": {k: rnd(rows["stream"][-1][k] / rows[base][-1][k])
                                              for k in ("read_gbs", "write_gbs")}})
    summary = {}
    for name in ("measure_bandwidth", "stream", base):
        keys = sorted({k for r in rows[name] for k, v in r.items() if isinstance(v, float)})
        summary[name] = {k: rnd(med([r.get(k) for r in rows[name]])) for k in keys}
    ratios = {}
    for name in ("measure_bandwidth", "stream"):
        ratios[name] = {k: rnd(summary[name][k] / summary[base][k]) for k in ("read_gbs", "write_gbs")}
    if "concurrent_total_gbs" in summary[base]:
        ratios["stream"]["concurrent_total_gbs"] = rnd(summary["stream"]["concurrent_total_gbs"]
                                                       / summary[base]["concurrent_total_gbs"])
    paired = {k: {m: rnd(med([p[k][m] for p in rows["pairs"]])) for m in ("read_gbs", "write_gbs")}
              for k in ("measure_bandwidth/base", "stream/base")}
    out = {"baseline": base, "file_bytes": nbytes, "threads": args.threads, "block_size": args.block,
           "fio_options": "--rw=write|read --bs=1M --iodepth=8 --ioengine=libaio --direct=1 --end_fsync=1 (write)"
           if base == "fio" else "dd bs=1M/8M oflag=direct conv=fsync / iflag=direct",
           "runs": rows, "median": summary, "ratio_of_medians": ratios, "median_paired_ratio": paired,
           "target": "shardwise >= 0.90 x fio (depth 8)"}
    for name in ("measure_bandwidth", "stream"):
        log(f"part io: {name} / {base} (ratio of medians): write {ratios[name]['write_gbs']:.2f}, read "
            f"{ratios[name]['read_gbs']:.2f}")
    return out


# ---------------------------------------------------------------------------------------------
# GPT models and engines
# ---------------------------------------------------------------------------------------------
def gpt_shape(params: float, d_model: int | None = None, layers: int | None = None) -> tuple[int, int]:
    """(d_model, n_layer) for about ``params`` parameters (12 L d^2 dominates)."""
    d = d_model or (2560 if params >= 2.5e9 else 2048 if params >= 1e9 else 1024 if params >= 1.5e8
                    else 512 if params >= 1e7 else 256)
    n = layers or max(1, round(params / (12 * d * d)))
    return d, n


def gpt_config(params: float, seq: int, d_model=None, layers=None):
    from model import GPTConfig

    d, n = gpt_shape(params, d_model, layers)
    return GPTConfig(vocab_size=256, seq_len=seq, n_layer=n, n_head=max(1, d // 128), d_model=d)


def ds_config(*, stage: int, nvme: str, sub_group: int, buffer_count: int, lr: float, offload_param: bool,
              param_buffer_size: int = 100_000_000, param_buffer_count: int = 5, pipeline: bool = True) -> dict:
    zero = {"stage": stage, "sub_group_size": int(sub_group),
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme, "buffer_count": buffer_count,
                                  "pipeline_read": pipeline, "pipeline_write": pipeline}}
    if offload_param:
        zero["offload_param"] = {"device": "nvme", "nvme_path": nvme, "buffer_count": param_buffer_count,
                                 "buffer_size": int(param_buffer_size), "max_in_cpu": 0}
    return {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "steps_per_print": 10 ** 9, "gradient_clipping": 0.0,
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0}},
            "zero_optimization": zero, "aio": {"block_size": 1 << 20, "queue_depth": 8}}


def count_params(model) -> int:
    from model import count_parameters

    return count_parameters(model)


def build(cfg_gpt, cfg: dict, *, remote: bool, units: str):
    """(engine, model, parameter count, build seconds)."""
    import shardwise
    import shardwise.zero
    from model import GPT

    torch.manual_seed(0)
    t0 = time.perf_counter()
    if remote:
        with shardwise.zero.Init(remote_device="nvme", config=cfg):
            model = GPT(cfg_gpt)
    else:
        model = GPT(cfg_gpt)
    n = count_params(model)
    if cfg["zero_optimization"]["stage"] == 3 and units == "sublayer":
        shardwise.zero.set_fetch_units(model, ["CausalSelfAttention", "MLP"])
    engine, *_ = shardwise.initialize(model=model, config=cfg)
    return engine, model, n, time.perf_counter() - t0


def disk_tier(engine):
    tier = getattr(engine.strategy, "tier", None)
    if tier is None or getattr(tier, "device", None) != "nvme":
        raise RuntimeError(f"the engine's optimizer tier is {getattr(tier, 'device', None)!r}, not nvme")
    return tier


def io_engines(engine) -> list:
    out = [disk_tier(engine).engine]
    pt = getattr(engine.strategy, "param_tier", None)
    if pt is not None and getattr(pt, "io", None) is not None:
        out.append(pt.io.engine)
    return out


def walk_bytes(tier) -> dict:
    """Bytes the tile walk reads (= writes) per step once the state exists, from its layout."""
    walk = tier.walk
    per_kind = {}
    for kind in tier.kinds():
        per_kind[kind] = sum(tier.slots[kind][j].nbytes for t in range(len(walk.tiles)) for j in walk.tiles[t]
                             if walk._wanted(kind, j))
    return {"per_kind": per_kind, "total": sum(per_kind.values()), "tiles": len(walk.tiles),
            "tile_numel": walk.tile_numel, "slots": walk.n_slots()}


def pure_io(tier, prefetched: bool = False) -> float:
    """The tile walk's reads and writes with its own buffers and schedule (``pipeline_read``: reads
    ``slots - 1`` tiles ahead; ``pipeline_write``: writes left in flight until the slot is
    needed), the optimizer left out: each tile's bytes are written back as read, so the files
    stay as they are. ``prefetched``: the reads the last backward would have started
    (``walk.prefetch()``) are issued and completed before the clock starts, as when backward
    hid them. Seconds."""
    walk = tier.walk
    walk.drain()
    opt = tier.plan.optimizer
    if prefetched:
        walk.prefetch()
        for _, handles in list(walk.reads.values()):
            _wait(handles)
    t0 = time.perf_counter()
    for t in range(len(walk.tiles)):
        slot = walk._wait_read(t)
        handles = walk._issue_write(slot, t, walk._read_kinds(t))
        if opt.pipeline_write:
            walk.writes.append((slot, handles))
        else:
            _wait(handles)
            walk._release(slot)
        if opt.pipeline_read:
            for ahead in range(t + 1, t + 2 + walk._ahead()):
                walk._issue_read(ahead)
    walk.drain()
    return time.perf_counter() - t0


def alternate_schedule(tier, experiment: str):
    """Experiment (not shardwise's behaviour), a ``before_step`` hook: odd timed steps run
    shardwise's tile walk as it is, even ones a changed read-ahead. Install before ``Counter``.

    shardwise (3 slots): after tile t's step and write, the walk issues the reads of tiles
    t + 1 .. t + 3; the read of t + 3 needs a slot, and ``TileWalk._acquire`` then waits for
    tile t's write, so that write never overlaps tile t + 1's step.
    ``ahead1``: read 1 tile ahead instead of ``slots - 1`` (i - 1 writing, i stepping, i + 1
    reading). ``nonblocking``: keep ``slots - 1`` ahead but skip a read-ahead that would wait
    for a write still in flight (it is issued at a later tile, or when that tile is needed)."""
    walk = tier.walk
    mode = {"variant": "shardwise", "must": False}
    lib_ahead, lib_issue, lib_wait = walk._ahead, walk._issue_read, walk._wait_read

    def ahead():
        if mode["variant"] == "ahead1":
            return 1 if tier.plan.optimizer.pipeline_read else 0
        return lib_ahead()

    def wait_read(t):
        mode["must"] = True
        try:
            return lib_wait(t)
        finally:
            mode["must"] = False

    def issue_read(t):
        if (mode["variant"] == "nonblocking" and not mode["must"] and t not in walk.reads and t < len(walk.tiles)
                and not walk.free and len(walk.slots) >= walk.n_slots() and walk.writes
                and not all(h.done() for h in walk.writes[0][1])):
            return None  # would wait for a write in flight: later
        return lib_issue(t)

    walk._ahead, walk._issue_read, walk._wait_read = ahead, issue_read, wait_read
    log(f"EXPERIMENT: timed steps alternate between shardwise's tile walk and {experiment!r} "
        f"({walk.n_slots()} slots)")

    def hook(i: int) -> str:
        mode["variant"] = "shardwise" if i % 2 else experiment
        return mode["variant"]

    return hook


def swap_bytes_on_disk(directory: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(directory):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def fixed_batch(seq: int, vocab: int = 256):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (1, seq + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _check_dir(directory: str) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    from shardwise.offload.swapdir import check_nvme_path

    problem = check_nvme_path(directory)
    if problem:
        raise SystemExit(f"--dir {directory}: {problem}")


def train_steps(engine, tier, counter: Counter, bw: EngineBandwidth | None, *, steps: int, warmup: int, seq: int,
                pure: bool, label: str, before_step=None) -> list[dict]:
    """The first step (the state is created: writes only) + ``warmup`` + ``steps`` timed ones.
    ``before_step(i)``: called before step i (0-based); what it returns is the row's ``variant``."""
    x, y = fixed_batch(seq)
    rows = []
    total = 1 + warmup + steps
    for i in range(total):
        kind = "first" if i == 0 else "warmup" if i <= warmup else "timed"
        variant = before_step(i) if before_step is not None else None
        c0 = counter.snap()
        t0 = time.perf_counter()
        loss = engine(x, y)
        t1 = time.perf_counter()
        c1 = counter.snap()
        engine.backward(loss)
        t2 = time.perf_counter()
        c2 = counter.snap()
        engine.step()
        t3 = time.perf_counter()
        c3 = counter.snap()
        row = {"step": i + 1, "kind": kind, "loss": loss.item(), "forward_s": t1 - t0, "backward_s": t2 - t1,
               "step_s": t3 - t2, "iteration_s": t3 - t0,
               "bytes": {"forward": Counter.diff(c0, c1), "backward": Counter.diff(c1, c2), "step": Counter.diff(c2, c3)},
               "rss": vm_rss(), "peak_rss": vm_hwm(), "page_cache": page_cache()}
        if variant is not None:
            row["variant"] = variant
        if i > 0:
            counter.on = False
            if pure:
                row["pure_io_s"] = pure_io(tier)
                if tier.plan.optimizer.pipeline_read:
                    row["pure_io_after_prefetch_s"] = pure_io(tier, prefetched=True)
            if bw is not None:
                row["bandwidth"] = bw.round()
            counter.on = True
        rows.append(row)
        b = row["bytes"]
        extra = ""
        if "pure_io_s" in row:
            extra += f", pure I/O {row['pure_io_s']:.2f} s"
            if "pure_io_after_prefetch_s" in row:
                extra += f" ({row['pure_io_after_prefetch_s']:.2f} s after the prefetch)"
        if "bandwidth" in row:
            bwr = row["bandwidth"]
            extra += (f", engine read {bwr['read_gbs']:.3f} / write {bwr['write_gbs']:.3f} / both "
                      f"{bwr['concurrent_total_gbs']:.3f} GB/s")
        walk_r = sum(b[p]["walk_read"] for p in b)
        log(f"{label} step {i + 1}/{total} ({kind}{', ' + variant if variant else ''}): loss {row['loss']:.4f}, fwd {row['forward_s']:.2f} s, bwd "
            f"{row['backward_s']:.2f} s, step {row['step_s']:.2f} s; walk read {walk_r / GB:.3f} GB "
            f"({b['step']['walk_read'] / GB:.3f} in the step), write {b['step']['walk_write'] / GB:.3f} GB; "
            f"parameter shards read {(b['forward']['param_read'] + b['backward']['param_read']) / GB:.3f} GB"
            f"{extra}; peak RSS {row['peak_rss'] / GIB:.2f} GiB")
    return rows


def bounds(row: dict) -> dict:
    """Disk bounds of one step from its bytes and that round's bandwidth of the same engine:
    ``step``: the bytes submitted inside ``engine.step()``; ``walk``: every byte of the tile walk
    (also the reads prefetched during backward); ``iteration``: everything (forward, backward,
    step; with ``offload_param`` the parameter shards too). serial = read / R + write / W;
    concurrent = (read + write) / the read+write-at-once GB/s."""
    b, bw = row["bytes"], row.get("bandwidth")
    if bw is None:
        return {}
    R, W, C = bw["read_gbs"] * GB, bw["write_gbs"] * GB, bw["concurrent_total_gbs"] * GB
    sets = {"step": (b["step"]["walk_read"] + b["step"]["param_read"], b["step"]["walk_write"] + b["step"]["param_write"]),
            "walk": (sum(b[p]["walk_read"] for p in b), sum(b[p]["walk_write"] for p in b)),
            "iteration": (sum(b[p][k] for p in b for k in ("walk_read", "param_read")),
                          sum(b[p][k] for p in b for k in ("walk_write", "param_write")))}
    return {name: {"read_bytes": rd, "write_bytes": wr, "serial_s": rd / R + wr / W, "concurrent_s": (rd + wr) / C}
            for name, (rd, wr) in sets.items()}


def summarize(rows: list[dict], pure: bool) -> dict:
    timed = [r for r in rows if r["kind"] == "timed"]
    out: dict = {"timed_steps": len(timed)}
    for k in ("step_s", "forward_s", "backward_s", "iteration_s", "pure_io_s", "pure_io_after_prefetch_s"):
        out[f"median_{k}"] = rnd(med([r.get(k) for r in timed]))
    bs = [bounds(r) for r in timed]
    for name in ("step", "walk", "iteration"):
        for k in ("read_bytes", "write_bytes"):
            out[f"median_{name}_{k}"] = med([b[name][k] for b in bs if b])
        for k in ("serial_s", "concurrent_s"):
            out[f"median_{name}_bound_{k}"] = rnd(med([b[name][k] for b in bs if b]))
    pairs = [(r, b) for r, b in zip(timed, bs) if b]
    out["ratio_step_to_step_bytes_bound_serial"] = rnd(med([r["step_s"] / b["step"]["serial_s"] for r, b in pairs]))
    out["ratio_step_to_step_bytes_bound_concurrent"] = rnd(med([r["step_s"] / b["step"]["concurrent_s"]
                                                                for r, b in pairs]))
    out["ratio_step_to_walk_bound_serial"] = rnd(med([r["step_s"] / b["walk"]["serial_s"] for r, b in pairs]))
    out["ratio_iteration_to_iteration_bound_serial"] = rnd(med([r["iteration_s"] / b["iteration"]["serial_s"]
                                                                for r, b in pairs]))
    if pure:
        out["ratio_step_to_pure_io"] = rnd(med([r["step_s"] / r["pure_io_s"] for r in timed if r.get("pure_io_s")]))
        out["ratio_step_to_pure_io_after_prefetch"] = rnd(med([r["step_s"] / r["pure_io_after_prefetch_s"]
                                                               for r in timed if r.get("pure_io_after_prefetch_s")]))
        out["ratio_pure_io_to_walk_bound_serial"] = rnd(med([r["pure_io_s"] / b["walk"]["serial_s"]
                                                             for r, b in pairs if r.get("pure_io_s")]))
    for k in ("read_gbs", "write_gbs", "concurrent_total_gbs", "write_gbs_before_fsync"):
        out[f"median_engine_{k}"] = rnd(med([r["bandwidth"][k] for r in timed if "bandwidth" in r]))
    out["page_cache_growth_bytes"] = rows[-1]["page_cache"] - rows[0]["page_cache"] if rows else None
    out["losses"] = [rnd(r["loss"], 5) for r in rows]
    out["loss_falls"] = all(b < a for a, b in zip(out["losses"], out["losses"][1:])) and all(
        math.isfinite(v) for v in out["losses"])
    return out


def _report(engine) -> dict:
    try:
        return dict(engine.memory_report())
    except Exception as e:  # noqa: BLE001 - a report is informative only
        return {"error": f"{type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------
# part 2: the offloaded step against the disk bound
# ---------------------------------------------------------------------------------------------
def part_step(args) -> dict:
    nvme = str(Path(args.dir) / "step")
    Path(nvme).mkdir(parents=True, exist_ok=True)
    gcfg = gpt_config(args.step_params, args.seq)
    kinds = 2  # fp32, no offload_param: the master is the parameters; Adam's two moments go to disk
    bc = args.buffer_count or 3 * kinds
    lr = args.lr or 3e-5
    cfg = ds_config(stage=args.stage, nvme=nvme, sub_group=args.sub_group, buffer_count=bc, lr=lr,
                    offload_param=False)
    log(f"part step: GPT d_model {gcfg.d_model} x {gcfg.n_layer} layers, seq {args.seq}, stage {args.stage}, fp32, "
        f"offload_optimizer nvme in {nvme}, buffer_count {bc}, sub_group_size {int(args.sub_group)}")
    engine, model, n, build_s = build(gcfg, cfg, remote=False, units=args.units)
    tier = disk_tier(engine)
    hook = None
    if args.experiment is not None:
        hook = alternate_schedule(tier, args.experiment)
    counter = Counter(io_engines(engine), tier.walk)
    log(f"part step: {n / 1e6:.1f}M parameters, built in {build_s:.1f} s; {len(tier.walk.tiles)} tiles of <= "
        f"{tier.walk.tile_numel} elements; measuring the engine's bandwidth on {args.bw_gib:.1f} GiB scratch files")
    bw = EngineBandwidth(tier.engine, nvme, int(args.bw_gib * GIB))
    try:
        rows = train_steps(engine, tier, counter, bw, steps=args.steps, warmup=args.warmup, seq=args.seq, pure=True,
                           label="part step:", before_step=hook)
        walk = walk_bytes(tier)
        report = _report(engine)
    finally:
        bw.close()
    s = summarize(rows, pure=True)
    variants = {}
    if hook is not None:  # the experiment: each variant's own figures (steps alternate, so paired in time)
        for v in sorted({r.get("variant") for r in rows if r.get("variant")}):
            variants[v] = summarize([r for r in rows if r.get("variant") == v or r["kind"] != "timed"], pure=True)
            log(f"part step: {v}: median step {variants[v]['median_step_s']} s, pure I/O after the prefetch "
                f"{variants[v]['median_pure_io_after_prefetch_s']} s, step / pure I/O "
                f"{variants[v]['ratio_step_to_pure_io_after_prefetch']}, step / bound "
                f"{variants[v]['ratio_step_to_step_bytes_bound_serial']}")
    out = {"params": n, "d_model": gcfg.d_model, "n_layer": gcfg.n_layer, "seq": args.seq, "stage": args.stage,
           "dtype": "fp32", "config": cfg, "lr": lr, "experiment": args.experiment, "build_s": rnd(build_s, 2), "walk": walk, "memory_report": report,
           "direct_io": bw.direct, "peak_rss_bytes": vm_hwm(), "steps": rows, "summary": s, "variants": variants,
           "targets": {"step <= 1.25 x disk bound (bytes moved in the step, serial R/W)":
                           s["ratio_step_to_step_bytes_bound_serial"],
                       "step <= 1.1 x pure I/O (after the same prefetch)": s["ratio_step_to_pure_io_after_prefetch"]}}
    log(f"part step: median step {s['median_step_s']} s; disk bound of the bytes moved in the step "
        f"{s['median_step_bound_serial_s']} s serial / {s['median_step_bound_concurrent_s']} s concurrent "
        f"(all walk bytes incl. the prefetch in backward: {s['median_walk_bound_serial_s']} s); pure I/O "
        f"{s['median_pure_io_s']} s ({s['median_pure_io_after_prefetch_s']} s after the prefetch); step / bound "
        f"{s['ratio_step_to_step_bytes_bound_serial']} (serial), {s['ratio_step_to_step_bytes_bound_concurrent']} "
        f"(concurrent); step / pure I/O {s['ratio_step_to_pure_io_after_prefetch']}")
    engine.destroy()
    return out


# ---------------------------------------------------------------------------------------------
# part 3: the largest model
# ---------------------------------------------------------------------------------------------
def part_model(args) -> dict:
    P = args.params
    stage = args.model_stage or (1 if P <= 2e9 else 3)
    offload_param = args.offload_param if args.offload_param is not None else stage == 3
    remote = offload_param and not args.no_remote_init
    nvme = str(Path(args.dir) / f"model-{P:.0e}")
    Path(nvme).mkdir(parents=True, exist_ok=True)
    gcfg = gpt_config(P, args.seq, args.d_model, args.layers)
    kinds = 2 + (1 if offload_param else 0)  # fp32 masters on disk too when the parameters are
    bc = args.buffer_count or 3 * kinds
    lr = args.lr or 3e-5 * 1024 / gcfg.d_model  # a fixed batch: small enough that the loss falls every step
    cfg = ds_config(stage=stage, nvme=nvme, sub_group=args.sub_group, buffer_count=bc, lr=lr,
                    offload_param=offload_param, param_buffer_size=args.param_buffer_size)
    log(f"part model: target {P:.2e} params: GPT d_model {gcfg.d_model} x {gcfg.n_layer} layers, seq {args.seq}, "
        f"vocab 256, micro-batch 1, fp32, stage {stage}, offload_optimizer nvme"
        f"{' + offload_param nvme' if offload_param else ''}{', built under zero.Init(remote_device=nvme)' if remote else ''}"
        f", buffer_count {bc}, sub_group_size {int(args.sub_group)}, dir {nvme}; RAM {mem_total() / GIB:.1f} GiB, "
        f"disk free {shutil.disk_usage(nvme).free / GB:.0f} GB")
    d, L = gcfg.d_model, gcfg.n_layer
    approx = 12 * L * d * d + (gcfg.vocab_size + args.seq) * d
    # on disk: Adam's two moments (8 B), + the fp32 parameter files (4 B) with offload_param,
    # + the zero.Init spill (4 B) while the model is re-laid into fetch units; + the scratch files
    need = approx * (8 + (8 if offload_param else 0)) + 2 * args.bw_gib * GIB
    free = shutil.disk_usage(nvme).free
    if free < 1.05 * need:
        raise RuntimeError(f"{nvme}: {free / GB:.0f} GB free, this run needs about {need / GB:.0f} GB")
    hwm0 = vm_hwm()
    engine, model, n, build_s = build(gcfg, cfg, remote=remote, units=args.units)
    tier = disk_tier(engine)
    counter = Counter(io_engines(engine), tier.walk)
    built_rss, built_hwm = vm_rss(), vm_hwm()
    log(f"part model: {n / 1e9:.3f}B parameters (model state 16 x params = {16 * n / GB:.1f} GB, "
        f"{16 * n / mem_total():.2f}x RAM), built in {build_s:.0f} s; RSS {built_rss / GIB:.2f} GiB (peak "
        f"{built_hwm / GIB:.2f}); on disk now {swap_bytes_on_disk(nvme) / GB:.1f} GB")
    bw = EngineBandwidth(tier.engine, nvme, int(args.bw_gib * GIB))
    try:
        rows = train_steps(engine, tier, counter, bw, steps=args.steps, warmup=args.warmup, seq=args.seq,
                           pure=args.model_pure_io, label="part model:")
        disk_files = swap_bytes_on_disk(nvme) - 2 * bw.nbytes
        report = _report(engine)
        walk = walk_bytes(tier)
        loss_after = None
        if args.eval_after:
            x, y = fixed_batch(args.seq)
            t0 = time.perf_counter()
            with torch.no_grad():
                loss_after = engine(x, y).item()
            log(f"part model: loss after the last step {loss_after:.4f} ({time.perf_counter() - t0:.0f} s forward)")
    finally:
        bw.close()
    s = summarize(rows, pure=args.model_pure_io)
    if loss_after is not None:
        s["loss_after_last_step"] = rnd(loss_after, 5)
        s["loss_falls"] = s["loss_falls"] and loss_after < s["losses"][-1]
    out = {"params": n, "target_params": P, "d_model": gcfg.d_model, "n_layer": gcfg.n_layer, "seq": args.seq,
           "stage": stage, "offload_param": offload_param, "remote_init": remote, "dtype": "fp32", "config": cfg, "lr": lr,
           "build_s": rnd(build_s, 1), "rss_before_build": hwm0, "rss_after_build": built_rss,
           "peak_rss_after_build": built_hwm, "peak_rss_bytes": vm_hwm(), "peak_rss_gib": rnd(vm_hwm() / GIB, 2),
           "model_state_bytes": 16 * n, "mem_total_bytes": mem_total(),
           "model_state_over_ram": rnd(16 * n / mem_total(), 3), "disk_bytes_swap_files": disk_files,
           "memory_report": report, "walk": walk, "steps": rows, "summary": s,
           "targets": {"peak RSS < 16 GiB (3B run)": rnd(vm_hwm() / GIB, 2), "loss finite and falling": s["loss_falls"]}}
    log(f"part model: {n / 1e9:.3f}B, losses {s['losses']} (after: {loss_after}), median step {s['median_step_s']} s "
        f"(bound of its bytes {s['median_step_bound_serial_s']} s, of the whole walk {s['median_walk_bound_serial_s']} s), "
        f"iteration {s['median_iteration_s']} s (bound {s['median_iteration_bound_serial_s']} s), peak RSS "
        f"{vm_hwm() / GIB:.2f} GiB, swap files {disk_files / GB:.1f} GB")
    engine.destroy()
    return out


# ---------------------------------------------------------------------------------------------
# part 4: DeepSpeed 0.19.8 on the part-2 config
# ---------------------------------------------------------------------------------------------
_DS_SCRIPT = r"""
import json, os, sys, time, traceback
sys.path.insert(0, {gpt_dir!r})
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", str({port}))
os.environ.setdefault("RANK", "0"); os.environ.setdefault("WORLD_SIZE", "1"); os.environ.setdefault("LOCAL_RANK", "0")
stage = "import"
def emit(**kw):
    print("DSRESULT " + json.dumps(kw), flush=True)
try:
    import torch
    import deepspeed
    from model import GPT, GPTConfig
    emit(event="versions", deepspeed=deepspeed.__version__, torch=torch.__version__)
    stage = "async_io op check"
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
        b = AsyncIOBuilder()
        emit(event="async_io", compatible=bool(b.is_compatible(verbose=True)))
    except Exception as e:
        emit(event="async_io", error=f"{{type(e).__name__}}: {{e}}")
    stage = "init_distributed"
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    cfg_gpt = GPTConfig(**{gpt!r})
    stage = "build model"
    model = GPT(cfg_gpt)
    n = sum(p.numel() for p in {{id(p): p for p in model.parameters()}}.values())
    cfg = {config!r}
    stage = "deepspeed.initialize"
    t0 = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    emit(event="initialized", seconds=time.perf_counter() - t0, params=n)
    g = torch.Generator().manual_seed(1)
    xx = torch.randint(0, 256, (1, {seq} + 1), generator=g)
    x, y = xx[:, :-1], xx[:, 1:]
    for i in range({steps}):
        stage = f"step {{i + 1}}"
        t0 = time.perf_counter()
        loss = engine(x, y)
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk({nvme!r}) for f in fs)
        cached = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("Cached:"))
        hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        emit(event="step", step=i + 1, loss=loss.item(), forward_s=t1 - t0, backward_s=t2 - t1, step_s=t3 - t2,
             swap_file_bytes=disk, page_cache_bytes=cached, peak_rss=hwm)
    emit(event="done")
except BaseException as e:
    emit(event="error", stage=stage, error=f"{{type(e).__name__}}: {{e}}", traceback=traceback.format_exc()[-4000:])
    sys.exit(1)
"""


def _run_ds(py: str, script: str, timeout: float) -> dict:
    """One child interpreter: its DSRESULT events, exit status, seconds, last lines of output."""
    import selectors

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    out: dict = {"events": []}
    t0 = time.perf_counter()
    tail: list[str] = []
    proc = subprocess.Popen([py, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        last = time.perf_counter()
        while True:
            if time.perf_counter() - t0 > timeout:
                raise subprocess.TimeoutExpired(py, timeout)
            if not sel.select(timeout=5):
                if proc.poll() is not None:
                    break
                if time.perf_counter() - last > 60:
                    log(f"part deepspeed: still running ({time.perf_counter() - t0:.0f} s; the first run JIT-builds "
                        "DeepSpeed's async_io, cpu_adam, shm and pin_memory ops)")
                    last = time.perf_counter()
                continue
            line = proc.stdout.readline()
            if not line:
                break
            line = line.rstrip("\n")
            if line.startswith("DSRESULT "):
                ev = json.loads(line[len("DSRESULT "):])
                out["events"].append(ev)
                log(f"part deepspeed: {json.dumps({k: v for k, v in ev.items() if k != 'traceback'})[:400]}")
            else:
                tail.append(line)
                tail[:] = tail[-60:]
        proc.wait(timeout=60)
        out["returncode"] = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        out["returncode"] = None
        out["events"].append({"event": "timeout", "after_s": timeout})
        log(f"part deepspeed: timed out after {timeout:.0f} s")
    out["seconds"] = rnd(time.perf_counter() - t0, 1)
    out["output_tail"] = tail[-40:]
    steps = [e for e in out["events"] if e.get("event") == "step"]
    err = next((e for e in out["events"] if e.get("event") == "error"), None)
    if steps and any(e.get("event") == "done" for e in out["events"]):
        out["status"] = "ran"
        timed = steps[2:] or steps[1:] or steps  # step 1 creates the swap files, step 2 warms up
        out["median_step_s"] = rnd(med([e["step_s"] for e in timed]))
        out["median_iteration_s"] = rnd(med([e["forward_s"] + e["backward_s"] + e["step_s"] for e in timed]))
        out["swap_file_bytes"] = steps[-1].get("swap_file_bytes")
        out["losses"] = [rnd(e["loss"], 5) for e in steps]
        out["peak_rss_bytes"] = steps[-1].get("peak_rss")
        out["page_cache_bytes"] = [e.get("page_cache_bytes") for e in steps]
    else:
        out["status"] = "failed"
        out["reason"] = (f"{err['stage']}: {err['error']}" if err else
                         "timed out" if out["returncode"] is None else f"exit {out['returncode']}: {tail[-3:]}")
        out["steps_done"] = len(steps)
    return out


def part_deepspeed(args) -> dict:
    py = args.ds_python
    nvme = str(Path(args.dir) / "deepspeed")
    gcfg = gpt_config(args.step_params, args.seq)
    out: dict = {"python": py, "params_target": args.step_params, "d_model": gcfg.d_model, "n_layer": gcfg.n_layer,
                 "timeout_s": args.ds_timeout, "attempts": [],
                 "libaio_headers": Path("/usr/include/libaio.h").exists()}  # DeepSpeed's async_io op needs libaio-dev
    if not Path(py).exists():
        out["status"] = "not run"
        out["reason"] = (f"{py} does not exist: make a venv with `pip install torch==2.13.0 deepspeed==0.19.8` and pass "
                         "--ds-python")
        log(f"part deepspeed: {out['reason']}")
        return out
    gpt = dict(vocab_size=gcfg.vocab_size, seq_len=gcfg.seq_len, n_layer=gcfg.n_layer, n_head=gcfg.n_head,
               d_model=gcfg.d_model)
    deadline = time.perf_counter() + args.ds_timeout
    bc = args.ds_buffer_count or args.buffer_count or 9
    for attempt in range(3):
        # the part-2 config at stage 3 (DeepSpeed implements NVMe offload only there; at stages
        # 1-2 "nvme" silently becomes CPU offload): fp32 master + m + v on disk
        cfg = ds_config(stage=3, nvme=nvme, sub_group=args.sub_group, buffer_count=bc, lr=args.lr or 3e-5,
                        offload_param=False)
        cfg["zero_optimization"]["offload_optimizer"]["pin_memory"] = False  # no CUDA here: nothing to pin
        shutil.rmtree(nvme, ignore_errors=True)
        Path(nvme).mkdir(parents=True, exist_ok=True)
        script = _DS_SCRIPT.format(gpt_dir=str(_ROOT / "examples" / "gpt"), port=29500 + os.getpid() % 1000, gpt=gpt,
                                   config=cfg, seq=args.seq, steps=args.ds_steps, nvme=nvme)
        left = deadline - time.perf_counter()
        log(f"part deepspeed: attempt {attempt + 1}: {py}, ZeRO-3 offload_optimizer nvme (buffer_count {bc}, "
            f"pipeline_read/write) on the part-2 model ({gcfg.d_model} x {gcfg.n_layer}), {args.ds_steps} steps, "
            f"{left:.0f} s left of --ds-timeout")
        if left < 60:
            break
        res = _run_ds(py, script, left)
        res["config"] = cfg
        out["attempts"].append(res)
        log(f"part deepspeed: attempt {attempt + 1} {res['status']}" +
            (f": {res.get('reason')}" if res["status"] != "ran" else f", median step {res['median_step_s']} s"))
        if res["status"] == "ran" or "ran out of swap buffers" not in str(res.get("reason")):
            break
        bc *= 2  # DeepSpeed's own advice in that message: "try increasing 'buffer_count'"
    shutil.rmtree(nvme, ignore_errors=True)
    last = out["attempts"][-1] if out["attempts"] else {"status": "not run", "reason": "no time left"}
    out["status"] = last["status"]
    for k in ("reason", "median_step_s", "median_iteration_s", "swap_file_bytes", "losses", "peak_rss_bytes",
              "page_cache_bytes"):
        if k in last:
            out[k] = last[k]
    out["config"] = last.get("config")
    return out


# ---------------------------------------------------------------------------------------------
def save(path: Path, key: str, value, sub: str | None = None, mach: dict | None = None) -> None:
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
    if mach is not None:
        data.setdefault("machine_by_part", {})[key if sub is None else f"{key}:{sub}"] = mach
        data["machine"] = mach
    if sub is None:
        data[key] = value
    else:
        data.setdefault(key, {})[sub] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)
    log(f"wrote {path} [{key}{'' if sub is None else ' ' + sub}]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", nargs="+", default=["all"], choices=["io", "step", "model", "deepspeed", "all"])
    ap.add_argument("--dir", default=DEFAULT_DIR, help="scratch / nvme_path directory on the disk under test")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    g = ap.add_argument_group("io")
    g.add_argument("--io-gib", type=float, default=4.0)
    g.add_argument("--rounds", type=int, default=3)
    g.add_argument("--baseline", choices=["auto", "fio", "dd"], default="auto")
    g.add_argument("--threads", type=int, default=8, help="shardwise I/O threads = fio iodepth (default 8)")
    g.add_argument("--block", type=int, default=1 << 20, help="bytes per request piece (default 1 MiB)")
    g = ap.add_argument_group("step / model")
    g.add_argument("--step-params", type=float, default=2.5e8)
    g.add_argument("--stage", type=int, default=1, choices=[1, 2, 3])
    g.add_argument("--params", type=float, default=1.5e9)
    g.add_argument("--model-stage", type=int, choices=[1, 2, 3], default=None, help="default: 1 up to 2e9, else 3")
    g.add_argument("--offload-param", action=argparse.BooleanOptionalAction, default=None,
                   help="stage 3 offload_param nvme (default: on at stage 3)")
    g.add_argument("--no-remote-init", action="store_true", help="build the model in RAM, not under zero.Init")
    g.add_argument("--d-model", type=int, default=None)
    g.add_argument("--layers", type=int, default=None)
    g.add_argument("--seq", type=int, default=64)
    g.add_argument("--sub-group", type=float, default=2.5e7)
    g.add_argument("--buffer-count", type=int, default=None, help="default: 3 tiles x the swapped kinds")
    g.add_argument("--param-buffer-size", type=float, default=1e8)
    g.add_argument("--units", choices=["block", "sublayer"], default="sublayer",
                   help="stage-3 fetch units: each block, or each attention / MLP (smaller tiles; default)")
    g.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    g.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (state-creating) one")
    g.add_argument("--lr", type=float, default=None,
                   help="AdamW lr (default: 3e-5 for step/deepspeed, 3e-5 x 1024 / d_model for model)")
    g.add_argument("--experiment", choices=["ahead1", "nonblocking"], default=None,
                   help="part step: EXPERIMENT, alternate shardwise's read-ahead with another (alternate_schedule)")
    g.add_argument("--bw-gib", type=float, default=1.0, help="scratch file size of the per-step bandwidth rounds")
    g.add_argument("--model-pure-io", action="store_true", help="part model: also time the pure-I/O walk per step")
    g.add_argument("--eval-after", action=argparse.BooleanOptionalAction, default=True,
                   help="part model: one more forward after the last step (its loss)")
    g = ap.add_argument_group("deepspeed")
    g.add_argument("--ds-python", default="/work/ds-venv/bin/python")
    g.add_argument("--ds-timeout", type=float, default=1800.0)
    g.add_argument("--ds-steps", type=int, default=5)
    g.add_argument("--ds-buffer-count", type=int, default=None,
                   help="first attempt's buffer_count (default 9: 3 tiles x master, m, v); doubled after "
                        "DeepSpeed's 'ran out of swap buffers'")
    args = ap.parse_args(argv)
    parts = set(args.part)
    if "all" in parts:
        parts |= {"io", "step", "deepspeed"}
    _check_dir(args.dir)
    mach = machine(args.dir)
    log(f"machine: {mach['cpu']}, {mach['cores']} cores, {mach['mem_total_gib']} GiB, disk {mach['disk']}, "
        f"torch {mach['torch']} x {mach['torch_threads']} threads, load {mach['load_avg']}")
    failed = []
    for part, fn in (("io", part_io), ("step", part_step), ("model", part_model), ("deepspeed", part_deepspeed)):
        if part not in parts:
            continue
        t0 = time.perf_counter()
        try:
            res = fn(args)
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001 - record and go on with the other parts
            import traceback

            log(f"part {part} FAILED: {type(e).__name__}: {e}")
            res = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            failed.append(part)
        res["wall_s"] = rnd(time.perf_counter() - t0, 1)
        res["load_avg_after"] = os.getloadavg()
        key = part
        if part == "step":
            key += (f"_stage{args.stage}" if args.stage != 1 else "") + (
                f"_experiment_{args.experiment}" if args.experiment else "")
        sub = f"{args.params:.1e}" + (f"_stage{args.model_stage}" if args.model_stage else "") if part == "model" else None
        save(args.out, key, res, sub=sub, mach=mach)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
