"""Named errors. Every user-facing failure is a subclass of :class:`ShardwiseError`.

[Note: named errors]
A message says *what* went wrong, *where* (rank, step, file, config key) and *how to fix
it*. User errors never surface as ``AssertionError``; bare ``assert`` in ``src/`` guards
internal invariants only.
"""
from __future__ import annotations

from dataclasses import dataclass


class ShardwiseError(Exception):
    """Base class of every error shardwise raises on purpose."""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem found in a config document."""

    path: str  # JSON path, e.g. "zero_optimization.stage"
    message: str  # what is wrong and what was expected
    hint: str = ""  # e.g. "did you mean 'stage'?"

    def __str__(self) -> str:
        text = f"{self.path or '<root>'}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text


class ConfigError(ShardwiseError):
    """The config document has one or more problems; all of them are listed."""

    def __init__(self, problems: list[ConfigProblem] | str):
        if isinstance(problems, str):
            problems = [ConfigProblem("", problems)]
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        n = len(self.problems)
        lines = [f"shardwise config has {n} problem{'s' if n != 1 else ''}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class DistributedSetupError(ShardwiseError):
    """torch.distributed could not be set up (environment, backend, rendezvous)."""


class UsageError(ShardwiseError):
    """The engine was used in a way it does not support (wrong call order, bad argument)."""


class LossScaleError(ShardwiseError):
    """fp16 dynamic loss scaling cannot make progress (scale at minimum, repeated overflow)."""


class NonFiniteError(ShardwiseError):
    """A loss or gradient norm is NaN/inf (outside fp16 loss scaling, which skips instead)."""


class CollectiveError(ShardwiseError):
    """A collective failed on this rank because another rank died, stopped responding or
    left; ``failed_ranks`` names the ranks found dead or stuck (empty if none could be told)."""

    def __init__(self, message: str, failed_ranks: tuple[int, ...] = ()):
        super().__init__(message)
        self.failed_ranks = tuple(failed_ranks)


class CollectiveTimeoutError(CollectiveError):
    """Some ranks did not reach a collective within its timeout (``missing_ranks`` names them)."""

    def __init__(self, message: str, missing_ranks: tuple[int, ...] = ()):
        super().__init__(message, missing_ranks)
        self.missing_ranks = tuple(missing_ranks)


class JoinError(DistributedSetupError):
    """Not every rank joined the process group in time ("k of N ranks joined; missing [...]")."""

    def __init__(self, message: str, missing_ranks: tuple[int, ...] = ()):
        super().__init__(message)
        self.missing_ranks = tuple(missing_ranks)


class MismatchError(ShardwiseError):
    """Ranks started with different configs or models (the start-up fingerprint check)."""


class CheckpointError(ShardwiseError):
    """A checkpoint could not be saved or loaded; the message names the file, rank and fix."""
