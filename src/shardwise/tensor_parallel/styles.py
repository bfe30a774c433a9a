"""The DTensor ``ParallelStyle`` for each plan style ([Note: tp plans] in plans.py).

torch's ``ColwiseParallel`` / ``RowwiseParallel`` handle ``nn.Linear`` and ``nn.Embedding``;
the subclasses here add Hugging Face's ``Conv1D`` (weight ``[in, out]``: a column shard is
``Shard(1)`` of the weight, a row shard ``Shard(0)``), and otherwise defer to torch.
"""
from __future__ import annotations

from functools import partial

import torch.nn as nn
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel

from shardwise.tensor_parallel.plans import is_conv1d


def _shard_conv1d(weight_dim: int, bias_placement, name, module, device_mesh) -> None:
    module.register_parameter("weight", nn.Parameter(
        distribute_tensor(module.weight, device_mesh, [Shard(weight_dim)]),
        requires_grad=module.weight.requires_grad))
    if getattr(module, "bias", None) is not None:
        module.register_parameter("bias", nn.Parameter(
            distribute_tensor(module.bias, device_mesh, [bias_placement]),
            requires_grad=module.bias.requires_grad))


class Colwise(ColwiseParallel):
    """``ColwiseParallel``, also for ``Conv1D`` (output features = weight dim 1)."""

    def _apply(self, module: nn.Module, device_mesh):
        if not is_conv1d(module):
            return super()._apply(module, device_mesh)
        return distribute_module(
            module, device_mesh, partial(_shard_conv1d, 1, Shard(0)),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class Rowwise(RowwiseParallel):
    """``RowwiseParallel``, also for ``Conv1D`` (input features = weight dim 0)."""

    def _apply(self, module: nn.Module, device_mesh):
        if not is_conv1d(module):
            return super()._apply(module, device_mesh)
        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(
            module, device_mesh, partial(_shard_conv1d, 0, Replicate()),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


def make_style(style: str, module: nn.Module, sequence_parallel: bool) -> ParallelStyle | None:
    """The ParallelStyle for one planned module; None for ``replicate``. With
    ``sequence_parallel`` the residual stream between blocks is sharded on dim 1 (sequence)."""
    seq = Shard(1)
    stream = seq if sequence_parallel else Replicate()
    if style == "replicate":
        return None
    if style == "sequence_parallel":
        return SequenceParallel()
    if isinstance(module, nn.Embedding):
        stream_in = Replicate()  # token indices are whole on every rank
    else:
        stream_in = stream
    if style == "colwise":
        return Colwise(input_layouts=stream_in)
    if style == "colwise_gather_output":
        return Colwise(input_layouts=stream_in, output_layouts=Replicate())
    if style == "rowwise":
        if isinstance(module, nn.Embedding):  # vocabulary-parallel: whole index input
            return Rowwise(input_layouts=Replicate(), output_layouts=stream)
        return Rowwise(output_layouts=stream)
    if style == "rowwise_from_replicated":  # input replicated: keep the local slice of it
        return Rowwise(input_layouts=Replicate(), output_layouts=stream)
    raise ValueError(style)


def sharded_dims(style: str, module: nn.Module) -> list[tuple[str, int]]:
    """(what, size) of each dimension ``style`` splits over tp (checked for divisibility)."""
    if style in ("colwise", "colwise_gather_output"):
        if isinstance(module, nn.Linear):
            return [("out_features", module.out_features)]
        if isinstance(module, nn.Embedding):
            return [("embedding_dim", module.embedding_dim)]
        if is_conv1d(module):
            return [("nf (output features)", int(module.weight.shape[1]))]
    if style in ("rowwise", "rowwise_from_replicated"):
        if isinstance(module, nn.Linear):
            return [("in_features", module.in_features)]
        if isinstance(module, nn.Embedding):
            return [("num_embeddings", module.num_embeddings)]
        if is_conv1d(module):
            return [("input features", int(module.weight.shape[0]))]
    return []
