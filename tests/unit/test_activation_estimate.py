"""The activation estimate against what autograd really keeps: the example GPT at two sequence
lengths, fp32 and bf16, with and without activation checkpointing (every block, every 2nd).
Bytes are counted as ``saved_tensors_hooks`` sees them (each storage once, parameters
excluded), plus the inputs a checkpointed block keeps for its recomputation."""
from __future__ import annotations

import pytest
import torch

from shardwise.checkpointing import apply_activation_checkpointing
from shardwise.config import plan_for
from shardwise.estimate import activation_bytes, transformer_shape
from model import GPT, GPTConfig

MICRO = 4


def saved_bytes(cfg: GPTConfig, dtype: torch.dtype, every: int, micro: int = MICRO) -> int:
    torch.manual_seed(0)
    model = GPT(cfg).to(dtype)
    if every:
        apply_activation_checkpointing(
            model, plan_for({"activation_checkpointing": {"modules": "blocks", "every": every}}).activation_checkpointing)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.nbytes():
            kept[st.data_ptr()] = st.nbytes()

    def pack(t):
        keep(t)
        return t

    if every:  # a checkpointed block's input is kept by the checkpoint itself
        for block in model.blocks[every - 1::every]:
            block.register_forward_pre_hook(lambda _m, args: keep(args[0]))
    x = torch.randint(0, cfg.vocab_size, (micro, cfg.seq_len + 1), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x[:, :-1], x[:, 1:])
    return sum(kept.values())


@pytest.mark.parametrize("every", [0, 1, 2], ids=["none", "every-block", "every-2nd"])
@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("seq", [64, 128])
def test_estimate_is_within_2_percent_of_saved_bytes(seq, precision, dtype, every):
    cfg = GPTConfig.preset("demo", seq_len=seq)
    got = saved_bytes(cfg, dtype, every)
    want = activation_bytes(transformer_shape(GPT(cfg)), MICRO, seq, precision, checkpoint_every=every)
    assert want == pytest.approx(got, rel=0.02)


def demo_model() -> GPT:
    return GPT(GPTConfig.preset("demo", seq_len=128))


def test_estimate_cli_reads_activation_checkpointing_from_the_config(capsys, tmp_path):
    """`shardwise estimate --config` follows activation_checkpointing: keeping every block's
    input only is ~9x less activation memory for the demo GPT at seq 128."""
    import json

    from shardwise.estimate import main

    figures = []
    for name, ac in (("full", None), ("ckpt", {"modules": "blocks"})):
        doc = {"train_batch_size": MICRO, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
        if ac:
            doc["activation_checkpointing"] = ac
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        assert main(["--model", "test_activation_estimate:demo_model", "--world-size", "1", "--config", str(path),
                     "--seq", "128", "--json"]) == 0
        figures.append(json.loads(capsys.readouterr().out)["stages"]["0"]["activations"])
    cfg = GPTConfig.preset("demo", seq_len=128)
    assert figures[0] == pytest.approx(saved_bytes(cfg, torch.float32, 0), rel=0.02)
    assert figures[1] == pytest.approx(saved_bytes(cfg, torch.float32, 1), rel=0.02)
    assert figures[0] > 8 * figures[1]
