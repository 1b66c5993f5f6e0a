"""Discrete-time Gaussian diffusion (DDPM / improved DDPM) on any T-step grid, per example, in nats.

The forward process of T steps with betas beta_1..beta_T (abar_i = prod_{j <= i} (1 - beta_j), abar_0 = 1):

    q(x_i | x_0)          = N(sqrt(abar_i) x_0, (1 - abar_i) I)
    q(x_{i-1} | x_i, x_0) = N(c1_i x_0 + c2_i x_i, beta~_i I),
        c1_i = beta_i sqrt(abar_{i-1}) / (1 - abar_i),   c2_i = (1 - abar_{i-1}) sqrt(1 - beta_i) / (1 - abar_i),
        beta~_i = beta_i (1 - abar_{i-1}) / (1 - abar_i),

and a model p(x_{i-1} | x_i) = N(mu(x_i, i), Sigma(x_i, i)) whose mean comes from an eps-, x0- or
x_{i-1}-prediction and whose variance is fixed (beta~_i "fixed_small", beta_i "fixed_large") or learned
("learned": log Sigma; "learned_range": improved DDPM eq. 15, log Sigma = v log beta_i + (1 - v) log beta~_i
with v = (out + 1) / 2). The negative ELBO of x_0 is

    L = KL(q(x_T | x_0) || N(0, I)) + sum_{i=2}^T KL(q(x_{i-1} | x_i, x_0) || p(x_{i-1} | x_i))
        - log p(x_0 | x_1),

the last term a discretised Gaussian over the K bins. References: Ho et al. 2020, arXiv:2006.11239;
Nichol & Dhariwal 2021 (improved DDPM), arXiv:2102.09672. The formulas follow the improved-diffusion code
(github.com/openai/improved-diffusion, commit 1bc7bbbdc414d83d4abf2ad8cc1446dc36c4e4d5); tests/
test_gaussian_diffusion.py transcribes it to numpy and compares.

Conventions (differences from improved-diffusion are deliberate and listed):
  * Steps are indexed i = 1..T as in vdiff (`Schedule.discrete_grid`); improved-diffusion's t = i - 1.
    Every array of `GaussianDiffusion` has T + 1 entries indexed by i, index 0 being clean data.
  * The network is called model_fn(x_i, t) with t = i / T in (0, 1] (on a respaced grid, t = i_orig /
    T_orig of the kept original step), so any vdiff denoiser eps_fn(z, t) on the schedule the grid came
    from is a model_fn for mean_type "eps". improved-diffusion passes its 0-based index (times 1000 / T
    with rescale_timesteps); `improved_diffusion_times` converts.
  * Images are NHWC: a learned variance doubles the LAST axis, [..., :C] is the mean part and [..., C:]
    the variance part (improved-diffusion splits the channel axis 1 of NCHW).
  * The bound's terms are nats summed over dimensions per example (improved-diffusion: bits/dim, i.e.
    divided by D log 2); `vdiff.likelihood.nats_to_bpd` converts. L_simple ("mse") is a MEAN over
    dimensions, as improved-diffusion's mean_flat (it is a surrogate, not a likelihood).
  * Data are vdiff's bin centres x = 2 (k + 1/2) / K - 1 (`vdiff.likelihood.encode`) and the decoder's
    bins are x +- 1/K (decoder="vdiff"), so the bound bounds -log P(k) of the K-level data. DDPM's code
    uses x = k / 127.5 - 1 with bins x +- 1/255 and a tanh approximation of the normal CDF
    (decoder="ddpm", for cross-checking; 2 k / (K - 1) - 1 and +- 1 / (K - 1) for other K).
  * Nothing in a likelihood clips x0_hat (clip_x0=False); the sampler clips by default as DDPM's.

All functions on a `GaussianDiffusion` are pure and jit-able (the diffusion is a pytree of float32
arrays; its T is static, the arrays' length). Building one (`make_diffusion`) is done once on the host in
float64 numpy, as improved-diffusion does.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, ndtr

from vdiff import checks
from vdiff import likelihood
from vdiff import schedules as schedules_lib

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

MEAN_TYPES = ("eps", "x0", "prev_x")                  # improved-diffusion: EPSILON, START_X, PREVIOUS_X
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LEARNED_VAR_TYPES = ("learned", "learned_range")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl", "hybrid")
DECODERS = ("vdiff", "ddpm")
BINS = ("vdiff", "ddpm")
CDFS = ("exact", "tanh")


# ----------------------------------------------------------------------------------------------------
# Argument checks (before any compute; each error names the argument).
# ----------------------------------------------------------------------------------------------------
def _check_choice(value, name: str, choices: Sequence[str]) -> str:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
  return value


def _check_types(mean_type: str, var_type: str) -> None:
  _check_choice(mean_type, "mean_type", MEAN_TYPES)
  _check_choice(var_type, "var_type", VAR_TYPES)


def _check_steps(i, name: str, *, batch_size: int, num_steps: int) -> Array:
  """Step indices in {1..T}: integers, a scalar or [B]; returned as int32 [B]."""
  dtype = jnp.asarray(i).dtype
  if dtype == jnp.bool_ or not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"{name} must hold integer step indices in {{1..{num_steps}}}, got dtype {dtype}.")
  i = jnp.asarray(i)
  if i.ndim not in (0, 1) or (i.ndim == 1 and i.shape[0] != batch_size):
    raise ValueError(f"{name} must be a scalar or have shape [B] = ({batch_size},), got {i.shape}.")
  if checks.is_concrete(i):
    a = np.asarray(i)
    if a.size and (a.min() < 1 or a.max() > num_steps):
      raise ValueError(f"{name} must hold step indices in {{1..{num_steps}}}, got values in "
                       f"[{a.min()}, {a.max()}].")
  return jnp.broadcast_to(i.astype(jnp.int32), (batch_size,))


def _check_output(model_output: Array, x: Array, var_type: str) -> None:
  """The network output must be x's shape, with the last axis doubled for a learned variance."""
  want = tuple(x.shape)
  if var_type in LEARNED_VAR_TYPES:
    want = want[:-1] + (2 * x.shape[-1],)
  if tuple(model_output.shape) != want:
    extra = (f" (var_type={var_type!r} learns the variance: the last, channel axis holds the mean part"
             f" then the variance part, 2 x {x.shape[-1]} channels)" if var_type in LEARNED_VAR_TYPES
             else "")
    raise ValueError(f"model_output must have shape {want}{extra}, got {tuple(model_output.shape)}.")


def _check_num_steps(num_steps, name: str = "num_steps") -> int:
  return checks.positive_int(num_steps, name, minimum=1)


