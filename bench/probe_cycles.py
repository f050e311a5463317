#!/usr/bin/env python3
"""Sums a probe build's cycle accounts (attention/kvc_attn_probe.cuh) over the consumer warps of
one kvc_attn_cuda call: each region's share of the warps' loops and its cycles per page or item.

Usage: bench/probe_cycles.py FILE [LABEL]   (FILE: what KVC_PROBE_OUT received)
"""
import sys

REGIONS = ['wait', 'setup', 'qk', 'prep', 'slabs', 'claim']  # columns 1-6, then loop items pages


def main():
    path = sys.argv[1]
    label = sys.argv[2] if len(sys.argv) > 2 else path
    rows = [list(map(int, ln.split())) for ln in open(path) if ln.strip()]
    if not rows:
        sys.exit('%s: no warps' % path)
    cols = [sum(r[i] for r in rows) for i in range(1, 10)]
    loop, items, pages = cols[6], max(cols[7], 1), max(cols[8], 1)
    other = loop - sum(cols[:6])
    share = ' '.join('%s %.1f%%' % (n, 100.0 * c / loop) for n, c in zip(REGIONS, cols[:6]))
    per_page = ' '.join('%s %.0f' % (n, cols[i] / pages) for i, n in enumerate(REGIONS)
                        if n in ('setup', 'qk', 'prep', 'slabs'))
    per_item = ' '.join('%s %.0f' % (n, cols[i] / items) for i, n in enumerate(REGIONS)
                        if n in ('wait', 'claim'))
    print('%s: %d warps, %.1f items and %.1f pages per warp, loop %.0f kcycles per warp' %
          (label, len(rows), items / len(rows), pages / len(rows), loop / len(rows) / 1e3))
    print('  share of the loop: %s other %.1f%%' % (share, 100.0 * other / loop))
    print('  cycles per page: %s; per item: %s' % (per_page, per_item))


if __name__ == '__main__':
    main()
