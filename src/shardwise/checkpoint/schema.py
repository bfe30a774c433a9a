"""The manifest's schema: every field's type and range (pydantic), then what the fields say about
each other (pieces cover each tensor exactly, keys are named after their tensor, files exist).

[Note: manifest validation]
:func:`validate` runs on every manifest read, after its own checksum and before anything else
uses it, so a manifest that a buggy writer or a hand edit made inconsistent (and re-checksummed)
is one :class:`CheckpointError` listing every problem with its JSON path, never a ``KeyError``
half-way through a load. What the manifest says must also agree with the files themselves:
that is :func:`shardwise.checkpoint.reader.verify_files`.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      ValidationError, field_validator)

from shardwise.checkpoint.manifest import (FORMAT, MAX_HEADER_BYTES, SUPPORTED_VERSIONS, check_tag, param_key,
                                          shard_file, state_key)
from shardwise.checkpoint import nd as ND
from shardwise.checkpoint.nd import tiling_problems
from shardwise.errors import CheckpointError

NonNeg = Annotated[StrictInt, Field(ge=0)]
Positive = Annotated[StrictInt, Field(ge=1)]
U32 = Annotated[StrictInt, Field(ge=0, le=0xFFFFFFFF)]
Number = Union[StrictInt, StrictFloat]
DType = Literal["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Strict):
    size: NonNeg
    crc32: U32
    header_bytes: Annotated[StrictInt, Field(ge=8, le=MAX_HEADER_BYTES + 8)]
    header_crc32: U32
    rank: NonNeg


class Piece(_Strict):
    start: NonNeg
    stop: NonNeg
    keys: dict[StrictStr, StrictStr]
    file: StrictStr
    rank: NonNeg
    crc32: dict[StrictStr, U32]
    offsets: Optional[list[NonNeg]] = None  # format 5: the block's offsets ([Note: n-d pieces])
    block: Optional[list[NonNeg]] = None  # format 5: the block's shape; start/stop index its flattening


class Mesh(_Strict):  # format 5: the saving mesh; global rank = (pp * dp + dp_rank) * tp + tp_rank
    pp: Positive
    dp: Positive
    tp: Positive


class Scalar(_Strict):
    tensor: StrictBool
    value: Union[StrictBool, StrictInt, StrictFloat]
    dtype: Optional[DType] = None
    shape: Optional[list[NonNeg]] = None


class TensorEntry(_Strict):
    shape: list[NonNeg]
    dtype: DType
    saved_dtype: DType
    trainable: StrictBool
    group: Optional[NonNeg]
    optimizer_state: list[StrictStr]
    optimizer_scalars: dict[StrictStr, Scalar]
    state_dtypes: Optional[dict[StrictStr, DType]] = None  # format 2
    pieces: list[Piece]


class Counters(_Strict):
    global_steps: NonNeg
    global_samples: NonNeg
    skipped_steps: NonNeg
    micro_steps: NonNeg


class _NoScaler(_Strict):
    pass


class DynamicScaler(_Strict):
    scale: Number
    hysteresis_left: NonNeg
    good_steps: NonNeg

    @field_validator("scale")
    @classmethod
    def _finite(cls, v):
        if not (math.isfinite(v) and v > 0):
            raise ValueError("must be a finite number > 0")
        return v


class ParamGroup(BaseModel):
    model_config = ConfigDict(extra="allow")  # hyper-parameters: checked against the live groups
    lr: Number

    @field_validator("lr")
    @classmethod
    def _finite(cls, v):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError("must be a finite number >= 0")
        return v


class Rng(_Strict):
    python: tuple[StrictInt, list[StrictInt], Optional[StrictFloat]]
    torch: StrictStr
    numpy: Optional[tuple[StrictStr, list[StrictInt], StrictInt, StrictInt, StrictFloat]] = None
    cuda: Optional[list[StrictStr]] = None


class Loader(BaseModel):
    model_config = ConfigDict(extra="allow")
    epoch: NonNeg
    batches: NonNeg
    batch_size: Positive
    world_size: Positive
    generator: Optional[StrictStr] = None


class RankState(_Strict):
    rng: Rng
    data_loader: Optional[Loader]


class ClientTensor(_Strict):
    dtype: DType
    shape: list[NonNeg]
    crc32: U32


class ClientTensors(_Strict):  # format 4: client_state's tensors ([Note: client state])
    file: Literal["client_state.safetensors"]
    size: NonNeg
    crc32: U32
    header_bytes: Annotated[StrictInt, Field(ge=8, le=MAX_HEADER_BYTES + 8)]
    header_crc32: U32
    tensors: dict[StrictStr, ClientTensor]


class Manifest(_Strict):
    format: Literal[FORMAT]  # type: ignore[valid-type]
    format_version: StrictInt
    crc32: U32
    tag: StrictStr
    created_ns: NonNeg
    world_size: Positive
    zero_stage: Annotated[StrictInt, Field(ge=0, le=3)]
    compute_dtype: DType
    optimizer: StrictStr
    param_groups: list[ParamGroup]
    counters: Counters
    loss_scaler: Union[_NoScaler, DynamicScaler]
    lr_scheduler: Optional[dict[StrictStr, Any]]
    client_state: Any
    ranks: Annotated[list[RankState], Field(min_length=1)]
    aliases: dict[StrictStr, StrictStr]
    state_dict_keys: list[StrictStr]
    files: dict[StrictStr, FileEntry]
    tensors: dict[StrictStr, TensorEntry]
    hf_config: Optional[dict[StrictStr, Any]] = None  # format 2: a Hugging Face model's config
    client_tensors: Optional[ClientTensors] = None  # format 4 ([Note: format 4])
    buffers: Optional[list[StrictStr]] = None  # format 4: the non-trainable tensors that are buffers
    excluded: Optional[list[StrictStr]] = None  # format 4: frozen parameters not saved
    mesh: Optional[Mesh] = None  # format 5 ([Note: format 5])


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part in ("_NoScaler", "DynamicScaler"):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _dp_rank(rank: int, mesh: Mesh | None) -> int:
    """The dp coordinate of global rank ``rank`` (the rank itself without a recorded mesh)."""
    if mesh is None:
        return rank
    return (rank // mesh.tp) % mesh.dp


def _tensor_problems(name: str, t: TensorEntry, files: dict[str, FileEntry], version: int,
                     mesh: Mesh | None = None) -> list[str]:
    where = f"tensors[{name!r}]"
    out = []
    if t.trainable:
        if t.group is None:
            out.append(f"{where}.group: a trainable tensor needs its param group")
    elif t.group is not None or t.optimizer_state or t.optimizer_scalars:
        out.append(f"{where}: a frozen tensor or buffer has no param group or optimizer state")
    kinds = ["param", *t.optimizer_state]
    if len(set(kinds)) != len(kinds):
        out.append(f"{where}.optimizer_state: {t.optimizer_state} repeats a name (or uses 'param')")
    if version >= 2 and set(t.state_dtypes or {}) != set(t.optimizer_state):
        out.append(f"{where}.state_dtypes: {sorted(t.state_dtypes or {})} do not match optimizer_state "
                   f"{sorted(t.optimizer_state)}")
    for k, s in t.optimizer_scalars.items():
        if s.tensor != (s.dtype is not None) or s.tensor != (s.shape is not None) or \
                (s.shape is not None and _numel(s.shape) != 1):
            out.append(f"{where}.optimizer_scalars[{k!r}]: a tensor scalar has a dtype and a shape of one "
                       "element; a plain one has neither")
    numel = _numel(t.shape)
    covered = 0
    if version >= 5:
        if any(p.offsets is None or p.block is None for p in t.pieces):
            out.append(f"{where}.pieces: every piece has offsets and block from format version 5 on")
            return out
        problem = tiling_problems(t.shape, [ND.Region(p.offsets, p.block, p.start, p.stop) for p in t.pieces])
        if problem:
            out.append(f"{where}.pieces: pieces must tile the tensor (shape {t.shape}): {problem}")
            return out
    elif any(p.offsets is not None or p.block is not None for p in t.pieces):
        out.append(f"{where}.pieces: offsets and block are not part of format versions before 5")
        return out
    pieces = t.pieces if version >= 5 else sorted(t.pieces, key=lambda p: (p.start, p.stop))
    for i, p in enumerate(pieces):
        at = f"{where}.pieces (range [{p.start}, {p.stop}) in {p.file!r})"
        if version < 5 and (p.start != covered or p.stop < p.start or p.stop > numel):
            out.append(f"{at}: pieces must cover [0, {numel}) in order without gaps or overlaps "
                       f"(the range expected next starts at {covered})")
            return out
        covered = p.stop if version < 5 else numel
        want = {"param": param_key(name)} | {k: state_key(k, name) for k in t.optimizer_state}
        if p.keys != want:
            out.append(f"{at}.keys: {p.keys} should be {want} (each key is named after its tensor and kind)")
        if set(p.crc32) != set(want):
            out.append(f"{at}.crc32: has checksums for {sorted(p.crc32)}, expected {sorted(want)}")
        f = files.get(p.file)
        if f is None:
            out.append(f"{at}.file: {p.file!r} is not in the manifest's files")
        elif f.rank != p.rank:
            out.append(f"{at}.rank: {p.rank}, but {p.file!r} was written by rank {f.rank}")
        if not t.trainable and _dp_rank(p.rank, mesh) != 0:
            out.append(f"{at}.rank: frozen tensors and buffers are written by rank 0 of a data-parallel group "
                       f"(rank {p.rank} is dp rank {_dp_rank(p.rank, mesh)})")
    if covered != numel:
        out.append(f"{where}.pieces cover [0, {covered}) of {numel} elements")
    return out


def _problems(m: Manifest) -> list[str]:
    out = []
    if m.format_version not in SUPPORTED_VERSIONS:
        out.append(f"format_version: {m.format_version}; this shardwise reads versions {list(SUPPORTED_VERSIONS)}")
    if check_tag(m.tag):
        out.append(f"tag: {check_tag(m.tag)}")
    if len(m.ranks) != m.world_size:
        out.append(f"ranks: {len(m.ranks)} entries for world size {m.world_size} (one per saving rank)")
    for name, f in m.files.items():
        if name != shard_file(f.rank) or f.rank >= m.world_size:
            out.append(f"files[{name!r}]: a shard file is named rank{{r:05d}}.safetensors after its rank "
                       f"(0 <= rank < {m.world_size}), this one says rank {f.rank}")
        if f.header_bytes > f.size:
            out.append(f"files[{name!r}]: header_bytes {f.header_bytes} > size {f.size}")
    for alias, target in m.aliases.items():
        if target not in m.tensors or alias in m.tensors:
            out.append(f"aliases[{alias!r}]: must name a saved tensor ({target!r}) and not be one itself")
    names = set(m.tensors) | set(m.aliases)
    if len(set(m.state_dict_keys)) != len(m.state_dict_keys) or set(m.state_dict_keys) != names:
        out.append("state_dict_keys: must list every tensor and alias once")
    if m.hf_config is not None and m.format_version < 2:
        out.append("hf_config: not part of format version 1")
    if m.format_version >= 4:
        if m.buffers is None or m.excluded is None:
            out.append("buffers, excluded: required from format version 4 on")
        else:
            wrong = [b for b in m.buffers if b not in m.tensors or m.tensors[b].trainable]
            if wrong or len(set(m.buffers)) != len(m.buffers):
                out.append(f"buffers: {wrong[:4]} must be saved non-trainable tensors, each listed once")
            clash = sorted(set(m.excluded) & names)
            if clash or len(set(m.excluded)) != len(m.excluded):
                out.append(f"excluded: {clash[:4]} are saved (an excluded frozen parameter is not), each listed once")
        if m.client_tensors is not None and m.client_tensors.header_bytes > m.client_tensors.size:
            out.append(f"client_tensors: header_bytes {m.client_tensors.header_bytes} > size {m.client_tensors.size}")
    elif m.client_tensors is not None or m.buffers is not None or m.excluded is not None:
        out.append("client_tensors, buffers, excluded: not part of format versions before 4")
    if m.format_version >= 5:
        if m.mesh is None:
            out.append("mesh: required from format version 5 on")
        elif m.mesh.pp * m.mesh.dp * m.mesh.tp != m.world_size:
            out.append(f"mesh: pp {m.mesh.pp} x dp {m.mesh.dp} x tp {m.mesh.tp} is not world_size {m.world_size}")
    elif m.mesh is not None:
        out.append("mesh: not part of format versions before 5")
    for name, t in m.tensors.items():
        if (t.state_dtypes is not None) != (m.format_version >= 2):
            out.append(f"tensors[{name!r}].state_dtypes: required from format version 2 on, absent before")
        out.extend(_tensor_problems(name, t, m.files, m.format_version, m.mesh))
    return out


def validate(doc: dict, path: str) -> None:
    """Raise one :class:`CheckpointError` naming ``path`` and every problem of manifest ``doc``
    (see [Note: manifest validation])."""
    try:
        problems = _problems(Manifest.model_validate(doc))
    except ValidationError as exc:
        problems = []
        for e in exc.errors(include_url=False):
            if e["type"] == "model_type" and "_NoScaler" in e["loc"]:
                continue  # the other half of the loss_scaler union: reported once below
            got = e.get("input")
            shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
            problems.append(f"{_loc(e['loc'])}: {e['msg']} (got {shown[:60]})")
    if problems:
        more = f" (and {len(problems) - 12} more)" if len(problems) > 12 else ""
        raise CheckpointError(
            f"{path} is inconsistent ({len(problems)} problem{'s' if len(problems) > 1 else ''}; a buggy "
            f"writer or a hand edit whose checksum was recomputed): " + "; ".join(problems[:12]) + more
            + ". Load another checkpoint (pass tag=...) or restore this one's manifest.json")
