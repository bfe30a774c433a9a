"""The checkpoint format: directory layout, the JSON manifest, tags and the ``latest`` pointer.

[Note: checkpoint layout]
``<save_dir>/<tag>/`` holds one ``rank{r:05d}.safetensors`` per saving rank and
``manifest.json``. The manifest is written last (by rank 0) and the directory renamed into
place only after every rank's file is durable, so *a tag directory with a manifest is
committed*; ``.tmp-<tag>`` and ``.trash-<tag>`` directories never are. ``<save_dir>/latest``
holds the newest committed tag (DeepSpeed's convention).

The manifest lists, for every tensor of ``model.state_dict()`` (tied names as ``aliases``),
its shape and dtypes and its *pieces*: which rank's file holds which element range
``[start, stop)`` of the flattened tensor (from format 5 on: of the flattening of an n-d block
of it, [Note: format 5]), under which key, with a crc32. Optimizer state
that has one value per parameter element (Adam's ``exp_avg``, SGD's ``momentum_buffer``, ...)
is stored in the same ranges, so any world size / ZeRO stage (stage 3 included: it only
changes which ranges a rank holds) can read what it needs. Non-tensor state (counters, loss
scaler, LR scheduler, param-group hyper-parameters, client state, RNG, data loader) is JSON.
The manifest carries a crc32 of its own content, and is validated field by field before use
(schema.py, [Note: manifest validation]).

[Note: piece identity]
From format version 2 on, a piece's crc32 covers its identity, not only its bytes: the crc
starts from the crc32 of :func:`piece_identity` (tensor name, kind, safetensors key, dtype, element
range; from format 3 on also the tensor's global shape) and continues over the bytes. A
manifest whose pieces were swapped (a weight's piece pointing at Adam's first moment, two
ranges or files exchanged) therefore fails its checksum even when the bytes are intact.
Format 1 (crc32 over the bytes only) and format 2 (identity without the shape) checkpoints
still load.

[Note: manifest from every rank's pieces]
From format 3 on the manifest's ``tensors`` are merged from the piece descriptions that every
rank sends after writing its file (``strategy.state_pieces``, [Note: state pieces]), not
built from rank 0's view of the layout: each tensor's shape, dtypes, param group and optimizer
scalars come from the ranks that hold a piece of it, must agree between them, and the merged
manifest is validated ([Note: manifest validation]) before it is committed. Format 3's pieces
are otherwise laid out as format 2's.

[Note: format 4]
Format 4 (DeepSpeed's checkpoint API, [Note: client state]) adds three manifest fields:
``client_tensors`` (the tensors and arrays of ``client_state``, kept in
``client_state.safetensors`` with their dtypes, shapes and crc32s; null when there are none),
``buffers`` (which non-trainable tensors are buffers rather than frozen parameters) and
``excluded`` (frozen parameters, and their tied names, that ``exclude_frozen_parameters=True``
left out). Its ``client_state`` is typed JSON (tuples, tensors, numpy arrays, non-string dict
keys marked; :mod:`shardwise.checkpoint.client_state`), where earlier formats held plain JSON.
Pieces are laid out and checksummed as in format 3.

[Note: format 5]
Format 5 (pipeline and tensor parallelism) makes a piece an n-d region ([Note: n-d pieces] in
nd.py): each piece has ``offsets`` and ``block`` (its block within the tensor's global shape)
and ``start``/``stop`` index that block's flattening; a tensor's pieces must tile it (blocks
disjoint and covering the tensor, ranges covering each block). The piece identity covers the
block too. The manifest records the saving ``mesh`` (``{"pp", "dp", "tp"}`` sizes; global
rank = (pp_rank * dp + dp_rank) * tp + tp_rank) and ``world_size`` is the whole mesh's: there
is one file and one ``ranks`` entry per global rank. ``tensors``, ``aliases`` and
``state_dict_keys`` are merged from every rank (a pipeline stage's module holds its stage's
names; tied copies on non-owning stages are aliases). Frozen tensors and buffers are
written by dp rank 0 of their stage / tp shard. Formats 1-4 are read as whole-tensor blocks
at a 1-D dp mesh.

[Note: bounded reads]
Only regular files (or symlinks to them) are read anywhere in a checkpoint, each bounded:
``latest`` at most ``MAX_LATEST_BYTES``, a manifest ``MAX_MANIFEST_BYTES``, a shard header
``MAX_HEADER_BYTES``, a shard exactly its recorded size. A FIFO, a device or a directory in
their place is a named error, never a blocking or endless read (files.open_regular).
"""
from __future__ import annotations

import json
import numbers
import os
import re
import zlib
from typing import Any

