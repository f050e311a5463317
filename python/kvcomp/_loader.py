"""Finds and loads libkvcomp.so (once per process) and declares its functions.

Search order:
  1. $KVC_LIBRARY (a path to the library; an error if it does not load),
  2. next to the package (kvcomp/libkvcomp.so, or the folder holding the kvcomp package),
  3. build*/libkvcomp.so in the source tree this package sits in (python/kvcomp -> repository root),
     newest first,
  4. ctypes.util.find_library("kvcomp") (the system's library path, e.g. after `cmake --install`).
"""
import ctypes
import ctypes.util
import glob
import os
import threading

from . import _abi
from .errors import LibraryNotFound

_LIB_NAME = "libkvcomp.so"
_lock = threading.Lock()
_lib = None
_lib_path = None


def candidate_paths():
    """Paths tried, in order, before falling back to ctypes.util.find_library."""
    env = os.environ.get("KVC_LIBRARY")
    if env:
        return [env]
    package_dir = os.path.dirname(os.path.abspath(__file__))
    python_dir = os.path.dirname(package_dir)
    repo_dir = os.path.dirname(python_dir)
    paths = [os.path.join(package_dir, _LIB_NAME), os.path.join(python_dir, _LIB_NAME)]
    if os.path.exists(os.path.join(repo_dir, "include", "kvcomp.h")):  # a source tree
        builds = glob.glob(os.path.join(repo_dir, "build*", _LIB_NAME))
        builds.sort(key=os.path.getmtime, reverse=True)
        paths += builds
    return paths


def _load_from(path):
    lib = ctypes.CDLL(path)
    _abi.declare(lib)
    major = lib.kvc_version() // 10000
    if major != _abi.HEADER_VERSION_CODE // 10000:
        raise LibraryNotFound(
            f"{path} is kvcomp version code {lib.kvc_version()}, this binding is written for "
            f"{_abi.HEADER_VERSION_CODE} (major versions differ)")
    return lib


def load(path=None):
    """Loads the library (from `path`, or by the search order above) and returns the CDLL.

    Later calls return the library already loaded; a different explicit `path` then is an error.
    Raises LibraryNotFound with every place tried.
    """
    global _lib, _lib_path
    with _lock:
        if _lib is not None:
            if path is not None and os.path.realpath(path) != os.path.realpath(_lib_path):
                raise LibraryNotFound(f"kvcomp is already loaded from {_lib_path}; cannot also "
                                      f"load {path}")
            return _lib
        tried = []
        if path is not None:
            candidates = [path]
        else:
            candidates = candidate_paths()
            found = ctypes.util.find_library("kvcomp")
            if found:
                candidates.append(found)
        explicit = path is not None or bool(os.environ.get("KVC_LIBRARY"))
        for candidate in candidates:
            # find_library returns a bare soname the dynamic loader resolves itself.
            if os.sep in candidate and not os.path.exists(candidate):
                tried.append(f"{candidate} (missing)")
                continue
            try:
                _lib = _load_from(candidate)
            except (OSError, AttributeError) as err:
                tried.append(f"{candidate} ({err})")
                if explicit:
                    break
                continue
            _lib_path = candidate
            return _lib
        where = "; ".join(tried) if tried else "no candidate found"
        raise LibraryNotFound(
            f"cannot load libkvcomp.so: {where}. Build it (./kvc build) or set KVC_LIBRARY to "
            f"its path.")


def loaded_path():
    """The path the library was loaded from, or None if it is not loaded yet."""
    return _lib_path
