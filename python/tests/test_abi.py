"""The binding's pure-Python side: its ctypes mirror of kvcomp.h, checked against the header by a
compiled probe, and the argument checks that run before any C call. Needs no libkvcomp.so.

Run: PYTHONPATH=python python3 python/tests/test_abi.py
"""
import ctypes
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import kvc_test_support as support

import kvcomp
from kvcomp import _abi, _tensors
from kvcomp.errors import error_for

try:
    import numpy as np
except ImportError:
    np = None


def _compile_and_run_probe(source):
    """Compiles `source` against include/ and returns its stdout, or None (skip) without a C
    compiler or the source tree."""
    root = support.repo_root()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if root is None or cc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        exe = os.path.join(tmp, "probe")
        with open(src, "w") as f:
            f.write(source)
        # The probe is a plain C11 program; sanitizer flags from the environment do not apply.
        cmd = [cc, "-std=c11", "-Wall", "-Werror", "-I", os.path.join(root, "include"), src,
               "-o", exe]
        built = subprocess.run(cmd, capture_output=True, text=True)
        if built.returncode != 0:
            raise AssertionError(f"probe does not compile against kvcomp.h (a field or enum of "
                                 f"the binding is missing from the header?):\n{built.stderr}")
        return subprocess.run([exe], capture_output=True, text=True, check=True).stdout


def _probe_source():
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "kvcomp.h"',
             "int main(void) {", "  kvc_config_t d = KVC_CONFIG_INIT;"]
    for struct in _abi.C_STRUCTS:
        name = struct.__name__
        lines.append(f'  printf("sizeof {name} %zu\\n", sizeof({name}));')
        for field, _ in struct._fields_:
            lines.append(f'  printf("field {name}.{field} %zu %zu\\n", offsetof({name}, {field}), '
                         f"sizeof((({name} *)0)->{field}));")
    for enum_cls, prefix in _abi.C_ENUM_PREFIXES.items():
        for member in enum_cls:
            c_name = prefix + member.name
            lines.append(f'  printf("enum {c_name} %d\\n", (int){c_name});')
    for ctype in ("kvc_status_t", "kvc_backend_t", "kvc_dtype_t", "kvc_codec_t",
                  "kvc_codec_policy_t", "kvc_bound_mode_t", "kvc_log_level_t", "kvc_seq_state_t",
                  "kvc_event_kind_t"):
        lines.append(f'  printf("sizeof {ctype} %zu\\n", sizeof({ctype}));')
    lines.append('  printf("enum KVC_STATUS_COUNT %d\\n", (int)KVC_STATUS_COUNT);')
    for field in dataclasses.fields(kvcomp.Config):
        lines.append(f'  printf("default {field.name} %.9g\\n", (double)d.{field.name});')
    lines += ['  printf("default struct_size %zu\\n", d.struct_size);',
              '  printf("default log_fn %d\\n", d.log_fn == NULL);',
              '  printf("default log_user %d\\n", d.log_user == NULL);',
              '  printf("const KVC_VERSION_CODE %d\\n", KVC_VERSION_CODE);',
              '  printf("const KVC_SEQ_NONE %llu\\n", (unsigned long long)KVC_SEQ_NONE);',
              '  printf("const KVC_DEFAULT_K_BOUND %.9g\\n", (double)KVC_DEFAULT_K_BOUND);',
              '  printf("const KVC_DEFAULT_V_BOUND %.9g\\n", (double)KVC_DEFAULT_V_BOUND);',
              "  return 0;", "}"]
    return "\n".join(lines) + "\n"


def _f32(x):
    return ctypes.c_float(x).value


