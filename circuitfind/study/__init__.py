"""The study around a search: the job, held-out evaluation, evidence, optimality, one run."""
