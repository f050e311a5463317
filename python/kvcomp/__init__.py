"""kvcomp: Python binding (ctypes, no compiler needed) over libkvcomp.so's C API (kvcomp.h).

See cache.py for the Cache class and README.md for a walk-through. The library is found through
$KVC_LIBRARY, next to this package, in the source tree's build*/ folders, or on the system path
(_loader.py); it is loaded on first use, so `import kvcomp` works without it.
"""
from ._abi import (SEQ_NONE, Backend, BoundMode, Codec, CodecPolicy, DType, EventKind, LogLevel,
                   SeqState, Status)
from ._loader import load as load_library
from ._loader import loaded_path as library_path
from .cache import Cache, Event, Events, SeqInfo, status_string, version
from .config import DEFAULT_K_BOUND, DEFAULT_V_BOUND, Config
from .errors import (KvcCorrupt, KvcCudaError, KvcError, KvcInternalError, KvcInvalidArgument,
                     KvcInvalidState, KvcNcclError, KvcNotFound, KvcOutOfHostMemory,
                     KvcOutOfMemory, KvcUnsupported, LibraryNotFound)

__version__ = "0.1.0"

__all__ = [
    "SEQ_NONE", "Backend", "BoundMode", "Codec", "CodecPolicy", "DType", "EventKind", "LogLevel",
    "SeqState", "Status", "load_library", "library_path", "Cache", "Event", "Events", "SeqInfo",
    "status_string", "version", "DEFAULT_K_BOUND", "DEFAULT_V_BOUND", "Config", "KvcError",
    "KvcInvalidArgument", "KvcNotFound", "KvcInvalidState", "KvcOutOfMemory",
    "KvcOutOfHostMemory", "KvcCudaError", "KvcNcclError", "KvcUnsupported", "KvcCorrupt",
    "KvcInternalError", "LibraryNotFound",
]
