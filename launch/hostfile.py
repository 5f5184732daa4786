"""Several hosts listed in a hostfile (`host slots=N` per line, as DeepSpeed's launcher reads it).

Two ways to start them: `torchrun` (run `python -m launch run --backend hostfile` on every host; each finds its
own line, and the hosts meet at a c10d rendezvous on the first one), or `deepspeed` (run it on the first host
only; DeepSpeed's launcher reaches every host with pdsh/ssh).
"""

from __future__ import annotations

import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.common.errors import ConfigError

LINE = re.compile(r"^(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*)\s+slots=(?P<slots>[1-9][0-9]*)$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def read_hostfile(path: Path) -> list[Host]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"--hostfile: {path} does not exist; write one line per host: `node1 slots=8`") from None
    hosts = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = LINE.match(line)
        if not match:
            raise ConfigError(f"--hostfile: {path}:{number}: {line!r} is not `host slots=N`")
        hosts.append(Host(match["host"], int(match["slots"])))
    if not hosts:
        raise ConfigError(f"--hostfile: {path} lists no hosts; write one line per host: `node1 slots=8`")
    if len({host.name for host in hosts}) < len(hosts):
        raise ConfigError(f"--hostfile: {path} lists a host twice")
    return hosts


def check_reachable(hosts: list[Host]) -> None:
    """Every host's name must resolve here, or its ranks could never meet the others."""
    for host in hosts:
        try:
            socket.getaddrinfo(host.name, None)
        except OSError:
            raise ConfigError(f"--hostfile: host {host.name!r} cannot be reached: its name does not resolve") from None


def this_host(hosts: list[Host], path: Path) -> int:
    """The index of this machine's line, by hostname."""
    names = {socket.gethostname(), socket.gethostname().split(".")[0], socket.getfqdn()}
    for index, host in enumerate(hosts):
        if host.name in names:
            return index
    raise ConfigError(
        f"--hostfile: this host ({socket.gethostname()}) is not in {path}; run the launcher on the hosts it lists,"
        " or use --hostfile-launcher deepspeed from the first one"
    )


def deepspeed_command(hostfile: Path, hosts: list[Host], port: int, config_path: str | None,
                      overrides: list[str]) -> list[str]:
    """DeepSpeed's launcher, started on the first host: it starts every host's ranks over pdsh/ssh."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}",
               f"--master_addr={hosts[0].name}", f"--master_port={port}", "--no_local_rank", "--module",
               "pretrain.train"]
    if config_path is not None:
        command += ["--config", config_path]
    return command + list(overrides)