# ----------------------------------------------------------------------------------------------------
# Betas (host, float64 numpy).
# ----------------------------------------------------------------------------------------------------
def linear_betas(num_steps: int) -> np.ndarray:
  """DDPM's linear betas extended to any T (improved-diffusion get_named_beta_schedule("linear")):
  beta linear from 1e-4 s to 0.02 s with s = 1000 / T, float64 [T] (Ho et al. 2020, arXiv:2006.11239)."""
  num_steps = _check_num_steps(num_steps)
  scale = 1000.0 / num_steps
  if scale * 0.02 >= 1.0:
    raise ValueError(f"num_steps must be >= 21 for DDPM's scaled linear betas (beta_T = 20 / T < 1), "
                     f"got {num_steps}.")
  return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], *,
                        max_beta: float = 0.999) -> np.ndarray:
  """beta_i = min(1 - abar((i) / T) / abar((i - 1) / T), max_beta) for i = 1..T, float64 [T].

  The discretisation of a continuous abar(t), t in [0, 1], of improved-diffusion's betas_for_alpha_bar
  (Nichol & Dhariwal 2021, arXiv:2102.09672, sec. 3.2); max_beta < 1 avoids the singularity at t = 1.
  """
  num_steps = _check_num_steps(num_steps)
  if not 0.0 < max_beta < 1.0:
    raise ValueError(f"max_beta must lie in (0, 1), got {max_beta}.")
  betas = [min(1.0 - alpha_bar((j + 1) / num_steps) / alpha_bar(j / num_steps), max_beta)
           for j in range(num_steps)]
  return np.array(betas, dtype=np.float64)


