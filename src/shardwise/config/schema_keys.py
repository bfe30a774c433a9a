"""Catalogue of the DeepSpeed config keys shardwise knows but does not implement (yet), and
of DeepSpeed's old spellings (``normalise`` reads them as their replacements, with a warning).

Every key of DeepSpeed's JSON config is *known*: a key missing from both this catalogue and
the hand-written models in ``schema.py`` is reported as unknown, with a "did you mean". The
keys below are accepted only while they ask for nothing: at their DeepSpeed default, or
inside a section whose switch is off. Anything else is a problem saying that shardwise does
not implement that option yet. ``schema.py`` turns these tables into pydantic models, so
the defaults here are the only place they are written down.

Entries are ``key: (type, default)`` or ``key: (type, default, accept)``:

* type: ``"bool" | "int" | "float" | "str" | "list" | "dict" | "any"``, with a trailing
  ``"?"`` when JSON ``null`` is allowed, or a tuple of allowed literal values;
  or a :class:`Section` for a nested object.
* accept: ``INERT`` (any valid value is fine: it changes nothing shardwise does), or a
  tuple of accepted values (for defaults that changed between DeepSpeed releases).
  Without it, only the default is accepted.

Sources: DeepSpeed's ``runtime/constants.py``, ``runtime/config.py``,
``runtime/zero/config.py``, ``runtime/zero/offload_config.py``, ``monitor/config.py``,
``runtime/precision_config.py``, ``compile/config.py`` and the config-json docs page,
across releases (older spellings are kept so that older configs still parse).
"""
from __future__ import annotations

from typing import Any, NamedTuple

from shardwise.config.ranges import got
from shardwise.errors import ConfigProblem

INERT = "inert"


class ConfigWarning(UserWarning):
    """A config key was accepted but has no effect (e.g. loss scaling keys under ``bf16``)."""


class ConfigDeprecationWarning(FutureWarning):
    """An old DeepSpeed spelling was read as its replacement; the message names both."""


class Section(NamedTuple):
    """A nested JSON object.

    ``gate``: the key that switches the section on; while it holds its default the other
    keys have no effect and are accepted as they are. ``presence``: the section switches a
    feature on just by being there (DeepSpeed's ``sparse_attention``); its default is
    ``null``. ``why``: said in the refusal when the section is on (why not, and what to use
    instead). Every section is closed: a key it does not list is an unknown key (with a
    "did you mean"), so a typo cannot leave a feature silently off.

    [Note: opaque payloads]
    The only unchecked objects are ``("dict?", None)`` payloads (``_OPAQUE``) whose keys
    belong to a third-party library or a DeepSpeed feature shardwise refuses: they are
    accepted only as ``null``, or inside a section that is switched off. Whatever is in
    them then has no effect, so no typo in them can change what shardwise does.
    """

    fields: dict[str, tuple]
    gate: str | None = None
    presence: bool = False
    why: str | None = None  # said in the refusal when the section is switched on: why, and what instead


def _enabled(**fields: tuple) -> Section:
    """A section switched on by ``"enabled": true``."""
    return Section({"enabled": ("bool", False), **fields}, gate="enabled")


_OPAQUE = ("dict?", None)  # a nested object shardwise passes over (its owner is refused)

# refusal texts (Section.why)
AUTOTUNING_WHY = (
    "DeepSpeed's autotuner launches trial runs to pick the ZeRO stage and micro-batch size; in "
    "shardwise, `shardwise plan CONFIG --model FILE:FACTORY --world-size N --fit 80GB` picks the "
    "cheapest stage and offload that fit from the engine's own memory layout, without trial runs, "
    "and `shardwise estimate` gives the bytes per rank of every stage (README \"Planning\")")
COMPRESSION_WHY = (
    "DeepSpeed's compression library rewrites the model's layers (quantization-aware training, "
    "pruning, layer reduction) inside the engine; shardwise trains the model as given: prepare it "
    "before shardwise.initialize, e.g. torch.ao.quantization (prepare_qat) for quantization-aware "
    "training or torch.nn.utils.prune for pruning")

# --- inside "zero_optimization" (implemented keys live in schema.ZeroSection: the offload
# sections and sub_group_size too, see schema.py [Note: offload keys]) --------------------

