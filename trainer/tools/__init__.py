"""Command-line tools around the trainer (benchmarks, parity checks, SLURM launch): no library
module imports them."""
