"""``shardwise checkpoint info|export`` (wired into ``shardwise.cli.COMMANDS``)."""
from __future__ import annotations

import argparse

import torch

from shardwise.checkpoint.export import export_hf, info

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "keep": None}


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="shardwise checkpoint",
                                     description="inspect, verify and export shardwise checkpoints")
    sub = parser.add_subparsers(dest="action", required=True)
    p_info = sub.add_parser("info", help="list tags with step, world size, stage, sizes; verify checksums")
    p_info.add_argument("ckpt_dir")
    p_info.add_argument("--no-verify", action="store_true", help="skip reading every file for its crc32")
    p_exp = sub.add_parser("export", help="write the model in Hugging Face safetensors layout")
    p_exp.add_argument("ckpt_dir")
    p_exp.add_argument("out_dir")
    p_exp.add_argument("--tag", default=None, help="default: the one `latest` names")
    p_exp.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    p_exp.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    if args.action == "export":
        files = export_hf(args.ckpt_dir, args.out_dir, args.tag, _DTYPES[args.dtype], args.max_shard_size)
        for f in files:
            print(f)
        return 0
    report = info(args.ckpt_dir, verify=not args.no_verify)
    print(f"latest: {report['latest'] or '(none: ' + str(report['latest_problem']) + ')'}")
    bad = 0
    for row in report["tags"]:
        mark = "*" if row["tag"] == report["latest"] else " "
        if "step" in row:
            mesh = row.get("mesh")
            shown = f" (pp {mesh['pp']}, dp {mesh['dp']}, tp {mesh['tp']})" if mesh and (mesh["pp"] > 1 or mesh["tp"] > 1) \
                else ""
            print(f"{mark} {row['tag']}: step {row['step']}, world size {row['world_size']}{shown}, ZeRO stage "
                  f"{row['zero_stage']}, {row['dtype']}, {row['files']} files, {_human(row['bytes'])}"
                  + ("" if row["ok"] else f"  BAD: {row['problem']}")
                  + (" (verified)" if row["ok"] and not args.no_verify else ""))
        else:
            print(f"{mark} {row['tag']}: BAD: {row['problem']}")
        bad += not row["ok"]
    for name in report["stale"]:
        print(f"  {name}: left by an interrupted save (not a checkpoint; removed by the next save)")
    return 1 if bad or report["latest_problem"] else 0
