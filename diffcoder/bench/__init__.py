"""Benchmarks shipped with the package (`diffcoder bench ...`); scripts in benchmarks/ call these."""
