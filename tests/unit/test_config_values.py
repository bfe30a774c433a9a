"""Issue 11 (config): every bad input is one ConfigError naming each problem's JSON path.

One table per class of problem: values that cannot train (5), numbers without a range (6),
typos in once-open sections (7), inputs that used to escape as bare Python exceptions (8),
problems hidden behind another problem in the same section (9), keys in the wrong case (11).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from shardwise.config import UNKNOWN_KEY, load_config
from shardwise.config.plan import OptimizerPlan, SchedulerPlan
from shardwise.errors import ConfigError
from shardwise.optim import build_optimizer, build_scheduler

BASE = {"train_batch_size": 8}
NAN, INF = float("nan"), float("inf")


def problems_of(doc, world_size=2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError) as info:
            load_config(doc, world_size)
    return list(info.value.problems)


def problem_at(doc, path):
    found = problems_of(doc)
    at = [p for p in found if p.path == path]
    assert at, f"no problem at {path}: {found}"
    return at[0]


def opt(**params):
    return {**BASE, "optimizer": {"type": "AdamW", "params": params}}


def sched(type_, **params):
    return {**BASE, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
            "scheduler": {"type": type_, "params": params}}


# --- 5: values that cannot train ---------------------------------------------------------------

CANNOT_TRAIN = [
    (opt(lr=NAN), "optimizer.params.lr", "finite"),
    (opt(lr=INF), "optimizer.params.lr", "finite"),
    (opt(lr=-1e-3), "optimizer.params.lr", "greater than or equal to 0"),
    (opt(eps=NAN), "optimizer.params.eps", "finite"),
    (opt(eps=-1e-8), "optimizer.params.eps", "greater than or equal to 0"),
    (opt(weight_decay=-0.1), "optimizer.params.weight_decay", "greater than or equal to 0"),
    (opt(weight_decay=INF), "optimizer.params.weight_decay", "finite"),
    (opt(betas=[0.9, NAN]), "optimizer.params.betas", "finite"),
    (opt(betas=[-0.1, 0.9]), "optimizer.params.betas", "item [0]"),
    ({**BASE, "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": -0.9}}},
     "optimizer.params.momentum", "greater than or equal to 0"),
    (sched("WarmupCosineLR", total_num_steps=10, warmup_min_ratio=NAN),
     "scheduler.params.warmup_min_ratio", ">= 0"),
    (sched("WarmupCosineLR", total_num_steps=10, cos_min_ratio=-0.5),
     "scheduler.params.cos_min_ratio", ">= 0"),
    (sched("WarmupLR", warmup_max_lr=INF), "scheduler.params.warmup_max_lr", "finite"),
    (sched("WarmupDecayLR", total_num_steps=NAN), "scheduler.params.total_num_steps", "> 0"),
    (sched("StepLR", step_size=2, gamma=-0.5), "scheduler.params.gamma",
     "greater than or equal to 0"),
    (sched("StepLR", step_size=2, gamma=NAN), "scheduler.params.gamma", "finite"),
    (sched("CosineAnnealingLR", T_max=10, eta_min=-1e-5), "scheduler.params.eta_min",
     "greater than or equal to 0"),
    ({**BASE, "zero_optimization": {"stage": 3, "stage3_max_live_parameters": -1}},
     "zero_optimization.stage3_max_live_parameters", "greater than or equal to 0"),
    ({**BASE, "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": -5e7}},
     "zero_optimization.stage3_prefetch_bucket_size", "greater than or equal to 0"),
    ({**BASE, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": -1}},
     "zero_optimization.stage3_param_persistence_threshold", "greater than or equal to 0"),
    ({**BASE, "zero_optimization": {"stage": 3, "max_reuse_distance": -1}},
     "zero_optimization.stage3_max_reuse_distance", "greater than or equal to 0"),
]


@pytest.mark.parametrize(("doc", "path", "fragment"), CANNOT_TRAIN,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(CANNOT_TRAIN)])
def test_value_that_cannot_train_is_refused_with_key_and_range(doc, path, fragment):
    problem = problem_at(doc, path)
    assert fragment in problem.message


# --- 6: every number has a range ----------------------------------------------------------------

OUT_OF_RANGE = [
    ({"fp16": {"enabled": True, "initial_scale_power": 1e20}}, "fp16.initial_scale_power",
     "0 <= value <= 64"),
    ({"fp16": {"enabled": True, "initial_scale_power": 65}}, "fp16.initial_scale_power",
     "less than or equal to 64"),
    ({"fp16": {"enabled": True, "loss_scale": 1e300}}, "fp16.loss_scale", "less than or equal"),
    ({"fp16": {"enabled": True, "min_loss_scale": 0}}, "fp16.min_loss_scale", "greater than 0"),
    ({"fp16": {"enabled": True, "loss_scale_window": 10**30}}, "fp16.loss_scale_window",
     "2**63-1"),
    ({"comms_timeout": 1e300}, "comms_timeout", "value <= 31536000"),
    ({"comms_timeout": 0}, "comms_timeout", "greater than 0"),
    ({"comms_timeout": -5}, "comms_timeout", "greater than 0"),
    ({"zero_optimization": {"reduce_bucket_size": 1e30}}, "zero_optimization.reduce_bucket_size",
     "less than or equal to"),
    ({"zero_optimization": {"allgather_bucket_size": -1}},
     "zero_optimization.allgather_bucket_size", "greater than or equal to 0"),
    ({"train_micro_batch_size_per_gpu": 2**40}, "train_micro_batch_size_per_gpu",
     "less than or equal to 2147483647"),
    ({"gradient_accumulation_steps": -2}, "gradient_accumulation_steps", "greater than 0"),
    ({"gradient_clipping": 1e300}, "gradient_clipping", "less than or equal"),
    ({"steps_per_print": 1e30}, "steps_per_print", "2**63-1"),
    ({"checkpoint": {"dir": "x", "keep_last": 0}}, "checkpoint.keep_last", "greater than 0"),
    ({"checkpoint": {"dir": "x", "save_interval": -1}}, "checkpoint.save_interval",
     "greater than 0"),
    ({"aio": {"block_size": -1}}, "aio.block_size", "greater than or equal to 4096"),
    ({"aio": {"block_size": 2**40}}, "aio.block_size", "less than or equal to 1073741824"),
    ({"aio": {"queue_depth": 0}}, "aio.queue_depth", "greater than or equal to 1"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "buffer_size": 0}}},
     "zero_optimization.offload_param.buffer_size", "greater than or equal to 1"),
    ({"zero_optimization": {"offload_optimizer": {"ratio": 1.5}}},
     "zero_optimization.offload_optimizer.ratio", "less than or equal to 1"),
    ({"offload": {"host_memory_budget": 10**30}}, "offload.host_memory_budget", "2**63-1"),
    ({"vocabulary_size": -1}, "vocabulary_size", "greater than or equal to 0"),
    ({"flops_profiler": {"module_depth": -2}}, "flops_profiler.module_depth",
     "greater than or equal to -1"),
    ({"eigenvalue": {"tol": -1.0}}, "eigenvalue.tol", "greater than or equal to 0"),
    ({"zero_optimization": {"stage": 3, "sub_group_size": 10**20}},
     "zero_optimization.sub_group_size", "2**63-1"),
]


@pytest.mark.parametrize(("extra", "path", "fragment"), OUT_OF_RANGE,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(OUT_OF_RANGE)])
def test_number_outside_its_range_is_refused_with_the_range(extra, path, fragment):
    doc = {**BASE, **extra} if "train" not in next(iter(extra)) else extra
    problem = problem_at(doc, path)
    assert fragment in problem.message
    assert "allowed:" in problem.message


def test_every_numeric_schema_field_has_a_range():
    # typed("int"/"float") refuses to build without a range, so the schema could not import
    # with one missing; check the behaviour too: a huge number is refused everywhere
    from shardwise.config.ranges import typed
    with pytest.raises(TypeError):
        typed("int")
    with pytest.raises(TypeError):
        typed("float", nullable=True)


# --- 7: closed sections -------------------------------------------------------------------------

TYPOS = [
    ({"expert_parallel": {"enabeld": True}}, "expert_parallel.enabeld", "'enabled'"),
    ({"tensor_parallel": {"autotp_sise": 2}}, "tensor_parallel.autotp_sise", "'autotp_size'"),
    ({"tensor_parallel": {"tp": {"tp_sise": 2}}}, "tensor_parallel.tp.tp_sise", "'tp_size'"),
    ({"amp": {"enabled": False, "opt_levl": "O1"}}, "amp.opt_levl", "'opt_level'"),
    ({"amp": {"enbled": True}}, "amp.enbled", "'enabled'"),
    ({"expert_parallel": {"enabled": False, "autoep_sise": 2}}, "expert_parallel.autoep_sise",
     "'autoep_size'"),
]


@pytest.mark.parametrize(("extra", "path", "hint"), TYPOS, ids=[t[1] for t in TYPOS])
def test_typo_in_any_section_is_an_unknown_key_with_did_you_mean(extra, path, hint):
    problem = problem_at({**BASE, **extra}, path)
    assert problem.message.startswith(UNKNOWN_KEY)
    assert hint in problem.hint


def test_no_section_of_the_schema_is_open():
    from shardwise.config import DeepSpeedConfig
    from shardwise.config.schema import _submodel
    stack, seen = [DeepSpeedConfig], 0
    while stack:
        model = stack.pop()
        seen += 1
        assert model.model_config.get("extra") == "forbid", model.__name__
        for name, field in model.model_fields.items():
            sub = _submodel(field)
            if sub is not None:
                stack.append(sub)
            elif name == "params":  # optimizer/scheduler params: shardwise.optim checks them
                assert model.__name__ in ("OptimizerSection", "SchedulerSection")
            elif name == "kwargs":  # torch.compile's arguments: every key checked (resolve_compile.py)
                assert model.__name__ == "CompileSection"
            elif name == "tp_plan":  # {pattern: style}: every entry checked (schema_parallel.py)
                assert model.__name__ == "TensorParallelSection"
            elif "dict" in str(field.annotation):  # an opaque payload: refused unless null
                assert field.default is None and (field.json_schema_extra or {}).get("sw") \
                    == "default", field
    assert seen > 40


def test_opaque_payload_is_refused_unless_null_or_switched_off():
    problem = problem_at({**BASE, "datastates_ckpt": {"host_cache_size": 16}}, "datastates_ckpt")
    assert "does not implement" in problem.message
    load_config({**BASE, "quantize_training": {"enabled": False, "quantize_bits": {"x": 1}}}, 2)


# --- 8: never a bare Python exception ---------------------------------------------------------


def _deep(levels):
    doc = {}
    inner = doc
    for _ in range(levels):
        inner["a"] = {}
        inner = inner["a"]
    return doc


NAMED = [
    (opt(betas=["0.9", "0.999"]), "optimizer.params.betas", "item is a number"),
    (sched("StepLR", step_size=0), "scheduler.params.step_size", "greater than 0"),
    (sched("StepLR"), "scheduler.params.step_size", "missing"),
    (sched("CosineAnnealingLR", T_max="10"), "scheduler.params.T_max", "an integer"),
    (sched("CosineAnnealingWarmRestarts", T_0=0), "scheduler.params.T_0", "greater than 0"),
    (sched("MultiStepLR", milestones=[1, "2"]), "scheduler.params.milestones", "integer"),
    (sched("CyclicLR", base_lr=0.1, max_lr=1.0, mode="tri"), "scheduler.params.mode",
     "'triangular'"),
    (sched("PolynomialLR", power=-1), "scheduler.params.power", "greater than or equal to 0"),
    ({**BASE, "zero_optimization": {"stage": 10**5000}}, "zero_optimization.stage",
     "digits"),
    ({**BASE, "gradient_clipping": 10**5000}, "gradient_clipping", "digits"),
    (opt(lr=10**5000), "optimizer.params.lr", "digits"),
    ({**BASE, "comms_timeout": 10**400}, "comms_timeout", "finite number"),
    ({**BASE, "comms_timeout": 1e300}, "comms_timeout", "less than or equal"),
    ({**BASE, "pipeline": {"stages": 10**5000}}, "pipeline.stages", "digits"),
    ({**BASE, "zero_optimization": {"cpu_offload": 10**5000}}, "zero_optimization.cpu_offload",
     "digits"),
    ({**BASE, "optimizer": _deep(300)}, "optimizer", "levels deep"),
    ({**BASE, "checkpoint": {"dir": "a\x00b"}}, "checkpoint.dir", "NUL"),
    ({**BASE, 3: 1}, "", "keys must be strings"),
]


@pytest.mark.parametrize(("doc", "path", "fragment"), NAMED,
                         ids=[f"{n[1] or 'root'}-{i}" for i, n in enumerate(NAMED)])
def test_input_that_raised_a_bare_exception_is_a_named_config_error(doc, path, fragment):
    found = problems_of(doc)
    at = [p for p in found if p.path == path or p.path.startswith(path + ".")]
    assert at, found
    assert any(fragment in p.message for p in at), at
    str(ConfigError(found))  # formatting never raises


def test_self_containing_dict_is_a_config_error():
    doc = {**BASE, "zero_optimization": {}}
    doc["zero_optimization"]["me"] = doc
    assert any("levels deep" in p.message for p in problems_of(doc))


FILES = [
    ('{"train_batch_size": 1' + "0" * 5000 + "}", "train_batch_size", "digits"),
    ('{"train_batch_size": 8, "fp16": {"loss_scale": 1' + "0" * 5000 + "}}", "fp16.loss_scale",
     "digits"),
    ('{"train_batch_size": 8, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "", "nested"),
    ('{"train_batch_size": 8, "x": ' + "[" * 200 + "]" * 200 + "}", "x", "levels deep"),
    ('{"train_batch_size": 8, "comms_timeout": 1e400}', "comms_timeout", "finite"),
    ('{"train_batch_size": 8, "gradient_clipping": NaN}', "gradient_clipping", "finite"),
]


@pytest.mark.parametrize(("text", "path", "fragment"), FILES, ids=[f[1] or "root" for f in FILES])
def test_json_file_that_raised_a_bare_exception_is_a_named_config_error(tmp_path, text, path,
                                                                         fragment):
    f = tmp_path / "ds.json"
    f.write_text(text)
    found = problems_of(f)
    at = [p for p in found if p.path == path or p.path.startswith(path + "[")]
    assert at and any(fragment in p.message for p in at), found


@pytest.mark.parametrize("source", ["ds\x00.json", "/" + "x" * 5000])
def test_unreadable_config_path_is_a_config_error(source):
    (problem,) = problems_of(source)
    assert "cannot read config file" in problem.message or "not found" in problem.message


BUILD = [
    (OptimizerPlan("AdamW", (("betas", ("0.9", "0.999")),)), "optimizer.params.betas"),
    (OptimizerPlan("AdamW", (("lr", NAN),)), "optimizer.params.lr"),
    (SchedulerPlan("StepLR", (("step_size", 0),)), "scheduler.params.step_size"),
    (SchedulerPlan("CosineAnnealingLR", (("T_max", "10"),)), "scheduler.params.T_max"),
    (SchedulerPlan("ExponentialLR", (("gamma", INF),)), "scheduler.params.gamma"),
]


@pytest.mark.parametrize(("plan", "path"), BUILD, ids=[b[1] for b in BUILD])
def test_build_refuses_what_torch_would_fail_on_later(plan, path):
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError) as info:
        if isinstance(plan, OptimizerPlan):
            build_optimizer(plan, p)
        else:
            build_scheduler(plan, torch.optim.SGD(p, lr=0.1))
    assert [q.path for q in info.value.problems] == [path]


# --- 9: every problem of the document in one error ---------------------------------------------

HIDDEN = [  # (doc, the problem that makes a section unparsable, the one it used to hide)
    ({**BASE, "optimizer": {"type": "AdamW", "lr": 0.1, "params": {"betas": [0.9]}}},
     "optimizer.lr", "optimizer.params.betas"),
    ({**BASE, "optimizer": {"type": "AdamW", "params": {"lr": "auto", "eps": -1}}},
     "optimizer.params.lr", "optimizer.params.eps"),
    ({**BASE, "fp16": {"enabled": True, "loss_scale": "x"}, "bf16": {"enabled": True}},
     "fp16.loss_scale", "fp16.enabled"),
    ({**BASE, "zero_optimization": {"stage": "two", "reduce_bucket_size": 0}},
     "zero_optimization.stage", "zero_optimization.reduce_bucket_size"),
    ({**BASE, "checkpoint": {"keep_last": -1, "auto_resume": True}}, "checkpoint.keep_last",
     "checkpoint.auto_resume"),
    ({**BASE, "data_types": {"grad_accum_dtype": "fp16", "param_dtype": 3},
      "bf16": {"enabled": True}}, "data_types.param_dtype", "data_types.grad_accum_dtype"),
    ({**BASE, "scheduler": {"type": "WarmupLR", "extra": 1, "params": {"warmup_num_steps": 0}},
      "optimizer": {"type": "SGD", "params": {"lr": 0.1}}},
     "scheduler.extra", "scheduler.params.warmup_num_steps"),
    ({**BASE, "fp16": {"enabled": "true", "fp16_master_weights_and_grads": True}},
     "fp16.enabled", "fp16.fp16_master_weights_and_grads"),
    ({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 3,
      "zero_optimization": {"stage": 9}}, "zero_optimization.stage", "train_batch_size"),
]


@pytest.mark.parametrize(("doc", "first", "hidden"), HIDDEN, ids=[h[2] for h in HIDDEN])
def test_a_broken_section_does_not_hide_the_other_problems_in_it(doc, first, hidden):
    paths = {p.path for p in problems_of(doc)}
    assert {first, hidden} <= paths, paths


# --- 11: keys in the wrong case ------------------------------------------------------------------

CASE = [
    ({"TRAIN_BATCH_SIZE": 8}, "TRAIN_BATCH_SIZE", "'train_batch_size'"),
    ({**BASE, "Zero_Optimization": {"stage": 1}}, "Zero_Optimization", "'zero_optimization'"),
    ({**BASE, "zero_optimization": {"STAGE": 1}}, "zero_optimization.STAGE", "'stage'"),
    ({**BASE, "FP16": {"enabled": True}}, "FP16", "'fp16'"),
    ({**BASE, "fp16": {"Enabled": True}}, "fp16.Enabled", "'enabled'"),
    ({**BASE, "Gradient_Clipping": 1.0}, "Gradient_Clipping", "'gradient_clipping'"),
    ({**BASE, "ZERO_OPTIMISATION": {}}, "ZERO_OPTIMISATION", "'zero_optimization'"),
]


@pytest.mark.parametrize(("doc", "path", "hint"), CASE, ids=[c[1] for c in CASE])
def test_key_in_the_wrong_case_gets_did_you_mean(doc, path, hint):
    problem = problem_at(doc, path)
    assert problem.message.startswith(UNKNOWN_KEY)
    assert f"did you mean {hint}?" == problem.hint


def test_real_configs_still_load():
    from pathlib import Path
    for name in ("ds_zero0.json", "ds_zero1.json", "ds_zero2.json", "ds_zero3.json"):
        path = Path(__file__).parents[2] / "examples" / "gpt" / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert load_config(json.loads(path.read_text()), 2).world_size == 2
