"""Cache: one kvc_cache_t, driven the way include/kvcomp.h describes.

    with kvcomp.Cache(num_layers=32, num_q_heads=32, num_kv_heads=8, head_dim=128) as cache:
        n_cached = cache.seq_add(req_id, prompt_ids)
        cache.reserve(req_id, len(prompt_ids) - n_cached)
        rows = cache.plan([req_id], [len(prompt_ids) - n_cached], prompt_ids[n_cached:])
        for layer in range(32):
            cache.store(layer, k[layer], v[layer])      # [rows, num_kv_heads, head_dim]
            out = cache.attend(layer, q[layer])         # [rows, num_q_heads, head_dim]

Tensors are NumPy arrays (or CPU torch tensors) on the CPU backend and torch CUDA tensors on the
cache's device on the CUDA backend, in the cache's dtype (bf16 on the CPU backend: a uint16 view of
the bits, or an ml_dtypes.bfloat16 array). The binding checks kind, dtype, contiguity and the exact
shape against the last plan before calling C, raising TypeError/ValueError; statuses from C raise
the KvcError subclass of errors.py.

Streams (CUDA backend): `stream=None` means torch.cuda.current_stream() of the cache's device when
torch is imported, else the legacy default stream; an int is a raw cudaStream_t (CuPy:
stream.ptr); a torch.cuda.Stream gives its handle. On the CPU backend streams are ignored. Like
the C calls, plan/store/attend/swap return before the device work is done; the tensors passed to
store/attend are kept referenced until the next successful plan, synchronize() or close(), and a
torch tensor used on an explicit torch stream is record_stream()-ed on it.

The cache enqueues the device work of hooks without a stream argument (free, fork, ...) on the
last stream it was given, which must stay valid until it is given another one: the binding keeps
the Python stream object passed last referenced for that long (a raw int handle is the caller's
to keep alive).

Errors: after KvcCudaError or KvcInternalError the C cache is unusable (every later call fails
with the same status); close it.

Threading: one scheduler thread drives a Cache; stats(), prometheus(), seq_info(), tokens_fit()
and the config property may be used from any thread (the C calls release the GIL and serialize on
the cache's mutex), but not concurrently with close().
"""
import collections
import ctypes
import dataclasses
import logging
import math
import operator
import sys
import threading

from . import _abi, _loader, _tensors
from ._abi import Backend, Codec, EventKind, LogLevel, SeqState, Status
from .config import Config
from .errors import error_for

SeqInfo = collections.namedtuple("SeqInfo", "length reserved num_blocks shared_blocks state")
SeqInfo.__doc__ = "kvc_seq_info_t: tokens stored, tokens reserved, blocks, shared blocks, state."

Event = collections.namedtuple("Event", "kind block_id block_hash")
Event.__doc__ = "kvc_event_t: an EventKind, the block id and its prefix-cache hash (0: none)."


class Events(list):
    """Events polled by Cache.poll_events(), oldest first; `dropped` counts events lost to the
    library's queue overflowing since the previous poll."""

    def __init__(self, events=(), dropped=0):
        super().__init__(events)
        self.dropped = dropped


_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1
_EVENT_BATCH = 256
_PROMETHEUS_FIRST_CAP = 8192
_LOGGING_LEVELS = {LogLevel.ERROR: logging.ERROR, LogLevel.WARN: logging.WARNING,
                   LogLevel.INFO: logging.INFO, LogLevel.DEBUG: logging.DEBUG}
_logger = logging.getLogger("kvcomp")


def _log_to_logging(level, message):
    _logger.log(_LOGGING_LEVELS.get(level, logging.ERROR), "%s", message)


