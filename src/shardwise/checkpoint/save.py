"""``save_checkpoint``: every rank writes its shard, all agree, rank 0 commits.

[Note: checkpoint commit protocol]
1. *Join*: a monitored barrier with a bounded wait. A rank that never calls
   ``save_checkpoint`` is named in a :class:`CheckpointError` instead of a hang.
2. *Agree on the tag* (all-gather): different tags, or an unusable one, fail on every rank.
3. *Prepare* (rank 0, result broadcast): encode ``client_state`` ([Note: client state]; an
   object it cannot store fails here, before anything is touched), create ``save_dir``, remove
   stale ``.tmp-*`` / ``.trash-*`` leftovers of interrupted saves, create
   ``<save_dir>/.tmp-<tag>``, write client_state's tensors there, check the LR scheduler's
   state is JSON.
4. *Write* (every rank): the pieces its strategy holds (``strategy.state_pieces``, [Note:
   state pieces]) as its ``rank{r}.safetensors`` into the temporary directory, fsync file
   and directory. Errors (disk full, ...) are caught, not raised yet.
5. *Agree* (all-gather of each rank's outcome): if any rank failed, rank 0 removes the
   temporary directory and every rank raises the same error naming the failed ranks, paths
   and bytes. Nothing was committed; retention did not run.
6. *Commit* (rank 0, result broadcast): merge the manifest from every rank's piece
   descriptions (gathered in step 5; [Note: manifest from every rank's pieces]) and validate
   it; write ``manifest.json`` last and fsync it; fsync the
   directory; rename it to ``<save_dir>/<tag>`` (an existing tag is moved aside first);
   fsync ``save_dir``; replace ``latest`` atomically; apply ``checkpoint.keep_last``
   (oldest first, never the new checkpoint). A crash anywhere before the rename leaves only
   a ``.tmp-`` directory (ignored, cleaned at the next save); between the rename and the
   ``latest`` update, ``latest`` still names the previous checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from shardwise.checkpoint import client_state as CS
from shardwise.checkpoint import manifest as M
from shardwise.checkpoint import rng
from shardwise.checkpoint.agree import outcome, raise_failed
from shardwise.checkpoint.files import atomic_write_text, dtype_name, fsync_dir, remove_tree, write_safetensors
from shardwise.checkpoint.schema import validate
from shardwise.comm.collectives import all_gather_object, barrier, broadcast_object
from shardwise.errors import CheckpointError, CollectiveError, CollectiveTimeoutError, UsageError
from shardwise.zero.pieces import PARAM, state_names, tied_aliases

log = logging.getLogger("shardwise")

JOIN_TIMEOUT_S = 300.0  # how long save/load_checkpoint wait for every rank to call them


def mesh_shape(ctx) -> dict[str, int]:
    """``{"pp", "dp", "tp"}`` sizes of ``ctx``'s mesh (1 for an absent dimension)."""
    from shardwise.zero.pieces import mesh_size

    return {"pp": mesh_size(ctx, "pp"), "dp": ctx.dp.size, "tp": mesh_size(ctx, "tp")}


def require_one_replica(ctx, call: str) -> None:
    """Checkpoints are written and read by every rank of the mesh (file ``r`` is global rank
    ``r``'s): the dp ranks of each pipeline stage / tensor-parallel shard hold its chunks, the
    pp and tp ranks different parts of the model ([Note: pieces on a mesh]). A mesh with other
    dimensions, which hold independent dp replicas (``initialize(mesh=...)`` with a dim
    besides dp, tp and pp), is refused with a named error, on every rank alike, before any
    collective: which replica's state to keep, and how the others would load it, is not
    decided yet."""
    shape = mesh_shape(ctx)
    if ctx.world_size != shape["pp"] * shape["dp"] * shape["tp"]:
        raise UsageError(
            f"{call}: checkpoints with several data-parallel replica groups are not supported yet (the "
            f"mesh has {ctx.world_size // (shape['pp'] * shape['dp'] * shape['tp'])} groups of "
            f"{shape['pp'] * shape['dp'] * shape['tp']} ranks over dims {list(ctx.dims)}; checkpoints follow the "
            "dims dp, tp and pp). Save from a run whose mesh has only those dimensions, or save the model with "
            "engine.save_16bit_model.")


