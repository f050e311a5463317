"""Shared by the binding's tests: an environment the library loads in, and a dense reference.

Not a test itself (ctest registers python/tests/test_*.py only).
"""
import os
import subprocess
import sys


def reexec_if_library_needs_it():
    """Re-executes this test in an environment the library can be loaded into, if needed.

    A library built with -fsanitize=address (the CI sanitizer build runs these tests too) can only
    be loaded into a process whose first library is the ASan runtime, so it comes through
    LD_PRELOAD, with leak detection off for the interpreter (which keeps its allocations at exit;
    the C tests check kvcomp for leaks). Any other build loads as it is: libkvcomp does not link
    jemalloc, whose initial-exec TLS would not fit a running process (it looks for jemalloc at
    run time instead).
    """
    if os.environ.get("KVC_PY_REEXEC"):
        return
    import kvcomp._loader
    library = next((p for p in kvcomp._loader.candidate_paths() if os.path.exists(p)), None)
    if library is None:
        return
    asan_runtime = _asan_runtime(library)
    if not asan_runtime:
        return
    env = dict(os.environ, KVC_PY_REEXEC="1")
    env["LD_PRELOAD"] = ":".join(p for p in (asan_runtime, env.get("LD_PRELOAD")) if p)
    env["ASAN_OPTIONS"] = ":".join(p for p in (env.get("ASAN_OPTIONS"), "detect_leaks=0") if p)
    sys.stdout.flush()
    sys.stderr.flush()
    args = sys.orig_argv[1:] if hasattr(sys, "orig_argv") else sys.argv  # orig_argv: 3.10+
    os.execve(sys.executable, [sys.executable] + args, env)


def _asan_runtime(library):
    """Path of the ASan runtime `library` links, or None."""
    try:
        ldd = subprocess.run(["ldd", library], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    for line in ldd.splitlines():
        parts = line.split()
        if parts and parts[0].startswith("libasan.so") and len(parts) >= 3:
            return parts[2]
    return None


def repo_root():
    """The source tree holding python/tests (None when the tests were copied elsewhere)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return root if os.path.exists(os.path.join(root, "include", "kvcomp.h")) else None


def dense_attention(np, q, k, v, scale):
    """Causal attention of one sequence in float64: q [n_q, Hq, D] are the last n_q positions of
    k, v [n_kv, Hkv, D]; query head h reads kv head h // (Hq // Hkv). Returns [n_q, Hq, D]."""
    q = q.astype(np.float64)
    k = k.astype(np.float64)
    v = v.astype(np.float64)
    n_q, n_q_heads, _ = q.shape
    n_kv, n_kv_heads, _ = k.shape
    group = n_q_heads // n_kv_heads
    out = np.empty(q.shape, dtype=np.float64)
    for h in range(n_q_heads):
        kh = k[:, h // group, :]
        vh = v[:, h // group, :]
        logits = scale * (q[:, h, :] @ kh.T)  # [n_q, n_kv]
        pos = n_kv - n_q + np.arange(n_q)
        logits[np.arange(n_kv)[None, :] > pos[:, None]] = -np.inf
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        out[:, h, :] = p @ vh
    return out


def lossy_tolerance(np, q, k, v, scale, k_err, v_err):
    """An upper bound on |attention(q, K + dK, V + dV) - attention(q, K, V)| for |dK| <= k_err,
    |dV| <= v_err elementwise: each logit moves by at most d = scale * max_i |q_i|_1 * k_err, so
    every softmax weight changes by a factor within exp(+-2d) and sum |dp| <= exp(2d) - 1; hence
    |d out| <= v_err + (exp(2d) - 1) * (max|V| + v_err)."""
    d = scale * float(np.abs(q.astype(np.float64)).sum(axis=-1).max()) * k_err
    return v_err + (np.exp(2 * d) - 1) * (float(np.abs(v).max()) + v_err)
