"""Config layer: DeepSpeed JSON -> schema -> resolve -> frozen Plan (faults.md rows 11-12)."""
from __future__ import annotations

import dataclasses
import json
import sys
import types
import warnings
from pathlib import Path

import pytest

from shardwise.config import (AUTO_UNRESOLVED, NOT_IMPLEMENTED, UNKNOWN_KEY,
                              ConfigDeprecationWarning, ConfigWarning, DeepSpeedConfig,
                              LossScalePlan, Plan, load_config, parse_config, resolve_config)
from shardwise.config import resolve as resolve_mod
from shardwise.config.schema import ZeroSection
from shardwise.errors import ConfigError, ConfigProblem, ShardwiseError, UsageError

CONFIGS = Path(__file__).parent / "configs"


@pytest.fixture
def optim_checks():
    """Requested by the tests of the hand-off to shardwise.optim's checks."""


@pytest.fixture(autouse=True)
def _no_optim_checks(request, monkeypatch):
    """Keep these tests about the config layer: shardwise.optim's own checks are stubbed
    out except in the tests that request ``optim_checks``."""
    if "optim_checks" not in request.fixturenames:
        monkeypatch.setattr(resolve_mod, "_spec_messages", lambda name, type_, params: [])


def problems_of(doc, world_size=2) -> list[ConfigProblem]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError) as info:
            load_config(doc, world_size)
    assert all(isinstance(p, ConfigProblem) for p in info.value.problems)
    return list(info.value.problems)


def only_problem(doc, world_size=2) -> ConfigProblem:
    found = problems_of(doc, world_size)
    assert len(found) == 1, found
    return found[0]


def ok(doc, world_size=2) -> Plan:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(doc, world_size)


BASE = {"train_batch_size": 8}


# --- wrong types and values ---------------------------------------------------------------

BAD = [
    ({"train_batch_size": 8.5}, "train_batch_size", "expected an integer, got the number 8.5"),
    ({"train_batch_size": "8"}, "train_batch_size", 'expected an integer, got the string "8"'),
    ({"train_batch_size": True}, "train_batch_size", "expected an integer, got true"),
    ({"train_batch_size": 0}, "train_batch_size", "must be greater than 0"),
    ({**BASE, "zero_optimization": {"stage": "two"}}, "zero_optimization.stage",
     'expected an integer, got the string "two"'),
    ({**BASE, "zero_optimization": {"stage": 5}}, "zero_optimization.stage",
     "must be 0, 1, 2 or 3"),
    ({**BASE, "zero_optimization": {"reduce_bucket_size": -1}},
     "zero_optimization.reduce_bucket_size", "greater than or equal to 0"),
    ({**BASE, "zero_optimization": {"overlap_comm": "yes"}}, "zero_optimization.overlap_comm",
     "expected true or false"),
    ({**BASE, "zero_optimization": {"offload_optimizer": {"device": "gpu"}}},
     "zero_optimization.offload_optimizer.device", "must be 'none', 'cpu' or 'nvme'"),
    ({**BASE, "gradient_clipping": "1.0"}, "gradient_clipping", "expected a finite number"),
    ({**BASE, "gradient_clipping": -1}, "gradient_clipping", "greater than or equal to 0"),
    ({**BASE, "wall_clock_breakdown": 1}, "wall_clock_breakdown", "expected true or false"),
    ({**BASE, "steps_per_print": 0}, "steps_per_print", "greater than 0"),
    ({**BASE, "fp16": True}, "fp16", "expected an object"),
    ({**BASE, "fp16": {"enabled": True, "loss_scale": -2}}, "fp16.loss_scale",
     "greater than or equal to 0"),
    ({**BASE, "fp16": {"enabled": True, "hysteresis": 0}}, "fp16.hysteresis", "greater than 0"),
    ({**BASE, "optimizer": {"params": {"lr": 1}}}, "optimizer.type", "required key is missing"),
    ({**BASE, "optimizer": {"type": "AdamW", "params": [1]}}, "optimizer.params",
     "expected an object"),
    ({**BASE, "optimizer": {"type": 3}}, "optimizer.type", "expected a string"),
    ({**BASE, "tensorboard": {"enabled": "yes"}}, "tensorboard.enabled", "expected true or false"),
    ({**BASE, "zero_optimization": {"cpu_offload": "yes"}}, "zero_optimization.cpu_offload",
     "expected true or false"),
]


