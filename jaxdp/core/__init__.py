"""The model-agnostic core: the train state, the pure train and eval steps, losses, optimizers,
mixed precision and the gradient noise scale.

The bottom layer: imports only JAX, Flax, optax and jaxdp.errors, never the config, the models,
the parallel layer or the runtime.
"""
