"""Launch settings of the Triton kernels of the LNSR step (DESIGN.md §1): tile sizes and warps from the
row width and k, the limits of what the kernels handle, and the row tile the row-wise kernels share."""
from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

# Every kernel keeps whole rows in registers: ε_t can only be written once ‖x_t‖ and ‖ε_t‖ are known,
# and a row read once is never read again.
MAX_WIDTH = 8192
# In-manifold noise keeps a token's k difference vectors as one [k, d] fp32 tile through Gram–Schmidt.
MAX_K = 32
# fp32 values per program of the row-wise kernels: enough bytes in flight to stream at full bandwidth.
_ROW_TILE = 4096
# fp32 values of a resident tile per thread: more spills registers.
_PER_THREAD = 32
_MAX_WARPS = 16


class Launch(NamedTuple):
    block_k: int   # neighbour rows of the tile (power of two >= k); 1 for the row-wise kernels
    block_d: int   # columns of the tile (power of two >= width)
    rows: int      # tokens (rows) per program
    num_warps: int


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def launch_config(width: int, k: int | None = None, width_name: str = "d") -> Launch:
    """Tile and warps for rows of `width` elements; with `k`, one token per program holding its k
    neighbour rows (in-manifold noise), else as many rows per program as fill a 4096-value tile.

    Raises ValueError when width is outside [1, MAX_WIDTH] or k outside [1, MAX_K].
    """
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"{width_name} must be in [1, {MAX_WIDTH}] for the Triton kernels, got {width}")
    if k is not None and not 1 <= k <= MAX_K:
        raise ValueError(f"k (neighbours per token) must be in [1, {MAX_K}] for the Triton kernels, got {k}")
    block_d = _pow2(width)
    block_k = 1 if k is None else _pow2(k)
    rows = 1 if k is not None else max(1, _ROW_TILE // block_d)
    tile = rows * block_k * block_d
    num_warps = min(_MAX_WARPS, max(4, tile // (32 * _PER_THREAD)))
    return Launch(block_k, block_d, rows, num_warps)


@triton.jit
def row_tile(real_ptr, n_rows, d, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The [ROWS, BLOCK_D] tile of program_id(0) over rows of width d: (element offsets, mask of the
    real tokens' elements, mask of every element in bounds). Padding rows are never read — they may hold
    anything, NaN included — but are written (with 0) through the second mask."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    in_rows = rows < n_rows
    live = in_rows
    if real_ptr is not None:
        live = live & (tl.load(real_ptr + rows, mask=in_rows, other=0) != 0)
    in_cols = (cols < d)[None, :]
    return rows[:, None] * d + cols[None, :], live[:, None] & in_cols, in_rows[:, None] & in_cols
