"""The reference pages generated from the code at `mkdocs build` (an mkdocs hook, named in mkdocs.yml `hooks:`).

Each page is written from the definitions the server itself runs on, so it cannot drift from them:
configuration from ``secure_ws.settings.VARIABLES``, the CLI from ``secure_ws.cli.build_parser()``, metrics
from ``secure_ws.metrics.REGISTRY``, close codes, close reasons and error codes from the constants of
``secure_ws.wire`` and ``secure_ws.core.reject``. To add a page: a function returning Markdown, one line in
``PAGES``, one line in mkdocs.yml ``nav``.
"""

from __future__ import annotations

import argparse
import ast
import inspect
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def configuration() -> str:
    from secure_ws.settings import VARIABLES

    lines = [
        "# Configuration variables",
        "",
        "Every variable, read from the environment and from `.env` in the working directory (the real environment wins);",
        "a bad value stops start-up with one line naming the variable. `.env.example` holds the same list with the defaults.",
        "How the variables work together: [Operating](../guides/operating.md#configuration).",
        "",
        "| variable | default | accepted | meaning |",
        "|---|---|---|---|",
    ]
    for v in VARIABLES:
        default = f"`{v.default}`" if v.default else "unset"
        lines.append(f"| `{v.env}` | {default} | {_cell(v.kind.bound)} | {_cell(v.meaning)} |")
    return "\n".join(lines) + "\n"


def _parsers(parser: argparse.ArgumentParser, prefix: str) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every (sub)command with a parser, depth first, in the parser's order."""
    found = [(prefix, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, f"{prefix} {name}")
    return found


def commands() -> list[tuple[str, argparse.ArgumentParser]]:
    """(command line, parser) of every `secure-ws` command that runs something (has no subcommands)."""
    from secure_ws.cli import build_parser

    return [(name, p) for name, p in _parsers(build_parser(), "secure-ws") if not any(
        isinstance(a, argparse._SubParsersAction) for a in p._actions)]


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction | argparse._VersionAction)]


def cli() -> str:
    lines = [
        "# Command line",
        "",
        "`secure-ws` (or `python -m secure_ws`) reads the `SECURE_WS_*` variables and `.env` like the server.",
        "Commands that print take `--json` for machine-readable output. Each command's `--help` says the same as this page.",
        "",
    ]
    for name, parser in commands():
        lines += [f"## `{name}`", "", _cell(parser.description or ""), ""]
        rows = options(parser)
        if rows:
            lines += ["| argument | default | meaning |", "|---|---|---|"]
            for action in rows:
                flag = ", ".join(action.option_strings) or (action.metavar or action.dest)
                if action.choices:
                    flag += " {" + ",".join(map(str, action.choices)) + "}"
                default = "" if action.default in (None, False, True, argparse.SUPPRESS) or not action.option_strings else f"`{action.default}`"
                required = " (required)" if action.required and action.option_strings else ""
                lines.append(f"| `{flag}` | {default} | {_cell(action.help or '')}{required} |")
            lines.append("")
    return "\n".join(lines)


def metric_families() -> list[tuple[str, str, str, str]]:
    """(name, type, labels, help) of every metric /metrics serves, from their definitions."""
    from secure_ws import metrics

    found = []
    for value in vars(metrics).values():
        if hasattr(value, "_name") and hasattr(value, "_type") and hasattr(value, "_documentation"):
            name = value._name + ("_total" if value._type == "counter" else "")
            found.append((name, value._type, ", ".join(f"`{label}`" for label in value._labelnames), value._documentation))
    for family in metrics.REGISTRY.collect():  # collectors with no module-level object: build info, process
        if not any(family.name == f[0] or family.name + "_total" == f[0] for f in found):
            labels = sorted({k for s in family.samples for k in s.labels})
            found.append((family.name + ("_total" if family.type == "counter" else ""), family.type,
                          ", ".join(f"`{label}`" for label in labels), family.documentation))
    return sorted(found)


def metrics_page() -> str:
    lines = [
        "# Metrics",
        "",
        "`GET /metrics` (Prometheus text; on the internal port with `--internal-port`). With several workers one scrape",
        "gives the totals of all of them. What the values mean in practice, and the alerts: "
        "[Operating](../guides/operating.md#metrics).",
        "",
        "| metric | type | labels | meaning |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{n}` | {t} | {labels} | {_cell(h)} |" for n, t, labels, h in metric_families()]
    return "\n".join(lines) + "\n"


def _constants(module: ModuleType, names: Callable[[str, Any], bool]) -> list[tuple[str, Any, str]]:
    """(name, value, trailing comment) of a module's constants, in source order."""
    source = inspect.getsource(module)
    comments = {}
    for number, line in enumerate(source.splitlines(), 1):
        if "  # " in line:
            comments[number] = line.split("  # ", 1)[1].strip()
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            value = getattr(module, name, None)
            if names(name, value):
                found.append((name, value, comments.get(node.lineno, "")))
    return found


def closes_and_errors() -> str:
    from secure_ws.core import reject
    from secure_ws.wire import closes, messages

    lines = [
        "# Close codes and error codes",
        "",
        "What each means for a client, and what to do: [the wire protocol](../PROTOCOL.md#close-codes-and-reasons).",
        "",
        "## Close codes",
        "",
        "| code | name |",
        "|---|---|",
    ]
    lines += [f"| {int(code)} | `{code.name}` |" for code in closes.Close]
    lines += ["", "## Close reasons", "", "The text of the close frame, exactly.", "", "| reason | constant | note |", "|---|---|---|"]
    lines += [f"| `{value}` | `{name}` | {_cell(note)} |" for name, value, note in _constants(closes, lambda n, v: isinstance(v, str))]
    lines += ["", "## Error codes", "", "The `code` of an error frame; none of them closes the connection.", "",
              "| code | constant | note |", "|---|---|---|"]
    lines += [
        f"| `{value}` | `{name}` | {_cell(note)} |"
        for module in (messages, reject)
        for name, value, note in _constants(module, lambda n, v: isinstance(v, str) and n.isupper() and v.islower() and " " not in v)
    ]
    lines += ["", "An application's handlers add their own codes with `Reject(code, message)`."]
    return "\n".join(lines) + "\n"


# The generated pages: path under docs/ → the function writing it.
PAGES: dict[str, Callable[[], str]] = {
    "reference/configuration.md": configuration,
    "reference/cli.md": cli,
    "reference/metrics.md": metrics_page,
    "reference/closes.md": closes_and_errors,
}


def on_files(files: Any, config: Any) -> Any:
    """mkdocs hook: add the generated pages to the build."""
    from mkdocs.structure.files import File

    for path, write in PAGES.items():
        files.append(File.generated(config, path, content=write()))
    return files


if __name__ == "__main__":  # print the pages, to read them without building the site
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    for path, write in PAGES.items():
        print(f"<!-- {path} -->\n{write()}")
