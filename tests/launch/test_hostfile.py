"""The hostfile backend across two real hosts: two network namespaces on this machine, each with its own
hostname and address, one launcher per host, as a user runs it on two nodes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.metrics import read_metrics
from tests.helpers import launch, run_module

HOSTS = {"node1": "10.77.0.1", "node2": "10.77.0.2"}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def two_hosts():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    names = {host: f"pretrain-{host}" for host in HOSTS}
    hosts_file = "127.0.0.1 localhost\n" + "".join(f"{address} {host}\n" for host, address in HOSTS.items())
    for namespace in names.values():
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)  # left over from an aborted run
        ip("netns", "add", namespace)
        # `ip netns exec` puts /etc/netns/<namespace>/hosts over /etc/hosts: each host resolves the other's name.
        Path(f"/etc/netns/{namespace}").mkdir(parents=True, exist_ok=True)
        Path(f"/etc/netns/{namespace}/hosts").write_text(hosts_file)
    ip("link", "add", "pt-veth1", "type", "veth", "peer", "name", "pt-veth2")
    for index, (host, address) in enumerate(HOSTS.items(), start=1):
        namespace, device = names[host], f"pt-veth{index}"
        ip("link", "set", device, "netns", namespace)
        ip("-n", namespace, "addr", "add", f"{address}/24", "dev", device)
        ip("-n", namespace, "link", "set", device, "up")
        ip("-n", namespace, "link", "set", "lo", "up")
    yield names
    for namespace in names.values():
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        shutil.rmtree(f"/etc/netns/{namespace}", ignore_errors=True)


def on_host(namespace: str, host: str, command: list[str], cwd: Path) -> subprocess.Popen:
    """Run `command` as if on `host`: its network namespace, and a UTS namespace carrying its hostname."""
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace, "unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh",
         *command],
        cwd=cwd, env={**os.environ, "WANDB_SILENT": "true"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_hosts_train_with_zero2_as_one_host_with_the_same_number_of_ranks(two_hosts, tiny_config, tmp_path):
    changes = {"train": {"max_steps": 8}, "deepspeed": {"zero_stage": 2}}
    launch(tiny_config({**changes, "name": "one-host"}, name="one-host.yaml"), ranks=2)
    one_host = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "runs" / "one-host") if "train/loss" in r}

    config = tiny_config({**changes, "name": "two-hosts"}, name="two-hosts.yaml")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    command = [sys.executable, "-m", "launch", "run", "--backend", "hostfile", "--hostfile", str(hostfile),
               "--config", str(config)]
    launchers = [on_host(namespace, host, command, tmp_path) for host, namespace in two_hosts.items()]
    outputs = [launcher.communicate(timeout=600)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], "\n".join(outputs)

    run_dir = tmp_path / "runs" / "two-hosts"
    assert "2 rank(s) on cpu" in "".join(outputs)
    records = sorted(path.name.split("-", 2)[2] for path in (run_dir / "launches").glob("*.json"))
    assert records == ["node1-hostfile.json", "node2-hostfile.json"]
    two_hosts_losses = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    assert sorted(two_hosts_losses) == list(range(1, 9))
    assert [two_hosts_losses[s] for s in range(1, 9)] == pytest.approx([one_host[s] for s in range(1, 9)], rel=1e-5)


def test_a_hostfile_naming_a_host_that_does_not_resolve_is_refused(tiny_config, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("no-such-host.invalid slots=2\n")
    result = run_module("launch", "run", "--backend", "hostfile", "--hostfile", str(hostfile), "--config",
                        str(tiny_config()), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "config error: --hostfile: host 'no-such-host.invalid' cannot be reached: its name does not resolve")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
