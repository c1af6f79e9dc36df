"""Judging masks and circuits: held-out metrics, circuit tests under ablations, evidence, self-checks."""
