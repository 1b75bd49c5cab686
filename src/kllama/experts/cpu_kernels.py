"""The C++ kernel of the no-grad CPU expert pass: one call computes one MoE layer's selected experts for a few tokens.

Why a kernel (docs/design.md, "The CPU expert pass of decode"): decode reads each selected expert's weights once
from DRAM, and torch's best form (`linear`, oneDNN) reached 61 % of the host's read bandwidth per expert call on the
H200 box, before the per-expert Python and small ops of a layer. `csrc/expert_pass.cpp` does the whole layer in
one call without the GIL: two stages (gate/up with the activation and routing weight fused, then down with the
weighted sum over a token's experts), each one fork/join over output rows of all selected experts at once, with
fp32 accumulation (AVX512-BF16 dot products for bf16 weights and AVX512-VNNI integer ones for int8 and int4 weights
where the CPU has them; AVX-512F, AVX2+FMA+F16C or scalar code otherwise, and for fp8 weights everywhere).

The call (`expert_layer`), for `T <= KERNEL_MAX_TOKENS` tokens:

* `x [T, H]` bf16 or fp32 (other float dtypes are cast to fp32); `top_k_index [T, K]` int, `top_k_weights [T, K]`;
* `gate_up [E, 2I, H]` (gate rows, then up rows) and `down [E, H, I]`, contiguous host tensors, both bf16, or both
  int8 with per-output-row fp32 scales `gate_up_scale [E, 2I]`, `down_scale [E, H]` (`weight = int8 * scale`), or
  both float8_e4m3fn with fp32 scales per 128x128 block (`quant.py`'s layout): `gate_up_scale
  [E, 2 * ceil(I/128), ceil(H/128)]` (gate rows and up rows each on their own grid, `projections=2`), `down_scale
  [E, ceil(H/128), ceil(I/128)]`. fp8 bytes are read as they are (shifted into fp16 bit patterns and widened with
  F16C, exactly), each 128-column block's partial dot product times its scale; or both int4 as uint8
  `gate_up [E, 2I, H/2]`, `down [E, H, I/2]` (H and I even; byte `j` of a row holds column `2j` in its low nibble and
  `2j + 1` in its high one, each as `q + 8`, `q` in [-7, 7]) with fp32 scales per output row and 64-column group
  (the last one shorter where the width is not a multiple of 64), `gate_up_scale [E, 2I, ceil(H/64)]`, `down_scale
  [E, H, ceil(I/64)]`, `weight[n, k] = (nibble - 8) * scale[n, k // 64]`;
* `lora`: optional `{"gate_up_proj" | "down_proj": (a [E, r, in], b [E, out, r])}` in bf16, the scaling folded into
  b (`HostExperts.lora_factors`' layout); the delta `b_e @ (a_e @ input)` is added to that projection;
* returns `out [T, H]` fp32: `sum_k w[t, k] * down_e(silu(gate_e x) * up_e x)`, the activation SiLU; or writes
  it into a given `out` (fp32, or bf16: each fp32 sum rounded once, as `.to(torch.bfloat16)` rounds it).

Numerics: every product accumulates in fp32 (int8, fp8 and int4: fp32 activations, equal to the fp32 reference of
the dequantized weights to ~1e-6; int4 multiplies each activation by `(nibble - 8) * scale` rounded to fp32 once,
the reference's own dequantized weight; int8 and int4 on the `avx512-vnni` tier and above: each activation row as
24-bit integers times a per-row scale, exact integer sums (int4: per 8 columns, then times the group's scale in
fp32), within ~2.4e-7 x max|a| x sum|w| of the fp32 dot product, ~1e-7 relative on random rows:
`csrc/expert_pass.cpp`, "AVX512-VNNI"); with bf16 weights the activations the products read (`x` and
`silu(gate) * up * w`) are rounded to bf16 once, as the torch path rounds them (which also rounds the gate/up
outputs and the routing-weight product; the two paths agree to ~1e-2 relative). The kernel runs SiLU only and skips
nothing else: expert LoRA runs inside it.

`host_job` makes the same pass over fixed buffers, checked once and run many times, also from a thread without the
GIL: a captured decode step runs it as a CUDA host node (`kllama.infer.graphs`). The extension throws no C++
exception and formats no message with iostreams: its functions return a failed check's message, joined by hand, and
it is raised here as RuntimeError (on the H200 box's torch 2.11 CUDA build, a message formatted by a C++ stream inside
the extension crashed the process; docs/design.md).

The extension is built on first use with torch's C++ extension tools (ninja, the host's C++ compiler) into torch's
extensions cache and imported from there by later processes without running the build tools again (its name hashes the
source text and build settings, so a touched or moved copy of the source reuses it); one line on stderr while it
builds. Each instruction-set path is checked against torch on a small problem per weight dtype when loaded, and each
dtype runs the best path that agrees (one line when a path is dropped). Without a compiler, ninja or an x86-64 CPU, or
if the build fails, one line says why and the torch path runs.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import sys
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor
from torch.nn.functional import silu

from kllama.experts.quant import BLOCK, INT4_GROUP, quantize, quantize_int4, unpack_int4

SOURCE = Path(__file__).parent / "csrc" / "expert_pass.cpp"
# tiers, best last, each including those below (bf16 weights read avx512-vnni's as avx512's)
ISAS: dict[str, int] = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512-vnni": 3, "avx512-bf16": 4}
KERNEL_MAX_TOKENS = 64  # memory-bound up to here on a 16-core AVX-512 host; torch's GEMMs take larger passes
# weight dtypes the kernel reads; uint8 means int4 (two values a byte, per-64-column group scales)
KERNEL_DTYPES = (torch.bfloat16, torch.int8, torch.float8_e4m3fn, torch.uint8)
KERNEL_LABELS = {torch.bfloat16: "bf16", torch.int8: "int8", torch.float8_e4m3fn: "fp8", torch.uint8: "int4"}
_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]


@dataclass(frozen=True)
class KernelStatus:
    """The loaded extension and the instruction-set tier each weight dtype runs, or why it is not available."""

    module: ModuleType | None
    isa: str | None  # the best tier in use (of `tiers`)
    reason: str = ""
    tiers: Mapping[torch.dtype, str] = field(default_factory=dict)  # per weight dtype; absent: no path agrees

    @property
    def available(self) -> bool:
        return self.module is not None


def _say(line: str) -> None:
    print(f"kllama: {line}", file=sys.stderr, flush=True)


def _openmp_link_flags() -> list[str]:
    """Link against the OpenMP runtime torch has already loaded (a wheel may bundle it under another name), so the
    kernel's threads are torch's intra-op pool and `torch.set_num_threads` applies to them."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return ["-fopenmp"]
    found = dict.fromkeys(re.findall(r"(/\S*lib(?:gomp|iomp5)[^/\s]*\.so[^/\s]*)", maps.read_text()))
    if not found:
        return ["-fopenmp"]
    torch_dir = str(Path(torch.__file__).resolve().parent)
    lib = Path(next((path for path in found if path.startswith(torch_dir)), next(iter(found))))  # torch's own first
    return [f"-L{lib.parent}", f"-l:{lib.name}", f"-Wl,-rpath,{lib.parent}"]


