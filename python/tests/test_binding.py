"""The Python binding over libkvcomp.so on the CPU backend, against a dense NumPy reference.

Run: KVC_LIBRARY=build/libkvcomp.so PYTHONPATH=python python3 python/tests/test_binding.py
(ctest sets both). Skips when NumPy is missing (./kvc test installs it).
"""
import re
import threading
import unittest

import kvc_test_support as support

support.reexec_if_library_needs_it()

import kvcomp  # noqa: E402  (after the re-exec, which must happen before the library loads)

try:
    import numpy as np
except ImportError:
    np = None

SEED = 20240607
SMALL = dict(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16, block_tokens=16,
             pool_bytes=16 << 20, max_seqs=16, max_seq_len=131072, max_batch_tokens=512,
             dtype="f32", codec="raw")


def setUpModule():
    if np is None:
        raise unittest.SkipTest("NumPy is not installed (./kvc test installs python3-numpy)")
    kvcomp.load_library()


class Encoding:
    """How test values travel to the cache in one dtype and come back as float64. bf16 travels
    as uint16 bits, or as ml_dtypes.bfloat16 arrays when `bf16_type` is given."""

    def __init__(self, dtype, bf16_type=None):
        self.dtype = kvcomp.DType(dtype)
        self.bf16_type = bf16_type

    def encode(self, x):
        """(array for the cache, the float64 values it actually holds) for float32 input x."""
        if self.dtype == kvcomp.DType.F32:
            arr = x.astype(np.float32)
            return arr, arr.astype(np.float64)
        if self.dtype == kvcomp.DType.F16:
            arr = x.astype(np.float16)
            return arr, arr.astype(np.float64)
        bits = (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits
        arr = bits if self.bf16_type is None else bits.view(self.bf16_type)
        return arr, self.decode(arr)

    def decode(self, arr):
        if self.dtype == kvcomp.DType.BF16:
            bits = arr.view(np.uint16)
            return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return arr.astype(np.float64)

    @property
    def output_tolerance(self):
        """Rounding of the output to the dtype, for outputs of magnitude <= ~4."""
        return {kvcomp.DType.F32: 1e-5, kvcomp.DType.F16: 4e-3,
                kvcomp.DType.BF16: 3e-2}[self.dtype]


class Driver:
    """Runs steps through a cache and checks every attention output against dense attention
    over the K/V it stored (kept here in float64 per sequence and layer)."""

    def __init__(self, test, cache, seed=SEED, error_model=None, bf16_type=None):
        self.test = test
        self.cache = cache
        self.cfg = cache.config
        self.enc = Encoding(self.cfg.dtype, bf16_type)
        self.rng = np.random.default_rng(seed)
        self.kv = {}  # seq -> [layer] -> (K [n, Hkv, D], V) float64
        self.error_model = error_model  # (K, V) -> (max |dK|, max |dV|) of a lossy codec
        self.max_err = 0.0

    def track(self, seq, like=None, n_cached=0):
        """Starts tracking `seq`, sharing like's first n_cached tokens (prefix hit, fork)."""
        layers = []
        for layer in range(self.cfg.num_layers):
            if like is None:
                empty = np.zeros((0, self.cfg.num_kv_heads, self.cfg.head_dim))
                layers.append((empty, empty))
            else:
                k, v = self.kv[like][layer]
                layers.append((k[:n_cached].copy(), v[:n_cached].copy()))
        self.kv[seq] = layers

    def rand(self, rows, heads):
        return self.rng.standard_normal((rows, heads, self.cfg.head_dim)).astype(np.float32)

    def step(self, batch, token_ids=None, check=True):
        """batch: [(seq, n_new)]; reserves, plans, stores and attends every layer."""
        for seq, n in batch:
            self.cache.reserve(seq, n)
        rows = self.cache.plan([s for s, _ in batch], [n for _, n in batch], token_ids)
        self.test.assertEqual(rows, sum(n for _, n in batch))
        self.test.assertEqual(self.cache.planned_rows, rows)
        scale = 1.0 / np.sqrt(self.cfg.head_dim)
        for layer in range(self.cfg.num_layers):
            k, k_ref = self.enc.encode(self.rand(rows, self.cfg.num_kv_heads))
            v, v_ref = self.enc.encode(self.rand(rows, self.cfg.num_kv_heads))
            q, q_ref = self.enc.encode(self.rand(rows, self.cfg.num_q_heads))
            self.cache.store(layer, k, v)
            out = self.cache.attend(layer, q)
            self.test.assertEqual(out.shape, q.shape)
            self.test.assertEqual(out.dtype, q.dtype)
            got = self.enc.decode(out)
            row = 0
            for seq, n in batch:
                k_all, v_all = self.kv[seq][layer]
                k_all = np.concatenate([k_all, k_ref[row:row + n]])
                v_all = np.concatenate([v_all, v_ref[row:row + n]])
                self.kv[seq][layer] = (k_all, v_all)
                if check:
                    self.check(got[row:row + n], q_ref[row:row + n], k_all, v_all, scale)
                row += n
        return rows

    def check(self, got, q, k, v, scale):
        want = support.dense_attention(np, q, k, v, scale)
        tol = self.enc.output_tolerance
        if self.error_model is not None:
            k_err, v_err = self.error_model(k, v)
            tol += support.lossy_tolerance(np, q, k, v, scale, k_err, v_err)
        self.test.assertFalse(np.isnan(got).any())
        err = float(np.abs(got - want).max())
        self.max_err = max(self.max_err, err)
        self.test.assertLessEqual(err, tol)


class CacheTest(unittest.TestCase):
    def make(self, **fields):
        cache = kvcomp.Cache(**dict(SMALL, **fields))
        self.addCleanup(cache.close)
        return cache


class TestLibrary(CacheTest):
    def test_version_and_status_strings(self):
        self.assertEqual(kvcomp.version() // 10000, kvcomp._abi.HEADER_VERSION_CODE // 10000)
        for status in kvcomp.Status:
            text = kvcomp.status_string(status)
            self.assertTrue(text.startswith(kvcomp._abi.C_ENUM_PREFIXES[kvcomp.Status] +
                                            status.name), text)
        self.assertTrue(kvcomp.status_string(1000).startswith("KVC_ERR_UNKNOWN"))
        self.assertTrue(kvcomp.library_path())

    def test_config_round_trips_through_the_library(self):
        """kvc_cache_config returns every field as given: Config() defaults included. (That
        Config()'s defaults are KVC_CONFIG_INIT's is checked by test_abi.py's compiled probe: the
        library reads whole structs, so it cannot report the macro's values itself.)"""
        shape = dict(num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8)
        with kvcomp.Cache(**shape) as cache:
            self.assertEqual(cache.config, kvcomp.Config(**shape))
        fields = dict(SMALL, codec="bitpack", bound_mode="absolute", k_bound=0.125,
                      v_bound=0.25, prefix_caching=False, watermark=0.1, swap_bytes=1 << 20,
                      policy="fastest_within", size_budget=0.5, log_level="error")
        cache = self.make(**fields)
        self.assertEqual(cache.config, kvcomp.Config(**fields))


class TestLifecycle(CacheTest):
    def test_context_manager_and_close(self):
        with kvcomp.Cache(**SMALL) as cache:
            self.assertFalse(cache.closed)
            self.assertNotEqual(cache.handle, 0)
            self.assertIn("open cpu layers=2", repr(cache))
            self.assertEqual(cache.seq_add(1, [1, 2, 3]), 0)
        self.assertTrue(cache.closed)
        self.assertIn("closed", repr(cache))
        cache.close()  # idempotent
        for call in (lambda: cache.seq_add(2), lambda: cache.stats(), lambda: cache.handle,
                     lambda: cache.attend(0, np.zeros((1, 4, 16), np.float32))):
            with self.assertRaisesRegex(ValueError, "closed"):
                call()

    def test_create_errors(self):
        # Failures are explained on the "kvcomp" logger and in the exception's detail.
        with self.assertLogs("kvcomp", "ERROR") as logs:
            with self.assertRaises(kvcomp.KvcInvalidArgument) as ctx:
                kvcomp.Cache(**dict(SMALL, head_dim=7))
        err = ctx.exception
        self.assertIs(err.status, kvcomp.Status.ERR_INVALID_ARGUMENT)
        self.assertEqual(err.function, "kvc_cache_create")
        self.assertIn(kvcomp.status_string(kvcomp.Status.ERR_INVALID_ARGUMENT), str(err))
        self.assertIn("head_dim", err.detail)
        self.assertEqual(logs.records[-1].getMessage(), err.detail)
        with self.assertLogs("kvcomp", "ERROR"):
            with self.assertRaises(kvcomp.KvcInvalidArgument):
                kvcomp.Cache(**dict(SMALL, num_q_heads=3))  # not a multiple of num_kv_heads
            with self.assertRaises(kvcomp.KvcInvalidArgument):
                kvcomp.Cache(**dict(SMALL, block_tokens=48))
            # A CPU-only build has no CUDA backend; a CUDA build without a GPU fails in CUDA.
            with self.assertRaises((kvcomp.KvcUnsupported, kvcomp.KvcCudaError)):
                kvcomp.Cache(**dict(SMALL, backend="cuda", dtype="f16"))

    def test_log_callback_receives_lines(self):
        lines = []
        with self.assertRaises(kvcomp.KvcInvalidArgument) as ctx:
            kvcomp.Cache(**dict(SMALL, block_tokens=48),
                         log=lambda level, message: lines.append((level, message)))
        self.assertTrue(lines)
        level, message = lines[-1]
        self.assertIs(level, kvcomp.LogLevel.ERROR)
        self.assertIn("block_tokens", message)
        self.assertEqual(ctx.exception.detail, message)
        self.assertIn(message, str(ctx.exception))
        # A later call that fails without logging carries no stale detail.
        cache = kvcomp.Cache(**SMALL, log=lambda level, message: lines.append((level, message)))
        self.addCleanup(cache.close)
        with self.assertRaises(kvcomp.KvcNotFound) as ctx:
            cache.free(5)
        self.assertNotIn(message, str(ctx.exception))


class TestAttention(CacheTest):
    def run_mixed(self, driver):
        """Prefill of two sequences (lengths not multiples of block_tokens), decode steps, then
        a step mixing a third sequence's chunked prefill with decodes."""
        driver.cache.seq_add(10)
        driver.cache.seq_add(11)
        driver.track(10)
        driver.track(11)
        driver.step([(10, 37), (11, 21)])
        for _ in range(3):
            driver.step([(10, 1), (11, 1)])
        driver.cache.seq_add(12)
        driver.track(12)
        driver.step([(11, 1), (12, 19), (10, 1)])
        driver.step([(12, 30), (10, 2)])
        driver.cache.validate()

    def test_raw_f32_matches_dense(self):
        driver = Driver(self, self.make())
        self.run_mixed(driver)
        self.assertLess(driver.max_err, 1e-5)
        stats = driver.cache.stats()
        self.assertEqual(stats["tokens_stored"], 43 + 25 + 49)  # sequences 10, 11, 12
        self.assertGreater(stats["pages_by_codec"][kvcomp.Codec.RAW], 0)

    def test_raw_f16_and_bf16_match_dense(self):
        for dtype in ("f16", "bf16"):
            with self.subTest(dtype=dtype):
                driver = Driver(self, self.make(dtype=dtype))
                self.run_mixed(driver)

    def test_bf16_as_ml_dtypes(self):
        try:
            import ml_dtypes
        except ImportError:
            self.skipTest("ml_dtypes is not installed (bf16 also travels as uint16 bits)")
        driver = Driver(self, self.make(dtype="bf16"), bf16_type=ml_dtypes.bfloat16)
        self.run_mixed(driver)
        x = np.zeros((1, 2, 16), ml_dtypes.bfloat16)
        with self.assertRaisesRegex(TypeError, "dtype numpy.float16 .* got dtype bfloat16"):
            kvcomp._tensors.check(x, "k", (1, 2, 16), kvcomp.DType.F16, kvcomp.Backend.CPU, 0)

    def test_gqa_groups(self):
        for q_heads, kv_heads in ((2, 2), (8, 1), (8, 2)):
            with self.subTest(q_heads=q_heads, kv_heads=kv_heads):
                driver = Driver(self, self.make(num_q_heads=q_heads, num_kv_heads=kv_heads,
                                                head_dim=32))
                self.run_mixed(driver)

    def test_lossy_codecs_within_bound(self):
        def absolute(k_bound, v_bound):
            return lambda k, v: (k_bound * 1.0001, v_bound * 1.0001)

        def relative(k_bound, v_bound):
            # Groups are sub-ranges of the whole sequence's values: bound * global range bounds
            # every group's bound * (max - min).
            return lambda k, v: (k_bound * float(k.max() - k.min()) * 1.0001,
                                 v_bound * float(v.max() - v.min()) * 1.0001)

        cases = [
            dict(codec="huffman", bound_mode="absolute", k_bound=0.02, v_bound=0.02),
            dict(codec="bitpack", bound_mode="absolute", k_bound=0.05, v_bound=0.01),
            dict(codec="huffman"),  # the default relative bounds
            dict(codec="bitpack", dtype="f16"),
        ]
        for case in cases:
            with self.subTest(**case):
                cache = self.make(**case)
                cfg = cache.config
                model = (absolute if cfg.bound_mode == kvcomp.BoundMode.ABSOLUTE else relative)
                driver = Driver(self, cache, error_model=model(cfg.k_bound, cfg.v_bound))
                self.run_mixed(driver)
                stats = cache.stats()
                self.assertGreater(stats["pages_by_codec"][cfg.codec], 0)
                self.assertGreater(stats["compression_ratio"], 1.0)
                # Lossy: the output differs from raw somewhere (else the test proves nothing).
                self.assertGreater(driver.max_err, Encoding(cfg.dtype).output_tolerance / 10)

    def test_explicit_out_and_scale(self):
        cache = self.make()
        driver = Driver(self, cache)
        cache.seq_add(1)
        driver.track(1)
        driver.step([(1, 20)])
        cache.reserve(1, 1)
        cache.plan([1], 1)
        k, v = driver.rand(1, 2), driver.rand(1, 2)
        q = driver.rand(1, 4)
        out = np.full((1, 4, 16), np.nan, np.float32)
        for layer in range(2):
            cache.store(layer, k, v)
            k_all = np.concatenate([driver.kv[1][layer][0], k])
            v_all = np.concatenate([driver.kv[1][layer][1], v])
            self.assertIs(cache.attend(layer, q, out=out, scale=0.5), out)
            want = support.dense_attention(np, q, k_all, v_all, 0.5)
            np.testing.assert_allclose(out, want, atol=1e-5)


    def test_tensors_borrowed_until_next_plan(self):
        """The C side reads k/v (and writes out) after the call returns on the CUDA backend, so
        the binding keeps them alive until the next plan or synchronize()."""
        import weakref
        cache = self.make()
        cache.seq_add(1)
        refs = []
        for _ in range(2):
            cache.reserve(1, 2)
            cache.plan([1], 2)
            self.assertTrue(all(r() is None for r in refs))  # the previous step's are released
            refs = []
            for layer in range(2):
                k = np.ones((2, 2, 16), np.float32)
                q = np.ones((2, 4, 16), np.float32)
                cache.store(layer, k, k.copy())
                cache.attend(layer, q)
                refs += [weakref.ref(k), weakref.ref(q)]
                del k, q
            self.assertTrue(all(r() is not None for r in refs))
        cache.synchronize()
        self.assertTrue(all(r() is None for r in refs))


class TestSequences(CacheTest):
    def test_prefix_cache_hit(self):
        cache = self.make()
        driver = Driver(self, cache)
        prompt = list(range(1000, 1040))  # 40 tokens: two full blocks of 16 and a tail
        self.assertEqual(cache.seq_add(1, prompt), 0)
        driver.track(1)
        driver.step([(1, 40)], token_ids=prompt)
        cache.free(1)
        # The same prompt finds its two full blocks; a different salt or prompt finds nothing.
        self.assertEqual(cache.seq_add(2, np.array(prompt, dtype=np.int64)), 32)
        self.assertEqual(cache.seq_add(3, prompt, salt=7), 0)
        self.assertEqual(cache.seq_add(4, [5] + prompt[1:]), 0)
        # A prompt of exactly two blocks recomputes its last token: one block.
        self.assertEqual(cache.seq_add(5, prompt[:32]), 16)
        info = cache.seq_info(2)
        self.assertEqual(info.length, 32)
        self.assertEqual(info.state, kvcomp.SeqState.RUNNING)
        driver.track(2, like=1, n_cached=32)
        driver.step([(2, 8)], token_ids=prompt[32:])
        driver.step([(2, 1)])
        stats = cache.stats()
        self.assertGreaterEqual(stats["prefix_hits"], 3)
        self.assertGreater(stats["prefix_queries"], stats["prefix_hits"])
        cache.validate()

    def test_prefix_caching_off(self):
        cache = self.make(prefix_caching=False)
        driver = Driver(self, cache)
        prompt = list(range(40))
        cache.seq_add(1, prompt)
        driver.track(1)
        driver.step([(1, 40)], token_ids=prompt)
        cache.free(1)
        self.assertEqual(cache.seq_add(2, prompt), 0)

    def test_fork(self):
        cache = self.make()
        driver = Driver(self, cache)
        cache.seq_add(1)
        driver.track(1)
        driver.step([(1, 37)])
        cache.fork(1, 2)
        driver.track(2, like=1, n_cached=37)
        info = cache.seq_info(2)
        self.assertEqual(info.length, 37)
        self.assertEqual(info.shared_blocks, 2)
        self.assertEqual(cache.seq_info(1).shared_blocks, 2)
        driver.step([(1, 1), (2, 1)])
        driver.step([(2, 30), (1, 3)])
        cache.free(1)
        driver.step([(2, 1)])
        cache.validate()

    def test_swap_out_and_in(self):
        cache = self.make(swap_bytes=4 << 20)
        driver = Driver(self, cache)
        for seq in (1, 2):
            cache.seq_add(seq)
            driver.track(seq)
        driver.step([(1, 50), (2, 20)])
        fit_before = cache.tokens_fit()
        cache.swap_out(1)
        self.assertEqual(cache.seq_info(1).state, kvcomp.SeqState.SWAPPED)
        self.assertGreater(cache.tokens_fit(), fit_before)
        with self.assertRaises(kvcomp.KvcInvalidState):
            cache.plan([1], 1)
        with self.assertRaises(kvcomp.KvcInvalidState):
            cache.reserve(1, 1)
        driver.step([(2, 5)])
        cache.swap_in(1)
        self.assertEqual(cache.seq_info(1).state, kvcomp.SeqState.RUNNING)
        self.assertEqual(cache.seq_info(1).length, 50)
        driver.step([(1, 1), (2, 1)])
        stats = cache.stats()
        self.assertEqual((stats["swap_outs"], stats["swap_ins"]), (1, 1))
        cache.validate()


class TestMultiGpu(CacheTest):
    """Sequence images and the tensor-parallel agreement, through the binding (CPU backend)."""

    def same_step(self, caches, seq, n, rng):
        """One step of n identical tokens on each cache; their last layer's outputs."""
        cfg = caches[0].config
        k = rng.standard_normal((n, cfg.num_kv_heads, cfg.head_dim)).astype(np.float16)
        v = rng.standard_normal((n, cfg.num_kv_heads, cfg.head_dim)).astype(np.float16)
        q = rng.standard_normal((n, cfg.num_q_heads, cfg.head_dim)).astype(np.float16)
        outs = []
        for cache in caches:
            cache.reserve(seq, n)
            cache.plan([seq], [n])
            for layer in range(cfg.num_layers):
                cache.store(layer, k, v)
                out = cache.attend(layer, q)
            outs.append(out)
        return outs

    def test_export_import_moves_a_sequence(self):
        a, b = (self.make(dtype="f16", codec="huffman") for _ in range(2))
        rng = np.random.default_rng(SEED)
        a.seq_add(1)
        self.same_step([a], 1, 37, rng)
        image = a.export_seq(1)
        self.assertEqual(image.dtype, np.uint8)
        b.import_seq(1, image)
        self.assertEqual(b.seq_info(1).length, 37)
        self.assertEqual(b.seq_info(1).num_blocks, a.seq_info(1).num_blocks)
        for n in (3, 1, 16):  # past a block boundary: the tails compress on both
            got_a, got_b = self.same_step([a, b], 1, n, rng)
            self.assertTrue(np.array_equal(got_a, got_b))
        a.validate()
        b.validate()
        with self.assertRaises(kvcomp.KvcInvalidArgument):
            b.import_seq(1, image)  # id in use
        with self.assertRaises(kvcomp.KvcCorrupt):
            b.import_seq(2, np.zeros_like(image))
        with self.assertRaises(TypeError):
            b.import_seq(2, image.astype(np.int16))
        self.assertEqual(b.stats()["live_seqs"], 1)

    def test_agreement_callback(self):
        other = {"status": 0, "fit": 1 << 40, "raise": False}

        def allreduce(values):  # this rank and one other, whose values `other` gives
            if other["raise"]:
                raise RuntimeError("the group is gone")
            if len(values) == 1:  # tokens_fit_agreed sends -fit
                return [max(values[0], -other["fit"])]
            return [max(values[0], other["status"]), values[1]]

        cache = self.make(tp_allreduce_max=allreduce)
        cache.seq_add(1)
        cache.reserve(1, 40)
        other["status"] = int(kvcomp.Status.ERR_OUT_OF_MEMORY)  # the other rank is full
        with self.assertRaises(kvcomp.KvcOutOfMemory):
            cache.reserve(1, 100)
        self.assertEqual(cache.seq_info(1).reserved, 40)
        other["status"] = 0
        self.assertEqual(cache.tokens_fit_agreed(), cache.tokens_fit())
        other["fit"] = 10
        self.assertEqual(cache.tokens_fit_agreed(), 10)
        other["raise"] = True
        with self.assertLogs("kvcomp", "ERROR") as logs, self.assertRaises(kvcomp.KvcNcclError):
            cache.reserve(1, 100)
        self.assertIn("the group is gone", "\n".join(logs.output))
        other["raise"] = False
        with self.assertRaises(kvcomp.KvcNcclError):
            cache.seq_add(2)  # unusable from then on


class TestErrors(CacheTest):
    def assert_status(self, cls, status, function, call):
        with self.assertRaises(cls) as ctx:
            call()
        err = ctx.exception
        self.assertIs(err.status, status)
        self.assertEqual(err.function, function)
        self.assertIn(kvcomp.status_string(status), str(err))
        return err

    def test_sequence_errors(self):
        cache = self.make()
        S = kvcomp.Status
        self.assert_status(kvcomp.KvcNotFound, S.ERR_NOT_FOUND, "kvc_seq_free",
                           lambda: cache.free(99))
        self.assertRaises(LookupError, cache.seq_info, 99)
        self.assert_status(kvcomp.KvcNotFound, S.ERR_NOT_FOUND, "kvc_seq_reserve",
                           lambda: cache.reserve(99, 1))
        self.assert_status(kvcomp.KvcNotFound, S.ERR_NOT_FOUND, "kvc_seq_fork",
                           lambda: cache.fork(99, 100))
        cache.seq_add(1)
        self.assert_status(kvcomp.KvcInvalidArgument, S.ERR_INVALID_ARGUMENT, "kvc_seq_add",
                           lambda: cache.seq_add(1))
        self.assert_status(kvcomp.KvcInvalidArgument, S.ERR_INVALID_ARGUMENT, "kvc_seq_add",
                           lambda: cache.seq_add(kvcomp.SEQ_NONE))
        self.assert_status(kvcomp.KvcInvalidArgument, S.ERR_INVALID_ARGUMENT, "kvc_seq_fork",
                           lambda: cache.fork(1, 1))
        self.assert_status(kvcomp.KvcInvalidArgument, S.ERR_INVALID_ARGUMENT, "kvc_seq_reserve",
                           lambda: cache.reserve(1, -1))
        self.assert_status(kvcomp.KvcUnsupported, S.ERR_UNSUPPORTED, "kvc_seq_swap_out",
                           lambda: cache.swap_out(1))
        # Python-side: ids and counts C could not represent never reach it.
        self.assertRaisesRegex(ValueError, "seq_id=-1", cache.seq_add, -1)
        self.assertRaisesRegex(ValueError, "2\\*\\*64", cache.free, 1 << 64)
        self.assertRaisesRegex(TypeError, "seq_id must be an integer", cache.free, "1")
        self.assertRaisesRegex(ValueError, "tokens", cache.seq_add, 5, [1, 1 << 31])
        self.assertRaisesRegex(ValueError, "n_new", cache.reserve, 1, 1 << 40)
        self.assertEqual(cache.stats()["live_seqs"], 1)
        cache.validate()

    def test_out_of_memory_changes_nothing(self):
        cache = self.make()
        cache.seq_add(1)
        cache.reserve(1, 100)
        before = (cache.seq_info(1), cache.stats(), cache.tokens_fit())
        err = self.assert_status(kvcomp.KvcOutOfMemory, kvcomp.Status.ERR_OUT_OF_MEMORY,
                                 "kvc_seq_reserve", lambda: cache.reserve(1, 100000))
        self.assertNotIsInstance(err, ValueError)
        self.assertEqual((cache.seq_info(1), cache.stats(), cache.tokens_fit()), before)
        cache.validate()

    def test_step_protocol_errors(self):
        cache = self.make()
        S = kvcomp.Status
        x = np.zeros((3, 2, 16), np.float32)
        q = np.zeros((3, 4, 16), np.float32)
        # Before any plan the binding knows no row count: it refuses with INVALID_STATE.
        self.assert_status(kvcomp.KvcInvalidState, S.ERR_INVALID_STATE, "kvc_attend",
                           lambda: cache.attend(0, q))
        self.assert_status(kvcomp.KvcInvalidState, S.ERR_INVALID_STATE, "kvc_store",
                           lambda: cache.store(0, x, x))
        cache.seq_add(1)
        cache.seq_add(2)
        cache.reserve(1, 3)
        self.assert_status(kvcomp.KvcInvalidArgument, S.ERR_INVALID_ARGUMENT, "kvc_plan",
                           lambda: cache.plan([1], 4))  # more than reserved
        self.assert_status(kvcomp.KvcNotFound, S.ERR_NOT_FOUND, "kvc_plan",
                           lambda: cache.plan([7], 1))
        self.assert_status(kvcomp.KvcInvalidArgument, S.ERR_INVALID_ARGUMENT, "kvc_plan",
                           lambda: cache.plan([1, 1], [1, 1]))  # duplicate
        self.assert_status(kvcomp.KvcInvalidArgument, S.ERR_INVALID_ARGUMENT, "kvc_plan",
                           lambda: cache.plan([], []))
        self.assertIsNone(cache.planned_rows)
        self.assertEqual(cache.plan([1], 3), 3)
        # Mid-step: attend before store, a second plan, fork/free of a planned sequence.
        self.assert_status(kvcomp.KvcInvalidState, S.ERR_INVALID_STATE, "kvc_attend",
                           lambda: cache.attend(0, q))
        self.assert_status(kvcomp.KvcInvalidState, S.ERR_INVALID_STATE, "kvc_plan",
                           lambda: cache.plan([2], 1))
        self.assert_status(kvcomp.KvcInvalidState, S.ERR_INVALID_STATE, "kvc_seq_fork",
                           lambda: cache.fork(1, 3))
        self.assert_status(kvcomp.KvcInvalidArgument, S.ERR_INVALID_ARGUMENT, "kvc_store",
                           lambda: cache.store(2, x, x))  # layer out of range
        self.assert_status(kvcomp.KvcInvalidArgument, S.ERR_INVALID_ARGUMENT, "kvc_store",
                           lambda: cache.store(-1, x, x))
        cache.store(0, x, x)
        self.assert_status(kvcomp.KvcInvalidState, S.ERR_INVALID_STATE, "kvc_store",
                           lambda: cache.store(0, x, x))  # twice
        cache.attend(0, q)
        self.assert_status(kvcomp.KvcInvalidArgument, S.ERR_INVALID_ARGUMENT, "kvc_attend",
                           lambda: cache.attend(5, q))
        cache.store(1, x, x)
        cache.attend(1, q)
        self.assertEqual(cache.seq_info(1).length, 3)
        cache.validate()

    def test_bad_tensors_never_reach_c(self):
        cache = self.make()
        spy = _Spy(cache._api)
        cache._api = spy
        cache.seq_add(1)
        cache.reserve(1, 4)
        self.assertEqual(cache.plan([1], 4), 4)
        good_kv = np.zeros((4, 2, 16), np.float32)
        good_q = np.zeros((4, 4, 16), np.float32)
        bad = [
            (TypeError, "k: expected a NumPy array of dtype numpy.float32",
             lambda: cache.store(0, good_kv.astype(np.float64), good_kv)),
            (TypeError, "v: expected a NumPy array of dtype numpy.float32",
             lambda: cache.store(0, good_kv, good_kv.astype(np.float16))),
            (ValueError, r"k: expected shape .*\[4, 2, 16\].*got \[3, 2, 16\]",
             lambda: cache.store(0, good_kv[:3], good_kv)),
            (ValueError, r"got \[4, 4, 16\]", lambda: cache.store(0, good_q, good_q)),
            (ValueError, r"got \[4, 32\]", lambda: cache.store(0, good_kv.reshape(4, 32),
                                                                good_kv)),
            (ValueError, "C-contiguous",
             lambda: cache.store(0, np.zeros((16, 2, 4), np.float32).transpose(2, 1, 0),
                                 good_kv)),
            (TypeError, "got builtins.list", lambda: cache.store(0, good_kv.tolist(), good_kv)),
            (ValueError, r"q: expected shape .*\[4, 4, 16\]", lambda: cache.attend(0, good_kv)),
            (ValueError, "out: .*got \\[4, 2, 16\\]", lambda: cache.attend(0, good_q, good_kv)),
            (TypeError, "out: expected", lambda: cache.attend(0, good_q,
                                                              good_q.astype(np.float16))),
            (ValueError, "out: array is read-only",
             lambda: cache.attend(0, good_q, np.broadcast_to(good_q, (4, 4, 16)))),
            (ValueError, "out must not overlap q", lambda: cache.attend(0, good_q, good_q)),
            (TypeError, "layer must be an integer", lambda: cache.store(0.0, good_kv, good_kv)),
        ]
        for exc, pattern, call in bad:
            with self.subTest(pattern=pattern):
                with self.assertRaisesRegex(exc, pattern) as ctx:
                    call()
                self.assertNotIsInstance(ctx.exception, kvcomp.KvcError)
        self.assertEqual([c for c in spy.calls if c in ("kvc_store", "kvc_attend")], [])
        # Arrays C could not be told the length of are checked too.
        with self.assertRaisesRegex(ValueError, "token_ids has 3 entries, the batch has 4"):
            cache.plan([1], 4, token_ids=[1, 2, 3])
        with self.assertRaisesRegex(ValueError, "num_new_tokens has 2 entries for 1 sequences"):
            cache.plan([1], [2, 2])
        self.assertEqual(spy.calls.count("kvc_plan"), 1)
        # Nothing above changed the step: the real calls still work.
        for layer in range(2):
            cache.store(layer, good_kv, good_kv)
            cache.attend(layer, good_q)
        self.assertEqual(spy.calls.count("kvc_store"), 2)


class _Spy:
    """Stands in for the CDLL and records which C functions were called."""

    def __init__(self, api):
        self._api = api
        self.calls = []

    def __getattr__(self, name):
        fn = getattr(self._api, name)

        def call(*args):
            self.calls.append(name)
            return fn(*args)
        return call


class TestObservability(CacheTest):
    def test_stats_prometheus_events(self):
        cache = self.make(codec="huffman", block_tokens=16)
        driver = Driver(self, cache, error_model=lambda k, v: (
            0.05 * float(k.max() - k.min()) * 1.0001, 0.05 * float(v.max() - v.min()) * 1.0001))
        prompt = list(range(70))
        cache.seq_add(1, prompt)
        driver.track(1)
        driver.step([(1, 70)], token_ids=prompt)  # 4 full blocks + a tail of 6
        cache.synchronize()
        stats = cache.stats()
        self.assertEqual(stats["live_seqs"], 1)
        self.assertEqual(stats["swapped_seqs"], 0)
        self.assertEqual(stats["tokens_stored"], 70)
        self.assertEqual(stats["pool_bytes"], 16 << 20)
        self.assertEqual(sum(stats["pages_by_codec"].values()), 4 * 2)  # blocks x layers
        self.assertGreater(stats["page_bytes"], 0)
        self.assertGreaterEqual(stats["page_alloc_bytes"], stats["page_bytes"])
        self.assertTrue(0.0 <= stats["fragmentation"] < 1.0)
        self.assertGreater(stats["compression_ratio"], 1.0)
        self.assertLessEqual(stats["free_bytes"], stats["pool_bytes"])
        for key, value in stats.items():
            if key != "pages_by_codec":
                self.assertGreaterEqual(value, 0, key)

        events = cache.poll_events(max_events=1)
        self.assertEqual(len(events), 1)
        events += cache.poll_events()
        self.assertEqual(len(events), 4)
        self.assertEqual(cache.poll_events(), [])
        for event in events:
            self.assertIs(event.kind, kvcomp.EventKind.BLOCK_STORED)
            self.assertNotEqual(event.block_hash, 0)  # hashed: token ids were given
        self.assertEqual(len({e.block_id for e in events}), 4)
        self.assertEqual(events.dropped, 0)

        text = cache.prometheus()
        samples = _parse_prometheus(self, text)
        self.assertEqual(samples["kvc_tokens_stored"], stats["tokens_stored"])
        self.assertEqual(samples["kvc_pool_bytes"], stats["pool_bytes"])
        self.assertEqual(samples['kvc_pages{codec="huffman"}'],
                         stats["pages_by_codec"][kvcomp.Codec.HUFFMAN])

        # Freed with prefix caching on, the full blocks stay cached; the tail goes.
        cache.free(1)
        stats = cache.stats()
        self.assertEqual((stats["live_seqs"], stats["cached_blocks"]), (0, 4))
        cache.validate()

    def test_removed_events(self):
        cache = self.make(prefix_caching=False)
        driver = Driver(self, cache)
        cache.seq_add(1)
        driver.track(1)
        driver.step([(1, 40)])
        stored = cache.poll_events()
        self.assertEqual([e.kind for e in stored], [kvcomp.EventKind.BLOCK_STORED] * 2)
        self.assertEqual([e.block_hash for e in stored], [0, 0])
        cache.free(1)
        removed = cache.poll_events()
        removed_ids = {e.block_id for e in removed if e.kind == kvcomp.EventKind.BLOCK_REMOVED}
        self.assertTrue({e.block_id for e in stored} <= removed_ids)

    def test_eviction_events(self):
        # A pool of 40 blocks' raw pages: filling it twice over with distinct prompts evicts.
        block_bytes = 2 * 2 * 16 * 16 * 4 * 2  # K+V, kv heads, head_dim, tokens, f32, layers
        cache = self.make(pool_bytes=40 * block_bytes, max_seqs=4, watermark=0.0)
        driver = Driver(self, cache)
        for seq in range(8):
            prompt = [seq * 1000 + i for i in range(5 * 16)]
            cache.seq_add(seq, prompt)
            driver.track(seq)
            driver.step([(seq, len(prompt))], token_ids=prompt, check=False)
            cache.free(seq)
        stats = cache.stats()
        self.assertGreater(stats["evictions"], 0)
        events = cache.poll_events()
        evicted = [e for e in events if e.kind == kvcomp.EventKind.BLOCK_EVICTED]
        self.assertEqual(len(evicted), stats["evictions"])
        self.assertTrue(all(e.block_hash for e in evicted))
        cache.validate()

    def test_stats_from_another_thread(self):
        cache = self.make()
        driver = Driver(self, cache)
        stop = threading.Event()
        seen = []
        failures = []

        def reader():
            try:
                while not stop.is_set():
                    seen.append(cache.stats()["tokens_stored"])
                    cache.prometheus()
            except Exception as exc:  # surfaced by the assertion below
                failures.append(exc)

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            cache.seq_add(1)
            driver.track(1)
            driver.step([(1, 33)])
            for _ in range(20):
                driver.step([(1, 1)], check=False)
        finally:
            stop.set()
            thread.join()
        self.assertEqual(failures, [])
        self.assertTrue(seen)
        self.assertEqual(seen, sorted(seen))  # a consistent, growing count
        self.assertLessEqual(seen[-1], 53)


def _parse_prometheus(test, text):
    """{name{labels}: value} of a text exposition; every line must be a comment or a sample."""
    sample = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})?) (\S+)$")
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = sample.match(line)
        test.assertIsNotNone(m, f"not a Prometheus sample line: {line!r}")
        samples[m.group(1)] = float(m.group(3))
    return samples


if __name__ == "__main__":
    unittest.main(verbosity=2)