class TestHeaderMirror(unittest.TestCase):
    """Every offset, size, enum value and default of the binding equals the header's."""

    @classmethod
    def setUpClass(cls):
        out = _compile_and_run_probe(_probe_source())
        if out is None:
            raise unittest.SkipTest("no C compiler or no include/kvcomp.h next to python/")
        cls.probe = {}
        for line in out.splitlines():
            kind, key, *values = line.split()
            cls.probe[(kind, key)] = values

    def test_struct_layouts(self):
        for struct in _abi.C_STRUCTS:
            name = struct.__name__
            self.assertEqual(int(self.probe[("sizeof", name)][0]), ctypes.sizeof(struct), name)
            for field, _ in struct._fields_:
                offset, size = map(int, self.probe[("field", f"{name}.{field}")])
                desc = getattr(struct, field)
                self.assertEqual((desc.offset, desc.size), (offset, size), f"{name}.{field}")

    def test_enums(self):
        for enum_cls, prefix in _abi.C_ENUM_PREFIXES.items():
            for member in enum_cls:
                self.assertEqual(int(self.probe[("enum", prefix + member.name)][0]), member.value)
        for key, values in self.probe.items():
            if key[0] == "sizeof" and key[1].endswith("_t") and key[1].startswith("kvc_") and \
                    not hasattr(_abi, key[1]):
                self.assertEqual(int(values[0]), ctypes.sizeof(ctypes.c_int), key[1])
        # The binding knows every status the header defines.
        self.assertEqual(int(self.probe[("enum", "KVC_STATUS_COUNT")][0]), len(kvcomp.Status))

    def test_config_defaults_equal_config_init(self):
        defaults = kvcomp.Config()
        for field in dataclasses.fields(kvcomp.Config):
            c_value = float(self.probe[("default", field.name)][0])
            py_value = getattr(defaults, field.name)
            ctype = dict(_abi.kvc_config_t._fields_)[field.name]
            if ctype is ctypes.c_float:
                self.assertEqual(_f32(c_value), _f32(py_value), field.name)
            else:
                self.assertEqual(c_value, int(py_value), field.name)
        self.assertEqual(int(self.probe[("default", "struct_size")][0]),
                         defaults.to_c().struct_size)
        self.assertEqual(self.probe[("default", "log_fn")], ["1"])
        self.assertEqual(self.probe[("default", "log_user")], ["1"])

    def test_constants(self):
        self.assertEqual(int(self.probe[("const", "KVC_VERSION_CODE")][0]),
                         _abi.HEADER_VERSION_CODE)
        self.assertEqual(int(self.probe[("const", "KVC_SEQ_NONE")][0]), kvcomp.SEQ_NONE)
        self.assertEqual(_f32(float(self.probe[("const", "KVC_DEFAULT_K_BOUND")][0])),
                         _f32(kvcomp.DEFAULT_K_BOUND))
        self.assertEqual(_f32(float(self.probe[("const", "KVC_DEFAULT_V_BOUND")][0])),
                         _f32(kvcomp.DEFAULT_V_BOUND))


