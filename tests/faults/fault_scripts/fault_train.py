"""Fault-injection training script, launched by tests/faults through `shardwise run`.

usage: fault_train.py OUT_DIR CONFIG_JSON FAULT FAULT_RANK FAULT_STEP [STEPS]

FAULT: none | kill (SIGKILL) | stop (SIGSTOP) | raise (ValueError) | nojoin (never calls
initialize) | nan (NaN added to the loss) | kill_once (SIGKILL on the first attempt only, for
restarts). The fault hits rank FAULT_RANK at optimizer step FAULT_STEP, while the other ranks
wait in that step's gradient reduction. At the end rank 0 writes OUT_DIR/final.pt (parameters,
optimizer state, counters) and every rank writes OUT_DIR/done{R}.
"""
import json
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "examples", "gpt"))

import torch  # noqa: E402

import shardwise  # noqa: E402


def main() -> int:
    argv = [a for a in sys.argv if not a.startswith("--local_rank=")]  # passed by `shardwise run`
    out, cfg_text, fault, fault_rank, fault_step = argv[1:6]
    steps = int(argv[6]) if len(argv) > 6 else 4
    fault_rank, fault_step = int(fault_rank), int(fault_step)
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    cfg = json.loads(cfg_text)
    mine = rank == fault_rank

    def mark() -> None:  # when the fault hits: the tests bound the time from here to the end
        with open(os.path.join(out, "fault_time"), "w") as f:
            f.write(repr(time.time()))

    if fault == "nojoin" and mine:
        mark()
        time.sleep(120)  # never joins; the launcher kills it once the others gave up
        return 0
    if fault == "mismatch" and mine:
        cfg["zero_optimization"]["stage"] = 1 if cfg["zero_optimization"].get("stage", 0) != 1 else 2
    torch.manual_seed(0)
    from model import GPT, GPTConfig

    model = GPT(GPTConfig.preset("tiny"))
    g = torch.Generator().manual_seed(7)
    data = [torch.randint(0, 64, (16 + 1,), generator=g) for _ in range(64)]
    engine, _, loader, _ = shardwise.initialize(model=model, config=cfg, training_data=data)
    batches = iter(loader)
    while engine.global_steps < steps:
        step = engine.global_steps
        x = next(batches)
        loss = engine(x[:, :-1], x[:, 1:])
        if mine and step == fault_step and fault == "kill_in_write_once" and attempt == 0:
            io = engine.strategy.tier.engine  # offload: SIGKILL with the step's first write in flight
            write = io.write

            def write_then_die(*args, **kwargs):
                handle = write(*args, **kwargs)
                mark()
                os.kill(os.getpid(), signal.SIGKILL)
                return handle

            io.write = write_then_die
        if mine and step == fault_step:
            if fault == "nan":
                loss = loss + float("nan")
            elif fault == "raise":
                time.sleep(1.0)
                mark()
                raise ValueError(f"injected failure on rank {rank} at step {step}")
            elif fault in ("kill", "stop") or (fault == "kill_once" and attempt == 0):
                time.sleep(1.0)  # the others are waiting in this step's reduction by now
                mark()
                os.kill(os.getpid(), signal.SIGSTOP if fault == "stop" else signal.SIGKILL)
        engine.backward(loss)
        engine.step()
    with engine.strategy.tier.materialized():  # offloaded optimizer state read back (every rank)
        opt = [{k: v.clone() if torch.is_tensor(v) else v for k, v in engine.optimizer.state[b.opt_param].items()}
               for b in engine.strategy.buckets]
    if rank == 0:
        state = {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                 "opt": opt,
                 "global_steps": engine.global_steps, "skipped_steps": engine.skipped_steps,
                 "attempt": attempt}
        torch.save(state, os.path.join(out, "final.pt"))
    with open(os.path.join(out, f"done{rank}"), "w") as f:
        f.write(json.dumps({"attempt": attempt, "skipped": engine.skipped_steps}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
