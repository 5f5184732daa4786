"""Scaling laws fitted to a ladder of runs: L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap intervals.

N is the number of parameters (without embeddings, as the ladder reports it), D the number of training tokens,
and a training run costs about C = 6 N D FLOPs, which gives the compute-optimal split of a budget C.

- `points`: the input, one `RunPoint` per run (from a CSV, or from run directories by `pretrain.rundir.reader`);
- `law`: the parametric fit (Hoffmann et al. 2022, appendix D.2) and its bootstrap intervals;
- `isoflop`: isoFLOP profiles (their approach 2), where a sweep trains several sizes at each of a few budgets;
- `choose_k`: the few-shot k at which the runs' accuracy is compared;
- `report`: everything together as a `ScalingReport` (`analyse`), its JSON and its printed table;
- `plots` and `publish`: the PNGs, and the report in a W&B run;
- `task_points`, `task_law`, `task_report` and `task_plots`: task scaling (Bhagia et al. 2024), the task loss as
  L(N, D) and the accuracy as a sigmoid of it, for each task and k, chained to predict a model not yet trained.

This package reads typed run points, never a run directory or a live model: it imports nothing from `pretrain`.
Its modules are imported by name (`evals.scaling.points`, ...), so that a reader of run points (every
training rank, through `pretrain.rundir.reader`) does not pay for scipy.
"""
