"""Success-vs-latency Pareto plot as an inline SVG string (matplotlib, Agg backend, no files)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: never open a window
import matplotlib.pyplot as plt  # noqa: E402


def pareto_svg(points: list[dict], title: str = "success vs latency") -> str:
    """points: {label, latency, lat_low, lat_high, success, ci_low, ci_high, front: bool}. Returns '<svg ...>'."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=100)
    plotted = [p for p in points if p.get("latency") is not None]
    for p in plotted:
        xerr = [[max(p["latency"] - (p.get("lat_low") or p["latency"]), 0)], [max((p.get("lat_high") or p["latency"]) - p["latency"], 0)]]
        yerr = [[max(p["success"] - p["ci_low"], 0) * 100], [max(p["ci_high"] - p["success"], 0) * 100]]
        color = "#c0392b" if p.get("failed") else ("#1f6feb" if p.get("front") else "#7f8c8d")
        ax.errorbar([p["latency"]], [p["success"] * 100], xerr=xerr, yerr=yerr, fmt="o", color=color, capsize=3, ms=6)
        ax.annotate(p["label"], (p["latency"], p["success"] * 100), textcoords="offset points", xytext=(6, 6), fontsize=8)
    front = sorted((p for p in plotted if p.get("front")), key=lambda p: p["latency"])
    if len(front) > 1:
        ax.step([p["latency"] for p in front], [p["success"] * 100 for p in front], where="post", color="#1f6feb",
                alpha=0.5, lw=1.2, label="Pareto front")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("policy latency p50 (ms); bars: p50..p90")
    ax.set_ylabel("success rate (%); bars: 95% Wilson")
    ax.set_ylim(-5, 105)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if not plotted:
        ax.text(0.5, 0.5, "no run has latency numbers", ha="center", va="center", transform=ax.transAxes)
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog/doctype: the SVG is inlined in HTML
