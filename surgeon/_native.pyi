"""Native kernels of surgeon (global threshold, ranking, N:M selection, schedules).

Call these through ``surgeon._backend``, which checks arguments, accepts tensors and any real dtype,
and falls back to the torch twins in ``surgeon.kernels``.
"""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__version__: str

def global_threshold(
    arrays: Sequence[npt.NDArray[np.float32]],
    k: int,
    weights: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> tuple[float, list[int]]: ...
def select_smallest(
    arrays: Sequence[npt.NDArray[np.float32]],
    k: int,
    weights: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> list[npt.NDArray[np.int64]]: ...
def rank(costs: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.int64]: ...
def nm_mask(scores: npt.NDArray[np.float32], n: int, m: int) -> npt.NDArray[np.bool_]: ...
def schedule(final_sparsity: float, shots: int, kind: str) -> list[float]: ...
def cumulative_counts(total: int, final_sparsity: float, shots: int, kind: str) -> npt.NDArray[np.int64]: ...
def next_count(
    removed_so_far: int, shot: int, total: int, final_sparsity: float, shots: int, kind: str
) -> int: ...
