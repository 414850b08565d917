"""The order-preserving integer key of a float32 cost, shared by every torch kernel.

``order_key`` maps float32 values to int64 keys in ``[0, 2**32)`` whose integer order is the order
of the values: ``-inf`` lowest, ``+inf`` highest, subnormals in place, and ``-0.0`` given the key of
``0.0`` (they are the same cost). NaN gets some key; callers reject NaN before.
"""

from __future__ import annotations

import struct

import torch

__all__ = ["KEY_LIMIT", "key_value", "order_key"]

#: One above the largest key: the stop key meaning "everything fits".
KEY_LIMIT = 1 << 32


def order_key(x: torch.Tensor) -> torch.Tensor:
    """Int64 keys of a float32 tensor (same shape, same device)."""
    if x.dtype != torch.float32:
        raise ValueError(f"order_key needs float32, got {x.dtype}")
    x = torch.where(x == 0, torch.zeros((), dtype=x.dtype, device=x.device), x)
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    # Negative values: flip every bit (more negative = smaller key); others: set the top bit.
    return torch.where(bits < 0, ~bits, bits + (1 << 31))


def key_value(key: int) -> float:
    """The float32 value (as a Python float) of a key of :func:`order_key`."""
    key = int(key)
    bits = key & 0x7FFFFFFF if key & 0x80000000 else ~key & 0xFFFFFFFF
    return struct.unpack("<f", struct.pack("<I", bits))[0]