@pytest.mark.parametrize(("doc", "path", "fragment"), BAD,
                         ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_value_is_reported_with_path_and_expectation(doc, path, fragment):
    problem = only_problem(doc)
    assert problem.path == path
    assert fragment in problem.message


UNKNOWN = [
    ({**BASE, "zero_optimisation": {"stage": 2}}, "zero_optimisation",
     "did you mean 'zero_optimization'?"),
    ({**BASE, "zero_optimization": {"stag": 2}}, "zero_optimization.stag", "did you mean 'stage'?"),
    ({**BASE, "tensorboard": {"output_pth": "x"}}, "tensorboard.output_pth",
     "did you mean 'output_path'?"),
    ({**BASE, "zero_optimization": {"offload_optimizer": {"pin_mem": True}}},
     "zero_optimization.offload_optimizer.pin_mem", "did you mean 'pin_memory'?"),
    ({**BASE, "fp16": {"enable": True}}, "fp16.enable", "did you mean 'enabled'?"),
    ({**BASE, "optimizer": {"type": "AdamW", "lr": 0.1}}, "optimizer.lr",
     "inside 'optimizer.params'"),
    ({**BASE, "stage3_max_live_parameters": 1e9}, "stage3_max_live_parameters",
     "belongs in 'zero_optimization'"),
    ({**BASE, "zero_optimization": {"gradient_clipping": 1.0}},
     "zero_optimization.gradient_clipping", "belongs at the top level"),
]


@pytest.mark.parametrize(("doc", "path", "hint"), UNKNOWN, ids=[u[1] for u in UNKNOWN])
def test_unknown_key_gets_did_you_mean(doc, path, hint):
    problem = only_problem(doc)
    assert problem.path == path
    assert problem.message.startswith(UNKNOWN_KEY)
    assert hint in problem.hint


def test_many_problems_in_many_sections_come_in_one_error():
    doc = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 3,
           "gradient_accumulation_steps": 1, "zero_optimisation": {"stage": 2},
           "zero_optimization": {"stage": "two", "stag": 1}, "fp16": {"enabled": True},
           "bf16": {"enabled": True}, "gradient_clipping": "1.0", "trackio": {"enabled": True},
           "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    with pytest.raises(ConfigError) as info:
        load_config(doc, 2)
    paths = [p.path for p in info.value.problems]
    assert paths == sorted(paths)
    assert set(paths) == {"train_batch_size", "zero_optimisation", "zero_optimization.stage",
                          "zero_optimization.stag", "fp16.enabled", "gradient_clipping",
                          "trackio.enabled", "optimizer.params.lr"}
    text = str(info.value)
    assert text.startswith("shardwise config has 8 problems:")
    assert "(did you mean 'zero_optimization'?)" in text
    assert isinstance(info.value, ShardwiseError)


# --- accepted as written ---------------------------------------------------------------------


def test_known_keys_at_their_defaults_are_accepted():
    doc = {
        "train_micro_batch_size_per_gpu": 4.0, "prescale_gradients": False,
        "gradient_predivide_factor": 1.0, "sparse_gradients": False, "dump_state": False,
        "memory_breakdown": False, "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False, "communication_data_type": None,
        "zero_optimization": {"stage": 2, "allgather_bucket_size": 5e8, "reduce_bucket_size": 2e8,
                              "offload_optimizer": {"device": "none", "pin_memory": True},
                              "offload_param": {"device": "none"}, "allgather_partitions": True,
                              "stage3_max_live_parameters": 1e9, "max_reuse_distance": 1e9,
                              "sub_group_size": 1e12, "elastic_checkpoint": True},
        "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": False,
                                     "contiguous_memory_optimization": False,
                                     "number_checkpoints": None, "profile": False,
                                     "synchronize_checkpoint_boundary": False},
        "tensorboard": {"enabled": False, "output_path": "runs/", "job_name": "x"},
        "wandb": {"enabled": False, "project": "p"}, "csv_monitor": {"enabled": False},
        "comms_logger": {"enabled": False, "verbose": True},
        "flops_profiler": {"enabled": False, "profile_step": 3, "detailed": False},
        "amp": {"enabled": False, "opt_level": "O1"}, "sparse_attention": None,
        "aio": {"block_size": 262144, "queue_depth": 32, "thread_count": 1},
        "checkpoint": {"tag_validation": "warn", "load_universal": False},
        "pipeline": {"stages": "auto", "partition": "best"},
        "fp16": {"enabled": False, "auto_cast": True}, "elasticity": {"enabled": False},
        "data_types": {"grad_accum_dtype": None}, "steps_per_print": 1e3,
    }
    plan = ok(doc, world_size=2)
    assert plan.batch.micro_batch_size == 4 and plan.batch.train_batch_size == 8
    assert plan.zero.allgather_bucket_size == 500_000_000
    assert type(plan.zero.reduce_bucket_size) is int
    assert plan.zero.reduce_bucket_size == 200_000_000
    assert plan.steps_per_print == 1000


