"""Fixtures of the reliability suite, and the hook that writes ``docs/reliability.md``.

The page is written at the end of a session only when every test of this folder was
collected, none was deselected, all passed and every section of figures is there: a
``-k`` selection or a single file leaves the committed page alone. Set
``ALWA_RELIABILITY_DOC`` to another path to write it elsewhere, or to ``off``;
``ALWA_RELIABILITY_DIR`` keeps the raw figures (JSON) in that folder.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))  # report.py and reliability_helpers.py, whatever the import mode

from report import SECTIONS, Figures, write_report  # noqa: E402

_state = {"collected": set(), "deselected": set(), "passed": set(), "bad": set(), "durations": {},
          "figures_dir": None, "xfailed": {}}


def pytest_itemcollected(item):
    if Path(item.path).resolve().parent == HERE:
        _state["collected"].add(item.nodeid)


def pytest_deselected(items):
    for item in items:
        if Path(item.path).resolve().parent == HERE:
            _state["deselected"].add(item.nodeid)


def pytest_runtest_logreport(report):
    if report.nodeid not in _state["collected"]:
        return
    _state["durations"][report.nodeid] = _state["durations"].get(report.nodeid, 0.0) + report.duration
    if report.skipped and hasattr(report, "wasxfail"):
        # An expected failure: a bug in a file this suite's owner may not edit, reported (xfail,
        # strict=False) with the fix described. It counts as run, and the page lists it.
        _state["xfailed"][report.nodeid] = report.wasxfail
        _state["passed"].add(report.nodeid)
    elif report.failed or report.skipped:
        _state["bad"].add(report.nodeid)
    elif report.when == "call" and report.passed:
        _state["passed"].add(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("ALWA_RELIABILITY_DOC", str(REPO / "docs" / "reliability.md"))
    folder = _state["figures_dir"]
    if target == "off" or folder is None:
        return
    ran = _state["collected"] - _state["deselected"]
    files = {nodeid.split("::")[0].rsplit("/", 1)[-1] for nodeid in ran}
    expected_files = {p.name for p in HERE.glob("test_*.py")}
    figures = Figures(folder)
    complete = (files == expected_files and not _state["deselected"] and not _state["bad"]
                and ran == _state["passed"]
                and all(figures.has(section) for section in SECTIONS))
    if not complete:
        return
    args = session.config.invocation_params.args
    command = "python -m pytest " + " ".join(shlex.quote(str(a)) for a in args)
    durations = {Path(nodeid.split("::")[0]).name + "::" + nodeid.split("::", 1)[1]: seconds
                 for nodeid, seconds in _state["durations"].items()}
    write_report(figures, Path(target), command=command.strip(), tests=len(ran),
                 seconds=sum(_state["durations"].values()), durations=durations,
                 xfailed={nodeid.split("/")[-1]: reason for nodeid, reason in _state["xfailed"].items()})


@pytest.fixture(scope="session")
def figures(tmp_path_factory) -> Figures:
    """Where tests record what they measured, for the page."""
    folder = os.environ.get("ALWA_RELIABILITY_DIR")
    folder = Path(folder) if folder else tmp_path_factory.mktemp("reliability_figures")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.json"):
        stale.unlink()
    _state["figures_dir"] = folder
    return Figures(folder)
