"""What the passes did: per pass and graph, how often each matched and where.

The backend always logs one INFO line per pass per graph to the ``diffopt``
logger. While a :class:`Report` is being collected (``with collecting(report)``,
which :func:`diffopt.explain` does), the same records also go into it.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("diffopt")


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One rewrite: which pass, in which graph, where in the user's code, what became what."""

    pass_name: str
    graph: str
    module: str
    source: str
    replaced: str
    by: str


@dataclasses.dataclass(frozen=True)
class Decline:
    """A stock form a pass found and left as it is: a precondition it could not prove."""

    pass_name: str
    graph: str
    module: str
    source: str
    reason: str


@dataclasses.dataclass(frozen=True)
class PassRun:
    """One pass run over one graph."""

    pass_name: str
    stage: str
    graph: str
    matches: int
    seconds: float
    error: str | None = None


@dataclasses.dataclass
class Report:
    runs: list[PassRun] = dataclasses.field(default_factory=list)
    rewrites: list[Rewrite] = dataclasses.field(default_factory=list)
    declines: list[Decline] = dataclasses.field(default_factory=list)
    output: Any = None

    @property
    def graphs(self) -> list[str]:
        return sorted({run.graph for run in self.runs}, key=lambda g: (len(g), g))

    def matches(self, pass_name: str) -> int:
        """How often ``pass_name`` matched, over all graphs."""
        return sum(run.matches for run in self.runs if run.pass_name == pass_name)

    def failures(self) -> list[PassRun]:
        return [run for run in self.runs if run.error is not None]

    def __str__(self) -> str:
        totals: dict[str, list] = {}
        for run in self.runs:
            entry = totals.setdefault(run.pass_name, [run.stage, 0, 0.0, []])
            entry[1] += run.matches
            entry[2] += run.seconds
            if run.error:
                entry[3].append(f"{run.graph}: {run.error}")
        lines = [f"diffopt: {len(self.graphs)} graph(s) compiled"]
        rows = [("pass", "stage", "matches", "ms")]
        rows += [(name, stage, str(n), f"{s * 1e3:.1f}") for name, (stage, n, s, _) in totals.items()]
        lines += _table(rows)
        if self.rewrites:
            lines.append("")
            rows = [("pass", "graph", "module", "source", "replaced -> by")]
            rows += [(r.pass_name, r.graph, r.module or "-", r.source or "-", f"{r.replaced} -> {r.by}") for r in self.rewrites]
            lines += _table(rows)
        if self.declines:
            lines.append("")
            rows = [("declined", "graph", "module", "source", "why")]
            rows += [(d.pass_name, d.graph, d.module or "-", d.source or "-", d.reason) for d in self.declines]
            lines += _table(rows)
        for name, (_, _, _, errors) in totals.items():
            for error in errors:
                lines.append(f"FAILED {name} ({error}); the graph compiled without it")
        return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    out.insert(1, "  ".join("-" * width for width in widths))
    return out


_active: contextvars.ContextVar[tuple[Report, ...]] = contextvars.ContextVar("diffopt_reports", default=())


@contextlib.contextmanager
def collecting(report: Report) -> Iterator[Report]:
    """Record every pass run inside the block into ``report``."""
    token = _active.set(_active.get() + (report,))
    try:
        yield report
    finally:
        _active.reset(token)


def record(run: PassRun, rewrites: list[Rewrite], declines: list[Decline] = ()) -> None:
    if run.error:
        log.warning("diffopt: pass %s raised on %s and was skipped: %s", run.pass_name, run.graph, run.error)
    log.info("diffopt: %s %s %s: %d rewrite(s) in %.1f ms", run.graph, run.stage, run.pass_name, run.matches, run.seconds * 1e3)
    for report in _active.get():
        report.runs.append(run)
        report.rewrites.extend(rewrites)
        report.declines.extend(declines)
