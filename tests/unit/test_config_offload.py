"""Issue 13 (config): DeepSpeed's offload keys (``zero_optimization.offload_optimizer`` /
``offload_param`` / ``sub_group_size``, the top-level ``aio``) and shardwise's
``offload.host_memory_budget`` are validated and resolved into ``Plan.offload``."""
from __future__ import annotations

import os
import warnings

import pytest

from shardwise.config import (NOT_IMPLEMENTED, UNKNOWN_KEY, AioPolicy, ConfigDeprecationWarning,
                              ConfigWarning, OffloadPlan, OptimizerOffloadPolicy, ParamOffloadPolicy,
                              load_config, plan_for)
from shardwise.config import resolve as resolve_mod
from shardwise.config.schema import default
from shardwise.errors import ConfigError

Z = "zero_optimization"
OPT, PAR = f"{Z}.offload_optimizer", f"{Z}.offload_param"


def issue_example(nvme: str) -> dict:
    """The issue's config, with ``nvme`` for /local/nvme."""
    return {
        "zero_optimization": {
            "stage": 3, "sub_group_size": 5e7,
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme, "pin_memory": True, "buffer_count": 4},
            "offload_param": {"device": "nvme", "nvme_path": nvme, "buffer_count": 5, "buffer_size": 1e8,
                              "max_in_cpu": 1e9}},
        "aio": {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
                "overlap_events": True},
    }


def quiet_plan(config: dict, world_size: int = 1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plan_for(config, world_size)


def problems_of(config: dict, world_size: int = 1) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError) as info:
            plan_for(config, world_size)
    return list(info.value.problems)


def only_problem(config: dict):
    found = problems_of(config)
    assert len(found) == 1, found
    return found[0]


def zero(stage: int = 3, **sections) -> dict:
    return {"zero_optimization": {"stage": stage, **sections}}


# --- the issue's example ---------------------------------------------------------------------


def test_issue_example_resolves_to_exactly_the_expected_plan(tmp_path):
    nvme = str(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all: sub_group_size 5e7 is small enough
        plan = plan_for(issue_example(nvme), world_size=2)
    assert plan.offload == OffloadPlan(
        optimizer=OptimizerOffloadPolicy(device="nvme", nvme_path=nvme, pin_memory=True, buffer_count=4,
                                         pipeline_read=False, pipeline_write=False, fast_init=False, ratio=1.0),
        param=ParamOffloadPolicy(device="nvme", nvme_path=nvme, pin_memory=True, buffer_count=5,
                                 buffer_size=100_000_000, max_in_cpu=1_000_000_000),
        aio=AioPolicy(block_size=1_048_576, queue_depth=8, intra_op_parallelism=1, single_submit=False,
                      overlap_events=True),
        sub_group_size=50_000_000, host_memory_budget=None)
    assert plan.offload.enabled
    for value in (plan.offload.sub_group_size, plan.offload.param.buffer_size, plan.offload.param.max_in_cpu):
        assert type(value) is int  # 5e7 / 1e8 / 1e9 are read as integers
    assert type(plan.offload.optimizer.ratio) is float
    hash(plan)


def test_no_offload_still_fills_the_offload_plan():
    off = plan_for({}).offload
    assert isinstance(off, OffloadPlan) and not off.enabled
    assert off.optimizer.device == off.param.device == "none"
    assert off.optimizer.nvme_path is None and off.param.nvme_path is None
    assert off == plan_for({Z: {"offload_optimizer": None, "offload_param": None}, "aio": None,
                            "offload": None}).offload


# --- defaults: DeepSpeed 0.19's ----------------------------------------------------------------

DEEPSPEED_DEFAULTS = {
    f"{OPT}.device": "none", f"{OPT}.nvme_path": None,
    f"{OPT}.pin_memory": True,  # DeepSpeed 0.19, its PR #8207 (false before)
    f"{OPT}.buffer_count": 4, f"{OPT}.pipeline_read": False, f"{OPT}.pipeline_write": False,
    f"{OPT}.pipeline": False, f"{OPT}.fast_init": False, f"{OPT}.ratio": 1.0,
    f"{OPT}.super_offload": False, f"{OPT}.convert_grad_on_cpu": True, f"{OPT}.cpuadam_cores_perc": 0.8,
    f"{PAR}.device": "none", f"{PAR}.nvme_path": None, f"{PAR}.pin_memory": True,
    f"{PAR}.buffer_count": 5, f"{PAR}.buffer_size": 100_000_000, f"{PAR}.max_in_cpu": 1_000_000_000,
    f"{Z}.sub_group_size": 1_000_000_000,
    "aio.block_size": 1_048_576, "aio.queue_depth": 8, "aio.intra_op_parallelism": 1,
    "aio.single_submit": False, "aio.overlap_events": True, "aio.thread_count": 1, "aio.use_gds": False,
    "offload.host_memory_budget": None,  # shardwise's: no limit
}


@pytest.mark.parametrize("path", sorted(DEEPSPEED_DEFAULTS))
def test_every_default_is_deepspeeds(path):
    value = default(path)
    assert value == DEEPSPEED_DEFAULTS[path] and type(value) is type(DEEPSPEED_DEFAULTS[path])


def test_a_switched_on_section_takes_the_defaults_for_what_it_leaves_out():
    off = plan_for(zero(3, offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})).offload
    for section, policy in (("offload_optimizer", off.optimizer), ("offload_param", off.param)):
        for name, value in vars(policy).items():
            if name not in ("device", "nvme_path"):
                assert value == DEEPSPEED_DEFAULTS[f"{Z}.{section}.{name}"], (section, name)
        assert policy.device == "cpu" and policy.nvme_path is None
    assert off.sub_group_size == DEEPSPEED_DEFAULTS[f"{Z}.sub_group_size"]
    assert off.aio == AioPolicy(**{k: DEEPSPEED_DEFAULTS[f"aio.{k}"] for k in vars(off.aio)})


