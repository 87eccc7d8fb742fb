"""jaxdp: data-parallel training for any JAX model.

The public API, for notebooks and scripts:

  loss_fn(params, batch, rng) -> (loss_sum, weight_sum)    # sums, float32 scalars
  init_fn(rng) -> params                                    # any pytree (Linen, NNX, plain)

  dp = jaxdp.DataParallel(loss_fn, optax.adamw(1e-3), strategy="zero3")
  state = dp.init_state(init_fn, seed=0)
  state, metrics = dp.step(state, global_batch)             # dict of NumPy arrays [B, ...]
  jaxdp.fit(dp, init_fn, batch_of_step, workdir="runs/x", num_steps=1000)

The built-in language models and the command line (`jaxdp train`) are users of this API.
"""

from jaxdp.config import load_preset
from jaxdp.core.losses import cross_entropy_sum
from jaxdp.core.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from jaxdp.core.state import TrainState
from jaxdp.core.step import example_keys
from jaxdp.errors import JaxdpError
from jaxdp.models import LanguageModel, ModelConfig
from jaxdp.models import build as build_model
from jaxdp.parallel import CommConfig, DataParallel, example_weights, make_mesh
from jaxdp.runtime.loop import RunRecord, fit
from jaxdp.runtime.metrics import read_metrics
from jaxdp.runtime.trainer import build, load_for_inference, train_and_evaluate

__all__ = ["CommConfig", "DataParallel", "JaxdpError", "LanguageModel", "ModelConfig",
           "OptimizerConfig", "RunRecord", "TrainState", "build", "build_model",
           "cross_entropy_sum", "example_keys", "example_weights", "fit",
           "learning_rate_schedule", "load_for_inference", "load_preset", "make_mesh",
           "make_optimizer", "read_metrics", "train_and_evaluate"]
