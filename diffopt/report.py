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
import re
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
    note: str | None = None  # why the pass did not run on this graph (e.g. not applicable)


@dataclasses.dataclass
class Report:
    runs: list[PassRun] = dataclasses.field(default_factory=list)
    rewrites: list[Rewrite] = dataclasses.field(default_factory=list)
    declines: list[Decline] = dataclasses.field(default_factory=list)
    cache_hits: list[str] = dataclasses.field(default_factory=list)  # graphs Inductor's cache served
    output: Any = None

    @property
    def graphs(self) -> list[str]:
        """The graphs this report saw, in the order it saw them (names are process-wide: ``graph 7``)."""
        return list(dict.fromkeys([run.graph for run in self.runs] + self.cache_hits))

    def matches(self, pass_name: str) -> int:
        """How often ``pass_name`` matched, over all graphs."""
        return sum(run.matches for run in self.runs if run.pass_name == pass_name)

    def failures(self) -> list[PassRun]:
        return [run for run in self.runs if run.error is not None]

    def __str__(self) -> str:
        # Graphs are numbered within this report; the log's names count the whole process.
        label = {graph: f"graph {i + 1}" for i, graph in enumerate(self.graphs)}
        cached = f", {len(self.cache_hits)} from Inductor's cache (passes not rerun)" if self.cache_hits else ""
        lines = [f"diffopt: {len(self.graphs)} graph(s) compiled{cached}"]
        totals: dict[str, list] = {}
        for run in self.runs:
            entry = totals.setdefault(run.pass_name, [run.stage, 0, 0.0, []])
            entry[1] += run.matches
            entry[2] += run.seconds
            if run.error:
                entry[3].append(f"{label[run.graph]}: {run.error}")
        rows = [("pass", "stage", "rewrites", "compile ms", "note")]
        for name, (stage, matches, seconds, _) in totals.items():
            rows.append((name, stage, str(matches), f"{seconds * 1e3:.1f}", "" if matches else self._note(name)))
        lines += _table(rows)
        if self.rewrites:
            lines.append("")
            rows = [("pass", "graph (times)", "where", "source", "replaced -> by")]
            for (pass_name, module, source, text), graphs in _grouped(
                (r.pass_name, r.module, r.source, f"{r.replaced} -> {r.by}", r.graph) for r in self.rewrites
            ):
                rows.append((pass_name, _graphs(graphs, label), module or "-", source or "-", text))
            lines += _table(rows)
        if self.declines:
            lines.append("")
            rows = [("declined", "graph (times)", "where", "source", "why")]
            for (pass_name, module, source, reason), graphs in _grouped(
                (d.pass_name, d.module, d.source, d.reason, d.graph) for d in self.declines
            ):
                rows.append((pass_name, _graphs(graphs, label), module or "-", source or "-", reason))
            lines += _table(rows)
        for name, (_, _, _, errors) in totals.items():
            for error in errors:
                lines.append(f"FAILED {name} ({error}); the graph compiled without it")
        return "\n".join(lines)

    def _note(self, pass_name: str) -> str:
        """Why a pass rewrote nothing, where it said: not applicable, off on this device, a decline."""
        notes = [run.note for run in self.runs if run.pass_name == pass_name and run.note]
        if notes and len(notes) == sum(run.pass_name == pass_name for run in self.runs):
            return notes[0]
        reasons = list(dict.fromkeys(d.reason for d in self.declines if d.pass_name == pass_name))
        return f"declined: {reasons[0]}" + (f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else "") if reasons else ""


_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _grouped(rows) -> list[tuple[tuple, list[str]]]:
    """Rows that differ only in the block index of their module path (``blocks.3.attn1``) and their
    graph, as one row ``blocks.*.attn1`` with the graphs and the count."""
    groups: dict[tuple, list[str]] = {}
    for pass_name, module, source, text, graph in rows:
        key = (pass_name, _INDEX.sub(".*", module), source, text)
        groups.setdefault(key, []).append(graph)
    return list(groups.items())


def _graphs(graphs: list[str], label: dict[str, str]) -> str:
    names = ", ".join(label[g].removeprefix("graph ") for g in dict.fromkeys(graphs))
    return f"{names} (x{len(graphs)})" if len(graphs) > 1 else names


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


def record_cache_hit(graph: str) -> None:
    """Inductor's FX graph cache served ``graph``: its rewrites are those of the run that filled the cache."""
    log.info("diffopt: %s: FX graph cache hit, rewrites as when it was cached (the passes did not run)", graph)
    for report in _active.get():
        report.cache_hits.append(graph)


def record(run: PassRun, rewrites: list[Rewrite], declines: list[Decline] = ()) -> None:
    if run.note:
        log.info("diffopt: %s %s %s: %s", run.graph, run.stage, run.pass_name, run.note)
        for report in _active.get():
            report.runs.append(run)
        return
    if run.error:
        log.warning("diffopt: pass %s raised on %s and was skipped: %s", run.pass_name, run.graph, run.error)
    log.info("diffopt: %s %s %s: %d rewrite(s) in %.1f ms", run.graph, run.stage, run.pass_name, run.matches, run.seconds * 1e3)
    for report in _active.get():
        report.runs.append(run)
        report.rewrites.extend(rewrites)
        report.declines.extend(declines)