def join_timeout(ctx) -> float:
    """``JOIN_TIMEOUT_S``, or the process-group timeout (comms_timeout / SHARDWISE_TIMEOUT)
    when that is shorter."""
    configured = ctx.health.timeout_s if ctx.health is not None else None
    return min(JOIN_TIMEOUT_S, configured) if configured else JOIN_TIMEOUT_S
_UNCHANGED = "nothing was committed: `latest` and the previous checkpoints are unchanged"


def _json_ready(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} cannot be saved as JSON ({exc}); checkpoints keep non-tensor "
                              "state as JSON: use numbers, strings, lists and dicts") from None


def _group_options(optimizer) -> list[dict]:
    groups = []
    for g in optimizer.param_groups:
        opts = {}
        for k, v in g.items():
            if k == "params":
                continue
            if hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1:
                v = v.item()
            try:
                opts[k] = json.loads(json.dumps(v))
            except (TypeError, ValueError):
                continue  # not JSON (a callable, a device): re-created by the optimizer itself
        groups.append(opts)
    return groups


def parameter_names(module) -> set[str]:
    """The canonical state-dict names (see ``state_names``) that are parameters, not buffers."""
    canonical, _ = state_names(module)
    ids = {id(p) for _, p in module.named_parameters(remove_duplicate=False)}
    return {n for n, t in canonical.items() if id(t) in ids}


def _write_rank_file(engine, tmp: str, exclude_frozen: bool = False) -> dict:
    """Step 4 on one rank: the pieces its strategy holds ([Note: state pieces]) into its file
    (without frozen parameters when ``exclude_frozen``: those outside every param group).
    Returns what the manifest needs from this rank: each piece's description (no values)."""
    rank = engine.ctx.rank  # one file per rank of the mesh (require_one_replica)
    file = M.shard_file(rank)
    tensors, described = {}, []
    pieces = engine.strategy.state_pieces(engine.module)
    _, aliases = state_names(engine.module)
    tied = tied_aliases(engine.module)  # [Note: pieces on a mesh]
    if exclude_frozen:
        params = parameter_names(engine.module)
        pieces = [p for p in pieces if p.group is not None or p.name not in params]
    for p in pieces:
        if p.key in tensors:
            raise CheckpointError(f"the strategy gave two pieces stored under {p.key!r} on rank {rank}")
        tensors[p.key] = p.tensor
        described.append({"name": p.name, "kind": p.kind, "key": p.key, "shape": list(p.global_shape),
                          "start": p.elements[0], "stop": p.elements[1], "dtype": dtype_name(p.tensor.dtype),
                          "model_dtype": dtype_name(p.model_dtype), "group": p.group, "scalars": dict(p.scalars),
                          "file": file, "rank": rank, "offsets": list(p.block_offsets), "block": list(p.block_shape)})
    seeds = {d["key"]: M.piece_identity(d["name"], d["kind"], d["key"], d["dtype"], d["start"], d["stop"], d["shape"],
                                        offsets=d["offsets"], block=d["block"])
             for d in described}  # [Note: piece identity]
    info = write_safetensors(os.path.join(tmp, file), tensors, rank, {"format": M.FORMAT, "rank": str(rank)},
                             seeds)
    fsync_dir(tmp)
    crcs = info.pop("tensors")
    for d in described:
        d["crc32"] = crcs[d["key"]]
    loader = getattr(engine, "training_dataloader", None)
    params = parameter_names(engine.module)
    return {
        "file": {file: {**info, "rank": rank}},
        "pieces": described,
        "names": {"state_dict_keys": list(engine.module.state_dict().keys()), "aliases": aliases,
                  "tied": tied, "parameters": sorted(params | {a for a, t in aliases.items() if t in params})},
        "rank_state": {"rng": rng.capture(),
                       "data_loader": loader.state_dict() if hasattr(loader, "state_dict") else None},
    }


