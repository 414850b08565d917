"""Torch twins of the native kernels in ``surgeon._native``.

Every function here has the native function's signature and exactly its semantics (order, ties,
errors), and runs on the device of its input tensors; results are tensors on that device (schedule
counts on the CPU). Library code should call ``surgeon._backend``, which validates arguments, takes
tensors or NumPy arrays, and picks the native code or these twins.
"""

from .nm import nm_mask
from .order import key_value, order_key
from .schedule import count_of, cumulative_counts, next_count, schedule
from .threshold import Cut, find_cut, global_threshold, rank, select_smallest

__all__ = [
    "Cut",
    "count_of",
    "cumulative_counts",
    "find_cut",
    "global_threshold",
    "key_value",
    "next_count",
    "nm_mask",
    "order_key",
    "rank",
    "schedule",
    "select_smallest",
]
