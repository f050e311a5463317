"""Config: kvc_config_t as a dataclass, defaults equal to KVC_CONFIG_INIT.

Field names, order and meaning follow include/kvcomp.h (read it for units and ranges); the C-only
fields struct_size, log_fn and log_user are filled by the binding. Enum fields accept the enum,
its int value or its name as a string ("cuda", "bf16", "huffman", "fastest_within", ...); dtype
also accepts "float16"/"bfloat16"/"float32" and NumPy or torch dtypes.
"""
import ctypes
import dataclasses

from ._abi import Backend, BoundMode, Codec, CodecPolicy, DType, LogLevel, kvc_config_t

# KVC_DEFAULT_K_BOUND / KVC_DEFAULT_V_BOUND
DEFAULT_K_BOUND = 0.04
DEFAULT_V_BOUND = 0.12

_DTYPE_ALIASES = {
    "f16": DType.F16, "float16": DType.F16, "half": DType.F16, "fp16": DType.F16,
    "bf16": DType.BF16, "bfloat16": DType.BF16,
    "f32": DType.F32, "float32": DType.F32, "float": DType.F32, "fp32": DType.F32,
}


@dataclasses.dataclass
class Config:
    backend: Backend = Backend.CPU
    device: int = 0
    num_layers: int = 0
    num_q_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    dtype: DType = DType.F16
    block_tokens: int = 64
    pool_bytes: int = 256 << 20
    swap_bytes: int = 0
    max_seqs: int = 256
    max_seq_len: int = 131072
    max_batch_tokens: int = 8192
    watermark: float = 0.01
    prefix_caching: bool = True
    policy: CodecPolicy = CodecPolicy.FIXED
    codec: Codec = Codec.HUFFMAN
    size_budget: float = 0.35
    bound_mode: BoundMode = BoundMode.RELATIVE
    k_bound: float = DEFAULT_K_BOUND
    v_bound: float = DEFAULT_V_BOUND
    log_level: LogLevel = LogLevel.WARN
    cascade: int = 1

    def __post_init__(self):
        self.backend = coerce_enum(Backend, self.backend, "backend")
        self.dtype = coerce_dtype(self.dtype)
        self.policy = coerce_enum(CodecPolicy, self.policy, "policy")
        self.codec = coerce_enum(Codec, self.codec, "codec")
        self.bound_mode = coerce_enum(BoundMode, self.bound_mode, "bound_mode")
        self.log_level = coerce_enum(LogLevel, self.log_level, "log_level")
        self.prefix_caching = bool(self.prefix_caching)

    def to_c(self, log_fn=None):
        """A kvc_config_t with struct_size set to this binding's sizeof (log_fn: a LOG_FN or None).

        ctypes silently truncates out-of-range integers, so every integer field is range-checked
        here (ValueError) and the library validates the values themselves.
        """
        c = kvc_config_t()
        c.struct_size = ctypes.sizeof(kvc_config_t)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            ctype = _C_FIELD_TYPES[field.name]
            if ctype in (ctypes.c_int, ctypes.c_size_t):
                value = _check_int(field.name, value, ctype)
            setattr(c, field.name, int(value) if ctype is not ctypes.c_float else float(value))
        if log_fn is not None:
            c.log_fn = log_fn
        return c

    @classmethod
    def from_c(cls, c):
        """The Config a kvc_config_t holds; a float field reads back as the shortest decimal
        that rounds to the float32 C holds, so that Config.from_c(cfg.to_c()) == cfg."""
        values = {}
        for field in dataclasses.fields(cls):
            value = getattr(c, field.name)
            if _C_FIELD_TYPES[field.name] is ctypes.c_float:
                value = _shortest_float32(value)
            values[field.name] = value
        return cls(**values)


_C_FIELD_TYPES = dict(kvc_config_t._fields_)


def _shortest_float32(value):
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if ctypes.c_float(candidate).value == value:
            return candidate
    return value


def _check_int(name, value, ctype):
    try:
        value = int(value.__index__())
    except AttributeError:
        raise TypeError(f"config field {name} must be an integer, not {type(value).__name__}")
    bits = 8 * ctypes.sizeof(ctype)
    lo, hi = (0, (1 << bits) - 1) if ctype is ctypes.c_size_t else (-(1 << (bits - 1)),
                                                                    (1 << (bits - 1)) - 1)
    if not lo <= value <= hi:
        raise ValueError(f"config field {name}={value} does not fit the C type ({lo}..{hi})")
    return value


def coerce_enum(enum_cls, value, what):
    """enum_cls member from a member, an int or a case-insensitive member name."""
    if isinstance(value, str):
        try:
            return enum_cls[value.upper()]
        except KeyError:
            names = ", ".join(m.name.lower() for m in enum_cls)
            raise ValueError(f"{what}={value!r}: expected one of {names}") from None
    try:
        return enum_cls(value)
    except ValueError:
        raise ValueError(f"{what}={value!r} is not a {enum_cls.__name__} value") from None


def coerce_dtype(value):
    """DType from a DType, int, name ('f16', 'bfloat16', ...), NumPy dtype or torch dtype."""
    if isinstance(value, (DType, int)):
        return coerce_enum(DType, value, "dtype")
    # numpy.dtype('float16').name == 'float16'; str(torch.bfloat16) == 'torch.bfloat16'.
    name = getattr(value, "name", None)
    if not isinstance(name, str):
        name = value.__name__ if isinstance(value, type) else str(value)  # numpy.float16 the type
    name = name.rsplit(".", 1)[-1].lower()
    if name in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[name]
    raise ValueError(f"dtype={value!r}: expected f16/float16, bf16/bfloat16 or f32/float32")
