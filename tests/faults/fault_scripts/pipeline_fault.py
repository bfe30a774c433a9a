"""Fault injection in a pipeline (launched by tests/faults/test_pipeline_fault.py through
`shardwise run`): the example GPT as a PipelineModule over all ranks' stages, trained with
train_batch.

usage: pipeline_fault.py OUT_DIR CONFIG_JSON FAULT FAULT_RANK FAULT_STEP PP [STEPS]

FAULT: none | kill (SIGKILL) | stop (SIGSTOP) | raise (ValueError). It hits rank FAULT_RANK in
the forward of its stage's first layer during optimizer step FAULT_STEP, while the other stages
wait for its activations / gradients. Every rank that finishes writes OUT_DIR/done{R}.
"""
import json
import os
import signal
import sys
import time
from datetime import timedelta

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "examples", "gpt"))

import torch  # noqa: E402

import shardwise  # noqa: E402
from model import GPTConfig  # noqa: E402
from pipeline import gpt_pipeline  # noqa: E402


def main() -> int:
    argv = [a for a in sys.argv if not a.startswith("--local_rank=")]
    out, cfg_text, fault, fault_rank, fault_step, pp = argv[1:7]
    steps = int(argv[7]) if len(argv) > 7 else 4
    fault_rank, fault_step, pp = int(fault_rank), int(fault_step), int(pp)
    config = json.loads(cfg_text)
    # DeepSpeed's order: join first (the PipelineModule needs the process group), with the timeout
    shardwise.init_distributed(timeout=timedelta(seconds=config["comms_timeout"]))
    rank = int(os.environ.get("RANK", "0"))
    cfg = GPTConfig.preset("tiny", n_layer=4)
    torch.manual_seed(0)
    pipe = gpt_pipeline(cfg, num_stages=pp, seed_layers=True)
    engine, _, _, _ = shardwise.initialize(model=pipe, config=config)
    state = {"step": 0, "armed": rank == fault_rank}

    def hit(module, args):
        if not state["armed"] or state["step"] != fault_step:
            return
        state["armed"] = False
        time.sleep(1.0)  # the other stages are waiting in their sends / receives by now
        with open(os.path.join(out, "fault_time"), "w") as f:
            f.write(repr(time.time()))
        if fault == "raise":
            raise ValueError(f"injected failure on rank {rank} at step {fault_step}")
        if fault in ("kill", "stop"):
            os.kill(os.getpid(), signal.SIGSTOP if fault == "stop" else signal.SIGKILL)

    first = min(pipe.stage_layers())
    layer = pipe.tied_modules["embed"] if str(first) not in dict(pipe.named_children()) else getattr(pipe, str(first))
    layer.register_forward_pre_hook(hit)
    g = torch.Generator().manual_seed(7)
    micro = engine.train_micro_batch_size_per_gpu()
    while engine.global_steps < steps:
        state["step"] = engine.global_steps
        batch = [(x[:, :-1], x[:, 1:]) for x in
                 (torch.randint(0, 64, (micro, 17), generator=g) for _ in range(engine.gradient_accumulation_steps()))]
        engine.train_batch(iter(batch))
    with open(os.path.join(out, f"done{rank}"), "w") as f:
        f.write("ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
