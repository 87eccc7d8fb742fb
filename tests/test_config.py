"""Config validation: every bad field is named with its fix."""

import pytest

from jaxdp.errors import JaxdpError
from jaxdp.lm.config import load_preset, validate


def test_presets_validate():
  for name in ("default", "tiny_cpu"):
    validate(load_preset(name), 2)


@pytest.mark.parametrize("field, value, message", [
    ("strategy", "ddp", "config.strategy='ddp' is not one of"),
    ("grad_accum_steps", 3, "not divisible by data devices x grad_accum_steps = 2 x 3"),
    ("num_steps", 0, "config.num_steps=0 must be positive"),
    ("grad_clip", -1.0, "config.grad_clip=-1.0 must be >= 0"),
    ("attention", "flash", "config.attention='flash'"),
])
def test_bad_fields_name_themselves(field, value, message):
  config = load_preset("tiny_cpu")
  config[field] = value
  with pytest.raises(JaxdpError, match=message.replace("(", r"\(")):
    validate(config, 2)


def test_heads_must_divide_width():
  config = load_preset("tiny_cpu")
  config.model.n_head = 3
  with pytest.raises(JaxdpError, match="not divisible by config.model.n_head=3"):
    validate(config, 2)
