"""`python -m data_pipeline prepare --config CONFIG [KEY=VALUE ...]`: tokenize and shard a config's data."""

import sys

from data_pipeline import prepare

COMMANDS = {"prepare": prepare.main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m data_pipeline {{{','.join(COMMANDS)}}} --config CONFIG [KEY=VALUE ...]", file=sys.stderr)
        sys.exit(2)
    COMMANDS[sys.argv[1]](sys.argv[2:])
