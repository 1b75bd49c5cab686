"""CUDA host functions: a C function the CUDA driver calls on its own thread once a stream's earlier work is done.

`launch_host_func(stream, function, data)` enqueues `function(data)` with the driver API's `cuLaunchHostFunc`
(through ctypes on `libcuda.so.1`, which every CUDA install has: torch exposes no host-function call). Work queued
after it on the stream waits until it returns. Inside a stream capture the call becomes a host node of the graph,
so every replay runs the function in order with the graph's kernels and copies, without Python: how a captured
decode step runs its CPU expert passes (`kllama.infer.graphs`). The driver's rules for the function: it must not
call CUDA, and it should not block on other work of the stream. A function running Python would need the GIL on
the driver's thread; the functions used here are C++ (`cpu_kernels.host_job`) and take no GIL.
"""
from __future__ import annotations

import ctypes
import functools

import torch


@functools.cache
def _driver() -> tuple[ctypes.CDLL | None, str | None]:
    """The CUDA driver library with `cuLaunchHostFunc` typed, or None and why not."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        launch = lib.cuLaunchHostFunc
    except (OSError, AttributeError) as error:
        return None, f"the CUDA driver's cuLaunchHostFunc is not available ({error})"
    launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    launch.restype = ctypes.c_int
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.cuGetErrorName.restype = ctypes.c_int
    return lib, None


def host_func_reason() -> str | None:
    """None when host functions can be launched here, else why not (no CUDA device, no driver entry point)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    return _driver()[1]


def launch_host_func(stream: torch.cuda.Stream, function: int, data: int) -> None:
    """Enqueue `void function(void* data)` (addresses) on `stream`: a host node when the stream is capturing."""
    lib, reason = _driver()
    if lib is None:
        raise RuntimeError(reason)
    result = lib.cuLaunchHostFunc(stream.cuda_stream, function, data)
    if result != 0:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(result, ctypes.byref(name))
        raise RuntimeError(f"cuLaunchHostFunc failed: {(name.value or b'').decode() or result}")
