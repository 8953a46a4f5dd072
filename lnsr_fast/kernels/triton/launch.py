"""Launch settings of the Triton kernels of the LNSR step (docs/design.md §1): a few fixed tiles that loop over
the row width, so that every configuration dispatch can choose is compiled and checked for spills
(tests/test_kernel_resources.py), and the limits of what the kernels take (kernels.LIMITS)."""
from __future__ import annotations

from typing import NamedTuple

from .. import MAX_K, MAX_WIDTH


class Launch(NamedTuple):
    block_k: int   # neighbour rows of the tile (in-manifold noise; a power of two >= k, >= 16 for tl.dot)
    block_d: int   # columns of the tile; the kernels loop over the row width in steps of it
    rows: int      # tokens (rows) per program
    num_warps: int


# Row-wise kernels: 256 columns per step, so that widths that are multiples of 256 (768, 1024, 4096, ...)
# waste no lane. The stability kernels stream 16 rows (32 fp32 values of each tensor per thread in flight,
# enough for full bandwidth); Gaussian noise 4, as it computes each draw twice (once for ‖z_t‖, once
# to write it) and its Philox code per value is long.
# Rows of at most 64 values (small test models) take 4 times the rows in steps of 64 columns.
ROW_TILE = Launch(block_k=1, block_d=256, rows=16, num_warps=4)
NOISE_TILE = Launch(block_k=1, block_d=256, rows=4, num_warps=4)
NARROW = 64


def _check(width: int, width_name: str, k: int | None = None) -> None:
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"{width_name} must be in [1, {MAX_WIDTH}] for the Triton kernels, got {width}")
    if k is not None and not 1 <= k <= MAX_K:
        raise ValueError(f"k (neighbours per token) must be in [1, {MAX_K}] for the Triton kernels, got {k}")


def row_tile_config(width: int, width_name: str = "d", noise: bool = False) -> Launch:
    """The tile of the row-wise kernels (of Gaussian noise with `noise`); ValueError when width is outside
    [1, MAX_WIDTH]."""
    _check(width, width_name)
    tile = NOISE_TILE if noise else ROW_TILE
    if width <= NARROW:
        tile = tile._replace(block_d=NARROW, rows=tile.rows * tile.block_d // NARROW)
    return tile


def in_manifold_config(width: int, k: int, width_name: str = "d") -> Launch:
    """One token per program: its k neighbour rows (padded to 16 or 32, the tl.dot sizes) in steps of 64
    columns, whose fp64 Gram matrix is accumulated on the tensor cores; ValueError outside the limits."""
    _check(width, width_name, k)
    return Launch(block_k=16 if k <= 16 else 32, block_d=64, rows=1, num_warps=4)
