"""The packages depend on each other one way only (no cycle): engine and sessions on nothing of ours, realtime on
engine and sessions, loadtest on realtime (its protocol and audio) and engine (the built-in voice gives its simulated
callers a voice), and only the ``shoal`` command on all of them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "engine": set(),
    "sessions": set(),
    "realtime": {"engine", "sessions"},
    "loadtest": {"realtime", "engine"},
    "shoal": {"realtime", "loadtest", "engine", "sessions"},
}


def imports_of(package: str) -> dict[str, set[str]]:
    """Our packages each module of ``package`` imports (anywhere in it, lazy imports included)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = (names & set(ALLOWED)) - {package}
    return found


def test_packages_import_only_what_the_layering_allows() -> None:
    wrong = {module: sorted(used - ALLOWED[package])
             for package in ALLOWED for module, used in imports_of(package).items() if used - ALLOWED[package]}
    assert wrong == {}


def test_module_names_say_what_they_hold() -> None:
    names = [p.relative_to(ROOT).as_posix() for pkg in ALLOWED for p in (ROOT / pkg).rglob("*.py")]
    assert not [n for n in names if Path(n).stem in ("worker", "workers", "offline", "utils", "misc", "helpers")]