def _library(source: Path = SOURCE) -> tuple[str, Path, list[str]]:
    """The extension's name, build directory and link flags: the name carries a hash of everything the library is
    built from (source text, torch and Python versions, flags), so a library of that name is this source's build."""
    from torch.utils.cpp_extension import get_default_build_root  # imported on demand: slow to import

    ldflags = _openmp_link_flags()
    key = "\n".join([source.read_text(), torch.__version__, sys.version, *_CFLAGS, *ldflags])
    name = f"kllama_expert_pass_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # torch's own variable, as it reads it
    return name, Path(root) / name, ldflags


def _load_built(name: str, build_dir: Path) -> ModuleType | None:
    """The library already built under `build_dir`, imported without torch's `load` (None when there is none, a
    build holds the directory's lock, or it does not import). `load` runs ninja, which rebuilds when the source's
    modification time or path is newer or other than the last build's: a fresh checkout or a copied tree (a GPU box's
    working copy, a second worktree sharing the cache) then spent 14-16 s rebuilding an identical library, silently,
    inside the start-up crossover measurement (benchmarks/NOTES.md, eighth session)."""
    library = build_dir / f"{name}.so"
    if name in sys.modules:
        return sys.modules[name]
    if not library.exists() or (build_dir / "lock").exists():
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:  # a truncated or foreign file: build it again
        return None
    sys.modules[name] = module
    return module


