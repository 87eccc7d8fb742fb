"""What any model's run needs around its step: the training loop `fit` and its hooks, checkpoints,
metrics, hardware observation, signals, the step watchdog, multi-process start-up and `jaxdp launch`.

Imports jaxdp.core and jaxdp.parallel, never the language-model app (jaxdp.lm) or its built-in
models.
"""