from shardwise.checkpoint.files import is_regular, open_regular, read_regular
from shardwise.errors import CheckpointError
from shardwise.zero.pieces import PARAM, piece_key

FORMAT = "shardwise-checkpoint"
FORMAT_VERSION = 5
SUPPORTED_VERSIONS = (1, 2, 3, 4, 5)
MAX_LATEST_BYTES = 4096
MAX_MANIFEST_BYTES = 256 << 20
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
MANIFEST = "manifest.json"
CLIENT_FILE = "client_state.safetensors"  # format 4: client_state's tensors ([Note: format 4])
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,199}")  # used with fullmatch only


def shard_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def param_key(name: str) -> str:
    return piece_key(name, PARAM)


def state_key(state: str, name: str) -> str:
    return piece_key(name, state)


def piece_identity(name: str, kind: str, key: str, dtype: str, start: int, stop: int,
                   shape: list[int] | None = None, version: int = FORMAT_VERSION,
                   offsets: list[int] | None = None, block: list[int] | None = None) -> bytes:
    """What a piece checksum covers besides the bytes (see [Note: piece identity]): nothing in
    format 1; name, kind, key, dtype and range in format 2; the tensor's global shape from
    format 3 on; and the piece's block (offsets and shape; the whole tensor when not given)
    from format 5 on."""
    if version < 2:
        return b""
    fields = [name, kind, key, dtype, start, stop] + ([list(shape or [])] if version >= 3 else [])
    if version >= 5:
        shape = list(shape or [])
        fields += [list(offsets) if offsets is not None else [0] * len(shape),
                   list(block) if block is not None else shape]
    return json.dumps(fields, separators=(",", ":")).encode()


def normalize_tag(tag: Any) -> Any:
    """DeepSpeed's scripts pass integer tags (``save_checkpoint(d, tag=100)``): an integer (not a
    bool) becomes its decimal string, which then names the directory; anything else is returned
    as is, for :func:`check_tag` to judge."""
    if isinstance(tag, numbers.Integral) and not isinstance(tag, bool):
        return str(int(tag))
    return tag


def check_tag(tag: Any) -> str | None:
    """The problem with ``tag`` as a directory name, or None. The whole tag must match
    (``re.fullmatch``: a trailing newline is refused, not ignored)."""
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag) or tag == LATEST:
        return (f"checkpoint tag {tag!r} is not usable as a directory name: use a string of 1-200 letters, "
                f"digits and _ . + = - (not starting with '.', '+', '=' or '-'; no spaces or newlines; not "
                f"{LATEST!r}) or a non-negative integer")
    return None


def _digest(body: dict) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()) & 0xFFFFFFFF


def encode(body: dict) -> str:
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "crc32": _digest(body), **body}
    return json.dumps(doc, indent=1, sort_keys=False)


def read_manifest(ckpt_path: str) -> dict:
    """Parse and check ``<ckpt_path>/manifest.json`` (format, version, own checksum, then every
    field: [Note: manifest validation]); every problem is a :class:`CheckpointError` naming the
    file."""
    from shardwise.checkpoint.schema import validate

    path = os.path.join(ckpt_path, MANIFEST)
    if not os.path.lexists(path):
        raise CheckpointError(f"the manifest {path} is missing: {ckpt_path} is not a committed checkpoint "
                              "(the save did not finish, or the manifest was deleted); load another tag")
    raw = read_regular(path, "checkpoint manifest", MAX_MANIFEST_BYTES)
    try:
        text = raw.decode("utf-8")
        doc = json.loads(text)
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {exc.start}): the manifest is corrupt") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at byte {exc.pos} of "
                              f"{len(text)}): the manifest is truncated or corrupt") from None
    except ValueError as exc:  # a number with too many digits
        raise CheckpointError(f"{path} is not a shardwise manifest: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"{path} nests too deeply to be a shardwise manifest") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a shardwise checkpoint manifest (format "
                              f"{doc.get('format') if isinstance(doc, dict) else None!r})")
    version = doc.get("format_version")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this shardwise "
            f"reads versions {list(SUPPORTED_VERSIONS)}. Load it with the shardwise that wrote it "
            "(or a newer one)")
    body = {k: v for k, v in doc.items() if k not in ("format", "format_version", "crc32")}
    try:
        digest = _digest(body)
    except ValueError as exc:  # e.g. a number too large to print
        raise CheckpointError(f"{path} cannot be checksummed ({exc}): the manifest is corrupt") from None
    if doc.get("crc32") != digest:
        raise CheckpointError(f"{path}: checksum mismatch (stored {doc.get('crc32')}, computed "
                              f"{digest}): the manifest was modified or corrupted")
    validate(doc, path)
    return doc


