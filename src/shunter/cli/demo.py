"""`shunter demo`."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    print("shunter demo: not built yet", file=sys.stderr)
    return 1
