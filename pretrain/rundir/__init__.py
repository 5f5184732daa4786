"""pretrain's public reader of run directories, the one part of pretrain that evals' commands use: a run's
config, metrics, tokenizer and trained model (`reader`), its points for the scaling fits (`points`), and the
untrained models of the benchmark shapes (`models`)."""
