"""The `circuitfind` commands: train, organism (Hydra apps), optimum, report, and Hydra callbacks."""
