#!/usr/bin/env python3
"""Plots kvc_eval's eval.json: perplexity change against bits per value, one panel per model."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"fp16": ("s", "grey"), "fp8": ("D", "black"), "kivi": ("o-", "tab:red"),
         "bitpack-rel": ("^-", "tab:blue"), "bitpack-abs": ("v-", "tab:cyan"),
         "huffman-rel": ("^-", "tab:green"), "huffman-abs": ("v-", "tab:olive"),
         "default": ("*", "gold")}


def main(src, dst):
    data = json.load(open(src))
    models = data["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items()):
        for fam, (marker, color) in STYLE.items():
            rows = sorted((r for r in m["rows"] if r["family"] == fam), key=lambda r: r["bits_per_value"])
            if not rows:
                continue
            x = [r["bits_per_value"] for r in rows]
            y = [100.0 * max(r["ppl_change"], 1e-4) for r in rows]
            ax.plot(x, y, marker, color=color, label=fam, markersize=14 if fam == "default" else 6,
                    markeredgecolor="black" if fam == "default" else color)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlim(left=0, right=9)
        ax.set_xlabel("bits per value (all stored bytes counted)")
        ax.set_ylabel("perplexity change, % (log; <=0 drawn at 1e-4)")
        ax.set_title(f"{name}: ppl {m['reference_ppl']:.4f} exact, {data['windows']} windows")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: plot_eval.py eval.json eval.png")
    main(sys.argv[1], sys.argv[2])
