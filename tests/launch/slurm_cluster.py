"""A real one-node SLURM cluster on this machine, for tests: munge, slurmctld and slurmd from the
distribution's packages (`make test-tools` installs them), configured in a temporary directory."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from data_pipeline.common.network import free_port

CREDENTIAL_SECONDS = 10


def node_resources() -> str:
    """`CPUs=... RealMemory=...` as slurmd measures this machine."""
    measured = subprocess.run(["slurmd", "-C"], check=True, capture_output=True, text=True).stdout
    cpus = re.search(r"CPUs=(\d+)", measured).group(1)
    memory = re.search(r"RealMemory=(\d+)", measured).group(1)
    return f"CPUs={cpus} RealMemory={memory}"


class SlurmCluster:
    def __init__(self, directory: Path):
        self.directory = directory
        self.host = socket.gethostname().split(".")[0]
        self.conf = directory / "slurm.conf"
        self.processes: list[subprocess.Popen] = []

    @property
    def environment(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> SlurmCluster:
        state, spool = self.directory / "state", self.directory / "spool"
        state.mkdir(parents=True)
        spool.mkdir()
        self.conf.write_text("\n".join([
            "ClusterName=testcluster",
            f"SlurmctldHost={self.host}",
            # Ports of their own, so that this cluster never meets another one running on the machine.
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            # A requeued job waits out the credential lifetime (120 s by default) before it starts again.
            f"AuthInfo=cred_expire={CREDENTIAL_SECONDS}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            # Pending jobs (a requeued one once its credential expired, one whose dependency just ended) are looked
            # at every second, not every 30 to 60 s.
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "ReturnToService=2",
            "MpiDefault=none",
            "KillWait=60",
            "MinJobAge=3600",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={self.directory / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.directory / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.directory / 'slurmctld.log'}",
            f"SlurmdLogFile={self.directory / 'slurmd.log'}",
            f"NodeName={self.host} {node_resources()} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        munge_run = Path("/run/munge")
        munge_run.mkdir(parents=True, exist_ok=True)
        shutil.chown(munge_run, "munge", "munge")
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        # In the foreground (-D), as children of the test, so they end with it.
        self.processes.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # The node daemon registers with the controller on start: once `scontrol ping` finds it answering.
        deadline = time.monotonic() + 60
        while subprocess.run(["scontrol", "ping"], capture_output=True, env=self.environment).returncode != 0:
            assert time.monotonic() < deadline, "slurmctld did not come up:\n" + self.logs()
            time.sleep(0.2)
        self.processes.append(subprocess.Popen(["slurmd", "-D", "-f", str(self.conf)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while "State=IDLE" not in self.scontrol("show", "node", self.host, check=False):
            assert time.monotonic() < deadline, "the SLURM node did not come up:\n" + self.logs()
            time.sleep(0.5)
        return self

    def scontrol(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(["scontrol", *args], capture_output=True, text=True, env=self.environment)
        if check:
            assert result.returncode == 0, result.stderr
        return result.stdout + result.stderr

    def job_field(self, job_id: str, field: str) -> str:
        return re.search(rf"\b{field}=(\S+)", self.scontrol("show", "job", job_id)).group(1)

    def job_state(self, job_id: str) -> str:
        return self.job_field(job_id, "JobState")

    def wait_for_state(self, job_id: str, states: set[str], timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.job_state(job_id)) not in states:
            assert time.monotonic() < deadline, f"job {job_id} still {state} after {timeout} s\n" + self.logs()
            time.sleep(0.5)
        return state

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in self.directory.glob("*.log"))

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
