"""``loss.backward()`` on an engine's output, as DeepSpeed (>= 0.18.3) allows at every stage.

[Note: direct backward]
``engine.backward(loss)`` scales the loss (loss scale, 1/accumulation, 1/dp size) and brackets
autograd with the strategy's ``before_backward`` / ``after_backward`` (gradient reductions
are launched from parameter hooks and completed at the end). When a script calls
``loss.backward()`` (or ``out.backward(grad)``) itself, nothing brackets autograd, so the
engine arranges the same from inside it: every floating-point tensor the engine's forward
returns gets a gradient hook. The first hook that fires in a backward pass

1. calls ``before_backward(sync)`` (what ``engine.backward`` does first),
2. queues ``after_backward(sync)`` to run when the autograd engine finishes this pass
   (``Variable._execution_engine.queue_callback``, which FSDP uses for the same purpose),

and every hook multiplies the gradient arriving at its output by the factor
``engine.backward`` would have applied to the loss. Gradients are linear in the output
gradient, so the parameters receive exactly what ``engine.backward(loss)`` gives (tested
bitwise at stages 0-3). Inside ``engine.backward`` the hooks pass gradients through
unchanged (the loss is scaled there already). A backward that reaches the engine's outputs
from another engine's loss (a GAN's discriminator inside the generator's loss) is a
backward of this engine too: its gradients are scaled and reduced like any other, and
``engine.zero_grad()`` drops them, as ``netD.zero_grad()`` does in plain PyTorch.

What this cannot see: the loss itself (a NaN loss is caught by the gradient norm instead of
by name), and a backward that bypasses the engine's forward (``engine.module(x)``):
``engine.step()`` refuses that one, as before.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.autograd import Variable


def output_tensors(out: Any, depth: int = 0) -> list[torch.Tensor]:
    """The tensors of a forward's output that autograd can reach: a tensor, or tensors inside
    tuples, lists and dicts (Hugging Face ``ModelOutput`` is a dict), a few levels deep."""
    if isinstance(out, torch.Tensor):
        return [out] if out.requires_grad and out.is_floating_point() else []
    if depth > 4:
        return []
    if isinstance(out, dict):
        items = out.values()
    elif isinstance(out, (tuple, list)):
        items = out
    else:
        return []
    return [t for item in items for t in output_tensors(item, depth + 1)]


class DirectBackward:
    """Hooks an engine's forward outputs so that a plain ``backward()`` on them trains right.

    ``begin()`` returns the factor for this pass and does the strategy's prologue;
    ``end()`` its epilogue. ``managed`` is true inside ``engine.backward``.
    """

    def __init__(self, begin: Callable[[], float], end: Callable[[], None]):
        self._begin, self._end = begin, end
        self.managed = False
        self._factor: float | None = None  # set while a direct pass runs

    def watch(self, out: Any) -> Any:
        if torch.is_grad_enabled():
            for t in output_tensors(out):
                t.register_hook(self._on_output_grad)
        return out

    def _on_output_grad(self, grad: torch.Tensor) -> torch.Tensor | None:
        if self.managed:
            return None
        if self._factor is None:
            self._factor = self._begin()
            Variable._execution_engine.queue_callback(self._finish)
        return grad * self._factor

    def _finish(self) -> None:
        self._factor = None
        self._end()

    @property
    def active(self) -> bool:
        return self._factor is not None
