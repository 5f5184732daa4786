"""What a launch ran with, written into the run directory (`launches/<time>-<host>-<backend>.json`), so a run
can be reproduced and a failure explained: the command, the hosts, and the environment that matters."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from data_pipeline.common.files import write_atomically
from data_pipeline.common.redaction import redacted_tree

# Variables that change how a distributed run behaves. Secrets are never recorded: a variable whose name looks
# secret, whatever its prefix, is kept as data_pipeline.common.redaction.REDACTED, and so is a credential in any value,
# argument or command (a signed URL, a password in a pipe: command).
RECORDED = re.compile(r"^(NCCL_|CUDA_|TORCH|OMP_|MASTER_|SLURM_(JOB_ID|JOB_NODELIST|NNODES|RESTART_COUNT)$|GLOO_)")


def record_launch(run_dir: Path, backend: str, argv: list[str], commands: list[list[str]] | str, hosts: list[str],
                  configured_environment: dict[str, str]) -> Path:
    environment = {name: value for name, value in os.environ.items() if RECORDED.match(name)}
    environment.update(configured_environment)
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "backend": backend,
        "argv": [sys.executable, "-m", "launch", *argv],
        "commands": commands,
        "hosts": hosts,
        "environment": dict(sorted(environment.items())),
    }
    directory = run_dir / "launches"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{socket.gethostname()}-{backend}.json"
    return write_atomically(path, json.dumps(redacted_tree(record), indent=2) + "\n")
