"""ctypes mirror of include/kvcomp.h: enums, structs and function signatures.

Everything here must match the header field for field; python/tests/test_abi.py compiles a probe
against the header and compares every offset, size, enum value and KVC_CONFIG_INIT default with
this module. Enums are plain C ints on every ABI kvcomp targets (gcc/clang, x86-64 and aarch64).
"""
import ctypes
import enum

# kvc_seq_id_t; KVC_SEQ_NONE is reserved by the library.
SEQ_NONE = (1 << 64) - 1

# The binding is written against this header version (KVC_VERSION_CODE).
HEADER_VERSION_CODE = 100


class Status(enum.IntEnum):
    OK = 0
    ERR_INVALID_ARGUMENT = 1
    ERR_NOT_FOUND = 2
    ERR_INVALID_STATE = 3
    ERR_OUT_OF_MEMORY = 4
    ERR_OUT_OF_HOST_MEMORY = 5
    ERR_CUDA = 6
    ERR_NCCL = 7
    ERR_UNSUPPORTED = 8
    ERR_CORRUPT = 9
    ERR_INTERNAL = 10


class Backend(enum.IntEnum):
    CPU = 0
    CUDA = 1


class DType(enum.IntEnum):
    F16 = 0
    BF16 = 1
    F32 = 2


class Codec(enum.IntEnum):
    RAW = 0
    BITPACK = 1
    HUFFMAN = 2


class CodecPolicy(enum.IntEnum):
    FIXED = 0
    SMALLEST = 1
    FASTEST_WITHIN = 2


class BoundMode(enum.IntEnum):
    RELATIVE = 0
    ABSOLUTE = 1


class LogLevel(enum.IntEnum):
    ERROR = 0
    WARN = 1
    INFO = 2
    DEBUG = 3


class SeqState(enum.IntEnum):
    RUNNING = 0
    SWAPPED = 1


class EventKind(enum.IntEnum):
    BLOCK_STORED = 0
    BLOCK_REMOVED = 1
    BLOCK_EVICTED = 2


# Each enum's C spelling is prefix + member name.
C_ENUM_PREFIXES = {
    Status: "KVC_",
    Backend: "KVC_BACKEND_",
    DType: "KVC_DTYPE_",
    Codec: "KVC_CODEC_",
    CodecPolicy: "KVC_POLICY_",
    BoundMode: "KVC_BOUND_",
    LogLevel: "KVC_LOG_",
    SeqState: "KVC_SEQ_",
    EventKind: "KVC_EVENT_",
}

# typedef void (*kvc_log_fn)(void *user, kvc_log_level_t level, const char *message);
LOG_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p)

# typedef int (*kvc_tp_allreduce_fn)(void *user, int64_t *values, int count);
TP_ALLREDUCE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64),
                                   ctypes.c_int)

_enum_t = ctypes.c_int


