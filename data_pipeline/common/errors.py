"""The project's one error layer. `data_pipeline` is the bottom of the import graph, so every package can
raise these and every entry point can catch them.

A `UserError` is something the user must fix (a file, a setting, a missing checkpoint) or a stop the user asked
for; its message names the thing and what to do. Entry points run through
`data_pipeline.common.command_line.run_command`, which prints the message in one line and exits with the error's code
instead of showing a traceback.
"""

CONFIG_ERROR_EXIT_CODE = 2
# EX_TEMPFAIL from sysexits.h: stopped in order to be continued. Launchers requeue a run on it.
REQUEUE_EXIT_CODE = 75


class UserError(Exception):
    """Stops a command with one line for the user and `exit_code`."""

    exit_code = 1
    label = "error"
    # Errors every rank may meet on its own (a shard it reads) are printed by every rank; a stop decided for all
    # ranks together (preemption) is printed once, by rank 0.
    every_rank_speaks = True


class ConfigError(UserError, ValueError):
    """A config that cannot run. The message names the field and what is wrong with it."""

    exit_code = CONFIG_ERROR_EXIT_CODE
    label = "config error"


class DataError(UserError):
    """Data that cannot be used. The message names the path and what to do about it."""
