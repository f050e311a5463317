#!/usr/bin/env python3
"""Regenerates bench/RESULTS.md and its plots from the benchmark records in bench/results/.

Each file bench/results/*.jsonl holds JSON lines {"machine", "date", "command", "result"}, where
result is the JSON line a benchmark printed last (bench/record.sh writes them). For every benchmark
the page shows the latest record of each (machine, command), with the machine, date and command of
each figure, and checks the targets of issue 8 where the figures allow. Plots (PNG, matplotlib) go
to bench/results/: capacity by codec and context, decode-step throughput, and the accuracy Pareto
front of `./kvc eval`.

    ./kvc results                 # write bench/RESULTS.md (and the plots)
    python3 bench/results.py --eval-target
                                  # print "BITS<Tab>SOURCE": kvcomp Huffman's bits per value at the
                                  # default bound from the latest eval record, then one line
                                  # "NAME:KV_HEADS:HEAD_DIM:BITS" per model (for capacity.sh)
"""
import argparse
import datetime
import glob
import hashlib
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
PAGE = os.path.join(HERE, "RESULTS.md")

CAPACITY_ORDER = ["fp16", "fp8-e4m3", "kivi-4", "kivi-2", "kvcomp-bitpack", "kvcomp-huffman",
                  "kvcomp-huffman-kivi-acc"]
STEP_ORDER = ["raw", "bitpack", "huffman"]