class TestConfig(unittest.TestCase):
    def test_enum_fields_accept_names_ints_and_dtypes(self):
        cfg = kvcomp.Config(backend="cuda", dtype="bfloat16", codec=1, policy="FASTEST_WITHIN",
                            bound_mode="absolute", log_level="debug")
        self.assertIs(cfg.backend, kvcomp.Backend.CUDA)
        self.assertIs(cfg.dtype, kvcomp.DType.BF16)
        self.assertIs(cfg.codec, kvcomp.Codec.BITPACK)
        self.assertIs(cfg.policy, kvcomp.CodecPolicy.FASTEST_WITHIN)
        self.assertIs(cfg.bound_mode, kvcomp.BoundMode.ABSOLUTE)
        self.assertIs(cfg.log_level, kvcomp.LogLevel.DEBUG)
        if np is not None:
            self.assertIs(kvcomp.Config(dtype=np.float32).dtype, kvcomp.DType.F32)
            self.assertIs(kvcomp.Config(dtype=np.dtype("float16")).dtype, kvcomp.DType.F16)

    def test_bad_values_are_rejected_in_python(self):
        with self.assertRaisesRegex(ValueError, "codec='zstd'"):
            kvcomp.Config(codec="zstd")
        with self.assertRaisesRegex(ValueError, "dtype"):
            kvcomp.Config(dtype="int8")
        with self.assertRaises(ValueError):
            kvcomp.Config(backend=7)
        with self.assertRaises(TypeError):
            kvcomp.Config(no_such_field=1)
        # ctypes would silently truncate these.
        with self.assertRaisesRegex(ValueError, "pool_bytes=-1"):
            kvcomp.Config(pool_bytes=-1).to_c()
        with self.assertRaisesRegex(ValueError, "max_seq_len"):
            kvcomp.Config(max_seq_len=1 << 31).to_c()
        with self.assertRaisesRegex(TypeError, "head_dim"):
            kvcomp.Config(head_dim=64.0).to_c()

    def test_to_c_round_trip(self):
        cfg = kvcomp.Config(num_layers=3, num_q_heads=8, num_kv_heads=2, head_dim=64,
                            pool_bytes=(1 << 33) + 5, codec="raw", watermark=0.25,
                            prefix_caching=False)
        c = cfg.to_c()
        self.assertEqual(c.struct_size, ctypes.sizeof(_abi.kvc_config_t))
        self.assertEqual(kvcomp.Config.from_c(c), cfg)
        self.assertFalse(c.log_fn)


class TestErrors(unittest.TestCase):
    def test_each_status_maps_to_its_class(self):
        expected = {
            kvcomp.Status.ERR_INVALID_ARGUMENT: (kvcomp.KvcInvalidArgument, ValueError),
            kvcomp.Status.ERR_NOT_FOUND: (kvcomp.KvcNotFound, LookupError),
            kvcomp.Status.ERR_INVALID_STATE: (kvcomp.KvcInvalidState, kvcomp.KvcError),
            kvcomp.Status.ERR_OUT_OF_MEMORY: (kvcomp.KvcOutOfMemory, kvcomp.KvcError),
            kvcomp.Status.ERR_OUT_OF_HOST_MEMORY: (kvcomp.KvcOutOfHostMemory, MemoryError),
            kvcomp.Status.ERR_CUDA: (kvcomp.KvcCudaError, kvcomp.KvcError),
            kvcomp.Status.ERR_NCCL: (kvcomp.KvcNcclError, kvcomp.KvcError),
            kvcomp.Status.ERR_UNSUPPORTED: (kvcomp.KvcUnsupported, kvcomp.KvcError),
            kvcomp.Status.ERR_CORRUPT: (kvcomp.KvcCorrupt, kvcomp.KvcError),
            kvcomp.Status.ERR_INTERNAL: (kvcomp.KvcInternalError, kvcomp.KvcError),
        }
        self.assertEqual(set(expected), set(kvcomp.Status) - {kvcomp.Status.OK})
        for status, (cls, builtin) in expected.items():
            err = error_for(status, "TEXT", "kvc_fn", "detail line")
            self.assertIs(type(err), cls)
            self.assertIsInstance(err, builtin)
            self.assertIs(err.status, status)
            self.assertEqual(str(err), "kvc_fn: TEXT (detail line)")

    def test_unknown_status_is_plain_kvc_error(self):
        err = error_for(99, "KVC_ERR_UNKNOWN: not a kvc_status_t value")
        self.assertIs(type(err), kvcomp.KvcError)
        self.assertEqual(err.status, 99)
        self.assertEqual(str(err), "KVC_ERR_UNKNOWN: not a kvc_status_t value")


