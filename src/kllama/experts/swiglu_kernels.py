"""The Triton kernels of `kllama.experts.swiglu` (imported there at first use). Importing this module raises
ImportError where Triton is missing (CPU builds of torch).

Each kernel repeats torch's eager arithmetic for bf16/fp16 tensors: every op computes in fp32 and rounds its result
to the storage dtype, as eager does between kernels, and `silu` uses the same formula (`x / (1 + exp(-x))`, exact
exp and division), so the results match eager's bits (tests/experts/test_swiglu_gpu.py)."""
import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # older Triton layouts
    from triton.language.extra.cuda import libdevice


@triton.jit
def _silu(gate):
    # torch's CUDA silu in fp32: x / (1 + exp(-x)), IEEE exp and division (tl.exp and `/` are approximate)
    return libdevice.div_rn(gate, 1.0 + libdevice.exp(-gate))


@triton.jit
def gated_forward(hidden, weights, out, rows, inter, TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr):
    # hidden [rows, 2 * inter] = [gate | up], weights [rows], out [rows, inter]:
    # out = round(round(round(silu(gate)) * up) * weight)
    offs_r = tl.program_id(0) * TILE_ROWS + tl.arange(0, TILE_ROWS)
    offs_c = tl.program_id(1) * TILE_COLS + tl.arange(0, TILE_COLS)
    row_ok = offs_r < rows
    mask = row_ok[:, None] & (offs_c[None, :] < inter)
    src = offs_r[:, None].to(tl.int64) * (2 * inter) + offs_c[None, :]
    dtype = out.dtype.element_ty
    gate = tl.load(hidden + src, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(hidden + src + inter, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(weights + offs_r, mask=row_ok, other=0.0).to(tl.float32)
    act = _silu(gate).to(dtype).to(tl.float32)
    gated = (act * up).to(dtype).to(tl.float32)
    dst = offs_r[:, None].to(tl.int64) * inter + offs_c[None, :]
    tl.store(out + dst, (gated * weight[:, None]).to(dtype), mask=mask)


@triton.jit
def gated_backward(hidden, grad, weights, d_hidden, act_out, weight_grad, rows, inter,
                   WRITE_ACT: tl.constexpr, WANT_WEIGHT_GRAD: tl.constexpr,
                   TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr):
    # hidden [rows, 2 * inter] = [gate | up], grad [rows, inter] (the gradient of the scaled activation's input to
    # `down`, before the routing weight), weights [rows] -> d_hidden [rows, 2 * inter], act_out [rows, inter]
    # (round(round(silu(gate)) * up), when WRITE_ACT), weight_grad [rows] fp32 (sum of round(grad * act), when
    # WANT_WEIGHT_GRAD). Eager's chain: g = round(grad * weight); d_up = round(g * round(silu(gate)));
    # d_silu = round(g * up); d_gate = round(d_silu * s * (1 + gate * (1 - s))), s = sigmoid(gate).
    offs_r = tl.program_id(0) * TILE_ROWS + tl.arange(0, TILE_ROWS)
    row_ok = offs_r < rows
    dtype = d_hidden.dtype.element_ty
    weight = tl.load(weights + offs_r, mask=row_ok, other=0.0).to(tl.float32)
    total = tl.zeros([TILE_ROWS], dtype=tl.float32)
    for step in range(tl.cdiv(inter, TILE_COLS)):
        offs_c = step * TILE_COLS + tl.arange(0, TILE_COLS)
        mask = row_ok[:, None] & (offs_c[None, :] < inter)
        src = offs_r[:, None].to(tl.int64) * (2 * inter) + offs_c[None, :]
        at = offs_r[:, None].to(tl.int64) * inter + offs_c[None, :]
        gate = tl.load(hidden + src, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(hidden + src + inter, mask=mask, other=0.0).to(tl.float32)
        g_in = tl.load(grad + at, mask=mask, other=0.0).to(tl.float32)
        silu = _silu(gate).to(dtype).to(tl.float32)
        act = (silu * up).to(dtype).to(tl.float32)
        g = (g_in * weight[:, None]).to(dtype).to(tl.float32)
        d_up = (g * silu).to(dtype)
        d_silu = (g * up).to(dtype).to(tl.float32)
        sig = libdevice.div_rn(1.0, 1.0 + libdevice.exp(-gate))
        d_gate = (d_silu * sig * (1.0 + gate * (1.0 - sig))).to(dtype)
        tl.store(d_hidden + src, d_gate, mask=mask)
        tl.store(d_hidden + src + inter, d_up, mask=mask)
        if WRITE_ACT:
            tl.store(act_out + at, act.to(dtype), mask=mask)
        if WANT_WEIGHT_GRAD:
            total += tl.sum(tl.where(mask, (g_in * act).to(dtype).to(tl.float32), 0.0), axis=1)
    if WANT_WEIGHT_GRAD:
        tl.store(weight_grad + offs_r, total, mask=row_ok)
