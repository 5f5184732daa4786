"""The command-line convention every entry point follows: its options are parsed by `ArgumentParser`, and it runs
through `run_command`, where a `UserError` (a bad option included) becomes one line on stderr and its exit code;
anything else is a bug and keeps its traceback. `kill -USR2 PID` makes any of these commands (a
launcher, a rank, a loader worker) write where each of its threads is to stderr, and go on: what a run that
seems stuck is waiting for, read from its log without stopping it."""

from __future__ import annotations

import argparse
import faulthandler
import gc
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from data_pipeline.common.errors import ConfigError, UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad option refused like any other bad input: one line naming it, exit 2 (a ConfigError),
    instead of a usage block. Sub-command parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def run_command(main: Callable[[], int | None]) -> NoReturn:
    """Run `main()` and exit with what it returns (None is 0), or with the exit code of the UserError it raised."""
    # To the process's own stderr descriptor: a caller may have replaced sys.stderr with one that has none.
    faulthandler.register(signal.SIGUSR2, file=sys.__stderr__, all_threads=True)
    try:
        code = main()
    except UserError as error:
        message = str(error)
        speaks = error.every_rank_speaks or os.environ.get("RANK", "0") == "0"
        if message and speaks:
            print(f"{error.label}: {message}", file=sys.stderr, flush=True)
        code = error.exit_code
    finally:
        # The interpreter's last garbage collection walks every object torch and DeepSpeed made (over a second of
        # CPU per process, each rank of each run); the work is done, so the heap is frozen out of its reach.
        gc.freeze()
    sys.exit(code or 0)


def at_least_one(option: str, value: int | None) -> None:
    """A command-line count (`--items`, `--ranks`, ...) that must be at least 1 when given."""
    if value is not None and value < 1:
        raise ConfigError(f"--{option}: must be at least 1, got {value}")