# --- accepted keys ---------------------------------------------------------------------------------


def test_every_implemented_key_is_carried_into_the_plan(tmp_path):
    nvme = str(tmp_path)
    off = quiet_plan({
        **zero(3, sub_group_size=1000,
               offload_optimizer={"device": "nvme", "nvme_path": nvme, "pin_memory": False, "buffer_count": 7,
                                  "pipeline_read": True, "pipeline_write": True, "fast_init": True,
                                  "ratio": 0.25},
               offload_param={"device": "cpu", "pin_memory": False, "buffer_count": 2, "buffer_size": 64,
                              "max_in_cpu": 0}),
        "aio": {"block_size": 8192, "queue_depth": 32, "intra_op_parallelism": 2, "single_submit": True,
                "overlap_events": False, "thread_count": 4},
        "offload": {"host_memory_budget": "12GB"}}).offload
    assert off.optimizer == OptimizerOffloadPolicy("nvme", nvme, False, 7, True, True, True, 0.25)
    assert off.param == ParamOffloadPolicy("cpu", None, False, 2, 64, 0)
    assert off.aio == AioPolicy(8192, 32, 2, True, False)
    assert off.sub_group_size == 1000 and off.host_memory_budget == 12 * 10**9


def test_inert_keys_are_accepted_with_any_valid_value():
    # pipeline (DeepSpeed derives it), DeepSpeedCPUAdam tuning, aio.thread_count (old)
    plain = plan_for(zero(2, offload_optimizer={"device": "cpu"})).offload
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = plan_for({**zero(2, offload_optimizer={
            "device": "cpu", "pipeline": True, "convert_grad_on_cpu": False, "cpuadam_cores_perc": 0.5}),
            "aio": {"thread_count": 16}}).offload
    assert tuned == plain
    assert not tuned.optimizer.pipeline_read and not tuned.optimizer.pipeline_write


