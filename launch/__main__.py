"""`python -m launch run --config CONFIG [--ranks N] [KEY=VALUE ...]`: check the config, then start the run.

The config is validated here, for the world size it will run at, and the data is prepared (once) and its
shards checked, before any training process starts: a bad config costs one line and exit code 2, bad data
one line naming the file and exit code 1, not a cluster allocation.
"""

from __future__ import annotations

import argparse
import sys

from data_pipeline.errors import DataError
from launch.local import default_ranks, run_local
from pretrain.checkpoint import (
    CheckpointError,
    newest_complete,
    refuse_to_train_over_checkpoints,
    resume_plan,
)
from pretrain.config import (
    ConfigError,
    deepspeed_config,
    exit_on_config_error,
    load_config,
)
from pretrain.device import device_here, resolve_precision
from pretrain.train import VERIFIED_DATA_VARIABLE, prepare_and_verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train a model on this machine")
    run.add_argument("--config", help="YAML config (configs/quickstart.yaml for the quickstart)")
    run.add_argument("--ranks", type=int, help="processes to start; default: one per GPU, or 2 on CPU")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-3")
    args = parser.parse_args(argv)

    with exit_on_config_error():
        ranks = args.ranks if args.ranks is not None else default_ranks()
        if ranks < 1:
            raise ConfigError(f"--ranks: must be at least 1, got {ranks}")
        config = load_config(args.config, args.overrides)
        # The DeepSpeed config is generated here too, so what it refuses is refused before any rank starts.
        deepspeed_config(config, config.batch_layout(ranks), resolve_precision(config.deepspeed.precision, device_here()))
        refuse_to_train_over_checkpoints(config)
    try:
        resume_from = newest_complete(config.run_dir) if config.train.resume == "auto" else None
        if resume_from is not None:
            resume_plan(resume_from, ranks, config.deepspeed.zero_stage)
        manifest = prepare_and_verify(config, is_main=True, log=print)
    except (DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    return run_local(ranks, args.config, args.overrides, {VERIFIED_DATA_VARIABLE: manifest.fingerprint},
                     config.run_dir)


if __name__ == "__main__":
    sys.exit(main())
