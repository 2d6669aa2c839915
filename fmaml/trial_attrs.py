"""What a sweep's trial run writes into its Optuna trial, for the sweep to read back.

The run (fmaml.callbacks.ReportToOptuna, inside `python -m fmaml`) and the sweep (fmaml.sweep, which starts
it) are separate processes that meet only in the study's database: these are the user attributes they share.
"""

PRUNED_AT = "pruned_at_step"  # user attr a trial's run sets when the pruner stopped it
RUN_LOG_DIR = "run_log_dir"  # user attr a trial's run sets: the folder it logs to (what it resolved)
