"""The settings are one table (secure_ws.settings.VARIABLES): the loader, .env.example and the reference read it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from secure_ws.settings import OPTIONAL_PATH, PATH, PREFIX, TEXT, VARIABLES, ConfigError, Settings, env_example, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_env_example_is_the_table() -> None:
    assert (ROOT / ".env.example").read_text(encoding="utf-8") == env_example(), (
        ".env.example differs from secure_ws/settings.py VARIABLES: python -m secure_ws.settings > .env.example"
    )


def test_every_variable_named_in_the_code_is_in_the_table() -> None:
    named: set[str] = set()
    for tree in ("secure_ws", "scripts", "examples", "deploy"):
        for path in (ROOT / tree).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".yaml", ".yml", ".service", ".toml", ".env", ""}:
                named |= set(re.findall(r"\bSECURE_WS_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8", errors="replace")))
    table = {v.env for v in VARIABLES}
    assert named - table == set(), "named in the code but not in secure_ws.settings.VARIABLES"


def test_the_table_fills_every_setting() -> None:
    filled = {f for v in VARIABLES for f in ((v.field,) if isinstance(v.field, str) else v.field)}
    derived = {"jwks_file_required", "warnings"}  # set by the loader from several variables
    assert filled | derived == {f.name for f in dataclasses.fields(Settings)}
    assert len({v.name for v in VARIABLES}) == len(VARIABLES)
    assert all(v.meaning and v.kind.bound and v.env.startswith(PREFIX) for v in VARIABLES)


def test_defaults_in_the_table_are_the_settings_defaults() -> None:
    """Nothing set: what the loader makes of each default is the dataclass default (one source of truth for both)."""
    loaded = load_settings({}, env_file=None)
    for variable in VARIABLES:
        for name in (variable.field,) if isinstance(variable.field, str) else variable.field:
            if name != "rate_limits" and name != "handshake_rate_limits":  # parsed objects, not comparable to ()
                assert getattr(loaded, name) == getattr(Settings(), name), variable.env


@pytest.mark.parametrize("variable", VARIABLES, ids=lambda v: v.name)
def test_a_bad_value_is_refused_naming_its_variable(variable) -> None:
    """Any text at all is either taken (file paths) or refused naming this very variable, never a traceback."""
    try:
        load_settings({variable.env: "\x01not valid\x01"}, env_file=None)
    except ConfigError as exc:
        assert exc.variable == variable.env
        assert str(exc).startswith(variable.env + ": ")
    else:
        assert variable.kind in (PATH, OPTIONAL_PATH, TEXT)  # file paths and names take any text
