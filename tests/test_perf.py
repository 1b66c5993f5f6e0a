"""Mixed precision (training.compute_dtype) and rematerialisation (model.score.remat) of the score network."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_train
from vdiff import models
from vdiff import parallel
from vdiff import train

SHAPE, LEVELS = (8, 8, 1), 17


def tiny_model(compute_dtype="float32", *, remat=False, dropout=None):
  config = bench_train.get_config("vdm", "tiny")
  config.model.score.remat = remat
  if dropout is not None:
    config.model.score.dropout = dropout
  return models.from_config(config.model, data_shape=SHAPE, num_levels=LEVELS, num_labels=0,
                            compute_dtype=compute_dtype), config


@functools.lru_cache(maxsize=None)
def _perturbed_params():
  model, _ = tiny_model()
  params = jax.jit(model.init)(jax.random.PRNGKey(0))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys)])


def perturbed_params(model):
  """Initial parameters plus N(0, 0.1^2) noise on every leaf: at initialisation the zero-initialised
  output convolutions make the network the identity z -> z in any dtype, which would hide the
  compute dtype entirely. Every tiny model here has the same parameter pytree (neither the compute
  dtype nor remat changes it), so they are computed once."""
  params = _perturbed_params()
  assert jax.tree.structure(params) == jax.tree.structure(jax.eval_shape(model.init, jax.random.PRNGKey(0)))
  return params


def batch(n=16):
  return bench_train.random_batch(np.random.RandomState(0), 1, n, SHAPE, LEVELS)


# Measured |L_bf16 - L_f32| / |L_f32| on this batch for rng seeds 0..4: 7.1e-4, 8.0e-5, 1.2e-3, 1.1e-3,
# 1.5e-3 (bfloat16 keeps 8 significant bits, a relative rounding of 2^-9 = 2e-3 per operation, largely
# averaging out over the batch and pixels). The bound 1e-2 leaves a margin of 6.5x over the largest.
BF16_RTOL = 1e-2


def test_bf16_training_loss_close_to_float32():
  m32, _ = tiny_model("float32")
  m16, _ = tiny_model("bfloat16")
  params = perturbed_params(m32)
  loss = lambda m: jax.jit(lambda p, r: jnp.mean(m.loss(p, r, batch(), train=True)[0]))
  f32, f16 = loss(m32), loss(m16)
  for seed in (0, 2, 4):
    rng = jax.random.PRNGKey(seed)
    l32, l16 = float(f32(params, rng)), float(f16(params, rng))
    rel = abs(l16 - l32) / abs(l32)
    assert rel < BF16_RTOL, (seed, l16, l32, rel)
    # The setting does reach the network: bfloat16 rounding changes the loss.
    assert rel > 1e-6, (seed, l16, l32, rel)


def test_bf16_network_computes_in_bf16_and_returns_float32():
  m16, _ = tiny_model("bfloat16")
  params = perturbed_params(m16)
  z = jnp.ones((2,) + SHAPE, jnp.float32)
  jaxpr = jax.make_jaxpr(lambda p: m16.train_net.apply({"params": p["score"]}, z, jnp.zeros((2,)),
                                                       train=True, rngs={"dropout": jax.random.PRNGKey(0)}))
  text = str(jaxpr(params))
  assert "conv_general_dilated" in text and "bf16" in text
  out = jaxpr(params).out_avals[0]
  assert out.dtype == jnp.float32


def test_bf16_train_step_keeps_float32_state():
  m16, config = tiny_model("bfloat16")
  mesh = parallel.make_mesh()
  tx = train.optimizer_from_config(config)
  params = perturbed_params(m16)
  m16.init = lambda rng: params  # the cached float32 parameters, instead of a second initialisation
  state = train.init_state(m16, tx, jax.random.PRNGKey(0), mesh)
  step = jax.jit(train.make_train_step(m16, ema_decay=0.9))
  state, metrics = step(state, batch())
  assert bool(metrics["finite"])
  for tree in (state.params, state.ema_params, state.opt_state):
    dtypes = {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
  assert metrics["loss"].dtype == jnp.float32


def test_evaluation_ignores_compute_dtype():
  m32, _ = tiny_model("float32")
  m16, _ = tiny_model("bfloat16")
  params = perturbed_params(m32)
  rng = jax.random.PRNGKey(3)
  z = jax.random.normal(rng, (4,) + SHAPE)
  t = jnp.full((4,), 0.5)
  evaluate = lambda m: jax.jit(lambda p: (m.nll(p, rng, batch())[0], m.eps_fn(p)(z, t)))(params)
  (n32, e32), (n16, e16) = evaluate(m32), evaluate(m16)
  # The same float32 program whatever the setting: bit-identical NLLs and denoiser outputs.
  np.testing.assert_array_equal(np.asarray(n16), np.asarray(n32))
  np.testing.assert_array_equal(np.asarray(e16), np.asarray(e32))


def test_unknown_compute_dtype_names_the_key():
  with pytest.raises(ValueError, match="training.compute_dtype"):
    tiny_model("float16")


def test_remat_same_loss_and_gradients():
  # Dropout on: the rematerialised blocks must redraw the same dropout masks in the backward pass.
  plain, _ = tiny_model(remat=False, dropout=0.1)
  remat, _ = tiny_model(remat=True, dropout=0.1)
  params = perturbed_params(plain)
  rng = jax.random.PRNGKey(7)

  def vg(model):
    f = lambda p: jnp.mean(model.loss(p, rng, batch(), train=True)[0])
    return jax.jit(jax.value_and_grad(f))(params), jax.make_jaxpr(jax.grad(f))(params)

  (l0, g0), jaxpr0 = vg(plain)
  (l1, g1), jaxpr1 = vg(remat)
  # The remat program really rematerialises: its gradient recomputes the first convolution of each of
  # the 5 ResNet blocks (the second feeds only the linear skip sum, whose backward needs no stored
  # value) -- 5 more convolutions.
  convs = lambda j: str(j).count("conv_general_dilated")
  assert convs(jaxpr1) == convs(jaxpr0) + 5, (convs(jaxpr1), convs(jaxpr0))
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  # Gradients: the same computation, recomputed; differences are float32 reassociation round-off.
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-8)
