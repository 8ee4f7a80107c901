"""`ava-report`: pictures of a training run, as one self-contained HTML page.

    write_report([run_dir], out=None, log_scale=False) -> Path    # the page, for runs or a sweep
    expert_load_panels(records) -> list[Panel]                    # heatmap + load over time (W&B media)

Modules, one job each: `records` reads the JSONL files (bad lines skipped and counted),
`runs` finds run and sweep directories and names runs by their overrides, `summary` gathers the
run's facts, `series` turns records into drawn series and incident marks, `figure` renders a
matplotlib figure to a `Panel`, `curves` and `experts` draw the panels, `page` writes the HTML,
`build` puts them together, `cli` is the command.
"""

from ava.observe.report.build import write_report
from ava.observe.report.experts import expert_load_panels
from ava.observe.report.figure import Panel
from ava.observe.report.records import BadLine, ReportError
from ava.observe.report.series import Series

__all__ = ["BadLine", "Panel", "ReportError", "Series", "expert_load_panels", "write_report"]