def _build(name: str, build_dir: Path, ldflags: list[str], source: Path = SOURCE) -> ModuleType:
    from torch.utils.cpp_extension import load

    _say(f"building the CPU expert kernel (once, up to a minute; cached in {build_dir})")
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name, [str(source)], extra_cflags=_CFLAGS, extra_ldflags=ldflags, build_directory=str(build_dir),
                verbose=False)


def load_kernel_source(source: Path) -> ModuleType:
    """The extension built from another copy of the kernel's source: a variant a benchmark times beside this one
    (`benchmarks/cpu_gemv.py --compare-source`). Built or loaded from the same cache, with the same flags, as
    `kernel_status` builds this one (the same text is the same library), but not self-checked: kllama never runs it.
    Raises RuntimeError when it cannot be built."""
    name, build_dir, ldflags = _library(source)
    module = _load_built(name, build_dir)
    if module is not None:
        return module
    reason = _why_not_buildable()
    if reason is not None:
        raise RuntimeError(f"cannot build {source}: {reason}")
    return _build(name, build_dir, ldflags, source)


def _why_not_buildable() -> str | None:
    from torch.utils.cpp_extension import get_cxx_compiler, is_ninja_available

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it is written for x86-64 CPUs, this one is {platform.machine()}"
    compiler = get_cxx_compiler()
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler}; set CXX or install g++)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


@functools.cache
def kernel_status() -> KernelStatus:
    """Build or load the extension once per process and pick, for each weight dtype, the best instruction-set tier
    that agrees with torch on a small problem (printing one line when a tier is dropped, or when the kernel is
    unavailable)."""
    name, build_dir, ldflags = _library()
    module = _load_built(name, build_dir) if platform.machine().lower() in ("x86_64", "amd64") else None
    reason = None if module is not None else _why_not_buildable()
    if module is None and reason is None:
        try:
            module = _build(name, build_dir, ldflags)
        except Exception as error:  # noqa: BLE001 - any build failure means: run the torch path
            lines = [line for line in str(error).splitlines() if line.strip()]
            reason = f"the build failed: {lines[-1] if lines else type(error).__name__}"
    if module is None:
        _say(f"CPU expert kernel unavailable ({reason}); CPU expert passes use torch")
        return KernelStatus(None, None, reason)
    names = [name for name, code in ISAS.items() if code <= module.best_isa()]
    tiers: dict[torch.dtype, str] = {}
    for dtype in KERNEL_DTYPES:  # each weight format on its own, so one format's faulty path costs no other its tier
        label = KERNEL_LABELS[dtype]
        for name in reversed(names):
            if _self_check(module, name, dtype):
                tiers[dtype] = name
                break
            _say(f"CPU expert kernel: its {name} path disagrees with torch for {label} weights on this CPU; "
                 "trying the next one")
        else:
            _say(f"CPU expert kernel: no path agrees with torch for {label} weights on this CPU; those use torch")
    if not tiers:
        _say("CPU expert kernel unavailable (no path agrees with torch on this CPU); CPU expert passes use torch")
        return KernelStatus(None, None, "no instruction-set path agrees with torch")
    return KernelStatus(module, max(tiers.values(), key=ISAS.__getitem__), tiers=tiers)


def kernel_isas() -> list[str]:
    """The instruction-set tiers this CPU can run, up to the one in use (empty without the kernel)."""
    status = kernel_status()
    if not status.available:
        return []
    return [name for name, code in ISAS.items() if code <= ISAS[status.isa]]