@unittest.skipIf(np is None, "NumPy is not installed")
class TestTensorChecks(unittest.TestCase):
    """_tensors.check against the exact [rows, heads, head_dim] and dtype a call will use."""

    def check(self, arr, dtype=kvcomp.DType.F32, writable=False):
        return _tensors.check(arr, "k", (5, 2, 8), dtype, kvcomp.Backend.CPU, 0, writable)

    def test_accepts_exact_arrays(self):
        arr = np.zeros((5, 2, 8), np.float32)
        self.assertEqual(self.check(arr), (arr.ctypes.data, arr.nbytes))
        self.check(np.zeros((5, 2, 8), np.float16), kvcomp.DType.F16)
        self.check(np.zeros((5, 2, 8), np.uint16), kvcomp.DType.BF16)

    def test_rejects_wrong_dtype(self):
        for dtype, kvc_dtype in ((np.float64, kvcomp.DType.F32), (np.float32, kvcomp.DType.F16),
                                 (np.float16, kvcomp.DType.BF16), (np.int16, kvcomp.DType.BF16),
                                 (np.dtype(">f4"), kvcomp.DType.F32)):
            with self.assertRaisesRegex(TypeError, "k: expected a NumPy array of dtype"):
                self.check(np.zeros((5, 2, 8), dtype), kvc_dtype)

    def test_rejects_wrong_shape_layout_and_kind(self):
        with self.assertRaisesRegex(ValueError, r"expected shape .*\[5, 2, 8\].* got \[4, 2, 8\]"):
            self.check(np.zeros((4, 2, 8), np.float32))
        with self.assertRaisesRegex(ValueError, "got \\[5, 16\\]"):
            self.check(np.zeros((5, 16), np.float32))
        with self.assertRaisesRegex(ValueError, "C-contiguous"):
            self.check(np.zeros((8, 2, 5), np.float32).transpose(2, 1, 0))
        with self.assertRaisesRegex(ValueError, "read-only"):
            arr = np.zeros((5, 2, 8), np.float32)
            arr.flags.writeable = False
            self.check(arr, writable=True)
        with self.assertRaisesRegex(TypeError, "got builtins.list"):
            self.check(np.zeros((5, 2, 8), np.float32).tolist())
        with self.assertRaisesRegex(TypeError, "torch CUDA tensor"):
            _tensors.check(np.zeros((5, 2, 8), np.float16), "q", (5, 2, 8), kvcomp.DType.F16,
                           kvcomp.Backend.CUDA, 0)

    def test_overlap(self):
        self.assertTrue(_tensors.overlaps((100, 10), (109, 1)))
        self.assertFalse(_tensors.overlaps((100, 10), (110, 1)))
        self.assertFalse(_tensors.overlaps((110, 4), (100, 10)))


class TestLibrarySearch(unittest.TestCase):
    def test_missing_library_names_every_place_tried(self):
        env = dict(os.environ, KVC_LIBRARY="/nonexistent/libkvcomp.so",
                   PYTHONPATH=os.pathsep.join(sys.path))
        code = ("import kvcomp\n"
                "try:\n    kvcomp.Cache(num_layers=1)\n"
                "except kvcomp.LibraryNotFound as e:\n    print('NOTFOUND', e)\n")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout
        self.assertIn("NOTFOUND", out)
        self.assertIn("/nonexistent/libkvcomp.so (missing)", out)
        self.assertIn("KVC_LIBRARY", out)

    def test_search_order(self):
        saved = os.environ.pop("KVC_LIBRARY", None)
        try:
            paths = kvcomp._loader.candidate_paths()
        finally:
            if saved is not None:
                os.environ["KVC_LIBRARY"] = saved
        package_dir = os.path.dirname(os.path.abspath(kvcomp.__file__))
        self.assertEqual(paths[0], os.path.join(package_dir, "libkvcomp.so"))
        builds = paths[2:]
        self.assertEqual(builds, sorted(builds, key=os.path.getmtime, reverse=True))
        for p in builds:
            self.assertRegex(p, r"/build[^/]*/libkvcomp\.so$")


if __name__ == "__main__":
    unittest.main(verbosity=2)