def cosine_betas(num_steps: int, *, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Improved DDPM's cosine betas: abar(t) = cos^2((t + s) / (1 + s) pi / 2) through
  `betas_for_alpha_bar` (betas clipped at max_beta), float64 [T] (arXiv:2102.09672, eq. 17).

  Not `vdiff.schedules.cosine`, which has s = 0 and is truncated to [gamma_min, gamma_max].
  """
  return betas_for_alpha_bar(
      num_steps, lambda t: math.cos((t + s) / (1.0 + s) * math.pi / 2) ** 2, max_beta=max_beta)


def schedule_betas(schedule: schedules_lib.Schedule, num_steps: int) -> np.ndarray:
  """The betas of a vdiff schedule's T-step grid `schedule.discrete_grid(T)` (t = i / T), float64 [T].

  The grid is computed to float32 round-off without cancellation (DDPM's float64 betas for
  `schedules.ddpm_linear_beta` at its own T); float64 from here on. Host-side: call it outside jit on a
  fixed (or bound) schedule.
  """
  num_steps = _check_num_steps(num_steps)
  grid = schedule.discrete_grid(num_steps)
  return np.asarray(grid.beta, np.float64)[1:]


# ----------------------------------------------------------------------------------------------------
# The diffusion's precomputed arrays.
# ----------------------------------------------------------------------------------------------------
class GaussianDiffusion(NamedTuple):
  """The precomputed float32 arrays of a T-step Gaussian diffusion, each [T + 1] indexed by the step i.

  Index 0 is clean data (abar_0 = 1); entries that are undefined there (log beta_0, the posterior at
  i = 0, ...) hold 0 and are never read: steps are i = 1..T. Computed in float64 by `make_diffusion`.
  Names follow improved-diffusion's GaussianDiffusion attributes.

  Attributes:
    betas: beta_i.
    log_betas: log beta_i.
    alphas_cumprod: abar_i.
    log_alphas_cumprod: log abar_i.
    one_minus_alphas_cumprod: 1 - abar_i, formed as -expm1(log abar_i).
    log_one_minus_alphas_cumprod: log(1 - abar_i).
    sqrt_alphas_cumprod: sqrt(abar_i).
    sqrt_one_minus_alphas_cumprod: sqrt(1 - abar_i).
    sqrt_recip_alphas_cumprod: sqrt(1 / abar_i).
    sqrt_recipm1_alphas_cumprod: sqrt(1 / abar_i - 1).
    posterior_variance: beta~_i = beta_i (1 - abar_{i-1}) / (1 - abar_i) (0 at i = 1).
    posterior_log_variance_clipped: log beta~_i, with beta~_2 at i = 1 (beta~_1 = 0); improved-diffusion's
      "clipped" log variance. For T = 1 (no beta~_2) it is log beta_1.
    posterior_mean_coef1: c1_i of the posterior mean c1 x_0 + c2 x_i.
    posterior_mean_coef2: c2_i.
    fixed_large_log_variance: log beta_i for i >= 2 and log beta~_2 at i = 1 (improved-diffusion's
      FIXED_LARGE, "to get a better decoder log likelihood"); log beta_1 for T = 1.
    model_times: the time t passed to the network at step i: i / T, or i_orig / T_orig on a respaced grid.
    timestep_map: int32, the original step index i_orig of step i (i itself unless respaced; 0 at i = 0).
  """

  betas: Array
  log_betas: Array
  alphas_cumprod: Array
  log_alphas_cumprod: Array
  one_minus_alphas_cumprod: Array
  log_one_minus_alphas_cumprod: Array
  sqrt_alphas_cumprod: Array
  sqrt_one_minus_alphas_cumprod: Array
  sqrt_recip_alphas_cumprod: Array
  sqrt_recipm1_alphas_cumprod: Array
  posterior_variance: Array
  posterior_log_variance_clipped: Array
  posterior_mean_coef1: Array
  posterior_mean_coef2: Array
  fixed_large_log_variance: Array
  model_times: Array
  timestep_map: Array

  @property
  def num_steps(self) -> int:
    """T, the number of steps (static: the arrays' length minus one)."""
    return int(self.betas.shape[0]) - 1


def _check_betas(betas) -> np.ndarray:
  b = np.asarray(betas, np.float64)
  if b.ndim != 1 or b.shape[0] < 1:
    raise ValueError(f"betas must be a 1-D array of T >= 1 betas, got shape {b.shape}.")
  if not np.all(np.isfinite(b)) or not np.all((b > 0) & (b < 1)):
    raise ValueError(f"betas must lie in (0, 1), got values in [{b.min()}, {b.max()}].")
  return b


def space_timesteps(num_steps: int, section_counts) -> np.ndarray:
  """The steps kept when respacing a T-step process (improved-diffusion respace.space_timesteps).

  section_counts: a list of ints or a comma-separated string: the T steps are cut into len(counts)
  equal sections (the first T mod len sections one step longer) and section j keeps counts[j] steps,
  evenly strided by (size - 1) / (count - 1) with rounding; or the string "ddimN": the integer stride s
  with len(range(0, T, s)) == N of the DDIM paper (one section).

  Args:
    num_steps: T of the original process.
    section_counts: as above.
  Returns:
    the kept steps as sorted int64 vdiff indices in {1..T} (improved-diffusion's 0-based t plus one).
  Raises:
    ValueError naming section_counts where a section asks for more steps than it has (or more than T),
    or where "ddimN" has no integer stride.
  """
  num_steps = _check_num_steps(num_steps)
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      try:
        desired = int(section_counts[len("ddim"):])
      except ValueError as e:
        raise ValueError(f"section_counts {section_counts!r}: expected 'ddimN' with an integer N.") from e
      if not 1 <= desired <= num_steps:
        raise ValueError(f"section_counts {section_counts!r} asks for {desired} steps of a "
                         f"{num_steps}-step process (need 1 <= N <= T).")
      for stride in range(1, num_steps + 1):
        if len(range(0, num_steps, stride)) == desired:
          return np.arange(0, num_steps, stride, dtype=np.int64) + 1
      raise ValueError(f"section_counts {section_counts!r}: cannot take exactly {desired} steps of "
                       f"{num_steps} with an integer stride.")
    try:
      section_counts = [int(c) for c in section_counts.split(",")]
    except ValueError as e:
      raise ValueError(f"section_counts must be ints, 'a,b,c' or 'ddimN', got {section_counts!r}.") from e
  counts = list(section_counts)
  if not counts or any(isinstance(c, bool) or int(c) != c or c < 1 for c in counts):
    raise ValueError(f"section_counts must be positive ints, got {section_counts!r}.")
  if sum(counts) > num_steps or len(counts) > num_steps:
    raise ValueError(f"section_counts {section_counts!r} asks for {sum(counts)} steps of a "
                     f"{num_steps}-step process.")
  size_per, extra = divmod(num_steps, len(counts))
  start, kept = 0, []
  for j, count in enumerate(counts):
    size = size_per + (1 if j < extra else 0)
    if size < count:
      raise ValueError(f"section_counts {section_counts!r}: cannot divide a section of {size} steps "
                       f"into {count}.")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      kept.append(start + round(cur))   # Python's round (half to even), as the reference
      cur += stride
    start += size
  return np.array(sorted(set(kept)), dtype=np.int64) + 1


def respace_betas(betas, steps) -> tuple[np.ndarray, np.ndarray]:
  """Betas of the process that keeps only `steps` of the original one (improved-diffusion SpacedDiffusion).

  With the kept steps i_1 < ... < i_S and abar of the original process, the new betas are
  beta'_j = 1 - abar_{i_j} / abar_{i_{j-1}} (abar_{i_0} = 1), so the new process has the same marginals
  q(x | x_0) at the kept steps. Formed as -expm1(log abar_{i_j} - log abar_{i_{j-1}}) in float64.

  Args:
    betas: float64 [T] original betas.
    steps: kept vdiff step indices in {1..T} (e.g. `space_timesteps`).
  Returns:
    (new betas float64 [S], timestep_map int64 [S]: the original step of each new step).
  """
  b = _check_betas(betas)
  steps = np.unique(np.asarray(steps, np.int64))
  if steps.size == 0 or steps.min() < 1 or steps.max() > b.shape[0]:
    raise ValueError(f"steps must be a non-empty set of step indices in {{1..{b.shape[0]}}}, got "
                     f"{steps.tolist() if steps.size < 20 else steps}.")
  log_abar = np.cumsum(np.log1p(-b))
  kept = log_abar[steps - 1]
  prev = np.concatenate([[0.0], kept[:-1]])
  return -np.expm1(kept - prev), steps


def make_diffusion(betas, *, respacing=None) -> GaussianDiffusion:
  """The diffusion of T betas, optionally respaced, with its arrays computed in float64 (host).

  Args:
    betas: float64 [T] betas in (0, 1) (`linear_betas`, `cosine_betas`, `schedule_betas`, ...).
    respacing: None (all T steps) or `space_timesteps`'s section_counts ("100", "10,15,20", "ddim50",
      a list of ints): keep those steps (`respace_betas`); the network still sees the original times
      t = i_orig / T.
  Returns:
    GaussianDiffusion.
  """
  b = _check_betas(betas)
  original = b.shape[0]
  if respacing is None or (isinstance(respacing, str) and respacing == ""):
    steps = np.arange(1, original + 1, dtype=np.int64)
  else:
    b, steps = respace_betas(b, space_timesteps(original, respacing))
  return _diffusion_arrays(b, steps, original)


def from_schedule(schedule: schedules_lib.Schedule, num_steps: int, *, respacing=None) -> GaussianDiffusion:
  """`make_diffusion(schedule_betas(schedule, num_steps), respacing=respacing)`: the Gaussian diffusion
  on the T-step grid t = i / T of a vdiff schedule (so model_fn = any eps_fn(z, t) of that schedule)."""
  return make_diffusion(schedule_betas(schedule, num_steps), respacing=respacing)


def _diffusion_arrays(b: np.ndarray, steps: np.ndarray, original_num_steps: int) -> GaussianDiffusion:
  n = b.shape[0]
  log_abar = np.cumsum(np.log1p(-b))
  abar = np.exp(log_abar)
  om = -np.expm1(log_abar)                       # 1 - abar without cancellation at small 1 - abar
  log_abar_prev = np.concatenate([[0.0], log_abar[:-1]])
  abar_prev = np.exp(log_abar_prev)
  om_prev = -np.expm1(log_abar_prev)
  post_var = b * om_prev / om
  # beta~_1 = 0: its log is "clipped" to beta~_2 (improved-diffusion); T = 1 has no beta~_2, use beta_1.
  first = post_var[1] if n > 1 else b[0]
  post_log_var = np.log(np.concatenate([[first], post_var[1:]]))
  large_log_var = np.log(np.concatenate([[first], b[1:]]))
  coef1 = b * np.sqrt(abar_prev) / om
  coef2 = om_prev * np.sqrt(1.0 - b) / om

  def pad(a, origin=0.0):
    return jnp.asarray(np.concatenate([[origin], a]), jnp.float32)

  return GaussianDiffusion(
      betas=pad(b), log_betas=pad(np.log(b)), alphas_cumprod=pad(abar, 1.0),
      log_alphas_cumprod=pad(log_abar), one_minus_alphas_cumprod=pad(om),
      log_one_minus_alphas_cumprod=pad(np.log(om)), sqrt_alphas_cumprod=pad(np.sqrt(abar), 1.0),
      sqrt_one_minus_alphas_cumprod=pad(np.sqrt(om)),
      sqrt_recip_alphas_cumprod=pad(np.exp(-0.5 * log_abar), 1.0),
      sqrt_recipm1_alphas_cumprod=pad(np.sqrt(om / abar)),
      posterior_variance=pad(post_var), posterior_log_variance_clipped=pad(post_log_var),
      posterior_mean_coef1=pad(coef1), posterior_mean_coef2=pad(coef2),
      fixed_large_log_variance=pad(large_log_var),
      model_times=pad(steps / float(original_num_steps)),
      timestep_map=jnp.asarray(np.concatenate([[0], steps]), jnp.int32))


def improved_diffusion_times(t: Array, original_num_steps: int, *, rescale_timesteps: bool = True) -> Array:
  """vdiff's network time t = i_orig / T_orig -> improved-diffusion's: the 0-based index i_orig - 1,
  times 1000 / T_orig when rescale_timesteps (its default in script_util). For porting its networks."""
  index = jnp.round(jnp.asarray(t, jnp.float32) * original_num_steps) - 1.0
  return index * (1000.0 / original_num_steps) if rescale_timesteps else index


# ----------------------------------------------------------------------------------------------------
# The forward process, its posterior and the model's p(x_{i-1} | x_i).
# ----------------------------------------------------------------------------------------------------
def _at(a: Array, i: Array, x: Array) -> Array:
  """a[i] for per-example steps i [B], shaped to broadcast against x [B, ...]."""
  v = a[i]
  return v.reshape(v.shape + (1,) * (x.ndim - 1))


def _prep(diffusion: GaussianDiffusion, x: Array, i, name: str = "x") -> Array:
  checks.batch(x, name)
  return _check_steps(i, "i", batch_size=x.shape[0], num_steps=diffusion.num_steps)


def model_times(diffusion: GaussianDiffusion, i: Array) -> Array:
  """The network's time input at steps i: float32 t = i / T (i_orig / T_orig on a respaced grid)."""
  return diffusion.model_times[jnp.asarray(i, jnp.int32)]


def q_mean_variance(diffusion: GaussianDiffusion, x0: Array, i: Array) -> tuple[Array, Array, Array]:
  """q(x_i | x_0) = N(sqrt(abar_i) x_0, (1 - abar_i) I): (mean, variance, log variance), each x0's shape."""
  i = _prep(diffusion, x0, i, "x0")
  shape = x0.shape
  return (_at(diffusion.sqrt_alphas_cumprod, i, x0) * x0,
          jnp.broadcast_to(_at(diffusion.one_minus_alphas_cumprod, i, x0), shape),
          jnp.broadcast_to(_at(diffusion.log_one_minus_alphas_cumprod, i, x0), shape))


def q_sample(diffusion: GaussianDiffusion, x0: Array, i: Array, noise: Array) -> Array:
  """x_i = sqrt(abar_i) x_0 + sqrt(1 - abar_i) noise, a draw from q(x_i | x_0).

  Args:
    diffusion: the process.
    x0: [B, ...] data.
    i: int [B] (or scalar) steps in {1..T}.
    noise: [B, ...] standard normal.
  Returns:
    x_i [B, ...].
  """
  i = _prep(diffusion, x0, i, "x0")
  if noise.shape != x0.shape:
    raise ValueError(f"noise must have the shape of x0, {x0.shape}; got {noise.shape}.")
  return _at(diffusion.sqrt_alphas_cumprod, i, x0) * x0 + _at(
      diffusion.sqrt_one_minus_alphas_cumprod, i, x0) * noise


def q_posterior_mean_variance(diffusion: GaussianDiffusion, x0: Array, x_t: Array,
                              i: Array) -> tuple[Array, Array, Array]:
  """q(x_{i-1} | x_i, x_0) = N(c1_i x_0 + c2_i x_i, beta~_i I).

  Returns:
    (mean, variance beta~_i, clipped log variance: log beta~_i with log beta~_2 at i = 1), each [B, ...].
  Reference: Ho et al. 2020, arXiv:2006.11239, eqs. (6)-(7).
  """
  i = _prep(diffusion, x0, i, "x0")
  if x_t.shape != x0.shape:
    raise ValueError(f"x_t must have the shape of x0, {x0.shape}; got {x_t.shape}.")
  mean = _at(diffusion.posterior_mean_coef1, i, x0) * x0 + _at(diffusion.posterior_mean_coef2, i, x0) * x_t
  return (mean, jnp.broadcast_to(_at(diffusion.posterior_variance, i, x0), x0.shape),
          jnp.broadcast_to(_at(diffusion.posterior_log_variance_clipped, i, x0), x0.shape))


def predict_x0_from_eps(diffusion: GaussianDiffusion, x_t: Array, i: Array, eps: Array) -> Array:
  """x0_hat = sqrt(1 / abar_i) x_i - sqrt(1 / abar_i - 1) eps_hat."""
  i = jnp.asarray(i, jnp.int32)
  return (_at(diffusion.sqrt_recip_alphas_cumprod, i, x_t) * x_t
          - _at(diffusion.sqrt_recipm1_alphas_cumprod, i, x_t) * eps)


def predict_eps_from_x0(diffusion: GaussianDiffusion, x_t: Array, i: Array, x0: Array) -> Array:
  """eps_hat = (sqrt(1 / abar_i) x_i - x0_hat) / sqrt(1 / abar_i - 1)."""
  i = jnp.asarray(i, jnp.int32)
  return ((_at(diffusion.sqrt_recip_alphas_cumprod, i, x_t) * x_t - x0)
          / _at(diffusion.sqrt_recipm1_alphas_cumprod, i, x_t))


def split_output(model_output: Array, var_type: str) -> tuple[Array, Array | None]:
  """(mean part, variance part or None): a learned variance's output [..., 2C] is split on the last axis."""
  _check_choice(var_type, "var_type", VAR_TYPES)
  if var_type in LEARNED_VAR_TYPES:
    c = model_output.shape[-1] // 2
    return model_output[..., :c], model_output[..., c:]
  return model_output, None


def p_mean_variance(diffusion: GaussianDiffusion, model_output: Array, x_t: Array, i: Array, *,
                    mean_type: str, var_type: str, clip_x0: bool = False) -> dict[str, Array]:
  """The model's p(x_{i-1} | x_i) = N(mean, variance) from the network output at (x_i, i).

  Mean: "eps": x0_hat = sqrt(1/abar) x_i - sqrt(1/abar - 1) eps_hat, mean = c1 x0_hat + c2 x_i;
        "x0": x0_hat = output, mean = c1 x0_hat + c2 x_i;
        "prev_x": mean = output, x0_hat = (mean - c2 x_i) / c1.
  x0_hat is clipped to [-1, 1] before it enters the mean if clip_x0 (not for "prev_x", whose mean is the
  output; as improved-diffusion).
  Variance: "fixed_small": beta~_i (log: the clipped log beta~); "fixed_large": beta_i (beta~_2 at i = 1);
        "learned": log variance = v, the output's variance part;
        "learned_range": log variance = f log beta_i + (1 - f) log beta~_i (clipped), f = (v + 1) / 2
        (improved DDPM, arXiv:2102.09672, eq. 15).

  Args:
    diffusion: the process.
    model_output: [B, ..., C] (fixed variance) or [B, ..., 2C] (learned: mean part then variance part
      on the last axis).
    x_t: [B, ..., C].
    i: int [B] steps in {1..T}.
    mean_type: "eps", "x0" or "prev_x".
    var_type: "fixed_small", "fixed_large", "learned" or "learned_range".
    clip_x0: clip x0_hat to the data range.
  Returns:
    {"mean", "variance", "log_variance", "pred_x0"}, each [B, ..., C].
  """
  _check_types(mean_type, var_type)
  i = _prep(diffusion, x_t, i, "x_t")
  _check_output(model_output, x_t, var_type)
  out, var_values = split_output(model_output, var_type)
  if var_type == "learned":
    log_var = var_values
  elif var_type == "learned_range":
    min_log = _at(diffusion.posterior_log_variance_clipped, i, x_t)
    max_log = _at(diffusion.log_betas, i, x_t)
    frac = (var_values + 1.0) / 2.0
    log_var = frac * max_log + (1.0 - frac) * min_log
  elif var_type == "fixed_small":
    log_var = jnp.broadcast_to(_at(diffusion.posterior_log_variance_clipped, i, x_t), x_t.shape)
  else:
    log_var = jnp.broadcast_to(_at(diffusion.fixed_large_log_variance, i, x_t), x_t.shape)
  if var_type == "fixed_small":
    # improved-diffusion pairs FIXED_SMALL's clipped log variance with the unclipped beta~ (0 at i = 1).
    variance = jnp.broadcast_to(_at(diffusion.posterior_variance, i, x_t), x_t.shape)
  else:
    variance = jnp.exp(log_var)

  def process(x0):
    return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0

  c1 = _at(diffusion.posterior_mean_coef1, i, x_t)
  c2 = _at(diffusion.posterior_mean_coef2, i, x_t)
  if mean_type == "prev_x":
    pred_x0 = process((out - c2 * x_t) / c1)
    mean = out
  else:
    pred_x0 = process(out if mean_type == "x0" else predict_x0_from_eps(diffusion, x_t, i, out))
    mean = c1 * pred_x0 + c2 * x_t
  return {"mean": mean, "variance": variance, "log_variance": log_var, "pred_x0": pred_x0}


# ----------------------------------------------------------------------------------------------------
# Gaussian KL and the discretised Gaussian decoder.
# ----------------------------------------------------------------------------------------------------
def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (broadcasting):

      1/2 (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2).
  """
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: Array) -> Array:
  """DDPM's tanh approximation of the standard normal CDF, 1/2 (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))
  (absolute error up to ~3e-4; offered to reproduce DDPM / improved-diffusion numbers, not the default)."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _log_bin_mass(lo: Array, hi: Array) -> Array:
  """log(Phi(hi) - Phi(lo)) for finite standardised edges lo < hi, in log space on the side where both
  edges lie in the lower tail (Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)): no cancellation of two CDFs
  near 1, and accurate far in either tail. The floor 1e-30 only keeps the gradient finite where the
  bin's mass underflows."""
  flip = lo + hi > 0
  a = jnp.where(flip, -hi, lo)
  b = jnp.where(flip, -lo, hi)
  lb = log_ndtr(b)
  return lb + jnp.log(jnp.maximum(-jnp.expm1(log_ndtr(a) - lb), 1e-30))


def discretized_gaussian_log_likelihood(x: Array, *, means: Array, log_scales: Array,
                                        num_levels: int = 256, bins: str = "vdiff",
                                        cdf: str = "exact") -> Array:
  """log P(x's bin) under N(means, e^(2 log_scales)), elementwise, in nats: a discretised Gaussian over K bins.

      log P = log(Phi((x + h - m) / s) - Phi((x - h - m) / s)),  outer edges at -inf (first bin) and +inf
      (last bin),

  bins="vdiff": x at vdiff's bin centres 2 (k + 1/2) / K - 1 with half-width h = 1/K (so the bins tile
  R and the bound is on -log P(k) of `vdiff.likelihood.encode`'s data); the first bin is x < -1 + 2/K,
  the last x > 1 - 2/K.
  bins="ddpm": DDPM's grid x = 2 k / (K - 1) - 1 (k / 127.5 - 1 at K = 256) with h = 1 / (K - 1)
  (1/255); first bin x < -1 + 1/(K-1), last x > 1 - 1/(K-1) (DDPM's -0.999 / 0.999 at K = 256 select the
  same grid points).
  cdf="exact": the normal CDF through log_ndtr (`_log_bin_mass`, accurate in the tails; vdiff's default).
  cdf="tanh": `approx_standard_normal_cdf` with DDPM's clamps (log of max(., 1e-12)); with bins="ddpm"
  and K = 256 this is DDPM's / improved-diffusion's discretized_gaussian_log_likelihood exactly.

  Args:
    x: data [B, ...] on the chosen grid.
    means: the Gaussian's mean, x's shape.
    log_scales: the Gaussian's log standard deviation, x's shape.
    num_levels: K.
    bins: "vdiff" or "ddpm", as above.
    cdf: "exact" or "tanh", as above.
  Returns:
    log-probabilities, x's shape, in nats.
  Reference: Ho et al. 2020, arXiv:2006.11239, eq. (13).
  """
  checks.positive_int(num_levels, "num_levels", minimum=2)
  _check_choice(bins, "bins", BINS)
  _check_choice(cdf, "cdf", CDFS)
  if not (x.shape == means.shape == log_scales.shape):
    raise ValueError(f"x, means and log_scales must have one shape, got {x.shape}, {means.shape}, "
                     f"{log_scales.shape}.")
  if bins == "vdiff":
    half, edge = 1.0 / num_levels, 1.0 - 2.0 / num_levels
  else:
    half, edge = 1.0 / (num_levels - 1), 1.0 - 1.0 / (num_levels - 1)
  centred = x - means
  inv_std = jnp.exp(-log_scales)
  plus_in = inv_std * (centred + half)
  min_in = inv_std * (centred - half)
  if cdf == "tanh":
    cdf_plus = approx_standard_normal_cdf(plus_in)
    cdf_min = approx_standard_normal_cdf(min_in)
    log_left = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_right = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_mid = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  else:
    log_left = log_ndtr(plus_in)
    log_right = log_ndtr(-min_in)
    log_mid = _log_bin_mass(min_in, plus_in)
  return jnp.where(x < -edge, log_left, jnp.where(x > edge, log_right, log_mid))


def discrete_gaussian_nll(k: Array, *, mean: Array, std: Array, num_levels: int) -> Array:
  """-log P(k) of the quantised Gaussian N(mean, std^2) on vdiff's K bins (edges at bin centres +- 1/K,
  outer edges at +-inf), elementwise, in nats: the exact discrete NLL of Gaussian data (a closed form
  for tests and checks, through normal CDF differences)."""
  x = likelihood.encode(k, num_levels)
  return -discretized_gaussian_log_likelihood(
      x, means=jnp.broadcast_to(mean, x.shape).astype(jnp.float32),
      log_scales=jnp.broadcast_to(jnp.log(std), x.shape).astype(jnp.float32), num_levels=num_levels)


def _sum_per_example(a: Array) -> Array:
  return jnp.sum(a.reshape(a.shape[0], -1), axis=-1)


def _mean_per_example(a: Array) -> Array:
  return jnp.mean(a.reshape(a.shape[0], -1), axis=-1)


def _decoder_options(decoder: str) -> dict:
  _check_choice(decoder, "decoder", DECODERS)
  return {"bins": "vdiff", "cdf": "exact"} if decoder == "vdiff" else {"bins": "ddpm", "cdf": "tanh"}


# ----------------------------------------------------------------------------------------------------
# The bound's terms.
# ----------------------------------------------------------------------------------------------------
def prior_kl(diffusion: GaussianDiffusion, x0: Array) -> Array:
  """KL(q(x_T | x_0) || N(0, I)) in nats, summed over dimensions, [B] (improved-diffusion _prior_bpd times
  D log 2). Equals `vdm.prior_loss(x0, gamma_T)` with gamma_T = log((1 - abar_T) / abar_T)."""
  checks.batch(x0, "x0")
  t = diffusion.num_steps
  mean = diffusion.sqrt_alphas_cumprod[t] * x0
  return _sum_per_example(normal_kl(mean, diffusion.log_one_minus_alphas_cumprod[t], 0.0, 0.0))


def vb_term(diffusion: GaussianDiffusion, model_output: Array, x0: Array, x_t: Array, i: Array, *,
            mean_type: str, var_type: str, num_levels: int = 256, decoder: str = "vdiff",
            clip_x0: bool = False) -> Array:
  """The bound's term of step i, in nats summed over dimensions, [B]:

      i >= 2:  KL(q(x_{i-1} | x_i, x_0) || p(x_{i-1} | x_i))     (q's variance: the clipped log beta~)
      i = 1:   -log p(x_0 | x_1), the discretised Gaussian decoder (`discretized_gaussian_log_likelihood`)

  improved-diffusion's _vb_terms_bpd times D log 2. For var_type="fixed_small", mean_type="eps" and
  i >= 2 this is exactly VDM's T-step term 1/2 expm1(gamma_i - gamma_{i-1}) ||eps - eps_hat||^2 on the
  same grid (`vdiff.vdm.diffusion_loss` / T, with t in step i); the i = 1 term differs (VDM's grid has
  gamma(0) > -inf where this one has clean data, abar_0 = 1), see docs/math.md.

  Args:
    diffusion: the process.
    model_output: the network output at (x_t, i).
    x0: [B, ...] data (on the decoder's grid).
    x_t: [B, ...] = q_sample(x0, i, noise).
    i: int [B] steps.
    mean_type: see `p_mean_variance`.
    var_type: see `p_mean_variance`.
    num_levels: K.
    decoder: "vdiff" (exact CDF, vdiff's
      bins) or "ddpm" (DDPM's tanh CDF and 1/255 bins).
    clip_x0: clip x0_hat (off for likelihoods).
  """
  _check_types(mean_type, var_type)
  dec = _decoder_options(decoder)
  i = _prep(diffusion, x0, i, "x0")
  true_mean, _, true_log_var = q_posterior_mean_variance(diffusion, x0, x_t, i)
  out = p_mean_variance(diffusion, model_output, x_t, i, mean_type=mean_type, var_type=var_type,
                        clip_x0=clip_x0)
  kl = _sum_per_example(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
  nll = -_sum_per_example(discretized_gaussian_log_likelihood(
      x0, means=out["mean"], log_scales=0.5 * out["log_variance"], num_levels=num_levels, **dec))
  return jnp.where(i == 1, nll, kl)


def _call_model(model_fn: ModelFn, diffusion: GaussianDiffusion, x_t: Array, i: Array, var_type: str):
  out = model_fn(x_t, model_times(diffusion, i))
  _check_output(out, x_t, var_type)
  return out


# ----------------------------------------------------------------------------------------------------
# Training losses.
# ----------------------------------------------------------------------------------------------------
def training_losses(diffusion: GaussianDiffusion, model_fn: ModelFn, x0: Array, i: Array, noise: Array, *,
                    mean_type: str, var_type: str, loss_type: str, num_levels: int = 256,
                    decoder: str = "vdiff", lambda_vlb: float = 0.001) -> tuple[Array, dict[str, Array]]:
  """Per-example training loss at steps i with noise, [B], and its named terms (improved-diffusion
  GaussianDiffusion.training_losses).

  x_i = q_sample(x0, i, noise), out = model_fn(x_i, t_i). With L_t = `vb_term` (nats summed over dims)
  and D the number of dimensions:

      "kl":           L_t                                  (nats; improved-diffusion: L_t / (D log 2))
      "rescaled_kl":  T L_t                                (an estimate of the whole bound minus the prior)
      "mse":          L_simple = mean_dims (target - out)^2  (+ L_t / (D log 2) for a learned variance)
      "rescaled_mse": L_simple  (+ T / 1000 L_t / (D log 2) for a learned variance)
      "hybrid":       L_simple + lambda_vlb T L_t / (D log 2)  (learned variance only)

  target = noise ("eps"), x0 ("x0") or the posterior mean ("prev_x"). L_simple is a MEAN over dimensions
  (improved-diffusion's mean_flat). For a learned variance the vb term sees the mean part through
  stop_gradient (improved-diffusion's frozen_out): it trains only the variance, L_simple the mean.
  That vb term is in bits/dim, L_t / (D log 2), as in improved-diffusion, so that "hybrid" with
  lambda_vlb = 0.001 is its RESCALED_MSE exactly (improved DDPM's L_hybrid = L_simple + 0.001 L_vlb,
  arXiv:2102.09672 sec. 3.1, with L_vlb = T L_t); "mse" is lambda_vlb = 1 / T. The KL losses never clip.

  Args:
    diffusion: the process.
    model_fn: (x [B, ...], t [B]) -> output (2C channels if learned variance).
    x0: [B, ...] data.
    i: int [B] steps in {1..T}.
    noise: [B, ...] standard normal.
    mean_type: see `p_mean_variance`.
    var_type: see `p_mean_variance`.
    loss_type: as above.
    num_levels: K of the decoder of the i = 1 term (see `vb_term`).
    decoder: that decoder, "vdiff" or "ddpm" (see `vb_term`).
    lambda_vlb: the weight of the bound in "hybrid" (>= 0).
  Returns:
    (loss [B], terms): {"vb": [B]} for the KL losses (nats); {"mse": [B]} and, for a learned variance,
    "vb" [B] (as added, in bits/dim) for the others.
  """
  _check_types(mean_type, var_type)
  _check_choice(loss_type, "loss_type", LOSS_TYPES)
  _decoder_options(decoder)
  checks.positive_int(num_levels, "num_levels", minimum=2)
  if not (isinstance(lambda_vlb, (int, float, np.floating)) and math.isfinite(lambda_vlb)
          and lambda_vlb >= 0):
    raise ValueError(f"lambda_vlb must be a finite number >= 0, got {lambda_vlb!r}.")
  learned = var_type in LEARNED_VAR_TYPES
  if loss_type == "hybrid" and not learned:
    raise ValueError(f"loss_type='hybrid' learns the variance through the bound; var_type={var_type!r} "
                     "is fixed (use loss_type='mse', or a learned var_type).")
  i = _prep(diffusion, x0, i, "x0")
  if noise.shape != x0.shape:
    raise ValueError(f"noise must have the shape of x0, {x0.shape}; got {noise.shape}.")
  num_steps = diffusion.num_steps
  x_t = q_sample(diffusion, x0, i, noise)
  out = _call_model(model_fn, diffusion, x_t, i, var_type)
  opts = dict(mean_type=mean_type, var_type=var_type, num_levels=num_levels, decoder=decoder)
  if loss_type in ("kl", "rescaled_kl"):
    vb = vb_term(diffusion, out, x0, x_t, i, **opts)
    if loss_type == "rescaled_kl":
      vb = vb * num_steps
    return vb, {"vb": vb}
  mean_out, var_out = split_output(out, var_type)
  terms = {}
  if learned:
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
    num_dims = math.prod(x0.shape[1:])
    vb_bpd = vb_term(diffusion, frozen, x0, x_t, i, **opts) / (num_dims * math.log(2.0))
    scale = {"mse": 1.0, "rescaled_mse": num_steps / 1000.0, "hybrid": lambda_vlb * num_steps}[loss_type]
    terms["vb"] = scale * vb_bpd
  if mean_type == "eps":
    target = noise
  elif mean_type == "x0":
    target = x0
  else:
    target = q_posterior_mean_variance(diffusion, x0, x_t, i)[0]
  terms["mse"] = _mean_per_example(jnp.square(target - mean_out))
  loss = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
  return loss, terms


# ----------------------------------------------------------------------------------------------------
# Time-step sampling: uniform, and improved DDPM's loss-aware importance sampler.
# ----------------------------------------------------------------------------------------------------
def sample_steps(rng: Array, batch_size: int, num_steps: int) -> tuple[Array, Array]:
  """i ~ U{1..T} per example and the importance weights (ones) (improved-diffusion UniformSampler)."""
  num_steps = _check_num_steps(num_steps)
  i = jax.random.randint(rng, (batch_size,), 1, num_steps + 1, dtype=jnp.int32)
  return i, jnp.ones((batch_size,), jnp.float32)


class LossSecondMomentState(NamedTuple):
  """The loss-aware sampler's state, a pytree that can live in a train state.

  Attributes:
    history: float32 [T, H], the last H losses of each step (row j holds step i = j + 1), oldest first.
    counts: int32 [T], how many losses each row holds (<= H).
  """

  history: Array
  counts: Array


def loss_second_moment_init(num_steps: int, *, history_per_term: int = 10) -> LossSecondMomentState:
  """An empty history of H = history_per_term losses per step (improved-diffusion's default 10)."""
  num_steps = _check_num_steps(num_steps)
  history_per_term = checks.positive_int(history_per_term, "history_per_term")
  return LossSecondMomentState(history=jnp.zeros((num_steps, history_per_term), jnp.float32),
                               counts=jnp.zeros((num_steps,), jnp.int32))


def loss_second_moment_probs(state: LossSecondMomentState, *, uniform_prob: float = 0.001) -> Array:
  """p over the T steps [T] (entry j for step i = j + 1): uniform until every step holds H losses, then

      p_i = (1 - u) sqrt(E[L_i^2]) / sum_j sqrt(E[L_j^2]) + u / T,   u = uniform_prob

  (improved DDPM sec. 3.3, arXiv:2102.09672; improved-diffusion LossSecondMomentResampler.weights).
  """
  if not 0.0 <= uniform_prob <= 1.0:
    raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}.")
  num_steps, h = state.history.shape
  warmed = jnp.all(state.counts == h)
  w = jnp.sqrt(jnp.mean(jnp.square(state.history), axis=-1))
  total = jnp.sum(w)
  # All-zero losses would divide 0 by 0 in the reference; fall back to uniform instead.
  w = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 1.0 / num_steps)
  w = w * (1.0 - uniform_prob) + uniform_prob / num_steps
  return jnp.where(warmed, w, jnp.full((num_steps,), 1.0 / num_steps, jnp.float32))


def loss_second_moment_sample(rng: Array, state: LossSecondMomentState, batch_size: int, *,
                              uniform_prob: float = 0.001) -> tuple[Array, Array]:
  """Importance-sample steps i [B] in {1..T} from `loss_second_moment_probs` and their weights
  1 / (T p_i) [B], which keep the weighted mean loss unbiased for the uniform average over steps."""
  p = loss_second_moment_probs(state, uniform_prob=uniform_prob)
  j = jax.random.choice(rng, p.shape[0], shape=(batch_size,), p=p)
  return (j + 1).astype(jnp.int32), (1.0 / (p.shape[0] * p[j])).astype(jnp.float32)


def loss_second_moment_update(state: LossSecondMomentState, i: Array, losses: Array) -> LossSecondMomentState:
  """Record each example's loss under its step, in batch order (improved-diffusion update_with_all_losses):
  a full row shifts out its oldest loss. Pass the GLOBAL batch (its steps and unweighted losses) so that
  every device keeps the same state (the reference all-gathers them).

  Args:
    state: the sampler's state.
    i: int [B] steps in {1..T}.
    losses: [B] per-example losses.
  Returns:
    the new state.
  """
  num_steps, h = state.history.shape
  i = _check_steps(i, "i", batch_size=jnp.shape(losses)[0], num_steps=num_steps)
  losses = jnp.asarray(losses, jnp.float32)

  def body(st, item):
    hist, cnt = st
    j, loss = item[0] - 1, item[1]
    c = cnt[j]
    full = c == h
    row = hist[j]
    shifted = jnp.concatenate([row[1:], loss[None]])
    inserted = row.at[jnp.minimum(c, h - 1)].set(loss)
    hist = hist.at[j].set(jnp.where(full, shifted, inserted))
    cnt = cnt.at[j].set(jnp.where(full, c, c + 1))
    return (hist, cnt), None

  (hist, cnt), _ = jax.lax.scan(body, (state.history, state.counts), (i, losses))
  return LossSecondMomentState(history=hist, counts=cnt)


# ----------------------------------------------------------------------------------------------------
# The bound: all T terms, and an unbiased stratified estimate with k terms.
# ----------------------------------------------------------------------------------------------------
def _check_bound_args(x0, mean_type, var_type, num_levels, decoder):
  _check_types(mean_type, var_type)
  _decoder_options(decoder)
  checks.positive_int(num_levels, "num_levels", minimum=2)
  checks.batch(x0, "x0")


def _step_noise(rng: Array, i: Array, shape: tuple[int, ...]) -> Array:
  """The bound's noise of example b at step i_b: normal(fold_in(fold_in(rng, i_b), b)), [B, ...].

  Keyed by (step, example) so that `full_bound` and `bound_estimate` draw the same noise for the same
  (example, step), at O(B D) cost.
  """
  def one(i_b, b):
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, i_b), b), shape[1:], jnp.float32)
  return jax.vmap(one)(i, jnp.arange(shape[0]))