def merge_pieces(ranks: list[list[dict]], order: list[str]) -> dict[str, dict]:
    """The manifest's ``tensors`` (in ``order``, the module's state-dict order) from every rank's
    piece descriptions ([Note: manifest from every rank's pieces]). The ranks holding pieces of
    one tensor must describe it alike."""
    specs: dict[str, dict] = {}
    dtypes: dict[str, dict[str, str]] = {}
    pieces: dict[str, dict[tuple, dict]] = {}
    for described in ranks:
        for d in described:
            name = d["name"]
            spec = {"shape": d["shape"], "dtype": d["model_dtype"], "trainable": d["group"] is not None,
                    "group": d["group"], "optimizer_scalars": d["scalars"]}
            held = specs.setdefault(name, spec)
            kinds = dtypes.setdefault(name, {})
            if held != spec or kinds.setdefault(d["kind"], d["dtype"]) != d["dtype"]:
                raise CheckpointError(f"rank {d['rank']} describes {d['kind']} of {name!r} as {spec} ({d['dtype']}), "
                                      f"another rank as {held} ({kinds[d['kind']]}); the ranks' state does not agree")
            offsets = d.get("offsets", [0] * len(d["shape"]))
            block = d.get("block", d["shape"])
            piece = pieces.setdefault(name, {}).setdefault((d["rank"], tuple(offsets), d["start"], d["stop"]), {
                "start": d["start"], "stop": d["stop"], "keys": {}, "file": d["file"], "rank": d["rank"], "crc32": {},
                "offsets": list(offsets), "block": list(block)})
            piece["keys"][d["kind"]] = d["key"]
            piece["crc32"][d["kind"]] = d["crc32"]
    tensors: dict[str, dict] = {}
    for name in [n for n in order if n in specs] + [n for n in specs if n not in order]:
        spec, kinds = specs[name], dtypes[name]
        if PARAM not in kinds:
            raise CheckpointError(f"no rank holds the values of {name!r}, only its {sorted(kinds)}")
        states = {k: v for k, v in kinds.items() if k != PARAM}
        tensors[name] = {"shape": spec["shape"], "dtype": spec["dtype"], "saved_dtype": kinds[PARAM],
                         "trainable": spec["trainable"], "group": spec["group"], "optimizer_state": sorted(states),
                         "optimizer_scalars": spec["optimizer_scalars"], "state_dtypes": states,
                         "pieces": list(pieces[name].values())}
    return tensors


def _prepare(save_dir: str, tag: str, tmp: str, engine, client_state: Any) -> dict:
    """Step 3 on rank 0."""
    client_doc, client_tensors, client_specs = CS.encode(client_state)  # [Note: client state]
    sched = engine.lr_scheduler
    sched_state = _json_ready(sched.state_dict(), "the LR scheduler's state_dict") if sched is not None else None
    os.makedirs(save_dir, exist_ok=True)
    for name in os.listdir(save_dir):
        if name.startswith((M.TMP_PREFIX, M.TRASH_PREFIX)):
            log.info("checkpoint: removing %s left by an interrupted save", os.path.join(save_dir, name))
            remove_tree(os.path.join(save_dir, name))
    os.makedirs(tmp)
    client_file = CS.write_file(tmp, client_tensors, client_specs)
    if client_file is not None:
        fsync_dir(tmp)
    return {"client_state": client_doc, "client_tensors": client_file, "lr_scheduler": sched_state}


def merge_names(ranks: list[dict], saved: set[str]) -> tuple[list[str], dict[str, str], set[str]]:
    """``(state_dict_keys, aliases, parameter names)`` of the whole model from every rank's
    (a pipeline stage's module holds its stage's names; stages in rank order): a tied copy that
    its stage did not write is an alias of the owner's name, or is saved under its own name by
    the owning stage ([Note: pieces on a mesh])."""
    keys: dict[str, None] = {}
    aliases: dict[str, str] = {}
    params: set[str] = set()
    for r in ranks:
        names = r["names"]
        keys.update(dict.fromkeys(names["state_dict_keys"]))
        params.update(names["parameters"])
        for alias, target in names["aliases"].items():
            aliases.setdefault(alias, target)
        for dup, owner in names["tied"].items():
            if dup in saved:
                continue
            if owner is None or owner not in saved:
                raise CheckpointError(
                    f"{dup!r} is a tied copy (module.tied_duplicates()) on rank {next(iter(r['file'].values()))['rank']}, "
                    f"but no rank saves {owner or dup!r}: the owning stage must save it under the same name, or the "
                    "module's tied_aliases() must name the owner's parameter")
            aliases.setdefault(dup, owner)
    # an alias whose target is itself an alias on another stage: follow it to the saved tensor
    for alias in list(aliases):
        seen, target = {alias}, aliases[alias]
        while target not in saved and target in aliases and target not in seen:
            seen.add(target)
            target = aliases[target]
        aliases[alias] = target
    aliases = {a: t for a, t in aliases.items() if a not in saved}
    return list(keys), aliases, params


