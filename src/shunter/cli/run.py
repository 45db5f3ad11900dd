"""``shunter run -c FILE``: the service. SIGTERM/SIGINT drain, commit and exit 0.

By default a supervisor process runs the dispatcher in a worker process and restarts it
after an unclean death (see crashguard/supervisor.py). Under systemd or Kubernetes,
``--no-supervise`` runs the dispatcher in this process and leaves restarts to them.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import tempfile

from confluent_kafka import KafkaException

from ..app import Dispatcher
from ..config import Config, load_config
from ..crashguard import crashfile
from ..crashguard.guard import LAST_EXIT_ENV, LAST_STACK_ENV
from ..crashguard.supervisor import dying_stack, noted, supervise
from ..errors import ConfigError
from ..loader import make_importable
from ..observe.logs import setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="the YAML configuration")
    parser.add_argument(
        "--no-supervise",
        action="store_true",
        help="run in this process; restarts are left to an outer supervisor",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes, each a member of the group (default: kafka.workers, 1)",
    )
    # Given by the supervisor to each of several workers (see crashguard/supervisor.py).
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=10,
        help="deaths within 10 minutes before the supervisor gives up",
    )


def run(args: argparse.Namespace) -> int:
    make_importable(args.config)
    secrets: set[str] = set()
    config = load_config(args.config, secrets=secrets)  # refuse a bad file before forking
    if not config.subscribers:  # nothing would receive anything (as `shunter check` says)
        raise ConfigError(
            [
                "subscribers: no subscriber is configured, so nothing would "
                "receive any message (add at least one under subscribers:)"
            ]
        )
    setup_logging(config.log.format, config.log.level, secrets)
    crash_dir = config.crash_guard.crash_dir or os.path.join(
        tempfile.gettempdir(), f"shunter-{config.kafka.group_id}"
    )
    workers = args.workers or config.kafka.workers
    supervised_worker = args.worker_index is not None
    problem = None if supervised_worker else _workers_problem(workers, args.no_supervise, config)
    if problem:
        logging.getLogger("shunter").error("%s", problem)
        return 2
    if not args.no_supervise:
        worker = ["run", "-c", args.config, "--no-supervise"]
        silent_after = config.crash_guard.loop_blocked_after  # as its watchdog reports
        return supervise(worker, args.max_restarts, crash_dir, workers, silent_after)
    for path, dump in crashfile.leftovers(crash_dir):  # unsupervised: nobody logged it yet
        logging.getLogger("shunter").error(
            "an earlier shunter process died of a fatal signal; its dump (%s):\n%s", path, dump
        )
        why = noted(dump)
        if why and LAST_EXIT_ENV not in os.environ:
            # Its watchdog ended it (a blocked loop): what a supervisor would have passed
            # on, so that the crash guard takes a hang for the pill here too.
            os.environ[LAST_EXIT_ENV] = f"ended by its watchdog ({why})"
            os.environ[LAST_STACK_ENV] = dying_stack(dump)
    crashfile.enable(crash_dir)  # a fatal signal writes every thread's stack there
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: every stack
    app = Dispatcher(_as_worker(config, args.worker_index or 0))
    try:
        app.run()
    except KafkaException as exc:  # no broker answered: one clear line, no traceback
        logging.getLogger("shunter").error(
            "cannot reach Kafka at %s (%s): check that a broker is running there and that "
            "kafka.bootstrap_servers names it",
            config.kafka.bootstrap_servers or "the embedded broker",
            exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else exc,
        )
        crashfile.disable()
        return 1
    crashfile.disable()
    if app.service is not None and app.service.stuck_threads:
        # concurrent.futures joins its threads at exit: a stuck one would hold us forever
        logging.shutdown()
        os._exit(0)
    return 0


def _workers_problem(workers: int, no_supervise: bool, config: Config) -> str | None:
    if workers < 1:
        return f"--workers: expected a positive number, got {workers}"
    if workers > 1 and no_supervise:
        return "--workers: more than one worker needs the supervisor (drop --no-supervise)"
    if workers > 1 and config.kafka.bootstrap_servers is None:
        return (
            "kafka.workers: more than one worker needs kafka.bootstrap_servers "
            "(the embedded development broker lives in one process)"
        )
    return None


def _as_worker(config: Config, index: int) -> Config:
    """Worker ``index``'s configuration: its admin API on the listen port plus ``index``
    (each worker serves its own /metrics, /ready and pauses: see README)."""
    listen = config.admin.listen
    if not index or not listen:
        return config
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return config
    admin = config.admin.model_copy(update={"listen": f"{host}:{int(port) + index}"})
    return config.model_copy(update={"admin": admin})
