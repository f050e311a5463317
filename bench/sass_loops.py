#!/usr/bin/env python3
"""The v3 decode kernel's Huffman window loops as ptxas compiled them, on a machine without a GPU.

Compiles chosen attn_kernel_v3 instances alone (seconds each, where kvc_attn_cuda.cu takes
minutes) and prints, per instance, its registers and stack and, per window loop (a backward branch
over 8 to 40 LDS.U16 table lookups): its instructions, its lookups, the most lookups in flight at
once (4 at head_dim 128 when the lane's four streams run side by side), its local-memory accesses,
and the registers live at its first instruction and at its peak (nvdisasm's life ranges).

  python3 bench/sass_loops.py                      # the bench's Huffman instances
  python3 bench/sass_loops.py --threads 256        # under launch bounds of 256 threads: with two
                                                   # CTAs per SM, the 128 registers of 7 warps
  python3 bench/sass_loops.py -i 128,__half,1,true,true,64,2

-i takes attn_kernel_v3's template arguments (HD, T, NB, HUF, FAST, UT, CPS). Needs nvcc and
cuobjdump and nvdisasm, which not every toolkit install has: `pip download
nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`, unzip the wheels and set KVC_CUDA_BIN to the folder
that holds the two. bench/NOTES-attention.md (session 46) has what it showed.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = ["64,__half,1,true,false,64,2", "128,__half,1,true,false,64,2",
           "128,__nv_bfloat16,1,true,false,64,2", "256,__half,1,true,false,64,1"]
BOUNDS = "__launch_bounds__(v3_layout_of<HD, HUF, UT, CPS>::type::threads, CPS)"


def tool(name):
    d = os.environ.get("KVC_CUDA_BIN")
    path = os.path.join(d, name) if d else shutil.which(name)
    if not path or not os.path.exists(path):
        sys.exit(f"{name} not found: set KVC_CUDA_BIN (see this file's header)")
    return path


def run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{cmd[0]} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def build(tmp, instances, threads):
    """One translation unit: kvc_attn_cuda.cu up to v3's header, then the instances."""
    for d in ("attention", "compress", "include", "allocator", "scheduler_hooks"):
        shutil.copytree(os.path.join(ROOT, d), os.path.join(tmp, d))
    v3 = os.path.join(tmp, "attention", "kvc_attn_v3.cuh")
    src = open(v3).read()
    if threads:
        if BOUNDS not in src:
            sys.exit("attn_kernel_v3's launch bounds changed: update BOUNDS")
        src = src.replace(BOUNDS, f"__launch_bounds__({threads}, CPS)")
        open(v3, "w").write(src)
    head = open(os.path.join(tmp, "attention", "kvc_attn_cuda.cu")).read()
    cut = head.index('#include "attention/kvc_attn_v3.cuh"')
    tu = head[:head.index("\n", cut) + 1] + "namespace kvc_attn {\n"
    tu += "".join(f"template __global__ void attn_kernel_v3<{i}>(const params);\n"
                  for i in instances) + "}\n"
    open(os.path.join(tmp, "one.cu"), "w").write(tu)
    cubin = os.path.join(tmp, "one.cubin")
    run(shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc", "-DKVC_HAVE_CUDA=1", "-I" + tmp,
        "-I" + os.path.join(tmp, "include"), "-O2", "-DNDEBUG", "-lineinfo",
        "--expt-relaxed-constexpr", "--generate-code=arch=compute_90a,code=[sm_90a]", "-cubin",
        "-o", cubin, os.path.join(tmp, "one.cu"))
    return cubin


def instructions(text):
    """(address, instruction) of each SASS line."""
    out = []
    for line in text.split("\n"):
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?);", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def window_loops(ins):
    """(first, last) indices of the backward branches' bodies that hold 8..40 lookups."""
    at = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (a, t) in enumerate(ins):
        m = re.search(r"BRA\b.*0x([0-9a-f]+)\s*$", t)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in at:
            j = at[int(m.group(1), 16)]
            if 8 <= sum("LDS.U16" in x for _, x in ins[j:i + 1]) <= 40 and i - j < 400:
                loops.append((j, i))
    return loops


def in_flight(body):
    """The most lookups whose results no later instruction has read yet."""
    pending, most = set(), 0
    for _, t in body:
        ops = t.split(",", 1)[1] if "," in t else ""
        pending -= {int(r) for r in re.findall(r"\bR(\d+)\b", ops)}
        m = re.match(r"(?:@\S+\s+)?LDS\.U16\s+R(\d+)", t)
        if m:
            pending.add(int(m.group(1)))
            most = max(most, len(pending))
    return most


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-i", "--instance", action="append", help="HD,T,NB,HUF,FAST,UT,CPS")
    ap.add_argument("--threads", type=int, help="launch bounds of this many threads")
    a = ap.parse_args()
    cuobjdump, nvdisasm = tool("cuobjdump"), tool("nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = build(tmp, a.instance or DEFAULT, a.threads)
        usage = run(cuobjdump, "-res-usage", cubin)
        sass = run(cuobjdump, "-sass", cubin)
        lives = run(nvdisasm, "-plr", "-lrm", "count", cubin)
    regs = {m.group(1): (m.group(2), m.group(3))
            for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+)", usage)}
    live, fn = {}, None
    for line in lives.split("\n"):
        if line.startswith(".text."):
            fn = line.split(":")[0][len(".text."):]
        m = re.match(r"\s+/\*([0-9a-f]+)\*/.*?;\s*//\s*\|\s*(\d+)", line)
        if m and fn:
            live.setdefault(fn, {})[int(m.group(1), 16)] = int(m.group(2))
    for part in re.split(r"\n\s+Function : ", sass)[1:]:
        name = part.split("\n")[0].strip()
        ins = instructions(part)
        short = re.sub(r"_ZN8kvc_attn14attn_kernel_v3I(.*)EEvNS_6paramsE", r"\1", name)
        r, s = regs.get(name, ("?", "?"))
        print(f"{short}: {r} registers, {s} bytes of stack")
        lv = live.get(name, {})
        for j, i in window_loops(ins):
            body = ins[j:i + 1]
            peak = max(lv.get(x, 0) for x, _ in body)
            print(f"  loop at {ins[j][0]:#x}: {len(body)} instructions, "
                  f"{sum('LDS.U16' in t for _, t in body)} lookups, {in_flight(body)} in flight, "
                  f"{sum(('LDL' in t or 'STL' in t) for _, t in body)} local accesses, "
                  f"{lv.get(ins[j][0], '?')} registers live at entry, {peak} at peak")


if __name__ == "__main__":
    main()
