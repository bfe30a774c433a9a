"""``load_checkpoint``: read, verify and re-partition a checkpoint for this engine's layout.

[Note: load in two phases]
Phase 1 (every rank, nothing touched): resolve the tag (rank 0 reads ``latest``, every rank
gets its answer), check the manifest (format version, own checksum, every field: [Note:
manifest validation]), every shard file's size and header against the manifest ([Note: files
agree with the manifest]), that the saved tensors match the model (names, shapes) and, for the
parts this rank needs, each piece's crc32; the new state is assembled in fresh buffers, and
everything phase 2 will hand to the loss scaler, LR scheduler, param groups, RNGs and data
loader is checked against what they hold now (same keys, types and lengths; RNG states tried
on scratch generators). The outcome of every rank is all-gathered: if any rank failed, *every*
rank raises the same :class:`CheckpointError` and no rank has changed anything. Phase 2 copies
the buffers into the live parameters, master weights and optimizer state (both phases are
the strategy's ``load_pieces``: [Note: state pieces]) and restores
counters, loss scaler, LR scheduler, RNG and the data loader's position; it cannot meet bad
input, and its outcome is all-gathered too, so no rank reports success while another failed.

Phase 1 is agreed twice: once the manifest, the files and the client state are verified (so
every rank knows the checkpoint is sound before the next step), then after the pieces are
staged. In between, with ``load_module_strict=False`` ([Note: lenient module load]), the
current values of the tensors the checkpoint lacks are read (a collective at stage 3).

[Note: lenient module load]
DeepSpeed's ``load_module_strict``: with True (the default) the checkpoint's tensor names must
be the model's. With False, names only the checkpoint has are ignored and names only the model
has keep their current values (stage 3 gathers them first, every rank alike: the lists follow
from the verified manifest and the model, the same on every rank); both lists are logged as a
warning. A trainable parameter the checkpoint lacks gets a fresh (zero) optimizer state; its
master weight is re-made from the parameter's current value (the compute dtype under
bf16/fp16). Shapes must still agree. A checkpoint saved with ``exclude_frozen_parameters=True``
lacks the frozen parameters, so, as in DeepSpeed, it needs ``load_module_strict=False``, which
keeps the model's values for them. The strategy's ``load_pieces`` reads through
:class:`_Lenient`, which answers for the missing names.
"""
from __future__ import annotations

import base64
import binascii
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

from shardwise.checkpoint import client_state as CS
from shardwise.checkpoint import manifest as M
from shardwise.checkpoint import rng
from shardwise.checkpoint.files import dtype_from_name
from shardwise.checkpoint.reader import PieceReader, layout_text, verify_files
from shardwise.checkpoint.agree import outcome, raise_failed
from shardwise.checkpoint.save import join_timeout, require_one_replica
from shardwise.comm.collectives import all_gather_object, broadcast_object, require_all_ranks
from shardwise.errors import CheckpointError, UsageError
from shardwise.checkpoint import nd as ND
from shardwise.zero.pieces import PARAM, is_dtensor, mesh_size, regions, state_names

log = logging.getLogger("shardwise")


@dataclass
class _Staged:
    manifest: dict
    install: Callable[[], None]  # phase 2 of the strategy's load_pieces
    client_state: Any = None


@dataclass
class _Verified:
    """Phase 1a's result: the checkpoint is sound; what the model and it disagree on."""

    manifest: dict
    client_state: Any
    missing: list[str]  # canonical model names the checkpoint lacks (kept at their current values)
    unexpected: list[str]  # names only the checkpoint has (ignored)


def is_stage(engine) -> bool:
    """The engine's module is one pipeline stage (it holds a subset of the model's names)."""
    return mesh_size(engine.ctx, "pp") > 1


def _layout(m: dict) -> str:
    return layout_text(m)


def _check_optimizer(engine, m: dict) -> None:
    """With optimizer state: the same optimizer class and number of param groups. (The
    tensors themselves are checked by the strategy's load_pieces.)"""
    if m["optimizer"] != type(engine.optimizer).__name__:
        raise CheckpointError(
            f"the checkpoint's optimizer state is for {m['optimizer']}, the engine uses "
            f"{type(engine.optimizer).__name__}; pass load_optimizer_states=False to load the "
            "weights only")
    if len(m["param_groups"]) != len(engine.optimizer.param_groups):
        raise CheckpointError(f"the checkpoint has {len(m['param_groups'])} optimizer param groups, "
                              f"the engine has {len(engine.optimizer.param_groups)}; pass "
                              "load_optimizer_states=False to load the weights only")


