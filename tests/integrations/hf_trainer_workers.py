"""Rank functions for tests/integrations/test_hf_trainer.py: the Hugging Face Trainer on shardwise
(``ShardwiseTrainer``) on 2 gloo ranks, and the plain ``Trainer`` in one process as reference.

Same data either way: the Trainer's sampler is seeded (``seed``) and Accelerate hands each
rank consecutive micro-batches of it, so the 2 ranks' micro-batches of micro-step j together
are the plain run's batch j (``per_device_train_batch_size`` = 2 x micro). Loss terms are summed
over tokens and divided by the token count of the whole accumulation window (the Trainer's
``num_items_in_batch``), so the split across ranks changes only the order of additions.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

VOCAB, SEQ, MICRO, GAS, STEPS, WORLD = 128, 16, 2, 2, 4, 2
SAMPLES = WORLD * MICRO * GAS * STEPS  # one epoch is exactly the run
SHORT = WORLD * MICRO * (GAS * STEPS - 1)  # 7 batches an epoch: step 4 accumulates 1 micro-batch
LR = 1e-3


def tiny_model(kind: str, seed: int = 0):
    """A tiny GPT-2 (tied embeddings) or Llama (untied head, rotary buffers), random init, no download."""
    import transformers as T

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = T.GPT2LMHeadModel(cfg)
    else:
        cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                            tie_word_embeddings=False)
        model = T.LlamaForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    return model


class TokenData(torch.utils.data.Dataset):
    """Synthetic causal-LM samples: ``input_ids`` and ``labels`` (the same tokens)."""

    def __init__(self, n: int = SAMPLES, seed: int = 5):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i].clone()}


def config(stage: int, optimizer: bool) -> dict:
    """The ds_config.json a Trainer user writes: "auto" everywhere the Trainer knows the value.
    ``optimizer``: with an AdamW section (else the Trainer's own AdamW); never a scheduler
    section (the Trainer's linear schedule)."""
    opt = {"optimizer": {"type": "AdamW", "params": {k: "auto" for k in ("lr", "betas", "eps", "weight_decay")}}}
    return {**(opt if optimizer else {}),
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto", "gradient_clipping": "auto", "steps_per_print": 1000,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": "auto",
                              **({"stage3_prefetch_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": "auto"} if stage == 3 else {})},
    }


def args(out: str, world: int, weight_decay: float, **overrides: Any):
    from transformers import TrainingArguments

    kw: dict[str, Any] = dict(
        output_dir=out, per_device_train_batch_size=MICRO * (WORLD // world), gradient_accumulation_steps=GAS,
        max_steps=STEPS, learning_rate=LR, weight_decay=weight_decay, warmup_steps=0, lr_scheduler_type="linear",
        max_grad_norm=0.5, logging_steps=1, report_to="none", use_cpu=True, dataloader_num_workers=0,
        save_strategy="no", disable_tqdm=True, seed=0)
    kw.update(overrides)
    return TrainingArguments(**kw)


def eval_data() -> TokenData:
    return TokenData(WORLD * MICRO * 2, seed=6)


def probe_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(9))


def logits_of(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe_batch()).logits.float()


def whole(model) -> dict[str, torch.Tensor]:
    """Every parameter, whole (a collective for a stage-3 model)."""
    import shardwise.zero

    with shardwise.zero.GatheredParameters(list(model.parameters())):
        return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def history(trainer) -> dict[str, list[float]]:
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return {k: [float(e[k]) for e in logs] for k in ("loss", "grad_norm", "learning_rate")}


class StopAt:
    """A TrainerCallback that stops training after ``step`` optimizer steps (a run cut short)."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= step:
                    control.should_training_stop = True
                return control

        return _Stop()


# -- the plain reference (test process) ------------------------------------------------------------


def plain_run(kind: str, out: str, weight_decay: float, samples: int = SAMPLES) -> dict:
    """Plain ``Trainer``, one process, the same global batch; the trained model's probe logits."""
    from transformers import Trainer

    model = tiny_model(kind)
    trainer = Trainer(model=model, args=args(out, 1, weight_decay), train_dataset=TokenData(samples),
                      eval_dataset=eval_data())
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    return {**history(trainer), "params": whole(model), "logits": logits_of(model), "eval_loss": eval_loss}


def save_random(kind: str, path: str) -> None:
    tiny_model(kind).save_pretrained(path)


# -- shardwise (every rank) ---------------------------------------------------------------------------


def _torchrun_env() -> None:
    """What torchrun sets and run_distributed does not: Accelerate reads it (it keeps the process
    group run_distributed made); one intra-op thread, as the reference."""
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(dist.get_world_size()))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def shardwise_run(kind: str, stage: int, optimizer: bool, weight_decay: float, out: str, pretrained: str | None,
                  resume: bool, samples: int = SAMPLES) -> dict:
    """``ShardwiseTrainer`` for STEPS steps (model from ``from_pretrained(pretrained)`` under
    zero.Init when given), ``save_model``, and the saved directory's logits (rank 0). With
    ``resume``: also a run stopped after 2 steps with a checkpoint, then a fresh trainer and
    model resuming it to STEPS."""
    from shardwise.integrations.hf import ShardwiseTrainer, from_pretrained

    rank = dist.get_rank()
    _torchrun_env()

    def build():
        if pretrained is None:
            return tiny_model(kind)
        return from_pretrained(pretrained, config(stage, optimizer))

    model = build()
    kinds = sorted({type(p).__name__ for p in model.parameters()})
    trainer = ShardwiseTrainer(model=model, args=args(os.path.join(out, "full"), WORLD, weight_decay),
                               train_dataset=TokenData(samples), eval_dataset=eval_data(),
                               shardwise_config=config(stage, optimizer))
    trainer.train()
    result: dict[str, Any] = {**history(trainer), "params": whole(model), "kinds": kinds,
                              "stage": trainer.engine.zero_optimization_stage(),
                              "eval_loss": trainer.evaluate()["eval_loss"], "engine_logits": logits_of(model)}
    saved = os.path.join(out, "saved")
    trainer.save_model(saved)
    if rank == 0:
        from transformers import AutoModelForCausalLM

        result["saved_files"] = sorted(os.listdir(saved))
        result["saved_logits"] = logits_of(AutoModelForCausalLM.from_pretrained(saved))
    if resume:
        result["resumed"] = _resume(build, config(stage, optimizer), weight_decay, os.path.join(out, "resume"))
    return result


def _resume(build, cfg: dict, weight_decay: float, out: str) -> dict:
    from shardwise.integrations.hf import ShardwiseTrainer

    first = ShardwiseTrainer(model=build(), args=args(out, WORLD, weight_decay, save_strategy="steps", save_steps=2),
                             train_dataset=TokenData(), shardwise_config=cfg, callbacks=[StopAt(2)])
    first.train()
    ckpt = os.path.join(out, "checkpoint-2")
    files = sorted(os.listdir(ckpt))
    second = ShardwiseTrainer(model=build(), args=args(out, WORLD, weight_decay), train_dataset=TokenData(),
                              shardwise_config=cfg)
    second.train(resume_from_checkpoint=ckpt)
    return {"first": history(first), **history(second), "params": whole(second.model), "files": files}