ZERO: dict[str, tuple] = {
    "allgather_partitions": ("bool", True),
    "use_multi_rank_bucket_allreduce": ("bool", True, INERT),
    "load_from_fp32_weights": ("bool", True),
    "elastic_checkpoint": ("bool", False, INERT),  # default was true before 0.9
    "compute_grad_norm": ("bool", True),
    "parameter_alignment": ("bool", False),
    "zenflow": _OPAQUE,
    "stage3_prefetch_bucket_size": ("elements", 50_000_000, INERT),  # implemented (stage 3)
    # DeepSpeed: 100_000. shardwise: 0 -- small parameters share their unit's one all-gather, so
    # keeping them whole saves no collective and costs memory (README "ZeRO stage 3")
    "stage3_param_persistence_threshold": ("elements", 0, INERT),
    "stage3_model_persistence_threshold": ("int", 2**63 - 1),
    "stage3_max_live_parameters": ("elements", 1_000_000_000, INERT),  # implemented (stage 3)
    "stage3_max_reuse_distance": ("elements", 1_000_000_000, INERT),  # implemented (stage 3)
    "stage3_gather_16bit_weights_on_model_save": ("bool", False, INERT),  # checkpoints always hold whole tensors
    "stage3_module_granularity_threshold": ("int", 0),
    "stage3_use_all_reduce_for_fetch_params": ("bool", False),
    "stage3_allgather_sequential": ("bool", False),
    "stage3_partition_stream_chunk_size": ("int", 0),
    "ignore_unused_parameters": ("bool", True),
    "legacy_stage1": ("bool", False),
    "round_robin_gradients": ("bool", False),
    "zero_hpz_partition_size": ("int", 1),
    "zero_quantized_weights": ("bool", False),
    "zero_quantized_nontrainable_weights": ("bool", False),
    "zero_quantized_gradients": ("bool", False),
    "zeropp_loco_param": _OPAQUE,
    "mics_shard_size": ("int-1", -1),
    "mics_hierarchical_params_gather": ("bool", False),
    "memory_efficient_linear": ("bool", True, INERT),
    "pipeline_loading_checkpoint": ("bool", False),
    "override_module_apply": ("bool", True, INERT),
    "log_trace_cache_warnings": ("bool", False, INERT),
    "enable_sanity_checks": ("bool", False),
    "save_muon_momentum_buffer_in_memory": ("bool", False),
    "leaf_module": _OPAQUE,
}

# DeepSpeed accepts each stage-3 key with or without its "stage3_" prefix.
ZERO_SYNONYMS: dict[str, str] = {
    k.removeprefix("stage3_"): k for k in ZERO if k.startswith("stage3_")
}

# Old spellings: (section or "" for top level, old key) -> new key, for plain renames.
RENAMED: dict[tuple[str, str], str] = {
    ("", "bfloat16"): "bf16",
    ("zero_optimization", "stage3_gather_fp16_weights_on_model_save"):
        "stage3_gather_16bit_weights_on_model_save",
    ("zero_optimization", "allgather_size"): "allgather_bucket_size",
}

# Loss-scaling keys some configs copy into "bf16", where DeepSpeed ignores them.
BF16_IGNORED = ("loss_scale", "loss_scale_window", "hysteresis", "consecutive_hysteresis",
                "min_loss_scale", "initial_scale_power")

# --- top level ---------------------------------------------------------------------------

