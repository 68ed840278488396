"""One self-contained HTML page per training run (``rewardflow report RUN_DIR``); docs/report.md describes it.

- :mod:`rewardflow.report.hacking`: the reward-hacking rule the page shows at its top (pure functions).
- :mod:`rewardflow.report.figures`: the plots, drawn with matplotlib and embedded as PNG ``data:`` URIs.
- :mod:`rewardflow.report.page`: reading the run folder and laying out the HTML page.
"""

from rewardflow.report.hacking import (
    MAX_COLOUR_SHARE_RISE,
    MAX_DIVERSITY_DROP,
    MAX_EVAL_DROP,
    MIN_REWARD_RISE,
    hacking_warnings,
    reward_trend,
    warnings_from_metrics,
)
from rewardflow.report.page import grid_cells, write_report

__all__ = [
    "MAX_COLOUR_SHARE_RISE",
    "MAX_DIVERSITY_DROP",
    "MAX_EVAL_DROP",
    "MIN_REWARD_RISE",
    "grid_cells",
    "hacking_warnings",
    "reward_trend",
    "warnings_from_metrics",
    "write_report",
]
