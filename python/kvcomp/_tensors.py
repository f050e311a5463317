"""Checks a tensor argument against what the C call will read or write, before the call.

The C library receives bare pointers and cannot tell a short or mistyped buffer from a good one,
so everything it would read or write out of bounds is checked here: kind (NumPy array or torch
tensor on the CPU backend, torch CUDA tensor on the cache's device on the CUDA backend), dtype,
C-contiguity, exact shape, alignment and, for outputs, writability. torch is never imported by
this module: a tensor can only be a torch tensor if the caller already imported torch.
"""
import sys

from ._abi import Backend, DType

_NUMPY_NAMES = {DType.F16: ("float16",), DType.BF16: ("bfloat16", "uint16"),
                DType.F32: ("float32",)}
_TORCH_NAMES = {DType.F16: "float16", DType.BF16: "bfloat16", DType.F32: "float32"}


def _torch_tensor_type():
    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else None


def _is_numpy_array(obj):
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(obj, numpy.ndarray)


def is_torch_tensor(obj):
    tensor_type = _torch_tensor_type()
    return tensor_type is not None and isinstance(obj, tensor_type)


def describe_expected(dtype, backend):
    if backend == Backend.CUDA:
        return f"a torch CUDA tensor of dtype torch.{_TORCH_NAMES[dtype]}"
    numpy_names = " or ".join(f"numpy.{n}" for n in _NUMPY_NAMES[dtype])
    return f"a NumPy array of dtype {numpy_names} (or a CPU torch.{_TORCH_NAMES[dtype]} tensor)"


def check(obj, name, shape, dtype, backend, device, writable=False):
    """Returns (address, nbytes) of `obj` once it is valid for a kvc call, else raises.

    shape: the exact expected shape. dtype: the cache's DType. backend/device: the cache's.
    TypeError for the wrong kind of object, dtype or device; ValueError for shape, layout or
    alignment.
    """
    if is_torch_tensor(obj):
        return _check_torch(obj, name, shape, dtype, backend, device, writable)
    if backend == Backend.CPU and _is_numpy_array(obj):
        return _check_numpy(obj, name, shape, dtype, writable)
    raise TypeError(f"{name}: expected {describe_expected(dtype, backend)}, got "
                    f"{type(obj).__module__}.{type(obj).__name__}")


def _check_shape(name, got, shape):
    if tuple(got) != tuple(shape):
        raise ValueError(f"{name}: expected shape [rows, heads, head_dim] = {list(shape)} (rows "
                         f"from the last plan), got {list(got)}")


def _check_numpy(arr, name, shape, dtype, writable):
    if arr.dtype.name not in _NUMPY_NAMES[dtype] or not arr.dtype.isnative:
        raise TypeError(f"{name}: expected {describe_expected(dtype, Backend.CPU)}, got dtype "
                        f"{arr.dtype}")
    _check_shape(name, arr.shape, shape)
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous (use numpy.ascontiguousarray)")
    if not arr.flags.aligned:
        raise ValueError(f"{name}: data is not aligned to its element size")
    if writable and not arr.flags.writeable:
        raise ValueError(f"{name}: array is read-only")
    return arr.__array_interface__["data"][0], arr.nbytes


def _check_torch(t, name, shape, dtype, backend, device, writable):
    want_type = "cuda" if backend == Backend.CUDA else "cpu"
    if str(t.dtype) != "torch." + _TORCH_NAMES[dtype]:
        raise TypeError(f"{name}: expected {describe_expected(dtype, backend)}, got {t.dtype}")
    if t.device.type != want_type or (want_type == "cuda" and t.device.index != device):
        where = f"cuda:{device}" if want_type == "cuda" else "cpu"
        raise TypeError(f"{name}: the cache's tensors live on {where}, got a tensor on {t.device}")
    _check_shape(name, t.shape, shape)
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (use .contiguous())")
    if writable and t.requires_grad:
        raise ValueError(f"{name}: output tensor requires grad; kvcomp writes it outside autograd")
    return t.data_ptr(), t.numel() * t.element_size()


def overlaps(a, b):
    """Whether the byte ranges (address, nbytes) a and b share any byte."""
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def check_bytes(obj, name, backend, device):
    """Returns (address, nbytes) of a 1-D contiguous uint8 buffer in the backend's memory: a NumPy
    array or CPU torch tensor on the CPU backend, a CUDA tensor on `device` on the CUDA backend."""
    if is_torch_tensor(obj):
        want = "cuda" if backend == Backend.CUDA else "cpu"
        if str(obj.dtype) != "torch.uint8" or obj.dim() != 1 or not obj.is_contiguous():
            raise TypeError(f"{name}: expected a 1-D contiguous torch.uint8 tensor")
        if obj.device.type != want or (want == "cuda" and obj.device.index != device):
            raise TypeError(f"{name}: expected a tensor on the cache's device, got {obj.device}")
        return obj.data_ptr(), obj.numel()
    if backend == Backend.CPU and _is_numpy_array(obj):
        if obj.dtype.name != "uint8" or obj.ndim != 1 or not obj.flags.c_contiguous:
            raise TypeError(f"{name}: expected a 1-D contiguous numpy.uint8 array")
        return obj.__array_interface__["data"][0], obj.nbytes
    raise TypeError(f"{name}: expected the uint8 buffer export_seq returned, got "
                    f"{type(obj).__module__}.{type(obj).__name__}")