TOP_LEVEL: dict[str, tuple] = {
    # accepted with any value: they change nothing shardwise does
    "zero_allow_untested_optimizer": ("bool", False, INERT),  # any torch optimizer works
    # DeepSpeed insists on its own CPU Adam with offload; shardwise steps any torch optimizer
    "zero_force_ds_cpu_optimizer": ("bool", True, INERT),
    "vocabulary_size": ("int?", None, INERT),  # DeepSpeed only warns about alignment
    # "aio": hand-written in schema.py (read by the offload tiers' I/O engine)
    "timers": (Section({"throughput": (Section({
        "enabled": ("bool", True, INERT), "synchronized": ("bool", True, INERT)}), None)}),
        None),
    # communication and gradients
    "communication_data_type": ("str?", None),
    "seq_parallel_communication_data_type": ("str?", "fp32", ("fp32", None)),
    "gradient_allreduce_op": (("mean", "sum"), "mean"),
    # prescale_gradients, gradient_predivide_factor: hand-written in schema.py
    "sparse_gradients": ("bool", False),
    "disable_allgather": ("bool", False),
    "fp32_allreduce": ("bool", False),
    "managed_gradient_accumulation": ("bool", True),
    # data_types: hand-written in schema.py (grad_accum_dtype is implemented)
    # logging and debugging
    "dump_state": ("bool", False),
    "memory_breakdown": ("bool", False),
    "log_level": ("str?", None),
    "disable_python_gc": ("bool", False),
    "graph_harvesting": ("bool", False),
    "dataloader_drop_last": ("bool", False),
    # tensorboard, csv_monitor, wandb, comet: hand-written in schema_observe.py
    "trackio": (_enabled(project=("str?", "deepspeed")), None),
    # comms_logger, flops_profiler: hand-written in schema_observe.py
    "autotuning": (_enabled(
        start_step=("int?", None), end_step=("int?", None), metric_path=("str?", None),
        arg_mappings=("dict?", None), metric=("str", "throughput"), model_info=_OPAQUE,
        results_dir=("str", "autotuning_results"), exps_dir=("str", "autotuning_exps"),
        overwrite=("bool", True), fast=("bool", True), start_profile_step=("int", 3),
        end_profile_step=("int", 5), tuner_type=("str", "gridsearch"),
        tuner_early_stopping=("int", 5), tuner_num_trials=("int", 50),
        model_info_path=("str?", None), mp_size=("int", 1),
        max_train_batch_size=("int?", None), min_train_batch_size=("int", 1),
        max_train_micro_batch_size_per_gpu=("int", 1024),
        min_train_micro_batch_size_per_gpu=("int", 1),
        num_tuning_micro_batch_sizes=("int", 3))._replace(why=AUTOTUNING_WHY), None),
    # precision features other than fp16/bf16
    "amp": (_enabled(  # the other keys are apex amp.initialize()'s options
        opt_level=("str?", None), cast_model_type=("any", None),
        patch_torch_functions=("bool?", None), keep_batchnorm_fp32=("any", None),
        master_weights=("bool?", None), loss_scale=("any", None),
        cast_model_outputs=("any", None), num_losses=("int", 1), verbosity=("int", 1),
        min_loss_scale=("float?", None), max_loss_scale=("float", 2.0**24)), None),
    "torch_autocast": (_enabled(dtype=("str?", None), lower_precision_safe_modules=("list?", None)),
                       None),
    # memory and parallelism features
    # pipeline, tensor_parallel: hand-written in schema_parallel.py
    "sequence_parallel_size": ("int", 1),
    "expert_parallel": (_enabled(  # DeepSpeed's AutoEP
        autoep_size=("int", 1), preset_model=("str?", None), moe_layer_pattern=("str?", None),
        expert_pattern=("str?", None), router_pattern=("str?", None),
        use_grouped_mm=("bool", True), grouped_mm_backend=("str", "auto"),
        route_norm=("bool?", None), route_scale=("float", 1.0), score_apply=("str", "auto"),
        num_expert_groups=("int?", None), num_limited_groups=("int?", None),
        score_func=("str", "auto"), top_k=("any", "auto"), load_balance_coeff=("float?", 1e-3),
        routed_scaling_factor=("any", "auto"), expert_w1=("str?", None),
        expert_w2=("str?", None), expert_w3=("str?", None), num_experts_attr=("str?", None),
        top_k_attr=("str?", None), has_shared_experts=("bool?", None),
        shared_experts_pattern=("str?", None)), None),
    "use_data_before_expert_parallelism": ("bool", False),
    "hybrid_engine": (_enabled(
        max_out_tokens=("int", 512), inference_tp_size=("int", 1),
        release_inference_cache=("bool", False), pin_parameters=("bool", True),
        tp_gather_partition_size=("int", 8), enable_cuda_graph=("bool", False)), None),
    # compile: hand-written in schema_compile.py (its DeepCompile keys: DEEPCOMPILE below)
    # training-recipe features
    "sparse_attention": (Section({
        "mode": ("str", "fixed"), "block": ("int", 16),
        "different_layout_per_head": ("bool", False),
        "num_local_blocks": ("int", 4), "num_global_blocks": ("int", 1),
        "attention": ("str", "bidirectional"), "horizontal_global_attention": ("bool", False),
        "num_different_global_patterns": ("int", 1), "num_differnt_global_patterns": ("int", 1),
        "num_random_blocks": ("int", 0), "local_window_blocks": ("list", [4]),
        "global_block_indices": ("list", [0]), "global_block_end_indices": ("list?", None),
        "num_sliding_window_blocks": ("int", 3)}, presence=True), None),
    "progressive_layer_drop": (_enabled(theta=("float", 1.0), gamma=("float", 0.001)), None),
    "curriculum_learning": (_enabled(
        curriculum_type=("str?", None), min_difficulty=("int?", None),
        max_difficulty=("int?", None), schedule_type=("str?", None),
        schedule_config=("dict?", None)), None),
    "data_efficiency": (_enabled(seed=("int", 1234), data_routing=_OPAQUE,
                                 data_sampling=_OPAQUE), None),
    "compression_training": (Section({
        k: _OPAQUE for k in ("weight_quantization", "activation_quantization", "sparse_pruning",
                             "row_pruning", "head_pruning", "channel_pruning", "layer_reduction")},
        presence=True, why=COMPRESSION_WHY), None),
    "quantize_training": (_enabled(
        quantize_verbose=("bool", False), quantizer_kernel=("bool", False),
        quantize_type=("str?", None), quantize_bits=_OPAQUE, quantize_schedule=_OPAQUE,
        quantize_groups=("int", 1), fp16_mixed_quantize=_OPAQUE, quantize_algo=_OPAQUE,
        eigenvalue=_OPAQUE), None),
    "eigenvalue": (_enabled(
        verbose=("bool", False), max_iter=("int", 100), tol=("float", 1e-2),
        stability=("float", 1e-6), gas_boundary_resolution=("int", 1),
        layer_name=("str", "bert.encoder.layer"), layer_num=("int", 0)), None),
    "elasticity": (_enabled(
        max_train_batch_size=("int", 2000), micro_batch_sizes=("list", [2, 4, 6]),
        min_gpus=("int", 1), max_gpus=("int", 10000), min_time=("any", 0),
        prefer_larger_batch=("bool", True), ignore_non_elastic_batch_info=("bool", False),
        version=("float", 0.1), model_parallel_size=("int", 1),
        num_gpus_per_node=("int", 1)), None),
    "weight_quantization": (Section({"quantized_initialization": _OPAQUE,
                                     "post_init_quant": _OPAQUE}, presence=True), None),
    # checkpointing: "checkpoint" is schema.CheckpointSection (keep_last) + CHECKPOINT below
    "nebula": (_enabled(
        persistent_storage_path=("str?", None), persistent_time_interval=("int", 100),
        num_of_version_in_retention=("int", 2), enable_nebula_load=("bool", True),
        load_path=("str?", None)), None),
    "datastates_ckpt": _OPAQUE,  # options of the DataStates library (see [Note: opaque...])
}