_SILU: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROBE = torch.linspace(-12, 12, 97)


def is_silu(act_fn: Callable[[Tensor], Tensor]) -> bool:
    """Whether `act_fn` computes SiLU (probed once per function or module object, so any wrapper class counts)."""
    try:
        known = _SILU.get(act_fn)
    except TypeError:  # not weak-referenceable: probe each time (rare)
        known = None
    if known is None:
        with torch.no_grad():
            result = act_fn(_PROBE.clone())  # a copy: an in-place activation must not change the probe
        known = isinstance(result, Tensor) and torch.allclose(result, silu(_PROBE), rtol=1e-6, atol=1e-7)
        try:
            _SILU[act_fn] = known
        except TypeError:
            pass
    return known


def kernel_runs(gate_up: Tensor, down: Tensor, act_fn: Callable[[Tensor], Tensor], num_tokens: int,
                lora: Mapping[str, tuple[Tensor, Tensor]] | None = None) -> bool:
    """Whether `expert_layer` computes this pass: a few tokens, bf16, int8, fp8 or int4 (uint8) contiguous weights,
    SiLU, bf16 LoRA factors, and the kernel built on this machine (the first eligible call builds or loads it)."""
    if not 0 < num_tokens <= KERNEL_MAX_TOKENS or gate_up.dtype not in KERNEL_DTYPES or down.dtype != gate_up.dtype:
        return False
    if not (gate_up.is_contiguous() and down.is_contiguous() and gate_up.device.type == "cpu"):
        return False
    if any(t.dtype != torch.bfloat16 for pair in (lora or {}).values() for t in pair):
        return False
    return is_silu(act_fn) and gate_up.dtype in kernel_status().tiers