NOT_IMPL = [
    ({"trackio": {"enabled": True}}, "trackio.enabled", "false"),
    ({"autotuning": {"enabled": True}}, "autotuning.enabled", "false"),
    ({"amp": {"enabled": True, "opt_level": "O1"}}, "amp.enabled", "false"),
    ({"elasticity": {"enabled": True, "max_gpus": 4}}, "elasticity.enabled", "false"),
    ({"communication_data_type": "fp32"}, "communication_data_type", None),
    ({"sparse_attention": {"mode": "fixed"}}, "sparse_attention", None),
    ({"compression_training": {"weight_quantization": {}}}, "compression_training", None),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "super_offload": True}}},
     "zero_optimization.offload_optimizer.super_offload", "false"),
    ({"aio": {"use_gds": True}}, "aio.use_gds", "false"),
    ({"zero_optimization": {"stage": 3, "stage3_model_persistence_threshold": 1e7}},
     "zero_optimization.stage3_model_persistence_threshold", "9223372036854775807"),
    ({"zero_optimization": {"stage": 1, "round_robin_gradients": True}},
     "zero_optimization.round_robin_gradients", "false"),
    ({"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}},
     "bf16.bf16_master_weights_and_grads", "false"),
    ({"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}},
     "fp16.fp16_master_weights_and_grads", "false"),
    ({"data_efficiency": {"enabled": True}}, "data_efficiency.enabled", "false"),
    ({"tensor_parallel": {"autotp_size": 2, "tp_overlap_comm": True}}, "tensor_parallel.tp_overlap_comm", "false"),
]


@pytest.mark.parametrize(("extra", "path", "default"), NOT_IMPL, ids=[n[1] for n in NOT_IMPL])
def test_option_shardwise_does_not_implement_is_refused_by_name(extra, path, default):
    problem = only_problem({**BASE, **extra})
    assert problem.path == path
    assert NOT_IMPLEMENTED in problem.message
    if default is not None:
        assert problem.message.endswith(f"set it to {default}")


# --- the batch triangle ----------------------------------------------------------------------

TRIANGLE_OK = [  # (train, micro, gas, world) -> (train, micro, gas)
    ((32, None, None, 4), (32, 8, 1)),
    ((None, 4, None, 2), (8, 4, 1)),
    ((None, 4, 2, 3), (24, 4, 2)),
    ((32, 4, None, 2), (32, 4, 4)),
    ((32, None, 2, 2), (32, 8, 2)),
    ((24, 4, 2, 3), (24, 4, 2)),
    ((6, 2, 1, 3), (6, 2, 1)),
]


@pytest.mark.parametrize(("given", "expected"), TRIANGLE_OK)
def test_batch_triangle_fills_the_missing_side(given, expected):
    tb, mb, gas, ws = given
    doc = {k: v for k, v in zip(("train_batch_size", "train_micro_batch_size_per_gpu",
                                  "gradient_accumulation_steps"), (tb, mb, gas)) if v is not None}
    batch = ok(doc, ws).batch
    got = (batch.train_batch_size, batch.micro_batch_size, batch.gradient_accumulation_steps)
    assert got == expected


TRIANGLE_BAD = [
    ((8, 3, 1, 2), "train_batch_size", "train_batch_size (8) must equal "
     "train_micro_batch_size_per_gpu (3) × gradient_accumulation_steps (1) × world size (2) = 6"),
    ((10, None, None, 3), "train_batch_size",
     "train_batch_size (10) must be divisible by world size (3) to give a whole"),
    ((32, 4, None, 3), "train_batch_size",
     "train_micro_batch_size_per_gpu (4) × world size (3) = 12"),
    ((32, None, 2, 3), "train_batch_size", "gradient_accumulation_steps (2) × world size (3) = 6"),
    ((None, None, 4, 2), "gradient_accumulation_steps", "no batch size is given"),
    ((None, None, None, 2), "train_batch_size", "no batch size is given"),
]


@pytest.mark.parametrize(("given", "path", "fragment"), TRIANGLE_BAD)
def test_batch_triangle_error_shows_the_formula_with_the_users_numbers(given, path, fragment):
    tb, mb, gas, ws = given
    doc = {k: v for k, v in zip(("train_batch_size", "train_micro_batch_size_per_gpu",
                                  "gradient_accumulation_steps"), (tb, mb, gas)) if v is not None}
    problem = only_problem(doc, ws)
    assert problem.path == path
    assert fragment in problem.message


def test_world_size_three_non_divisible_suggests_valid_sizes():
    problem = only_problem({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}, 3)
    assert "(16 / 6 = 2.667)" in problem.message
    assert "12 or 18" in problem.hint


# --- old spellings, "auto", precision ----------------------------------------------------------


def test_deprecated_cpu_offload_false_warns_naming_old_and_new_key():
    with pytest.warns(ConfigDeprecationWarning) as record:
        plan = load_config({**BASE, "zero_optimization": {"stage": 2, "cpu_offload": False}}, 2)
    text = str(record[0].message)
    assert "zero_optimization.cpu_offload" in text and "zero_optimization.offload_optimizer" in text
    assert plan.zero.stage == 2


def test_deprecated_cpu_offload_true_becomes_a_cpu_offload():
    with pytest.warns(ConfigDeprecationWarning) as record:
        plan = load_config({**BASE, "zero_optimization": {"stage": 2, "cpu_offload": True,
                                                          "cpu_offload_use_pin_memory": False}}, 2)
    assert {str(r.message).split("'")[1] for r in record} == {
        "zero_optimization.cpu_offload", "zero_optimization.cpu_offload_use_pin_memory"}
    assert plan.offload.optimizer.device == "cpu" and plan.offload.param.device == "none"
    assert plan.offload.optimizer.pin_memory is False
    with pytest.warns(ConfigDeprecationWarning):
        plan = load_config({**BASE, "zero_optimization": {"stage": 3, "cpu_offload_param": True}}, 2)
    assert plan.offload.param.device == "cpu" and plan.offload.optimizer.device == "none"
    # a problem with what the old key set names the old key
    problem = only_problem({**BASE, "zero_optimization": {"stage": 2, "cpu_offload_params": True}})
    assert problem.path == "zero_optimization.offload_param.device"
    assert "needs ZeRO stage 3" in problem.message
    assert "zero_optimization.cpu_offload_params" in problem.hint


def test_old_boolean_zero_form_and_allgather_size_map_to_current_keys():
    with pytest.warns(ConfigDeprecationWarning):
        plan = load_config({**BASE, "zero_optimization": True, "allgather_size": 2e8}, 2)
    assert plan.zero.stage == 1 and plan.zero.allgather_bucket_size == 200_000_000


def test_bfloat16_alias_and_stage3_fp16_rename():
    with pytest.warns(ConfigDeprecationWarning, match="'bfloat16'.*'bf16'"):
        plan = load_config({**BASE, "bfloat16": {"enabled": True}}, 2)
    assert plan.precision.compute == "bf16" and plan.precision.loss_scale is None
    with pytest.warns(ConfigDeprecationWarning, match="stage3_gather_fp16_weights_on_model_save"):
        load_config({**BASE, "zero_optimization": {"stage": 3, "stage3_gather_fp16_weights_on_model_save": True}}, 2)


def test_old_and_new_spelling_together_is_a_problem():
    problem = only_problem({**BASE, "bfloat16": {"enabled": True}, "bf16": {"enabled": False}})
    assert problem.path == "bfloat16" and "also given" in problem.message


def test_loss_scale_keys_under_bf16_are_ignored_with_a_warning():
    with pytest.warns(ConfigWarning, match="bf16.loss_scale"):
        plan = load_config({**BASE, "bf16": {"enabled": True, "loss_scale": 0}}, 2)
    assert plan.precision.compute == "bf16"


def test_auto_is_reported_everywhere_but_where_deepspeed_defaults_to_auto():
    found = problems_of({"train_batch_size": "auto", "fp16": {"enabled": "auto"},
                         "optimizer": {"type": "AdamW", "params": {"betas": ["auto", 0.9]}},
                         "pipeline": {"stages": "auto"}})
    assert [p.path for p in found] == ["fp16.enabled", "optimizer.params.betas[0]",
                                       "train_batch_size"]
    assert all(AUTO_UNRESOLVED in p.message for p in found)
    assert found[0].message.endswith("set true or false")
    assert found[2].message.endswith("set a number")


def test_fp16_and_bf16_both_enabled_is_an_error():
    problem = only_problem({**BASE, "fp16": {"enabled": True}, "bf16": {"enabled": True}})
    assert problem.path == "fp16.enabled" and "both enabled" in problem.message


def test_fp16_plan_carries_the_loss_scaler_settings():
    plan = ok({**BASE, "fp16": {"enabled": True, "loss_scale": 128, "initial_scale_power": 12,
                                "loss_scale_window": 500, "hysteresis": 3,
                                "consecutive_hysteresis": True, "min_loss_scale": 0.5}})
    assert plan.precision.compute == "fp16"
    assert plan.precision.loss_scale == LossScalePlan(128.0, 12, 500, 3, True, 0.5)
    assert ok(BASE).precision.compute == "fp32" and ok(BASE).precision.loss_scale is None


def test_gradient_clipping_defaults_to_deepspeeds_1_0():
    # DeepSpeed >= 0.19 clips at 1.0 when the key is absent: the same document clips here
    assert ok(BASE).gradient_clipping == 1.0
    assert ok({**BASE, "gradient_clipping": 0}).gradient_clipping == 0.0


def test_gradient_dtype_follows_compute_unless_fp32_is_asked_for():
    # DeepSpeed keeps 16-bit gradients in mixed precision; data_types.grad_accum_dtype "fp32" keeps fp32
    assert ok({**BASE, "bf16": {"enabled": True}}).precision.grads == "bf16"
    assert ok({**BASE, "fp16": {"enabled": True}}).precision.grads == "fp16"
    assert ok(BASE).precision.grads == "fp32"
    plan = ok({**BASE, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}})
    assert plan.precision.grads == "fp32"
    problem = only_problem({**BASE, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp16"}})
    assert problem.path == "data_types.grad_accum_dtype" and "fp32" in problem.message
    problem = only_problem({**BASE, "data_types": {"grad_accum_dtype": "float32"}})
    assert problem.path == "data_types.grad_accum_dtype"
    problem = only_problem({**BASE, "data_types": {"grad_acum_dtype": "fp32"}})
    assert problem.hint == "did you mean 'grad_accum_dtype'?"
    # the old top-level spelling is read as data_types.grad_accum_dtype
    with pytest.warns(ConfigDeprecationWarning):
        plan = load_config({**BASE, "bf16": {"enabled": True}, "gradient_accumulation_dtype": "fp32"}, 2)
    assert plan.precision.grads == "fp32"
    assert only_problem({**BASE, "data_types": {"param_dtype": "bf16"}}).path == "data_types.param_dtype"


def test_plan_is_frozen_and_holds_sorted_tuples():
    plan = ok({**BASE, "gradient_clipping": 1, "wall_clock_breakdown": True,
               "zero_optimization": {"stage": 1},
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95]}},
               "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}})
    assert plan.optimizer.params == (("betas", (0.9, 0.95)), ("lr", 1e-3))
    assert plan.optimizer.kwargs() == {"betas": [0.9, 0.95], "lr": 1e-3}
    assert plan.scheduler.type == "WarmupLR"
    assert plan.gradient_clipping == 1.0 and isinstance(plan.gradient_clipping, float)
    assert plan.wall_clock_breakdown and plan.zero.overlap_comm  # shardwise overlaps by default
    assert ok({**BASE, "zero_optimization": {"stage": 2, "overlap_comm": True}}).zero.overlap_comm
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.world_size = 4  # type: ignore[misc]
    hash(plan)


# --- sources ---------------------------------------------------------------------------------


def test_path_source_and_json_errors(tmp_path):
    good = tmp_path / "ds.json"
    good.write_text(json.dumps(BASE))
    assert load_config(good, 4).batch.micro_batch_size == 2
    assert load_config(str(good), 4).batch.micro_batch_size == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "train_batch_size": 8,\n}\n')
    problem = only_problem(bad)
    assert "not valid JSON" in problem.message and "line 3" in problem.message
    dup = tmp_path / "dup.json"
    dup.write_text('{"train_batch_size": 8, "fp16": {"enabled": true, "enabled": false}}')
    problem = only_problem(dup)
    assert problem.path == "fp16.enabled" and "more than once" in problem.message
    assert "not found" in only_problem(tmp_path / "missing.json").message
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    assert "must be a JSON object" in only_problem(listing).message