def full_bound(rng: Array, x0: Array, *, diffusion: GaussianDiffusion, model_fn: ModelFn, mean_type: str,
               var_type: str, num_levels: int, decoder: str = "vdiff",
               clip_x0: bool = False) -> tuple[Array, dict[str, Array]]:
  """The whole T-term negative ELBO per example, in nats summed over dimensions (one draw of the noise):

      L(x_0) = prior_kl + sum_{i=2}^T KL_i + decoder NLL_1,

  improved-diffusion calc_bpd_loop's total_bpd times D log 2 (it divides by D log 2: bits/dim; it also
  clips x0_hat by default, vdiff does not). T network evaluations in one lax.scan; example b at step i uses
  x_i = q_sample(x0, i, noise) with noise = normal(fold_in(fold_in(rng_noise, i), b)) and
  (_, rng_noise) = split(rng) (`_step_noise`).
  bits/dim: `vdiff.likelihood.nats_to_bpd(nats, D)`, no offset (a discrete bound with decoder="vdiff").

  Args:
    rng: PRNG key.
    x0: [B, ...] data (vdiff bin centres for decoder="vdiff").
    diffusion: the process.
    model_fn: the network (see `training_losses`).
    mean_type: see `p_mean_variance`.
    var_type: see `p_mean_variance`.
    num_levels: K.
    decoder: see `vb_term`.
    clip_x0: clip x0_hat in the model's mean (off: the model's own bound).
  Returns:
    (nats [B], {"prior": [B], "kl": [B] (sum of the i >= 2 terms), "decoder": [B], "terms": [B, T]
    (column i - 1 is step i; improved-diffusion's "vb" holds them in reverse order), "nfe": int32 [B]}).
  """
  _check_bound_args(x0, mean_type, var_type, num_levels, decoder)
  num_steps = diffusion.num_steps
  _, rng_noise = jax.random.split(rng)
  batch = x0.shape[0]

  def step(_, i):
    ib = jnp.full((batch,), i, jnp.int32)
    x_t = q_sample(diffusion, x0, ib, _step_noise(rng_noise, ib, x0.shape))
    out = _call_model(model_fn, diffusion, x_t, ib, var_type)
    return None, vb_term(diffusion, out, x0, x_t, ib, mean_type=mean_type, var_type=var_type,
                         num_levels=num_levels, decoder=decoder, clip_x0=clip_x0)

  _, terms = jax.lax.scan(step, None, jnp.arange(1, num_steps + 1, dtype=jnp.int32))
  terms = terms.T
  prior = prior_kl(diffusion, x0)
  decoder_nll = terms[:, 0]
  kl = jnp.sum(terms[:, 1:], axis=1)
  return prior + decoder_nll + kl, {"prior": prior, "kl": kl, "decoder": decoder_nll, "terms": terms,
                                    "nfe": jnp.full((batch,), num_steps, jnp.int32)}


