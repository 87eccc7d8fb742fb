"""The built-in models' named choices, importable without JAX or Flax (the command line refuses a
bad value before it loads them). jaxdp.models and the config validation read them from here."""

from typing import Any

FAMILIES = ("gpt", "llama")  # Model families (jaxdp.models.registry builds each).
POSITIONS = ("rope", "learned")  # Position encodings: rotary, or learned absolute embeddings.
ATTENTION = ("xla", "cudnn", "reference")  # Attention kernels (models.common.attention).
REMATS = ("none", "block", "full")  # Activation rematerialisation of each block.
# llama-family variants: the Hugging Face class each is exported as ("" is LlamaForCausalLM) and
# the fields that make the architecture, {field: required value}, or None where any value fits.
VARIANTS: dict[str, dict[str, bool | int | None]] = {
    "": {"qkv_bias": False, "qk_norm": False, "sliding_window": 0},
    "qwen2": {"qkv_bias": True, "qk_norm": False, "sliding_window": None},
    "qwen3": {"qkv_bias": False, "qk_norm": True, "sliding_window": None},
    "mistral": {"qkv_bias": False, "qk_norm": False, "sliding_window": None}}
VARIANT_OF = {"qkv_bias": "qwen2", "qk_norm": "qwen3", "sliding_window": "mistral"}
HF_CLASSES = {"": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "mistral": "MistralForCausalLM"}


def check_variant(family: str, variant: str, **fields: Any) -> None:
  """Refuses llama-variant fields that the family or `variant` does not have.

  `fields`: the values of config.model.head_dim, qkv_bias, qk_norm and sliding_window.

  Raises:
    JaxdpError: one line naming the config.model field and the value that fits.
  """
  from jaxdp.errors import JaxdpError
  for name in ("head_dim", "sliding_window"):
    if int(fields.get(name, 0)) < 0:
      raise JaxdpError(f"config.model.{name}={fields[name]} is negative; give 0 (off) or a size")
  if family != "llama":
    for name, value in fields.items():
      if value:
        raise JaxdpError(f"config.model.{name}={value} is a llama-family field; set "
                         f"--config.model.family=llama or --config.model.{name}=0")
    if variant:
      raise JaxdpError(f"config.model.variant={variant!r} is a llama-family variant; set "
                       f"--config.model.family=llama or --config.model.variant=''")
    return
  if variant not in VARIANTS:
    raise JaxdpError(f"config.model.variant={variant!r} is not one of "
                     f"{', '.join(map(repr, VARIANTS))} ('' is Llama)")
  for name, required in VARIANTS[variant].items():
    value = fields.get(name, 0)
    if required is not None and bool(value) != required:
      fix = (f"--config.model.variant={VARIANT_OF[name]}" if value and name in VARIANT_OF
             else f"--config.model.{name}={required}")
      raise JaxdpError(f"config.model.{name}={value} does not fit config.model.variant="
                       f"{variant!r} ({HF_CLASSES[variant]}, which export writes); set {fix}")
