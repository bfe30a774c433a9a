"""Reading a config document: a JSON file or a dict becomes a plain, bounded JSON tree.

Nothing here raises on bad input (see [Note: one pass, every problem] in ``schema.py``):
unreadable files, invalid JSON, integer literals too long to parse, documents nested too
deeply (or containing themselves) and non-string keys become :class:`ConfigProblem` s with
their JSON path, and the offending part is left out.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from shardwise.config import ranges as R
from shardwise.errors import ConfigProblem, UsageError


class _JSONObject(dict):
    """A parsed JSON object that remembers keys it saw more than once."""

    duplicates: tuple[str, ...] = ()


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    obj = _JSONObject(pairs)
    if len(obj) != len(pairs):
        seen: list[str] = [k for k, _ in pairs]
        obj.duplicates = tuple(sorted({k for k in seen if seen.count(k) > 1}))
    return obj


def load(source: Any, out: list[ConfigProblem]) -> Optional[dict]:
    if isinstance(source, Mapping):
        return _copy(source, out)
    if not isinstance(source, (str, os.PathLike)):
        raise UsageError("config must be a path to a JSON file or a dict, got "
                         f"{type(source).__name__}")
    try:
        path = Path(source)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        out.append(ConfigProblem("", f"config file not found: {source}"))
        return None
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:  # ValueError: NUL byte
        out.append(ConfigProblem("", f"cannot read config file {source!r}: {exc}"))
        return None
    try:
        doc = json.loads(text, object_pairs_hook=_pairs, parse_int=R.parse_int)
    except json.JSONDecodeError as exc:
        out.append(ConfigProblem("", f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} "
                                     f"column {exc.colno}", "write strict JSON: no comments, "
                                     "no trailing commas, keys in double quotes"))
        return None
    except (RecursionError, ValueError) as exc:
        deep = isinstance(exc, RecursionError)
        out.append(ConfigProblem("", f"{path} cannot be read as JSON: "
                                     f"{'it is nested too deeply' if deep else exc}",
                                 f"nest at most {R.MAX_DEPTH} levels" if deep else ""))
        return None
    return _copy(doc, out)


def _copy(doc: Any, out: list[ConfigProblem]) -> Optional[dict]:
    """A plain-JSON copy of ``doc`` (dicts, lists, scalars), made without recursion: parts
    nested deeper than ``R.MAX_DEPTH`` (or containing themselves) and non-string keys are
    reported and left out, so no later step meets a ``RecursionError``."""
    if not isinstance(doc, Mapping):
        out.append(ConfigProblem("", f"the config must be a JSON object {{...}}, got {R.got(doc)}"))
        return None
    root = _JSONObject()
    stack: list[tuple[Any, Any, str, int]] = [(doc, root, "", 0)]
    while stack:
        src, dst, path, depth = stack.pop()
        if isinstance(src, Mapping):
            dst.duplicates = getattr(src, "duplicates", ())
            items = list(src.items())
        else:
            items = list(enumerate(src))
        for key, value in items:
            sub = f"{path}[{key}]" if isinstance(key, int) and not isinstance(src, Mapping) \
                else join(path, key) if isinstance(key, str) else path
            if isinstance(src, Mapping) and not isinstance(key, str):
                out.append(ConfigProblem(path, f"keys must be strings, got {R.got(key)}"))
                continue
            if isinstance(value, (Mapping, list, tuple)):
                if depth + 1 >= R.MAX_DEPTH:
                    out.append(ConfigProblem(sub, f"nested more than {R.MAX_DEPTH} levels deep "
                                             "(or contains itself)", "flatten it"))
                    continue
                child: Any = _JSONObject() if isinstance(value, Mapping) else []
                stack.append((value, child, sub, depth + 1))
                value = child
            if isinstance(dst, dict):
                dst[key] = value
            else:
                dst.append(value)
    return root


def join(path: str, key: Any) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))


def report_duplicates(value: Any, path: str, out: list[ConfigProblem]) -> None:
    if isinstance(value, dict):
        for key in getattr(value, "duplicates", ()):
            out.append(ConfigProblem(join(path, key), "key appears more than once; JSON keeps "
                                     "only the last value", "remove the duplicates"))
        for key, item in value.items():
            report_duplicates(item, join(path, key), out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            report_duplicates(item, join(path, i), out)
