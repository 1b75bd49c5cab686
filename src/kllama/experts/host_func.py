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


# Stream memory operations: the GPU writes a 32-bit word, or waits until one holds a value, in stream order; inside a
# capture each becomes a node of the graph. A captured decode step hands its CPU passes to a spinning thread with
# them (`cpu_kernels.HandoffRunner`), which cost ~9 us a layer on the H200 box where a host node cost ~64 (benchmarks/
# NOTES.md, nineteenth session). The `_v2` entry points are on by default; the unversioned ones are not.
WAIT_VALUE_EQ = 1  # CU_STREAM_WAIT_VALUE_EQ


@functools.cache
def _memops() -> tuple[ctypes.CDLL | None, str | None]:
    lib, reason = _driver()
    if lib is None:
        return None, reason
    try:
        write, wait = lib.cuStreamWriteValue32_v2, lib.cuStreamWaitValue32_v2
        device_pointer = lib.cuMemHostGetDevicePointer_v2
    except AttributeError as error:
        return None, f"the CUDA driver has no stream memory operations ({error})"
    for function in (write, wait):
        function.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        function.restype = ctypes.c_int
    device_pointer.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
    device_pointer.restype = ctypes.c_int
    return lib, None


def _check(result: int, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _driver()[0].cuGetErrorName(result, ctypes.byref(name))
        raise RuntimeError(f"{what} failed: {(name.value or b'').decode() or result}")


def device_address(word: torch.Tensor) -> int:
    """The device address of a page-locked host tensor's first element (what stream memory operations take)."""
    lib, reason = _memops()
    if lib is None:
        raise RuntimeError(reason)
    address = ctypes.c_uint64(0)
    _check(lib.cuMemHostGetDevicePointer_v2(ctypes.byref(address), ctypes.c_void_p(word.data_ptr()), 0),
           "cuMemHostGetDevicePointer")
    return address.value


def write_value(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """Enqueue on `stream`: store `value` into the 32-bit word at device `address`, after the stream's earlier work
    and a memory fence (so the CPU that sees the word also sees what that work wrote)."""
    _check(_memops()[0].cuStreamWriteValue32_v2(stream.cuda_stream, address, value, 0), "cuStreamWriteValue32")


def wait_value(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """Enqueue on `stream`: hold its later work until the 32-bit word at device `address` equals `value`."""
    _check(_memops()[0].cuStreamWaitValue32_v2(stream.cuda_stream, address, value, WAIT_VALUE_EQ),
           "cuStreamWaitValue32")


@functools.cache
def _memops_probe(device: int) -> str | None:
    lib, reason = _memops()
    if lib is None:
        return reason
    try:
        words = torch.zeros(2, dtype=torch.int32, pin_memory=True)
        base = device_address(words)
        stream = torch.cuda.Stream(device)
        write_value(stream, base, 1)
        wait_value(stream, base, 1)
        write_value(stream, base + 4, 7)
        stream.synchronize()
    except RuntimeError as error:
        return f"stream memory operations failed on this device ({error})"
    if words.tolist() != [1, 7]:
        return f"stream memory operations wrote {words.tolist()} where [1, 7] was expected"
    return None


def memops_reason() -> str | None:
    """None when stream memory operations work on the current CUDA device (one small probe per process and
    device), else why not."""
    reason = host_func_reason()
    return reason if reason is not None else _memops_probe(torch.cuda.current_device())