def stratified_steps(rng: Array, batch_size: int, num_steps: int, num_samples: int) -> Array:
  """k = num_samples steps per example, stratified over {1..T}: i_j = floor((u + j) T / k) + 1 for
  j = 0..k-1 with one u ~ U[0, 1) per example, int32 [B, k]. Every step i has total probability k / T
  over the k draws, so (T / k) sum_j L_{i_j} is an unbiased estimate of sum_i L_i."""
  u = jax.random.uniform(rng, (batch_size, 1))
  j = jnp.arange(num_samples, dtype=jnp.float32)[None]
  i = jnp.floor((u + j) * (num_steps / num_samples)).astype(jnp.int32) + 1
  return jnp.clip(i, 1, num_steps)


def bound_estimate(rng: Array, x0: Array, *, diffusion: GaussianDiffusion, model_fn: ModelFn,
                   mean_type: str, var_type: str, num_levels: int, num_samples: int = 1,
                   decoder: str = "vdiff", clip_x0: bool = False) -> tuple[Array, dict[str, Array]]:
  """An unbiased Monte-Carlo estimate of `full_bound` with k = num_samples network evaluations per example:

      L_hat(x_0) = prior_kl + (T / k) sum_{j=0}^{k-1} L_{i_j},   i_j = `stratified_steps` (per example),

  with L_i = `vb_term` (the decoder NLL at i = 1). E L_hat = E L (the T-term bound); k = T takes every
  step once, with the same noise as `full_bound` (the noise is keyed by (step, example), `_step_noise`), so
  it returns `full_bound` to float32 round-off of the sum.

  Args:
    rng: PRNG key, split into (u, noise).
    x0: [B, ...] data.
    diffusion: the process.
    model_fn: the network.
    mean_type: see `p_mean_variance`.
    var_type: see `p_mean_variance`.
    num_levels: K.
    num_samples: k >= 1.
    decoder: see `vb_term`.
    clip_x0: as `full_bound`.
  Returns:
    (nats [B], {"prior": [B], "diff": [B] (the (T / k)-weighted sum), "nfe": int32 [B]}).
  """
  _check_bound_args(x0, mean_type, var_type, num_levels, decoder)
  num_samples = checks.positive_int(num_samples, "num_samples")
  num_steps = diffusion.num_steps
  rng_u, rng_noise = jax.random.split(rng)
  batch = x0.shape[0]
  steps = stratified_steps(rng_u, batch, num_steps, num_samples)        # [B, k]
  def draw(_, ib):
    noise = _step_noise(rng_noise, ib, x0.shape)
    x_t = q_sample(diffusion, x0, ib, noise)
    out = _call_model(model_fn, diffusion, x_t, ib, var_type)
    return None, vb_term(diffusion, out, x0, x_t, ib, mean_type=mean_type, var_type=var_type,
                         num_levels=num_levels, decoder=decoder, clip_x0=clip_x0)

  _, terms = jax.lax.scan(draw, None, steps.T)                          # [k, B]
  prior = prior_kl(diffusion, x0)
  diff = jnp.sum(terms, axis=0) * (num_steps / num_samples)
  return prior + diff, {"prior": prior, "diff": diff, "nfe": jnp.full((batch,), num_samples, jnp.int32)}


