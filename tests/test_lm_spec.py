"""The language-model app's door: one typed RunSpec from the ConfigDict, rules worded once."""

import dataclasses
import warnings

import pytest

from jaxdp.core.optimizer import OptimizerConfig
from jaxdp.data.spec import DataSpec
from jaxdp.errors import JaxdpError
from jaxdp.lm.config import load_preset, validate
from jaxdp.lm.spec import RunSpec, run_spec
from jaxdp.parallel import CommConfig
from jaxdp.parallel.choices import check_comm


def test_run_spec_turns_each_field_into_its_layers_typed_value():
  config = load_preset("tiny_cpu")
  config.learning_rate, config.mesh.model, config.strategy = 1e-3, 2, "zero1"
  config.b1, config.grad_clip, config.num_steps = 0.8, 0.5, 7
  spec = run_spec(config, 8, vocab_size=256)
  assert isinstance(spec, RunSpec) and isinstance(spec.optimizer, OptimizerConfig)
  assert spec.optimizer.learning_rate == 1e-3 and spec.optimizer.decay_steps == 7
  assert (spec.mesh.data, spec.mesh.model, spec.mesh.replica) == (4, 2, 1)
  assert spec.step.strategy == "zero1" and spec.fit.num_steps == 7
  assert spec.fit.tokens_per_step == config.global_batch_size * config.seq_len
  assert spec.model.vocab_size == 256 and spec.data == DataSpec(
      path=config.data.path, val_fraction=config.data.val_fraction, seq_len=config.seq_len,
      seed=config.seed, global_batch_size=config.global_batch_size,
      grad_accum_steps=config.grad_accum_steps, eval_steps=config.eval_steps)
  # The exchange's copy of Adam's first moment takes the optimizer's b1 and clipping norm.
  assert (spec.comm.b1, spec.comm.grad_clip) == (0.8, 0.5)
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.seed = 1


def test_a_comm_rule_has_one_wording_at_either_door():
  config = load_preset("tiny_cpu")
  config.momentum_correction, config.compression = 0.9, "int8"
  with pytest.raises(JaxdpError) as from_config:
    validate(config, 2)
  with pytest.raises(JaxdpError) as from_library:
    CommConfig(compression="int8", momentum_correction=0.9)
  assert str(from_config.value) == str(from_library.value).replace("CommConfig.", "config.")
  assert str(from_config.value).startswith("config.momentum_correction=0.9 needs config.compression=")
  with pytest.raises(JaxdpError, match="CommConfig.sync='sometimes' is not one of"):
    check_comm({**dataclasses.asdict(CommConfig()), "sync": "sometimes"})


def test_data_spec_refuses_an_unknown_packing():
  with pytest.raises(JaxdpError, match="config.data.packing='tight' is not one of concat, document"):
    DataSpec(packing="tight")


def test_renamed_builders_keep_their_old_names_with_a_deprecation_warning():
  from jaxdp.lm import builder
  with pytest.warns(DeprecationWarning, match="use LMRun"):
    assert builder.Trainer is builder.LMRun
  with pytest.warns(DeprecationWarning, match="use build_model_and_dp"):
    builder.build_model  # noqa: B018
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    import jaxdp
    from jaxdp import models
    assert jaxdp.build_model is models.build  # Unchanged meaning: no warning.
