"""Exceptions: one class per kvc_status_t, all subclasses of KvcError.

A KvcError carries the status (`.status`, a Status), the library's kvc_status_string text, the C
function that failed (`.function`) and, when the library logged an error while failing, that line
(`.detail`). Classes also derive from the built-in exception a Python caller would reach for:
KvcInvalidArgument is a ValueError, KvcNotFound a LookupError, KvcOutOfHostMemory a MemoryError.
Checks the binding makes itself before calling C (tensor shapes, dtypes, array lengths) raise plain
ValueError / TypeError.
"""
from ._abi import Status


class KvcError(Exception):
    """A kvcomp call returned a status other than KVC_OK."""

    def __init__(self, status, status_string, function=None, detail=None):
        self.status = _as_status(status)
        self.status_string = status_string
        self.function = function
        self.detail = detail
        super().__init__(status_string)

    def __str__(self):
        text = self.status_string
        if self.function:
            text = f"{self.function}: {text}"
        if self.detail:
            text = f"{text} ({self.detail})"
        return text


class KvcInvalidArgument(KvcError, ValueError):
    """KVC_ERR_INVALID_ARGUMENT: NULL, out of range or inconsistent argument."""


class KvcNotFound(KvcError, LookupError):
    """KVC_ERR_NOT_FOUND: unknown or already freed sequence id."""


class KvcInvalidState(KvcError):
    """KVC_ERR_INVALID_STATE: call out of order (attend before plan, fork mid-step, ...)."""


class KvcOutOfMemory(KvcError):
    """KVC_ERR_OUT_OF_MEMORY: the device pool or swap space cannot hold the request."""


class KvcOutOfHostMemory(KvcError, MemoryError):
    """KVC_ERR_OUT_OF_HOST_MEMORY: a host allocation failed."""


class KvcCudaError(KvcError):
    """KVC_ERR_CUDA: a CUDA runtime call or kernel launch failed."""


class KvcNcclError(KvcError):
    """KVC_ERR_NCCL: an NCCL call failed."""


class KvcUnsupported(KvcError):
    """KVC_ERR_UNSUPPORTED: valid, but not built or not supported by this backend."""


class KvcCorrupt(KvcError):
    """KVC_ERR_CORRUPT: a page failed its checksum or format checks."""


class KvcInternalError(KvcError):
    """KVC_ERR_INTERNAL: a bug in kvcomp."""


class LibraryNotFound(OSError):
    """libkvcomp.so could not be located or loaded; the message lists where it was looked for."""


ERROR_CLASSES = {
    Status.ERR_INVALID_ARGUMENT: KvcInvalidArgument,
    Status.ERR_NOT_FOUND: KvcNotFound,
    Status.ERR_INVALID_STATE: KvcInvalidState,
    Status.ERR_OUT_OF_MEMORY: KvcOutOfMemory,
    Status.ERR_OUT_OF_HOST_MEMORY: KvcOutOfHostMemory,
    Status.ERR_CUDA: KvcCudaError,
    Status.ERR_NCCL: KvcNcclError,
    Status.ERR_UNSUPPORTED: KvcUnsupported,
    Status.ERR_CORRUPT: KvcCorrupt,
    Status.ERR_INTERNAL: KvcInternalError,
}


def _as_status(value):
    try:
        return Status(value)
    except ValueError:  # a newer library's status this binding does not know
        return int(value)


def error_for(status, status_string, function=None, detail=None):
    """The exception instance for a failed call (KvcError itself for an unknown status)."""
    cls = ERROR_CLASSES.get(_as_status(status), KvcError)
    return cls(status, status_string, function, detail)
