"""Runtime pieces beside the layers: processes, signals, run folders, logs, progress, Slurm."""
