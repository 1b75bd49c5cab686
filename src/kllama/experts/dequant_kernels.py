"""The Triton kernels of `kllama.experts.gpu_dequant`: int8 rows, int4 groups, fp8 blocks (imported there at first
use: importing Triton costs start-up time that a run without quantized experts on a GPU should not pay). Importing
this module raises ImportError where Triton is missing (CPU builds of torch)."""
import triton
import triton.language as tl


@triton.jit
def int8_rows(data, scale, out, total_rows, cols, TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr):
    # data/out [total_rows, cols] row-major, scale [total_rows]: out[r, c] = data[r, c] * scale[r]
    rows = tl.program_id(0) * TILE_ROWS + tl.arange(0, TILE_ROWS)
    offs_c = tl.program_id(1) * TILE_COLS + tl.arange(0, TILE_COLS)
    row_ok = rows < total_rows
    mask = row_ok[:, None] & (offs_c[None, :] < cols)
    offsets = rows[:, None].to(tl.int64) * cols + offs_c[None, :]
    values = tl.load(data + offsets, mask=mask).to(tl.float32)
    row_scale = tl.load(scale + rows, mask=row_ok)
    tl.store(out + offsets, (values * row_scale[:, None]).to(out.dtype.element_ty), mask=mask)


@triton.jit
def fp8_blocks(data, scale, out, rows_per_expert, part, blocks_per_part, cols, scale_cols,
               TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr, BLOCK_EDGE: tl.constexpr):
    # data/out [E * rows_per_expert, cols] row-major; each expert's rows are `projections` groups of `part` rows,
    # each on its own 128x128 grid; scale [E, projections * blocks_per_part, scale_cols]. A program's TILE_ROWS
    # rows lie in one block row (part and the tile start are multiples of TILE_ROWS), its columns in one block.
    first = tl.program_id(0) * TILE_ROWS
    expert = first // rows_per_expert
    within = first % rows_per_expert
    block_row = expert * (rows_per_expert // part) * blocks_per_part + (within // part) * blocks_per_part \
        + (within % part) // BLOCK_EDGE
    block_col = tl.program_id(1)
    block_scale = tl.load(scale + block_row * scale_cols + block_col)
    rows = first + tl.arange(0, TILE_ROWS)
    offs_c = block_col * TILE_COLS + tl.arange(0, TILE_COLS)
    mask = offs_c[None, :] < cols
    offsets = rows[:, None].to(tl.int64) * cols + offs_c[None, :]
    values = tl.load(data + offsets, mask=mask).to(tl.float32)
    tl.store(out + offsets, (values * block_scale).to(out.dtype.element_ty), mask=mask)


@triton.jit
def int4_groups(data, scale, out, total_rows, half_cols, groups, TILE_ROWS: tl.constexpr, TILE_BYTES: tl.constexpr,
                GROUP: tl.constexpr):
    # data [total_rows, half_cols] uint8 row-major, two values a byte (column 2j low nibble, 2j + 1 high, each + 8);
    # scale [total_rows, groups] fp32, one per GROUP columns; out [total_rows, 2 * half_cols]:
    # out[r, c] = (nibble(r, c) - 8) * scale[r, c // GROUP]. Each byte and its scale are read once; the byte's two
    # values share a group (GROUP is even), and are written side by side.
    rows = tl.program_id(0) * TILE_ROWS + tl.arange(0, TILE_ROWS)
    offs_b = tl.program_id(1) * TILE_BYTES + tl.arange(0, TILE_BYTES)
    row_ok = rows < total_rows
    mask = row_ok[:, None] & (offs_b[None, :] < half_cols)
    packed = tl.load(data + rows[:, None].to(tl.int64) * half_cols + offs_b[None, :], mask=mask).to(tl.int32)
    group_scale = tl.load(scale + rows[:, None].to(tl.int64) * groups + (offs_b[None, :] * 2) // GROUP, mask=mask)
    low = ((packed & 15) - 8).to(tl.float32) * group_scale  # columns 2j
    high = ((packed >> 4) - 8).to(tl.float32) * group_scale  # columns 2j + 1
    values = tl.interleave(low, high).to(out.dtype.element_ty)  # [TILE_ROWS, 2 * TILE_BYTES]: 2j, 2j + 1, ...
    offs_c = tl.program_id(1) * (2 * TILE_BYTES) + tl.arange(0, 2 * TILE_BYTES)
    out_mask = row_ok[:, None] & (offs_c[None, :] < 2 * half_cols)
    tl.store(out + rows[:, None].to(tl.int64) * (2 * half_cols) + offs_c[None, :], values, mask=out_mask)