class _LogRelay:
    """The kvc_log_fn: forwards lines to the sink and remembers the last error or warning line,
    which becomes the `detail` of the exception when the call that logged it fails. The library
    logs on the calling thread, so the line is kept per thread (stats() may run on another).
    Holds no reference to the Cache, so the Cache is freed as soon as it is unreachable."""

    def __init__(self, sink):
        self.sink = sink
        self._local = threading.local()

    @property
    def last_error(self):
        return getattr(self._local, "line", None)

    @last_error.setter
    def last_error(self, line):
        self._local.line = line

    def __call__(self, user, level, message):
        text = message.decode("utf-8", "replace") if message else ""
        try:
            level = LogLevel(level)
        except ValueError:
            pass
        if level <= LogLevel.WARN:
            self.last_error = text
        self.sink(level, text)


def _tp_relay(fn):
    """A TP_ALLREDUCE_FN body calling fn(list of ints) -> list of ints. No exception may cross
    into C: one is logged (the "kvcomp" logger) and returned as a failure, which the cache
    reports as KvcNcclError."""
    def allreduce(user, values, count):
        try:
            out = fn([values[i] for i in range(count)])
            for i in range(count):
                values[i] = int(out[i])
            return 0
        except Exception:  # noqa: BLE001 - reported through the cache's status
            _logger.exception("tp_allreduce_max raised")
            return -1
    return allreduce


def status_string(status):
    """kvc_status_string(status) from the library."""
    return _loader.load().kvc_status_string(int(status)).decode()


def version():
    """KVC_VERSION_CODE of the loaded library (major * 10000 + minor * 100 + patch)."""
    return _loader.load().kvc_version()


def _index(name, value):
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None


def _seq_id(value, name="seq_id"):
    value = _index(name, value)
    if not 0 <= value <= _abi.SEQ_NONE:
        raise ValueError(f"{name}={value} is not a kvc_seq_id_t (0 .. 2**64-1)")
    return value


def _int32(name, value):
    value = _index(name, value)
    if not _INT32_MIN <= value <= _INT32_MAX:
        raise ValueError(f"{name}={value} does not fit a C int")
    return value


