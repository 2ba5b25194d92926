"""Entry points: submit (SLURM via submitit, or local), train (one rank), evaluate, export."""
