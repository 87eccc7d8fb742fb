"""The core's named choices, importable without JAX (the command line refuses a bad value before
it loads JAX). jaxdp.core.precision and the config validation read them from here."""

PRECISIONS = ("fp32", "bf16", "fp16")  # Compute precision: activations and matmuls (params stay fp32).
