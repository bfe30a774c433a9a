"""``shardwise.zero.GatheredParameters``: see and change whole stage-3 parameters outside forward.

Every rank must enter the context with the same parameters (it all-gathers them); a rank that
does not arrive within the communication timeout is named in a :class:`UsageError` instead of
the others hanging. With ``modifier_rank=r``, rank r's values are broadcast on exit and every
rank takes its shard (and fp32 master) from them; without it, changes are discarded. Parameters
that are not sharded by stage 3 (other stages, persistent parameters, plain models) pass
through untouched, so the same code runs at every stage. "Every rank" and ``modifier_rank`` are
about the data-parallel group the parameters are sharded over (``ctx.dp``; the whole job
unless ``initialize(mesh=...)`` split it): ``modifier_rank`` is a rank within that group.

Parameters still being built under ``shardwise.zero.Init`` (before ``shardwise.initialize``) are
held whole on every rank for the duration (one gather each on entry): operations inside read
and write the whole tensor locally, so code that only one rank runs (``if rank == 0:
p.data.zero_()``) does not issue collectives; on exit the same ``modifier_rank`` rule applies.
"""
from __future__ import annotations

from typing import Iterable

import torch

from shardwise.comm.collectives import require_all_ranks
from shardwise.zero.init import InitParameter
from shardwise.zero.stage3 import runtime_of

_WAIT_S = 300.0  # bounded by the process-group timeout (comms_timeout / SHARDWISE_TIMEOUT) when shorter


def _wait_s(group) -> float:
    configured = group.health.timeout_s if group.health is not None else None
    return min(_WAIT_S, configured) if configured else _WAIT_S


class GatheredParameters:
    def __init__(self, params: torch.Tensor | Iterable[torch.Tensor], modifier_rank: int | None = None,
                 fwd_module=None, enabled: bool = True):
        self.params = [params] if isinstance(params, torch.Tensor) else list(params)
        self.modifier_rank = modifier_rank
        self.enabled = enabled
        self._held: dict = {}
        self._init_held: list[InitParameter] = []

    def __enter__(self) -> "GatheredParameters":
        if not self.enabled:
            return self
        stores: set[int] = set()
        for p in self.params:
            if isinstance(p, InitParameter):
                if id(p.store) not in stores:  # aliases (p, p.data) are held once
                    stores.add(id(p.store))
                    self._init_held.append(p)
                continue
            hit = runtime_of(p)
            if hit is not None:
                rt, unit = hit
                units = self._held.setdefault(id(rt), (rt, []))[1]
                if unit not in units:
                    units.append(unit)
        for rt, units in self._held.values():
            units.sort(key=lambda u: u.index)  # the same gather order on every rank
            require_all_ranks(rt.dp, "shardwise.zero.GatheredParameters", _wait_s(rt.dp))
            rt.hold(units)
        if self._init_held:
            dp = self._init_held[0].ctx.dp
            require_all_ranks(dp, "shardwise.zero.GatheredParameters", _wait_s(dp))
            for p in self._init_held:
                p.hold()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for rt, units in self._held.values():
            rt.unhold(units, None if exc_type is not None else self.modifier_rank)
        self._held = {}
        for p in self._init_held:
            p.release(None if exc_type is not None else self.modifier_rank)
        self._init_held = []


__all__ = ["GatheredParameters"]