def test_pipeline_alone_says_it_has_no_effect_of_its_own():
    with pytest.warns(ConfigWarning, match="pipeline has no effect of its own"):
        plan_for(zero(2, offload_optimizer={"device": "cpu", "pipeline": True}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = plan_for(zero(2, offload_optimizer={"device": "cpu", "pipeline": True, "pipeline_read": True}))
        plan_for(zero(2, offload_optimizer={"device": "cpu", "pipeline": False}))
    assert plan.offload.optimizer.pipeline_read and not plan.offload.optimizer.pipeline_write


def test_a_switched_off_section_asks_for_nothing(tmp_path):
    # device "none": the other keys change nothing (a refused value included), nvme_path is not checked
    off = plan_for(zero(0, offload_optimizer={"device": "none", "nvme_path": str(tmp_path / "missing"),
                                              "super_offload": True},
                        offload_param={"device": "none", "nvme_path": "/no/such/dir"})).offload
    assert not off.enabled and off.optimizer.nvme_path is None and off.param.nvme_path is None


def test_old_cpu_offload_spelling_is_an_accepted_cpu_offload():
    with pytest.warns(ConfigDeprecationWarning, match="cpu_offload"):
        plan = plan_for(zero(1, cpu_offload=True))
    assert plan.offload.optimizer.device == "cpu" and plan.offload.optimizer.pin_memory is True


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_nvme_stays_nvme_at_every_stage(tmp_path, stage):
    # DeepSpeed at stages 1-2 quietly turns "nvme" into "cpu"; shardwise does what is asked
    off = plan_for(zero(stage, sub_group_size=1e7,
                        offload_optimizer={"device": "nvme", "nvme_path": str(tmp_path)})).offload
    assert off.optimizer.device == "nvme" and off.optimizer.nvme_path == str(tmp_path)


def test_nvme_path_is_resolved_to_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "swap").mkdir()
    monkeypatch.chdir(tmp_path)
    off = plan_for(zero(3, sub_group_size=1e7, offload_optimizer={"device": "nvme", "nvme_path": "swap"},
                        offload_param={"device": "nvme", "nvme_path": "./swap/"})).offload
    assert off.optimizer.nvme_path == off.param.nvme_path == str(tmp_path / "swap")
    monkeypatch.setenv("HOME", str(tmp_path))
    off = plan_for(zero(3, offload_param={"device": "nvme", "nvme_path": "~/swap"})).offload
    assert off.param.nvme_path == str(tmp_path / "swap")


def test_block_size_is_a_whole_number_of_pages():
    assert plan_for({"aio": {"block_size": 4096}}).offload.aio.block_size == 4096
    assert plan_for({"aio": {"block_size": 8.192e3}}).offload.aio.block_size == 8192
    problem = only_problem({"aio": {"block_size": 1_048_577}})
    assert problem.path == "aio.block_size"
    assert "multiple of 4096" in problem.message and "1048576 or 1052672" in problem.message


BAD_VALUES = [
    ({Z: {"offload_optimizer": {"device": "disk"}}}, f"{OPT}.device", "must be 'none', 'cpu' or 'nvme'"),
    ({Z: {"offload_optimizer": {"buffer_count": 0}}}, f"{OPT}.buffer_count", "greater than or equal to 1"),
    ({Z: {"offload_optimizer": {"ratio": 0}}}, f"{OPT}.ratio", "must be greater than 0"),
    ({Z: {"offload_optimizer": {"ratio": 1.01}}}, f"{OPT}.ratio", "less than or equal to 1"),
    ({Z: {"offload_optimizer": {"pin_memory": "yes"}}}, f"{OPT}.pin_memory", "expected true or false"),
    ({Z: {"offload_optimizer": {"cpuadam_cores_perc": 80}}}, f"{OPT}.cpuadam_cores_perc", "less than or equal"),
    ({Z: {"offload_optimizer": {"nvme_path": ""}}}, f"{OPT}.nvme_path", "file-system path"),
    ({Z: {"offload_param": {"buffer_count": 0}}}, f"{PAR}.buffer_count", "greater than or equal to 1"),
    ({Z: {"offload_param": {"buffer_size": 0}}}, f"{PAR}.buffer_size", "greater than or equal to 1"),
    ({Z: {"offload_param": {"buffer_size": 1.5}}}, f"{PAR}.buffer_size", "expected an integer"),
    ({Z: {"offload_param": {"max_in_cpu": -1}}}, f"{PAR}.max_in_cpu", "greater than or equal to 0"),
    ({Z: {"sub_group_size": 0}}, f"{Z}.sub_group_size", "greater than or equal to 1"),
    ({"aio": {"queue_depth": 0}}, "aio.queue_depth", "greater than or equal to 1"),
    ({"aio": {"queue_depth": 10**6}}, "aio.queue_depth", "less than or equal to 1024"),
    ({"aio": {"intra_op_parallelism": 0}}, "aio.intra_op_parallelism", "greater than or equal to 1"),
    ({"aio": {"block_size": 512}}, "aio.block_size", "greater than or equal to 4096"),
    ({"aio": {"single_submit": 1}}, "aio.single_submit", "expected true or false"),
    ({"offload": {"host_memory_budget": "lots"}}, "offload.host_memory_budget", "expected a number of bytes"),
]


@pytest.mark.parametrize(("config", "path", "fragment"), BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_bad_value_is_reported_at_its_path(config, path, fragment):
    problem = only_problem(config)
    assert problem.path == path
    assert fragment in problem.message


# --- refusals ------------------------------------------------------------------------------------


def test_super_offload_is_refused_by_name():
    problem = only_problem(zero(3, offload_optimizer={"device": "cpu", "super_offload": True}))
    assert problem.path == f"{OPT}.super_offload"
    assert NOT_IMPLEMENTED in problem.message and "SuperOffload" in problem.message
    assert "Grace-Hopper" in problem.message and problem.message.endswith("set it to false")
    plan_for(zero(3, offload_optimizer={"device": "cpu", "super_offload": False}))


def test_gpudirect_storage_is_refused_with_the_reason():
    problem = only_problem({"aio": {"use_gds": True}})
    assert problem.path == "aio.use_gds"
    assert NOT_IMPLEMENTED in problem.message
    assert "GPUDirect Storage is CUDA-only; shardwise's I/O engine uses pread/pwrite" in problem.message
    assert plan_for({"aio": {"use_gds": False}}).offload.aio.block_size == 1_048_576


# --- rules across keys -------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_param_offload_needs_stage_3(tmp_path, stage, device):
    problem = only_problem(zero(stage, offload_param={"device": device, "nvme_path": str(tmp_path)}))
    assert problem.path == f"{PAR}.device"
    assert "needs ZeRO stage 3" in problem.message and f"stage is {stage}" in problem.message
    assert "set zero_optimization.stage to 3" in problem.hint


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_optimizer_offload_needs_stage_1(tmp_path, device):
    problem = only_problem(zero(0, sub_group_size=1e7,
                                offload_optimizer={"device": device, "nvme_path": str(tmp_path)}))
    assert problem.path == f"{OPT}.device"
    assert "stage 1 or higher" in problem.message and "DeepSpeed refuses stage 0 too" in problem.message
    assert problem.hint.startswith("use stage 1")
    plan_for(zero(1, sub_group_size=1e7, offload_optimizer={"device": device, "nvme_path": str(tmp_path)}))


@pytest.mark.parametrize("section", ["offload_optimizer", "offload_param"])
def test_nvme_needs_nvme_path(section):
    problem = only_problem(zero(3, **{section: {"device": "nvme"}}))
    assert problem.path == f"{Z}.{section}.nvme_path"
    assert 'device "nvme" needs nvme_path' in problem.message


@pytest.mark.parametrize("section", ["offload_optimizer", "offload_param"])
def test_nvme_path_must_exist(tmp_path, section):
    missing = tmp_path / "missing"
    problem = only_problem(zero(3, **{section: {"device": "nvme", "nvme_path": str(missing)}}))
    assert problem.path == f"{Z}.{section}.nvme_path"
    assert problem.message == f"nvme_path {str(missing)!r} does not exist"
    assert f"mkdir -p {missing}" in problem.hint


@pytest.mark.parametrize("section", ["offload_optimizer", "offload_param"])
def test_nvme_path_must_be_a_directory(tmp_path, section):
    file = tmp_path / "file"
    file.write_text("x")
    problem = only_problem(zero(3, **{section: {"device": "nvme", "nvme_path": str(file)}}))
    assert problem.path == f"{Z}.{section}.nvme_path"
    assert problem.message == f"nvme_path {str(file)!r} is not a directory"


@pytest.mark.parametrize("section", ["offload_optimizer", "offload_param"])
def test_nvme_path_must_be_writable(tmp_path, section, monkeypatch):
    asked = []

    def access(path, mode):
        asked.append((path, mode))
        return False
    monkeypatch.setattr(resolve_mod.os, "access", access)  # root can write anywhere: pretend
    problem = only_problem(zero(3, **{section: {"device": "nvme", "nvme_path": str(tmp_path)}}))
    assert problem.path == f"{Z}.{section}.nvme_path"
    assert problem.message.startswith(f"nvme_path {str(tmp_path)!r} is not writable by this process")
    assert asked == [(str(tmp_path), os.W_OK | os.X_OK)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only directory")
def test_read_only_nvme_path_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        problem = only_problem(zero(3, offload_param={"device": "nvme", "nvme_path": str(ro)}))
    finally:
        ro.chmod(0o700)
    assert "is not writable" in problem.message


def test_a_relative_nvme_path_is_named_as_written_and_as_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problem = only_problem(zero(3, offload_param={"device": "nvme", "nvme_path": "nope"}))
    assert problem.message == f"nvme_path 'nope' ({tmp_path / 'nope'}) does not exist"


def test_nvme_path_is_checked_only_for_an_nvme_device():
    off = plan_for(zero(3, offload_optimizer={"device": "cpu", "nvme_path": "/no/such/dir"},
                        offload_param={"device": "cpu", "nvme_path": "/no/such/dir"})).offload
    assert off.optimizer.nvme_path is None and off.param.nvme_path is None  # set iff nvme


# --- typos ---------------------------------------------------------------------------------------

TYPOS = [
    (zero(3, offload_optimiser={"device": "cpu"}), f"{Z}.offload_optimiser", "'offload_optimizer'"),
    (zero(3, offload_params={"device": "cpu"}), f"{Z}.offload_params", "'offload_param'"),
    (zero(3, offload_optimizer={"device": "cpu", "nvme_pth": "/x"}), f"{OPT}.nvme_pth", "'nvme_path'"),
    (zero(3, offload_param={"device": "cpu", "nvme_pth": "/x"}), f"{PAR}.nvme_pth", "'nvme_path'"),
    (zero(3, offload_optimizer={"device": "cpu", "buffer_cnt": 4}), f"{OPT}.buffer_cnt", "'buffer_count'"),
    (zero(3, offload_param={"device": "cpu", "buffer_cnt": 5}), f"{PAR}.buffer_cnt", "'buffer_count'"),
    (zero(3, sub_group_sise=1e7), f"{Z}.sub_group_sise", "'sub_group_size'"),
    ({"aio": {"queue_dept": 8}}, "aio.queue_dept", "'queue_depth'"),
    ({"offload": {"host_memory_budgit": "1GB"}}, "offload.host_memory_budgit", "'host_memory_budget'"),
    ({"ofload": {"host_memory_budget": "1GB"}}, "ofload", "'offload'"),
]


@pytest.mark.parametrize(("config", "path", "hint"), TYPOS, ids=[t[1] for t in TYPOS])
def test_typo_gets_did_you_mean(config, path, hint):
    problem = only_problem(config)
    assert problem.path == path
    assert problem.message.startswith(UNKNOWN_KEY)
    assert f"did you mean {hint}?" == problem.hint


def test_offload_section_in_the_wrong_place_is_pointed_at_zero_optimization():
    problem = only_problem({"offload_optimizer": {"device": "cpu"}})
    assert problem.path == "offload_optimizer" and "belongs in 'zero_optimization'" in problem.hint


# --- every problem at once -------------------------------------------------------------------


def test_every_problem_of_a_document_with_several_mistakes_is_reported_at_once(tmp_path):
    config = {
        "zero_optimization": {
            "stage": 2,  # offload_param needs 3
            "sub_group_size": 5e7,
            "offload_optimiser": {"device": "cpu"},  # typo
            "offload_optimizer": {"device": "nvme", "buffer_cnt": 4, "ratio": 2,  # no nvme_path, typo, range
                                  "super_offload": True},  # refused
            "offload_param": {"device": "nvme", "nvme_path": str(tmp_path / "missing"), "buffer_size": 0}},
        "aio": {"block_size": 1000, "use_gds": True},
        "offload": {"host_memory_budget": "12 GBs"},
    }
    found = problems_of(config)
    assert sorted(p.path for p in found) == sorted([
        f"{Z}.offload_optimiser", f"{OPT}.buffer_cnt", f"{OPT}.ratio", f"{OPT}.super_offload",
        f"{OPT}.nvme_path", f"{PAR}.device", f"{PAR}.nvme_path", f"{PAR}.buffer_size",
        "aio.block_size", "aio.use_gds", "offload.host_memory_budget"])
    by_path = {p.path: p for p in found}
    assert "needs ZeRO stage 3" in by_path[f"{PAR}.device"].message
    assert "does not exist" in by_path[f"{PAR}.nvme_path"].message
    assert "needs nvme_path" in by_path[f"{OPT}.nvme_path"].message
    text = str(ConfigError(found))
    assert text.startswith("shardwise config has 11 problems:")


def test_a_broken_stage_does_not_add_a_stage_verdict():
    found = problems_of(zero("three", offload_param={"device": "cpu"}))
    assert [p.path for p in found] == [f"{Z}.stage"]


# --- the sub_group_size warning ------------------------------------------------------------

TILE_WARNING = [  # (optimizer device, param device, sub_group_size or None for the default) -> warned
    (("nvme", "none", None), True),  # DeepSpeed's default 1e9
    (("nvme", "nvme", 1e9), True),
    (("nvme", "none", 100_000_001), True),
    (("nvme", "none", 1e8), False),  # not over 1e8
    (("nvme", "nvme", 5e7), False),
    (("cpu", "none", 1e9), False),
    (("cpu", "nvme", 1e12), False),  # the tile size is the optimizer's swap buffers
    (("none", "none", 1e12), False),
]


@pytest.mark.parametrize(("given", "warned"), TILE_WARNING, ids=[str(t[0]) for t in TILE_WARNING])
def test_sub_group_size_warning_appears_exactly_when_it_should(tmp_path, given, warned):
    opt, par, tile = given
    section = {"stage": 3, "offload_optimizer": {"device": opt, "nvme_path": str(tmp_path)},
               "offload_param": {"device": par, "nvme_path": str(tmp_path)}}
    if tile is not None:
        section["sub_group_size"] = tile
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plan_for({"zero_optimization": section})
    mine = [r for r in record if "sub_group_size" in str(r.message)]
    assert all(issubclass(r.category, ConfigWarning) for r in mine)
    assert len(mine) == (1 if warned else 0), [str(r.message) for r in record]


def test_sub_group_size_warning_says_what_a_buffer_costs_and_what_works(tmp_path):
    with pytest.warns(ConfigWarning) as record:
        plan_for(zero(3, offload_optimizer={"device": "nvme", "nvme_path": str(tmp_path), "buffer_count": 4}))
    (message,) = [str(r.message) for r in record if "sub_group_size" in str(r.message)]
    assert "sub_group_size x 4 bytes" in message
    assert "4 GB per buffer" in message and "buffer_count 4 = 16 GB of host memory" in message
    assert "5e7 (200 MB per buffer) works on a 24 GiB machine" in message


# --- offload.host_memory_budget ---------------------------------------------------------------

BUDGETS = [
    (None, None),
    (1000, 1000),
    (1.5e9, 1_500_000_000),  # an integral JSON float, as for every integer key
    ("12GB", 12 * 10**9),
    ("12gb", 12 * 10**9),
    ("512MiB", 512 * 2**20),
    ("512mib", 512 * 2**20),
    ("1.5e9", 1_500_000_000),
    ("24 GiB", 24 * 2**30),
    ("  24 GIB ", 24 * 2**30),
    ("64KB", 64_000),
    ("64 KiB", 65_536),
    ("3 MB", 3_000_000),
    ("1.5 KiB", 1536),
    ("1.1GB", 1_100_000_000),  # exact, no binary-float rounding
    ("2TB", 2 * 10**12),
    ("1TiB", 2**40),
    ("4096", 4096),
    ("4096 B", 4096),
    (".5GB", 500_000_000),
    ("2.5e3MB", 2_500_000_000),
]


@pytest.mark.parametrize(("given", "expected"), BUDGETS, ids=[repr(b[0]) for b in BUDGETS])
def test_host_memory_budget_forms(given, expected):
    budget = plan_for({"offload": {"host_memory_budget": given}}).offload.host_memory_budget
    assert budget == expected and type(budget) is type(expected)


BAD_BUDGETS = [
    ("12 GBs", "expected a number of bytes"),
    ("twelve GB", "expected a number of bytes"),
    ("12 G", "expected a number of bytes"),
    ("-1GB", "expected a number of bytes"),
    ("", "expected a number of bytes"),
    ("1e400 GB", "less than or equal to 2**63-1"),
    ("0GB", "must be greater than 0"),
    ("1e-3", "must be greater than 0"),
    (0, "must be greater than 0"),
    (-5, "must be greater than 0"),
    (1.5, "expected a number of bytes"),
    (True, "expected a number of bytes"),
    ([12], "expected a number of bytes"),
    ("NaN", "expected a number of bytes"),
    ("1" * 100 + "GB", "expected a number of bytes"),
]


@pytest.mark.parametrize(("given", "fragment"), BAD_BUDGETS, ids=[repr(b[0])[:20] for b in BAD_BUDGETS])
def test_host_memory_budget_errors(given, fragment):
    problem = only_problem({"offload": {"host_memory_budget": given}})
    assert problem.path == "offload.host_memory_budget"
    assert fragment in problem.message
    if fragment.startswith("expected"):  # the accepted forms are listed
        for form in ('"12GB"', '"512MiB"', '"1.5e9"', '"24 GiB"', "KiB, MiB, GiB"):
            assert form in problem.message, problem.message


def test_load_config_reads_a_budget_from_a_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 4, "offload": {"host_memory_budget": "24 GiB"}}')
    assert load_config(path, 2).offload.host_memory_budget == 24 * 2**30
