"""DeepSpeed's names on shardwise (issue 14, part 1): what a script calls besides initialize /
backward / step, one plain process. The 2-rank behaviour (comm collectives, backward forms,
the example scripts) is in tests/distributed/test_backward_forms.py and test_deepspeed_style.py."""
from __future__ import annotations

import argparse
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

import shardwise as deepspeed
from shardwise.errors import UsageError
from model import GPT, GPTConfig

CFG = GPTConfig.preset("tiny")
X = torch.randint(0, CFG.vocab_size, (8, CFG.seq_len + 1), generator=torch.Generator().manual_seed(5))


def config(stage: int = 0, **extra) -> dict:
    return {"train_batch_size": 4, "steps_per_print": 1000, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            **extra}


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


def test_engine_answers_deepspeeds_questions():
    engine, *_ = deepspeed.initialize(model=gpt(), config=config(2, bf16={"enabled": True}))
    assert engine.zero_optimization_stage() == 2 and engine.zero_optimization()
    assert engine.bfloat16_enabled() and not engine.fp16_enabled() and engine.loss_scale() == 1.0
    assert (engine.local_rank, engine.global_rank, engine.world_size, engine.dp_world_size) == (0, 0, 1, 1)
    assert engine.device == torch.device("cpu")
    assert isinstance(engine, deepspeed.DeepSpeedEngine)
    # attribute pass-through to the module (engine.generate, engine.config in HF models)
    assert engine.cfg is engine.module.cfg
    with pytest.raises(AttributeError, match="neither the shardwise Engine nor its GPT module"):
        engine.no_such_attribute
    engine.destroy()


def test_fp16_engine_reports_its_loss_scale_as_a_method():
    engine, *_ = deepspeed.initialize(model=gpt(), config=config(1, fp16={"enabled": True, "initial_scale_power": 8}))
    assert engine.fp16_enabled() and engine.loss_scale() == 256.0


def test_add_config_arguments_feeds_initialize(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.25}}}')
    parser = deepspeed.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", str(path)])
    assert args.deepspeed
    engine, opt, *_ = deepspeed.initialize(args=args, model=gpt(), model_parameters=None)
    assert engine.get_lr() == [0.25] and isinstance(opt, torch.optim.SGD)


def test_accelerator_on_this_machine():
    acc = deepspeed.accelerator.get_accelerator()
    assert acc is deepspeed.accelerator.get_accelerator()
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert acc.device_name() == want and acc.communication_backend_name() in ("nccl", "gloo")
    if want == "cpu":
        assert acc.device_name(0) == "cpu" and acc.device_count() == 1 and acc.is_bf16_supported()
        t = torch.zeros(2)
        assert acc.on_accelerator(t) and acc.pin_memory(t) is t
    acc.manual_seed(3)
    a = torch.rand(3)
    acc.manual_seed(3)
    assert torch.equal(a, torch.rand(3))


def test_comm_without_a_process_group_acts_as_one_rank():
    comm = deepspeed.comm
    assert (comm.get_rank(), comm.get_world_size(), comm.is_initialized()) == (0, 1, False)
    t = torch.tensor([2.0, 3.0])
    comm.all_reduce(t)
    comm.broadcast(t, 0)
    comm.barrier()
    assert t.tolist() == [2.0, 3.0]
    out = [torch.zeros(2)]
    comm.all_gather(out, t)
    flat = torch.zeros(2)
    comm.all_gather_into_tensor(flat, t)
    objs = [None]
    comm.all_gather_object(objs, {"a": 1})
    assert out[0].tolist() == flat.tolist() == [2.0, 3.0] and objs == [{"a": 1}]
    deepspeed.init_distributed()  # a single process: nothing to join
    with pytest.raises(UsageError, match="shardwise picks"):
        deepspeed.init_distributed(dist_backend="mpi")


def test_fused_adam_is_torch_adamw():
    a, b = gpt(), gpt()
    opt_a = deepspeed.ops.adam.FusedAdam(a.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        for m, o in ((a, opt_a), (b, opt_b)):
            m(X[:4, :-1], X[:4, 1:]).backward()
            o.step()
            o.zero_grad()
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), k
    with pytest.raises(UsageError, match="bias_correction"):
        deepspeed.ops.adam.DeepSpeedCPUAdam(a.parameters(), bias_correction=False)


def _train(engine, micro: list[torch.Tensor], **step_kwargs):
    for xb in micro:
        engine.backward(engine(xb[:, :-1], xb[:, 1:]))
        engine.step(**step_kwargs)


