"""Tests of vdiff.varmin: the variance-minimising gradient of the schedule's shape (VDM, arXiv:2107.00630,
sec. 5; docs/math.md sec. 2).

Reference for every gradient below: direct autodiff of the defining expressions,
  shape parameters:          d/d eta [ mean_b L_b^2 ]     (= mean_b 2 L_b dL_b/d eta)
  everything else:           d/d theta [ mean_b L_b ]     (the ordinary ELBO gradient),
with L_b the per-example diffusion loss from vdm.diffusion_loss / diffenc.diffusion_loss.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdiff import diffenc
from vdiff import models
from vdiff import schedules
from vdiff import varmin
from vdiff import vdm

B, D = 8, 3
GAMMA_MODULE = schedules.PinnedMonotoneGamma(n_features=16)
NUM_LABELS = 3


def _params():
  rng = jax.random.PRNGKey(0)
  sched = GAMMA_MODULE.init(rng, jnp.zeros((2,)))["params"]
  # A shape far from linear (the default init's nonlinear part is ~1e-3 of the linear one), so that
  # the shape gradients are well above float32 noise.
  shape = dict(sched["shape"])
  shape["l2"] = dict(shape["l2"], kernel=300.0 * shape["l2"]["kernel"])
  shape["l3"] = dict(shape["l3"], kernel=1000.0 * shape["l3"]["kernel"])
  # Endpoints gamma_0 = -11, gamma_1 = gamma_0 + softplus(gap) = 4 (softplus(15 + log(-expm1(-15))) = 15).
  sched = dict(sched, gamma_0=jnp.float32(-11.0), gap=jnp.float32(15.0 + np.log(-np.expm1(-15.0))),
               shape=shape)
  theta = {"w": jnp.array([0.9, 1.1, 0.7]), "c": jnp.array([0.3, -0.2, 0.5]),
           "label": jnp.array([0.0, 0.1, -0.1])}
  phi = {"a": jnp.array(0.4), "b": jnp.array(-0.3)}
  return {"schedule": sched, "theta": theta, "phi": phi}


def _batch():
  rng = np.random.RandomState(0)
  return {"x": jnp.asarray(rng.uniform(-1, 1, (B, D)), jnp.float32),
          "t": vdm.sample_times(jax.random.PRNGKey(1), B),
          "eps": jnp.asarray(rng.randn(B, D), jnp.float32),
          "label": jnp.asarray(rng.randint(0, NUM_LABELS, (B,)), jnp.int32)}  # an integer leaf


def _eps_fn(schedule, theta, label):
  """A small class-conditional denoiser, conditioned on gamma through vdm.make_eps_fn."""
  apply = lambda z, g: (jnp.tanh(theta["w"] * z + theta["c"] * g[:, None])
                        + theta["label"][label][:, None])
  return vdm.make_eps_fn(apply, schedule)


def _encoder(phi):
  return diffenc.trainable_encoder(
      lambda x, g: jnp.tanh(phi["a"] * x + phi["b"] * vdm.bcast(g, x) / 10.0))


def _diff_loss_fn(params, kind, num_steps):
  """(schedule_params, batch) -> [B], closing over the denoiser (and encoder) parameters."""

  def fn(schedule_params, b):
    schedule = schedules.from_module(GAMMA_MODULE, schedule_params)
    eps_fn = _eps_fn(schedule, params["theta"], b["label"])
    if kind == "vdm":
      return vdm.diffusion_loss(b["x"], b["t"], b["eps"], schedule=schedule, eps_fn=eps_fn,
                                num_steps=num_steps)
    return diffenc.diffusion_loss(b["x"], b["t"], b["eps"], schedule=schedule,
                                  encoder=_encoder(params["phi"]), eps_fn=eps_fn, num_steps=num_steps)

  return fn


def _split(grads):
  """(shape gradient, every other gradient)."""
  shape = grads["schedule"]["shape"]
  rest = dict(grads, schedule={k: v for k, v in grads["schedule"].items() if k != "shape"})
  return shape, rest


def _assert_trees_close(a, b, rtol=1e-4):
  """Leafwise allclose, with an absolute slack of rtol times the largest entry of the whole tree (some
  entries, e.g. the shape's l1 bias, are zero in exact arithmetic and float32 noise in practice)."""
  scale = max(float(np.max(np.abs(leaf))) for leaf in jax.tree_util.tree_leaves(b))
  jax.tree_util.tree_map(
      lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol * scale), a, b)


