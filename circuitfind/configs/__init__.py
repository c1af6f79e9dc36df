"""Hydra configs shipped with the package (a package so that Hydra finds them when installed)."""
