"""Search methods: desiderata-based masking (dbm.py) and the baselines that rank components."""
