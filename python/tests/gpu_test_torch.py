"""The Python binding on the CUDA backend with torch tensors, against torch SDPA on the same K/V.

Run on the GPU machine (needs torch with CUDA and a CUDA build of libkvcomp.so):
    KVC_LIBRARY=build-gpu/libkvcomp.so PYTHONPATH=python python3 python/tests/gpu_test_torch.py
Not registered with ctest (CI has no GPU). Also exercises the CPU backend with CPU torch tensors.
"""
import contextlib
import math
import unittest

import kvc_test_support as support

support.reexec_if_library_needs_it()

import kvcomp  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None

SEED = 1234


def setUpModule():
    if torch is None:
        raise unittest.SkipTest("torch is not installed")
    kvcomp.load_library()


def cuda_available():
    return torch is not None and torch.cuda.is_available()


_TORCH_DTYPES = {}
if torch is not None:
    _TORCH_DTYPES = {kvcomp.DType.F16: torch.float16, kvcomp.DType.BF16: torch.bfloat16,
                     kvcomp.DType.F32: torch.float32}
# Output rounding to the dtype for outputs of magnitude <= ~4 (fp32 accumulation inside).
_OUT_TOL = {kvcomp.DType.F16: 4e-3, kvcomp.DType.BF16: 3e-2, kvcomp.DType.F32: 1e-5}


def sdpa_reference(q, k, v, scale):
    """Causal attention of one sequence with torch SDPA in float32: q [n_q, Hq, D] are the last
    n_q positions of k, v [n_kv, Hkv, D]. Returns [n_q, Hq, D] float32."""
    n_q, n_q_heads, _ = q.shape
    n_kv, n_kv_heads, _ = k.shape
    group = n_q_heads // n_kv_heads
    qf = q.float().permute(1, 0, 2).unsqueeze(0)                                  # [1, Hq, n_q, D]
    kf = k.float().repeat_interleave(group, dim=1).permute(1, 0, 2).unsqueeze(0)  # [1, Hq, n_kv, D]
    vf = v.float().repeat_interleave(group, dim=1).permute(1, 0, 2).unsqueeze(0)
    pos = torch.arange(n_kv - n_q, n_kv, device=q.device)
    mask = torch.arange(n_kv, device=q.device)[None, :] <= pos[:, None]          # [n_q, n_kv]
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)
    return out.squeeze(0).permute(1, 0, 2)


def lossy_tolerance(q, v, scale, k_err, v_err):
    """Same bound as kvc_test_support.lossy_tolerance, for torch tensors."""
    d = scale * float(q.float().abs().sum(dim=-1).max()) * k_err
    return v_err + (math.exp(2 * d) - 1) * (float(v.float().abs().max()) + v_err)


class Driver:
    """Runs steps through a cache with torch tensors and checks every attention output against
    SDPA over the K/V it stored (kept per sequence and layer, in the cache's dtype)."""

    def __init__(self, test, cache, device, error_model=None):
        self.test = test
        self.cache = cache
        self.cfg = cache.config
        self.device = device
        self.dtype = _TORCH_DTYPES[self.cfg.dtype]
        self.gen = torch.Generator(device="cpu").manual_seed(SEED)
        self.kv = {}
        self.error_model = error_model
        self.max_err = 0.0

    def track(self, seq, like=None, n_cached=0):
        empty = torch.zeros((0, self.cfg.num_kv_heads, self.cfg.head_dim), dtype=self.dtype,
                            device=self.device)
        self.kv[seq] = [(empty, empty) if like is None else
                        (self.kv[like][layer][0][:n_cached], self.kv[like][layer][1][:n_cached])
                        for layer in range(self.cfg.num_layers)]

    def rand(self, rows, heads):
        x = torch.randn((rows, heads, self.cfg.head_dim), generator=self.gen)
        return x.to(device=self.device, dtype=self.dtype)

    def step(self, batch, token_ids=None, graph=False):
        """batch: [(seq, n_new)]. graph: capture the per-layer calls in a CUDA graph, replay it
        once (the replay is the step), then check."""
        for seq, n in batch:
            self.cache.reserve(seq, n)
        # A graph is captured on a stream of its own; plan on it too, as an engine would.
        stream, on_stream = None, contextlib.nullcontext()
        if graph:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            on_stream = torch.cuda.stream(stream)
        with on_stream:
            rows = self.cache.plan([s for s, _ in batch], [n for _, n in batch], token_ids)
        layers = []
        for _ in range(self.cfg.num_layers):
            layers.append((self.rand(rows, self.cfg.num_kv_heads),
                           self.rand(rows, self.cfg.num_kv_heads),
                           self.rand(rows, self.cfg.num_q_heads)))
        outs = [torch.full_like(q, float("nan")) for _, _, q in layers]
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):
                for layer, (k, v, q) in enumerate(layers):
                    self.cache.store(layer, k, v)
                    self.cache.attend(layer, q, out=outs[layer])
            g.replay()
        else:
            for layer, (k, v, q) in enumerate(layers):
                self.cache.store(layer, k, v)
                self.test.assertIs(self.cache.attend(layer, q, out=outs[layer]), outs[layer])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        scale = 1.0 / math.sqrt(self.cfg.head_dim)
        for layer, (k, v, q) in enumerate(layers):
            row = 0
            for seq, n in batch:
                k_all = torch.cat([self.kv[seq][layer][0], k[row:row + n]])
                v_all = torch.cat([self.kv[seq][layer][1], v[row:row + n]])
                self.kv[seq][layer] = (k_all, v_all)
                self.check(outs[layer][row:row + n], q[row:row + n], k_all, v_all, scale)
                row += n
        return rows

    def check(self, got, q, k, v, scale):
        want = sdpa_reference(q, k, v, scale)
        tol = _OUT_TOL[self.cfg.dtype]
        if self.error_model is not None:
            k_err, v_err = self.error_model(k, v)
            tol += lossy_tolerance(q, v, scale, k_err, v_err)
        self.test.assertFalse(bool(torch.isnan(got).any()))
        err = float((got.float() - want).abs().max())
        self.max_err = max(self.max_err, err)
        self.test.assertLessEqual(err, tol)