def check_files(ckpt_path: str, manifest: dict) -> None:
    """Every shard file is a regular file with its recorded size (before any state is touched);
    the headers are checked by reader.verify_files."""
    for name, info in manifest["files"].items():
        path = os.path.join(ckpt_path, name)
        what = f"shard file (written by rank {info['rank']}, expected {info['size']} bytes)"
        with open_regular(path, what) as f:
            size = os.fstat(f.fileno()).st_size
        if size != info["size"]:
            raise CheckpointError(f"shard file {path} has {size} bytes, expected {info['size']} "
                                  f"(written by rank {info['rank']}): the file is "
                                  f"{'truncated' if size < info['size'] else 'longer than written'}")


def committed_tags(save_dir: str) -> list[str]:
    """Committed tags in ``save_dir``, oldest first (by the manifest's commit counter/time)."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if name.startswith(".") or check_tag(name) or not is_regular(os.path.join(path, MANIFEST)):
            continue
        try:
            created = json.loads(read_regular(os.path.join(path, MANIFEST), "manifest", MAX_MANIFEST_BYTES))
            created = created.get("created_ns", 0) if isinstance(created, dict) else 0
            created = created if type(created) is int else 0
        except (CheckpointError, ValueError, RecursionError):
            created = 0
        found.append((created, name))
    return [name for _, name in sorted(found)]


def holds_nothing(save_dir: str) -> bool:
    """No checkpoint at all in ``save_dir``: it is missing (or empty), has no ``latest`` entry
    and no committed tag. (What ``load_checkpoint(tag=None)`` answers with ``(None, None)``, as
    DeepSpeed does; a ``latest`` or a committed tag that is broken stays an error.)"""
    save_dir = os.fspath(save_dir)
    if os.path.lexists(save_dir) and not os.path.isdir(save_dir):
        return False  # a file where a directory should be: resolve() names it
    return not os.path.lexists(os.path.join(save_dir, LATEST)) and not committed_tags(save_dir)


def read_latest(save_dir: str) -> str:
    """The tag named by ``<save_dir>/latest``; a missing, empty or stale pointer is an error
    listing the committed tags (never a silent fresh start)."""
    path = os.path.join(save_dir, LATEST)
    tags = committed_tags(save_dir)
    listing = f"committed tags in {save_dir}: {tags}" if tags else f"{save_dir} holds no committed checkpoint"
    fix = "; pass tag=... to load_checkpoint to pick one" if tags else ""
    if not os.path.isdir(save_dir):
        raise CheckpointError(f"cannot resume: checkpoint directory {save_dir} does not exist")
    if not os.path.lexists(path):
        raise CheckpointError(f"cannot resume: {path} does not exist; {listing}{fix}")
    try:
        tag = read_regular(path, "the `latest` pointer", MAX_LATEST_BYTES).decode("utf-8").strip()
    except CheckpointError as exc:
        raise CheckpointError(f"cannot resume: {exc}; {listing}{fix}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"cannot resume: {path} is not UTF-8 text; {listing}{fix}") from None
    if not tag:
        raise CheckpointError(f"cannot resume: {path} is empty; {listing}{fix}")
    shown = tag if len(tag) < 80 else tag[:77] + "..."
    if check_tag(tag) is None and tag not in tags and os.path.isdir(os.path.join(save_dir, tag)):
        manifest = os.path.join(save_dir, tag, MANIFEST)
        why = "is missing" if not os.path.lexists(manifest) else "is not a regular file"
        raise CheckpointError(f"cannot resume: {path} names {shown!r}, but its manifest {manifest} {why} "
                              f"(the save did not finish, or the manifest was deleted); {listing}{fix}")
    if check_tag(tag) is not None or tag not in tags:
        raise CheckpointError(f"cannot resume: {path} names {shown!r}, which is not a committed "
                              f"checkpoint; {listing}{fix}")
    return tag


def resolve(load_dir: str, tag: str | None) -> tuple[str, str]:
    """``(tag, path)`` to load; ``tag=None`` follows ``latest``."""
    load_dir = os.fspath(load_dir)
    if os.path.lexists(load_dir) and not os.path.isdir(load_dir):
        raise CheckpointError(f"checkpoint directory {load_dir} is not a directory; pass the directory "
                              "save_checkpoint wrote (the one holding `latest` and the tag directories)")
    tag = normalize_tag(tag)
    if tag is None:
        tag = read_latest(load_dir)
    problem = check_tag(tag)
    if problem:
        raise CheckpointError(problem)
    path = os.path.join(load_dir, tag)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist; committed tags in {load_dir}: "
                              f"{committed_tags(load_dir)}")
    return tag, path
