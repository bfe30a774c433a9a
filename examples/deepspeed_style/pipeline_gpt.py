"""A GPT trained with DeepSpeed's pipeline parallelism the way DeepSpeed's pipeline tutorial
(and DeepSpeedExamples' ``pipeline_parallelism/train.py``) does it, with only the import
changed (``import shardwise as deepspeed``): the model is a ``deepspeed.pipe.PipelineModule`` of
``LayerSpec``s (each built only on its stage) with the token embedding and the LM head as one
``TiedLayerSpec``; ``deepspeed.initialize(training_data=...)`` and ``engine.train_batch()``
pull ``gradient_accumulation_steps`` micro-batches per step through a ``RepeatingLoader``.
Uses the bundled byte-level GPT's blocks (examples/gpt/model.py via examples/gpt/pipeline.py).

    shardwise run --nproc-per-node 2 examples/deepspeed_style/pipeline_gpt.py \\
        --deepspeed_config examples/deepspeed_style/ds_config_pipeline.json -p 2

With ``seed_layers`` every layer's initial values depend on its index only, so the same script
in one process (``-p 1``) trains the same model on the same batches: its losses match.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gpt"))
from model import GPTConfig  # noqa: E402
from pipeline import FinalNorm, PipeBlock, PositionEmbedding, TokenEmbedding, gpt_loss, lm_head  # noqa: E402

import shardwise as deepspeed  # noqa: E402


def get_args():
    parser = argparse.ArgumentParser(description="GPT pipeline")
    parser.add_argument("-p", "--pipeline-parallel-size", type=int, default=2, help="pipeline stages")
    parser.add_argument("-s", "--steps", type=int, default=6, help="optimizer steps (train_batch calls)")
    parser.add_argument("--seed", type=int, default=1138)
    parser.add_argument("--backend", type=str, default=None, help="distributed backend")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    parser.add_argument("--out", default=None, help="rank 0 writes the per-step losses here (JSON)")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


def gpt_pipe(cfg: GPTConfig, num_stages: int):
    layers = [deepspeed.pipe.TiedLayerSpec("embed", TokenEmbedding, cfg, tied_weight_attr="weight"),
              deepspeed.pipe.LayerSpec(PositionEmbedding, cfg),
              *[deepspeed.pipe.LayerSpec(PipeBlock, cfg) for _ in range(cfg.n_layer)],
              deepspeed.pipe.LayerSpec(FinalNorm, cfg),
              deepspeed.pipe.TiedLayerSpec("embed", TokenEmbedding, cfg, forward_fn=lm_head, tied_weight_attr="weight")]
    return deepspeed.pipe.PipelineModule(layers=layers, loss_fn=gpt_loss, num_stages=num_stages,
                                         partition_method="type:PipeBlock", seed_layers=True,
                                         activation_checkpoint_interval=0)


class TokenPairs(torch.utils.data.Dataset):
    """Random byte sequences as (inputs, labels) pairs, labels shifted by one."""

    def __init__(self, cfg: GPTConfig, samples: int = 96, seed: int = 5):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, cfg.vocab_size, (samples, cfg.seq_len + 1), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i, :-1], self.data[i, 1:]


def main():
    args = get_args()
    deepspeed.init_distributed(dist_backend=args.backend)
    torch.manual_seed(args.seed)
    cfg = GPTConfig.preset("tiny", n_layer=4)
    net = gpt_pipe(cfg, args.pipeline_parallel_size)
    engine, _, _, _ = deepspeed.initialize(args=args, model=net,
                                           model_parameters=[p for p in net.parameters() if p.requires_grad],
                                           training_data=TokenPairs(cfg))
    losses = []
    for step in range(args.steps):
        loss = engine.train_batch()  # gradient_accumulation_steps micro-batches, one optimizer step
        losses.append(loss.item())
        if engine.global_rank == 0:
            print(f"step {step + 1} loss {losses[-1]:.4f} stage {engine.stage_id}/{engine.num_stages}", flush=True)
    if engine.global_rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "stages": engine.num_stages, "gas": engine.gradient_accumulation_steps(),
                       "first": engine.is_first_stage(), "last": engine.is_last_stage()}, f)


if __name__ == "__main__":
    main()
