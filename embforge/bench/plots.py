"""Plots of the end-to-end rows: tokens/s per lever and the time split of each step."""
from __future__ import annotations

from pathlib import Path


def plot(rows: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    names = [f"{r['lever']}" for r in ok]
    axes[0].barh(names, [r["tokens_per_s"] for r in ok],
                 color=["tab:orange" if r["system"] != "embforge" else "tab:blue" for r in ok])
    axes[0].set_xlabel("tokens/s (real tokens, step incl. optimizer)")
    left = [0.0] * len(ok)
    for key, color in (("pass1_ms", "tab:green"), ("loss_ms", "tab:red"), ("pass2_ms", "tab:purple"),
                       ("optimizer_ms", "tab:gray")):
        vals = [float(r.get(key) or 0) / 1e3 for r in ok]
        axes[1].barh(names, vals, left=left, color=color, label=key[:-3])
        left = [a + b for a, b in zip(left, vals)]
    rest = [float(r["step_ms"]) / 1e3 - lft for r, lft in zip(ok, left)]
    axes[1].barh(names, [max(0.0, x) for x in rest], left=left, color="lightgray", label="other / unsplit")
    axes[1].set_xlabel("seconds per step")
    axes[1].legend(fontsize=7)
    r0 = ok[0]
    fig.suptitle(f"GradCache step {r0['setup']} ({r0['n_queries']} q + {r0['n_docs']} d) on {r0['device']} "
                 f"({r0['date'][:10]}, {r0['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
