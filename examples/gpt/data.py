"""Byte-level language-modelling data for the bundled GPT example (no downloads, no tokenizer)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "shakespeare.txt"


def load_text(path: str | Path = DEFAULT_TEXT) -> bytes:
    """The raw bytes of a text file; each byte is one token (vocabulary 256)."""
    data = Path(path).read_bytes()
    if len(data) < 2:
        raise ValueError(f"{path}: a text of at least 2 bytes is needed, got {len(data)}")
    return data


class ByteDataset(Dataset):
    """``(input, target)`` pairs of ``seq_len`` byte tokens, the target shifted by one.

    Sample ``i`` starts at byte ``i * stride`` (default ``stride = seq_len``: non-overlapping
    windows). Deterministic: the order of samples is left to the sampler. With
    ``vocab_size < 256`` (e.g. the ``tiny`` test preset) bytes are folded modulo the vocabulary.
    """

    def __init__(self, data: bytes, seq_len: int, stride: int | None = None, vocab_size: int = 256):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.stride = stride or seq_len
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.tokens = tokens % vocab_size if vocab_size < 256 else tokens
        if len(self.tokens) < seq_len + 1:
            raise ValueError(
                f"text of {len(self.tokens)} bytes is too short for seq_len {seq_len} "
                "(needs seq_len + 1 bytes)"
            )

    def __len__(self) -> int:
        return (len(self.tokens) - self.seq_len - 1) // self.stride + 1

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        start = (index % len(self)) * self.stride
        chunk = self.tokens[start : start + self.seq_len + 1]
        return chunk[:-1], chunk[1:]