def expert_layer(
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    *,
    gate_up_scale: Tensor | None = None,
    down_scale: Tensor | None = None,
    lora: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    isa: str | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """One MoE layer's routed experts for `x [T, H]` on host tensors -> `out [T, H]` fp32, or written into `out`
    (contiguous fp32 or bf16, returned; see the module docstring for shapes, dtypes and numerics). `isa` forces an
    instruction-set tier at most the best one in use (tests, probes); by default the weights' dtype runs its own tier
    (`KernelStatus.tiers`). Raises RuntimeError when the kernel is not available for these weights (check
    `kernel_runs` or `kernel_status` first)."""
    module, tier = _tier(gate_up.dtype, isa)
    xin = x if x.dtype in (torch.bfloat16, torch.float32) else x.float()
    if out is None:
        out = torch.empty(x.shape[0], x.shape[1], dtype=torch.float32)
    error = module.expert_pass(xin.contiguous(), _as(top_k_index, torch.long), _as(top_k_weights, torch.float32),
                               gate_up, down, gate_up_scale, down_scale, *_lora_factors(lora), out, tier)
    if error:  # the extension returns its errors: no exception may leave it (csrc/expert_pass.cpp, KL_CHECK)
        raise RuntimeError(error)
    return out


def host_job(
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    *,
    out: Tensor,
    threads: int,
    gate_up_scale: Tensor | None = None,
    down_scale: Tensor | None = None,
    lora: Mapping[str, tuple[Tensor, Tensor]] | None = None,
) -> object:
    """`expert_layer`'s pass over fixed host buffers, checked now and run later as often as asked: the extension's
    `HostJob`. `x [T, H]` (bf16 or fp32), `top_k_index [T, K]` int64, `top_k_weights [T, K]` fp32 and `out [T, H]`
    are read and written in place at each run, so their contents may change between runs (a captured decode step's
    copies write them); the job keeps every tensor alive. `job.rows` (default T, clamped to [0, T]) sets how many
    leading rows a run computes; `threads` is its OpenMP team size, whatever thread runs it. Raises RuntimeError
    when the arguments fail the kernel's checks. `job.run()` runs it on the caller's thread without the GIL;
    `module.host_job_callback()` is the address of `void host_job_callback(void* job)`, which runs the job at
    `job.address` from any thread (a CUDA host node's: `kllama.experts.host_func`). A run cannot raise:
    its first error is kept in `job.error` (an expert id out of range; nothing else is checked at run time);
    `job.runs` counts the runs that finished and `job.seconds` sums their wall time."""
    module, tier = _tier(gate_up.dtype, None)
    job = module.HostJob(x, top_k_index, top_k_weights, gate_up, down, gate_up_scale, down_scale,
                         *_lora_factors(lora), out, tier, threads)
    if job.error:
        raise RuntimeError(job.error)
    return job


@functools.cache
def handoff_runner() -> object:
    """The process's `HandoffRunner`: one thread that answers the flag hand-offs of captured decode steps (sleeping
    until a sequence is armed), so every CPU pass of every decoder runs on one OpenMP team, as host nodes ran on
    the CUDA driver's one thread. Raises RuntimeError when the kernel is not available."""
    status = kernel_status()
    if not status.available:
        raise RuntimeError(f"the CPU expert kernel is not available: {status.reason}")
    return status.module.HandoffRunner()


def handoff_sequence(jobs: list[object], flags: list[Tensor]) -> object:
    """A `HandoffSequence` over host jobs (`host_job`) in the order a graph hands them over, each with its flag pair
    (`flags[i]`: a page-locked int32 tensor of 2 words, go then done). It keeps the jobs and flags alive; arm it with
    `handoff_runner().arm(sequence)` before each replay of its graph."""
    sequence, error = kernel_status().module.make_sequence(jobs, flags)
    if error:
        raise RuntimeError(error)
    return sequence


def _tier(dtype: torch.dtype, isa: str | None) -> tuple[ModuleType, int]:
    """The loaded extension and the tier number weights of `dtype` run (`isa` forces one at most the best in use)."""
    status = kernel_status()
    if not status.available:
        raise RuntimeError(f"the CPU expert kernel is not available: {status.reason}")
    if isa is None and dtype not in status.tiers:
        raise RuntimeError(f"the CPU expert kernel is not available for {dtype} weights on this CPU")
    tier = ISAS[isa or status.tiers[dtype]]
    if tier > ISAS[status.isa]:
        raise ValueError(f"instruction set {isa!r} is above the one this CPU runs ({status.isa})")
    return status.module, tier


def _lora_factors(lora: Mapping[str, tuple[Tensor, Tensor]] | None) -> tuple[Tensor | None, ...]:
    # the kernel's four LoRA arguments: gate_up a, b, then down a, b (None where absent)
    lora = lora or {}
    return (*lora.get("gate_up_proj", (None, None)), *lora.get("down_proj", (None, None)))


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    # `t` contiguous in `dtype`; a no-op `.to` still costs ~2 us through the dispatcher, per layer of every token
    return (t if t.dtype == dtype else t.to(dtype)).contiguous()


def reference_layer(
    x: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
    *,
    gate_up_scale: Tensor | None = None,
    down_scale: Tensor | None = None,
    lora: Mapping[str, tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """What `expert_layer` computes, in fp32 torch ops (one expert at a time; for checks, not speed)."""
    lora = lora or {}
    gu = _fp32_weight(gate_up, gate_up_scale, projections=2)  # [E, 2I, H]
    dn = _fp32_weight(down, down_scale, projections=1)  # [E, H, I]
    inter = dn.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for token in range(x.shape[0]):
        xt = x[token].float()  # [H]
        for slot, expert in enumerate(top_k_index[token].tolist()):
            hidden = gu[expert] @ xt  # [2I]
            if "gate_up_proj" in lora:
                a, b = lora["gate_up_proj"]
                hidden = hidden + b[expert].float() @ (a[expert].float() @ xt)
            act = silu(hidden[:inter]) * hidden[inter:] * float(top_k_weights[token, slot])  # [I]
            y = dn[expert] @ act  # [H]
            if "down_proj" in lora:
                a, b = lora["down_proj"]
                y = y + b[expert].float() @ (a[expert].float() @ act)
            out[token] += y
    return out


def _fp32_weight(values: Tensor, scale: Tensor | None, projections: int) -> Tensor:
    """`values [E, N, K]` times their scales in fp32: none (bf16), per row (int8), per 128x128 block of each of
    `projections` row groups (fp8; torch's cast, independent of the kernel's bit trick), or per row and 64-column
    group (int4: `values [E, N, K/2]` uint8, two nibbles a byte)."""
    if values.dtype == torch.uint8:
        return unpack_int4(values).float() * scale.repeat_interleave(INT4_GROUP, dim=-1)[..., : 2 * values.shape[-1]]
    weight = values.float()
    if scale is None:
        return weight
    if values.dtype != torch.float8_e4m3fn:
        return weight * scale.unsqueeze(-1)
    experts, rows, cols = weight.shape
    grid = scale.view(experts, projections, -1, scale.shape[-1])
    grid = grid.repeat_interleave(BLOCK, dim=-2)[..., : rows // projections, :].repeat_interleave(BLOCK, dim=-1)
    return weight * grid[..., :cols].reshape(experts, rows, cols)


def _int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    # symmetric int8 per output row, for the self-check only (the engine's int8 storage is quantized elsewhere)
    scale = weight.abs().amax(dim=-1).clamp_min(1e-12) / 127  # [..., N]
    return torch.round(weight / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), scale.float()


def _check_problem(kind: torch.dtype, seed: int = 0) -> tuple[tuple, dict]:
    """A small layer with odd sizes (vector tails), repeated experts across tokens and LoRA on both projections
    (fp8: wider than a 128-column block, with a partial one, and two block grids on gate_up; int4: even widths, one
    full 64-column group and a half one, and a group of 23 bytes)."""
    gen = torch.Generator().manual_seed(seed)
    experts, rank, tokens, top_k = 5, 3, 11, 3
    hidden, inter = {torch.float8_e4m3fn: (201, 150), torch.uint8: (96, 46)}.get(kind, (83, 45))
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.2
    down = torch.randn(experts, hidden, inter, generator=gen) * 0.2
    kwargs: dict = {"lora": {
        "gate_up_proj": ((torch.randn(experts, rank, hidden, generator=gen) * 0.2).bfloat16(),
                         (torch.randn(experts, 2 * inter, rank, generator=gen) * 0.2).bfloat16()),
        "down_proj": ((torch.randn(experts, rank, inter, generator=gen) * 0.2).bfloat16(),
                      (torch.randn(experts, hidden, rank, generator=gen) * 0.2).bfloat16())}}
    if kind in _CHECK_QUANTIZERS:
        quantizer = _CHECK_QUANTIZERS[kind]
        (gate_up, kwargs["gate_up_scale"]), (down, kwargs["down_scale"]) = quantizer(gate_up), quantizer(down)
    elif kind == torch.float8_e4m3fn:
        gate_up, down = quantize(gate_up, "fp8", projections=2), quantize(down, "fp8")
        kwargs.update(gate_up_scale=gate_up.scale, down_scale=down.scale)
        gate_up, down = gate_up.data, down.data
    else:
        gate_up, down = gate_up.bfloat16(), down.bfloat16()
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    index = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, generator=gen)
    return (x, index, weights, gate_up, down), kwargs


_CHECK_QUANTIZERS = {torch.int8: _int8_rows, torch.uint8: quantize_int4}  # per-row(-group) scales: values, scales


def _self_check(module: ModuleType, isa: str, kind: torch.dtype) -> bool:
    """Whether the `isa` path computes the check problem of `kind` weights (with LoRA) as `reference_layer` does."""
    args, kwargs = _check_problem(kind)
    out = torch.empty(args[0].shape, dtype=torch.float32)
    lora = kwargs["lora"]
    if module.expert_pass(*args, kwargs.get("gate_up_scale"), kwargs.get("down_scale"), *lora["gate_up_proj"],
                          *lora["down_proj"], out, ISAS[isa]):
        return False  # a check failed (its message is returned, not raised)
    expected = reference_layer(*args, **kwargs)
    return torch.allclose(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
