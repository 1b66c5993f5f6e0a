"""Classification Diffusion Models: a noise-level classifier that is a denoiser and a one-step likelihood.

Yadin, Elata, Michaeli, "Classification Diffusion Models: Revitalizing Density Ratio Estimation",
NeurIPS 2024, arXiv:2402.10095 (CDM). Notation of docs/math.md sec. 4.

Classes t in {0, 1, ..., T, T + 1} with abar_0 = 1 (clean data), abar_1 > ... > abar_T from a class grid
(`class_grid`: DDPM's betas, the paper's uniform grid, or alpha^2(i / T) of any schedule),
abar_{T+1} = 0 (pure N(0, I)); x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, and a prior p_t over
the classes (uniform by default). A network f(x) -> logits [B, T + 2], with NO time input, is trained
to classify t from x_t. With

    F(x, t) = log p(T + 1 | x) - log p(t | x) = logit[T + 1] - logit[t]:

  * denoiser (CDM Thm 3.1):   E[eps | x_t = x] = sqrt(1 - abar_t) (grad_x F(x, t) + x);
  * density   (CDM Thm 3.2):  log p_{x_t}(x) = log p_t(T + 1) - log p_t(t) - F(x, t) + log N(x; 0, I);
    at t = 0 this is the data density, in ONE network evaluation.

Both follow from Bayes: p(t | x) / p(T + 1 | x) = p_t(t) p_{x_t}(x) / (p_t(T + 1) N(x; 0, I)), and
E[eps | x_t = x] = -sqrt(1 - abar_t) grad log p_{x_t}(x) (Tweedie). The logits need not be normalised:
every formula uses differences of logits, in which log-softmax's log-sum-exp cancels.

Every function is pure and jit-able and returns per-example values [B] in nats; the caller reduces.
`one_step_nll` follows the return convention of `vdiff.likelihood` (rng first, (nats [B] bounding the
discrete -log P(k), extras with "nfe")).
A `logits_fn` is any callable z [B, ...] -> logits [B, T + 2] whose examples are independent (no
batch statistics), e.g. `functools.partial(model.apply, {'params': params})`.

Arguments are checked with errors that name them (`vdiff.checks`): class indices t must be integers in
{0..T+1} (a float class such as 0.7 is refused, never truncated), denoiser times must be floats in
[0, 1], a batch must hold at least one example of at least one dimension, and data must be finite.
Shapes and dtypes are checked at trace time, so also under jit. Values can only be checked when a
function is called eagerly; under jit an out-of-range class index or a NaN / out-of-range denoiser time
gives NaN in the examples concerned (never a silently wrapped or clipped class), and NaN data propagate.

Numerics: the grid is given as abar and sigma_t = sqrt(1 - abar_t) is formed from it in float32. For
abar_1 close to 1 (VDM's gamma_min = -13.3 gives 1 - abar_1 = 1.7e-6) this keeps only a couple of
significant digits of sigma_1^2; it only affects the smallest noise level, whose eps_hat is then tiny.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vdiff import checks
from vdiff import likelihood
from vdiff import schedules as schedules_lib

Array = jax.Array
LogitsFn = Callable[[Array], Array]
EpsFn = Callable[[Array, Array], Array]

# How `one_step_nll` turns the one-step density into a bound on the discrete -log P(k).
DEQUANTIZATIONS = ("uniform", "forward")


def _bcast(a: Array, x: Array) -> Array:
  """Per-example values a [B] reshaped to broadcast against x [B, ...]."""
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _flat(x: Array) -> Array:
  return x.reshape(x.shape[0], -1)


# ----------------------------------------------------------------------------------------------------
# The class grid and validation.
# ----------------------------------------------------------------------------------------------------
def abar_grid(schedule: schedules_lib.Schedule, num_steps: int) -> Array:
  """The CDM class grid abar [T + 2]: abar_0 = 1, abar_i = alpha^2(i / T) (i = 1..T), abar_{T+1} = 0.

  Classes 1..T are the schedule's discrete grid (`Schedule.discrete_alpha2`, the samplers' t = i / T);
  class T + 1 is pure noise N(0, I) (CDM sec. 3, arXiv:2402.10095).

  Args:
    schedule: any noise schedule. num_steps: T >= 1.
  Returns:
    abar, float32 [T + 2].
  """
  num_steps = checks.positive_int(num_steps, "num_steps")
  return jnp.concatenate([schedule.discrete_alpha2(num_steps), jnp.zeros((1,), jnp.float32)])


GRIDS = ("ddpm", "uniform", "schedule")


def class_grid(kind: str, num_steps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02,
               num_betas: int = 1000, schedule: schedules_lib.Schedule | None = None
               ) -> tuple[Array, schedules_lib.Schedule]:
  """The class grid abar [T + 2] of a named kind, and the schedule through it for the samplers.

  Every kind has abar_0 = 1 (clean) and abar_{T+1} = 0 (pure noise). The ddpm and schedule kinds cover
  a fixed gamma range whatever T is, so that a small T (the `tiny` configs) still ends near noise:

    ddpm:      DDPM's linear-beta schedule with num_betas betas beta_start..beta_end (Ho et al. 2020),
               resampled at t = i / T (`schedules.ddpm_linear_beta_alpha2`): for T = num_betas exactly
               DDPM's abar_i; for any T, abar_T = DDPM's last abar (4.0e-5 for 1e-4..0.02, 1000 betas).
    uniform:   the CDM paper's likelihood grid sqrt(1 - abar_i) = i / (T + 1), i = 0..T + 1
               (`schedules.uniform_sigma_alpha2`; arXiv:2402.10095). Its abar_T ~ 2 / T is not noise:
               a grid for likelihoods, not for samplers that start from N(0, I) at class T.
    schedule:  any vdiff schedule sampled at t = i / T (`abar_grid`): abar_T = sigmoid(-gamma(1)).

  The ddpm and uniform grids are computed in float64 and rounded once to float32.

  Args:
    kind: one of GRIDS.
    num_steps: T (>= 2: the samplers' schedule needs two levels).
    beta_start: the ddpm grid's first beta.
    beta_end: the ddpm grid's last beta.
    num_betas: the number of the ddpm grid's betas.
    schedule: the schedule grid's schedule.
  Returns:
    (abar float32 [T + 2], the schedule whose `discrete_alpha2(T)` is abar[:T + 1]).
  """
  num_steps = checks.positive_int(num_steps, "num_steps", minimum=2)
  if kind == "ddpm":
    t = np.arange(1, num_steps + 1, dtype=np.float64) / num_steps
    inner = schedules_lib.ddpm_linear_beta_alpha2(t, beta_start=beta_start, beta_end=beta_end,
                                                  num_betas=num_betas)
    abar = np.concatenate([[1.0], inner, [0.0]])
  elif kind == "uniform":
    abar = schedules_lib.uniform_sigma_alpha2(num_steps)
  elif kind == "schedule":
    if schedule is None:
      raise ValueError("class_grid(kind='schedule') needs a schedule.")
    return abar_grid(schedule, num_steps), schedule
  else:
    raise ValueError(f"unknown CDM grid {kind!r}; expected one of {GRIDS}.")
  sched = schedules_lib.from_alpha2_grid(abar[1:-1], name=f"cdm_{kind}_{num_steps}")
  return jnp.asarray(abar, jnp.float32), sched


def _check_abar(abar: Array, num_steps: int | None = None) -> Array:
  abar = jnp.asarray(abar, jnp.float32)
  if abar.ndim != 1 or abar.shape[0] < 3:
    raise ValueError(f"abar must have shape [T + 2] with T >= 1, got {abar.shape}.")
  if num_steps is not None and abar.shape[0] != num_steps + 2:
    raise ValueError(f"abar has {abar.shape[0]} classes but num_steps = {num_steps} needs"
                     f" num_steps + 2 = {num_steps + 2}.")
  if checks.is_concrete(abar):
    a = np.asarray(abar)
    if not (np.all(np.isfinite(a)) and np.all((a >= 0) & (a <= 1))):
      raise ValueError("abar must hold values in [0, 1] (alpha^2 of each class).")
  return abar


def _check_x(x: Array, name: str = "x") -> Array:
  """Data [B, ...]: floating, at least one example of at least one dimension, finite when concrete."""
  x = jnp.asarray(x) if not hasattr(x, "dtype") else x
  checks.batch(x, name, min_rank=1)
  if math.prod(x.shape[1:]) == 0:
    raise ValueError(f"{name} must hold at least one dimension per example, got shape {tuple(x.shape)}.")
  return jnp.asarray(x, jnp.float32)


def _check_logits(logits: Array, batch: int, num_classes: int | None = None) -> None:
  if logits.ndim != 2 or logits.shape[0] != batch:
    raise ValueError(f"logits must have shape [B, T + 2] with B = {batch}, got {logits.shape}.")
  if num_classes is not None and logits.shape[1] != num_classes:
    raise ValueError(f"logits have {logits.shape[1]} classes but abar (or class_prior) has {num_classes}"
                     f" (T mismatch: the network's num_classes_out must be T + 2).")


def _log_prior(class_prior: Array | None, num_classes: int) -> Array:
  """log p_t over the T + 2 classes (uniform when class_prior is None)."""
  if class_prior is None:
    return jnp.full((num_classes,), -math.log(num_classes), jnp.float32)
  class_prior = jnp.asarray(class_prior, jnp.float32)
  if class_prior.shape != (num_classes,):
    raise ValueError(f"class_prior must have shape [T + 2] = ({num_classes},), got {class_prior.shape}.")
  return jnp.log(class_prior / jnp.sum(class_prior))


def _as_class_index(t: Array, batch: int, num_classes: int, name: str = "t") -> Array:
  """Integer classes [B] in {0..num_classes - 1} (checked eagerly; see `_pick` for jit)."""
  return checks.class_indices(t, name, num_classes=num_classes, batch=batch)


def _pick(values: Array, t: Array) -> Array:
  """values[..., t] per example, NaN where t is out of range (possible only under jit, where the
  range cannot be checked): never the wrapped or clipped class that plain indexing would give."""
  n = values.shape[-1]
  valid = (t >= 0) & (t < n)
  safe = jnp.clip(t, 0, n - 1)
  if values.ndim == 1:
    picked = values[safe]
  else:
    picked = jnp.take_along_axis(values, safe[:, None], axis=-1)[:, 0]
  return jnp.where(valid, picked, jnp.nan)


# ----------------------------------------------------------------------------------------------------
# F, the denoiser and the loss.
# ----------------------------------------------------------------------------------------------------
def log_ratio(logits: Array, t: Array) -> Array:
  """F(x, t) = log p(T + 1 | x) - log p(t | x) = logit[T + 1] - logit[t]   (CDM eq. for Thm 3.1).

  Args:
    logits: [B, T + 2] (normalised or not; the normaliser cancels). t: int class index in {0..T+1},
      scalar or [B] (under jit, an out-of-range class gives NaN).
  Returns:
    F, [B].
  """
  logits = jnp.asarray(logits)
  if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 3:
    raise ValueError(f"logits must have shape [B, T + 2] with B >= 1 and T >= 1, got {logits.shape}.")
  t = _as_class_index(t, logits.shape[0], logits.shape[1])
  return logits[:, -1] - _pick(logits, t)


def _grad_log_ratio(logits_fn: LogitsFn, z: Array, t: Array,
                    num_classes: int) -> tuple[Array, Array]:
  """(grad_z F(z, t) [B, ...], logits [B, T + 2]) with one forward and one backward pass.

  The gradient of sum_b F(z_b, t_b) over the batch is the per-example gradient because examples are
  independent (the network has no cross-example statistics).
  """

  def summed_f(z):
    logits = logits_fn(z)
    _check_logits(logits, z.shape[0], num_classes)
    return jnp.sum(log_ratio(logits, t)), logits

  return jax.grad(summed_f, has_aux=True)(z)


def make_denoiser(logits_fn: LogitsFn, abar: Array, *, num_steps: int | None = None) -> EpsFn:
  """The CDM gradient denoiser eps_fn(z, t) (CDM Thm 3.1, arXiv:2402.10095):

      eps_hat(z, i) = sqrt(1 - abar_i) (grad_z F(z, i) + z),   i = clip(round(t T), 1, T),

  with t in [0, 1] on the samplers' grid t = i / T (t below 1 / (2T) uses the first noisy class). It
  plugs into any eps-prediction sampler. t must be floating (a class index is not a time); eagerly, a
  NaN or out-of-range t or non-finite z is refused; under jit such a t gives NaN for its example.

  Args:
    logits_fn: z [B, ...] -> logits [B, T + 2].
    abar: the class grid [T + 2] from `abar_grid`.
    num_steps: T; optional, checked against abar when given.
  Returns:
    eps_fn(z [B, ...], t [B] or scalar) -> eps_hat [B, ...].
  """
  abar = _check_abar(abar, num_steps)
  num_classes = abar.shape[0]
  steps = num_classes - 2

  def eps_fn(z, t):
    z = _check_x(z, "z")
    t = checks.times(t, "t", batch_size=z.shape[0], scalar_ok=True)
    i = jnp.clip(jnp.round(t * steps), 1, steps).astype(jnp.int32)
    grad_f, _ = _grad_log_ratio(logits_fn, z, i, num_classes)
    # NaN for a time outside [0, 1] (reachable only under jit), not the clipped class.
    sigma = jnp.where((t >= 0) & (t <= 1), jnp.sqrt(1.0 - abar[i]), jnp.nan)
    return _bcast(sigma, z) * (grad_f + z)

  return eps_fn


def sample_classes(rng: Array, batch_size: int, num_classes: int, *,
                   class_prior: Array | None = None) -> Array:
  """t ~ U{0..T+1} (or ~ class_prior) per example, int32 [B]."""
  batch_size = checks.positive_int(batch_size, "batch_size")
  num_classes = checks.positive_int(num_classes, "num_classes", minimum=3)
  if class_prior is None:
    return jax.random.randint(rng, (batch_size,), 0, num_classes, jnp.int32)
  return jax.random.categorical(rng, _log_prior(class_prior, num_classes), shape=(batch_size,))


def loss(rng: Array, x: Array, logits_fn: LogitsFn, abar: Array, *, w_ce: float = 1e-3,
         mse_weight: float = 1.0, class_prior: Array | None = None,
         t: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """The CDM training loss per example (CDM sec. 3.3, arXiv:2402.10095):

      t ~ p_t on {0..T+1},  x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps,
      loss = w_ce CE(t, f(x_t)) + mse_weight mean_dims (eps - eps_hat(x_t, t))^2,
      eps_hat(x_t, t) = sqrt(1 - abar_t) (grad_x F(x_t, t) + x_t)     (input gradient: the parameter
                                                                       gradient is second-order AD).

  The paper uses w_ce = 1e-3 and mse_weight = 1; neither term alone works (its Table 1): CE alone leaves
  the input gradient, hence the denoiser, poor; MSE alone only constrains grad_x F at t >= 1 and leaves
  the t = 0 logit (the likelihood) undetermined. w_ce = 0 or mse_weight = 0 give those ablations.

  The two end classes, documented because the MSE term is degenerate there:
    * t = 0: x_t = x carries no information about eps and sqrt(1 - abar_0) = 0, so eps_hat = 0 and the
      term would be the parameter-free constant mean(eps^2) ~ 1. It is masked to 0 (mse[b] = 0).
    * t = T + 1: F(x, T + 1) = 0 identically, so eps_hat = x_t = eps and the term is exactly 0 (no mask
      needed; E[eps | x_t] = x_t is the exact denoiser of pure noise).

  Args:
    rng: PRNG key. x: [B, ...] data (dequantised to a continuous density for K-level data).
    logits_fn: x_t [B, ...] -> logits [B, T + 2]. abar: class grid [T + 2].
    w_ce: weight of the cross-entropy. mse_weight: weight of the denoising MSE.
    class_prior: optional probabilities [T + 2] to sample t from (must match `log_density`'s prior).
    t: optional int classes in {0..T+1}, scalar or [B] (overrides sampling; under jit an out-of-range
      class gives NaN).
  Returns:
    (loss [B], {"ce": [B] cross-entropy in nats, "mse": [B] masked per-dim mean squared error}).
  """
  abar = _check_abar(abar)
  num_classes = abar.shape[0]
  x = _check_x(x)
  rng_t, rng_e = jax.random.split(rng)
  if t is None:
    t = sample_classes(rng_t, x.shape[0], num_classes, class_prior=class_prior)
  t = _as_class_index(t, x.shape[0], num_classes)
  eps = jax.random.normal(rng_e, x.shape, jnp.float32)
  a = _bcast(_pick(abar, t), x)
  sigma = jnp.sqrt(1.0 - a)
  x_t = jnp.sqrt(a) * x + sigma * eps

  grad_f, logits = _grad_log_ratio(logits_fn, x_t, t, num_classes)
  # Cross-entropy through log_softmax (a stable log-sum-exp), not log(softmax).
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  ce = -_pick(log_probs, t)
  eps_hat = sigma * (grad_f + x_t)
  mse = jnp.mean(_flat(jnp.square(eps - eps_hat)), axis=-1)
  mse = jnp.where(t > 0, mse, 0.0)  # t = 0: parameter-free constant, see the docstring.
  return w_ce * ce + mse_weight * mse, {"ce": ce, "mse": mse}


# ----------------------------------------------------------------------------------------------------
# One-step likelihood.
# ----------------------------------------------------------------------------------------------------
def std_normal_log_density(x: Array) -> Array:
  """log N(x; 0, I) = -1/2 ||x||^2 - D/2 log(2 pi), per example [B]."""
  x = _flat(_check_x(x))
  return -0.5 * jnp.sum(jnp.square(x), axis=-1) - 0.5 * x.shape[1] * math.log(2.0 * math.pi)


def log_density(logits: Array, x: Array, t: Array = 0, *,
                class_prior: Array | None = None) -> Array:
  """log p_{x_t}(x) from the classifier's logits at x (CDM Thm 3.2, arXiv:2402.10095):

      log p_{x_t}(x) = log p_t(T + 1) - log p_t(t) + logit[t] - logit[T + 1] + log N(x; 0, I).

  t = 0 gives the data density log p(x) in one network evaluation. The number of classes is read from
  logits; `class_prior` must be the prior the classifier was trained with (uniform by default).
  This is a continuous density: for K-level data evaluate it on dequantised data (`one_step_nll`).

  Args:
    logits: [B, T + 2], f(x). x: [B, ...] the point the logits were computed at.
    t: int class in {0..T+1}, scalar or [B] (under jit an out-of-range class gives NaN).
    class_prior: optional probabilities [T + 2].
  Returns:
    log p_{x_t}(x) in nats, [B].
  """
  logits = jnp.asarray(logits, jnp.float32)
  x = _check_x(x)
  _check_logits(logits, x.shape[0])
  num_classes = logits.shape[1]
  log_prior = _log_prior(class_prior, num_classes)
  t = _as_class_index(t, x.shape[0], num_classes)
  return log_prior[-1] - _pick(log_prior, t) - log_ratio(logits, t) + std_normal_log_density(x)


def one_step_log_density(logits_fn: LogitsFn, x: Array, *,
                         class_prior: Array | None = None) -> Array:
  """log p(x) = log p_t(T + 1) - log p_t(0) + logit[0] - logit[T + 1] + log N(x; 0, I), [B] (CDM Thm 3.2)."""
  x = _check_x(x)
  return log_density(logits_fn(x), x, 0, class_prior=class_prior)


def forward_class(abar, num_levels: int) -> int:
  """The class the forward-dequantised one-step bound is evaluated at: the first t >= 1 whose noise is at
  least half a bin, sigma_t / alpha_t >= 1 / K (the bin width is Delta = 2 / K).

  Why not always class 1: the classifier is trained on uniformly dequantised data, so even a perfect
  classifier's class-t density is the uniform bins convolved with N(0, sigma_t^2), not the mixture of
  Gaussians at the bin centres that the forward bound's q(z | k) and decoder assume. Where
  sigma_t / alpha_t >= Delta / 2 the two agree to < 1e-4 bits/dim; far below it they do not: for
  quantised N(0.1, 0.3^2) at K = 256 the exact gap of a perfect CDM at class 1 of the paper's uniform
  grid at T = 1000 (sigma_1 = 0.001, 0.13 bins) is 0.92 bits/dim, at class 4 (sigma = 0.004, 0.51 bins)
  0.0007 (tests/test_cdm.py, docs/math.md sec. 4). The DDPM grid (sigma_1 = 0.01) and the uniform grid
  at T <= 255 have class 1 here already. abar: the class grid [T + 2] (host values; static).
  """
  abar = np.asarray(abar, np.float64)
  ratio = np.sqrt(np.maximum(1.0 - abar[1:-1], 0.0) / abar[1:-1])  # sigma_t / alpha_t, t = 1..T
  ok = np.nonzero(ratio >= 1.0 / num_levels)[0]
  return int(ok[0]) + 1 if ok.size else len(abar) - 2


def one_step_nll(rng: Array, logits_fn: LogitsFn, k: Array, *, num_levels: int,
                 dequantization: str = "uniform", num_samples: int = 1, abar: Array | None = None,
                 class_prior: Array | None = None, t: int | None = None) -> tuple[Array, dict[str, Array]]:
  """One-step CDM negative log-likelihood of K-level data: an upper bound on -log P(k) in nats.

  Return convention of `vdiff.likelihood` (module docstring): (nats [B], extras), nats bounding the
  discrete -log P(k) in expectation, bits/dim = `likelihood.nats_to_bpd(nats, D)`. m = num_samples
  draws per example, each one network evaluation (CDM Thm 3.2, arXiv:2402.10095):

    dequantization="uniform": class 0, the data density, on uniformly dequantised y_j = x + Delta (u_j - 1/2)
        nats = -log (1/m) sum_j p(y_j) + D log(K / 2)
      (`likelihood.uniform_dequantization_bound` folded with -D log Delta, Delta = 2 / K; +7 bits/dim
      for K = 256 are inside nats). The published CDM code skips dequantisation; numbers from it are
      not comparable.
    dequantization="forward": class t (default `forward_class(abar, K)`, class 1 unless its noise is
      below half a bin) with the K-level decoder at abar_t (needs `abar`)
        nats = -log (1/m) sum_j p_t(z_j) p(k | z_j) / q(z_j | k),  z_j ~ q(z | k) = N(sqrt(abar_t) x,
                                                                    (1 - abar_t) I),
      with p_t the density of class t (Thm 3.2): minus `likelihood.forward_dequantization_bound`.

  Args:
    rng: PRNG key (draw j uses fold_in(rng, j)).
    logits_fn: y [B, ...] -> logits [B, T + 2].
    k: int [B, ...] levels in {0..K-1}.
    num_levels: K.
    dequantization: "uniform" or "forward".
    num_samples: m >= 1 importance-weighted draws (log-mean-exp; tighter as m grows).
    abar: the class grid [T + 2] (`class_grid`); required for "forward" (its abar_1).
    class_prior: as in `log_density` (the prior the classifier was trained with).
    t: "forward" only: the class in {1..T} (a Python int); None chooses `forward_class`.
  Returns:
    (nats [B], {"nfe": int32 [B], network evaluations per example (= m)}).
  """
  if dequantization not in DEQUANTIZATIONS:
    raise ValueError(f"dequantization must be one of {DEQUANTIZATIONS}, got {dequantization!r}.")
  checks.levels(k, "k", num_levels)
  checks.batch(k, "k", min_rank=1, floating=False)
  ones = jnp.ones(k.shape[:1], jnp.int32)  # one classifier evaluation per draw
  if dequantization == "uniform":
    logp, nfe = likelihood.uniform_dequantization_bound(
        rng, lambda r, y: (one_step_log_density(logits_fn, y, class_prior=class_prior), ones), k,
        num_levels=num_levels, num_samples=num_samples)
    num_dims = math.prod(k.shape[1:])
    return likelihood.uniform_dequantization_nats(logp, num_dims, num_levels), {"nfe": nfe}
  if abar is None:
    raise ValueError("one_step_nll(dequantization='forward') needs abar, the class grid [T + 2] "
                     "(its abar_1 sets q(z | k) and the decoder).")
  if t is None:
    t = forward_class(abar, num_levels)
  abar = _check_abar(abar)
  if not 1 <= int(t) <= abar.shape[0] - 2:
    raise ValueError(f"t must be a class in {{1..T}} = {{1..{abar.shape[0] - 2}}}, got {t}.")
  t = int(t)
  # q and the decoder use the gamma of the class-t grid point exactly as the classifier saw it in
  # training: x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps with the float32 abar_t.
  gamma_t = schedules_lib.gamma_from_alpha2(abar[t])
  bound, nfe = likelihood.forward_dequantization_bound(
      rng, lambda r, z: (log_density(logits_fn(z), z, t, class_prior=class_prior), ones), k,
      num_levels=num_levels, gamma=gamma_t, num_samples=num_samples)
  return -bound, {"nfe": nfe}


def one_step_nll_bpd(logits_fn: LogitsFn, k: Array, *, num_levels: int, rng: Array,
                     class_prior: Array | None = None) -> tuple[Array, Array]:
  """Deprecated: use `one_step_nll(rng, logits_fn, k, num_levels=K)`, whose nats give bits/dim through
  `likelihood.nats_to_bpd(nats, D)`.

  The old return values, unchanged: one uniform dequantisation y = dequantize(rng, k) (the key used
  directly, where `one_step_nll` draws from fold_in(rng, 0)), and

      nats = -log p(y)                                  (a continuous density on [-1, 1]^D),
      bpd  = nats / (D ln 2) + log2(K / 2).

  Returns:
    (nats [B] of the density, bpd [B]).
  """
  warnings.warn("cdm.one_step_nll_bpd is deprecated; use cdm.one_step_nll(rng, logits_fn, k, "
                "num_levels=K), which returns (nats [B], {'nfe': [B]}) with bits/dim = "
                "likelihood.nats_to_bpd(nats, D).", DeprecationWarning, stacklevel=2)
  checks.levels(k, "k", num_levels)
  checks.batch(k, "k", min_rank=1, floating=False)
  y = likelihood.dequantize(rng, k, num_levels)
  nats = -one_step_log_density(logits_fn, y, class_prior=class_prior)
  num_dims = math.prod(y.shape[1:])
  return nats, likelihood.nats_to_bpd(nats, num_dims, num_levels=num_levels)
