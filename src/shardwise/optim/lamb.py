"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning") with DeepSpeed's
``FusedLamb`` parameters and arithmetic, including over flat buffers that hold many tensors.

[Note: LAMB arithmetic]
Per model tensor ``w`` with gradient ``g`` at step ``t`` (as DeepSpeed's fused kernel):
``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``;
``u = m / (sqrt(v) + eps) + weight_decay * w`` (``sqrt(v + eps)`` with ``eps_inside_sqrt``);
``ratio = clamp(||w|| / ||u||, min_coeff, max_coeff)``, or 1 when either norm is 0;
``w -= lr * c * ratio * u`` with ``c = sqrt(1 - b2^t) / (1 - b1^t)`` (``bias_correction``),
else 1. ``m``, ``v`` are not bias-corrected themselves, and ``u`` (whose norm the ratio uses)
is the uncorrected update with the decay term, as in DeepSpeed.

[Note: LAMB over flat buffers]
The trust ratio belongs to each *model* tensor. shardwise's optimizer never steps model
tensors: it steps one flat tensor per bucket (the whole bucket at stage 0, this rank's chunk
of it at stages 1-3), each holding pieces of many parameters. A LAMB that took each flat
tensor as one tensor would compute one ratio per bucket: not LAMB. So a flat tensor can be
*bound* to its layout (:meth:`Lamb.bind_flat`): the pieces ``(tensor id, start, numel)`` it
holds. Squared norms of ``w`` and ``u`` are summed per piece; when the tensors are split over
ranks (a chunk holds part of a parameter), ``reduce`` (a sum over the ranks, e.g. an
all-reduce on the data-parallel group) completes them: one collective per ``step()`` for all
bound tensors together, in bind order, so every rank must bind the same buckets in the same
order and call ``step()`` together (a bucket without gradient contributes zeros). Elements in
no piece (padding) are stepped with ratio 1 (their update is 0). Unbound tensors are model
tensors of their own, as in any torch optimizer. :func:`bind_flat_chunks` binds the engine's
:class:`~shardwise.zero.sharded_optimizer.OptimizerChunk` objects.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from shardwise.errors import UsageError


@dataclass(frozen=True)
class FlatPieces:
    """Which model tensors a flat optimizer tensor holds: ``pieces[i] = (tensor id, start,
    numel)`` (sorted by start, not overlapping), tensor ids ``0 <= id < count``; the ids are
    what ``reduce`` sums over ranks, so equal ids on two ranks mean the same model tensor."""

    pieces: tuple[tuple[int, int, int], ...]
    count: int


def flat_pieces(slots: Iterable, lo: int, hi: int) -> FlatPieces:
    """The pieces of a flat tensor covering ``[lo, hi)`` of a buffer laid out by ``slots``
    (objects with ``offset`` and ``numel``, as :class:`~shardwise.comm.buckets.BucketLayout`'s);
    the slot index is the tensor id."""
    slots = list(slots)
    pieces = []
    for i, s in enumerate(slots):
        a, b = max(lo, s.offset), min(hi, s.offset + s.numel)
        if a < b:
            pieces.append((i, a - lo, b - a))
    return FlatPieces(tuple(sorted(pieces, key=lambda p: p[1])), len(slots))


class Lamb(torch.optim.Optimizer):
    """LAMB with DeepSpeed ``FusedLamb``'s parameters (see [Note: LAMB arithmetic]).

    ``max_grad_norm`` must be 0 (clip with the top-level ``gradient_clipping``) and
    ``amsgrad`` False, as DeepSpeed's FusedLamb has no AMSGrad either.
    """

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 eps_inside_sqrt: bool = False, weight_decay: float = 0.0, max_grad_norm: float = 0.0,
                 max_coeff: float = 10.0, min_coeff: float = 0.01, amsgrad: bool = False):
        if not lr >= 0.0:
            raise ValueError(f"Lamb: invalid learning rate {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Lamb: invalid eps {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lamb: betas must be two numbers in [0, 1), got {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Lamb: invalid weight_decay {weight_decay}")
        if not 0.0 < min_coeff <= max_coeff:
            raise ValueError(f"Lamb: need 0 < min_coeff <= max_coeff, got {min_coeff}, {max_coeff}")
        if amsgrad:
            raise ValueError("Lamb: amsgrad is not supported (nor by DeepSpeed's FusedLamb)")
        if max_grad_norm:
            raise ValueError("Lamb: max_grad_norm is not applied by the optimizer; clip with the "
                             "top-level 'gradient_clipping' instead")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        eps_inside_sqrt=eps_inside_sqrt, weight_decay=weight_decay,
                        max_coeff=max_coeff, min_coeff=min_coeff)
        super().__init__(params, defaults)
        self._flat: dict[torch.Tensor, FlatPieces] = {}  # bound flat tensors, in bind order
        self._reduce: Callable[[torch.Tensor], None] | None = None

    # -- flat buffers ([Note: LAMB over flat buffers]) -------------------------------------------
    def bind_flat(self, param: torch.Tensor, pieces: FlatPieces) -> None:
        """Declare that ``param`` (one of this optimizer's tensors) holds ``pieces``."""
        if not any(param is p for g in self.param_groups for p in g["params"]):
            raise UsageError("Lamb.bind_flat: the tensor is not one of this optimizer's parameters")
        end = 0
        for tid, start, n in pieces.pieces:
            if not (0 <= tid < pieces.count) or start < end or n <= 0 or start + n > param.numel():
                raise UsageError(f"Lamb.bind_flat: bad piece {(tid, start, n)} for a tensor of "
                                 f"{param.numel()} elements (pieces must be sorted, disjoint, inside it)")
            end = start + n
        self._flat[param] = pieces
        self._constructed_with.add(id(param))

    def set_norm_reduce(self, reduce: Callable[[torch.Tensor], None] | None) -> None:
        """``reduce(t)`` sums the fp32 tensor ``t`` in place over the ranks that share the bound
        tensors (None: nothing to sum, every bound tensor holds whole model tensors)."""
        self._reduce = reduce

    # -- the step --------------------------------------------------------------------------------
    def _lengths(self, p: torch.Tensor) -> tuple[list[int], list[int]]:
        """(segment lengths covering p, tensor id per segment or -1 for gaps)."""
        bound = self._flat.get(p)
        if bound is None:
            return [p.numel()], [0]
        lengths, ids, at = [], [], 0
        for tid, start, n in bound.pieces:
            if start > at:
                lengths.append(start - at)
                ids.append(-1)
            lengths.append(n)
            ids.append(tid)
            at = start + n
        if at < p.numel():
            lengths.append(p.numel() - at)
            ids.append(-1)
        return lengths, ids

    @staticmethod
    def _update(p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        v = state["exp_avg_sq"]
        denom = (v + group["eps"]).sqrt_() if group["eps_inside_sqrt"] else v.sqrt().add_(group["eps"])
        update = state["exp_avg"] / denom
        if group["weight_decay"]:
            update.add_(p, alpha=group["weight_decay"])
        return update

    def _sums(self, p: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """[2, count] squared norms (w, u) per tensor id of p's pieces (fp32)."""
        lengths, ids = self._lengths(p)
        count = self._flat[p].count if p in self._flat else 1
        out = torch.zeros(2, count, dtype=torch.float32, device=p.device)
        keep = [i for i, t in enumerate(ids) if t >= 0]
        if keep:
            w = [v for i, v in enumerate(p.detach().reshape(-1).split(lengths)) if ids[i] >= 0]
            u = [v for i, v in enumerate(update.reshape(-1).split(lengths)) if ids[i] >= 0]
            norms = torch.stack([torch.stack(torch._foreach_norm(x, 2.0, dtype=torch.float32)) for x in (w, u)])
            index = torch.tensor([ids[i] for i in keep], device=p.device)
            out.index_add_(1, index, norms.square())
        return out

    def _apply(self, p: torch.Tensor, update: torch.Tensor, sums: torch.Tensor, group: dict, step: int) -> None:
        lengths, ids = self._lengths(p)
        w, u = sums[0].sqrt(), sums[1].sqrt()
        ratio = torch.where((w > 0) & (u > 0), (w / u.clamp_min(1e-38)).clamp(group["min_coeff"], group["max_coeff"]),
                            torch.ones_like(w))
        ratio = torch.cat([ratio, ratio.new_ones(1)])  # index -1 (gaps, padding): ratio 1
        per_segment = ratio[torch.tensor(ids, device=p.device)].to(update.dtype)
        if len(ids) > 1:
            per_segment = per_segment.repeat_interleave(torch.tensor(lengths, device=p.device), output_size=p.numel())
        update.mul_(per_segment.view_as(update) if len(ids) > 1 else per_segment)
        b1, b2 = group["betas"]
        scale = math.sqrt(1 - b2 ** step) / (1 - b1 ** step) if group["bias_correction"] else 1.0
        p.add_(update, alpha=-group["lr"] * scale)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self.__dict__.setdefault("_constructed_with", set()).update(id(p) for p in self.param_groups[-1]["params"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        reducing = self._reduce is not None and bool(self._flat)
        pending: dict[torch.Tensor, tuple[dict, int]] = {}
        sums: dict[torch.Tensor, torch.Tensor] = {}
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if id(p) not in self._constructed_with:
                    raise UsageError(
                        "Lamb: its param groups were given other tensors after it was built (shardwise.initialize "
                        "re-points a client optimizer to its flat buckets): the per-tensor trust ratio would be "
                        "computed per bucket. Use the config's optimizer {\"type\": \"Lamb\"} instead of "
                        "optimizer=Lamb(...), or bind the flat tensors (Lamb.bind_flat)")
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise UsageError("Lamb does not take sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                g = p.grad.to(p.dtype)
                state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                update = self._update(p, state, group)
                s = self._sums(p, update)
                if reducing and p in self._flat:
                    sums[p] = s  # the update is recomputed after the reduce (no second copy kept)
                    pending[p] = (group, int(state["step"].item()))
                else:
                    self._apply(p, update, s, group, int(state["step"].item()))
        if reducing:
            parts = [sums[p] if p in sums else torch.zeros(2, fp.count, dtype=torch.float32, device=p.device)
                     for p, fp in self._flat.items()]
            flat = torch.cat([t.reshape(-1) for t in parts])
            self._reduce(flat)
            at = 0
            for p, fp in self._flat.items():
                n = 2 * fp.count
                if p in pending:
                    group, step = pending[p]
                    self._apply(p, self._update(p, self.state[p], group), flat[at:at + n].view(2, fp.count), group, step)
                at += n
        return loss


def bind_flat_chunks(optimizer: torch.optim.Optimizer, chunks: Sequence, reduce: Callable[[torch.Tensor], None] | None
                     ) -> None:
    """Bind each trainable chunk's ``opt_param`` to its bucket layout (``chunk.layout.slots``,
    ``chunk.lo``/``chunk.hi``) when ``optimizer`` is a :class:`Lamb`; ``reduce`` sums over the
    data-parallel group when the chunks are parts of buckets (stages 1-3). No-op otherwise."""
    if not isinstance(optimizer, Lamb):
        return
    for c in chunks:
        if c.opt_param is not None:
            optimizer.bind_flat(c.opt_param, flat_pieces(c.layout.slots, c.lo, c.hi))
    optimizer.set_norm_reduce(reduce)