def test_no_sync_accumulates_and_is_refused_where_it_cannot_defer():
    engine, *_ = deepspeed.initialize(model=gpt(), config=config(1, train_batch_size=8,
                                                                 gradient_accumulation_steps=2))
    ref, *_ = deepspeed.initialize(model=gpt(), config=config(1, train_batch_size=8, gradient_accumulation_steps=2))
    with engine.no_sync():
        engine.backward(engine(X[:4, :-1], X[:4, 1:]))
        engine.step()
    engine.backward(engine(X[4:, :-1], X[4:, 1:]))
    engine.step()
    _train(ref, [X[:4], X[4:]])
    for p, q in zip(engine.module.parameters(), ref.module.parameters()):
        assert torch.equal(p, q)
    with engine.no_sync():
        engine.backward(engine(X[:4, :-1], X[:4, 1:]))
        engine.step()  # not a boundary: allowed
        engine.backward(engine(X[4:, :-1], X[4:, 1:]))
        with pytest.raises(UsageError, match="inside engine.no_sync"):
            engine.step()
    stage2, *_ = deepspeed.initialize(model=gpt(), config=config(2))
    with pytest.raises(UsageError, match="not possible at ZeRO stage 2"):
        with stage2.no_sync():
            pass


def test_boundary_override_scale_wrt_gas_and_lr_kwargs():
    sched_calls = []

    class Sched(torch.optim.lr_scheduler.LambdaLR):
        def step(self, *args, **kwargs):
            sched_calls.append(kwargs)
            return super().step()

    m = gpt()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=m, optimizer=opt, lr_scheduler=Sched(opt, lambda s: 1.0),
                                      config={"train_batch_size": 8, "gradient_accumulation_steps": 2,
                                              "gradient_clipping": 0.0})
    engine.set_gradient_accumulation_boundary(True)  # step after one micro-batch
    engine.backward(engine(X[:4, :-1], X[:4, 1:]), scale_wrt_gas=False)
    engine.step(lr_kwargs={"increment": 1})
    assert engine.global_steps == 1 and sched_calls == [{}, {"increment": 1}]  # [0]: LambdaLR's own init
    # the same step in plain PyTorch: the whole loss (scale_wrt_gas=False), SGD
    ref = gpt()
    ref(X[:4, :-1], X[:4, 1:]).backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    for p, q in zip(engine.module.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    engine.set_gradient_accumulation_boundary(None)
    assert engine.is_gradient_accumulation_boundary() == ((engine.micro_steps + 1) % 2 == 0)  # counting again


def test_initialize_accepts_an_mpu_of_size_one_only():
    class MPU:
        def __init__(self, n):
            self.n = n

        def get_model_parallel_world_size(self):
            return self.n

    deepspeed.initialize(model=gpt(), config=config(), mpu=MPU(1))
    with pytest.raises(UsageError, match="tensor parallelism"):
        deepspeed.initialize(model=gpt(), config=config(), mpu=MPU(2))


def test_set_z3_leaf_modules_keeps_the_leaf_whole_at_stage_3():
    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            return sum(e(x) for e in self.experts)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
            self.moe = MoE()

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return self.moe(x).pow(2).mean()

    torch.manual_seed(0)
    net = Net()
    found = deepspeed.utils.set_z3_leaf_modules(net, [MoE])
    assert found == [net.moe]
    engine, *_ = deepspeed.initialize(model=net, config={"train_batch_size": 2, "zero_optimization": {"stage": 3},
                                                         "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    names = [u.name for u in engine.strategy.runtime.units]
    assert "moe" in names and not any(n.startswith("moe.experts") for n in names), names
    with pytest.raises(UsageError, match="no module of class"):
        deepspeed.utils.set_z3_leaf_modules(Net(), ["Conv2d"])


def test_repeating_loader_and_set_random_seed():
    sampler = torch.utils.data.DistributedSampler(list(range(6)), num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = deepspeed.runtime.dataloader.RepeatingLoader(
        torch.utils.data.DataLoader(list(range(6)), batch_size=3, sampler=sampler))
    first, second = [next(loader).tolist() for _ in range(2)], [next(loader).tolist() for _ in range(2)]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(6))
    assert first != second and loader.epoch == 1  # the next pass is reshuffled (set_epoch)
    deepspeed.runtime.utils.set_random_seed(11)
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    deepspeed.runtime.utils.set_random_seed(11)
    assert draws == (random.random(), np.random.rand(), torch.rand(1).item())