# --- inside "compile": DeepSpeed's DeepCompile keys (deepspeed/compile/config.py). The section's
# own keys (enabled, backend, kwargs, mode) live in schema_compile.py; these are refused while
# "deepcompile" is on and have no effect while it is off --------------------------------------

DEEPCOMPILE: dict[str, tuple] = {
    "deepcompile": ("bool", False), "free_activation": ("bool", False),
    "free_activation_threshold": ("int", 10 * 1024 * 1024),
    "offload_activation": ("bool", False),
    "offload_activation_pin_memory": ("bool", True), "offload_opt_states": ("bool", False),
    "double_buffer": ("bool", True), "symmetric_memory": ("bool", False),
    "debug_log": ("bool", False), "offload_parameters": ("bool", False),
    "sync_before_reduce": ("bool", False), "sync_after_reduce": ("bool", False),
    "sync_before_allgather": ("bool", False), "sync_after_allgather": ("bool", False),
    "keep_int_input_tensors": ("bool", True), "keep_all_input_tensors": ("bool", False),
    "passes": ("list?", None)}
DEEPCOMPILE_WHY = (
    "DeepCompile is DeepSpeed's own compiler pass pipeline for ZeRO-3 (gathers and releases "
    "scheduled inside the graph); shardwise compiles with plain torch.compile, block by block, "
    'with ZeRO\'s hooks around each compiled block: use "compile": {"enabled": true}')

# --- inside "checkpoint" (implemented keys live in schema.CheckpointSection) ----------

CHECKPOINT: dict[str, tuple] = {
    "tag_validation": (("Warn", "Ignore", "Fail", "WARN", "IGNORE", "FAIL", "warn", "ignore",
                        "fail"), "Warn"),
    "load_universal": ("bool", False, INERT),  # every shardwise checkpoint reshards on load
    "use_node_local_storage": ("bool", False),
    "parallel_write": (Section({"pipeline_stage": ("bool", False)}), None),
    "checkpoint_serialization": ("bool", True, INERT),
    "writer": _OPAQUE,
}

# Old top-level spellings that moved into a section; see normalise() below.
TOP_LEVEL_MOVED: dict[str, tuple[str, str]] = {
    "allgather_size": ("zero_optimization", "allgather_bucket_size"),
    "gradient_accumulation_dtype": ("data_types", "grad_accum_dtype"),
}