# ----------------------------------------------------------------------------------------------------
# Ancestral sampling through the model's p(x_{i-1} | x_i).
# ----------------------------------------------------------------------------------------------------
def p_sample_loop(rng: Array, model_fn: ModelFn, diffusion: GaussianDiffusion, shape: Sequence[int], *,
                  mean_type: str, var_type: str, clip_x0: bool = True, num_levels: int | None = None,
                  return_trajectory: bool = False, z_init: Array | None = None):
  """Ancestral sampling x_T ~ N(0, I), x_{i-1} = mean_i + exp(log_variance_i / 2) eps' for i = T..1,
  with the model's (possibly learned) mean and variance (`p_mean_variance`), in one lax.scan; the last
  step (i = 1) adds no noise and returns its mean (improved-diffusion p_sample_loop).

  On a respaced diffusion (`make_diffusion(betas, respacing="100")`) this samples in the kept steps:
  a T = 4000 learned-variance model in 100 network evaluations. The network sees t = model_times[i]
  (i / T, or i_orig / T_orig when respaced). Noise layout as `vdiff.samplers` (rng -> (init, steps);
  x_T from init, step k = 0 (the noisiest) uses split(steps, T)[k]), so fixed_small with an eps model on
  `from_schedule(schedule, T)` is `samplers.ddpm(..., variance="small")` with the same key.

  Args:
    rng: PRNG key.
    model_fn: (x [B, ...], t [B]) -> output (2C channels for a learned variance).
    diffusion: the (respaced) process.
    shape: (B, ...) of the samples.
    mean_type: see `p_mean_variance`.
    var_type: see `p_mean_variance`.
    clip_x0: clip x0_hat to [-1, 1] (default True, as DDPM).
    num_levels: K; if given, samples are decoded to int32 levels (-1 where not finite).
    return_trajectory: also return [T + 1, B, ...]: x_T then the state after each step.
    z_init: optional x_T [B, ...].
  Returns:
    samples [B, ...] (float32, or int32 levels), and the trajectory if asked.
  Reference: Ho et al. 2020, arXiv:2006.11239, Algorithm 2; Nichol & Dhariwal 2021, arXiv:2102.09672.
  """
  _check_types(mean_type, var_type)
  try:
    shape = tuple(int(d) for d in shape)
  except TypeError as e:
    raise ValueError(f"shape must be a sequence of ints [B, ...], got {shape!r}.") from e
  if len(shape) < 2 or any(d < 1 for d in shape):
    raise ValueError(f"shape must be (B, ...) of rank >= 2 with positive entries, got {shape}.")
  if num_levels is not None:
    checks.positive_int(num_levels, "num_levels", minimum=2)
  if not isinstance(clip_x0, (bool, np.bool_)):
    raise ValueError(f"clip_x0 must be True or False, got {clip_x0!r}.")
  num_steps = diffusion.num_steps
  rng_init, rng_steps = jax.random.split(rng)
  if z_init is None:
    z_init = jax.random.normal(rng_init, shape, jnp.float32)
  elif tuple(z_init.shape) != shape:
    raise ValueError(f"z_init must have shape {shape}, got {tuple(z_init.shape)}.")
  z_init = jnp.asarray(z_init, jnp.float32)
  keys = jax.random.split(rng_steps, num_steps)
  steps = jnp.arange(num_steps, 0, -1, dtype=jnp.int32)

  def step(x, xs):
    i, key = xs
    ib = jnp.full((shape[0],), i, jnp.int32)
    out = _call_model(model_fn, diffusion, x, ib, var_type)
    pmv = p_mean_variance(diffusion, out, x, ib, mean_type=mean_type, var_type=var_type, clip_x0=clip_x0)
    noise = jax.random.normal(key, shape, jnp.float32)
    x_prev = pmv["mean"] + jnp.where(i > 1, 1.0, 0.0) * jnp.exp(0.5 * pmv["log_variance"]) * noise
    return x_prev, x_prev

  x, traj = jax.lax.scan(step, z_init, (steps, keys))
  if num_levels is not None:
    x = jnp.where(jnp.isfinite(x), likelihood.decode(x, num_levels), -1).astype(jnp.int32)
  if return_trajectory:
    return x, jnp.concatenate([z_init[None], traj], axis=0)
  return x
