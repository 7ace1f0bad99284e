"""The reference pages of the documentation, generated from the code when the site is built.

``mkdocs.yml`` loads this module as a hook. A page of ``docs/`` holds its hand-written prose
and a marker, ``<!-- nndiag:NAME -->``, that the hook replaces with the Markdown ``GENERATORS``
writes for ``NAME``: the findings (read from the rule registry, the threshold tables, the advice
registry and the fix catalogue), the command-line reference (from the typer app), the JSON
contracts (from ``nndiag/schemas``), the run-log format (from ``nndiag.runlog`` and a recorded
sample run) and the benchmarks (``benchmarks/README.md``). Nothing in those pages is copied by
hand, so they cannot drift from the code; ``tests/test_docs.py`` checks that they are complete.

Which thresholds a rule judges by, and which fixes an advisor may recommend, are read from the
rule's and the advisor's source: the keys it reads from its ``dict[str, Threshold]`` argument,
the numeric constants it names, and the fix ids it gives ``make_fix``, following the functions
of its package that it calls.
"""

from __future__ import annotations

import ast
import dataclasses
import html
import importlib
import inspect
import json
import re
import textwrap
from collections.abc import Callable, Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!--\s*nndiag:([a-z_-]+)\s*-->")

# ------------------------------------------------------------------------------- source reading


def _unwrap(function: Callable[..., Any]) -> list[FunctionType]:
    """A function and the functions its closure holds (a registry wrapper around a rule)."""
    found = [function] if isinstance(function, FunctionType) else []
    for cell in getattr(function, "__closure__", None) or ():
        contents = cell.cell_contents
        if isinstance(contents, FunctionType):
            found.append(contents)
    return found


@cache
def _tree(function: FunctionType) -> ast.AST:
    """The syntax tree of a function's own source."""
    return ast.parse(textwrap.dedent(inspect.getsource(function)))


def _resolve(function: FunctionType, node: ast.expr) -> Any:
    """What a name or ``module.name`` in a function's body refers to, if it can be told."""
    scope = dict(function.__globals__)
    if function.__closure__:
        scope.update(zip(function.__code__.co_freevars,
                         (c.cell_contents for c in function.__closure__), strict=True))
    if isinstance(node, ast.Name):
        return scope.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _resolve(function, node.value)
        if isinstance(owner, ModuleType | type):
            return getattr(owner, node.attr, None)
    return None


def _functions_named(function: FunctionType, package: str) -> Iterator[FunctionType]:
    """The functions of ``package`` that a function calls or names (a tuple of them too)."""
    for node in ast.walk(_tree(function)):
        if isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Load):
            target = _resolve(function, node)
            members = target if isinstance(target, tuple | list) else (target,)
            for member in members:
                if isinstance(member, FunctionType) and member.__module__.startswith(package):
                    yield member


def _call_graph(roots: list[FunctionType], package: str) -> list[FunctionType]:
    """The functions reachable from ``roots`` through the functions of ``package`` they name."""
    seen: list[FunctionType] = []
    todo = list(roots)
    while todo:
        function = todo.pop(0)
        if function not in seen:
            seen.append(function)
            todo += _functions_named(function, package)
    return seen


def _threshold_parameters(function: FunctionType) -> set[str]:
    """The parameters of a function annotated as a thresholds table."""
    tree = _tree(function)
    definition = next(n for n in ast.walk(tree)
                      if isinstance(n, ast.FunctionDef | ast.Lambda))
    if isinstance(definition, ast.Lambda):  # a registry wrapper: ``lambda record, thresholds``
        return {a.arg for a in definition.args.args[1:]}
    return {a.arg for a in definition.args.args
            if a.annotation is not None and "Threshold]" in ast.unparse(a.annotation)}


def _strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


def threshold_keys(function: FunctionType) -> set[str]:
    """The keys a function reads from its thresholds-table argument.

    ``thresholds["name"]``, ``thresholds.get("name")`` and ``helper(thresholds, "name")``
    (a conditional key counts both ways).
    """
    params = _threshold_parameters(function)
    keys: set[str] = set()
    for node in ast.walk(_tree(function)):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) \
                and node.value.id in params:
            keys |= _strings(node.slice)
        elif isinstance(node, ast.Call):
            on_table = (isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                        and isinstance(node.func.value, ast.Name)
                        and node.func.value.id in params)
            passes_table = any(isinstance(a, ast.Name) and a.id in params for a in node.args)
            if on_table or passes_table:
                for arg in node.args:
                    keys |= _strings(arg)
    return keys


