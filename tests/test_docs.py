"""The documentation cannot drift from the code: the reference pages are generated from the definitions
(scripts/docs_reference.py), so these tests check the generators' coverage, that every name the hand-written
pages mention still exists, that every Python sample is a file under docs_src/, and that the site builds."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from secure_ws.cli import build_parser
from secure_ws.metrics import REGISTRY
from secure_ws.settings import VARIABLES

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "scripts" / "docs_reference.py")
assert spec is not None and spec.loader is not None
docs_reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs_reference)

HAND_WRITTEN = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
DOCS_SRC = sorted(p for p in (ROOT / "docs_src").rglob("*") if p.suffix in {".py", ".sh", ".html"})


def _text(paths: list[Path]) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in paths)


def _served_metrics() -> set[str]:
    """Every family /metrics serves, as its exposition's `# TYPE` lines name it (counters with _total)."""
    names = set()
    for line in generate_latest(REGISTRY).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if not name.endswith("_created"):  # the creation time prometheus-client adds to each counter and histogram
                names.add(name + "_total" if kind == "counter" and not name.endswith("_total") else name)
    return names


def _commands(parser: argparse.ArgumentParser, prefix: str = "secure-ws") -> dict[str, set[str]]:
    """Every command line that runs something → its option strings and positional names."""
    found: dict[str, set[str]] = {}
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subs:
        for name, sub in action.choices.items():
            found |= _commands(sub, f"{prefix} {name}")
    if not subs:
        found[prefix] = {s for a in parser._actions for s in (a.option_strings or [a.metavar or a.dest])} - {"-h", "--help", "help"}
    return found


# -- the generated reference covers the code ------------------------------------------------------------------------

def test_configuration_page_lists_exactly_the_variables() -> None:
    page = docs_reference.configuration()
    listed = set(re.findall(r"^\| `(SECURE_WS_[A-Z0-9_]+)`", page, re.M))
    assert listed == {v.env for v in VARIABLES}
    for v in VARIABLES:
        assert v.meaning.split(".")[0].replace("|", "\\|") in page


def test_cli_page_lists_every_command_and_option() -> None:
    page = docs_reference.cli()
    commands = _commands(build_parser())
    assert set(re.findall(r"^## `(secure-ws[^`]*)`", page, re.M)) == set(commands)
    for command, options in commands.items():
        section = page.split(f"## `{command}`", 1)[1].split("\n## ", 1)[0]
        for option in options:
            assert re.search(rf"^\| `{re.escape(option)}[` ]", section, re.M), (command, option)


def test_metrics_page_lists_exactly_the_served_metrics() -> None:
    page = docs_reference.metrics_page()
    listed = set(re.findall(r"^\| `([a-z_]+)`", page, re.M))
    assert listed == _served_metrics()


def test_closes_page_lists_every_close_code_reason_and_error_code() -> None:
    from secure_ws.core import reject
    from secure_ws.wire import closes, messages

    page = docs_reference.closes_and_errors()
    for code in closes.Close:
        assert f"| {int(code)} | `{code.name}` |" in page
    for module in (closes, messages, reject):
        for name, value in vars(module).items():
            if name.isupper() and isinstance(value, str) and (module is closes or re.fullmatch(r"[a-z_]+", value)):
                assert f"| `{value}` | `{name}` |" in page, name


def test_the_generator_runs_on_every_page_it_names() -> None:
    assert all(callable(write) and write().startswith("# ") for write in docs_reference.PAGES.values())
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for path in docs_reference.PAGES:
        assert f": {path}\n" in nav, f"{path} is generated but not in mkdocs.yml nav"


# -- what the hand-written pages name exists in the code ------------------------------------------------------------

# Named on purpose though they are not variables: a misspelling the loader warns about, the name a variable replaced,
# and the test suite's own Redis (read by tests/helpers.py, never by the server).
NOT_VARIABLES = {"SECURE_WS_RATELIMIT", "SECURE_WS_SEND_QUEUE_SIZE", "SECURE_WS_TEST_REDIS_URL"}


def test_every_variable_the_docs_name_exists() -> None:
    named = set(re.findall(r"\bSECURE_WS_[A-Z0-9_]*[A-Z0-9]\b", _text(HAND_WRITTEN + DOCS_SRC)))
    assert named - {v.env for v in VARIABLES} - NOT_VARIABLES == set()


def test_every_metric_the_docs_name_exists() -> None:
    named = set(re.findall(r"\bsecure_ws_[a-z_]+(?:_total|_seconds|_active|_up|_keys|_info)\b", _text(HAND_WRITTEN)))
    served = _served_metrics()
    assert {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in named} - served == set()


def test_every_command_the_docs_name_exists() -> None:
    commands = _commands(build_parser())
    words = {c.split()[1] for c in commands} | {" ".join(c.split()[1:3]) for c in commands}
    named = re.findall(r"\bsecure-ws ([a-z]+)(?: ([a-z]+))?", _text(HAND_WRITTEN + DOCS_SRC))
    for first, second in named:
        if first == "sh":  # `su secure-ws sh -c …`: the user, not the command
            continue
        assert first in words, f"secure-ws {first}"
        groups = {c.split()[1] for c in commands if len(c.split()) == 3}
        if first in groups and second:
            assert f"{first} {second}" in words, f"secure-ws {first} {second}"


# -- samples are files, and the wording is the product's ------------------------------------------------------------

def test_every_python_sample_in_the_pages_is_a_file_under_docs_src() -> None:
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            assert re.fullmatch(r'--8<-- "docs_src/[\w/]+\.py"\n', block), f"{page}: a Python sample not in docs_src/"


def test_the_readme_samples_are_the_files_the_tests_run() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"```python\n(.*?)```", readme, re.S):
        assert any(block == p.read_text(encoding="utf-8") for p in (ROOT / "docs_src" / "readme").glob("*.py")), block[:200]


def test_the_readme_is_short_links_into_the_docs_and_runs_the_ci_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        assert target.startswith("https://") or (ROOT / target).is_file(), target
    command = 'pip install -e ".[test]" && python -m pytest'
    assert command in readme
    assert (ROOT / ".ci" / "run").read_text(encoding="utf-8").rstrip().splitlines()[-1] == command


FORBIDDEN = re.compile(r"\bSPEC\b|§\s*\d+(?!\.\d)|\bissue \d+|Choices where|where the SPEC is silent")


def test_no_sentence_about_how_the_project_was_made() -> None:
    """No spec sections, issue numbers or process wording in the pages, the README, the samples or the
    docstrings mkdocstrings renders (RFC sections, as in "RFC 6455 §5.5.3", are the protocol's own)."""
    for path in [*HAND_WRITTEN, *DOCS_SRC]:
        for line in path.read_text(encoding="utf-8").splitlines():
            assert not FORBIDDEN.search(re.sub(r"RFC \d+ §[\d.]+", "", line)), f"{path.relative_to(ROOT)}: {line}"


def test_the_site_builds_strictly_with_nothing_left_out_of_the_navigation(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip('the docs extra is not installed (pip install -e ".[docs]"; .ci/run does)')
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**_env(), "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for page in (tmp_path / "site").rglob("*.html"):
        text = re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8"))
        for line in text.splitlines():
            assert not FORBIDDEN.search(re.sub(r"RFC \d+ §[\d.]+", "", line)), f"{page}: {line[:200]}"
    reference = (tmp_path / "site" / "reference" / "configuration" / "index.html").read_text(encoding="utf-8")
    assert all(v.env in reference for v in VARIABLES)


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("SECURE_WS_")}