def _manifest_body(engine, tag: str, prepared: dict, ranks: list[dict], exclude_frozen: bool = False) -> dict:
    strategy = engine.strategy
    order: dict[str, None] = {}
    for r in ranks:
        order.update(dict.fromkeys(r["names"]["state_dict_keys"]))
    files: dict[str, dict] = {}
    for r in ranks:
        files.update(r["file"])
    tensors = merge_pieces([r["pieces"] for r in ranks], list(order))
    keys, aliases, params = merge_names(ranks, set(tensors))
    order = list(keys)
    # frozen parameters left out (exclude_frozen_parameters); a tensor missing otherwise fails validation
    excluded = {n for n in order if n in params and n not in tensors and n not in aliases} if exclude_frozen else set()
    excluded |= {a for a, target in aliases.items() if target in excluded}
    return {
        "tag": tag,
        "created_ns": time.time_ns(),
        "world_size": engine.ctx.world_size,
        "mesh": mesh_shape(engine.ctx),
        "zero_stage": strategy.stage,
        "compute_dtype": dtype_name(strategy.dtype),
        "optimizer": type(engine.optimizer).__name__,
        "param_groups": _group_options(engine.optimizer),
        "counters": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                     "skipped_steps": engine.skipped_steps, "micro_steps": engine.micro_steps},
        "loss_scaler": strategy.scalar_state(),
        "lr_scheduler": prepared["lr_scheduler"],
        "client_state": prepared["client_state"],
        "ranks": [r["rank_state"] for r in ranks],
        "aliases": {a: t for a, t in aliases.items() if a not in excluded},
        "state_dict_keys": [k for k in keys if k not in excluded],
        "files": files,
        "tensors": tensors,
        "hf_config": hf_config(engine.module),
        "client_tensors": prepared["client_tensors"],
        "buffers": [n for n, t in tensors.items() if n not in params and not t["trainable"]],
        "excluded": sorted(excluded),
    }


def hf_config(module) -> dict | None:
    """A Hugging Face model's config as ``config.json`` holds it (for export_hf), else None."""
    cfg = getattr(module, "config", None)
    if not (callable(getattr(cfg, "to_json_string", None)) and callable(getattr(cfg, "to_dict", None))):
        return None
    try:
        doc = json.loads(cfg.to_json_string(use_diff=False))
    except (TypeError, ValueError) as exc:
        log.warning("checkpoint: the model's config is not JSON (%s); export_hf will write no config.json", exc)
        return None
    if isinstance(doc, dict) and not doc.get("architectures"):
        doc["architectures"] = [type(module).__name__]
    return doc if isinstance(doc, dict) else None