def _same_shape(saved: Any, current: Any, where: str, out: list[str]) -> None:
    """Problems (appended to ``out``) if ``saved`` (JSON) cannot stand in for ``current``."""
    if isinstance(current, torch.Tensor) and current.numel() == 1:
        current = current.item()
    if isinstance(current, bool) or current is None or isinstance(current, str):
        if type(saved) is not type(current):
            out.append(f"{where}: saved {saved!r:.40}, expected a {type(current).__name__}")
    elif isinstance(current, (int, float)):
        if isinstance(saved, bool) or not isinstance(saved, (int, float)) or \
                (isinstance(current, int) and not isinstance(saved, int)):
            out.append(f"{where}: saved {saved!r:.40}, expected a number ({type(current).__name__})")
    elif isinstance(current, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(current):
            out.append(f"{where}: saved {saved!r:.40}, expected a list of {len(current)}")
        else:
            for i, (s, c) in enumerate(zip(saved, current)):
                _same_shape(s, c, f"{where}[{i}]", out)
    elif isinstance(current, dict):
        if not isinstance(saved, dict):
            out.append(f"{where}: saved {saved!r:.40}, expected a mapping")
            return
        for k in current:
            if k in saved:
                _same_shape(saved[k], current[k], f"{where}.{k}", out)
    else:
        out.append(f"{where}: holds a {type(current).__name__}, which a checkpoint does not restore")


def _check_scheduler(sched, saved: dict, out: list[str]) -> None:
    current = sched.state_dict()
    public = {k for k in current if not k.startswith("_")}
    missing = sorted(public - set(saved))
    unknown = sorted(k for k in set(saved) - set(current) if not k.startswith("_") or hasattr(type(sched), k))
    if missing or unknown:
        out.append(f"lr_scheduler: the saved state of {type(sched).__name__} lacks {missing} / has unknown "
                   f"keys {unknown}")
    _same_shape(saved, current, "lr_scheduler", out)


def _check_rng(state: dict, where: str, out: list[str]) -> None:
    """Try ``state`` on scratch generators: phase 2's rng.restore cannot then fail."""
    try:
        version, py, gauss = state["python"]
        random.Random().setstate((version, tuple(py), gauss))
        torch.Generator().set_state(torch.tensor(list(base64.b64decode(state["torch"], validate=True)),
                                                 dtype=torch.uint8))
        if state.get("numpy") is not None and rng._has_numpy():
            import numpy as np

            name, keys, pos, has_gauss, cached = state["numpy"]
            np.random.RandomState().set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        for s in state.get("cuda") or []:
            base64.b64decode(s, validate=True)
    except (TypeError, ValueError, RuntimeError, OverflowError, binascii.Error) as exc:
        out.append(f"{where}: not a random-number-generator state this process can restore ({exc})")


def _check_state(engine, m: dict, with_optimizer: bool, module_only: bool, with_scheduler: bool) -> None:
    """Everything phase 2 hands over besides tensors, checked against what is live now."""
    out: list[str] = []
    if with_optimizer:
        for i, (group, saved) in enumerate(zip(engine.optimizer.param_groups, m["param_groups"])):
            for k, v in saved.items():
                if k != "params" and k in group:
                    _same_shape(v, group[k], f"param_groups[{i}].{k}", out)
    if not module_only:  # (the loss scaler's state is checked by the strategy's load_pieces)
        sched = engine.lr_scheduler
        if with_scheduler and sched is not None and m["lr_scheduler"] is not None:
            _check_scheduler(sched, m["lr_scheduler"], out)
        rank = engine.ctx.rank  # one entry per saving rank of the mesh
        if rank < len(m["ranks"]):
            _check_rng(m["ranks"][rank]["rng"], f"ranks[{rank}].rng", out)
        loader = getattr(engine, "training_dataloader", None)
        k = min(rank, len(m["ranks"]) - 1)
        saved_loader = m["ranks"][k]["data_loader"]
        if loader is not None and saved_loader and hasattr(loader, "state_dict"):
            _same_shape(saved_loader, loader.state_dict(), f"ranks[{k}].data_loader", out)
            if saved_loader.get("generator"):
                try:
                    raw = base64.b64decode(saved_loader["generator"], validate=True)
                    torch.Generator().set_state(torch.tensor(list(raw), dtype=torch.uint8))
                except (ValueError, RuntimeError, binascii.Error) as exc:
                    out.append(f"ranks[{k}].data_loader.generator: not a generator state ({exc})")
    if out:
        raise CheckpointError(f"the checkpoint's training state does not fit this engine: {'; '.join(out[:8])}"
                              f"{' ...' if len(out) > 8 else ''}. Pass load_module_only=True to load the weights "
                              "only, or load another checkpoint")


def _verify(engine, path: str, strict: bool) -> _Verified:
    """Phase 1a (no collective): manifest, files and client state verified; the model's names
    against the checkpoint's ([Note: lenient module load])."""
    m = M.read_manifest(path)
    M.check_files(path, m)
    verify_files(path, m)
    client = CS.load(path, m)
    canonical, own_aliases = state_names(engine.module)
    saved = m["tensors"]
    aliases = m.get("aliases") or {}
    missing = [n for n in canonical if n not in saved and aliases.get(n) not in saved]
    # a pipeline stage's module holds its stage's names only ([Note: pieces on a mesh])
    reached = set(canonical) | {aliases[n] for n in canonical if n in aliases} | \
        {t for a, t in aliases.items() if a in own_aliases}
    unexpected = [] if is_stage(engine) else [n for n in saved if n not in reached]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"not in the model: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        excluded = sorted(set(missing) & set(m.get("excluded") or []))
        why = (f" The checkpoint was saved with exclude_frozen_parameters=True (it lacks {excluded[:8]}): pass "
               "load_module_strict=False to keep the model's current values for them." if excluded else
               " Pass load_module_strict=False to load the tensors both have (the model's others keep their "
               "current values), or load a checkpoint of this model.")
        raise CheckpointError(f"the checkpoint does not match the model ({_layout(m)}; loading at world size "
                              f"{engine.ctx.dp.size}, ZeRO stage {engine.strategy.stage}): " + " | ".join(parts)
                              + "." + why)
    return _Verified(m, client, missing, unexpected)


def _current_values(module, names: list[str]) -> dict[str, torch.Tensor]:
    """The current values of ``names`` (flattened CPU copies). Stage-3 parameters are gathered
    for it: every rank calls this with the same names."""
    from shardwise.zero.gathered import GatheredParameters
    from shardwise.zero.sharded_params import ShardedParameter

    canonical, _ = state_names(module)
    sharded = [canonical[n] for n in names if isinstance(canonical[n], ShardedParameter)]
    with GatheredParameters(sharded):
        whole, _ = state_names(module)  # inside: the module holds the gathered tensors
        # a DTensor (tensor parallel) whole over tp: every tp rank has the same names
        return {n: (whole[n].full_tensor() if is_dtensor(whole[n]) else whole[n]).detach().reshape(-1).cpu().clone()
                for n in names}


class _Lenient:
    """The checkpoint as ``load_pieces`` sees it with ``load_module_strict=False`` (a
    ``PieceSource``, [Note: lenient module load]): the names only the checkpoint has are left
    out, the names only the model has are answered from ``current`` (their values; zeros for
    their optimizer state)."""

    def __init__(self, reader: PieceReader, engine, missing: list[str], unexpected: list[str],
                 current: dict[str, torch.Tensor]):
        self.reader, self.layout, self.current = reader, reader.layout, current
        self.aliases, self.partial = reader.aliases, reader.partial
        saved = {k: v for k, v in reader.tensors.items() if k not in set(unexpected)}
        groups = {r.name: r.group for r in regions(engine.module, engine.strategy.buckets)}
        by_group: dict[int, dict] = {}
        for entry in saved.values():  # a missing parameter takes the state kinds of its group's others
            if entry["trainable"]:
                by_group.setdefault(entry["group"], entry)
        canonical, _ = state_names(engine.module)
        self._state_dtype: dict[str, torch.dtype] = {}
        for name in missing:
            group = groups.get(name)
            mate = by_group.get(group, {}) if group is not None else {}
            dtype = str(canonical[name].dtype).removeprefix("torch.")
            saved[name] = {"shape": list(canonical[name].shape), "dtype": dtype, "saved_dtype": dtype,
                           "trainable": group is not None, "group": group,
                           "optimizer_state": list(mate.get("optimizer_state", [])),
                           "optimizer_scalars": dict(mate.get("optimizer_scalars", {})),
                           "state_dtypes": dict(mate.get("state_dtypes") or {}), "pieces": []}
            self._state_dtype[name] = dtype_from_name(mate["saved_dtype"]) if mate else torch.float32
        self._tensors = saved

    @property
    def tensors(self) -> dict[str, dict]:
        return self._tensors

    def read(self, name: str, kind: str, a: int, b: int, block=None) -> torch.Tensor:
        if name not in self.current:
            return self.reader.read(name, kind, a, b, block)
        if kind == PARAM:
            flat = self.current[name]
            if block is None:
                return flat[a:b].clone()
            shape = self._tensors[name]["shape"]
            return ND.assemble(f"param {name!r} of the model", shape, ND.Region(block[0], block[1], a, b),
                               [ND.Region.whole(shape)], lambda _: flat, flat.dtype)
        entry = self._tensors[name]
        dtype = dtype_from_name(entry["state_dtypes"][kind]) if kind in entry["state_dtypes"] else \
            self._state_dtype[name]
        return torch.zeros(b - a, dtype=dtype)


def _stage(engine, path: str, with_optimizer: bool, module_only: bool = False,
           with_scheduler: bool = True, verified: _Verified | None = None,
           current: tuple[bool, Any] = (True, {})) -> _Staged:
    if verified is None:
        verified = _verify(engine, path, strict=True)
    if not current[0]:
        raise CheckpointError(f"reading the current values of {verified.missing[:8]} failed: {current[1]}")
    m = verified.manifest
    if with_optimizer:
        _check_optimizer(engine, m)
    with PieceReader(path, m) as reader:  # [Note: state pieces]: the strategy reads what its layout needs
        reader.partial = is_stage(engine)
        source = reader if not (verified.missing or verified.unexpected) else \
            _Lenient(reader, engine, verified.missing, verified.unexpected, current[1])
        install = engine.strategy.load_pieces(engine.module, source, optimizer=with_optimizer,
                                              scalar_state=None if module_only else m["loss_scaler"])
    _check_state(engine, m, with_optimizer, module_only, with_scheduler)
    return _Staged(m, install, verified.client_state)


def _restore_groups(optimizer, saved_groups: list[dict]) -> None:
    for group, saved in zip(optimizer.param_groups, saved_groups):
        for k, v in saved.items():
            if k not in group or k == "params":
                continue
            cur = group[k]
            if isinstance(cur, torch.Tensor):
                cur.fill_(v)
            elif isinstance(cur, tuple) and isinstance(v, list):
                group[k] = tuple(v)
            else:
                group[k] = v


@torch.no_grad()
def _apply(engine, staged: _Staged, with_optimizer: bool, module_only: bool, with_scheduler: bool) -> None:
    m = staged.manifest
    staged.install()  # parameters, masters, optimizer state, loss scaler (module_only: not the scaler)
    if with_optimizer:
        _restore_groups(engine.optimizer, m["param_groups"])
    if module_only:
        return
    c = m["counters"]
    engine.global_steps, engine.global_samples = c["global_steps"], c["global_samples"]
    engine.skipped_steps, engine.micro_steps = c["skipped_steps"], c["micro_steps"]
    if with_scheduler and engine.lr_scheduler is not None and m["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(m["lr_scheduler"])
    rank = engine.ctx.rank
    if rank < len(m["ranks"]):
        rng.restore(m["ranks"][rank]["rng"])
    loader = getattr(engine, "training_dataloader", None)
    saved_loader = m["ranks"][min(rank, len(m["ranks"]) - 1)].get("data_loader")
    if loader is not None and saved_loader and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(saved_loader)


def _resolve(load_dir: str, tag: str | None) -> tuple[str, str] | None:
    """Rank 0: ``(tag, path)``, or None when ``tag`` is None and ``load_dir`` holds no checkpoint
    at all (DeepSpeed's ``(None, None)``)."""
    if tag is None and M.holds_nothing(load_dir):
        return None
    return M.resolve(load_dir, tag)


def load_checkpoint(engine, load_dir, tag: str | int | None = None, load_module_strict: bool = True,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False, custom_load_fn: Callable | None = None):
    """Load ``<load_dir>/<tag>`` (``latest`` when tag is None) into the engine; call on every
    rank. Returns ``(path, client_state)``, or ``(None, None)`` with a warning when ``tag`` is
    None and ``load_dir`` holds no checkpoint at all (missing, empty: no ``latest`` and no
    committed tag), as DeepSpeed does; a ``latest`` or tag that is broken is a
    :class:`CheckpointError`. ``load_module_strict=False``: see [Note: lenient module load].
    See [Note: load in two phases]."""
    if custom_load_fn is not None:
        raise UsageError(
            "load_checkpoint(custom_load_fn=...) is not supported: shardwise writes the checkpoint into its "
            "sharded storage itself. Use load_module_strict=False (tensors only one side has are skipped / kept), "
            "or build the state dict you want from shardwise.utils.zero_to_fp32.get_fp32_state_dict_from_zero_"
            "checkpoint(load_dir) (or shardwise.checkpoint.consolidate), apply your function to it and load it "
            "into the model before shardwise.initialize")
    require_one_replica(engine.ctx, "load_checkpoint")
    ctx = engine.ctx.world  # == ctx.dp with one replica group
    load_dir = os.fspath(load_dir)
    tag = M.normalize_tag(tag)
    require_all_ranks(ctx, "load_checkpoint", join_timeout(ctx), CheckpointError)
    resolved = outcome(lambda: _resolve(load_dir, tag)) if ctx.rank == 0 else None
    resolved = broadcast_object(resolved, ctx)
    if not resolved[0]:
        raise CheckpointError(resolved[1])
    if resolved[1] is None:
        log.warning("load_checkpoint: %s holds no checkpoint (no `latest` file and no committed tag); nothing "
                    "was loaded, returning (None, None). Pass tag=... or another directory to load one",
                    os.path.abspath(load_dir))
        return None, None
    tag, path = resolved[1]
    with_optimizer = load_optimizer_states and not load_module_only
    strict = bool(load_module_strict)
    mine = outcome(lambda: _verify(engine, path, strict))
    agreed = all_gather_object((mine[0], None if mine[0] else mine[1]), ctx)
    if not all(ok for ok, _ in agreed):
        raise_failed(agreed, f"loading checkpoint {path}", "no rank's state was changed")
    verified: _Verified = mine[1]
    current = outcome(lambda: _current_values(engine.module, verified.missing)) if verified.missing else (True, {})
    mine = outcome(lambda: _stage(engine, path, with_optimizer, load_module_only, load_lr_scheduler_states,
                                  verified, current))
    agreed = all_gather_object((mine[0], None if mine[0] else mine[1]), ctx)
    if not all(ok for ok, _ in agreed):
        raise_failed(agreed, f"loading checkpoint {path}", "no rank's state was changed")
    staged: _Staged = mine[1]
    applied = outcome(lambda: _apply(engine, staged, with_optimizer, load_module_only, load_lr_scheduler_states))
    raise_failed(all_gather_object(applied, ctx), f"applying checkpoint {path}",
                 "this is a bug (phase 1 accepted the checkpoint): the engine's state may be partly loaded; "
                 "load a checkpoint again before training")
    m = staged.manifest
    if verified.missing or verified.unexpected:
        excluded = set(m.get("excluded") or [])
        kept = [n for n in verified.missing if n not in excluded]
        log.warning("load_checkpoint(load_module_strict=False) %s: missing from the checkpoint, kept at the model's "
                    "current values: %s%s; in the checkpoint but not in the model, ignored: %s", path, kept,
                    f" (and {len(verified.missing) - len(kept)} frozen parameters the save excluded)"
                    if len(kept) != len(verified.missing) else "", verified.unexpected)
    if m["world_size"] != ctx.size or m["zero_stage"] != engine.strategy.stage:
        log.info("checkpoint %s (%s) re-partitioned for world size %d, ZeRO stage %d", path, _layout(m),
                 ctx.size, engine.strategy.stage)
    return path, staged.client_state
