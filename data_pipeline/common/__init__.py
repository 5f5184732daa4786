"""The plumbing every package shares, at the bottom of the import graph: errors and exit codes
(`errors`), the command-line convention (`command_line`), files written durably (`files`), credentials kept out
of what is written (`redaction`), W&B runs (`wandb_runs`), devices (`devices`), ports (`network`) and plots
drawn without a display (`plotting`). Nothing here imports the rest of the project."""
