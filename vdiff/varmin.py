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
Implementation: a jax.custom_vjp whose forward pass evaluates `diff_loss_fn` ONCE on the whole batch,
exactly as the plain loss does (the same network call, hence the same dropout masks for the same rng),
and keeps its VJP. The backward rule applies that VJP to two cotangents: c (for every parameter but the
shape) and 2 L c (for the shape), since

    sum_b c_b 2 L_b dL_b/d eta = d/d eta [ sum_b w_b L_b ]   with the weights w_b = 2 c_b L_b held fixed.

No per-example gradients are formed and the loss need not be separable over the batch. The cost is one
extra reverse pass through the loss for the shape cotangent; under jit, XLA drops the parts of each pass
whose results are unused (e.g. the network's weight gradients in the shape pass). Closed-over arrays of
`diff_loss_fn` (the denoiser's parameters) are hoisted with jax.closure_convert so that their gradients
flow as usual.

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
      `vdm.diffusion_loss` or `diffenc.diffusion_loss`. It is called once on the whole batch, so its
      value (dropout included) is that of the plain loss. It may close over other (differentiated)
      parameters, e.g. the denoiser's, and over rng keys.
    schedule_params: dict of schedule parameters with key `shape_key`, e.g. PinnedMonotoneGamma's
      {'gamma_0', 'gap', 'shape'}.
    batch: pytree of per-example arrays with leading dimension B (e.g. {'x', 't', 'eps'}).
    shape_key: the key of the shape parameters in schedule_params.
  Returns:
    [B] the per-example loss (the value of diff_loss_fn(schedule_params, batch)).
  """
  if shape_key not in schedule_params:
    raise KeyError(f"schedule_params has no {shape_key!r} entry; keys: {list(schedule_params)}.")
  shape = schedule_params[shape_key]
  rest = {k: v for k, v in schedule_params.items() if k != shape_key}
  batch_size = jax.tree_util.tree_leaves(batch)[0].shape[0]

  def fn(shape, rest, batch):
    return diff_loss_fn({**rest, shape_key: shape}, batch)

  out = jax.eval_shape(fn, shape, rest, batch)
  if out.shape != (batch_size,):
    raise ValueError(f"diff_loss_fn must return per-example losses of shape [B] = ({batch_size},), "
                     f"got {out.shape}.")
  converted, consts = jax.closure_convert(fn, shape, rest, batch)

  def apply(shape, rest, batch, consts):
    return converted(shape, rest, batch, *consts)

  @jax.custom_vjp
  def loss(shape, rest, batch, consts):
    return apply(shape, rest, batch, consts)

  def loss_fwd(shape, rest, batch, consts):
    value, vjp_fn = jax.vjp(apply, shape, rest, batch, consts)
    return value, (value, vjp_fn)

  def loss_bwd(res, ct):
    value, vjp_fn = res
    _, g_rest, g_batch, g_consts = vjp_fn(ct)
    # The shape's cotangent: the same VJP with the fixed weights 2 L_b c_b (see the module docstring).
    g_shape, _, _, _ = vjp_fn(2.0 * value * ct)
    return g_shape, g_rest, g_batch, g_consts

  loss.defvjp(loss_fwd, loss_bwd)
  return loss(shape, rest, batch, list(consts))


def negative_elbo(rng: Array, x: Array, *, gamma_module, schedule_params: dict,
                  eps_fn_from_schedule: Callable[[schedules_lib.Schedule, PyTree], vdm.EpsFn],
                  num_levels: int, cond: PyTree = None,
                  encoder: Callable[[Array, Array], Array] | None = None,
                  num_steps: int | None = None, antithetic: bool = True, t: Array | None = None,
                  shape_key: str = "shape") -> tuple[Array, dict[str, Array]]:
  """-ELBO per example (VDM, or DiffEnc with `encoder`) with the variance-minimising shape gradient.

  Same value and rng use as `vdm.negative_elbo` / `diffenc.negative_elbo` (the denoiser runs once on
  the whole batch, so dropout draws the same masks from the same key); the only difference is the
  gradient w.r.t. schedule_params[shape_key] (see `variance_minimizing_diffusion_loss`). The prior and
  reconstruction terms depend on the schedule only through gamma(0), gamma(1) (for PinnedMonotoneGamma
  gamma_0 and gamma_0 + softplus(gap), with zero shape gradient).

  Args:
    rng: PRNG key. x: [B, ...] encoded K-level data.
    gamma_module: the learned schedule module (e.g. `schedules.PinnedMonotoneGamma()`).
    schedule_params: its parameters {'gamma_0', 'gap', 'shape': {...}}.
    eps_fn_from_schedule: (schedule, cond) -> eps_fn(z, t), e.g.
      `lambda s, c: vdm.make_eps_fn(lambda z, g: net.apply({'params': p}, z, g, c), s)`. It is called
      once, with the schedule of schedule_params and the whole batch's `cond`.
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
