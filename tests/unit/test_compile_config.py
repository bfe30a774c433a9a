"""The config's ``compile`` section (schema_compile.py, resolve_compile.py) and compile.py's pure parts."""
from __future__ import annotations

import dataclasses

import pytest
import torch.nn as nn

from shardwise.compile import CompileReport, GraphBreak, RegionStats, compile_regions, policy_arguments
from shardwise.config import plan_for
from shardwise.config.plan import CompilePolicy
from shardwise.config.schema import default
from shardwise.errors import ConfigError


def problems(doc: dict) -> list:
    with pytest.raises(ConfigError) as err:
        plan_for(doc)
    return err.value.problems


def test_defaults_once_in_the_schema():
    policy = plan_for({}).compile
    assert policy == CompilePolicy(enabled=default("compile.enabled"), backend=default("compile.backend"),
                                   mode=default("compile.mode"), kwargs=tuple(default("compile.kwargs").items()))
    assert (policy.enabled, policy.backend, policy.mode, policy.kwargs) == (False, "inductor", None, ())
    assert {f.name for f in dataclasses.fields(CompilePolicy)} == {"enabled", "backend", "mode", "kwargs"}


def test_section_resolves_frozen():
    p = plan_for({"compile": {"enabled": True, "backend": "aot_eager",
                              "kwargs": {"dynamic": False, "options": {"b": 2, "a": 1}}}}).compile
    assert p == CompilePolicy(True, "aot_eager", None, (("dynamic", False), ("options", (("a", 1), ("b", 2)))))
    hash(p)  # frozen all the way down
    assert policy_arguments(p) == ("aot_eager", None, {"dynamic": False, "options": {"a": 1, "b": 2}})


@pytest.mark.parametrize("doc", [{"mode": "max-autotune"}, {"kwargs": {"mode": "max-autotune"}},
                                 {"mode": "max-autotune", "kwargs": {"mode": "max-autotune"}}])
def test_mode_either_spelling(doc):
    assert plan_for({"compile": doc}).compile.mode == "max-autotune"
    assert plan_for({"compile": doc}).compile.kwargs == ()


@pytest.mark.parametrize("section,path,words", [
    ({"backend": "inductr"}, "compile.backend", ["unknown torch.compile backend 'inductr'", "did you mean 'inductor'"]),
    ({"backend": "aot_eagr"}, "compile.backend", ["did you mean 'aot_eager'"]),
    ({"backend": "no_such_pkg_xyz:fn"}, "compile.backend", ["could not be loaded", "ModuleNotFoundError"]),
    ({"mode": "max-autotun"}, "compile.mode", ["unknown torch.compile mode", "did you mean 'max-autotune'"]),
    ({"kwargs": {"mode": "reduce-overhed"}}, "compile.kwargs.mode", ["did you mean 'reduce-overhead'"]),
    ({"mode": "max-autotune", "backend": "aot_eager"}, "compile.mode", ["inductor setting"]),
    ({"mode": "max-autotune", "kwargs": {"mode": "default"}}, "compile.kwargs.mode", ["given too"]),
    ({"kwargs": {"fulgraph": True}}, "compile.kwargs.fulgraph", ["no argument 'fulgraph'", "did you mean 'fullgraph'"]),
    ({"kwargs": {"backend": "eager"}}, "compile.kwargs.backend", ["its own key"]),
    ({"backnd": "eager"}, "compile.backnd", ["unknown key", "did you mean 'backend'"]),
    ({"enabled": "yes"}, "compile.enabled", []),
    ({"kwargs": [1]}, "compile.kwargs", []),
])
def test_bad_values_are_named(section, path, words):
    found = problems({"compile": section})
    assert [p.path for p in found] == [path], found
    text = f"{found[0].message} {found[0].hint or ''}"
    for w in words:
        assert w in text, text


def test_custom_backend_by_module_path():
    assert plan_for({"compile": {"backend": "shardwise.compile:known_backends"}}).compile.backend == \
        "shardwise.compile:known_backends"


def test_deepcompile_keys_refused_unless_default():
    found = problems({"compile": {"deepcompile": True, "free_activation": True}})
    assert [p.path for p in found] == ["compile.deepcompile"]
    assert "DeepCompile" in found[0].message and "compile" in found[0].message
    # while deepcompile is off, its keys change nothing and are accepted (as before)
    assert plan_for({"compile": {"free_activation": True, "passes": ["x"]}}).compile.enabled is False


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(2, 2)
        self.layers = nn.ModuleList([_Block(), _Block(), _Block()])


def test_regions_are_the_blocks_or_the_model():
    net = _Net()
    assert [n for n, _ in compile_regions(net)] == ["layers.0", "layers.1", "layers.2"]
    assert [n for n, _ in compile_regions(net, "blocks")] == ["layers.0", "layers.1", "layers.2"]
    assert [n for n, _ in compile_regions(net, ("Linear",))] == ["emb", "layers.0.fc", "layers.1.fc", "layers.2.fc"]
    flat = nn.Sequential(nn.Linear(2, 2))
    assert compile_regions(flat) == [("", flat)]


def test_report_counts_and_summary():
    rep = CompileReport("inductor", None, 3, [RegionStats("b.0", "B", calls=2, compiled_runs=2, graphs=1),
                                              RegionStats("b.1", "B", calls=2, compiled_runs=4, breaks=1)],
                        breaks=[GraphBreak("b.1", "Tensor.item()", "m.py:3")])
    d = rep.as_dict()
    assert (d["graphs"], d["graph_breaks"]) == (1, 1)
    assert d["breaks"] == [{"region": "b.1", "reason": "Tensor.item()", "where": "m.py:3"}]
    assert "2 regions (b.0, b.1), 1 graphs, 1 graph breaks; first break in b.1 at m.py:3" in rep.summary()


@pytest.mark.parametrize("key,value", [("fullgraph", 1), ("dynamic", "yes"), ("options", [1]), ("disable", None)])
def test_kwargs_values_are_checked(key, value):
    found = problems({"compile": {"kwargs": {key: value}}})
    assert [p.path for p in found] == [f"compile.kwargs.{key}"] and "must be" in found[0].message
