"""Measurements of strategies, read from compiled programs and timed runs: `jaxdp plan` (memory and
collective bytes per strategy, optionally timed), `jaxdp verify` (every strategy against one
device) and `jaxdp plot` (loss curves).
"""
