"""``shoal``: the server's commands (``realtime.cli``) and the load test's (``loadtest.cli``) under one parser."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from loadtest.cli import add_loadtest_parser, run_loadtest
from realtime import cli as server_cli

__all__ = ["main"]


def _loadtest(sub: Any) -> dict[str, server_cli.Command]:
    add_loadtest_parser(sub)
    return {"loadtest": run_loadtest}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, server_cli.Command]]:
    return server_cli.build_parser([_loadtest])


def main(argv: Sequence[str] | None = None) -> int:
    return server_cli.main(argv, extra=[_loadtest])
