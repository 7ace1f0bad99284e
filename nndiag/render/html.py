"""HTML rendering: the self-contained page of ``nndiag report`` and the reports' ``_repr_html_``.

One result object, rendered once more: the findings (severity, summary, explanation, layers,
fixes with their code and verification), the facts the report was judged on, and its figures
embedded as base64 PNG, so a page is one file that opens anywhere (no script, no network, no
sibling files). Every string that comes from the user's model or files (layer names, paths)
is escaped.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nndiag.files import write_atomic
from nndiag.findings import (
    CheckpointReport,
    CheckReport,
    Finding,
    Fix,
    LRFindResult,
    Report,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from nndiag.lrfind import LRFindResult
    from nndiag.runlog import RunLog

PAGE = "index.html"
DPI = 110
_STATUS_COLORS = {"ok": "#2ca02c", "info": "#1f77b4", "warning": "#e07b00", "error": "#d62728"}

CSS = """
.nndiag{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
  color:#1d1d1f;line-height:1.45;max-width:1240px;margin:0 auto;padding:8px 16px}
.nndiag h1{font-size:1.5em;margin:.4em 0}.nndiag h2{font-size:1.2em;margin:1.2em 0 .4em;
  border-bottom:1px solid #ddd;padding-bottom:.2em}.nndiag h3{font-size:1.05em;margin:.8em 0 .3em}
.nndiag .badge{display:inline-block;padding:.1em .6em;border-radius:4px;color:#fff;
  font-weight:600;font-size:.9em;vertical-align:middle}
.nndiag .facts{border-collapse:collapse;font-size:.92em}
.nndiag .facts td{padding:.1em 1em .1em 0;vertical-align:top}
.nndiag .facts td:first-child{color:#555}
.nndiag .finding{border:1px solid #ddd;border-left:6px solid var(--c);border-radius:4px;
  padding:.5em .9em;margin:.7em 0;background:#fafafa}
.nndiag .finding .id{font-weight:700;font-family:ui-monospace,Menlo,Consolas,monospace}
.nndiag .sev{color:var(--c);font-weight:700;text-transform:uppercase;font-size:.85em}
.nndiag .layers{color:#555;font-size:.9em;word-break:break-all}
.nndiag ol.fixes{margin:.3em 0 .2em 1.2em;padding:0}
.nndiag .fix-id{font-family:ui-monospace,Menlo,Consolas,monospace;color:#7b2a8c;font-weight:600}
.nndiag pre{background:#f0f0f3;padding:.4em .6em;border-radius:3px;overflow-x:auto;
  font-size:.85em;margin:.3em 0}
.nndiag .verified{font-size:.88em;color:#2b6b2b}.nndiag .unverified{font-size:.88em;color:#777}
.nndiag figure{margin:1em 0}.nndiag figure img{max-width:100%;height:auto;
  border:1px solid #eee}
.nndiag figcaption{color:#555;font-size:.9em;margin-top:.2em}
.nndiag table.layers-table{border-collapse:collapse;font-size:.85em}
.nndiag table.layers-table th,.nndiag table.layers-table td{padding:.1em .6em;
  border-bottom:1px solid #eee;text-align:right}
.nndiag table.layers-table td:nth-child(-n+2),.nndiag table.layers-table th:nth-child(-n+2){
  text-align:left}
.nndiag tr.flag-error td{color:#d62728}.nndiag tr.flag-warning td{color:#b35c00}
.nndiag .note{color:#8a6d00}.nndiag nav a{margin-right:1em}
"""


@dataclass
class FigureImage:
    """One embedded figure.

    Attributes:
        name: File name (``grad_norm_heatmap.png``), also its anchor.
        title: Heading above it.
        caption: What it shows.
        png: The PNG bytes.
    """

    name: str
    title: str
    caption: str
    png: bytes


def esc(value: object) -> str:
    """Escape any value for HTML text or attributes."""
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A number as the text report writes it (3 significant digits)."""
    from nndiag.render.text import fmt as text_fmt

    return text_fmt(value)


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    """Render a matplotlib figure to PNG bytes."""
    buffer = io.BytesIO()
    # A figure with a layout engine fits itself; "tight" would cost a second draw.
    tight = None if fig.get_layout_engine() is not None else "tight"
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches=tight)
    return buffer.getvalue()


def _img(image: FigureImage) -> str:
    data = base64.b64encode(image.png).decode("ascii")
    return (f'<figure id="{esc(image.name)}"><h3>{esc(image.title)}</h3>'
            f'<img alt="{esc(image.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(image.caption)}</figcaption></figure>")


# ---------------------------------------------------------------------- findings

def _verified(fix: Fix) -> str:
    v = fix.verified
    if not v:
        return ""
    if not v.get("applied"):
        return f'<div class="unverified">not tried automatically: {esc(v.get("reason"))}</div>'
    before, after = v.get("before") or {}, v.get("after") or {}
    changes = ", ".join(f"{esc(k)} {fmt(before.get(k))} &rarr; {fmt(after.get(k))}"
                        for k in before)
    verdict = "resolved" if v.get("resolved") else f"still {esc(v.get('severity_after'))}"
    return f'<div class="verified">verified on a copy: <b>{verdict}</b> ({changes})</div>'


def finding_html(finding: Finding) -> str:
    """One finding: severity, id, summary, explanation, layers and fixes."""
    color = _STATUS_COLORS.get(finding.severity, "#777")
    parts = [f'<div class="finding" style="--c:{color}">',
             f'<div><span class="sev">{esc(finding.severity)}</span> '
             f'<span class="id">{esc(finding.id)}</span> &mdash; {esc(finding.summary)}</div>']
    if finding.explanation:
        parts.append(f"<p>{esc(finding.explanation)}</p>")
    if finding.layers:
        shown = ", ".join(esc(n) for n in finding.layers[:12])
        more = f" &hellip; (+{len(finding.layers) - 12})" if len(finding.layers) > 12 else ""
        parts.append(f'<div class="layers">layers: {shown}{more}</div>')
    if finding.fixes:
        parts.append('<ol class="fixes">')
        for fix in finding.fixes:
            code = f"<pre>{esc(fix.code)}</pre>" if fix.code else ""
            parts.append(f'<li><span class="fix-id">{esc(fix.id)}</span>: {esc(fix.summary)}'
                         f"{_verified(fix)}{code}</li>")
        parts.append("</ol>")
    parts.append("</div>")
    return "".join(parts)


def findings_html(report: Report) -> str:
    """The status line and every finding."""
    counts = [f"{n} {s}{'s' if n > 1 else ''}" for s in ("error", "warning", "info")
              if (n := sum(f.severity == s for f in report.findings))]
    status = report.status
    line = (f'<p><span class="badge" style="background:{_STATUS_COLORS[status]}">'
            f"{esc(status.upper())}</span> "
            + (esc(", ".join(counts)) if counts else "no problem found") + "</p>")
    return line + "".join(finding_html(f) for f in report.findings)


def _facts(rows: Sequence[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in rows
                    if v is not None and v != "")
    return f'<table class="facts">{cells}</table>' if cells else ""


def _notes(report: Report) -> str:
    return "".join(f'<p class="note">note: {esc(n)}</p>' for n in report.notes)


# ---------------------------------------------------------------------- per command

def _layer_table(report: Report, limit: int = 60) -> str:
    flagged: dict[str, str] = {}
    for finding in report.findings:
        for name in finding.layers:
            if flagged.get(name) != "error":
                flagged[name] = finding.severity
    rows = [r for r in report.layers
            if r.weight_norm is not None or r.name in flagged]
    hidden = max(0, len(rows) - limit)
    body = []
    for row in rows[:limit]:
        dead, sat = row.dead_fraction, row.saturated_fraction
        share = f"{dead:.0%} dead" if dead is not None else (
            f"{sat:.0%} sat" if sat is not None else "-")
        css = f' class="flag-{flagged[row.name]}"' if row.name in flagged else ""
        body.append(f"<tr{css}><td>{esc(row.get('name'))}</td><td>{esc(row.get('kind', ''))}"
                    f"</td><td>{fmt(row.get('std'))}</td><td>{esc(share)}</td>"
                    f"<td>{fmt(row.get('depth_gain'))}</td><td>{fmt(row.get('grad_to_weight'))}"
                    f"</td><td>{fmt(row.get('init_scale'))}</td></tr>")
    if not body:
        return ""
    more = f"<p>&hellip; {hidden} more layers (see --json)</p>" if hidden else ""
    return ('<h2>Layers</h2><table class="layers-table"><tr><th>layer</th><th>kind</th>'
            "<th>out std</th><th>dead/sat</th><th>gain</th><th>|g|/|w|</th><th>init</th></tr>"
            + "".join(body) + "</table>" + more)


def _safe_figure(name: str, title: str, caption: str, draw: Callable[[], Figure]
                 ) -> FigureImage | str:
    """A figure, or a note saying why it could not be drawn (the findings still show)."""
    try:
        return FigureImage(name, title, caption, figure_png(draw()))
    except Exception as exc:  # noqa: BLE001 - a figure must never hide the findings
        return f'<p class="note">figure {esc(title)} unavailable: {esc(exc)}</p>'


def _figures_html(figures: Sequence[FigureImage | str]) -> str:
    if not figures:
        return ""
    return "<h2>Figures</h2>" + "".join(f if isinstance(f, str) else _img(f) for f in figures)


def _inspect_body(report: Report, with_figures: bool) -> str:
    s = report.summary
    if isinstance(report, CheckpointReport):
        title = f"nndiag inspect {s.get('path', '')}"
        facts = _facts([("format", s.get("format")), ("tensors", s.get("tensors")),
                        ("values", s.get("parameters"))])
        figure = ("weight_scales.png", "weight scales (data-free)",
                  "Weight RMS per module against the He and Xavier references.")
    else:
        title = f"nndiag inspect {s.get('model', '')}"
        facts = _facts([("trainable parameters", s.get("trainable_parameters")),
                        ("loss", f"{s.get('loss_name')} {fmt(s.get('loss'))}"),
                        ("batches", s.get("batches")), ("batch size", s.get("batch_size")),
                        ("layers measured", s.get("measured_layers"))])
        figure = ("gradient_flow.png", "gradient flow",
                  "Gradient norms and activation std through depth; flagged layers marked.")
    figures: list[FigureImage | str] = []
    if with_figures and report.layers:
        from nndiag.render.plots import plot_report

        figures.append(_safe_figure(*figure, lambda: plot_report(report)))
    layers = "" if isinstance(report, CheckpointReport) else _layer_table(
        report)
    return (f"<h1>{esc(title)}</h1>{facts}<h2>Findings</h2>{findings_html(report)}"
            f"{_notes(report)}{_figures_html(figures)}{layers}")


def _lr_find_body(result: LRFindResult, with_figures: bool) -> str:
    s = result.summary
    suggestion = (f"suggested learning rate <b>{result.suggested_lr:.2e}</b>"
                  if result.suggested_lr is not None else
                  "no learning rate can be suggested from this curve")
    useful = (f" (useful range {result.lr_low:.1e} .. {result.lr_high:.1e})"
              if result.lr_low and result.lr_high else "")
    facts = _facts([("optimizer", s.get("optimizer")), ("steps", s.get("steps_run")),
                    ("stopped", result.stopped_because)])
    figures: list[FigureImage | str] = []
    if with_figures and result.lrs:
        from nndiag.render.plots.lr_curve import plot_lr_curve

        figures.append(_safe_figure("lr_find.png", "loss against learning rate",
                                    "Raw and smoothed loss of the range test; the suggestion "
                                    "and the useful range marked.",
                                    lambda: plot_lr_curve(result)))
    return (f"<h1>nndiag lr-find</h1><p>{suggestion}{esc(useful)}</p>"
            f"<p>why: {esc(result.reason)}</p>{facts}<h2>Findings</h2>{findings_html(result)}"
            f"{_notes(result)}{_figures_html(figures)}")


def _check_facts(report: Report) -> str:
    s = report.summary
    return _facts([
        ("run", s.get("run")), ("model", s.get("model")), ("optimizer", s.get("optimizer")),
        ("steps", s.get("steps")),
        ("sampled", f"{s.get('samples')} steps, every {s.get('every')}"
         if s.get("samples") is not None else None),
        ("ranks", s.get("world_size") if (s.get("world_size") or 1) > 1 else None),
        ("steps skipped by the GradScaler", s.get("skipped_steps")),
        ("final loss", fmt(s.get("final_loss")) if s.get("final_loss") is not None else None)])


def run_figures(log: RunLog, findings: list[Finding]) -> list[FigureImage | str]:
    """Every figure of a recorded run (``run_figures.FIGURES``), rendered to PNG."""
    from nndiag.render.plots.run_figures import FIGURES, describe

    images: list[FigureImage | str] = []
    for name, plot in FIGURES.items():
        images.append(_safe_figure(name, *describe(name), lambda plot=plot: plot(log, findings)))
    return images


def _check_body(report: Report, with_figures: bool) -> str:
    figures: list[FigureImage | str] = []
    run = report.summary.get("run")
    if with_figures and run and (Path(run) / "meta.json").is_file():
        from nndiag.runlog import read_run

        figures = run_figures(read_run(run), report.findings)
    what = "training gate" if report.summary.get("mode") == "training" else run
    return (f"<h1>nndiag check {esc(what or '')}</h1>{_check_facts(report)}"
            f"<h2>Findings</h2>{findings_html(report)}{_notes(report)}"
            f"{_figures_html(figures)}")


def report_body(report: Report, with_figures: bool = True) -> str:
    """The report as an HTML fragment (inside ``<div class="nndiag">``), chosen by its type."""
    if isinstance(report, LRFindResult):
        body = _lr_find_body(report, with_figures)
    elif isinstance(report, CheckReport):
        body = _check_body(report, with_figures)
    else:
        body = _inspect_body(report, with_figures)
    return f'<div class="nndiag">{body}</div>'


def report_html(report: Report, with_figures: bool = True) -> str:
    """What Jupyter shows for a report (``Report._repr_html_``): styles and the fragment."""
    return f"<style>{CSS}</style>{report_body(report, with_figures)}"


def page(title: str, body: str) -> str:
    """A complete, self-contained HTML document."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>body{{margin:0;background:#fff}}{CSS}</style>"
            f"</head><body>{body}</body></html>\n")


def run_report_page(report: Report, figures: Sequence[FigureImage | str]) -> str:
    """The page of ``nndiag report``: facts, findings with advice, then the run's figures."""
    names = [f for f in figures if isinstance(f, FigureImage)]
    nav = "<nav>" + "".join(f'<a href="#{esc(f.name)}">{esc(f.title)}</a>' for f in names) + \
        "</nav>" if names else ""
    body = (f'<div class="nndiag"><h1>nndiag report: {esc(report.summary.get("run", ""))}</h1>'
            f"{_check_facts(report)}{nav}<h2>Findings</h2>{findings_html(report)}"
            f"{_notes(report)}{_figures_html(figures)}</div>")
    return page(f"nndiag report: {Path(str(report.summary.get('run', ''))).name}", body)


def write_run_report(log: RunLog, report: Report, directory: str | Path) -> list[Path]:
    """Write ``DIR/index.html`` (self-contained) and each figure as a PNG beside it.

    Returns:
        The files written, the page first.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    figures = run_figures(log, report.findings)
    written = []
    for figure in figures:
        if isinstance(figure, FigureImage):
            png = figure.png
            write_atomic(target / figure.name, lambda temp, png=png: Path(temp).write_bytes(png))
            written.append(target / figure.name)
    page_bytes = run_report_page(report, figures).encode("utf-8")
    write_atomic(target / PAGE, lambda temp: Path(temp).write_bytes(page_bytes))
    return [target / PAGE, *written]

