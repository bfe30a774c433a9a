"""A GPT built under ``zero.Init`` and trained at ZeRO stage 3 the way DeepSpeed's ZeRO tutorial
shows, with only the import changed: no rank ever holds the whole model; the embedding is
re-initialised through ``GatheredParameters(modifier_rank=0)``; ``save_16bit_model`` writes the
whole model at the end. Uses the bundled byte-level GPT (examples/gpt/model.py), tiny preset.

    shardwise run --nproc-per-node 2 examples/deepspeed_style/zero_init_gpt.py \\
        --deepspeed_config examples/deepspeed_style/ds_config_zero3.json --save_dir runs/zero3
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gpt"))
from model import GPT, GPTConfig  # noqa: E402

import shardwise as deepspeed  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save_dir", default=None, help="save_16bit_model writes here")
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--out", default=None)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    deepspeed.init_distributed()
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny")
    with deepspeed.zero.Init(config_dict_or_path=args.deepspeed_config):
        model = GPT(cfg)
    # a custom initialisation of a split parameter: gather, change on rank 0, re-split
    with deepspeed.zero.GatheredParameters(model.tok_emb.weight, modifier_rank=0):
        if deepspeed.comm.get_rank() == 0:
            torch.nn.init.normal_(model.tok_emb.weight, std=0.02, generator=torch.Generator().manual_seed(5))
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    micro = engine.train_micro_batch_size_per_gpu()
    data = torch.randint(0, cfg.vocab_size, (args.steps, micro * world, cfg.seq_len + 1),
                         generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(args.steps):
        x = data[step, rank * micro:(rank + 1) * micro]
        loss = engine(x[:, :-1], x[:, 1:])
        engine.backward(loss)
        engine.step()
        t = torch.tensor([loss.item()], dtype=torch.float64)
        deepspeed.comm.all_reduce(t)
        losses.append(t.item() / world)
        if rank == 0:
            print(f"step {step + 1} loss {losses[-1]:.4f}", flush=True)
    if args.save_dir:
        engine.save_16bit_model(args.save_dir, "model.safetensors")
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "stage": engine.zero_optimization_stage()}, f)


if __name__ == "__main__":
    main()