def load_records(directory):
    """Every well-formed record, oldest first; malformed lines are reported and skipped."""
    records = []
    for path in sorted(glob.glob(os.path.join(directory, "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec.get("result"), dict):
                        raise ValueError("no result object")
                    for key in ("machine", "date", "command"):
                        rec[key] = str(rec.get(key, "?"))
                except ValueError as e:
                    print(f"results: {os.path.basename(path)}:{n}: skipped ({e})", file=sys.stderr)
                    continue
                rec["file"] = os.path.basename(path)
                records.append(rec)
    records.sort(key=lambda r: r["date"])
    return records


def kind_of(rec):
    result = rec["result"]
    if isinstance(result.get("bench"), str):
        return result["bench"]
    if re.search(r"\beval\b", rec["command"]):
        return "eval"
    return "other"


def latest_per_setup(records):
    """The latest record of each (machine, command), in date order."""
    latest = {}
    for rec in records:
        latest[(rec["machine"], rec["command"])] = rec
    return sorted(latest.values(), key=lambda r: r["date"])


def provenance(rec):
    return f"{rec['machine']} · {rec['date']} · `{rec['command']}` · [{rec['file']}](results/{rec['file']})"


def slug(*parts):
    return re.sub(r"[^A-Za-z0-9]+", "-", "-".join(str(p) for p in parts)).strip("-").lower()


def plot_name(kind, rec):
    """A file name per (machine, command): records of different setups get different plots."""
    res = rec["result"]
    tag = hashlib.sha1(f"{rec['machine']}|{rec['command']}".encode()).hexdigest()[:8]
    return f"{kind}-{slug(res.get('backend', ''), res.get('shape', ''))}-{tag}.png".replace("--", "-")


def fmt(v, digits=3):
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return out


def check(ok, text):
    return f"- {'✅' if ok else '❌'} {text}"


# ---- evaluation records (./kvc eval) ---------------------------------------------------------

def eval_models(result):
    """[(model name, rows, default)] from an eval JSON line, whatever its nesting: any object with
    a `rows` list is a model; its name is its `model`/`name` field or the key it sits under."""
    found = []

    def walk(node, key):
        if isinstance(node, dict):
            if isinstance(node.get("rows"), list):
                name = node.get("model") or node.get("name") or key or "model"
                found.append((os.path.basename(str(name)), node["rows"], node.get("default")))
                return
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)

    walk(result, None)
    return found


# Page shapes (kv heads, head_dim) of the shared models (../shared/models/README.md), for eval
# records that do not carry them.
KNOWN_SHAPES = {"stories260K": (4, 8), "babyllama-tok105": (4, 16)}


def eval_target(records):
    """Bits per value of kvcomp Huffman at the default bound, from the latest eval record: the
    largest over its models (the conservative choice for capacity); and per model with a known
    page shape, (name, kv heads, head_dim, bits)."""
    evals = [r for r in records if kind_of(r) == "eval"]
    if evals:
        rec = evals[-1]
    else:
        # No recorded eval: the study `./kvc eval` leaves in the runner's results folder.
        path = os.path.join(HERE, "runner", "results", "eval.json")
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError):
            return None
        date = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
        rec = {"result": result, "date": date.strftime("%Y-%m-%dT%H:%M:%SZ"),
               "file": os.path.relpath(path, os.path.dirname(HERE))}
    best, checks = None, []
    for name, _, default in eval_models(rec["result"]):
        if not (isinstance(default, dict) and isinstance(default.get("bits_per_value"), (int, float))):
            continue
        bits = float(default["bits_per_value"])
        if best is None or bits > best[0]:
            best = (bits, name)
        shape = KNOWN_SHAPES.get(name)
        if shape:
            checks.append((name, shape[0], shape[1], bits))
    if best is None:
        return None
    source = f"./kvc eval default on {best[1]}, {rec['date']}, {rec['file']}"
    return best[0], source, checks


# ---- plots -------------------------------------------------------------------------------------

def plotting():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def grouped_bars(ax, rows, order, value, label_fmt):
    """One group of bars per context and one bar per codec in it (codecs in `order`), of r[value]."""
    contexts = sorted({r["context"] for r in rows})
    codecs = [c for c in order if any(r["codec"] == c for r in rows)]
    width = 0.8 / max(1, len(codecs))
    for i, codec in enumerate(codecs):
        xs, ys = [], []
        for j, ctx in enumerate(contexts):
            for r in rows:
                if r["codec"] == codec and r["context"] == ctx:
                    xs.append(j + (i - (len(codecs) - 1) / 2) * width)
                    ys.append(r[value])
        bars = ax.bar(xs, ys, width, label=codec)
        ax.bar_label(bars, fmt=label_fmt, fontsize=7, padding=1)
    ax.set_xticks(range(len(contexts)), [f"{c // 1024}k" for c in contexts])
    ax.set_xlabel("context (tokens)")


def plot_capacity(plt, rec, path):
    fig, ax = plt.subplots(figsize=(8, 4.2))
    grouped_bars(ax, rec["result"]["rows"], CAPACITY_ORDER, "sequences", "%g")
    ax.set_ylabel("sequences admitted")
    ax.set_yscale("log")
    res = rec["result"]
    ax.set_title(f"Capacity, {res.get('shape', '?')}, {res.get('pool_gib', '?')} GiB KV pool "
                 f"({res.get('backend', '?')})", fontsize=10)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_step(plt, rec, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    grouped_bars(ax, rec["result"]["rows"], STEP_ORDER, "tokens_per_s", "%.0f")
    ax.set_ylabel("decode tokens/s per GPU, at capacity")
    res = rec["result"]
    ax.set_title(f"Decode step at capacity, {res.get('shape', '?')}, {res.get('layers_run', '?')} "
                 f"of {res.get('model_layers', '?')} layers ({res.get('backend', '?')})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FAMILY_COLORS = {"raw": "tab:gray", "fp8": "tab:orange", "kivi": "tab:green", "bitpack": "tab:purple",
                 "huffman": "tab:blue", "other": "tab:brown"}


def family(row):
    """Codec family of an eval row, from its `family` field when it has one, else its name."""
    n = f"{row.get('family', '')} {row.get('name', '')}".lower()
    if "default" in n:
        return "huffman" if "huffman" in n else "bitpack" if "bitpack" in n else "other"
    for fam in ("huffman", "bitpack", "bit-pack", "kivi", "fp8", "raw", "fp16", "exact"):
        if fam in n:
            return {"bit-pack": "bitpack", "fp16": "raw", "exact": "raw"}.get(fam, fam)
    return "other"


def pareto_front(points):
    """Points (bits, change) not dominated by one with fewer bits and a smaller change."""
    front, best = [], float("inf")
    for b, c in sorted(points):
        if c < best:
            front.append((b, c))
            best = c
    return front


def plot_pareto(plt, rec, path):
    models = eval_models(rec["result"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, (name, rows, default) in zip(axes[0], models):
        pts = [(r["bits_per_value"], 100.0 * r["ppl_change"], family(r)) for r in rows
               if isinstance(r.get("bits_per_value"), (int, float))
               and isinstance(r.get("ppl_change"), (int, float))]
        for fam in sorted({p[2] for p in pts}):
            sel = [p for p in pts if p[2] == fam]
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], label=fam, s=22,
                       c=FAMILY_COLORS[fam])
        front = pareto_front([(p[0], p[1]) for p in pts])
        if front:
            ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
        if isinstance(default, dict) and "bits_per_value" in default and "ppl_change" in default:
            ax.scatter([default["bits_per_value"]], [100.0 * default["ppl_change"]], marker="*",
                       s=180, facecolors="none", edgecolors="red", zorder=5, label="default")
        ax.set_xlabel("bits per value (every stored byte)")
        ax.set_ylabel("perplexity change (%)")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- sections ----------------------------------------------------------------------------------

def kivi4_accuracy(eval_rec):
    """[(model, default row, KIVI 4-bit row)] from an eval record, for the accuracy half of the
    capacity target."""
    out = []
    for name, rows, default in eval_models(eval_rec["result"]):
        kivi = [r for r in rows if family(r) == "kivi" and re.search(r"\b4[- ]?bit", str(r.get("name", "")))]
        if isinstance(default, dict) and kivi and isinstance(default.get("ppl_change"), (int, float)):
            out.append((name, default, kivi[0]))
    return out


def capacity_section(recs, plt, plots, eval_rec):
    out = ["## Capacity: sequences admitted by a fixed KV pool", "",
           "`./kvc bench capacity`: sequences of each context admitted until `kvc_seq_reserve` "
           "refuses (chunked prefill), kvcomp rows measured on a real cache, fp8/KIVI rows from "
           "the same admission over their exact bytes per block. See the benchmark's own output "
           "for the data calibration and scale.", ""]
    for rec in recs:
        res = rec["result"]
        k = res.get("token_scale", 1)
        out += [f"### {res.get('shape', '?')}, {res.get('pool_gib', '?')} GiB pool, "
                f"{res.get('backend', '?')} backend, {res.get('layers_run', '?')} of "
                f"{res.get('model_layers', '?')} layers" + (f", context/{k}" if k != 1 else ""),
                "", provenance(rec), ""]
        checks = res.get("eval_checks", [])
        calibrated_at_models = any("used" in c for c in checks)
        out.append(f"Scale: {res.get('layers_run', '?')} of {res.get('model_layers', '?')} layers"
                   + (f", sequences of context/{k} tokens" if k != 1 else "")
                   + f", pool {res.get('pool_bytes_run', 0) / 2**20:.1f} MiB (the full pool scaled "
                   f"alike; pages keep their real shape, so the sequences admitted are the full "
                   f"model's); bounds {res.get('bound_mode', '?')} K {res.get('k_bound', '?')} "
                   f"V {res.get('v_bound', '?')}.")
        if calibrated_at_models:
            # Data calibrated at each real model's own page shape (bench_capacity --check).
            for c in checks:
                out.append(f"Data calibrated at {c['model']}'s page shape ({c['num_kv_heads']} kv "
                           f"heads, head_dim {c['head_dim']}) to the {c['eval_bits']:.3f} "
                           f"bits/value `./kvc eval` measured on its real K/V (measured "
                           f"{c['synthetic_bits']:.3f}); at this shape they measure "
                           f"{c['bits_at_run_shape']:.3f}"
                           + (" — used (the least compressible here)." if c.get("used") else "."))
        else:
            out.append(f"Data calibrated to {fmt(res.get('target_bits'))} bits/value "
                       f"({res.get('target_source', '?')}) at this shape, measured "
                       f"{fmt(res.get('calibrated_bits'))}.")
            target, got = res.get("target_bits"), res.get("calibrated_bits")
            if isinstance(target, (int, float)) and isinstance(got, (int, float)) and abs(got - target) > 0.02 * target:
                out.append(f"The target is out of reach at this page shape and bound; the data used "
                           f"are the {'least' if got < target else 'most'} compressible the "
                           f"generator makes.")
            for c in checks:
                out.append(f"At {c['model']}'s own page shape ({c['num_kv_heads']} kv heads, "
                           f"head_dim {c['head_dim']}) the same data measure "
                           f"{c['synthetic_bits']:.3f} bits/value against {c['eval_bits']:.3f} for "
                           f"its real K/V in `./kvc eval`: "
                           + ("they compress no better than real data (conservative)."
                              if c["synthetic_bits"] >= c["eval_bits"] else
                              "they compress better than real data (optimistic)."))
        out.append("")
        rows = sorted(res["rows"], key=lambda r: (r["context"], CAPACITY_ORDER.index(r["codec"])
                                                   if r["codec"] in CAPACITY_ORDER else 99))
        out += table(["context", "codec", "how", "sequences", "tokens", "bits/value",
                      "pool bits/value", "vs fp16 (kvcomp raw)", "vs ideal fp16"],
                     [[f"{r['context'] // 1024}k", r["codec"], r.get("method", ""), r["sequences"],
                       r.get("tokens", ""), r.get("bits_per_value"), r.get("pool_bits_per_value"),
                       f"{r.get('ratio_vs_fp16', 0):.2f}×",
                       f"{r.get('ratio_vs_fp16_accounted', 0):.2f}×"] for r in rows])
        out += ["", "bits/value: page bytes per value (headers, scales, codebooks included); pool "
                "bits/value: pool chunks occupied per value held; ideal fp16: the fp8/KIVI byte "
                "accounting applied to plain fp16 blocks (no page header, no chunk rounding).", ""]
        by = {(r["codec"], r["context"]): r for r in rows}
        if ("kvcomp-huffman", 32768) in by and ("fp16", 32768) in by:
            huff, fp16 = by[("kvcomp-huffman", 32768)], by[("fp16", 32768)]
            ratio = huff["sequences"] / fp16["sequences"] if fp16["sequences"] else 0
            ideal = huff.get("ratio_vs_fp16_accounted")
            out.append(check(ratio >= 4.0, f"32k: kvcomp Huffman admits {ratio:.2f}× the sequences "
                             "of fp16 paged (kvcomp raw pages; target ≥ 4×)"
                             + (f"; {ideal:.2f}× an ideal fp16 allocator's" if ideal else "")))
            if ("kivi-4", 32768) in by:
                kivi = by[("kivi-4", 32768)]
                out.append(check(huff["sequences"] > kivi["sequences"],
                                 f"32k: kvcomp Huffman {huff['sequences']} vs KIVI-4 "
                                 f"{kivi['sequences']} sequences (target: more)"))
                for model, default, k4 in (kivi4_accuracy(eval_rec) if eval_rec else []):
                    out.append(check(default["ppl_change"] <= k4["ppl_change"],
                                     f"{model} (`./kvc eval`, {eval_rec['date']}): default "
                                     f"Δppl {100 * default['ppl_change']:+.3f}% vs KIVI-4 "
                                     f"{100 * k4['ppl_change']:+.3f}% (target: no worse)"))
                if ("kvcomp-huffman-kivi-acc", 32768) in by:
                    acc = by[("kvcomp-huffman-kivi-acc", 32768)]
                    out.append(check(acc["sequences"] > kivi["sequences"],
                                     f"32k, at accuracy no worse than KIVI-4 (relative K 0.03 / V 0.04): "
                                     f"kvcomp Huffman {acc['sequences']} vs KIVI-4 "
                                     f"{kivi['sequences']} sequences "
                                     f"({acc.get('ratio_vs_fp16', 0):.2f}× fp16)"))
            out.append("")
        if plt:
            name = plot_name("capacity", rec)
            plot_capacity(plt, rec, os.path.join(RESULTS_DIR, name))
            plots.append(name)
            out += [f"![capacity](results/{name})", ""]
    return out


def step_section(recs, plt, plots):
    out = ["## Decode step at capacity", "",
           "`./kvc bench step`: one full decode step (plan, store of one token per sequence, "
           "attention, every layer run) with each codec's cache filled to its capacity; "
           "tokens/s = sequences / median step time.", ""]
    for rec in recs:
        res = rec["result"]
        shared = res.get("shared_prefix") or 0
        out += [f"### {res.get('shape', '?')}, {res.get('pool_gib', '?')} GiB pool, "
                f"{res.get('backend', '?')} backend"
                + (f", every sequence sharing a {shared}-token prefix" if shared else ""), "",
                provenance(rec), ""]
        out.append(f"Layers run: {res.get('layers_run', '?')} of {res.get('model_layers', '?')}; "
                   f"{res.get('warmup', '?')} warm-up + {res.get('steps', '?')} timed steps, timed "
                   f"with {res.get('timer', '?')}.")
        out.append("")
        rows = sorted(res["rows"], key=lambda r: (r["context"], STEP_ORDER.index(r["codec"])
                                                   if r["codec"] in STEP_ORDER else 99))
        out += table(["context", "codec", "sequences", "bits/value", "median step ms",
                      "mean step ms", "tokens/s", "tokens/s (mean)", "vs raw"],
                     [[f"{r['context'] // 1024}k", r["codec"], r["sequences"],
                       r.get("bits_per_value"), r.get("step_ms_median"), r.get("step_ms_mean"),
                       f"{r.get('tokens_per_s', 0):.0f}", f"{r.get('tokens_per_s_amortized', 0):.0f}",
                       f"{r.get('speedup_vs_raw', 0):.2f}×"] for r in rows])
        out.append("")
        by = {(r["codec"], r["context"]): r for r in rows}
        full = res.get("layers_run") == res.get("model_layers") and res.get("backend") == "cuda"
        if shared:
            out.append("- The issue's targets are judged without a shared prefix (the record "
                       "above it).")
        for codec, target in (("bitpack", 2.0), ("huffman", 1.0)):
            if (codec, 32768) in by and ("raw", 32768) in by and full and not shared:
                s = by[(codec, 32768)].get("speedup_vs_raw", 0)
                out.append(check(s >= target, f"32k: {codec} at capacity {s:.2f}× raw's tokens/s "
                                 f"(target ≥ {target:g}×)"))
        if not full:
            out.append("- Targets are judged on the CUDA backend with every layer run only.")
        out.append("")
        if plt:
            name = plot_name("step", rec)
            plot_step(plt, rec, os.path.join(RESULTS_DIR, name))
            plots.append(name)
            out += [f"![step throughput](results/{name})", ""]
    return out


def eval_section(recs, plt, plots):
    out = ["## Accuracy against size (`./kvc eval`)", "",
           "Perplexity change and top-1 agreement against raw, by bits per value with every stored "
           "byte counted.", ""]
    for rec in recs:
        out += [provenance(rec), ""]
        for name, rows, default in eval_models(rec["result"]):
            out += [f"### {name}", ""]
            out += table(["setting", "ppl", "ppl change", "agreement", "bits/value"],
                         [[r.get("name", "?"), r.get("ppl"),
                           f"{100 * r['ppl_change']:+.2f}%" if isinstance(r.get("ppl_change"), (int, float)) else "?",
                           r.get("agreement"), r.get("bits_per_value")] for r in rows])
            if isinstance(default, dict):
                change = default.get("ppl_change")
                out += ["", f"Default setting: {default.get('name', '?')}, "
                        f"{fmt(default.get('bits_per_value'))} bits/value, perplexity change "
                        + (f"{100 * change:+.2f}%" if isinstance(change, (int, float)) else "?") + "."]
            out.append("")
        if plt and eval_models(rec["result"]):
            name = plot_name("pareto", rec)
            plot_pareto(plt, rec, os.path.join(RESULTS_DIR, name))
            plots.append(name)
            out += [f"![accuracy Pareto front](results/{name})", ""]
    return out


def codec_section(recs, plt, plots):
    out = ["## Codec (`./kvc bench codec`)", "",
           "CPU rows: bits per value with every page byte counted and the largest error over the "
           "bound (<= 1 is the contract). GPU rows: compression and standalone decompression "
           "throughput of a 1 GiB fp16 prefill batch (GB/s of fp16 input, median of the timed "
           "launches), and whether the GPU pages equal the CPU encoder's byte for byte.", ""]
    for rec in recs:
        out += [provenance(rec), ""]
        rows = rec["result"].get("rows", [])
        gpu = [r for r in rows if r.get("backend") == "cuda"]
        cpu = [r for r in rows if r.get("backend") != "cuda"]
        if gpu:
            out += table(["codec", "mode", "bound", "bits/value", "compress GB/s",
                          "decompress GB/s", "max err / bound", "pages = CPU's"],
                         [[r.get("codec"), r.get("mode"), r.get("bound"), r.get("bits_per_value"),
                           r.get("compress_gbps"), r.get("decompress_gbps"),
                           r.get("max_err_over_bound"),
                           {True: "yes", False: "NO"}.get(r.get("pages_match_cpu"), "?")]
                          for r in gpu])
            out.append("")
            best = max((r.get("compress_gbps", 0) for r in gpu if r.get("codec") == "huffman"
                        and r.get("mode") == "rel" and r.get("bound") == 0.05), default=None)
            if best is not None:
                out += [check(best >= 200, f"Huffman relative 0.05 compresses at {best:.0f} GB/s "
                              "(target >= 200 GB/s on an H200)"), ""]
        if cpu:
            out += table(["data", "codec", "mode", "bound", "bits/value", "ratio vs fp16",
                          "max err / bound", "KIVI-4 bits/value"],
                         [[r.get("data"), r.get("codec"), r.get("mode"), r.get("bound"),
                           r.get("bits_per_value"), r.get("ratio_vs_fp16"),
                           r.get("max_err_over_bound"), r.get("kivi4_bits_per_value")]
                          for r in cpu])
            out.append("")
    return out


ATTN_IMPLS = [("torch_sdpa", "torch SDPA"), ("kvcomp_fp16_paged", "fp16 paged"),
              ("kvcomp_fp16_raw", "fp16 paged, raw-codec pages"), ("kvcomp_bitpack", "bit-pack"),
              ("kvcomp_huffman", "Huffman"),
              ("kvcomp_huffman_any", "Huffman, any-codec instance"),
              ("kvcomp_bitpack_any", "bit-pack, any-codec instance"),
              ("kvcomp_bitpack_any_2pass", "bit-pack, any-codec, two passes"),
              ("kvcomp_huffman_any_2pass", "Huffman, any-codec, two passes"),
              ("kvcomp_bf16_paged", "bf16 paged"), ("kvcomp_bitpack_bf16", "bit-pack, bf16"),
              ("kvcomp_bitpack_bf16_any", "bit-pack, bf16, any-codec instance"),
              ("kvcomp_bitpack_bf16_any_2pass", "bit-pack, bf16, any-codec, two passes"),
              ("kvcomp_huffman_bf16", "Huffman, bf16"), ("cublas", "cuBLAS"),
              ("kvcomp_fp16_paged_v2", "fp16 paged v2"), ("kvcomp_bitpack_v2", "bit-pack v2"),
              ("kvcomp_huffman_v2", "Huffman v2")]
# The targets, speed-up over SDPA at context >= 32k and batch >= 8.
ATTN_TARGETS = [("kvcomp_fp16_paged", "fp16 paged", 0.9),
                ("kvcomp_fp16_raw", "fp16 paged, raw-codec pages", 0.9),
                ("kvcomp_bitpack", "bit-pack", 2.5), ("kvcomp_huffman", "Huffman", 1.0)]


def attention_section(recs, plt, plots):
    out = ["## Attention (`./kvc bench attention`)", "",
           "Decode attention over the same logical KV (32 query heads, 8 kv heads, head_dim 128 "
           "unless a record says otherwise: `--head-dim 64|256`) in each layout: kvcomp's decode kernel over fp16, bit-pack and Huffman pages (and its "
           "older kernel v2), cuBLAS (matmul, softmax, matmul) and torch SDPA over dense fp16. "
           "Cells: median ms of CUDA-event timings after warm-up (speed-up over SDPA). Error vs "
           "fp16: relative L2 distance of the output from cuBLAS attention over the dense fp16 KV: "
           "rounding only for fp16 pages, and for the codecs their loss at the default bounds on "
           "this random data, not a kernel error (each kernel's agreement with the CPU reference "
           "on the same pages is what `gpu_test_attn` checks).", ""]
    for rec in recs:
        res = rec["result"]
        rows = [r for r in res.get("rows", [])
                if not r.get("prefix") and r.get("qrows", 1) == 1]
        by = {(r["impl"], r["batch"], r["context"]): r for r in rows}
        shapes = sorted({(r["batch"], r["context"]) for r in rows},
                        key=lambda s: (s[0] * s[1], s[0]))
        impls = [(i, n) for i, n in ATTN_IMPLS if any(k[0] == i for k in by)]
        ceil = f"Copy ceiling (read + write): {fmt(res.get('copy_tbps'), 2)} TB/s"
        if res.get("read_ceiling_tbps"):
            ceil += f"; read ceiling (loads only): {fmt(res['read_ceiling_tbps'], 2)} TB/s"
        if res.get("sustain_ms"):
            ceil += (f". Sustained: each timed loop after ~{res['sustain_ms']:g} ms of the same "
                     "calls (KVC_BENCH_SUSTAIN_MS: the GPU at its power cap)")
        hd = res.get("head_dim", 128)
        out += [provenance(rec), "", (f"head_dim {hd}. " if hd != 128 else "") + ceil + ".", ""]

        def speedup(impl, b, c):
            """Over SDPA, from the two times (the record's speedup_vs_sdpa is rounded)."""
            r, ref = by.get((impl, b, c)), by.get(("torch_sdpa", b, c))
            return ref["ms"] / r["ms"] if r and ref and r.get("ms") else None

        def cell(impl, b, c):
            r, sp = by.get((impl, b, c)), speedup(impl, b, c)
            if not r:
                return ""
            return f"{r['ms']:.3f}" + (f" ({sp:.2f}×)" if sp else "")

        errs = {}
        for r in rows:
            if r.get("rel_err_vs_fp16") and not r["impl"].endswith("_v2"):
                errs.setdefault(r["impl"], []).append(r["rel_err_vs_fp16"])
        out += table(["batch, context"] + [n for _, n in impls],
                     [[f"{b}, {c // 1024}k"] + [cell(i, b, c) for i, _ in impls]
                      for b, c in shapes])
        out.append("")
        if errs:
            out += ["Error vs fp16: " + "; ".join(
                f"{n} {min(errs[i]):.2g}-{max(errs[i]):.2g}" for i, n in ATTN_IMPLS if i in errs)
                + ".", ""]
        for impl, name, target in ATTN_TARGETS if hd == 128 else []:
            for b, c in shapes:
                sp = speedup(impl, b, c)
                if sp and c >= 32768 and b >= 8:
                    out.append(check(sp >= target, f"({b}, {c // 1024}k): {name} {sp:.2f}× SDPA "
                                     f"(target ≥ {target}×)"))
        out.append("")
        out += shared_prefix_table([r for r in res.get("rows", []) if r.get("prefix")])
        out += multi_query_table([r for r in res.get("rows", []) if r.get("qrows", 1) > 1])
    return out


def multi_query_table(rows):
    """Several query rows per sequence (speculative tokens): each pool with its cache's codec mask
    (the launcher's choice between v3's tiles of 8 query entries and v2's larger tiles) against
    the same pool on v2 (*_v2)."""
    if not rows:
        return []
    by = {(r["impl"], r["batch"], r["context"], r["qrows"]): r for r in rows}
    shapes = sorted({(r["batch"], r["context"], r["qrows"]) for r in rows})
    pools = [("kvcomp_fp16_paged", "fp16 paged"), ("kvcomp_bitpack", "bit-pack"),
             ("kvcomp_huffman", "Huffman")]

    def cell(pool, b, c, q):
        v2, run = by.get((pool + "_v2", b, c, q)), by.get((pool, b, c, q))
        if not v2 or not run:
            return ""
        text = f"{v2['ms']:.3f} → {run['ms']:.3f} ({v2['ms'] / run['ms']:.2f}×"
        sdpa = by.get(("torch_sdpa", b, c, q))
        return text + (f"; {sdpa['ms'] / run['ms']:.2f}× SDPA)" if sdpa else ")")

    def sdpa_ms(b, c, q):
        r = by.get(("torch_sdpa", b, c, q))
        return f"{r['ms']:.3f}" if r else ""

    out = ["Several query rows per sequence (speculative tokens and prefill chunks, the last "
           "rows of each sequence, causal; 4 query heads per kv head, so 4 query entries per "
           "row): ms on the older kernel v2 → with the launcher's choice between v3 over query "
           "tiles of 8 entries and v2's tiles of 16-64 (speed-up over v2; over torch SDPA on "
           "dense fp16 with the same rows, unmasked).", ""]
    out += table(["batch, context, query rows", "torch SDPA"] + [n for _, n in pools],
                 [[f"{b}, {c // 1024}k, {q}", sdpa_ms(b, c, q)] +
                  [cell(p, b, c, q) for p, _ in pools] for b, c, q in shapes])
    out.append("")
    return out


def shared_prefix_table(rows):
    """Batches whose sequences share a prefix: each pool read per sequence (*_prefix), and with
    the launcher's choice (*_auto: cascade attention where its cost model expects a gain)."""
    if not rows:
        return []
    by = {(r["impl"], r["batch"], r.get("groups", 1), r["prefix"]): r for r in rows}
    shapes = sorted({(r.get("groups", 1), r["batch"], r["prefix"], r["context"]) for r in rows})
    pools = [("kvcomp_fp16_paged", "fp16 paged"), ("kvcomp_bitpack", "bit-pack"),
             ("kvcomp_huffman", "Huffman")]

    def cell(pool, g, b, pre):
        base, auto = by.get((pool + "_prefix", b, g, pre)), by.get((pool + "_auto", b, g, pre))
        forced = by.get((pool + "_cascade", b, g, pre))
        if not base or not auto:
            return ""
        text = f"{base['ms']:.3f} → {auto['ms']:.3f} ({base['ms'] / auto['ms']:.2f}×)"
        if forced and abs(forced["ms"] - auto["ms"]) > 0.02 * auto["ms"]:
            text += f"; forced {forced['ms']:.3f}"
        return text

    out = ["Sequences sharing prefixes (the batch in groups whose sequences' first blocks are "
           "the same blocks: one group, a system prompt; several, e.g. parallel sampling): ms "
           "with every sequence reading its prefix → with the plan's choice, which reads each "
           "group's prefix once for the group (cascade attention) where its cost model expects a "
           "gain (speed-up); \"forced\": the cascade where the plan declines it.", ""]
    out += table(["batch (groups), prefix + own tokens"] + [n for _, n in pools],
                 [[f"{b} ({g}), {pre // 1024}k + {c - pre}"] +
                  [cell(p, g, b, pre) for p, _ in pools] for g, b, pre, c in shapes])
    out.append("")
    return out


def other_section(kind, recs):
    out = [f"## {kind}", ""]
    for rec in recs:
        out += [provenance(rec), ""]
        rows = rec["result"].get("rows")
        if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
            keys = []
            for r in rows:
                keys += [k for k in r if k not in keys and not isinstance(r[k], (dict, list))]
            out += table(keys, [[r.get(k, "") for k in keys] for r in rows])
        else:
            out += ["```json", json.dumps(rec["result"], indent=1)[:4000], "```"]
        out.append("")
    return out


def write_page(records):
    plt = plotting()
    plots = []
    by_kind = {}
    for rec in records:
        by_kind.setdefault(kind_of(rec), []).append(rec)
    lines = ["# kvcomp benchmark results", "",
             "Generated by `./kvc results` from the records in [bench/results/](results/) "
             f"({len(records)} records); do not edit by hand. Each figure names the machine, date "
             "and command it came from; `bench/record.sh bench NAME [ARGS]` (or `bench/record.sh "
             "eval`) reruns one and keeps its record.", ""]
    if not plt:
        lines += ["Plots were not drawn: matplotlib is not installed (`python3 -m pip install "
                  "matplotlib`).", ""]
    if not records:
        lines += ["No records yet.", ""]
    sections = {"step": step_section, "eval": eval_section, "codec": codec_section,
                "attention": attention_section}
    eval_rec = by_kind["eval"][-1] if "eval" in by_kind else None
    for kind in ("capacity", "step", "attention", "eval", "codec"):
        if kind not in by_kind:
            continue
        recs = latest_per_setup(by_kind[kind])
        if kind == "capacity":
            lines += capacity_section(recs, plt, plots, eval_rec)
        else:
            lines += sections[kind](recs, plt, plots)
    for kind in sorted(k for k in by_kind if k not in sections and k != "capacity"):
        lines += other_section(kind, latest_per_setup(by_kind[kind]))
    with open(PAGE, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return plots


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval-target", action="store_true",
                    help="print BITS<TAB>SOURCE for capacity.sh and exit (nothing when no eval)")
    args = ap.parse_args()
    records = load_records(RESULTS_DIR)
    if args.eval_target:
        target = eval_target(records)
        if target:
            print(f"{target[0]:.4f}\t{target[1]}")
            for name, heads, head_dim, bits in target[2]:
                print(f"{name}:{heads}:{head_dim}:{bits:.4f}")
        return 0
    plots = write_page(records)
    # Plots of records no longer shown are stale: the page is the only thing that links them.
    for path in glob.glob(os.path.join(RESULTS_DIR, "*.png")):
        if re.match(r"(capacity|step|pareto)-", os.path.basename(path)) and \
                os.path.basename(path) not in plots:
            os.remove(path)
    print(f"results: wrote {os.path.relpath(PAGE)} from {len(records)} records"
          + (f" and {len(plots)} plots" if plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