@pytest.mark.parametrize("kind,num_steps", [("vdm", None), ("diffenc", 20)])
def test_gradients_are_variance_for_shape_and_elbo_for_the_rest(kind, num_steps):
  params, batch = _params(), _batch()

  def varmin_mean(p, cotangent):
    losses = varmin.variance_minimizing_diffusion_loss(
        _diff_loss_fn(p, kind, num_steps), p["schedule"], batch)
    return jnp.sum(cotangent * losses), losses

  def direct(p, cotangent, power):
    losses = _diff_loss_fn(p, kind, num_steps)(p["schedule"], batch)
    return jnp.sum(cotangent * losses ** power)

  @jax.jit
  def run(p, cotangent):
    (_, losses), g = jax.value_and_grad(varmin_mean, has_aux=True)(p, cotangent)
    g_l = jax.grad(direct)(p, cotangent, 1)
    g_l2 = jax.grad(direct)(p, cotangent, 2)
    ref_losses = _diff_loss_fn(p, kind, num_steps)(p["schedule"], batch)
    return losses, ref_losses, g, g_l, g_l2

  # Mean over the batch (c_b = 1/B), then an arbitrary cotangent c_b (e.g. a bits/dim scale or a mask).
  for cotangent in (jnp.full((B,), 1.0 / B), jnp.linspace(-0.5, 1.0, B)):
    losses, ref_losses, g, g_l, g_l2 = run(params, cotangent)
    # The value is unchanged (rtol: per-example vs batched evaluation round differently).
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    shape, rest = _split(g)
    shape_l, rest_l = _split(g_l)
    shape_l2, _ = _split(g_l2)
    _assert_trees_close(shape, shape_l2)  # shape: d/d eta sum_b c_b L_b^2
    _assert_trees_close(rest, rest_l)  # endpoints, denoiser, encoder: d/d theta sum_b c_b L_b
    # The two shape gradients really differ (the test is not vacuous).
    kernel = lambda tree: np.asarray(tree["l2"]["kernel"])
    assert np.max(np.abs(kernel(shape_l) - kernel(shape))) > 1e-3 * np.max(np.abs(kernel(shape)))
    assert np.max(np.abs(rest["schedule"]["gamma_0"])) > 0 and np.max(np.abs(rest["theta"]["w"])) > 0


@pytest.mark.parametrize("with_encoder,check_grads", [(False, True), (True, False)])
def test_negative_elbo_matches_and_routes_gradients(with_encoder, check_grads):
  # (The DiffEnc gradients are checked above; here only its value, to keep CPU compile time short.)
  # Reference: vdm.negative_elbo / diffenc.negative_elbo with the same rng; prior and reconstruction
  # depend on the schedule only through gamma_0, gamma_1, so the shape gradient of the mean -ELBO under
  # varmin is d/d eta mean_b(L_diff,b^2).
  params = _params()
  x = jnp.asarray(np.random.RandomState(2).randint(0, 256, (B, D)) / 127.5 - 1.0, jnp.float32)
  label = jnp.asarray(np.random.RandomState(3).randint(0, NUM_LABELS, (B,)), jnp.int32)
  rng = jax.random.PRNGKey(7)

  def ours(p):
    nelbo, terms = varmin.negative_elbo(
        rng, x, gamma_module=GAMMA_MODULE, schedule_params=p["schedule"],
        eps_fn_from_schedule=lambda s, c: _eps_fn(s, p["theta"], c), cond=label, num_levels=256,
        encoder=_encoder(p["phi"]) if with_encoder else None)
    return jnp.mean(nelbo), (nelbo, terms)

  def ref(p):
    schedule = schedules.from_module(GAMMA_MODULE, p["schedule"])
    eps_fn = _eps_fn(schedule, p["theta"], label)
    if with_encoder:
      return diffenc.negative_elbo(rng, x, schedule=schedule, encoder=_encoder(p["phi"]),
                                   eps_fn=eps_fn, num_levels=256)
    return vdm.negative_elbo(rng, x, schedule=schedule, eps_fn=eps_fn, num_levels=256)

  @jax.jit
  def values(p):
    return ours(p)[1], ref(p)

  (nelbo, terms), (ref_nelbo, ref_terms) = values(params)
  np.testing.assert_allclose(nelbo, ref_nelbo, rtol=1e-5)
  for k in ("prior", "recon", "diff"):
    np.testing.assert_allclose(terms[k], ref_terms[k], rtol=1e-5)
  if not check_grads:
    return

  @jax.jit
  def grads(p):
    g = jax.grad(lambda q: ours(q)[0])(p)
    g_elbo = jax.grad(lambda q: jnp.mean(ref(q)[0]))(p)
    g_var = jax.grad(lambda q: jnp.mean(ref(q)[1]["diff"] ** 2))(p)
    return g, g_elbo, g_var

  g, g_elbo, g_var = grads(params)
  shape, rest = _split(g)
  _, rest_elbo = _split(g_elbo)
  shape_var, _ = _split(g_var)
  _assert_trees_close(shape, shape_var)
  _assert_trees_close(rest, rest_elbo)


