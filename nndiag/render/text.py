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


def inert(*parts: str | tuple[str, str], style: str = "") -> Text:
    """Rich text of plain parts, each a string or ``(string, style)``, safe for a terminal.

    Every part goes through ``printable`` (control characters, terminal escapes and
    bidirectional overrides are written as visible escapes), and a ``Text`` is never read as
    markup, so a model or layer named ``"[bold]x"`` prints as it is. Every string the
    renderers below print is built here: a name from a user's model, a checkpoint or a run
    log cannot reach the terminal raw.
    """
    return Text.assemble(*[(printable(part[0]), part[1]) if isinstance(part, tuple)
                           else printable(part) for part in parts], style=style)


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
    badge = (f" {status.upper()} ", f"reverse {STYLE[status]}")
    if not report.findings:
        return inert(badge, ("  no problem found", STYLE["ok"]))
    parts = [f"{n} {s}{'s' if n > 1 else ''}" for s, n in counts.items() if n]
    return inert(badge, "  " + ", ".join(parts))


def _header(report: Report) -> Text:
    s = report.summary
    frozen = f", {s['frozen_parameters']:,} frozen" if s.get("frozen_parameters") else ""
    return inert(
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
        return inert(f"not tried automatically: {v.get('reason')}", style="dim")
    changes = ", ".join(f"{k} {fmt(v['before'].get(k))} -> {fmt(v['after'].get(k))}"
                        for k in v["before"])
    verdict = ("resolved" if v["resolved"] else f"still {v['severity_after']}")
    new = (f"; new findings after the fix: {', '.join(v['new_findings'])}"
           if v.get("new_findings") else "")
    return inert(("verified on a copy: ", "dim"),
                 (verdict, "green" if v["resolved"] else "yellow"), f" ({changes})",
                 (new, "yellow"))


def _finding(finding: Finding) -> Group:
    parts: list[Any] = []
    parts.append(inert((f"[{finding.severity}] ", STYLE[finding.severity]),
                       (finding.id, "bold"), f"  {finding.summary}"))
    if finding.explanation:
        parts.append(Padding(inert(finding.explanation), (0, 0, 0, 4)))
    if finding.layers:
        shown = ", ".join(finding.layers[:8]) + (
            f" ... (+{len(finding.layers) - 8})" if len(finding.layers) > 8 else "")
        parts.append(Padding(inert(f"layers: {shown}", style="dim"), (0, 0, 0, 4)))
    for number, fix in enumerate(finding.fixes, 1):
        parts.append(Padding(inert((f"{number}. ", "bold"), (fix.id, "bold magenta"),
                                   f": {fix.summary}"), (0, 0, 0, 4)))
        verified = _verified(fix)
        if verified is not None:
            parts.append(Padding(verified, (0, 0, 0, 7)))
        if fix.code:  # one line each: the code's own line breaks are kept
            code = Text("\n", style="dim cyan").join(map(inert, fix.code.split("\n")))
            parts.append(Padding(code, (0, 0, 0, 7)))
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
        table.add_row(str(row.index), inert(row.name), inert(row.kind),
                      fmt(row.std), share,
                      fmt(row.depth_gain), fmt(row.grad_to_weight), init,
                      style=style)
    return table


def render_text(report: Report, console: Console) -> None:
    """Print the report: header, status line, findings with fixes, per-layer table, notes."""
    console.print(_header(report))
    checkpoint = report.summary.get("checkpoint")
    if checkpoint:
        console.print(inert(f"weights from {checkpoint['path']} ({checkpoint['format']})",
                            style="dim"))
    _status_and_findings(report, console)
    console.print()
    console.print(layer_table(report))
    console.print(inert("gain: gradient norm at the layer's output / at the model output; "
                        "init: weight RMS / the He or Xavier (Xav) std for its fans",
                        style="dim"))
    _notes(report, console)


def _notes(report: Report, console: Console) -> None:
    for note in report.notes:
        console.print(inert(f"note: {note}", style="yellow"))


def _checkpoint_header(report: Report) -> Text:
    s = report.summary
    where = f" (weights under {s['weights_key']!r})" if s.get("weights_key") else ""
    dtypes = ", ".join(f"{k} {v:,}" for k, v in s.get("dtypes", {}).items())
    return inert(
        ("nndiag inspect ", "bold"), (str(s.get("path")), "bold cyan"),
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
        table.add_row(inert(row.name), inert(row.kind), f"{row.params:,}",
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
        console.print(inert("also in the file: " + "; ".join(
            f"{k}: {v}" for k, v in extras.items()), style="dim"))
    _status_and_findings(report, console)
    console.print()
    console.print(checkpoint_table(report))
    family = "init x: weight RMS over the std the model's family initializes it at (what " \
        "transformer findings judge); " if "init x" in _scale_columns(report) else ""
    console.print(inert(f"{family}He x / Xavier x: weight RMS over the He std sqrt(2/fan_in) / "
                        "the Xavier std sqrt(2/(fan_in+fan_out)); chain: layers with no "
                        "normalization between them", style="dim"))
    _notes(report, console)


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
    console.print(inert(
        ("nndiag lr-find ", "bold"), (str(s.get("optimizer")), "bold cyan"),
        f": {s.get('steps_run')} of {s.get('steps')} steps from {s.get('start_lr'):.0e} to "
        f"{s.get('end_lr'):g} (accumulate {s.get('accumulate')}); stopped: "
        f"{result.stopped_because}"))
    status = result.status
    badge = (f" {status.upper()} ", f"reverse {STYLE[status]}")
    if result.suggested_lr is not None:
        useful = (f"   (useful range {result.lr_low:.1e} .. {result.lr_high:.1e})"
                  if result.lr_low and result.lr_high else "")
        console.print(inert(badge, "  suggested learning rate ",
                            (f"{result.suggested_lr:.2e}", "bold"), useful))
    else:
        console.print(inert(badge, "  no learning rate can be suggested from this curve"))
    console.print(Padding(inert(f"why: {result.reason}"), (0, 0, 0, 2)))
    ratios = s.get("param_group_lr_ratios") or []
    if len(ratios) > 1:
        console.print(Padding(inert(f"{len(ratios)} param groups: their learning rates keep the "
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
        console.print(inert(f"loss after: on {samples} validation samples", style="dim"))
    elif samples and result.summary.get("trial_scored_on") == "held_out":
        console.print(inert(f"loss after: on {samples} samples held out of the training data "
                            "(the trials cycle it, so they trained on the rest)", style="dim"))
    elif samples:
        console.print(inert(f"loss after: on the first {samples} training samples, which the "
                            "trials also train on (--val-data: score on held-out data)",
                            style="dim"))
    budget = result.summary.get("budget")
    steps = result.summary.get("trial_steps")
    console.print(inert(f"aimed at a run of {budget} steps (--budget)" if budget else
                        f"aimed at a run longer than the {steps}-step trials (--budget STEPS: "
                        "aimed at yours)", style="dim"))
    if result.curve_lr:
        console.print(inert(f"the curve alone (--no-trials) reads {result.curve_lr:.2e}",
                            style="dim"))


def render_check(report: Report, console: Console) -> None:
    """Print a check: the run (recorded or short), status, findings with the step each appeared."""
    s = report.summary
    training = s.get("mode") == "training"
    what = "training gate" if training else str(s.get("run"))
    console.print(inert(
        ("nndiag check ", "bold"), (what, "bold cyan"),
        f": {s.get('model')} with {s.get('optimizer')}; {s.get('steps')} steps, "
        f"{s.get('samples')} sampled every {s.get('every')}"
        + (f" on {s['world_size']} ranks" if (s.get("world_size") or 1) > 1 else "")
        + (f"; final loss {fmt(s.get('final_loss'))}" if s.get("final_loss") is not None
           else "")))
    if training:
        console.print(inert(f"loss at init {fmt(s.get('loss_at_init'))} (uninformed model: "
                            f"{fmt(s.get('expected_loss_at_init'))}); learning rate "
                            f"{fmt(s.get('lr'))}; seed {s.get('seed')}", style="dim"))
    _status_and_findings(report, console)
    _notes(report, console)
