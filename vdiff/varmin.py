"""Learning the schedule's shape by minimising the variance of the diffusion-loss estimator.

VDM (Kingma et al., arXiv:2107.00630, sec. 5 and appendix I.2): the continuous-time diffusion loss
depends on the schedule gamma(t) only through its endpoints gamma(0), gamma(1); the shape in between
leaves E[L_diff] unchanged and only changes the variance of the one-sample Monte-Carlo estimator. So the
endpoints are learned through the ELBO, and the shape parameters eta by descending the variance:

    d/d eta Var[L_diff] = d/d eta E[L_diff^2] = E[2 L_diff dL_diff/d eta]       (E[L_diff] is eta-free).

`variance_minimizing_diffusion_loss` is a drop-in replacement for the per-example L_diff inside a
trainer's loss. Its VALUE is L_diff [B] unchanged, and if the trainer differentiates
sum_b c_b L_b (c_b = 1/B for a batch mean, c_b = 1/(B D ln 2) for mean bits/dim, ...), then
  * every parameter except the shape (endpoints gamma_0, gamma_1, the denoiser, a DiffEnc encoder, ...)
    gets the ordinary gradient  sum_b c_b dL_b/d theta;
  * the shape parameters eta get  sum_b c_b 2 L_b dL_b/d eta,  i.e. for the batch mean
    d/d eta [ (1/B) sum_b L_b^2 ]  -- the gradient of the batch mean of L_diff^2 (in nats^2), which is an
    unbiased estimate of d Var[L_diff] / d eta.
Implementation: a jax.custom_vjp whose forward pass evaluates the per-example loss with a per-example
COPY of the shape parameters (vmap over the batch with eta broadcast), so a single reverse pass yields the
per-example shape gradients dL_b/d eta_b [B, ...]; the backward rule contracts them with c_b 2 L_b and
passes all other cotangents through unchanged. Closed-over arrays of `diff_loss_fn` (the denoiser's
parameters) are hoisted with jax.closure_convert so that their gradients flow as usual.

The shape is eta-free in expectation only in continuous time; with a T-step loss the gradient returned for
eta is still d mean(L^2)/d eta, which then also moves E[L].
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from vdiff import diffenc
from vdiff import schedules as schedules_lib
from vdiff import vdm

Array = jax.Array
PyTree = Any


def variance_minimizing_diffusion_loss(diff_loss_fn: Callable[[PyTree, PyTree], Array],
                                       schedule_params: dict, batch: PyTree, *,
                                       shape_key: str = "shape") -> Array:
  """Per-example L_diff [B] whose gradient w.r.t. schedule_params[shape_key] minimises its variance.

      value:        L_b = diff_loss_fn(schedule_params, batch)_b
      backward:     d/d eta      <- sum_b c_b 2 L_b dL_b/d eta      (eta = schedule_params[shape_key])
                    d/d anything <- sum_b c_b dL_b/d anything        (endpoints, closed-over params, batch)

  where c_b is the cotangent of L_b (1/B if the caller takes the batch mean). See the module docstring.

  Args:
    diff_loss_fn: (schedule_params, batch) -> [B] per-example diffusion loss in nats, e.g. one that
      builds `schedules.from_module(PinnedMonotoneGamma(...), schedule_params)` and calls
      `vdm.diffusion_loss` or `diffenc.diffusion_loss`. It must be separable over the batch (example b's
      loss depends only on example b's inputs: no batch statistics); it is evaluated per example under
      vmap. It may close over other (differentiated) parameters, e.g. the denoiser's.
    schedule_params: dict of schedule parameters with key `shape_key`, e.g. PinnedMonotoneGamma's
      {'gamma_0', 'gamma_1', 'shape'}.
    batch: pytree of per-example arrays with leading dimension B (e.g. {'x', 't', 'eps'}).
    shape_key: the key of the shape parameters in schedule_params.
  Returns:
    [B] the per-example loss (same values as diff_loss_fn(schedule_params, batch)).
  """
  if shape_key not in schedule_params:
    raise KeyError(f"schedule_params has no {shape_key!r} entry; keys: {list(schedule_params)}.")
  shape = schedule_params[shape_key]
  rest = {k: v for k, v in schedule_params.items() if k != shape_key}
  batch_size = jax.tree_util.tree_leaves(batch)[0].shape[0]

  def per_example(shape_b, rest, batch_b):
    one = jax.tree_util.tree_map(lambda a: a[None], batch_b)
    out = diff_loss_fn({**rest, shape_key: shape_b}, one)
    if out.shape != (1,):
      raise ValueError(
          "diff_loss_fn must be separable over the batch: on a batch of one it returned shape "
          f"{out.shape}, not (1,). Pass per-example inputs (e.g. labels) in `batch`, not by closure.")
    return out[0]

  example = jax.tree_util.tree_map(lambda a: a[0], batch)
  converted, consts = jax.closure_convert(per_example, shape, rest, example)
  num_consts = len(consts)

  def batched(shape_per_example, rest, batch, consts):
    return jax.vmap(lambda s, b: converted(s, rest, b, *consts))(shape_per_example, batch)

  @jax.custom_vjp
  def loss(shape, rest, batch, consts):
    return batched(_tile(shape, batch_size), rest, batch, consts)

  def loss_fwd(shape, rest, batch, consts):
    value, vjp_fn = jax.vjp(batched, _tile(shape, batch_size), rest, batch, consts)
    return value, (value, vjp_fn)

  def loss_bwd(res, ct):
    value, vjp_fn = res
    g_shape_per_example, g_rest, g_batch, g_consts = vjp_fn(ct)
    # ct_b dL_b/d eta_b came back per example: weight by 2 L_b and sum over the batch.
    w = 2.0 * value
    g_shape = jax.tree_util.tree_map(lambda g: jnp.tensordot(w, g, axes=1), g_shape_per_example)
    return g_shape, g_rest, g_batch, g_consts

  loss.defvjp(loss_fwd, loss_bwd)
  assert len(consts) == num_consts
  return loss(shape, rest, batch, list(consts))


def _tile(tree: PyTree, n: int) -> PyTree:
  """Broadcast every leaf to a leading axis of size n (one copy of the shape parameters per example)."""
  return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (n,) + jnp.shape(a)), tree)


def negative_elbo(rng: Array, x: Array, *, gamma_module, schedule_params: dict,
                  eps_fn_from_schedule: Callable[[schedules_lib.Schedule, PyTree], vdm.EpsFn],
                  num_levels: int, cond: PyTree = None,
                  encoder: Callable[[Array, Array], Array] | None = None,
                  num_steps: int | None = None, antithetic: bool = True, t: Array | None = None,
                  shape_key: str = "shape") -> tuple[Array, dict[str, Array]]:
  """-ELBO per example (VDM, or DiffEnc with `encoder`) with the variance-minimising shape gradient.

  Same value and rng use as `vdm.negative_elbo` / `diffenc.negative_elbo`; the only difference is the
  gradient w.r.t. schedule_params[shape_key] (see `variance_minimizing_diffusion_loss`). The prior and
  reconstruction terms depend on the schedule only through gamma(0), gamma(1) (for PinnedMonotoneGamma
  these are the 'gamma_0', 'gamma_1' parameters exactly, with zero shape gradient).

  Args:
    rng: PRNG key. x: [B, ...] encoded K-level data.
    gamma_module: the learned schedule module (e.g. `schedules.PinnedMonotoneGamma()`).
    schedule_params: its parameters {'gamma_0', 'gamma_1', 'shape': {...}}.
    eps_fn_from_schedule: (schedule, cond) -> eps_fn(z, t), e.g.
      `lambda s, c: vdm.make_eps_fn(lambda z, g: net.apply({'params': p}, z, g, c), s)`. It is called
      per example (batch of one, under vmap) with a schedule built from that example's copy of the
      shape parameters and that example's slice of `cond`: per-example inputs such as class labels
      must come through `cond`, not through a closure.
    num_levels: K. cond: optional per-example conditioning pytree (leading dimension B), or None.
    encoder: None for VDM, or a DiffEnc encoder. num_steps: T (None = continuous).
    antithetic: stratified t. t: optional [B] times. shape_key: key of the shape parameters.
  Returns:
    (nelbo [B], {"prior": [B], "recon": [B], "diff": [B]}).
  """
  enc = diffenc.as_encoder(encoder if encoder is not None else diffenc.identity_encoder())
  rng_t, rng_0, rng_e = jax.random.split(rng, 3)
  if t is None:
    t = vdm.sample_times(rng_t, x.shape[0], antithetic=antithetic)
  eps = jax.random.normal(rng_e, x.shape)

  def diff_loss_fn(params, b):
    schedule = schedules_lib.from_module(gamma_module, params)
    eps_fn = eps_fn_from_schedule(schedule, b["cond"])
    if encoder is None:
      return vdm.diffusion_loss(b["x"], b["t"], b["eps"], schedule=schedule, eps_fn=eps_fn,
                                num_steps=num_steps)
    return diffenc.diffusion_loss(b["x"], b["t"], b["eps"], schedule=schedule, encoder=enc,
                                  eps_fn=eps_fn, num_steps=num_steps)

  diff = variance_minimizing_diffusion_loss(diff_loss_fn, schedule_params,
                                            {"x": x, "t": t, "eps": eps, "cond": cond},
                                            shape_key=shape_key)
  schedule = schedules_lib.from_module(gamma_module, schedule_params)
  prior, recon = diffenc.endpoint_losses(rng_0, x, schedule=schedule, encoder=enc,
                                         num_levels=num_levels)
  return prior + recon + diff, {"prior": prior, "recon": recon, "diff": diff}
