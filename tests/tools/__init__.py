"""Tools, not tests: the chaos driver, the benchmark and the recovery
timings (run by make chaos, make bench, python -m tests.tools.recovery_timings)."""