def run_mixed(driver):
    """Prefill (lengths not multiples of block_tokens), decodes, chunked prefill mixed with
    decodes, a fork, a swap out and in, a prefix hit."""
    cache = driver.cache
    for seq in (10, 11):
        cache.seq_add(seq)
        driver.track(seq)
    driver.step([(10, 70), (11, 33)])
    for _ in range(3):
        driver.step([(10, 1), (11, 1)])
    prompt = list(range(500, 600))
    cache.seq_add(12, prompt)
    driver.track(12)
    driver.step([(11, 1), (12, 100), (10, 1)], token_ids=[7] + prompt + [8])
    cache.fork(12, 13)
    driver.track(13, like=12, n_cached=100)
    driver.step([(12, 1), (13, 2)])
    if cache.config.swap_bytes:
        cache.swap_out(10)
        driver.step([(11, 1)])
        cache.swap_in(10)
    driver.step([(10, 1), (11, 1), (13, 1)])
    n_cached = cache.seq_add(14, prompt)
    block_tokens = cache.config.block_tokens
    driver.test.assertEqual(n_cached, (len(prompt) - 1) // block_tokens * block_tokens)
    driver.track(14, like=12, n_cached=n_cached)
    driver.step([(14, 100 - n_cached)], token_ids=prompt[n_cached:])
    cache.validate()


@unittest.skipUnless(cuda_available(), "no CUDA device visible to torch")
class TestCudaBackend(unittest.TestCase):
    def make(self, **fields):
        base = dict(backend="cuda", device=torch.cuda.current_device(), num_layers=2,
                    num_q_heads=8, num_kv_heads=2, head_dim=128, dtype="f16", block_tokens=16,
                    pool_bytes=64 << 20, swap_bytes=16 << 20, max_seqs=16, max_batch_tokens=512,
                    codec="raw")
        cache = kvcomp.Cache(**dict(base, **fields))
        self.addCleanup(cache.close)
        return cache

    def device(self):
        return torch.device("cuda", torch.cuda.current_device())

    def test_raw_matches_sdpa(self):
        for dtype in ("f16", "bf16"):
            for head_dim in (64, 128, 256):
                for q_heads, kv_heads in ((8, 8), (8, 2), (8, 1)):
                    with self.subTest(dtype=dtype, head_dim=head_dim, group=q_heads // kv_heads):
                        cache = self.make(dtype=dtype, head_dim=head_dim, num_q_heads=q_heads,
                                          num_kv_heads=kv_heads)
                        run_mixed(Driver(self, cache, self.device()))

    def test_lossy_within_bound(self):
        def model(cfg):
            if cfg.bound_mode == kvcomp.BoundMode.ABSOLUTE:
                return lambda k, v: (cfg.k_bound * 1.0001, cfg.v_bound * 1.0001)
            return lambda k, v: (cfg.k_bound * float(k.max() - k.min()) * 1.0001,
                                 cfg.v_bound * float(v.max() - v.min()) * 1.0001)

        for case in (dict(codec="huffman"), dict(codec="bitpack", dtype="bf16"),
                     dict(codec="huffman", bound_mode="absolute", k_bound=0.02, v_bound=0.02),
                     dict(policy="smallest"), dict(policy="fastest_within")):
            with self.subTest(**case):
                cache = self.make(**case)
                driver = Driver(self, cache, self.device(), error_model=model(cache.config))
                run_mixed(driver)
                stats = cache.stats()
                self.assertGreater(stats["compression_ratio"], 1.0)
                self.assertGreater(driver.max_err, 0.0)

    def test_runs_on_the_current_and_explicit_streams(self):
        cache = self.make()
        driver = Driver(self, cache, self.device())
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            cache.seq_add(1)
            driver.track(1)
            driver.step([(1, 40)])
        cache.seq_add(2)
        driver.track(2)
        driver.step([(1, 1), (2, 17)])
        # An explicit torch stream object (k, v, q made on the current stream: the binding
        # record_stream()s them on `side`) and a raw handle.
        cache.reserve(1, 1)
        k = driver.rand(1, 2)
        q = driver.rand(1, 8)
        out = torch.full_like(q, float("nan"))
        side.wait_stream(torch.cuda.current_stream())
        cache.plan([1], 1, stream=side)
        for layer in range(2):
            cache.store(layer, k, k, stream=side)
            cache.attend(layer, q, out=out, stream=side.cuda_stream)
        side.synchronize()
        self.assertFalse(bool(torch.isnan(out).any()))
        cache.synchronize()
        cache.validate()

    def test_decode_step_captured_in_cuda_graph(self):
        cache = self.make(codec="huffman")
        driver = Driver(self, cache, self.device(), error_model=lambda k, v: (
            0.05 * float(k.max() - k.min()) * 1.0001, 0.05 * float(v.max() - v.min()) * 1.0001))
        for seq in (1, 2, 3):
            cache.seq_add(seq)
            driver.track(seq)
        driver.step([(1, 47), (2, 16), (3, 5)])
        for _ in range(20):  # crosses block boundaries: a block a captured step completes is
            # compressed by the next plan, outside the graph
            driver.step([(1, 1), (2, 1), (3, 1)], graph=True)
        cache.validate()

    def test_tensor_checks(self):
        cache = self.make()
        cache.seq_add(1)
        cache.reserve(1, 2)
        cache.plan([1], 2)
        dev = self.device()
        good = torch.zeros((2, 2, 128), dtype=torch.float16, device=dev)
        q = torch.zeros((2, 8, 128), dtype=torch.float16, device=dev)
        with self.assertRaisesRegex(TypeError, "live on cuda"):
            cache.store(0, good.cpu(), good)
        with self.assertRaisesRegex(TypeError, "torch.float16"):
            cache.store(0, good.to(torch.bfloat16), good)
        with self.assertRaisesRegex(ValueError, "contiguous"):
            cache.store(0, torch.zeros((128, 2, 2), dtype=torch.float16,
                                       device=dev).permute(2, 1, 0), good)
        with self.assertRaisesRegex(ValueError, r"got \[3, 2, 128\]"):
            cache.store(0, torch.zeros((3, 2, 128), dtype=torch.float16, device=dev), good)
        with self.assertRaisesRegex(TypeError, "torch CUDA tensor"):
            import numpy
            cache.store(0, numpy.zeros((2, 2, 128), numpy.float16), good)
        cache.store(0, good, good)
        with self.assertRaisesRegex(ValueError, "requires grad"):
            cache.attend(0, q, out=torch.zeros_like(q).requires_grad_())
        with self.assertRaisesRegex(ValueError, "overlap"):
            cache.attend(0, q, out=q)
        out = cache.attend(0, q)
        self.assertEqual(out.device, dev)
        self.assertEqual(out.dtype, torch.float16)
        if torch.cuda.device_count() > 1:
            other = torch.device("cuda", (dev.index + 1) % torch.cuda.device_count())
            with self.assertRaisesRegex(TypeError, "live on cuda"):
                cache.store(1, good.to(other), good)


@unittest.skipUnless(cuda_available(), "no CUDA device visible to torch")
class TestMovingSequences(unittest.TestCase):
    def test_export_import_on_cuda(self):
        dev = torch.device("cuda", torch.cuda.current_device())
        fields = dict(backend="cuda", device=dev.index, num_layers=2, num_q_heads=8,
                      num_kv_heads=2, head_dim=128, dtype="f16", block_tokens=16,
                      pool_bytes=64 << 20, max_seqs=4, max_batch_tokens=256, codec="huffman")
        a, b = kvcomp.Cache(**fields), kvcomp.Cache(**fields)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        gen = torch.Generator(device=dev).manual_seed(5)

        def step(caches, n):
            k, v = (torch.randn(n, 2, 128, device=dev, generator=gen).half() for _ in range(2))
            q = torch.randn(n, 8, 128, device=dev, generator=gen).half()
            outs = []
            for cache in caches:
                cache.reserve(1, n)
                cache.plan([1], [n])
                for layer in range(2):
                    cache.store(layer, k, v)
                    out = cache.attend(layer, q)
                outs.append(out)
            return outs

        a.seq_add(1)
        step([a], 45)
        image = a.export_seq(1)
        self.assertEqual((image.dtype, image.device), (torch.uint8, dev))
        b.import_seq(1, image)
        for n in (2, 1, 16):
            got_a, got_b = step([a, b], n)
            self.assertTrue(torch.equal(got_a, got_b))
        a.validate()
        b.validate()
        with self.assertRaises(TypeError):
            b.import_seq(2, image.cpu())


class TestCpuBackendWithTorch(unittest.TestCase):
    """The CPU backend also takes CPU torch tensors."""

    def test_raw_f32_matches_sdpa(self):
        with kvcomp.Cache(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=32, dtype="f32",
                          codec="raw", block_tokens=16, pool_bytes=16 << 20, swap_bytes=4 << 20,
                          max_seqs=16, max_batch_tokens=512) as cache:
            driver = Driver(self, cache, torch.device("cpu"))
            run_mixed(driver)
            self.assertLess(driver.max_err, 1e-5)


if __name__ == "__main__":
    unittest.main(verbosity=2)