# --- old spellings, read as their replacements ---------------------------------------


Warn = list[tuple[str, type[Warning]]]  # collected, then emitted by the public entry point


def _deprecated(old: str, new: str, warns: Warn) -> None:
    warns.append((f"shardwise config: '{old}' is an old DeepSpeed spelling; it is read as "
                  f"'{new}' (write that instead)", ConfigDeprecationWarning))


def _move(src: dict, old: str, dst: dict, new: str, paths: tuple[str, str], value: Any,
          ctx: "_Ctx", warn: bool = True) -> None:
    old_path, new_path = paths
    del src[old]
    if new in dst and dst[new] is not None and dst[new] != value:
        ctx.problems.append(_both(old_path, new_path))
        return
    dst[new] = value
    ctx.notes[new_path] = f"written as '{old_path}'"
    if warn:
        _deprecated(old_path, new_path, ctx.warns)


class _Ctx(NamedTuple):
    problems: list[ConfigProblem]
    notes: dict[str, str]  # new path -> where its value came from
    warns: Warn


def _both(old_path: str, new_path: str) -> ConfigProblem:
    return ConfigProblem(old_path, f"'{old_path}' is an old spelling of '{new_path}', which is "
                                   "also given", f"remove '{old_path}'")


def normalise(doc: dict, problems: list[ConfigProblem]) -> tuple[dict[str, str], Warn]:
    """Rewrite old DeepSpeed spellings in ``doc`` in place. Returns {new path: where its value
    came from} (added to problem hints) and the warnings to emit."""
    ctx = _Ctx(problems, {}, [])
    if "bfloat16" in doc:
        _move(doc, "bfloat16", doc, "bf16", ("bfloat16", "bf16"), doc["bfloat16"], ctx)
    zero = doc.get("zero_optimization")
    if isinstance(zero, bool):  # the oldest form: true meant stage 1
        zero = doc["zero_optimization"] = {"stage": 1 if zero else 0}
        _deprecated("zero_optimization: true/false", 'zero_optimization: {"stage": 1/0}', ctx.warns)
    for old, (section, new) in TOP_LEVEL_MOVED.items():
        if old in doc and isinstance(doc.setdefault(section, {}), dict):
            _move(doc, old, doc[section], new, (old, f"{section}.{new}"), doc[old], ctx)
    if isinstance(zero, dict):
        _normalise_zero(zero, ctx)
    bf16 = doc.get("bf16")
    if isinstance(bf16, dict):
        for key in [k for k in BF16_IGNORED if k in bf16]:
            del bf16[key]
            ctx.warns.append((f"shardwise config: 'bf16.{key}' has no effect (bf16 training "
                              "uses no loss scaling); ignored", ConfigWarning))
    return ctx.notes, ctx.warns


def _normalise_zero(zero: dict, ctx: _Ctx) -> None:
    z = "zero_optimization"
    for (section, old), new in RENAMED.items():
        if section == z and old in zero:
            _move(zero, old, zero, new, (f"{z}.{old}", f"{z}.{new}"), zero[old], ctx)
    for plain, prefixed in ZERO_SYNONYMS.items():  # both spellings are current DeepSpeed
        if plain in zero:
            _move(zero, plain, zero, prefixed, (f"{z}.{plain}", f"{z}.{prefixed}"), zero[plain],
                  ctx, warn=False)
    created = []
    for old, new in (("cpu_offload", "offload_optimizer"), ("cpu_offload_param", "offload_param"),
                     ("cpu_offload_params", "offload_param")):
        if old not in zero:
            continue
        value, old_path = zero.pop(old), f"{z}.{old}"
        if not isinstance(value, bool):
            ctx.problems.append(ConfigProblem(old_path, f"expected true or false, got {got(value)}"))
            continue
        _deprecated(old_path, f'{z}.{new}: {{"device": "{"cpu" if value else "none"}"}}', ctx.warns)
        if value and zero.get(new) is not None:
            ctx.problems.append(_both(old_path, f"{z}.{new}"))
        elif value:
            zero[new] = {"device": "cpu"}
            created.append(new)
            ctx.notes[f"{z}.{new}.device"] = f"set by the old key '{old_path}': true"
    if "cpu_offload_use_pin_memory" in zero:
        pin = zero.pop("cpu_offload_use_pin_memory")
        _deprecated(f"{z}.cpu_offload_use_pin_memory", f"{z}.offload_optimizer.pin_memory",
                    ctx.warns)
        for new in created:
            zero[new]["pin_memory"] = pin
