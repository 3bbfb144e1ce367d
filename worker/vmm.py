"""CUDA virtual memory management through cuda-python's driver bindings.

The arena reserves one virtual address range for its whole life. Sleep unmaps and releases the physical
memory behind released blocks; wake creates new physical memory and maps it at the same addresses, so every
pointer captured before the sleep (parameter views, CUDA graphs) stays valid. This is the technique of
vLLM's CuMemAllocator and torch_memory_saver. There is no HIP counterpart here: on ROCm, or without
cuda-python, the arena falls back to re-allocating (see arena.py).
"""
from __future__ import annotations

import logging

import torch

from .errors import DeviceMemoryError

log = logging.getLogger(__name__)


def _driver():
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:
        from cuda import cuda as driver  # older cuda-python
    return driver


def vmm_unavailable_reason(device: torch.device) -> str | None:
    """None when CUDA VMM can back an arena on `device`, else why not."""
    if device.type != "cuda":
        return "the device is not a GPU"
    if torch.version.hip is not None or torch.version.cuda is None:
        return "this is a ROCm/HIP build of torch"
    try:
        cu = _driver()
    except ImportError:
        return "cuda-python is not installed (pip install 'ksleep[cuda]')"
    try:
        _check(cu, cu.cuInit(0))
        dev = _check(cu, cu.cuDeviceGet(device.index or 0))
        attr = cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
        if not _check(cu, cu.cuDeviceGetAttribute(attr, dev)):
            return "the device does not support virtual memory management"
    except RuntimeError as exc:
        return str(exc)
    return None


def _check(cu, result):
    """cuda-python returns (CUresult, *values); raise on error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        if err == cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            raise DeviceMemoryError("the device has no free memory for the weight arena")
        name = cu.cuGetErrorName(err)[1]
        raise RuntimeError(f"CUDA driver error {int(err)} ({name.decode() if isinstance(name, bytes) else name})")
    return values[0] if len(values) == 1 else (values or None)


class _ArrayInterface:
    """Just enough of __cuda_array_interface__ for torch.as_tensor to wrap raw device memory."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


class VirtualRange:
    """A reserved device address range; physical memory is mapped into it block by block."""

    def __init__(self, device: torch.device, nbytes: int):
        self._cu = cu = _driver()
        self.device = device
        self._dev = _check(cu, cu.cuDeviceGet(device.index or 0))
        self._ctx = _check(cu, cu.cuDevicePrimaryCtxRetain(self._dev))
        self._use_context()
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device.index or 0
        self._prop = prop
        self.granularity = int(_check(cu, cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)))
        self.nbytes = (nbytes + self.granularity - 1) // self.granularity * self.granularity
        self._base = _check(cu, cu.cuMemAddressReserve(self.nbytes, 0, 0, 0))
        access = cu.CUmemAccessDesc()
        access.location = prop.location
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = access
        self._handles: dict[int, tuple[object, int]] = {}  # start -> (handle, size)
        self.tensor = torch.as_tensor(_ArrayInterface(int(self._base), self.nbytes), device=device)

    @property
    def address(self) -> int:
        return int(self._base)

    def own_tensor(self, start: int, nbytes: int) -> torch.Tensor:
        """Bytes [start, start+nbytes) as a tensor with a storage of its own (not a view of `tensor`), so that
        torch.compile does not treat it as aliasing the weights."""
        return torch.as_tensor(_ArrayInterface(int(self._base) + start, nbytes), device=self.device)

    def _use_context(self) -> None:
        # Driver calls need a current context; a gRPC or executor thread may not have one yet.
        _check(self._cu, self._cu.cuCtxSetCurrent(self._ctx))

    def _ptr(self, offset: int):
        return self._cu.CUdeviceptr(int(self._base) + offset)

    def map(self, start: int, size: int) -> None:
        """Back [start, start+size) with new physical memory. Raises DeviceMemoryError when there is none."""
        cu = self._cu
        self._use_context()
        handle = _check(cu, cu.cuMemCreate(size, self._prop, 0))
        try:
            _check(cu, cu.cuMemMap(self._ptr(start), size, 0, handle, 0))
        except BaseException:
            cu.cuMemRelease(handle)
            raise
        self._handles[start] = (handle, size)
        _check(cu, cu.cuMemSetAccess(self._ptr(start), size, [self._access], 1))

    def unmap(self, start: int) -> None:
        """Give the physical memory behind the block at `start` back to the device (addresses stay reserved)."""
        cu = self._cu
        self._use_context()
        handle, size = self._handles.pop(start)
        _check(cu, cu.cuMemUnmap(self._ptr(start), size))
        _check(cu, cu.cuMemRelease(handle))

    def close(self) -> None:
        if self._base is None:
            return
        torch.cuda.synchronize(self.device)
        for start in list(self._handles):
            self.unmap(start)
        self.tensor = None
        _check(self._cu, self._cu.cuMemAddressFree(self._base, self.nbytes))
        self._cu.cuDevicePrimaryCtxRelease(self._dev)
        self._base = None
