"""Random-number-generator state of one rank as JSON: python ``random``, numpy (if importable),
torch CPU and every CUDA device (if available). Restored on load for bit-for-bit resume."""
from __future__ import annotations

import base64
import random

import torch

from shardwise.comm.context import uses_cuda


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(bytes(t.cpu().tolist())).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.tensor(list(base64.b64decode(s)), dtype=torch.uint8)


def _has_numpy() -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


def capture() -> dict:
    version, state, gauss = random.getstate()
    out: dict = {"python": [version, list(state), gauss], "torch": _b64(torch.get_rng_state())}
    if _has_numpy():
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    if uses_cuda():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore(state: dict) -> None:
    version, py, gauss = state["python"]
    random.setstate((version, tuple(py), gauss))
    torch.set_rng_state(_unb64(state["torch"]))
    if "numpy" in state and _has_numpy():
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and uses_cuda():
        saved = [_unb64(s) for s in state["cuda"]]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
