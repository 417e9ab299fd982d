"""Reports over several runs: Markdown and one self-contained HTML page (inline CSS, inline SVG plot, no JS).

matplotlib draws the success-vs-latency Pareto plot (SVG, Wilson-interval and latency-spread error bars);
evalkit.stats gives the Wilson intervals; the html module escapes text. Input: a list of `ReportRun`
(a run's summary.json dict, a label, and its gate verdict as a dict).
"""

from evalkit.report.build import (
    ReportRun,
    pareto_front,
    render_html,
    render_markdown,
    write_report,
)
from evalkit.report.plot import pareto_svg

__all__ = ["ReportRun", "pareto_front", "pareto_svg", "render_html", "render_markdown", "write_report"]