def _int32_array(name, values):
    """(ctypes int32 array, length, owner) for a sequence of ints or an integer NumPy array."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(values, numpy.ndarray):
        if values.dtype.kind not in "iu" or values.ndim != 1:
            raise TypeError(f"{name}: expected a 1-D integer array, got {values.dtype} "
                            f"with shape {values.shape}")
        if values.size and (values.min() < _INT32_MIN or values.max() > _INT32_MAX):
            raise ValueError(f"{name}: values must fit int32")
        arr = numpy.ascontiguousarray(values, dtype=numpy.int32)
        return arr.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), arr.size, arr
    items = [_int32(name, v) for v in values]
    arr = (ctypes.c_int32 * len(items))(*items)
    return arr, len(items), arr


class Cache:
    """A kvcomp KV cache. Construct from a Config and/or its fields as keywords:

        Cache(num_layers=..., num_q_heads=..., num_kv_heads=..., head_dim=..., codec="raw")
        Cache(config, swap_bytes=1 << 30)     # fields override the Config's

    log: callable(level: LogLevel, message: str) receiving the library's log lines (at or below
    config.log_level); default: the "kvcomp" logger of the logging module.
    tp_allreduce_max: for tensor parallelism (kvcomp.h, "Tensor parallelism"), a callable taking
    a list of ints and returning the list of their maxima over every rank (e.g. through
    torch.distributed.all_reduce with ReduceOp.MAX); every rank's cache gets one and every rank
    makes the same calls. An exception in it makes the cache unusable (KvcNcclError). None: this cache
    decides alone.
    library: path of libkvcomp.so for the first cache of the process (see _loader.py's search).
    Raises the KvcError subclass of kvc_cache_create's status (e.g. KvcInvalidArgument for a bad
    shape, KvcUnsupported for a backend not built), TypeError/ValueError for fields C cannot hold.
    """

    def __init__(self, config=None, *, log=None, library=None, tp_allreduce_max=None, **fields):
        self._handle = None  # first, so that close() works on a half-constructed object
        if config is None:
            config = Config(**fields)
        elif fields:
            config = dataclasses.replace(config, **fields)
        self._api = _loader.load(library)
        self._relay = _LogRelay(log if log is not None else _log_to_logging)
        self._log_fn = _abi.LOG_FN(self._relay)
        self._planned_rows = None
        self._borrowed = []
        self._last_stream = None  # the Python object owning the last stream given to C
        c_config = config.to_c(self._log_fn)
        self._tp_fn = None
        if tp_allreduce_max is not None:
            self._tp_fn = _abi.TP_ALLREDUCE_FN(_tp_relay(tp_allreduce_max))
            c_config.tp_allreduce_max = self._tp_fn
        handle = ctypes.c_void_p()
        status = self._api.kvc_cache_create(ctypes.byref(c_config), ctypes.byref(handle))
        if status != Status.OK:
            raise self._error("kvc_cache_create", status)
        self._handle = handle
        out = _abi.kvc_config_t()
        out.struct_size = ctypes.sizeof(out)
        self._call("kvc_cache_config", ctypes.byref(out))
        self._config = Config.from_c(out)
        cfg = self._config
        self._kv_shape_tail = (cfg.num_kv_heads, cfg.head_dim)
        self._q_shape_tail = (cfg.num_q_heads, cfg.head_dim)

    # ---- lifecycle ---------------------------------------------------------------------------

    def close(self):
        """kvc_cache_destroy: waits for outstanding work and frees the cache. Idempotent."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self._api.kvc_cache_destroy(handle)
        self._borrowed = []
        self._planned_rows = None
        self._last_stream = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_handle", None) is not None:
            self.close()

    @property
    def closed(self):
        return self._handle is None

    @property
    def config(self):
        """The Config the cache runs with, as kvc_cache_config reports it (defaults filled in)."""
        return dataclasses.replace(self._config)

    @property
    def handle(self):
        """The kvc_cache_t * as an int, for passing to other C code. Owned by this object."""
        return self._live_handle().value

    @property
    def planned_rows(self):
        """Token rows of the last successful plan (store/attend tensors' first dimension)."""
        return self._planned_rows

    def __repr__(self):
        cfg = self._config if hasattr(self, "_config") else None
        if cfg is None:
            return "<kvcomp.Cache (not created)>"
        state = "closed" if self.closed else "open"
        return (f"<kvcomp.Cache {state} {cfg.backend.name.lower()} layers={cfg.num_layers} "
                f"q_heads={cfg.num_q_heads} kv_heads={cfg.num_kv_heads} "
                f"head_dim={cfg.head_dim} dtype={cfg.dtype.name.lower()} "
                f"codec={cfg.codec.name.lower()}>")

    # ---- plumbing ----------------------------------------------------------------------------

    def _live_handle(self):
        if self._handle is None:
            raise ValueError("kvcomp cache is closed")
        return self._handle

    def _error(self, function, status, detail=None):
        text = self._api.kvc_status_string(int(status)).decode()
        return error_for(status, text, function, detail or self._relay.last_error)

    def _call(self, function, *args):
        handle = self._live_handle()
        self._relay.last_error = None
        status = getattr(self._api, function)(handle, *args)
        if status != Status.OK:
            raise self._error(function, status)

    def _stream(self, stream, tensors=()):
        """The cudaStream_t to pass (None: legacy default / CPU backend)."""
        if self._config.backend != Backend.CUDA:
            return None
        if stream is None:
            torch = sys.modules.get("torch")
            if torch is None:
                return None
            # Tensors are normally made on the current stream: no record_stream needed.
            stream, tensors = torch.cuda.current_stream(self._config.device), ()
        if isinstance(stream, int):
            self._last_stream = None
            return stream or None
        handle = getattr(stream, "cuda_stream", None)
        if not isinstance(handle, int):
            raise TypeError(f"stream: expected None, an int cudaStream_t or a torch.cuda.Stream, "
                            f"got {type(stream).__name__}")
        # The caching allocator must not reuse these tensors' memory for work on their
        # allocation stream before `stream` is done with them.
        for t in tensors:
            t.record_stream(stream)
        self._last_stream = stream
        return handle or None

    def _tensor(self, obj, name, shape_tail, writable=False):
        return _tensors.check(obj, name, (self._planned_rows,) + shape_tail, self._config.dtype,
                              self._config.backend, self._config.device, writable)

    def _require_plan(self, function):
        self._live_handle()
        if self._planned_rows is None:
            raise self._error(function, Status.ERR_INVALID_STATE, "no step has been planned")

    # ---- per-request hooks -------------------------------------------------------------------

    def seq_add(self, seq_id, tokens=None, salt=0):
        """kvc_seq_add: adds a sequence with its prompt token ids (a sequence of ints or an
        integer NumPy array; None: no prompt). Returns n_cached, the prompt tokens already in the
        cache (a multiple of block_tokens, < len(tokens)); compute tokens [n_cached:]."""
        seq_id = _seq_id(seq_id)
        salt = _seq_id(salt, "salt")
        ptr, n, _keepalive = _int32_array("tokens", () if tokens is None else tokens)
        n_cached = ctypes.c_int()
        self._call("kvc_seq_add", seq_id, ptr if n else None, n, salt, ctypes.byref(n_cached))
        return n_cached.value

    def reserve(self, seq_id, n_new, lookahead=0):
        """kvc_seq_reserve: guarantees room for n_new more tokens (+ lookahead speculative slots).
        KvcOutOfMemory when the pool cannot, and nothing changes."""
        self._call("kvc_seq_reserve", _seq_id(seq_id), _int32("n_new", n_new),
                   _int32("lookahead", lookahead))

    def fork(self, parent, child):
        """kvc_seq_fork: `child` shares parent's full blocks and copies its tail."""
        self._call("kvc_seq_fork", _seq_id(parent, "parent"), _seq_id(child, "child"))

    def free(self, seq_id):
        """kvc_seq_free: frees the sequence (its full blocks stay in the prefix cache)."""
        self._call("kvc_seq_free", _seq_id(seq_id))

    def swap_out(self, seq_id, stream=None):
        """kvc_seq_swap_out: moves the sequence's pages to host swap space (preemption)."""
        self._call("kvc_seq_swap_out", _seq_id(seq_id), self._stream(stream))

    def swap_in(self, seq_id, stream=None):
        """kvc_seq_swap_in: brings a swapped-out sequence back into the pool."""
        self._call("kvc_seq_swap_in", _seq_id(seq_id), self._stream(stream))

    def seq_info(self, seq_id):
        """kvc_seq_info as a SeqInfo(length, reserved, num_blocks, shared_blocks, state)."""
        info = _abi.kvc_seq_info_t()
        self._call("kvc_seq_info", _seq_id(seq_id), ctypes.byref(info))
        return SeqInfo(info.length, info.reserved, info.num_blocks, info.shared_blocks,
                       SeqState(info.state))

    def tokens_fit(self):
        """kvc_tokens_fit: a conservative count of further tokens the pool can hold."""
        n = ctypes.c_int64()
        self._call("kvc_tokens_fit", ctypes.byref(n))
        return n.value

    def tokens_fit_agreed(self):
        """kvc_tokens_fit_agreed: the smallest tokens_fit over the tensor-parallel ranks (a hook:
        every rank calls it at the same point); without tp_allreduce_max, tokens_fit."""
        n = ctypes.c_int64()
        self._call("kvc_tokens_fit_agreed", ctypes.byref(n))
        return n.value

    # ---- moving a sequence between caches ------------------------------------------------------

    def export_seq(self, seq_id, stream=None):
        """kvc_seq_export_bytes + kvc_seq_export: the sequence's image (its pages as compressed)
        as a new uint8 buffer in the cache's memory: a NumPy array on the CPU backend, a torch
        CUDA tensor on the cache's device on the CUDA backend (written on `stream`). The sequence
        stays in this cache; free it to move it."""
        seq_id = _seq_id(seq_id)
        handle = self._stream(stream)
        n = ctypes.c_size_t()
        self._call("kvc_seq_export_bytes", seq_id, ctypes.byref(n), handle)
        if self._config.backend == Backend.CUDA:
            torch = sys.modules.get("torch")
            if torch is None:
                raise RuntimeError("export_seq on the CUDA backend needs torch imported")
            image = torch.empty(n.value, dtype=torch.uint8, device=f"cuda:{self._config.device}")
            address = image.data_ptr()
        else:
            import numpy
            image = numpy.empty(n.value, dtype=numpy.uint8)
            address = image.__array_interface__["data"][0]
        self._call("kvc_seq_export", seq_id, address, n.value, handle)
        return image

    def import_seq(self, seq_id, image, stream=None):
        """kvc_seq_import: adds sequence seq_id from an image export_seq made (a 1-D uint8 NumPy
        array or CPU tensor on the CPU backend, a CUDA uint8 tensor on this cache's device on the
        CUDA backend), copying its pages on `stream`. An admission: KvcOutOfMemory when there is
        no room, and nothing changes."""
        seq_id = _seq_id(seq_id)
        address, nbytes = _tensors.check_bytes(image, "image", self._config.backend,
                                               self._config.device)
        self._call("kvc_seq_import", seq_id, address, nbytes, self._stream(stream))

    # ---- per-step plan and per-layer run -----------------------------------------------------

    def plan(self, seq_ids, num_new_tokens, token_ids=None, stream=None):
        """kvc_plan: describes the step's batch once for all layers. seq_ids: the sequences;
        num_new_tokens: one count per sequence, or one int for all; token_ids: optional flat
        list of the new tokens' ids in batch order (for prefix caching of completed blocks).
        Returns the step's token rows (the first dimension of store/attend tensors)."""
        ids = [_seq_id(s) for s in seq_ids]
        try:
            counts = [_int32("num_new_tokens", operator.index(num_new_tokens))] * len(ids)
        except TypeError:
            counts = [_int32("num_new_tokens", n) for n in num_new_tokens]
        if len(counts) != len(ids):
            raise ValueError(f"num_new_tokens has {len(counts)} entries for {len(ids)} sequences")
        rows = sum(counts)
        token_ptr, _keepalive = None, None
        if token_ids is not None:
            token_ptr, n_tokens, _keepalive = _int32_array("token_ids", token_ids)
            if n_tokens != rows:
                raise ValueError(f"token_ids has {n_tokens} entries, the batch has {rows} new "
                                 f"tokens")
        c_ids = (ctypes.c_uint64 * len(ids))(*ids)
        c_counts = (ctypes.c_int32 * len(counts))(*counts)
        batch = _abi.kvc_batch_t(len(ids), c_ids, c_counts, token_ptr)
        self._call("kvc_plan", ctypes.byref(batch), self._stream(stream))
        self._planned_rows = rows
        self._borrowed = []
        return rows

    def store(self, layer, k, v, stream=None):
        """kvc_store: appends this step's keys and values of `layer`, each
        [planned_rows, num_kv_heads, head_dim] in the cache's dtype."""
        self._require_plan("kvc_store")
        k_ptr, _ = self._tensor(k, "k", self._kv_shape_tail)
        v_ptr, _ = self._tensor(v, "v", self._kv_shape_tail)
        layer = _int32("layer", layer)
        self._call("kvc_store", layer, k_ptr, v_ptr, self._stream(stream, self._torch_only(k, v)))
        self._borrowed += (k, v)

    def attend(self, layer, q, out=None, scale=None, stream=None):
        """kvc_attend: causal attention of this step's queries q [planned_rows, num_q_heads,
        head_dim] over each sequence's cache and new tokens, into `out` (same shape and dtype;
        allocated like q when None, must not overlap q). scale: softmax scale, default
        1/sqrt(head_dim). Returns out."""
        self._require_plan("kvc_attend")
        q_range = self._tensor(q, "q", self._q_shape_tail)
        if out is None:
            out = q.new_empty(q.shape) if _tensors.is_torch_tensor(q) else _numpy_empty_like(q)
        out_range = self._tensor(out, "out", self._q_shape_tail, writable=True)
        if _tensors.overlaps(q_range, out_range):
            raise ValueError("out must not overlap q")
        layer = _int32("layer", layer)
        scale = 1.0 / math.sqrt(self._config.head_dim) if scale is None else float(scale)
        self._call("kvc_attend", layer, q_range[0], out_range[0], scale,
                   self._stream(stream, self._torch_only(q, out)))
        self._borrowed += (q, out)
        return out

    @staticmethod
    def _torch_only(*tensors):
        return [t for t in tensors if _tensors.is_torch_tensor(t)]

    def synchronize(self):
        """kvc_cache_synchronize: waits for all enqueued work; releases borrowed tensors."""
        self._call("kvc_cache_synchronize")
        self._borrowed = []

    # ---- observability -----------------------------------------------------------------------

    def stats(self):
        """kvc_get_stats as a dict (field names as in kvc_stats_t; pages_by_codec keyed by
        Codec). Any thread."""
        s = _abi.kvc_stats_t()
        s.struct_size = ctypes.sizeof(s)
        self._call("kvc_get_stats", ctypes.byref(s))
        result = {name: getattr(s, name) for name, _ in _abi.kvc_stats_t._fields_
                  if name not in ("struct_size", "pages_by_codec")}
        result["pages_by_codec"] = {codec: s.pages_by_codec[codec] for codec in Codec}
        return result

    def prometheus(self):
        """kvc_stats_prometheus: the stats in Prometheus text exposition format. Any thread."""
        cap = _PROMETHEUS_FIRST_CAP
        while True:
            buf = ctypes.create_string_buffer(cap)
            needed = ctypes.c_size_t()
            handle = self._live_handle()
            status = self._api.kvc_stats_prometheus(handle, buf, cap, ctypes.byref(needed))
            if status == Status.OK:
                return buf.value.decode()
            if status == Status.ERR_INVALID_ARGUMENT and needed.value >= cap:
                # Other threads may change the stats between calls; leave some room.
                cap = needed.value + 1 + 1024
                continue
            raise self._error("kvc_stats_prometheus", status)

    def poll_events(self, max_events=None):
        """kvc_poll_events: drains up to max_events (default: all) pending events into an Events
        list (Event(kind, block_id, block_hash), oldest first; .dropped: lost to overflow)."""
        events = Events()
        buf = (_abi.kvc_event_t * _EVENT_BATCH)()
        n = ctypes.c_int()
        dropped = ctypes.c_int64()
        while max_events is None or len(events) < max_events:
            want = _EVENT_BATCH if max_events is None else min(_EVENT_BATCH,
                                                               max_events - len(events))
            self._call("kvc_poll_events", buf, want, ctypes.byref(n), ctypes.byref(dropped))
            events.dropped += dropped.value
            events.extend(Event(_event_kind(e.kind), e.block_id, e.block_hash)
                          for e in buf[:n.value])
            if n.value < want:
                break
        return events

    def validate(self):
        """kvc_cache_validate: checks every invariant; KvcInternalError when one is broken."""
        self._call("kvc_cache_validate")


def _event_kind(value):
    try:
        return EventKind(value)
    except ValueError:  # a newer library's event kind
        return value


def _numpy_empty_like(arr):
    return sys.modules["numpy"].empty(arr.shape, dtype=arr.dtype)
