"""Start-up work on rank 0 and the ranks that wait for it, in a real multi-rank run."""

import json
import os
import subprocess
import sys
import threading
import time

import yaml

from data_pipeline.common.network import free_port
from pretrain.config import merged
from pretrain.rundir.reader import read_metrics
from tests.helpers import TINY_CONFIG, WORDS, tiny_tokenizer

COLLECTIVE_TIMEOUT_SECONDS = 6
HELD_SECONDS = 15  # how long rank 0's start-up work is kept waiting: well past the collective timeout


def test_start_up_work_longer_than_the_collective_timeout_kills_no_rank(tmp_path):
    # The corpus is a named pipe: rank 0's preparation reads it as it would a corpus on a slow filesystem, and
    # blocks until this test writes it, long after the other rank began to wait.
    corpus = tmp_path / "corpus.jsonl"
    os.mkfifo(corpus)
    tokenizer = tmp_path / "tokenizer.json"
    tiny_tokenizer().save(str(tokenizer))
    config = merged(TINY_CONFIG, {
        "name": "slow-start", "output_dir": str(tmp_path / "runs"),
        "data": {"dir": str(tmp_path / "data"), "tokenizer": str(tokenizer),
                 "sources": [{"kind": "jsonl", "paths": [str(corpus)]}]},
        "train": {"max_steps": 2, "checkpoint_every": 2},
        "eval": {"interval": 2},
        "deepspeed": {"timeout_minutes": COLLECTIVE_TIMEOUT_SECONDS / 60},
    })
    config_path = tmp_path / "slow-start.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # As a SLURM job's node runs it: no launcher prepared or verified the data before the ranks started.
    job = subprocess.Popen(
        [sys.executable, "-m", "launch", "node", "--config", str(config_path), "--nodes", "1", "--ranks-per-node",
         "2", "--rendezvous", f"127.0.0.1:{free_port()}", "--rendezvous-id", "slow-start"],
        cwd=tmp_path, env={**os.environ, "WANDB_SILENT": "true"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    reader = threading.Thread(target=lambda: output.extend(job.stdout), daemon=True)
    reader.start()
    documents = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(40)) for i in range(400)]
    with open(corpus, "w") as pipe:  # returns once rank 0 opened the corpus to read it
        time.sleep(HELD_SECONDS)
        pipe.writelines(json.dumps({"text": document}) + "\n" for document in documents)
    assert job.wait(timeout=300) == 0, "".join(output)
    run_dir = tmp_path / "runs" / "slow-start"
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2]
    assert (run_dir / "checkpoints" / "step_00000002" / "complete").exists()
