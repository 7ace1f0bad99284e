"""Rich text rendering of an inspect report: status, findings with fixes, a per-layer table."""

from __future__ import annotations

import math
from typing import Any, cast

from rich.console import Console, Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from nndiag.findings import (
    CheckpointReport,
    Finding,
    Fix,
    LRFindResult,
    Report,
)
from nndiag.records import LayerRecord, ModuleWeights
from nndiag.render.safe import printable

STYLE = {"ok": "bold green", "info": "cyan", "warning": "bold yellow", "error": "bold red"}
MAX_TABLE_ROWS = 40


def fmt(value: Any) -> str:
    """Format a statistic compactly (3 significant digits, scientific when far from 1)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"
    return str(value)


def _status_line(report: Report) -> Text:
    counts = {s: sum(f.severity == s for f in report.findings) for s in ("error", "warning",
                                                                         "info")}
    status = report.status
    text = Text(f" {status.upper()} ", style=f"reverse {STYLE[status]}")
    if not report.findings:
        text.append("  no problem found", style=STYLE["ok"])
    else:
        parts = [f"{n} {s}{'s' if n > 1 else ''}" for s, n in counts.items() if n]
        text.append("  " + ", ".join(parts))
    return text


def _header(report: Report) -> Text:
    s = report.summary
    frozen = f", {s['frozen_parameters']:,} frozen" if s.get("frozen_parameters") else ""
    return Text.assemble(
        ("nndiag inspect ", "bold"), (f"{s.get('model', '')}", "bold cyan"),
        f": {s.get('trainable_parameters', 0):,} trainable parameters{frozen}; "
        f"{s.get('loss_name')} loss {fmt(s.get('loss'))} on {s.get('batches')} batch(es) of "
        f"{s.get('batch_size')}; {s.get('measured_layers')} layers measured",
    )


def _verified(fix: Fix) -> Text | None:
    v = fix.verified
    if v is None:
        return None
    if not v.get("applied"):
        return Text(f"not tried automatically: {v.get('reason')}", style="dim")
    changes = ", ".join(f"{k} {fmt(v['before'].get(k))} -> {fmt(v['after'].get(k))}"
                        for k in v["before"])
    verdict = ("resolved" if v["resolved"] else f"still {v['severity_after']}")
    style = "green" if v["resolved"] else "yellow"
    text = Text("verified on a copy: ", style="dim")
    text.append(f"{verdict}", style=style)
    text.append(f" ({changes})")
    if v.get("new_findings"):
        text.append(f"; new findings after the fix: {', '.join(v['new_findings'])}", style="yellow")
    return text


def _finding(finding: Finding) -> Group:
    parts: list[Any] = []
    title = Text(f"[{finding.severity}] ", style=STYLE[finding.severity])
    title.append(finding.id, style="bold")
    title.append(f"  {printable(finding.summary)}")
    parts.append(title)
    if finding.explanation:
        parts.append(Padding(Text(printable(finding.explanation)), (0, 0, 0, 4)))
    if finding.layers:
        shown = ", ".join(map(printable, finding.layers[:8])) + (
            f" ... (+{len(finding.layers) - 8})" if len(finding.layers) > 8 else "")
        parts.append(Padding(Text(f"layers: {shown}", style="dim"), (0, 0, 0, 4)))
    for number, fix in enumerate(finding.fixes, 1):
        line = Text(f"{number}. ", style="bold")
        line.append(fix.id, style="bold magenta")
        line.append(f": {printable(fix.summary)}")
        parts.append(Padding(line, (0, 0, 0, 4)))
        verified = _verified(fix)
        if verified is not None:
            parts.append(Padding(verified, (0, 0, 0, 7)))
        if fix.code:
            code = "\n".join(map(printable, fix.code.split("\n")))
            parts.append(Padding(Text(code, style="dim cyan"), (0, 0, 0, 7)))
    return Group(*parts)


def _layer_rows(report: Report) -> list[LayerRecord | int]:
    """The rows the table shows; an int stands for that many layers left out."""
    flagged = {name for f in report.findings for name in f.layers}
    rows: list[LayerRecord | int] = [
        r for r in cast(list[LayerRecord], report.layers)
        if r.weight_norm is not None or r.activation or r.name in flagged]
    if len(rows) <= MAX_TABLE_ROWS:
        return rows
    keep = [r for r in cast(list[LayerRecord], rows)
            if r.weight_norm is not None or r.name in flagged]
    if len(keep) > MAX_TABLE_ROWS:
        half = MAX_TABLE_ROWS // 2
        return [*keep[:half], len(keep) - 2 * half, *keep[-half:]]
    return list(keep)


def _findings(report: Report, console: Console) -> None:
    for finding in report.findings:
        console.print()
        console.print(_finding(finding))


def _status_and_findings(report: Report, console: Console) -> None:
    console.print(_status_line(report))
    _findings(report, console)


def layer_table(report: Report) -> Table:
    """A compact per-layer table; flagged layers are highlighted."""
    flagged = {name: f.severity for f in report.findings for name in f.layers}
    table = Table(title="Per-layer measurements", title_justify="left", header_style="bold",
                  pad_edge=False, box=None)
    rows = _layer_rows(report)
    longest = max((len(row.name) for row in rows if not isinstance(row, int)), default=5)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("layer", no_wrap=True, min_width=min(longest, 32))
    table.add_column("kind", no_wrap=True, overflow="ellipsis", min_width=4)
    for column in ("out std", "dead/sat", "gain", "|g|/|w|", "init"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        if isinstance(row, int):
            table.add_row("", f"... {row} more layers (see --json)", *[""] * 6)
            continue
        dead, sat = row.dead_fraction, row.saturated_fraction
        share = f"{dead:.0%} dead" if dead is not None else (
            f"{sat:.0%} sat" if sat is not None else "-")
        init = (f"{row.init_scale:.2f} {'He' if row.init_reference == 'he' else 'Xav'}"
                if row.init_scale is not None else "-")
        style = {"error": "red", "warning": "yellow"}.get(flagged.get(row.name, ""), "")
        table.add_row(str(row.index), Text(printable(row.name)), row.kind,
                      fmt(row.std), share,
                      fmt(row.depth_gain), fmt(row.grad_to_weight), init,
                      style=style)
    return table


def render_text(report: Report, console: Console) -> None:
    """Print the report: header, status line, findings with fixes, per-layer table, notes."""
    console.print(_header(report))
    checkpoint = report.summary.get("checkpoint")
    if checkpoint:
        console.print(Text(f"weights from {printable(checkpoint['path'])} "
                           f"({checkpoint['format']})",
                           style="dim"))
    _status_and_findings(report, console)
    console.print()
    console.print(layer_table(report))
    console.print(Text("gain: gradient norm at the layer's output / at the model output; "
                       "init: weight RMS / the He or Xavier (Xav) std for its fans",
                       style="dim"))
    for note in report.notes:
        console.print(Text(f"note: {printable(note)}", style="yellow"))


def _checkpoint_header(report: Report) -> Text:
    s = report.summary
    where = f" (weights under {s['weights_key']!r})" if s.get("weights_key") else ""
    dtypes = ", ".join(f"{k} {v:,}" for k, v in s.get("dtypes", {}).items())
    return Text.assemble(
        ("nndiag inspect ", "bold"), (printable(s.get("path")), "bold cyan"),
        f": {s.get('format')}{where}; {s.get('parameters', 0):,} values in "
        f"{s.get('tensors')} tensors ({dtypes}); data-free analysis",
    )


def _scale_columns(report: Report) -> dict[str, str]:
    """The weight-scale columns of the checkpoint table and the row keys they show."""
    columns = {"He x": "init_scale_he", "Xavier x": "init_scale_xavier"}
    if any(row.init_ratio for row in report.layers):
        return {"init x": "init_ratio", **columns}
    return columns


def checkpoint_table(report: Report) -> Table:
    """Per-module weights: kind, size, scale against their init, chain, problems.

    A transformer's rows also show the scale against its family's init std.
    """
    flagged = {name: f.severity for f in report.findings for name in f.layers}
    scales = _scale_columns(report)
    table = Table(title="Weights by module", title_justify="left", header_style="bold",
                  pad_edge=False, box=None)
    rows = cast(list[ModuleWeights], report.layers)
    longest = max((len(row.name) for row in rows), default=6)
    table.add_column("module", no_wrap=True, min_width=min(longest, 32))
    table.add_column("kind", no_wrap=True, overflow="ellipsis", min_width=4)
    for column in ("params", "weight shape", "rms", *scales, "chain", "notes"):
        table.add_column(column, justify="right", no_wrap=column != "notes")
    shown = rows if len(rows) <= MAX_TABLE_ROWS else [
        r for r in rows if r.name in flagged or r.chain is not None][:MAX_TABLE_ROWS]
    for row in shown:
        weight = next((t for t in row.tensors if t.name.endswith("weight")), None)
        notes = []
        if row.nonfinite:
            notes.append(f"{row.nonfinite} NaN/Inf")
        if row.dead_channels:
            notes.append(f"{row.dead_channels}/{row.channels} dead ch.")
        if row.zero_initialized:
            notes.append("zero-init")
        style = {"error": "red", "warning": "yellow"}.get(flagged.get(row.name, ""), "")
        table.add_row(Text(printable(row.name)), row.kind, f"{row.params:,}",
                      "x".join(map(str, weight.shape)) if weight else "-",
                      fmt(row.weight_rms), *(fmt(row.get(k)) for k in scales.values()),
                      "-" if row.chain is None else str(row.chain),
                      ", ".join(notes), style=style)
    if len(shown) < len(rows):
        table.add_row(f"... {len(rows) - len(shown)} more modules (see --json)",
                      *[""] * (6 + len(scales)))
    return table


def render_checkpoint_text(report: Report, console: Console) -> None:
    """Print a data-free checkpoint report."""
    console.print(_checkpoint_header(report))
    extras = report.summary.get("extras") or {}
    if extras:
        console.print(Text("also in the file: " + "; ".join(
            f"{printable(k)}: {printable(v)}" for k, v in extras.items()), style="dim"))
    _status_and_findings(report, console)
    console.print()
    console.print(checkpoint_table(report))
    family = "init x: weight RMS over the std the model's family initializes it at (what " \
        "transformer findings judge); " if "init x" in _scale_columns(report) else ""
    console.print(Text(f"{family}He x / Xavier x: weight RMS over the He std sqrt(2/fan_in) / "
                       "the Xavier std sqrt(2/(fan_in+fan_out)); chain: layers with no "
                       "normalization between them", style="dim"))
    for note in report.notes:
        console.print(Text(f"note: {printable(note)}", style="yellow"))


def render_report(report: Report, console: Console) -> None:
    """Print any report as rich text, choosing the layout by its type."""
    if isinstance(report, CheckpointReport):
        render_checkpoint_text(report, console)
    elif isinstance(report, LRFindResult):
        render_lr_find(report, console)
    else:
        render_text(report, console)


def render_lr_find(result: LRFindResult, console: Console) -> None:
    """Print a range-test result: suggestion, reason, warnings and the curve per decade."""
    s = result.summary
    console.print(Text.assemble(
        ("nndiag lr-find ", "bold"), (str(s.get("optimizer")), "bold cyan"),
        f": {s.get('steps_run')} of {s.get('steps')} steps from {s.get('start_lr'):.0e} to "
        f"{s.get('end_lr'):g} (accumulate {s.get('accumulate')}); stopped: "
        f"{result.stopped_because}"))
    status = result.status
    line = Text(f" {status.upper()} ", style=f"reverse {STYLE[status]}")
    if result.suggested_lr is not None:
        line.append("  suggested learning rate ")
        line.append(f"{result.suggested_lr:.2e}", style="bold")
        if result.lr_low and result.lr_high:
            line.append(f"   (useful range {result.lr_low:.1e} .. {result.lr_high:.1e})")
    else:
        line.append("  no learning rate can be suggested from this curve")
    console.print(line)
    console.print(Padding(Text(f"why: {result.reason}"), (0, 0, 0, 2)))
    ratios = s.get("param_group_lr_ratios") or []
    if len(ratios) > 1:
        console.print(Padding(Text(f"{len(ratios)} param groups: their learning rates keep the "
                                   f"ratios {', '.join(f'{r:g}' for r in ratios)}",
                                   style="dim"), (0, 0, 0, 2)))
    _findings(result, console)
    if result.trials:
        _lr_trials(result, console)
    table = Table(title="Loss by learning rate", title_justify="left", header_style="bold",
                  box=None, pad_edge=False)
    for column in ("learning rate", "loss", "smoothed"):
        table.add_column(column, justify="right")
    shown_half_decade, marked = None, False
    for lr, raw, smooth in zip(result.lrs, result.losses, result.smoothed, strict=False):
        half_decade = math.floor(math.log10(lr) * 2)
        suggested = bool(result.suggested_lr) and not marked and lr >= result.suggested_lr
        if half_decade == shown_half_decade and not suggested:
            continue
        shown_half_decade = half_decade
        marked = marked or suggested
        table.add_row(f"{lr:.1e}", fmt(raw), fmt(smooth) + (" <- suggested" if suggested
                                                            else ""),
                      style="bold" if suggested else "")
    console.print()
    console.print(table)


def _lr_trials(result: LRFindResult, console: Console) -> None:
    """The trials of the range test's candidates: learning rate, steps run, loss after them."""
    finite = [t.loss for t in result.trials if t.loss is not None]
    best = min(finite) if finite else None
    table = Table(title="Trials from the same start", title_justify="left",
                  header_style="bold", box=None, pad_edge=False)
    for column in ("learning rate", "steps", "loss after"):
        table.add_column(column, justify="right")
    for trial in result.trials:
        won = best is not None and trial.loss == best
        loss = "diverged" if trial.loss is None else fmt(trial.loss)
        table.add_row(f"{trial.lr:.2e}", str(trial.steps),
                      loss + (" <- best" if won else ""), style="bold" if won else "")
    console.print()
    console.print(table)
    samples = result.summary.get("trial_eval_samples")
    if samples and result.summary.get("trial_scored_on") == "validation":
        console.print(Text(f"loss after: on {samples} validation samples", style="dim"))
    elif samples:
        console.print(Text(f"loss after: on the first {samples} training samples, which the "
                           "trials also train on (--val-data: score on held-out data)",
                           style="dim"))
    if result.curve_lr:
        console.print(Text(f"the curve alone (--no-trials) reads {result.curve_lr:.2e}",
                           style="dim"))


def render_check(report: Report, console: Console) -> None:
    """Print a check: the run (recorded or short), status, findings with the step each appeared."""
    s = report.summary
    training = s.get("mode") == "training"
    what = "training gate" if training else str(s.get("run"))
    console.print(Text.assemble(
        ("nndiag check ", "bold"), (what, "bold cyan"),
        f": {s.get('model')} with {s.get('optimizer')}; {s.get('steps')} steps, "
        f"{s.get('samples')} sampled every {s.get('every')}"
        + (f" on {s['world_size']} ranks" if (s.get("world_size") or 1) > 1 else "")
        + (f"; final loss {fmt(s.get('final_loss'))}" if s.get("final_loss") is not None
           else "")))
    if training:
        console.print(Text(f"loss at init {fmt(s.get('loss_at_init'))} (uninformed model: "
                           f"{fmt(s.get('expected_loss_at_init'))}); learning rate "
                           f"{fmt(s.get('lr'))}; seed {s.get('seed')}", style="dim"))
    _status_and_findings(report, console)
    for note in report.notes:
        console.print(Text(f"note: {note}", style="yellow"))
