"""Named random streams derived from one root seed.

``stream_seed(root, "split")`` depends only on the root seed and the stream's name, so adding a
new stream never shifts the others. Names are hashed with ``zlib.crc32`` (stable across
processes), never with ``hash()``.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

__all__ = ["numpy_rng", "stream_seed", "torch_generator"]


def stream_seed(root: int, name: str) -> int:
    """Seed of stream ``name`` under root seed ``root``: ``crc32(name) XOR mix(root)`` in [0, 2**31)."""
    mixed = (int(root) * 0x9E3779B1 + zlib.crc32(name.encode("utf-8"))) & 0xFFFFFFFF
    return int(np.random.SeedSequence([mixed, int(root) & 0xFFFFFFFF]).generate_state(1)[0] & 0x7FFFFFFF)


def numpy_rng(root: int, name: str) -> np.random.Generator:
    """A NumPy generator for stream ``name``."""
    return np.random.default_rng(stream_seed(root, name))


def torch_generator(root: int, name: str) -> torch.Generator:
    """A CPU ``torch.Generator`` for stream ``name``."""
    g = torch.Generator()
    g.manual_seed(stream_seed(root, name))
    return g