def test_dict_source_is_not_modified():
    doc = {"train_batch_size": 8, "zero_optimization": {"stage": 1, "cpu_offload": False},
           "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    before = json.dumps(doc, sort_keys=True)
    problems_of(doc)
    assert json.dumps(doc, sort_keys=True) == before


def test_api_misuse_is_a_usage_error():
    with pytest.raises(UsageError):
        load_config(BASE, 0)
    with pytest.raises(UsageError):
        load_config(BASE, True)
    with pytest.raises(UsageError):
        load_config(42, 2)  # type: ignore[arg-type]


def test_parse_then_resolve_for_several_world_sizes():
    cfg = parse_config({"train_batch_size": 24, "zero_optimization": {"stage": 2}})
    assert isinstance(cfg, DeepSpeedConfig)
    assert resolve_config(cfg, 2).batch.micro_batch_size == 12
    assert resolve_config(cfg, 3).batch.micro_batch_size == 8
    with pytest.raises(ConfigError, match="divisible by world size"):
        resolve_config(cfg, 5)
    with pytest.raises(ConfigError):
        parse_config({"zero_optimization": {"stage": "x"}})


def test_garbage_in_any_known_key_gives_only_config_errors():
    values = ["x", 1.5, -1, None, True, [], {}, {"enabled": True}, {"zz": 1}, "auto"]
    sections = [("", DeepSpeedConfig.model_fields), ("zero_optimization", ZeroSection.model_fields),
                ("fp16", ["enabled", "loss_scale", "min_loss_scale"])]
    for section, keys in sections:
        for key in keys:
            for value in values:
                doc = {**BASE, section: {key: value}} if section else {**BASE, key: value}
                try:
                    ok(doc)
                except ConfigError:
                    pass


def test_every_key_of_the_deepspeed_docs_is_known():
    documented = {  # docs/_pages/config-json.md in deepspeedai/DeepSpeed, top-level keys
        "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
        "managed_gradient_accumulation", "optimizer", "scheduler", "communication_data_type",
        "gradient_allreduce_op", "prescale_gradients", "gradient_predivide_factor", "fp16", "bf16",
        "torch_autocast", "gradient_clipping", "zero_optimization", "aio", "tensor_parallel",
        "hybrid_engine", "expert_parallel", "disable_python_gc", "steps_per_print",
        "wall_clock_breakdown", "dump_state", "autotuning", "flops_profiler",
        "activation_checkpointing", "data_efficiency", "tensorboard", "wandb", "comet",
        "csv_monitor", "comms_logger", "checkpoint", "compile", "data_types", "sparse_attention",
        "amp", "elasticity", "compression_training", "pipeline", "zero_allow_untested_optimizer",
        "zero_force_ds_cpu_optimizer", "memory_breakdown", "sparse_gradients",
        "curriculum_learning", "progressive_layer_drop", "eigenvalue", "quantize_training"}
    assert documented <= set(DeepSpeedConfig.model_fields)


# --- the hand-off to shardwise.optim -----------------------------------------------------------


def test_optimizer_and_scheduler_problems_from_shardwise_optim_are_placed_by_path(
        monkeypatch, optim_checks):
    fake = types.ModuleType("shardwise.optim")
    fake.check_optimizer_spec = lambda type_, params: (  # type: ignore[attr-defined]
        ["'betas' must have two values", "no optimizer named 'Adamm'"] if type_ == "Adamm" else [])
    fake.check_scheduler_spec = lambda type_, params: 1 / 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "shardwise.optim", fake)
    found = problems_of({**BASE, "optimizer": {"type": "Adamm", "params": {"betas": [0.9]}},
                         "scheduler": {"type": "WarmupLR"}})
    assert [p.path for p in found] == ["optimizer.params.betas", "optimizer.type", "scheduler.type"]
    assert "ZeroDivisionError" in found[2].message


