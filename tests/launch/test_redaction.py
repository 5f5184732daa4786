"""Credentials in values (a signed shard URL, a password in a pipe: command, a variable named like a password)
reach the ranks that need them, and no file a launch or a run writes, nor a dry run's output, holds them."""

import base64
import functools
import http.server
import threading
import urllib.parse
from pathlib import Path

import pytest

from launch.__main__ import main as launch_main
from tests.launch.test_slurm import ENDED, submit

SIGNATURE, PASSWORD, INDEX_PASSWORD = "PLANTEDSECRET123", "PLANTEDPW456", "PLANTEDINDEX789"
EXPORTED_VARIABLE, EXPORTED_PASSWORD = "PGPASSWORD", "PLANTEDPG"
PLANTED = (SIGNATURE, PASSWORD, INDEX_PASSWORD, EXPORTED_PASSWORD)
# A short run that reads its shards through the server, and a variable for its ranks whose value holds a password.
RUN = ["train.max_steps=2", "train.checkpoint_every=2", "eval.interval=2", "eval.batches=1",
       f"launch.environment.PIP_INDEX_URL=https://alice:{INDEX_PASSWORD}@pypi.example/simple"]


class SignedShardServer(http.server.ThreadingHTTPServer):
    """An object store in miniature: serves `root` to a request that presents the planted credentials (basic auth
    and a signed query), and answers 403 to any other. Counts both."""

    def __init__(self, root: Path):
        expected = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                if self.headers.get("Authorization") != expected or query.get("X-Amz-Signature") != [SIGNATURE]:
                    server.refused += 1
                    self.send_error(403)
                    return
                server.served += 1
                super().do_GET()

            def log_message(self, *_):
                pass

        super().__init__(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.served = self.refused = 0

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_):
        self.shutdown()
        self.server_close()



def shard_url(port: int) -> str:
    """A pipe: command with a password, fetching a signed URL: data.shard_url as a user would give it."""
    signed = f"http://127.0.0.1:{port}/{{shard}}?X-Amz-Date=20250101T000000Z&X-Amz-Signature={SIGNATURE}"
    return f"pipe:curl -sf -u alice:{PASSWORD} '{signed}'"


def files_holding_a_planted_value(directory: Path) -> list[str]:
    return [f"{path}: {value}" for path in sorted(directory.rglob("*")) if path.is_file()
            for value in PLANTED if value.encode() in path.read_bytes()]


def test_a_job_given_credentials_in_overrides_trains_on_slurm_and_no_file_it_writes_holds_them(
        cluster, tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv(EXPORTED_VARIABLE, EXPORTED_PASSWORD)  # passed on by SLURM, as exported secrets are
    config = tiny_config({"logging": {"wandb_mode": "offline"}})
    run_dir = tmp_path / "runs" / "tiny"
    with SignedShardServer(tmp_path / "data") as server:
        job_id = submit(cluster, config, "--ranks", "1", f"data.shard_url={shard_url(server.server_port)}", *RUN,
                        cwd=tmp_path, run_dir=run_dir)
        state = cluster.wait_for_state(job_id, ENDED, timeout=600)
    log = run_dir / "slurm" / f"{job_id}.out"
    assert state == "COMPLETED", log.read_text() if log.exists() else cluster.logs()
    assert (run_dir / "checkpoints" / "step_00000002" / "complete").exists()
    assert server.served > 0 and server.refused == 0
    assert "<redacted>" in (run_dir / "slurm" / f"job-{job_id}.sbatch").read_text()
    assert "<redacted>" in (run_dir / "config.yaml").read_text()
    assert list((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    assert len(list((run_dir / "launches").glob("*-node.json"))) == 1
    assert files_holding_a_planted_value(tmp_path) == []


@pytest.mark.parametrize("backend", ["slurm", "local"])
def test_a_dry_run_prints_what_would_run_with_the_credentials_redacted(in_process, tiny_config, tmp_path,
                                                                       monkeypatch, backend):
    monkeypatch.chdir(tmp_path)
    result = in_process(launch_main, "run", "--backend", backend, "--dry-run", "--config", str(tiny_config()),
                        f"data.shard_url={shard_url(9)}", *RUN)
    assert result.returncode == 0, result.stderr
    assert "-u alice:<redacted>" in result.stdout and "X-Amz-Signature=<redacted>" in result.stdout
    assert not any(value in result.stdout for value in PLANTED)
    assert files_holding_a_planted_value(tmp_path) == []


@pytest.mark.parametrize("name", ["PGPASSWORD", "MYSQL_PWD", "SSHPASS", "DATABASE_URL", "STORE_CONNECTION_STRING"])
def test_a_variable_named_like_a_secret_in_the_config_is_refused_and_written_nowhere(in_process, tiny_config,
                                                                                     tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    result = in_process(launch_main, "run", "--backend", "slurm", "--dry-run", "--config", str(tiny_config()),
                        f"launch.environment.{name}={EXPORTED_PASSWORD}")
    assert result.returncode == 2 and name in result.stderr
    assert EXPORTED_PASSWORD not in result.stdout + result.stderr
    assert files_holding_a_planted_value(tmp_path) == []