def named_constants(function: FunctionType) -> dict[str, tuple[Any, str]]:
    """The module-level numeric constants and frozen dataclass settings a function names.

    Returns:
        name -> (value, the module that assigns it).
    """
    found: dict[str, tuple[Any, str]] = {}
    for node in ast.walk(_tree(function)):
        if isinstance(node, ast.Name) and node.id.isupper() and not node.id.startswith("_"):
            value = function.__globals__.get(node.id)
            if isinstance(value, int | float) and not isinstance(value, bool) or \
                    dataclasses.is_dataclass(value) and not isinstance(value, type):
                found[node.id] = (value, _defining_module(node.id, function.__module__))
    return found


def _defining_module(name: str, module_name: str) -> str:
    """The module that assigns ``name``: ``module_name`` or the one it imports it from."""
    if name in _comments_above(module_name):
        return module_name
    tree = ast.parse(inspect.getsource(importlib.import_module(module_name)))
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any(a.name == name for a in node.names):
            return _defining_module(name, node.module or module_name)
    return module_name


def _fix_ids(function: FunctionType, catalog: dict[str, Any]) -> list[str]:
    """The fix ids a function hands to a function that builds fixes, in source order."""
    ids = []
    for node in ast.walk(_tree(function)):
        if isinstance(node, ast.Call):
            for arg in node.args[:1]:
                if isinstance(arg, ast.Constant) and arg.value in catalog:
                    ids.append(arg.value)
    return ids


@cache
def _comments_above(module_name: str) -> dict[str, str]:
    """For each module-level assignment, the comment lines just above it."""
    module = importlib.import_module(module_name)
    lines = inspect.getsource(module).splitlines()
    comments: dict[str, str] = {}
    previous = ""
    for node in ast.parse("\n".join(lines)).body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else \
            getattr(node, "targets", [])
        for target in targets:
            if isinstance(target, ast.Name):
                above, line = [], node.lineno - 2
                while line >= 0 and lines[line].lstrip().startswith("#"):
                    above.insert(0, lines[line].lstrip()[1:].strip())
                    line -= 1
                comment = " ".join(above)
                if comment.startswith("...") and previous.endswith("..."):  # one sentence
                    comment = previous[:-3].rstrip() + comment[3:]
                comments[target.id] = comment
                previous = comment or previous
    return comments


