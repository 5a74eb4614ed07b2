"""Runnable examples, one per user flow; installed as `keras_lowrank.examples`.

Run one with `python examples/<name>.py` (each takes `--help`)."""