def _commit(save_dir: str, tag: str, tmp: str, body: dict, save_latest: bool, keep_last: int | None) -> str:
    """Step 6 on rank 0."""
    text = M.encode(body)
    try:  # the merged manifest is checked as a load checks it, before anything is committed
        validate(json.loads(text), os.path.join(tmp, M.MANIFEST))
    except CheckpointError as exc:
        raise CheckpointError(f"the manifest merged from the ranks' pieces is inconsistent (a bug): {exc}") from None
    with open(os.path.join(tmp, M.MANIFEST), "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    final = os.path.join(save_dir, tag)
    if os.path.exists(final):  # re-saving a tag: the old one leaves the committed namespace first
        remove_tree(final)
    os.rename(tmp, final)
    fsync_dir(save_dir)
    if save_latest:
        atomic_write_text(os.path.join(save_dir, M.LATEST), tag)
    if keep_last is not None:
        tags = M.committed_tags(save_dir)
        latest = tag if save_latest else None
        doomed = [t for t in tags[:-keep_last] if t not in (tag, latest)] if len(tags) > keep_last else []
        for old in doomed:
            log.info("checkpoint: keep_last=%d removes %s", keep_last, old)
            remove_tree(os.path.join(save_dir, old))
    return final


def save_checkpoint(engine, save_dir, tag: str | int | None = None, client_state: Any = None,
                    save_latest: bool = True, exclude_frozen_parameters: bool = False, *,
                    timeout_s: float | None = None) -> str:
    """Save the engine's full training state under ``<save_dir>/<tag>``; call on every rank.
    ``tag`` may be an integer (stored as its decimal string); ``client_state`` is stored without
    pickle ([Note: client state]); ``exclude_frozen_parameters`` leaves out the parameters that
    are in no optimizer param group. Returns the committed directory. See [Note: checkpoint
    commit protocol]."""
    require_one_replica(engine.ctx, "save_checkpoint")
    ctx = engine.ctx.world  # == ctx.dp with one replica group
    save_dir = os.path.abspath(os.fspath(save_dir))
    tag = f"global_step{engine.global_steps}" if tag is None else M.normalize_tag(tag)
    timeout = join_timeout(ctx) if timeout_s is None else timeout_s
    try:
        barrier(ctx, timeout_s=timeout)
    except CollectiveTimeoutError as exc:
        raise CheckpointError(
            f"save_checkpoint must be called on every rank: rank(s) {list(exc.missing_ranks)} did not "
            f"call it within {timeout:g} s (rank {ctx.rank} is waiting to save {tag!r} to {save_dir}). "
            "Call engine.save_checkpoint on all ranks, not only on rank 0.") from exc
    except CollectiveError as exc:  # a peer exited before calling it (not a timeout)
        from shardwise.comm.collectives import peer_exit_text

        raise CheckpointError(f"save_checkpoint: {peer_exit_text(exc)}, while rank {ctx.rank} waited to save "
                              f"{tag!r} to {save_dir} (up to {timeout:g} s); save_checkpoint must be called on "
                              "every rank") from exc
    exclude = bool(exclude_frozen_parameters)
    tags = all_gather_object((tag, save_dir, exclude), ctx)
    if len(set(tags)) != 1:
        raise CheckpointError("save_checkpoint was called with different arguments on different ranks: "
                              + ", ".join(f"rank {r}: tag={t!r} dir={d} exclude_frozen_parameters={x}"
                                          for r, (t, d, x) in enumerate(tags))
                              + "; every rank must pass the same save_dir and tag")
    problem = M.check_tag(tag)
    if problem:
        raise CheckpointError(problem)
    tmp = os.path.join(save_dir, M.TMP_PREFIX + tag)
    prepared = outcome(lambda: _prepare(save_dir, tag, tmp, engine, client_state)) if ctx.rank == 0 else None
    prepared = broadcast_object(prepared, ctx)
    raise_failed([prepared], f"preparing checkpoint {tag!r} in {save_dir}", _UNCHANGED)
    t0 = time.perf_counter()
    written = all_gather_object(outcome(lambda: _write_rank_file(engine, tmp, exclude)), ctx)
    if not all(ok for ok, _ in written):
        if ctx.rank == 0:
            remove_tree(tmp)
        raise_failed(written, f"writing checkpoint {tag!r} to {save_dir}", _UNCHANGED)
    keep_last = engine.plan.checkpoint.keep_last
    committed = None
    if ctx.rank == 0:
        committed = outcome(lambda: _commit(save_dir, tag, tmp, _manifest_body(
            engine, tag, prepared[1], [r for _, r in written], exclude), save_latest, keep_last))
        if not committed[0]:
            remove_tree(tmp)
    committed = broadcast_object(committed, ctx)
    if not committed[0]:
        raise CheckpointError(f"committing checkpoint {tag!r} in {save_dir} failed on rank 0: {committed[1]}")
    log.debug("checkpoint %s saved in %.2f s", committed[1], time.perf_counter() - t0)
    return committed[1]