def docstring_attributes(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of a class's Google-style docstring, by name."""
    doc = inspect.getdoc(cls) or ""
    section = re.search(r"^Attributes:\n((?:[ \t]+.*\n?|\n)*)", doc, re.MULTILINE)
    if section is None:
        return {}
    found: dict[str, str] = {}
    current = None
    for line in textwrap.dedent(section.group(1)).splitlines():
        match = re.match(r"^(\w+): (.*)", line)
        if match:
            current = match.group(1)
            found[current] = match.group(2).strip()
        elif current and line.strip():
            found[current] += " " + line.strip()
    return found


def _first_paragraph(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


# ------------------------------------------------------------------------------- Markdown pieces


def _cell(text: Any) -> str:
    """Text for a table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _number(value: float) -> str:
    return f"{value:g}"


def _code(text: str, wrap: bool = True) -> str:
    """Inline code for a table cell: any text, pipes included (``wrap=False``: one line)."""
    shown = html.escape(text).replace("|", "&#124;")
    attributes = "" if wrap else ' class="nowrap"'
    return f"<code{attributes}>{shown}</code>"


def _breakable(name: str) -> str:
    """A long identifier as code that may wrap after its underscores and dots."""
    return "<code>" + re.sub(r"([_.])", r"\1<wbr>", name) + "</code>"


def _rst_to_md(text: str) -> str:
    """Docstrings write code as ``code``; Markdown as `code`."""
    return re.sub(r"``(.+?)``", r"`\1`", text)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


# ------------------------------------------------------------------------------------ findings

# What runs the rules of each context record: where a finding of that context appears.
CONTEXTS: dict[str, tuple[str, str]] = {
    "ProbeRecord": ("a live probe",
                    "`nndiag inspect --model` (and `inspect CHECKPOINT --model`), "
                    "`inspect_model`, the CI gate's inspection at init"),
    "CheckpointRecord": ("a checkpoint read without data",
                         "`nndiag inspect CHECKPOINT`, `inspect_checkpoint`"),
    "LoadResult": ("a checkpoint loaded into an architecture with `--non-strict`",
                   "`nndiag inspect CHECKPOINT --model ... --non-strict`"),
    "RunLog": ("a recorded run",
               "`nndiag check RUN_DIR`, `nndiag report`, `nndiag export`, `Monitor`'s close, "
               "the Lightning and Hugging Face callbacks, the CI gate's short run"),
    "SanityRecord": ("the CI gate's checks of the training step",
                     "`nndiag check --model --data`, the `nndiag_check` pytest fixture"),
    "LRCurveRecord": ("lr-find's range-test curve", "`nndiag lr-find`, `lr_find`"),
    "TrialsRecord": ("lr-find's trial trainings", "`nndiag lr-find`, `lr_find`"),
}
# The advice registry's context kinds, as the record types above.
ADVICE_KINDS: dict[str, tuple[str, ...]] = {
    "probe": ("ProbeRecord",), "checkpoint": ("CheckpointRecord", "LoadResult"),
    "run": ("RunLog",), "sanity": ("SanityRecord",),
    "lr_curve": ("LRCurveRecord", "TrialsRecord"),
}
SEVERITY_WORDS = ("info", "warning", "error")


@dataclasses.dataclass
class RuleEntry:
    """One rule of the registry as the reference shows it."""

    context: str
    function: FunctionType
    thresholds: list[str]
    constants: dict[str, tuple[Any, str]]
    severities: list[str]
    fixes: list[str]


def _severities(functions: list[FunctionType], thresholds: list[str], finding_id: str
                ) -> list[str]:
    """The severities a rule can give a finding: its thresholds' levels, and those it writes.

    Written: a literal in the severity argument of a ``Finding`` of this id (or of an id in a
    variable), or assigned to a name or attribute called ``severity``.
    """
    from nndiag.findings import Finding, FindingId

    found = {"warning", "error"} if thresholds else set()
    for function in functions:
        for node in ast.walk(_tree(function)):
            if isinstance(node, ast.Call) and _resolve(function, node.func) is Finding \
                    and node.args:
                named = _resolve(function, node.args[0])
                if isinstance(named, FindingId) and named != finding_id:
                    continue
                found |= _strings(node.args[1]) if len(node.args) > 1 else set()
                found |= set().union(*(_strings(k.value) for k in node.keywords
                                       if k.arg == "severity"))
            elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any("severity" in ast.unparse(t) for t in targets):
                    found |= _strings(node.value)
    return [s for s in SEVERITY_WORDS if s in found]


def rule_entries() -> dict[str, list[RuleEntry]]:
    """Every finding id, in ``FindingId`` order, with the rules that report it."""
    from nndiag.advice import REGISTRY as ADVICE
    from nndiag.advice.catalog import CATALOG
    from nndiag.findings import FindingId
    from nndiag.rules.registry import RULES

    tables = _threshold_tables()
    entries: dict[str, list[RuleEntry]] = {f.value: [] for f in FindingId}
    for rule in RULES:
        functions = _call_graph(_unwrap(rule.check), "nndiag.rules")
        keys = sorted(set().union(*(threshold_keys(f) for f in functions)) & set(tables),
                      key=list(tables).index)
        constants: dict[str, tuple[Any, str]] = {}
        for function in functions:
            constants.update(named_constants(function))
        context = rule.context.__name__
        for finding_id in rule.ids:
            fixes: list[str] = []
            for kind, contexts in ADVICE_KINDS.items():
                advisor = ADVICE.get((kind, finding_id.value))
                if advisor is not None and context in contexts:
                    for function in _call_graph(_unwrap(advisor), "nndiag.advice"):
                        fixes += _fix_ids(function, CATALOG)
            entries[finding_id.value].append(RuleEntry(
                context, _unwrap(rule.check)[-1], keys, constants,
                _severities(functions, keys, finding_id), list(dict.fromkeys(fixes))))
    return entries


def _threshold_tables() -> dict[str, tuple[str, Any]]:
    """Every threshold by name: the table that holds it and its ``Threshold``."""
    from nndiag.rules import thresholds

    found: dict[str, tuple[str, Any]] = {}
    for table in ("THRESHOLDS", "RUN_THRESHOLDS", "CHECKPOINT_THRESHOLDS"):
        for name, threshold in getattr(thresholds, table).items():
            found.setdefault(name, (table, threshold))
    return found


def _constant_rows(constants: dict[str, tuple[Any, str]]) -> list[list[str]]:
    rows = []
    for name, (value, module) in constants.items():
        if dataclasses.is_dataclass(value):
            described = docstring_attributes(type(value))
            for field in dataclasses.fields(value):
                rows.append([f"{_breakable(name + '.' + field.name)}<br>in {_breakable(module)}",
                             _number(getattr(value, field.name)),
                             _cell(_rst_to_md(described.get(field.name, "")))])
        else:
            rows.append([f"{_breakable(name)}<br>in {_breakable(module)}", _number(value),
                         _cell(_rst_to_md(_comments_above(module).get(name, "")))])
    return rows


def _explained(finding_id: str) -> tuple[list[str], list[str]]:
    """The findings this one explains (as a root cause) and those that explain it."""
    from nndiag.advice.causes import LINKS

    explains = [s.value for link in LINKS if link.cause == finding_id for s in link.symptoms]
    explained_by = [link.cause.value for link in LINKS if finding_id in link.symptoms]
    return list(dict.fromkeys(explains)), list(dict.fromkeys(explained_by))


def findings_markdown() -> str:
    """Every finding, the rules that report it, their thresholds and fixes; the fix catalogue."""
    from nndiag.advice.catalog import CATALOG

    tables = _threshold_tables()
    entries = rule_entries()
    lines: list[str] = []
    summary_rows = []
    for finding_id, rules in entries.items():
        severities = [s for s in SEVERITY_WORDS if any(s in r.severities for r in rules)]
        where = ", ".join(dict.fromkeys(CONTEXTS[r.context][0] for r in rules))
        summary_rows.append([f"[`{finding_id}`](#{finding_id})", ", ".join(severities),
                             _cell(where)])
    lines += ["## Every finding", ""]
    lines += _table(["finding", "severity", "judged on"], summary_rows)
    for finding_id, rules in entries.items():
        lines += [f"## `{finding_id}` {{#{finding_id}}}", ""]
        explains, explained_by = _explained(finding_id)
        if explains:
            lines += ["Root cause of: " + ", ".join(f"[`{s}`](#{s})" for s in explains)
                      + " (found beside it, they name it, drop the fixes that treat the "
                        "symptom and, when it is an error, drop to `info`).", ""]
        if explained_by:
            lines += ["Can be explained by: " + ", ".join(f"[`{c}`](#{c})" for c in explained_by)
                      + ".", ""]
        for rule in rules:
            label, commands = CONTEXTS[rule.context]
            lines += [f"### On {label}", "",
                      f"*Rule* `{rule.function.__module__}.{rule.function.__name__}` "
                      f"(reads a `{rule.context}`; appears in {commands}).", "",
                      _rst_to_md(_first_paragraph(rule.function)), "",
                      "**Severity:** " + (", ".join(rule.severities) or "as the rule decides")
                      + ".", ""]
            if rule.thresholds:
                rows = []
                for key in rule.thresholds:
                    table, threshold = tables[key]
                    bad = "&ge;" if threshold.higher_is_worse else "&le;"
                    rows.append([f"{_breakable(key)}<br>in {_breakable(table)}",
                                 f"{bad} {_number(threshold.warning)}",
                                 f"{bad} {_number(threshold.error)}", _cell(threshold.reason)])
                lines += ["**Thresholds** (`nndiag/rules/thresholds.py`):", ""]
                lines += _table(["threshold", "warning", "error", "reason"], rows)
            constant_rows = _constant_rows(rule.constants)
            if constant_rows:
                lines += ["**Constants:**", ""]
                lines += _table(["constant", "value", "reason"], constant_rows)
            if rule.fixes:
                lines += ["**Fixes it can recommend**, in the order the advice tries them:", ""]
                lines += [f"- [`{fix}`](#fix-{fix}): {_cell(CATALOG[fix].summary)}"
                          for fix in rule.fixes]
                lines += [""]
    lines += ["## Fix catalogue", "",
              "Every fix, with the code it shows (`{placeholders}` are filled in for your "
              "model: its layer types, an activation, a number of blocks...). *Automatic* "
              "fixes are applied to a copy and re-measured by `--try-fixes`.", ""]
    for fix_id, template in CATALOG.items():
        automatic = " (automatic)" if template.automatic else ""
        lines += [f"### `{fix_id}`{automatic} {{#fix-{fix_id}}}", "", template.summary + ".", "",
                  "```python", template.code.strip("\n"), "```", ""]
        for variant, wording in template.variants.items():
            lines += [f"Variant `{variant}`: {wording.summary}.", "",
                      "```python", wording.code.strip("\n"), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- CLI


def cli_command():
    """The click command behind the typer app."""
    import typer.main

    from nndiag.cli.app import app

    return typer.main.get_command(app)


def _help_markdown(text: str) -> list[str]:
    """A command's help: paragraphs as text, an indented block under a heading as code."""
    lines: list[str] = []
    for paragraph in inspect.cleandoc(text).split("\n\n"):
        first, *rest = paragraph.splitlines()
        if rest and first.endswith(":") and all(r.startswith(" ") for r in rest):
            lines += [f"**{first}**", "", "```text", textwrap.dedent("\n".join(rest)), "```", ""]
        else:
            lines += [_rst_to_md(" ".join(paragraph.split())), ""]
    return lines


def _param_rows(command: Any, ctx: Any) -> list[list[str]]:
    """One row per argument and option of a command: name, value, default, help."""
    rows = []
    for param in command.params:
        shown = param.metavar or param.display_type(ctx).strip("<>")
        if param.param_type_name == "argument":
            name, value = _code(param.metavar or param.name.upper(), wrap=False), "argument"
            default = "optional" if not param.required else "required"
        else:
            name = ", ".join(_code(o, wrap=False) for o in [*param.opts, *param.secondary_opts])
            value = "flag" if param.is_flag else _code(shown)
            default_value = getattr(param.default, "value", param.default)
            default = ("required" if param.required
                       else "-" if default_value is None or default_value is False
                       else _code(param.opts[0]) if default_value is True and param.is_flag
                       else _code(str(default_value)))
        rows.append([name, value, default, _cell(param.help or "")])
    return rows


def cli_markdown() -> str:
    """Every command of the typer app with its usage, help and every option."""
    group = cli_command()
    lines: list[str] = []
    with group.context_class(group, info_name="nndiag") as ctx:
        lines += ["```", group.get_usage(ctx).removeprefix("Usage: "), "```", ""]
        lines += _help_markdown(group.help or "")
        lines += _table(["option", "value", "default", "meaning"], _param_rows(group, ctx))
    for name, command in group.commands.items():
        with command.context_class(command, info_name=f"nndiag {name}") as ctx:
            usage = command.get_usage(ctx).removeprefix("Usage: ")
            rows = _param_rows(command, ctx)
        lines += [f"## `nndiag {name}` {{#{name}}}", "", "```", usage, "```", ""]
        lines += _help_markdown(command.help or "")
        lines += _table(["option", "value", "default", "meaning"], rows)
    return "\n".join(lines)


# --------------------------------------------------------------------------------- JSON contracts

# Which commands write each contract.
WRITERS: dict[str, str] = {
    "nndiag.inspect/1": "`nndiag inspect --json` on a model (or a checkpoint loaded with "
                        "`--model`), `inspect_model(...).to_dict()`",
    "nndiag.inspect-checkpoint/1": "`nndiag inspect CHECKPOINT --json` without `--model`, "
                                   "`inspect_checkpoint(path).to_dict()`",
    "nndiag.lr-find/1": "`nndiag lr-find --json`, `lr_find(...).to_dict()`",
    "nndiag.check/1": "`nndiag check RUN_DIR --json`, `nndiag check --model ... --json`, "
                      "`check_run(...).to_dict()`, `check_training(...).to_dict()`",
}


def schemas() -> dict[str, dict[str, Any]]:
    """Every JSON Schema shipped in the package, by file name."""
    folder = resources.files("nndiag").joinpath("schemas")
    return {entry.name: json.loads(entry.read_text(encoding="utf-8"))
            for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".schema.json")}


def _type_of(spec: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in spec:
        return _type_of(defs[spec["$ref"].rsplit("/", 1)[-1]], defs)
    if "const" in spec:
        return f"`{json.dumps(spec['const'])}`"
    if "enum" in spec:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in spec["enum"])
    if "oneOf" in spec:
        return " or ".join(_type_of(s, defs) for s in spec["oneOf"])
    kind = spec.get("type", "any")
    if kind == "array" and "items" in spec:
        return f"array of {_type_of(spec['items'], defs)}"
    return " or ".join(kind) if isinstance(kind, list) else kind


def contracts_markdown() -> str:
    """Each JSON contract: who writes it, its top-level fields, and the whole schema."""
    lines: list[str] = []
    for file_name, schema in schemas().items():
        schema_id = schema["$id"]
        anchor = schema_id.removeprefix("nndiag.").replace("/", "-")
        lines += [f"## `{schema_id}` {{#{anchor}}}", "", schema.get("title", "") + ".", "",
                  f"Written by {WRITERS[schema_id]}. Schema: `nndiag/schemas/{file_name}`.", ""]
        if schema.get("description"):
            lines += [schema["description"], ""]
        defs = schema.get("$defs", {})
        required = set(schema.get("required", []))
        rows = [[f"`{name}`", "yes" if name in required else "no",
                 _cell(_type_of(spec, defs)), _cell(spec.get("description", ""))]
                for name, spec in schema["properties"].items()]
        lines += _table(["field", "required", "type", "meaning"], rows)
        lines += [f'??? note "The whole schema: {file_name}"', "",
                  textwrap.indent("```json\n" + json.dumps(schema, indent=2) + "\n```", "    "),
                  ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- run log


def runlog_markdown() -> str:
    """The run-log format from ``nndiag.runlog`` and a run recorded in ``sample_runs/``."""
    from nndiag import runlog
    from nndiag.records import STEP_COLUMNS, LayerRecord, StepRecord

    lines = [f"Current schema: `{runlog.SCHEMA}`; read: "
             + ", ".join(f"`{s}`" for s in runlog.READABLE_SCHEMAS) + ".", ""]
    doc = inspect.getdoc(runlog) or ""
    lines += [_rst_to_md(doc).replace("::\n", ":\n\n```text", 1)
              .replace("\n\nA step's", "\n```\n\nA step's", 1), ""]
    sample = ROOT / "sample_runs" / "healthy"
    meta = json.loads((sample / runlog.META).read_text(encoding="utf-8"))
    meta["weight_layers"] = meta["weight_layers"][:2] + ["..."]
    first_steps = (sample / runlog.STEPS).read_text(encoding="utf-8").splitlines()[:2]
    first_sample = json.loads((sample / runlog.SAMPLES).read_text(encoding="utf-8")
                              .splitlines()[0])
    columns = first_sample["layers"]
    lines += ["## `meta.json`", "",
              "From `sample_runs/healthy` (recorded by `sample_runs/record.py`):", "",
              "```json", json.dumps(meta, indent=1), "```", "",
              f"## `{runlog.STEPS}`", "",
              "One line per flush: the losses and learning rates of consecutive steps from "
              "`first`.", "", "```json", *first_steps, "```", "",
              f"## `{runlog.SAMPLES}`", "",
              "One line per sampled step (`StepRecord`): "
              + "; ".join(f"`{k}`: {_rst_to_md(v)}" for k, v
                          in docstring_attributes(StepRecord).items()) + ". "
              "The layers are columns, one list per field, one entry per layer (call site) "
              "in forward order; a field no layer has is left out.", "",
              "```json",
              json.dumps({**first_sample, "layers": {k: v[:3] + ["..."]
                                                     for k, v in columns.items()}}),
              "```", ""]
    described = docstring_attributes(LayerRecord)
    lines += _table(["column", "meaning"],
                    [[f"`{name}`", _cell(_rst_to_md(described.get(name, "")))]
                     for name in STEP_COLUMNS])
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ benchmarks


def benchmarks_markdown() -> str:
    """``benchmarks/README.md`` without its title (the page has its own)."""
    text = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    return text.split("\n", 1)[1].lstrip("\n")


def changelog_markdown() -> str:
    """``CHANGELOG.md`` without its title (the page has its own)."""
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    return text.split("\n", 1)[1].lstrip("\n")


# ---------------------------------------------------------------------------------- mkdocs hook

GENERATORS: dict[str, Callable[[], str]] = {
    "findings": findings_markdown,
    "cli": cli_markdown,
    "contracts": contracts_markdown,
    "runlog": runlog_markdown,
    "benchmarks": benchmarks_markdown,
    "changelog": changelog_markdown,
}


def expand(markdown: str) -> str:
    """Replace every ``<!-- nndiag:NAME -->`` marker with the generated Markdown."""
    def generated(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise KeyError(f"unknown generated section {name!r} (known: {sorted(GENERATORS)})")
        return GENERATORS[name]()

    return MARKER.sub(generated, markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """The mkdocs hook: expand the markers of a page."""
    return expand(markdown)


def markers() -> Iterator[tuple[Path, str]]:
    """Every marker in the documentation sources: (page, name)."""
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for match in MARKER.finditer(page.read_text(encoding="utf-8")):
            yield page, match.group(1)