class kvc_config_t(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("backend", _enum_t),
        ("device", ctypes.c_int),
        ("num_layers", ctypes.c_int),
        ("num_q_heads", ctypes.c_int),
        ("num_kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("dtype", _enum_t),
        ("block_tokens", ctypes.c_int),
        ("pool_bytes", ctypes.c_size_t),
        ("swap_bytes", ctypes.c_size_t),
        ("max_seqs", ctypes.c_int),
        ("max_seq_len", ctypes.c_int),
        ("max_batch_tokens", ctypes.c_int),
        ("watermark", ctypes.c_float),
        ("prefix_caching", ctypes.c_int),
        ("policy", _enum_t),
        ("codec", _enum_t),
        ("size_budget", ctypes.c_float),
        ("bound_mode", _enum_t),
        ("k_bound", ctypes.c_float),
        ("v_bound", ctypes.c_float),
        ("log_fn", LOG_FN),
        ("log_user", ctypes.c_void_p),
        ("log_level", _enum_t),
        ("cascade", ctypes.c_int),
        ("tp_allreduce_max", TP_ALLREDUCE_FN),
        ("tp_user", ctypes.c_void_p),
    ]


class kvc_seq_info_t(ctypes.Structure):
    _fields_ = [
        ("length", ctypes.c_int),
        ("reserved", ctypes.c_int),
        ("num_blocks", ctypes.c_int),
        ("shared_blocks", ctypes.c_int),
        ("state", _enum_t),
    ]


class kvc_batch_t(ctypes.Structure):
    _fields_ = [
        ("num_seqs", ctypes.c_int),
        ("seq_ids", ctypes.POINTER(ctypes.c_uint64)),
        ("num_new_tokens", ctypes.POINTER(ctypes.c_int32)),
        ("token_ids", ctypes.POINTER(ctypes.c_int32)),
    ]


class kvc_stats_t(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("pool_bytes", ctypes.c_size_t),
        ("page_bytes", ctypes.c_size_t),
        ("page_alloc_bytes", ctypes.c_size_t),
        ("staging_bytes", ctypes.c_size_t),
        ("reserved_bytes", ctypes.c_size_t),
        ("free_bytes", ctypes.c_size_t),
        ("metadata_bytes", ctypes.c_size_t),
        ("fragmentation", ctypes.c_double),
        ("compression_ratio", ctypes.c_double),
        ("tokens_stored", ctypes.c_int64),
        ("live_seqs", ctypes.c_int64),
        ("swapped_seqs", ctypes.c_int64),
        ("cached_blocks", ctypes.c_int64),
        ("prefix_queries", ctypes.c_int64),
        ("prefix_hits", ctypes.c_int64),
        ("evictions", ctypes.c_int64),
        ("swap_outs", ctypes.c_int64),
        ("swap_ins", ctypes.c_int64),
        ("pages_by_codec", ctypes.c_int64 * 3),
    ]


class kvc_event_t(ctypes.Structure):
    _fields_ = [
        ("kind", _enum_t),
        ("block_id", ctypes.c_int32),
        ("block_hash", ctypes.c_uint64),
    ]


C_STRUCTS = (kvc_config_t, kvc_seq_info_t, kvc_batch_t, kvc_stats_t, kvc_event_t)

_P = ctypes.POINTER
_vp = ctypes.c_void_p
_st = ctypes.c_int  # kvc_status_t
_id = ctypes.c_uint64

# name: (restype, argtypes), in header order.
FUNCTIONS = {
    "kvc_status_string": (ctypes.c_char_p, [_enum_t]),
    "kvc_version": (ctypes.c_int, []),
    "kvc_cache_create": (_st, [_P(kvc_config_t), _P(_vp)]),
    "kvc_cache_destroy": (None, [_vp]),
    "kvc_cache_config": (_st, [_vp, _P(kvc_config_t)]),
    "kvc_seq_add": (_st, [_vp, _id, _P(ctypes.c_int32), ctypes.c_int, ctypes.c_uint64,
                          _P(ctypes.c_int)]),
    "kvc_seq_reserve": (_st, [_vp, _id, ctypes.c_int, ctypes.c_int]),
    "kvc_seq_fork": (_st, [_vp, _id, _id]),
    "kvc_seq_free": (_st, [_vp, _id]),
    "kvc_seq_swap_out": (_st, [_vp, _id, _vp]),
    "kvc_seq_swap_in": (_st, [_vp, _id, _vp]),
    "kvc_seq_info": (_st, [_vp, _id, _P(kvc_seq_info_t)]),
    "kvc_tokens_fit": (_st, [_vp, _P(ctypes.c_int64)]),
    "kvc_tokens_fit_agreed": (_st, [_vp, _P(ctypes.c_int64)]),
    "kvc_seq_export_bytes": (_st, [_vp, _id, _P(ctypes.c_size_t), _vp]),
    "kvc_seq_export": (_st, [_vp, _id, _vp, ctypes.c_size_t, _vp]),
    "kvc_seq_import": (_st, [_vp, _id, _vp, ctypes.c_size_t, _vp]),
    "kvc_plan": (_st, [_vp, _P(kvc_batch_t), _vp]),
    "kvc_store": (_st, [_vp, ctypes.c_int, _vp, _vp, _vp]),
    "kvc_attend": (_st, [_vp, ctypes.c_int, _vp, _vp, ctypes.c_float, _vp]),
    "kvc_cache_synchronize": (_st, [_vp]),
    "kvc_get_stats": (_st, [_vp, _P(kvc_stats_t)]),
    "kvc_stats_prometheus": (_st, [_vp, _P(ctypes.c_char), ctypes.c_size_t,
                                   _P(ctypes.c_size_t)]),
    "kvc_poll_events": (_st, [_vp, _P(kvc_event_t), ctypes.c_int, _P(ctypes.c_int),
                              _P(ctypes.c_int64)]),
    "kvc_cache_validate": (_st, [_vp]),
}


def declare(lib):
    """Sets restype/argtypes of every kvcomp function on a loaded ctypes.CDLL."""
    for name, (restype, argtypes) in FUNCTIONS.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib
