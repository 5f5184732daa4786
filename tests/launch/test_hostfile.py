"""The hostfile backend across two real hosts: two network namespaces on this machine, each with its own
hostname and address, one launcher per host, as a user runs it on two nodes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.__main__ import main as launch_main
from tests.helpers import losses_by_step

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


def test_two_hosts_train_with_zero2_as_one_host_with_the_same_number_of_ranks(two_hosts, shared_runs, tmp_path):
    # The one-host run is the session's shared ZeRO-2 run on two ranks (it prepares the data both use); the two
    # hosts train the same config.
    one_host_losses = shared_runs.losses(stage=2, ranks=2)
    config = tmp_path / "two-hosts.yaml"
    config.write_text(yaml.safe_dump(shared_runs.config("two-hosts", tmp_path / "runs", stage=2)))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    command = [sys.executable, "-m", "launch", "run", "--backend", "hostfile", "--hostfile", str(hostfile),
               "--config", str(config)]
    launchers = [on_host(namespace, host, command, tmp_path) for host, namespace in two_hosts.items()]
    outputs = [launcher.communicate(timeout=600)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], "\n".join(outputs)

    run_dir = tmp_path / "runs" / "two-hosts"
    marker = run_dir / "checkpoints" / f"step_{shared_runs.steps:08d}" / "complete"
    assert json.loads(marker.read_text())["world_size"] == 2
    records = sorted(path.name.split("-", 2)[2] for path in (run_dir / "launches").glob("*.json"))
    assert records == ["node1-hostfile.json", "node2-hostfile.json"]
    two_hosts_losses = losses_by_step(run_dir)
    assert sorted(two_hosts_losses) == list(range(1, shared_runs.steps + 1))
    assert [two_hosts_losses[step] for step in sorted(two_hosts_losses)] == pytest.approx(one_host_losses, rel=1e-5)


def test_a_hostfile_naming_a_host_that_does_not_resolve_is_refused(in_process, tiny_config, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("no-such-host.invalid slots=2\n")
    result = in_process(launch_main, "run", "--backend", "hostfile", "--hostfile", str(hostfile), "--config",
                        str(tiny_config()))
    assert result.returncode == 2
    assert result.stderr.startswith("config error: --hostfile:") and "no-such-host.invalid" in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
