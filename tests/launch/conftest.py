"""Fixtures of the launch tests."""

import os

import pytest

from tests.launch.slurm_cluster import SlurmCluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """One real SLURM controller and node daemon on this machine, for every test that submits jobs."""
    if os.geteuid() != 0:
        pytest.skip("starting SLURM's daemons needs root")
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield slurm
    slurm.stop()
