"""The DeepSpeed-format config of a Hugging Face ``Trainer`` run: ``"auto"`` values filled from
``TrainingArguments``, as transformers does for ``--deepspeed``.

[Note: auto values]
transformers' ``HfTrainerDeepSpeedConfig`` replaces ``"auto"`` with the matching
``TrainingArguments`` value and refuses a non-"auto" value that disagrees with the argument.
:func:`fill_from_trainer` does the same for the same keys (the table ``_MATCHED`` and the
hidden-size keys), with one difference: keys the Trainer itself acts on (batch sizes,
accumulation, clipping, fp16/bf16) are *also* filled when the config leaves them out, because
the Trainer's data loader and loss scaling follow its arguments whatever the config says; an
omitted key must not silently disagree with them. Everything else the config omits keeps
shardwise's default. An ``"auto"`` this module does not know stays, and shardwise's config
loader then names it.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

from shardwise.errors import ConfigError, ConfigProblem

_MISSING = object()


def read_config(source: Any) -> dict:
    """The config document (a path to JSON or a dict) as a fresh dict; problems reading it are a
    :class:`ConfigError`."""
    from shardwise.config.load import load

    problems: list[ConfigProblem] = []
    doc = load(source, problems)
    if problems or doc is None:
        raise ConfigError(problems or "the config could not be read")
    return copy.deepcopy(doc)


def _node(doc: dict, path: str, create: bool) -> tuple[dict | None, str]:
    """The dict holding the last key of the dotted ``path`` (None when a parent is missing)."""
    *parents, leaf = path.split(".")
    node: Any = doc
    for key in parents:
        child = node.get(key) if isinstance(node, dict) else None
        if child is None and create:
            child = node[key] = {}
        if not isinstance(child, dict):
            return None, leaf
        node = child
    return node, leaf


def _get(doc: dict, path: str) -> Any:
    node, leaf = _node(doc, path, create=False)
    return _MISSING if node is None else node.get(leaf, _MISSING)


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


class _Filler:
    """Fills one document, collecting every disagreement before raising them together."""

    def __init__(self, doc: dict):
        self.doc = doc
        self.problems: list[ConfigProblem] = []

    def match(self, path: str, value: Any, arg: str, *, if_missing: bool = False) -> None:
        """``"auto"`` -> ``value``; a set value must equal it; absent: filled iff ``if_missing``."""
        current = _get(self.doc, path)
        if current is _MISSING:
            if if_missing:
                node, leaf = _node(self.doc, path, create=True)
                if node is not None:
                    node[leaf] = value
            return
        node, leaf = _node(self.doc, path, create=False)
        if is_auto(current):
            node[leaf] = value  # type: ignore[index]
        elif not _same(current, value):
            self.problems.append(ConfigProblem(
                path, f"is {current!r} but TrainingArguments.{arg} gives {value!r}",
                f'set it to "auto" (filled from the TrainingArguments) or change {arg} to match'))

    def only(self, path: str, value: Any) -> None:
        """``"auto"`` -> ``value``; anything else is kept."""
        node, leaf = _node(self.doc, path, create=False)
        if node is not None and is_auto(node.get(leaf)):
            node[leaf] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


# (config key, TrainingArguments getter, argument name shown in errors, also fill when absent)
_MATCHED: list[tuple[str, Callable[[Any, int], Any], str, bool]] = [
    ("train_micro_batch_size_per_gpu", lambda a, w: a.per_device_train_batch_size, "per_device_train_batch_size", True),
    ("gradient_accumulation_steps", lambda a, w: a.gradient_accumulation_steps, "gradient_accumulation_steps", True),
    ("train_batch_size", lambda a, w: w * a.per_device_train_batch_size * a.gradient_accumulation_steps,
     "world_size * per_device_train_batch_size * gradient_accumulation_steps", True),
    ("gradient_clipping", lambda a, w: float(a.max_grad_norm or 0.0), "max_grad_norm", True),
    ("optimizer.params.lr", lambda a, w: a.learning_rate, "learning_rate", False),
    ("optimizer.params.betas", lambda a, w: [a.adam_beta1, a.adam_beta2], "adam_beta1/adam_beta2", False),
    ("optimizer.params.eps", lambda a, w: a.adam_epsilon, "adam_epsilon", False),
    ("optimizer.params.weight_decay", lambda a, w: a.weight_decay, "weight_decay", False),
    ("scheduler.params.warmup_max_lr", lambda a, w: a.learning_rate, "learning_rate", False),
]


def hidden_size_of(model: Any) -> int | None:
    """``config.hidden_size`` (or the largest of ``hidden_sizes``; or the text config's)."""
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is None:
            continue
        if getattr(c, "hidden_size", None) is not None:
            return int(c.hidden_size)
        if getattr(c, "hidden_sizes", None):
            return int(max(c.hidden_sizes))
    return None


_HIDDEN_KEYS = ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                "zero_optimization.stage3_param_persistence_threshold")


def _fill_hidden_size(f: _Filler, model: Any) -> None:
    wanted = [k for k in _HIDDEN_KEYS if is_auto(_get(f.doc, k))]
    if not wanted:
        return
    h = hidden_size_of(model)
    if h is None:
        f.problems.append(ConfigProblem(
            wanted[0], f'"auto" needs the model\'s hidden size, but {type(model).__name__}.config has neither '
            "hidden_size nor hidden_sizes", f"write integers for {', '.join(wanted)}"))
        return
    f.only("zero_optimization.reduce_bucket_size", h * h)
    f.only("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * h * h))
    f.only("zero_optimization.stage3_param_persistence_threshold", 10 * h)


def _mixed_precision(f: _Filler, args: Any) -> None:
    for section, on, arg in (("fp16", args.fp16 or args.fp16_full_eval, "fp16/fp16_full_eval"),
                             ("bf16", args.bf16 or args.bf16_full_eval, "bf16/bf16_full_eval")):
        # absent section and the flag off: nothing to say (shardwise's default is off too)
        f.match(f"{section}.enabled", bool(on), arg, if_missing=bool(on))


def fill_from_trainer(doc: dict, args: Any, *, world_size: int, model: Any, num_training_steps: int) -> dict:
    """A copy of ``doc`` with its ``"auto"`` values filled from ``args`` (a ``TrainingArguments``),
    the model (hidden size) and the run's number of optimizer steps. Raises one
    :class:`ConfigError` listing every value that disagrees with the arguments."""
    f = _Filler(copy.deepcopy(doc))
    for path, get, arg, if_missing in _MATCHED:
        f.match(path, get(args, world_size), arg, if_missing=if_missing)
    f.only("scheduler.params.warmup_min_lr", 0)
    f.match("scheduler.params.total_num_steps", num_training_steps, "max_steps (the run's optimizer steps)")
    # like transformers (DeepSpeed >= 0.19.6 refuses 0 warmup steps): at least one
    f.match("scheduler.params.warmup_num_steps", max(1, args.get_warmup_steps(num_training_steps)),
            "warmup_steps/warmup_ratio")
    _mixed_precision(f, args)
    _fill_hidden_size(f, model)
    if f.problems:
        raise ConfigError(f.problems)
    return f.doc


def zero_stage(doc: dict) -> int:
    stage = _get(doc, "zero_optimization.stage")
    return 0 if stage is _MISSING or stage is None else int(stage)


__all__ = ["read_config", "fill_from_trainer", "hidden_size_of", "is_auto", "zero_stage"]
