"""Seeded, bounded fuzzing of the config loader (issue 11): whatever the document,
``load_config`` returns a Plan or raises one ConfigError whose every problem names a JSON
path (or the document itself), never any other exception.

Starts from real DeepSpeed configs (examples/gpt, tests/unit/configs) and mutates them:
deleted keys, changed types, typos, wrong case, extreme numbers, NaN/inf, huge integers,
deep nesting. Deterministic (``random.Random(seed)``), a few hundred cases, seconds.
"""
from __future__ import annotations

import copy
import json
import random
import warnings
from pathlib import Path

import pytest

from shardwise.config import Plan, load_config
from shardwise.errors import ConfigError

ROOT = Path(__file__).parents[2]
SEEDS = sorted((ROOT / "examples" / "gpt").glob("ds_zero*.json")) + sorted(
    (Path(__file__).parent / "configs").glob("*.json"))
CASES_PER_SEED = 40
WEIRD = [None, True, False, 0, -1, 1, 2.5, -1e-3, 1e20, 1e300, -1e300, float("nan"),
         float("inf"), -float("inf"), 10**30, -(10**30), 10**5000, "", "auto", "x" * 200,
         "\x00", "1e3", [], [1, "2"], {}, {"enabled": True}, {"a": {"b": {}}}, "NaN"]
NASTY = [10**5000, -(10**5000), float("nan"), float("inf"), 1e300, -1e300, 10**30, 2**64]


def _paths(doc, prefix=()):
    """(container, key) for every value in the document."""
    out = []
    if isinstance(doc, dict):
        items = list(doc.items())
    elif isinstance(doc, list):
        items = list(enumerate(doc))
    else:
        return out
    for k, v in items:
        out.append((doc, k))
        out += _paths(v, prefix + (k,))
    return out


def _typo(key: str, rng: random.Random) -> str:
    if not key:
        return "x"
    i = rng.randrange(len(key))
    kind = rng.randrange(4)
    if kind == 0:
        return key[:i] + key[i + 1:]
    if kind == 1:
        return key[:i] + rng.choice("abcdez_") + key[i:]
    if kind == 2:
        return key.upper()
    return key.title()


def _deep(levels: int):
    doc: dict = {}
    inner = doc
    for _ in range(levels):
        inner["k"] = {}
        inner = inner["k"]
    return doc


def mutate(doc: dict, rng: random.Random) -> dict:
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 4)):
        spots = _paths(doc)
        if not spots:
            doc["train_batch_size"] = rng.choice(WEIRD)
            continue
        parent, key = rng.choice(spots)
        op = rng.choice([0, 1, 2, 2, 3, 4, 5, 5, 6])
        if op == 0 and isinstance(parent, dict):
            del parent[key]
        elif op == 1 and isinstance(parent, dict) and isinstance(key, str):
            parent[_typo(key, rng)] = parent.pop(key)
        elif op == 2:
            parent[key] = rng.choice(WEIRD if rng.random() < 0.5 else NASTY)
        elif op == 3:
            parent[key] = _deep(rng.choice([5, 40, 300]))
        elif op == 4:
            value = parent[key]
            parent[key] = ([value] if rng.random() < 0.5 else {"value": value})
        elif op == 5 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
            try:
                parent[key] = parent[key] * rng.choice([-1, 0, 10**6, 1e300, float("nan"),
                                                        10**5000])
            except OverflowError:  # a huge int times a float
                parent[key] = float("inf")
        else:
            parent[key] = str(parent[key])[:50]
    return doc


def _check(doc) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            plan = load_config(doc, 2)
        except ConfigError as err:
            assert err.problems, err
            for p in err.problems:
                assert isinstance(p.message, str) and p.message, p
                # a JSON path into the document; only a file that cannot be read as a JSON
                # object at all gets a problem about the document as a whole
                assert p.path or (not isinstance(doc, dict) and (
                    "JSON" in p.message or "config file" in p.message)), p
                assert p.path in str(err)
            assert str(err).startswith("shardwise config has")
            return
    assert isinstance(plan, Plan)


@pytest.mark.parametrize("seed_file", SEEDS, ids=[p.name for p in SEEDS])
def test_mutated_real_config_gives_a_plan_or_a_config_error(seed_file):
    base = json.loads(seed_file.read_text())
    rng = random.Random(f"shardwise-fuzz-{seed_file.name}")
    for _ in range(CASES_PER_SEED):
        doc = mutate(base, rng)
        try:
            _check(doc)
        except Exception as exc:  # report the document that broke it
            raise AssertionError(f"{type(exc).__name__}: {exc}\nfor {doc!r:.2000}") from exc


def test_mutated_config_file_gives_a_config_error_naming_the_path(tmp_path):
    rng = random.Random("shardwise-fuzz-files")
    base = json.loads(SEEDS[0].read_text())
    for i in range(40):
        doc = mutate(base, rng)
        f = tmp_path / f"ds{i}.json"
        f.write_text(_dumps(doc))
        _check(f)


def _dumps(doc) -> str:
    """JSON text, integers too long for ``json.dumps`` included (written as digits)."""
    def swap(v):
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 10_000:
            return "__HUGE__"
        return v
    return json.dumps(swap(doc)).replace('"__HUGE__"', "1" + "0" * 5000)


def test_problems_name_a_path_when_a_key_is_bad():
    rng = random.Random("shardwise-fuzz-paths")
    base = json.loads(SEEDS[0].read_text())
    for _ in range(60):
        doc = copy.deepcopy(base)
        parent, key = rng.choice(_paths(doc))
        parent[key] = rng.choice([float("nan"), 10**5000, -1e300, "x" * 200, _deep(300)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                load_config(doc, 2)
            except ConfigError as err:
                assert all(p.path for p in err.problems), err
