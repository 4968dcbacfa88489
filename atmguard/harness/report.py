"""What a scenario run tells people: a summary table on the terminal and an HTML report.

The report shows, per scenario, the decision, the timeline and the evidence snapshots the ATM
journaled, opened with the run's own (throwaway) bank key: the sealed JPEGs are decrypted here,
in memory, and embedded in the page, so a person can look at what the ATM saw.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from atmguard.harness.runner import ScenarioResult
from atmguard.store.snapshots import SnapshotError, open_sealed_file


def summary_table(results: Sequence[ScenarioResult]) -> str:
    """One row per scenario: result, decision, reason, session time and the daemon's decision time."""
    header = ("scenario", "result", "decision", "reason", "session s", "decided in ms")
    rows = [
        (
            result.path.stem,
            result.status.upper(),
            result.outcome or "-",
            result.reason or "-",
            "-" if result.session_s is None else f"{result.session_s:.1f}",
            "-" if result.decided_in_ms is None else f"{result.decided_in_ms:.1f}",
        )
        for result in results
    ]
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    counts = {status: sum(r.status == status for r in results) for status in ("passed", "failed", "skipped")}
    lines.append(f"\n{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    return "\n".join(lines)


def _evidence_html(result: ScenarioResult) -> str:
    if not result.evidence:
        return "<p class=muted>no evidence snapshot journaled for this session</p>"
    if result.private_key_file is None:
        return "<p class=muted>evidence journaled, but no key to open it</p>"
    figures = []
    for snapshot in result.evidence:
        images = []
        for label, blob in (("frame", snapshot.sealed_frame), ("face", snapshot.sealed_crop)):
            if blob is None:
                continue
            try:
                jpeg = open_sealed_file(result.private_key_file, blob)
            except (SnapshotError, OSError) as exc:
                images.append(f"<p class=fail>{label}: cannot open: {html.escape(str(exc))}</p>")
                continue
            data = base64.b64encode(jpeg).decode("ascii")
            images.append(f'<img class={label} alt="{label}" src="data:image/jpeg;base64,{data}">')
        kind = "fraud evidence" if snapshot.is_fraud_evidence else "evidence"
        figures.append(
            f"<figure>{''.join(images)}<figcaption>{html.escape(snapshot.reason)} ({kind}, "
            f"snapshot {html.escape(snapshot.uuid[:8])})</figcaption></figure>"
        )
    return "".join(figures)


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: left; }
.passed { color: #176317; } .failed, .fail { color: #b00020; } .skipped, .muted { color: #777; }
section { margin-top: 2.5em; border-top: 2px solid #eee; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; font-size: 12px; }
figure { display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }
img.frame { height: 240px; } img.face { height: 240px; margin-left: 4px; }
"""


def write_html_report(
    results: Sequence[ScenarioResult], path: Path, *, title: str, notes: Sequence[str] = ()
) -> Path:
    """Write the report; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(
        f"<tr><td><a href='#{html.escape(r.path.stem)}'>{html.escape(r.path.stem)}</a></td>"
        f"<td class={r.status}>{r.status}</td><td>{html.escape(r.outcome or '-')}</td>"
        f"<td>{html.escape(r.reason or '-')}</td>"
        f"<td>{'-' if r.session_s is None else f'{r.session_s:.1f}'}</td>"
        f"<td>{'-' if r.decided_in_ms is None else f'{r.decided_in_ms:.1f}'}</td></tr>"
        for r in results
    )
    sections = "".join(
        f"<section id='{html.escape(r.path.stem)}'><h2>{html.escape(r.path.stem)}: {html.escape(r.title)}</h2>"
        f"<p><b class={r.status}>{r.status.upper()}</b> &mdash; rule: {html.escape(r.rule)}</p>"
        + "".join(f"<p class=fail>{html.escape(failure)}</p>" for failure in r.failures)
        + f"<pre>{html.escape(chr(10).join(r.timeline))}</pre>{_evidence_html(r)}</section>"
        for r in results
    )
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    note_html = "".join(f"<p class=muted>{html.escape(note)}</p>" for note in notes)
    path.write_text(
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p class=muted>{generated}</p>"
        f"{note_html}<table><tr><th>scenario</th><th>result</th><th>decision</th><th>reason</th>"
        f"<th>session s</th><th>decided in ms</th></tr>{rows}</table>{sections}</body></html>",
        encoding="utf-8",
    )
    return path
