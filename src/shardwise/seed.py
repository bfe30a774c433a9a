"""``set_random_seed``: one seed for Python's, NumPy's and torch's generators (DeepSpeed's
``deepspeed.runtime.utils.set_random_seed``)."""
from __future__ import annotations

import random

import torch


def set_random_seed(seed: int) -> None:
    """Seed ``random``, ``numpy.random`` (when installed) and torch (CPU and every CUDA device)
    with ``seed``. Same seed on every rank gives every rank the same model initialisation."""
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    else:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
