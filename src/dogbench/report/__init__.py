"""The report: run folders in, ``report.html`` (self-contained) and ``report.md`` out. No torch import.

``runs`` reads run folders, ``document`` is the page as data, ``sections`` and ``sections_studies`` build its
sections, ``plots`` draws the figures, ``render`` assembles and writes the pages.
"""

from dogbench.report.render import ReportFiles, build_report, headline, make_report, write_report
from dogbench.report.runs import ReportError, load_runs, select_examples

__all__ = ["ReportError", "ReportFiles", "build_report", "headline", "load_runs", "make_report", "select_examples",
           "write_report"]
