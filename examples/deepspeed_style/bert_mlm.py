"""A BERT-style masked-language model trained the way HelloDeepSpeed does it, with only the
import changed: grouped parameters (no weight decay on biases and LayerNorm), the optimizer
and LR schedule from the config, a ``RepeatingLoader`` over a plain DataLoader, and
checkpoints whose ``client_state`` holds the step and the RNG states (tensors and tuples: not
JSON). Synthetic token data; no downloads.

    shardwise run --nproc-per-node 2 examples/deepspeed_style/bert_mlm.py \\
        --deepspeed_config examples/deepspeed_style/ds_config_bert.json --checkpoint_dir runs/bert
"""
import argparse
import json
import random

import numpy as np
import torch
import torch.nn as nn

import shardwise as deepspeed
from shardwise.runtime.dataloader import RepeatingLoader

VOCAB, SEQ, MASK_ID = 64, 16, 1


class TinyBert(nn.Module):
    def __init__(self, d: int = 32, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.zeros(SEQ, d))
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, input_ids, labels):
        h = self.norm(self.encoder(self.emb(input_ids) + self.pos))
        logits = self.head(h)
        return nn.functional.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), ignore_index=-100)


def masked_batches(samples: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (samples, SEQ), generator=g)
    ids[:, 1::2] = (ids[:, 0::2] * 7) % (VOCAB - 2) + 2  # learnable structure
    mask = torch.rand(samples, SEQ, generator=g) < 0.25
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    return torch.utils.data.TensorDataset(torch.where(mask, torch.full_like(ids, MASK_ID), ids), labels)


def grouped_parameters(model: nn.Module, weight_decay: float = 0.01):
    no_decay = ("bias", "norm", "pos")
    return [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)],
         "weight_decay": 0.0},
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps")
    parser.add_argument("--checkpoint_dir", default=None)
    parser.add_argument("--checkpoint_every", type=int, default=3)
    parser.add_argument("--load_checkpoint", default=None, help="resume from this directory")
    parser.add_argument("--load_tag", default=None, help="the checkpoint in it (default: latest)")
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--out", default=None)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    deepspeed.init_distributed()
    deepspeed.runtime.utils.set_random_seed(42)
    model = TinyBert()
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=grouped_parameters(model))
    rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    data = masked_batches(512)
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = RepeatingLoader(torch.utils.data.DataLoader(data, batch_size=engine.train_micro_batch_size_per_gpu(),
                                                         sampler=sampler))
    start = 0
    if args.load_checkpoint:
        path, client_state = engine.load_checkpoint(args.load_checkpoint, tag=args.load_tag)
        if path is not None:
            start = client_state["step"]
            torch.set_rng_state(client_state["torch_rng"])
            np.random.set_state(client_state["numpy_rng"])
            random.setstate(client_state["python_rng"])
            for _ in range(start * engine.gradient_accumulation_steps()):
                next(loader)  # the data already seen
    losses = {}
    data_iter = iter(loader)
    for step in range(start + 1, args.steps + 1):
        total = 0.0
        for _ in range(engine.gradient_accumulation_steps()):
            input_ids, labels = next(data_iter)
            loss = engine(input_ids.to(engine.device), labels.to(engine.device))
            engine.backward(loss)
            engine.step()
            total += loss.item() / engine.gradient_accumulation_steps()
        t = torch.tensor([total], dtype=torch.float64)
        deepspeed.comm.all_reduce(t)
        losses[step] = t.item() / world
        if rank == 0:
            print(f"step {step} loss {losses[step]:.4f} lr {engine.get_lr()[0]:.2e}", flush=True)
        if args.checkpoint_dir and step % args.checkpoint_every == 0:
            engine.save_checkpoint(args.checkpoint_dir, client_state={
                "step": step, "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                "python_rng": random.getstate()})
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "steps": engine.global_steps}, f)


if __name__ == "__main__":
    main()