def test_misuse_raises():
  with pytest.raises(KeyError):
    varmin.variance_minimizing_diffusion_loss(lambda p, b: b["x"], {"w": 1.0}, {"x": jnp.ones(2)})
  # The loss must be per example, [B].
  with pytest.raises(ValueError, match=r"shape \[B\] = \(4,\)"):
    varmin.variance_minimizing_diffusion_loss(lambda p, b: jnp.sum(p["shape"] * b["x"]),
                                              {"shape": jnp.float32(1.0)}, {"x": jnp.ones(4)})


def test_loss_that_mixes_examples_gets_the_defining_gradients():
  # The loss is evaluated once on the whole batch, so a loss that couples examples (here through a
  # batch mean) is allowed, and its gradients are still the defining ones. Reference: direct autodiff,
  #   d/d eta sum_b c_b L_b^2  and  d/d theta sum_b c_b L_b.
  x = jnp.linspace(-1.0, 2.0, 5)
  c = jnp.linspace(0.2, 1.0, 5)

  def fn(p, b):
    return jnp.sin(p["shape"] * b["x"]) * p["theta"] + jnp.mean(b["x"] * p["shape"]) ** 2

  params = {"shape": jnp.float32(0.7), "theta": jnp.float32(1.3)}
  g = jax.grad(lambda p: jnp.sum(c * varmin.variance_minimizing_diffusion_loss(fn, p, {"x": x})))(params)
  g_l = jax.grad(lambda p: jnp.sum(c * fn(p, {"x": x})))(params)
  g_l2 = jax.grad(lambda p: jnp.sum(c * fn(p, {"x": x}) ** 2))(params)
  np.testing.assert_allclose(g["shape"], g_l2["shape"], rtol=1e-6)
  np.testing.assert_allclose(g["theta"], g_l["theta"], rtol=1e-6)
  assert abs(float(g_l["shape"]) - float(g_l2["shape"])) > 0.1


def _dropout_families(dropout):
  """A plain and a variance-minimising VDM family on 4x4x1 images sharing one parameter layout."""
  kw = dict(data_shape=(4, 4, 1), num_levels=17,
            schedule=models.ScheduleSpec("learned_pinned", -8.0, 5.0),
            score_kwargs=dict(ch=8, num_blocks=1, dropout=dropout, attention=False, fourier_min=2,
                              fourier_max=2, num_groups=4))
  plain, vm = models.VDMFamily(**kw), models.VDMFamily(**kw, variance_minimization=True)
  params = plain.init(jax.random.PRNGKey(0))
  # The score network's output convolutions start at zero, which would hide dropout (it acts just
  # before them): move every parameter off its initial value.
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [p + 0.3 * jax.random.normal(k, jnp.shape(p)) for p, k in zip(leaves, keys)]
  return plain, vm, jax.tree_util.tree_unflatten(treedef, leaves)


def test_family_varmin_with_dropout_equals_the_plain_loss():
  # Reference: VDMFamily without variance minimisation, same parameters, same rng, train=True (one
  # batched network call, one dropout mask per example). Identical images in every row, so that a
  # mask shared by the rows would show as a mismatch in every row but the one whose mask it is.
  plain, vm, params = _dropout_families(dropout=0.5)
  batch = {"image": jnp.full((4, 4, 4, 1), 9, jnp.int32).at[:, 1, 2, 0].set(3)}
  rng = jax.random.PRNGKey(5)
  loss = lambda f: jax.jit(lambda p, r: f.loss(p, r, batch, train=True))
  ref, ref_terms = loss(plain)(params, rng)
  got, got_terms = loss(vm)(params, rng)
  np.testing.assert_allclose(got_terms["diff"], ref_terms["diff"], rtol=1e-5)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  # Not vacuous: dropout changes the loss.
  no_dropout, _ = jax.jit(lambda p: plain.loss(p, rng, batch, train=False))(params)
  assert np.max(np.abs(np.asarray(ref) - np.asarray(no_dropout))) > 1e-2 * np.max(np.abs(ref))

  # Gradients with dropout: the shape gets d/d eta mean(L_diff^2), everything else d/d theta mean(-ELBO),
  # both of the plain path on the same rng (same masks).
  @jax.jit
  def grads(p):
    g = jax.grad(lambda q: jnp.mean(vm.loss(q, rng, batch, train=True)[0]))(p)
    g_elbo = jax.grad(lambda q: jnp.mean(plain.loss(q, rng, batch, train=True)[0]))(p)
    g_var = jax.grad(lambda q: jnp.mean(plain.loss(q, rng, batch, train=True)[1]["diff"] ** 2))(p)
    return g, g_elbo, g_var

  g, g_elbo, g_var = grads(params)
  _assert_trees_close(g["schedule"]["shape"], g_var["schedule"]["shape"])
  _assert_trees_close({k: v for k, v in g["schedule"].items() if k != "shape"},
                      {k: v for k, v in g_elbo["schedule"].items() if k != "shape"})
  _assert_trees_close(g["score"], g_elbo["score"])