def test_missing_shardwise_optim_skips_its_checks(monkeypatch, optim_checks):
    monkeypatch.setitem(sys.modules, "shardwise.optim", None)  # import raises ImportError
    plan = ok({**BASE, "optimizer": {"type": "Whatever", "params": {}}})
    assert plan.optimizer.type == "Whatever"


# --- real configs --------------------------------------------------------------------------------

# file -> (where it comes from, problem paths expected at world size 2; empty = loads)
REAL = {
    "ds_examples_training_cifar.json":
        ("microsoft/DeepSpeedExamples training/cifar/ds_config.json", set()),
    "ds_examples_cifar_fp16_offload.json":  # its "cpu_offload": true is a CPU offload now
        ("microsoft/DeepSpeedExamples cifar/ds_config.json (older revision)",
         {"fp16.fp16_master_weights_and_grads"}),
    "ds_examples_bing_bert_squad_bsz24.json":
        ("microsoft/DeepSpeedExamples BingBertSquad/deepspeed_bsz24_config.json", set()),
    "ds_examples_bing_bert_lamb_sparse_attention.json":
        ("microsoft/DeepSpeedExamples bing_bert/deepspeed_bsz64k_lamb_config_seq128.json",
         {"sparse_attention"}),
    "ds_examples_megatron_zero2.json":
        ("microsoft/DeepSpeedExamples Megatron-LM/scripts/ds_zero2_config.json", set()),
    "hf_transformers_ds_config_zero2.json":
        ("huggingface/transformers tests/deepspeed/ds_config_zero2.json (as in the DeepSpeed "
         "integration docs)", None),  # every "auto" (its CPU offload is accepted)
    "hf_transformers_ds_config_zero3.json":
        ("huggingface/transformers tests/deepspeed/ds_config_zero3.json",  # offload + 1e14 accepted
         {"train_batch_size", "zero_optimization.reduce_bucket_size"}),
    "ds_examples_imagenet_fp16_z1.json":
        ("microsoft/DeepSpeedExamples training/imagenet/config/ds_fp16_z1_config.json",
         {"cuda_visible_devices", "fp16.auto_cast"}),  # not a DeepSpeed key: DeepSpeed ignores it
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_config_loads_or_fails_by_name(name):
    _source, expected = REAL[name]
    path = CONFIGS / name
    if expected == set():
        plan = ok(path)
        assert plan.world_size == 2
        return
    found = problems_of(path)
    paths = {p.path for p in found}
    for p in found:  # each problem is one of the named kinds
        named = (NOT_IMPLEMENTED in p.message or AUTO_UNRESOLVED in p.message
                 or "no batch size" in p.message or p.path == "cuda_visible_devices"
                 or "must be at least 1 element" in p.message)
        assert named, p
        assert p.message.startswith(UNKNOWN_KEY) == (p.path == "cuda_visible_devices"), p
    if expected is None:  # the HF template: every "auto" is named, nothing else
        assert sum(AUTO_UNRESOLVED in p.message for p in found) == 13
        assert all(AUTO_UNRESOLVED in p.message for p in found), found
    else:
        assert paths == expected
