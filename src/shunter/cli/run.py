"""``shunter run -c FILE``: the service. SIGTERM/SIGINT drain, commit and exit 0."""

from __future__ import annotations

import argparse
import faulthandler
import signal

from ..app import Dispatcher
from ..config import load_config
from ..observe.logs import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="the YAML configuration")


def run(args: argparse.Namespace) -> int:
    secrets: set[str] = set()
    config = load_config(args.config, secrets=secrets)
    setup_logging(config.log.format, config.log.level, secrets)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: every stack
    Dispatcher(config).run()
    return 0
