"""Tensor parallelism over the mesh's "model" axis: the same numbers as one device, annotated
dimensions really split, and user models (plain JAX with param_dims, Flax Linen with logical
names) split the same way, while an unannotated model on model > 1 is a named error."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp.analysis import verify
from jaxdp.errors import JaxdpError
from jaxdp.lm import build
from jaxdp.lm.config import load_preset

NUM_STEPS = 5
LOSS_RTOL = 1e-5
ZERO_2X2 = ("zero1", "zero3")


# ---------------------------------------------------------------- the built-in models

def lm_config(family: str):
  """tiny_cpu with 4 heads of 8 (one block: compiles fast); llama with 2 key/value heads and an
  untied head (tests/test_llama.py checks this llama on 4 data-parallel devices)."""
  c = load_preset("tiny_cpu")
  c.model.family, c.model.n_layer, c.model.n_head = family, 1, 4
  if family == "llama":
    c.model.n_kv_head, c.model.tie_embeddings = 2, False
  return c


def shard_info(state):
  """(spec, global shape, first addressable shard's shape) of every params and opt_state array,
  read before the first step donates the state."""
  info = lambda x: (tuple(x.sharding.spec), tuple(x.shape), tuple(x.addressable_shards[0].data.shape))  # noqa: E731
  return {part: {jax.tree_util.keystr(p): info(x)
                 for p, x in jax.tree_util.tree_leaves_with_path(getattr(state, part))}
          for part in ("params", "opt_state")}


def run(config, devices, case):
  """(losses, final state, trainer, shard info of the fresh state) of NUM_STEPS steps."""
  trainer = build(verify.case_config(config, case), devices)
  state = trainer.init_state()
  info = shard_info(state)
  metrics = []
  for step in range(NUM_STEPS):
    state, m = trainer.train_step(state, trainer.train_batch(step))
    metrics.append(m)
  return [float(m["train_loss"]) for m in jax.device_get(metrics)], state, trainer, info


@pytest.fixture(scope="module", params=["gpt", "llama"])
def lm_runs(request):
  """The one-device reference and zero1, zero3 on a 2x2 (data x model) mesh, per family."""
  config = lm_config(request.param)
  out = {"family": request.param,
         "reference": verify.run_reference(config, jax.devices()[0], NUM_STEPS)}
  for strategy in ZERO_2X2:
    out[strategy] = run(config, jax.devices()[:4],
                        verify.Case(f"{strategy}@2x2", strategy, data=2, model=2))
  return out


@pytest.mark.parametrize("strategy", ZERO_2X2)
def test_2x2_mesh_matches_one_device_for_builtin_models(lm_runs, strategy):
  losses, state, trainer, _ = lm_runs[strategy]
  ref_losses, ref_state, _ = lm_runs["reference"]
  assert dict(trainer.mesh.shape) == {"data": 2, "model": 2}
  assert ref_losses[-1] < ref_losses[0]  # The steps move the parameters.
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
  diff = verify.relative_differences(losses, state, ref_losses, ref_state)
  assert diff["params"] <= verify.DEFAULT_TOLERANCE["params"], diff


# Each family's split parameters: path -> (annotated dimension, global shape). 4 heads of 8,
# d_model 32; gpt MLP 128 wide, llama SwiGLU 88 wide; llama 2 key/value heads.
SPLIT = {
    "gpt": {"['block_0']['attn']['qkv']['kernel']": (2, (32, 3, 4, 8)),
            "['block_0']['attn']['qkv']['bias']": (1, (3, 4, 8)),
            "['block_0']['attn']['proj']['kernel']": (0, (4, 8, 32)),
            "['block_0']['mlp']['fc']['kernel']": (0, (128, 32)),
            "['block_0']['mlp']['fc']['bias']": (0, (128,)),
            "['block_0']['mlp']['proj']['kernel']": (1, (32, 128))},
    "llama": {"['block_0']['attn']['wq']": (0, (4, 8, 32)),
              "['block_0']['attn']['wk']": (0, (2, 8, 32)),
              "['block_0']['attn']['wv']": (0, (2, 8, 32)),
              "['block_0']['attn']['wo']": (1, (32, 4, 8)),
              "['block_0']['mlp']['w_gate']": (0, (88, 32)),
              "['block_0']['mlp']['w_up']": (0, (88, 32)),
              "['block_0']['mlp']['w_down']": (1, (32, 88))},
}
WHOLE = {"gpt": ("['wte']['embedding']", "['block_0']['attn']['proj']['bias']",
                 "['block_0']['ln1']['scale']"),
         "llama": ("['embed']['embedding']", "['lm_head']", "['block_0']['attn_norm']['scale']",
                   "['norm']['scale']")}


def test_model_axis_splits_annotated_dimensions_in_half(lm_runs):
  """zero1 on 2x2: heads (also llama's 2 key/value heads) and the MLP hidden are split over
  "model", each device holding half of that dimension; other parameters stay whole."""
  family = lm_runs["family"]
  params = lm_runs["zero1"][3]["params"]
  for path, (dim, shape) in SPLIT[family].items():
    spec, global_shape, shard_shape = params[path]
    assert global_shape == shape, path
    assert spec[dim] == "model" and spec.count("model") == 1, (path, spec)
    assert "data" not in spec, (path, spec)  # zero1 keeps parameters whole over "data".
    half = tuple(n // 2 if d == dim else n for d, n in enumerate(shape))
    assert shard_shape == half, (path, shard_shape)
  for path in WHOLE[family]:
    spec, global_shape, shard_shape = params[path]
    assert "model" not in spec and shard_shape == global_shape, (path, spec)


def split_ways(shape) -> int:
  """Devices one array is split over on 2x2 when ZeRO splits it: a matrix over "model" and
  "data"; a vector's one dimension is taken by "model", leaving none for "data"."""
  return 4 if len(shape) > 1 else 2


def test_optimizer_state_follows_the_model_split_and_zero1_splits_it_over_data(lm_runs):
  family = lm_runs["family"]
  opt = lm_runs["zero1"][3]["opt_state"]
  for path, (dim, shape) in SPLIT[family].items():
    moments = {k: v for k, v in opt.items() if k.endswith(path) and v[1] == shape}
    assert len(moments) >= 2, (path, list(opt)[:5])  # Adam's mu and nu.
    for k, (spec, _, shard_shape) in moments.items():
      assert spec[dim] == "model" and ("data" in spec) == (len(shape) > 1), (k, spec)
      assert np.prod(shard_shape) == np.prod(shape) // split_ways(shape), (k, shard_shape)


def test_zero3_splits_parameters_over_both_axes(lm_runs):
  params = shard_info(lm_runs["zero3"][1])["params"]
  for path, (dim, shape) in SPLIT[lm_runs["family"]].items():
    spec, _, shard_shape = params[path]
    assert spec[dim] == "model" and ("data" in spec) == (len(shape) > 1), (path, spec)
    assert np.prod(shard_shape) == np.prod(shape) // split_ways(shape), (path, shard_shape)


# ---------------------------------------------------------------- user models

D_IN, HIDDEN, D_OUT, BATCH = 8, 16, 4, 16


def batches():
  """One regression batch, NUM_STEPS times: the loss then falls step after step."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  x = rng.normal(size=(BATCH, D_IN)).astype(np.float32)
  return [{"x": x, "y": np.sin(x @ w).astype(np.float32)}] * NUM_STEPS


def mlp_init(rng):
  """A two-layer MLP as a plain dict: no Flax, no annotations."""
  k1, k2 = jax.random.split(rng)
  return {"w1": jax.random.normal(k1, (D_IN, HIDDEN)) / np.sqrt(D_IN),
          "b1": jnp.zeros((HIDDEN,)),
          "w2": jax.random.normal(k2, (HIDDEN, D_OUT)) / np.sqrt(HIDDEN)}


def mlp_loss(params, batch, rng):
  del rng
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])  # [b, HIDDEN]
  err = h @ params["w2"] - batch["y"]  # [b, D_OUT]
  return jnp.sum(err ** 2), jnp.float32(err.size)


MLP_DIMS = {"w1": (None, "mlp"), "b1": ("mlp",), "w2": ("mlp", None)}


def mlp_dims_fn(path, shape):
  """param_dims as a function of (path names, shape)."""
  return MLP_DIMS.get(path[-1])


def train(dp, init_fn):
  """(losses, final params, shard info of the fresh state) of NUM_STEPS steps."""
  state = dp.init_state(init_fn, seed=0)
  info = shard_info(state)["params"]
  losses = []
  for batch in batches():
    state, m = dp.step(state, batch)
    losses.append(m["train_loss"])
  return [float(x) for x in jax.device_get(losses)], jax.device_get(state.params), info


def one_device(loss_fn, init_fn):
  return train(jaxdp.DataParallel(loss_fn, optax.adam(1e-2), strategy="dp",
                                  devices=jax.devices()[:1]), init_fn)


def mesh_2x2():
  return jaxdp.make_mesh(jax.devices()[:4], 2, 2)


def assert_same_training(run, ref):
  losses, params, _ = run
  ref_losses, ref_params, _ = ref
  assert np.all(np.diff(ref_losses) < 0), ref_losses
  np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_unannotated_model_on_model_axis_is_a_named_error():
  dp = jaxdp.DataParallel(mlp_loss, optax.adam(1e-2), strategy="zero1", mesh=mesh_2x2())
  with pytest.raises(JaxdpError) as e:
    dp.init_state(mlp_init, seed=0)
  message = str(e.value)
  assert "\n" not in message
  assert "mesh.model=2" in message
  assert "param_dims" in message and "with_logical_partitioning" in message


@pytest.fixture(scope="module")
def mlp_reference():
  return one_device(mlp_loss, mlp_init)


@pytest.mark.parametrize("strategy,param_dims", [("zero1", MLP_DIMS), ("zero3", MLP_DIMS),
                                                 ("zero2", mlp_dims_fn)],
                         ids=["zero1-tree", "zero3-tree", "zero2-function"])
def test_plain_jax_model_with_param_dims_splits_and_matches_one_device(mlp_reference, strategy,
                                                                       param_dims):
  dp = jaxdp.DataParallel(mlp_loss, optax.adam(1e-2), strategy=strategy, mesh=mesh_2x2(),
                          param_dims=param_dims)
  run_ = train(dp, mlp_init)
  info = run_[2]
  assert info["['w1']"][0][1] == "model" and info["['b1']"][0][0] == "model"
  assert info["['w2']"][0][0] == "model"
  if strategy != "zero3":  # Parameters whole over "data": exactly half the hidden dimension.
    assert info["['w1']"][2] == (D_IN, HIDDEN // 2) and info["['w2']"][2] == (HIDDEN // 2, D_OUT)
  assert_same_training(run_, mlp_reference)


def test_param_dims_of_wrong_rank_is_a_named_error():
  dp = jaxdp.DataParallel(mlp_loss, optax.adam(1e-2), strategy="zero1", mesh=mesh_2x2(),
                          param_dims={"w1": ("mlp",), "b1": ("mlp",), "w2": ("mlp", None)})
  with pytest.raises(JaxdpError, match="rank 2"):
    dp.init_state(mlp_init, seed=0)


def partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


class AnnotatedMLP(nn.Module):
  """A user's Flax Linen MLP whose hidden dimension is named "mlp"."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(HIDDEN, kernel_init=partitioned(nn.initializers.lecun_normal(), ("embed", "mlp")),
                 bias_init=partitioned(nn.initializers.zeros, ("mlp",)))(x)
    return nn.Dense(D_OUT, kernel_init=partitioned(nn.initializers.lecun_normal(), ("mlp", "embed")),
                    bias_init=partitioned(nn.initializers.zeros, ("embed",)))(jnp.tanh(h))


def linen_init(rng):
  return AnnotatedMLP().init(rng, jnp.zeros((1, D_IN)))["params"]


def linen_loss(params, batch, rng):
  del rng
  err = AnnotatedMLP().apply({"params": params}, batch["x"]) - batch["y"]
  return jnp.sum(err ** 2), jnp.float32(err.size)


def test_linen_model_with_logical_names_splits_over_model_and_matches_one_device():
  ref = one_device(linen_loss, linen_init)
  dp = jaxdp.DataParallel(linen_loss, optax.adam(1e-2), strategy="zero1", mesh=mesh_2x2())
  run_ = train(dp, linen_init)
  info = run_[2]
  assert info["['Dense_0']['kernel']"] == ((None, "model"), (D_IN, HIDDEN), (D_IN, HIDDEN // 2))
  assert info["['Dense_0']['bias']"] == (("model",), (HIDDEN,), (HIDDEN // 2,))
  assert info["['Dense_1']['kernel']"] == (("model", None), (HIDDEN, D_OUT), (HIDDEN // 2, D_OUT))
  assert info["['Dense_1']['bias']"][2] == (D_OUT,)  # "embed" stays whole.
  assert_same_training(run_, ref)
