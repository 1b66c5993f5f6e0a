"""vdiff.gaussian_diffusion against improved-diffusion, transcribed to float64 numpy, and against closed forms.

Reference: github.com/openai/improved-diffusion at commit 1bc7bbbdc414d83d4abf2ad8cc1446dc36c4e4d5
(improved_diffusion/gaussian_diffusion.py, losses.py, resample.py, respace.py, nn.py mean_flat). The
`Ref*` classes and `ref_*` functions below are line-by-line transcriptions of that code with torch
replaced by float64 numpy (no torch, no TensorFlow). The only changes: noise is passed in instead of
drawn (th.randn_like), the timestep-extraction helper keeps float64 (the reference casts to float32),
and the networks are NCHW as in the reference (vdiff's are NHWC; the tests transpose).

Index conventions: the reference's 0-based step t is vdiff's i = t + 1; its network sees t (or
t * 1000 / T), vdiff's sees i / T. Units: the reference's vb terms are bits/dim (mean over dims / log 2),
vdiff's are nats summed over dims; the tests convert with D log 2.

Closed forms (docs/math.md sec. 7 and the DDPM section): the exact discrete -log P(k) of a quantised
Gaussian by normal CDF differences (scipy, float64), the exact reverse kernel of Gaussian data, and
vdiff.vdm's T-step loss on the same grid.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from vdiff import gaussian_diffusion as gd
from vdiff import likelihood
from vdiff import samplers
from vdiff import schedules as S
from vdiff import vdm

LN2 = math.log(2.0)


# ====================================================================================================
# The reference, transcribed (improved_diffusion @ 1bc7bbbdc414d83d4abf2ad8cc1446dc36c4e4d5).
# ====================================================================================================
def ref_get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
  """gaussian_diffusion.py get_named_beta_schedule."""
  if schedule_name == "linear":
    scale = 1000 / num_diffusion_timesteps
    beta_start = scale * 0.0001
    beta_end = scale * 0.02
    return np.linspace(beta_start, beta_end, num_diffusion_timesteps, dtype=np.float64)
  elif schedule_name == "cosine":
    return ref_betas_for_alpha_bar(
        num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
  raise NotImplementedError(schedule_name)


def ref_betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
  """gaussian_diffusion.py betas_for_alpha_bar."""
  betas = []
  for i in range(num_diffusion_timesteps):
    t1 = i / num_diffusion_timesteps
    t2 = (i + 1) / num_diffusion_timesteps
    betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
  return np.array(betas)


def ref_mean_flat(tensor):
  """nn.py mean_flat."""
  return tensor.mean(axis=tuple(range(1, len(tensor.shape))))


def ref_normal_kl(mean1, logvar1, mean2, logvar2):
  """losses.py normal_kl."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2)
                + ((mean1 - mean2) ** 2) * np.exp(-logvar2))


def ref_approx_standard_normal_cdf(x):
  """losses.py approx_standard_normal_cdf."""
  return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * np.power(x, 3))))


def ref_discretized_gaussian_log_likelihood(x, *, means, log_scales):
  """losses.py discretized_gaussian_log_likelihood."""
  assert x.shape == means.shape == log_scales.shape
  centered_x = x - means
  inv_stdv = np.exp(-log_scales)
  plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
  cdf_plus = ref_approx_standard_normal_cdf(plus_in)
  min_in = inv_stdv * (centered_x - 1.0 / 255.0)
  cdf_min = ref_approx_standard_normal_cdf(min_in)
  log_cdf_plus = np.log(np.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = np.log(np.maximum(1.0 - cdf_min, 1e-12))
  cdf_delta = cdf_plus - cdf_min
  log_probs = np.where(
      x < -0.999, log_cdf_plus,
      np.where(x > 0.999, log_one_minus_cdf_min, np.log(np.maximum(cdf_delta, 1e-12))))
  return log_probs


def _extract(arr, timesteps, broadcast_shape):
  """gaussian_diffusion.py _extract_into_tensor (kept in float64)."""
  res = np.asarray(arr, np.float64)[timesteps]
  while len(res.shape) < len(broadcast_shape):
    res = res[..., None]
  return np.broadcast_to(res, broadcast_shape)


class RefGaussianDiffusion:
  """gaussian_diffusion.py GaussianDiffusion (mean types EPSILON / START_X / PREVIOUS_X as strings)."""

  def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False):
    self.model_mean_type = model_mean_type
    self.model_var_type = model_var_type
    self.loss_type = loss_type
    self.rescale_timesteps = rescale_timesteps
    betas = np.array(betas, dtype=np.float64)
    self.betas = betas
    assert len(betas.shape) == 1
    assert (betas > 0).all() and (betas <= 1).all()
    self.num_timesteps = int(betas.shape[0])
    alphas = 1.0 - betas
    self.alphas_cumprod = np.cumprod(alphas, axis=0)
    self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
    self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
    self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
    self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    self.posterior_log_variance_clipped = np.log(
        np.append(self.posterior_variance[1], self.posterior_variance[1:]))
    self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                 / (1.0 - self.alphas_cumprod))

  def q_mean_variance(self, x_start, t):
    mean = _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
    variance = _extract(1.0 - self.alphas_cumprod, t, x_start.shape)
    log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
    return mean, variance, log_variance

  def q_sample(self, x_start, t, noise):
    return (_extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

  def q_posterior_mean_variance(self, x_start, x_t, t):
    posterior_mean = (_extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                      + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
    posterior_variance = _extract(self.posterior_variance, t, x_t.shape)
    posterior_log_variance_clipped = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
    return posterior_mean, posterior_variance, posterior_log_variance_clipped

  def p_mean_variance(self, model, x, t, clip_denoised=True):
    B, C = x.shape[:2]
    model_output = model(x, self._scale_timesteps(t))
    if self.model_var_type in ["LEARNED", "LEARNED_RANGE"]:
      assert model_output.shape == (B, C * 2, *x.shape[2:])
      model_output, model_var_values = model_output[:, :C], model_output[:, C:]
      if self.model_var_type == "LEARNED":
        model_log_variance = model_var_values
        model_variance = np.exp(model_log_variance)
      else:
        min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
        max_log = _extract(np.log(self.betas), t, x.shape)
        frac = (model_var_values + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        model_variance = np.exp(model_log_variance)
    else:
      model_variance, model_log_variance = {
          "FIXED_LARGE": (np.append(self.posterior_variance[1], self.betas[1:]),
                          np.log(np.append(self.posterior_variance[1], self.betas[1:]))),
          "FIXED_SMALL": (self.posterior_variance, self.posterior_log_variance_clipped),
      }[self.model_var_type]
      model_variance = _extract(model_variance, t, x.shape)
      model_log_variance = _extract(model_log_variance, t, x.shape)

    def process_xstart(x):
      return np.clip(x, -1, 1) if clip_denoised else x

    if self.model_mean_type == "PREVIOUS_X":
      pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
      model_mean = model_output
    else:
      if self.model_mean_type == "START_X":
        pred_xstart = process_xstart(model_output)
      else:
        pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
      model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
    return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
            "pred_xstart": pred_xstart}

  def _predict_xstart_from_eps(self, x_t, t, eps):
    return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

  def _predict_xstart_from_xprev(self, x_t, t, xprev):
    return (_extract(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape) * x_t)

  def _scale_timesteps(self, t):
    if self.rescale_timesteps:
      return t.astype(np.float64) * (1000.0 / self.num_timesteps)
    return t

  def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True):
    true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
    out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
    kl = ref_normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
    kl = ref_mean_flat(kl) / np.log(2.0)
    decoder_nll = -ref_discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
    decoder_nll = ref_mean_flat(decoder_nll) / np.log(2.0)
    output = np.where((t == 0), decoder_nll, kl)
    return {"output": output, "pred_xstart": out["pred_xstart"]}

  def training_losses(self, model, x_start, t, noise):
    x_t = self.q_sample(x_start, t, noise=noise)
    terms = {}
    if self.loss_type == "KL" or self.loss_type == "RESCALED_KL":
      terms["loss"] = self._vb_terms_bpd(model=model, x_start=x_start, x_t=x_t, t=t,
                                         clip_denoised=False)["output"]
      if self.loss_type == "RESCALED_KL":
        terms["loss"] *= self.num_timesteps
    elif self.loss_type == "MSE" or self.loss_type == "RESCALED_MSE":
      model_output = model(x_t, self._scale_timesteps(t))
      if self.model_var_type in ["LEARNED", "LEARNED_RANGE"]:
        B, C = x_t.shape[:2]
        assert model_output.shape == (B, C * 2, *x_t.shape[2:])
        model_output, model_var_values = model_output[:, :C], model_output[:, C:]
        frozen_out = np.concatenate([model_output, model_var_values], axis=1)   # .detach(): values only
        terms["vb"] = self._vb_terms_bpd(model=lambda *args, r=frozen_out: r, x_start=x_start, x_t=x_t,
                                         t=t, clip_denoised=False)["output"]
        if self.loss_type == "RESCALED_MSE":
          terms["vb"] *= self.num_timesteps / 1000.0
      target = {
          "PREVIOUS_X": self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0],
          "START_X": x_start,
          "EPSILON": noise,
      }[self.model_mean_type]
      terms["mse"] = ref_mean_flat((target - model_output) ** 2)
      terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
    else:
      raise NotImplementedError(self.loss_type)
    return terms

  def _prior_bpd(self, x_start):
    batch_size = x_start.shape[0]
    t = np.array([self.num_timesteps - 1] * batch_size)
    qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
    kl_prior = ref_normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
    return ref_mean_flat(kl_prior) / np.log(2.0)

  def calc_bpd_loop(self, model, x_start, noises, clip_denoised=True):
    """noises[t]: the noise of 0-based step t (the reference draws th.randn_like(x_start) there)."""
    batch_size = x_start.shape[0]
    vb = []
    for t in list(range(self.num_timesteps))[::-1]:
      t_batch = np.array([t] * batch_size)
      x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noises[t])
      out = self._vb_terms_bpd(model, x_start=x_start, x_t=x_t, t=t_batch, clip_denoised=clip_denoised)
      vb.append(out["output"])
    vb = np.stack(vb, axis=1)
    prior_bpd = self._prior_bpd(x_start)
    total_bpd = vb.sum(axis=1) + prior_bpd
    return {"total_bpd": total_bpd, "prior_bpd": prior_bpd, "vb": vb}


def ref_space_timesteps(num_timesteps, section_counts):
  """respace.py space_timesteps."""
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      desired_count = int(section_counts[len("ddim"):])
      for i in range(1, num_timesteps):
        if len(range(0, num_timesteps, i)) == desired_count:
          return set(range(0, num_timesteps, i))
      raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")
    section_counts = [int(x) for x in section_counts.split(",")]
  size_per = num_timesteps // len(section_counts)
  extra = num_timesteps % len(section_counts)
  start_idx = 0
  all_steps = []
  for i, section_count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < section_count:
      raise ValueError(f"cannot divide section of {size} steps into {section_count}")
    if section_count <= 1:
      frac_stride = 1
    else:
      frac_stride = (size - 1) / (section_count - 1)
    cur_idx = 0.0
    taken_steps = []
    for _ in range(section_count):
      taken_steps.append(start_idx + round(cur_idx))
      cur_idx += frac_stride
    all_steps += taken_steps
    start_idx += size
  return set(all_steps)


class RefSpacedDiffusion(RefGaussianDiffusion):
  """respace.py SpacedDiffusion (with _WrappedModel folded into _wrap_model)."""

  def __init__(self, use_timesteps, **kwargs):
    self.use_timesteps = set(use_timesteps)
    self.timestep_map = []
    self.original_num_steps = len(kwargs["betas"])
    base_diffusion = RefGaussianDiffusion(**kwargs)
    last_alpha_cumprod = 1.0
    new_betas = []
    for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
      if i in self.use_timesteps:
        new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
        last_alpha_cumprod = alpha_cumprod
        self.timestep_map.append(i)
    kwargs["betas"] = np.array(new_betas)
    super().__init__(**kwargs)

  def p_mean_variance(self, model, *args, **kwargs):
    return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

  def _wrap_model(self, model):
    if getattr(model, "wrapped", False):
      return model

    def wrapped(x, ts):
      new_ts = np.array(self.timestep_map)[ts]
      if self.rescale_timesteps:
        new_ts = new_ts.astype(np.float64) * (1000.0 / self.original_num_steps)
      return model(x, new_ts)

    wrapped.wrapped = True
    return wrapped

  def _scale_timesteps(self, t):
    return t


class RefLossSecondMomentResampler:
  """resample.py LossSecondMomentResampler (weights, update_with_all_losses, _warmed_up)."""

  def __init__(self, num_timesteps, history_per_term=10, uniform_prob=0.001):
    self.num_timesteps = num_timesteps
    self.history_per_term = history_per_term
    self.uniform_prob = uniform_prob
    self._loss_history = np.zeros([num_timesteps, history_per_term], dtype=np.float64)
    self._loss_counts = np.zeros([num_timesteps], dtype=int)

  def weights(self):
    if not self._warmed_up():
      return np.ones([self.num_timesteps], dtype=np.float64)
    weights = np.sqrt(np.mean(self._loss_history ** 2, axis=-1))
    weights /= np.sum(weights)
    weights *= 1 - self.uniform_prob
    weights += self.uniform_prob / len(weights)
    return weights

  def update_with_all_losses(self, ts, losses):
    for t, loss in zip(ts, losses):
      if self._loss_counts[t] == self.history_per_term:
        self._loss_history[t, :-1] = self._loss_history[t, 1:]
        self._loss_history[t, -1] = loss
      else:
        self._loss_history[t, self._loss_counts[t]] = loss
        self._loss_counts[t] += 1

  def _warmed_up(self):
    return (self._loss_counts == self.history_per_term).all()


# ====================================================================================================
# Shared test inputs: one network formula in numpy (NCHW for the reference) and jax (NHWC for vdiff).
# ====================================================================================================
REF_MEAN = {"eps": "EPSILON", "x0": "START_X", "prev_x": "PREVIOUS_X"}
REF_VAR = {"fixed_small": "FIXED_SMALL", "fixed_large": "FIXED_LARGE", "learned": "LEARNED",
           "learned_range": "LEARNED_RANGE"}
B, H, W, C = 4, 2, 2, 3
D = H * W * C
_R = np.random.RandomState(0)
WEIGHT = 0.7 * _R.randn(C, 2 * C)
BIAS = _R.randn(2 * C)
# DDPM's data grid k / 127.5 - 1, with both ends (the decoder's outer bins) present.
LEVELS = np.concatenate([[0, 255, 1, 254], _R.randint(0, 256, B * D - 4)]).reshape(B, H, W, C)
X0_DDPM = LEVELS / 127.5 - 1.0
NOISE = _R.randn(B, H, W, C)


def net(xp, x, tf, mean_type, var_type):
  """A fixed nonlinear network of (x NHWC, t in (0, 1]) in numpy (xp=np) or jax (xp=jnp)."""
  h = xp.tanh(x @ WEIGHT + tf.reshape(-1, 1, 1, 1) * BIAS)
  # The x0 and prev_x outputs stay near x so that at i = 1 the decoder's bins keep masses above ~1e-7: below
  # that DDPM's tanh CDF difference cancels in float32 (the reference's dtype; this transcription is float64).
  mean = {"eps": h[..., :C], "x0": x + 0.02 * h[..., :C], "prev_x": 0.95 * x + 0.05 * h[..., :C]}[mean_type]
  if var_type == "learned_range":
    return xp.concatenate([mean, h[..., C:]], axis=-1)
  if var_type == "learned":
    return xp.concatenate([mean, -4.0 + 2.0 * h[..., C:]], axis=-1)
  return mean


def vdiff_model(mean_type, var_type):
  return lambda x, t: net(jnp, x, t, mean_type, var_type)


def ref_model(mean_type, var_type, original_num_steps):
  """The same network as the reference calls it: NCHW, 0-based original step t -> vdiff's (t + 1) / T."""

  def model(x_nchw, t):
    out = net(np, np.transpose(x_nchw, (0, 2, 3, 1)), (np.asarray(t) + 1.0) / original_num_steps,
              mean_type, var_type)
    return np.transpose(out, (0, 3, 1, 2))

  return model


def nchw(a):
  return np.transpose(np.asarray(a, np.float64), (0, 3, 1, 2))


def nhwc(a):
  return np.transpose(np.asarray(a), (0, 2, 3, 1))


BETAS = {"linear100": ref_get_named_beta_schedule("linear", 100),
         "cosine40": ref_get_named_beta_schedule("cosine", 40)}


def steps_for(num_steps):
  """vdiff steps covering the decoder (i = 1), the clipped variance (i = 2), the middle and the end."""
  return np.array([1, 2, num_steps // 2, num_steps])


def close(actual, desired, rtol=2e-5, atol=2e-5, err_msg=""):
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rtol, atol=atol, err_msg=err_msg)


# ====================================================================================================
# Betas and precomputed arrays.
# ====================================================================================================
@pytest.mark.parametrize("num_steps", [50, 1000, 4000])
def test_betas_match_reference(num_steps):
  np.testing.assert_array_equal(gd.linear_betas(num_steps), ref_get_named_beta_schedule("linear", num_steps))
  np.testing.assert_allclose(gd.cosine_betas(num_steps), ref_get_named_beta_schedule("cosine", num_steps),
                             rtol=1e-14)


@pytest.mark.parametrize("name", sorted(BETAS))
def test_diffusion_arrays_match_reference(name):
  betas = BETAS[name]
  d, ref = gd.make_diffusion(betas), RefGaussianDiffusion(betas=betas, model_mean_type="EPSILON",
                                                          model_var_type="FIXED_SMALL", loss_type="MSE")
  assert d.num_steps == len(betas)
  for field, want in [("betas", ref.betas), ("alphas_cumprod", ref.alphas_cumprod),
                      ("one_minus_alphas_cumprod", 1.0 - ref.alphas_cumprod),
                      ("sqrt_alphas_cumprod", ref.sqrt_alphas_cumprod),
                      ("sqrt_one_minus_alphas_cumprod", ref.sqrt_one_minus_alphas_cumprod),
                      ("log_one_minus_alphas_cumprod", ref.log_one_minus_alphas_cumprod),
                      ("sqrt_recip_alphas_cumprod", ref.sqrt_recip_alphas_cumprod),
                      ("sqrt_recipm1_alphas_cumprod", ref.sqrt_recipm1_alphas_cumprod),
                      ("posterior_variance", ref.posterior_variance),
                      ("posterior_log_variance_clipped", ref.posterior_log_variance_clipped),
                      ("posterior_mean_coef1", ref.posterior_mean_coef1),
                      ("posterior_mean_coef2", ref.posterior_mean_coef2),
                      ("fixed_large_log_variance", np.log(np.append(ref.posterior_variance[1], ref.betas[1:])))]:
    arr = getattr(d, field)
    assert arr.dtype == jnp.float32 and arr.shape == (len(betas) + 1,), field
    close(arr[1:], want, rtol=3e-6, atol=0, err_msg=field)    # float32 rounding of float64 values
  close(d.model_times[1:], np.arange(1, len(betas) + 1) / len(betas), rtol=1e-7, atol=0)


def test_schedule_betas_are_the_discrete_grid():
  sched = S.ddpm_linear_beta()
  # ddpm_linear_beta at its own T returns DDPM's float64 betas rounded once to float32.
  np.testing.assert_allclose(gd.schedule_betas(sched, 1000), np.linspace(1e-4, 0.02, 1000), rtol=1e-7)
  d = gd.from_schedule(S.linear(gamma_min=-10.0, gamma_max=6.0), 64)
  t = np.arange(1, 65) / 64
  gamma = -10.0 + 16.0 * t
  close(d.alphas_cumprod[1:], 1.0 / (1.0 + np.exp(gamma)), rtol=2e-5, atol=0)   # abar_i = sigmoid(-gamma(i/T))


# ====================================================================================================
# Forward process, posterior, model mean and variance.
# ====================================================================================================
@pytest.mark.parametrize("name", sorted(BETAS))
def test_q_sample_and_posterior_match_reference(name):
  betas = BETAS[name]
  d = gd.make_diffusion(betas)
  ref = RefGaussianDiffusion(betas=betas, model_mean_type="EPSILON", model_var_type="FIXED_SMALL",
                             loss_type="MSE")
  i = steps_for(len(betas))
  x0, noise = jnp.asarray(X0_DDPM, jnp.float32), jnp.asarray(NOISE, jnp.float32)
  x_t = gd.q_sample(d, x0, i, noise)
  close(x_t, nhwc(ref.q_sample(nchw(X0_DDPM), i - 1, nchw(NOISE))))
  for ours, want in zip(gd.q_mean_variance(d, x0, i), ref.q_mean_variance(nchw(X0_DDPM), i - 1)):
    close(ours, nhwc(want), rtol=3e-6)
  ref_xt = nchw(x_t)
  for ours, want, what in zip(gd.q_posterior_mean_variance(d, x0, x_t, i),
                              ref.q_posterior_mean_variance(nchw(X0_DDPM), ref_xt, i - 1),
                              ("mean", "variance", "log_variance")):
    close(ours, nhwc(want), rtol=3e-6, atol=1e-6, err_msg=what)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("var_type", gd.VAR_TYPES)
@pytest.mark.parametrize("mean_type", gd.MEAN_TYPES)
def test_p_mean_variance_matches_reference(mean_type, var_type, clip):
  for name, betas in BETAS.items():
    num_steps = len(betas)
    d = gd.make_diffusion(betas)
    ref = RefGaussianDiffusion(betas=betas, model_mean_type=REF_MEAN[mean_type],
                               model_var_type=REF_VAR[var_type], loss_type="MSE")
    i = steps_for(num_steps)
    x_t = jnp.asarray(0.8 * NOISE, jnp.float32)
    out = vdiff_model(mean_type, var_type)(x_t, gd.model_times(d, i))
    ours = gd.p_mean_variance(d, out, x_t, i, mean_type=mean_type, var_type=var_type, clip_x0=clip)
    want = ref.p_mean_variance(ref_model(mean_type, var_type, num_steps), nchw(x_t), i - 1,
                               clip_denoised=clip)
    for key, ref_key in [("mean", "mean"), ("variance", "variance"), ("log_variance", "log_variance"),
                         ("pred_x0", "pred_xstart")]:
      close(ours[key], nhwc(want[ref_key]), rtol=5e-5, atol=5e-5, err_msg=f"{name} {key}")


# ====================================================================================================
# The KL, the decoder and the losses.
# ====================================================================================================
def test_normal_kl_matches_reference_and_closed_form():
  r = np.random.RandomState(1)
  m1, m2, lv1, lv2 = r.randn(4, 50)
  close(gd.normal_kl(m1, lv1, m2, lv2), ref_normal_kl(m1, lv1, m2, lv2), rtol=1e-5, atol=1e-6)
  # KL(N(0, 1) || N(0, 1)) = 0 and KL(N(1, 1) || N(0, 1)) = 1/2 (closed form).
  close(gd.normal_kl(jnp.array([0.0, 1.0]), 0.0, 0.0, 0.0), [0.0, 0.5], atol=1e-7)


def test_discretized_gaussian_ddpm_mode_reproduces_reference():
  r = np.random.RandomState(2)
  means = jnp.asarray(X0_DDPM + 0.02 * r.randn(*X0_DDPM.shape), jnp.float32)
  # Scales >= 0.01 keep every bin's mass above ~1e-6: the tanh CDF difference of two numbers near 1
  # cancels in float32 (the reference's dtype) below that, while this transcription runs in float64.
  log_scales = jnp.asarray(np.log(0.01 + 0.05 * r.rand(*X0_DDPM.shape)), jnp.float32)
  ours = gd.discretized_gaussian_log_likelihood(jnp.asarray(X0_DDPM, jnp.float32), means=means,
                                                log_scales=log_scales, num_levels=256, bins="ddpm",
                                                cdf="tanh")
  want = ref_discretized_gaussian_log_likelihood(X0_DDPM, means=np.asarray(means, np.float64),
                                                 log_scales=np.asarray(log_scales, np.float64))
  close(ours, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_levels", [2, 8, 256])
def test_discretized_gaussian_exact_tiles_the_line(num_levels):
  """vdiff bins: edges at centres +- 1/K, outer edges +-inf, so sum_k P(k) = 1 for any Gaussian;
  each log P(k) matches scipy's float64 normal CDF difference, far into the tails."""
  k = np.arange(num_levels)
  centres = likelihood.encode(k, num_levels)
  r = np.random.RandomState(3)
  for mean, std in [(0.1, 0.3), (-0.7, 0.01), (0.95, 2.0), (r.randn(), r.rand() + 0.05)]:
    logp = gd.discretized_gaussian_log_likelihood(
        centres, means=jnp.full(centres.shape, mean, jnp.float32),
        log_scales=jnp.full(centres.shape, math.log(std), jnp.float32), num_levels=num_levels)
    close(np.exp(np.asarray(logp, np.float64)).sum(), 1.0, rtol=0, atol=3e-6)
    edges = np.concatenate([[-np.inf], -1.0 + 2.0 * np.arange(1, num_levels) / num_levels, [np.inf]])
    lo, hi = (edges[:-1] - mean) / std, (edges[1:] - mean) / std
    # log(Phi(hi) - Phi(lo)) in float64, on the side where both edges are in the lower tail.
    flip = lo + hi > 0
    a, b = np.where(flip, -hi, lo), np.where(flip, -lo, hi)
    want = norm.logcdf(b) + np.log(-np.expm1(norm.logcdf(a) - norm.logcdf(b)))
    close(logp, want, rtol=2e-4, atol=2e-5, err_msg=f"mean={mean} std={std}")
    close(gd.discrete_gaussian_nll(k, mean=mean, std=std, num_levels=num_levels), -want, rtol=2e-4, atol=2e-5)


def losses_inputs(betas):
  d = gd.make_diffusion(betas)
  i = steps_for(len(betas))
  return d, i, jnp.asarray(X0_DDPM, jnp.float32), jnp.asarray(NOISE, jnp.float32)


@pytest.mark.parametrize("loss_type", ["MSE", "RESCALED_MSE", "KL", "RESCALED_KL"])
@pytest.mark.parametrize("var_type", gd.VAR_TYPES)
@pytest.mark.parametrize("mean_type", gd.MEAN_TYPES)
def test_training_losses_match_reference(mean_type, var_type, loss_type):
  betas = BETAS["linear100"]
  d, i, x0, noise = losses_inputs(betas)
  ref = RefGaussianDiffusion(betas=betas, model_mean_type=REF_MEAN[mean_type],
                             model_var_type=REF_VAR[var_type], loss_type=loss_type)
  want = ref.training_losses(ref_model(mean_type, var_type, len(betas)), nchw(x0), i - 1, nchw(noise))
  kw = dict(mean_type=mean_type, var_type=var_type, num_levels=256, decoder="ddpm")
  loss, terms = gd.training_losses(d, vdiff_model(mean_type, var_type), x0, i, noise,
                                   loss_type=loss_type.lower(), **kw)
  if loss_type in ("KL", "RESCALED_KL"):
    # vdiff: nats summed over dims; the reference: bits/dim.
    close(loss / (D * LN2), want["loss"], rtol=1e-4, atol=1e-5)
    return
  close(loss, want["loss"], rtol=1e-4, atol=1e-5)
  close(terms["mse"], want["mse"], rtol=1e-5, atol=1e-6)
  if var_type in gd.LEARNED_VAR_TYPES:
    close(terms["vb"], want["vb"], rtol=1e-4, atol=1e-5)
    # hybrid = L_simple + lambda T L_t (bits/dim): lambda = 0.001 is RESCALED_MSE, lambda = 1/T is MSE.
    lam = 0.001 if loss_type == "RESCALED_MSE" else 1.0 / len(betas)
    hybrid, _ = gd.training_losses(d, vdiff_model(mean_type, var_type), x0, i, noise, loss_type="hybrid",
                                   lambda_vlb=lam, **kw)
    close(hybrid, want["loss"], rtol=1e-4, atol=1e-5)
  else:
    assert "vb" not in terms and "vb" not in want


def test_hybrid_trains_the_mean_by_mse_only_and_the_variance_by_the_bound():
  """frozen_out: d hybrid / d mean part = d L_simple / d mean part; d hybrid / d var part =
  lambda T / (D log 2) d L_t / d var part."""
  betas = BETAS["linear100"]
  d, i, x0, noise = losses_inputs(betas)
  x_t = gd.q_sample(d, x0, i, noise)
  out0 = vdiff_model("eps", "learned_range")(x_t, gd.model_times(d, i))
  lam = 0.01
  kw = dict(mean_type="eps", var_type="learned_range", num_levels=256)

  def hybrid(out):
    return jnp.sum(gd.training_losses(d, lambda x, t: out, x0, i, noise, loss_type="hybrid",
                                      lambda_vlb=lam, **kw)[0])

  g = jax.grad(hybrid)(out0)
  g_mse = jax.grad(lambda m: jnp.sum(jnp.mean(jnp.square(noise - m).reshape(B, -1), axis=1)))(out0[..., :C])
  g_vb = jax.grad(lambda o: jnp.sum(gd.vb_term(d, o, x0, x_t, i, **kw)))(out0)
  close(g[..., :C], g_mse, rtol=1e-5, atol=1e-7)
  close(g[..., C:], lam * len(betas) / (D * LN2) * np.asarray(g_vb[..., C:]), rtol=1e-4, atol=1e-7)
  assert float(jnp.max(jnp.abs(g_vb[..., :C]))) > 1e-3      # the bound alone would move the mean


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("var_type", ["fixed_large", "learned_range"])
def test_full_bound_matches_calc_bpd_loop(var_type, clip):
  betas = ref_get_named_beta_schedule("cosine", 16)
  d = gd.make_diffusion(betas)
  ref = RefGaussianDiffusion(betas=betas, model_mean_type="EPSILON", model_var_type=REF_VAR[var_type],
                             loss_type="KL")
  rng = jax.random.PRNGKey(7)
  x0 = jnp.asarray(X0_DDPM, jnp.float32)
  nats, extras = gd.full_bound(rng, x0, diffusion=d, model_fn=vdiff_model("eps", var_type),
                               mean_type="eps", var_type=var_type, num_levels=256, decoder="ddpm",
                               clip_x0=clip)
  # The documented noise layout: example b at step i draws normal(fold_in(fold_in(rng_noise, i), b)).
  rng_noise = jax.random.split(rng)[1]
  noises = [nchw(jnp.stack([jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng_noise, t + 1), b),
                                              (H, W, C)) for b in range(B)])) for t in range(len(betas))]
  want = ref.calc_bpd_loop(ref_model("eps", var_type, len(betas)), nchw(x0), noises, clip_denoised=clip)
  close(nats / (D * LN2), want["total_bpd"], rtol=1e-4, atol=1e-5)
  close(extras["prior"] / (D * LN2), want["prior_bpd"], rtol=1e-4, atol=1e-7)
  close(extras["terms"] / (D * LN2), want["vb"][:, ::-1], rtol=1e-4, atol=1e-5)   # reference: t = T-1..0
  np.testing.assert_array_equal(extras["nfe"], len(betas))


def test_bound_estimate_with_k_equal_T_is_the_full_bound():
  d = gd.make_diffusion(ref_get_named_beta_schedule("linear", 32))
  x0 = jnp.asarray(X0_DDPM, jnp.float32)
  kw = dict(diffusion=d, model_fn=vdiff_model("eps", "learned_range"), mean_type="eps",
            var_type="learned_range", num_levels=256)
  rng = jax.random.PRNGKey(3)
  full, _ = gd.full_bound(rng, x0, **kw)
  est, extras = gd.bound_estimate(rng, x0, num_samples=32, **kw)
  close(est, full, rtol=2e-5, atol=1e-3)
  np.testing.assert_array_equal(extras["nfe"], 32)


def test_bound_estimate_is_unbiased():
  """An x0-model whose output ignores x_t makes every term of the bound deterministic; the stratified
  k-step estimate then averages to the full bound (standard error from the draws)."""
  num_steps, k, n = 40, 3, 4000
  # Each step has total probability k / T over the k stratified draws (so (T / k) sum_j L_{i_j} is
  # unbiased), and draw j stays in its stratum [j T / k, (j + 1) T / k) of 0-based steps.
  m = 100_000
  steps = np.asarray(gd.stratified_steps(jax.random.PRNGKey(9), m, num_steps, k))
  counts = np.bincount(steps.ravel() - 1, minlength=num_steps)
  expect = m * k / num_steps
  assert np.all(np.abs(counts - expect) < 5 * np.sqrt(expect)), counts
  j = np.arange(k)[None]
  assert np.all((steps - 1 >= np.floor(j * num_steps / k)) & (steps - 1 < (j + 1) * num_steps / k))
  d = gd.make_diffusion(ref_get_named_beta_schedule("cosine", num_steps))
  model_fn = lambda x, t: jnp.broadcast_to(0.3 * jnp.sin(7.0 * t)[:, None], x.shape)
  x0 = jnp.broadcast_to(jnp.linspace(-0.9, 0.9, 5), (n, 5)).astype(jnp.float32)
  kw = dict(diffusion=d, model_fn=model_fn, mean_type="x0", var_type="fixed_small", num_levels=256)
  full_a, _ = gd.full_bound(jax.random.PRNGKey(0), x0[:1], **kw)
  full_b, _ = gd.full_bound(jax.random.PRNGKey(1), x0[:1], **kw)
  close(full_a, full_b, rtol=1e-6, atol=0)                       # deterministic terms
  est, _ = gd.bound_estimate(jax.random.PRNGKey(2), x0, num_samples=k, **kw)
  est = np.asarray(est, np.float64)
  se = est.std() / math.sqrt(n)
  assert se > 0
  assert abs(est.mean() - float(full_a[0])) < 4 * se, (est.mean(), float(full_a[0]), se)


# ====================================================================================================
# Closed forms: Gaussian data.
# ====================================================================================================
def gaussian_model(d, num_steps, mu, s, *, learned):
  """The exact denoiser of x ~ N(mu, s^2) on the grid t = i / T: E[eps | x_i] = sigma (x - a mu) / v with
  a^2 = abar_i, sigma^2 = 1 - abar_i, v = a^2 s^2 + sigma^2 (docs/math.md sec. 7). learned=True appends
  the exact reverse log variance log(beta~_i + c1_i^2 Var(x_0 | x_i)), Var(x_0 | x_i) = s^2 sigma^2 / v:
  for Gaussian data p(x_{i-1} | x_i) is then the true reverse kernel, at any T."""

  def fn(x, t):
    i = jnp.round(t * num_steps).astype(jnp.int32)
    sh = (-1,) + (1,) * (x.ndim - 1)
    a = d.sqrt_alphas_cumprod[i].reshape(sh)
    sg2 = d.one_minus_alphas_cumprod[i].reshape(sh)
    v = a * a * s * s + sg2
    eps = jnp.sqrt(sg2) * (x - a * mu) / v
    if not learned:
      return eps
    c1 = d.posterior_mean_coef1[i].reshape(sh)
    log_var = jnp.log(d.posterior_variance[i].reshape(sh) + c1 * c1 * s * s * sg2 / v)
    return jnp.concatenate([eps, jnp.broadcast_to(log_var, x.shape)], axis=-1)

  return fn


def test_bound_of_quantised_gaussian_is_above_the_entropy_and_close():
  """Data: x ~ N(mu, s^2) quantised to K = 256 vdiff bins, P(k) = Phi((e_{k+1} - mu)/s) - Phi((e_k - mu)/s)
  (edges at centres +- 1/K, outer edges +-inf; scipy, float64). Model: the exact Gaussian denoiser.
  E_k[bound(k)] >= E_k[-log P_model(k)] >= H(P) (cross-entropy >= entropy). With the exact reverse
  variance the kernels are exact at any T and the gap is the dequantisation of q(x_1 | x_0) (~0.01
  nats/dim at sigma_1 ~ 0.05, about (2/K)^2 / (12 sigma_1^2) plus decoder blur). With the fixed small
  variance the KL terms exceed the exact ones by O(1/T) (0.11 nats/dim at T = 100, 0.011 at T = 1000:
  measured with this test's seeds)."""
  num_levels, mu, s = 256, 0.1, 0.4
  edges = np.concatenate([[-np.inf], -1.0 + 2.0 * np.arange(1, num_levels) / num_levels, [np.inf]])
  p = np.diff(norm.cdf((edges - mu) / s))
  entropy = -np.sum(p * np.log(p))                               # 5.293 nats/dim
  sched = S.linear(gamma_min=-6.0, gamma_max=8.0)

  def expected(num_steps, var_type, reps):
    """E_k over P of the bound per dim: every level k once, repeated over `reps` dims (noise draws)."""
    x = likelihood.encode(jnp.broadcast_to(jnp.arange(num_levels)[:, None], (num_levels, reps)), num_levels)
    d = gd.from_schedule(sched, num_steps)
    nats, ex = jax.jit(lambda r: gd.full_bound(
        r, x, diffusion=d, model_fn=gaussian_model(d, num_steps, mu, s, learned=var_type == "learned"),
        mean_type="eps", var_type=var_type, num_levels=num_levels))(jax.random.PRNGKey(0))
    per_dim = lambda a: float(np.sum(p * np.asarray(a, np.float64)) / reps)
    return per_dim(nats), per_dim(ex["kl"])

  bound, _ = expected(1000, "learned", 128)                      # Monte-Carlo standard error ~0.002
  assert entropy - 0.003 < bound < entropy + 0.03, (bound, entropy)
  # The same noise for both variances (x_t does not depend on the model): the excess has little noise.
  excess = {}
  for num_steps in (100, 1000):
    excess[num_steps] = (expected(num_steps, "fixed_small", 8)[1] - expected(num_steps, "learned", 8)[1])
  assert 0 < excess[1000] < 0.02, excess
  assert 5.0 < excess[100] / excess[1000] < 20.0, excess         # O(1/T)


def test_kl_terms_equal_vdm_t_step_terms_and_prior():
  """On the grid of one vdiff schedule with fixed_small variance and an eps model, DDPM's KL term of step
  i >= 2 is VDM's T-step term 1/2 expm1(gamma_i - gamma_{i-1}) ||eps - eps_hat||^2 (= vdm.diffusion_loss
  / T with t in step i) for the same x, eps and denoiser, and the prior terms agree. (Step i = 1 differs:
  DDPM's grid has abar_0 = 1, VDM's gamma(0) is finite; there DDPM has its decoder.)"""
  num_steps, dims = 50, 6
  sched = S.linear(gamma_min=-9.0, gamma_max=6.0)
  d = gd.from_schedule(sched, num_steps)
  mu, s = 0.2, 0.5

  def eps_fn(z, t):      # a vdiff denoiser eps_fn(z, t) on the schedule, slightly wrong so terms are O(1)
    g = vdm.bcast(sched.gamma(t), z)
    a, sg = S.alpha_from_gamma(g), S.sigma_from_gamma(g)
    return 0.8 * sg * (z - a * mu) / (a ** 2 * s ** 2 + sg ** 2) + 0.1 * jnp.sin(3.0 * z)

  i = jnp.arange(2, num_steps + 1, dtype=jnp.int32)
  r = jax.random.split(jax.random.PRNGKey(5))
  x = mu + s * jax.random.normal(r[0], (num_steps - 1, dims))
  eps = jax.random.normal(r[1], x.shape)
  x_t = gd.q_sample(d, x, i, eps)
  ours = gd.vb_term(d, eps_fn(x_t, gd.model_times(d, i)), x, x_t, i, mean_type="eps",
                    var_type="fixed_small")
  t_mid = (i.astype(jnp.float32) - 0.5) / num_steps          # vdm.step_indices(t_mid) = i
  theirs = vdm.diffusion_loss(x, t_mid, eps, schedule=sched, eps_fn=eps_fn, num_steps=num_steps) / num_steps
  close(ours, theirs, rtol=3e-4, atol=1e-6)
  assert float(jnp.min(theirs)) > 1e-3
  close(gd.prior_kl(d, x), vdm.prior_loss(x, sched.gamma(1.0)), rtol=1e-4, atol=1e-7)


# ====================================================================================================
# Respacing.
# ====================================================================================================
@pytest.mark.parametrize("num_steps,counts", [(300, [10, 15, 20]), (300, "10,15,20"), (100, "ddim25"),
                                              (1000, "ddim50"), (4000, "100"), (10, "10"), (7, [3, 2]),
                                              (1000, "250")])
def test_space_timesteps_matches_reference(num_steps, counts):
  ours = gd.space_timesteps(num_steps, counts)
  np.testing.assert_array_equal(ours, np.array(sorted(ref_space_timesteps(num_steps, counts))) + 1)


def test_respaced_betas_and_model_times_match_spaced_diffusion():
  """A T = 4000 cosine process respaced to 100 steps: new betas, timestep map, and p(x_{i-1} | x_i) of a
  learned-range model through the wrapped network (the network sees the original times)."""
  betas = ref_get_named_beta_schedule("cosine", 4000)
  use = ref_space_timesteps(4000, "100")
  ref = RefSpacedDiffusion(use, betas=betas, model_mean_type="EPSILON", model_var_type="LEARNED_RANGE",
                           loss_type="MSE")
  new_betas, tmap = gd.respace_betas(betas, gd.space_timesteps(4000, "100"))
  np.testing.assert_allclose(new_betas, ref.betas, rtol=1e-11)
  np.testing.assert_array_equal(tmap, np.array(ref.timestep_map) + 1)
  d = gd.make_diffusion(betas, respacing="100")
  assert d.num_steps == 100
  close(d.betas[1:], ref.betas, rtol=3e-6, atol=0)
  np.testing.assert_array_equal(d.timestep_map[1:], np.array(ref.timestep_map) + 1)
  close(d.model_times[1:], (np.array(ref.timestep_map) + 1) / 4000, rtol=1e-7, atol=0)
  i = np.array([1, 2, 50, 100])
  x_t = jnp.asarray(0.8 * NOISE, jnp.float32)
  out = vdiff_model("eps", "learned_range")(x_t, gd.model_times(d, i))
  ours = gd.p_mean_variance(d, out, x_t, i, mean_type="eps", var_type="learned_range")
  want = ref.p_mean_variance(ref_model("eps", "learned_range", 4000), nchw(x_t), i - 1, clip_denoised=False)
  for key, ref_key in [("mean", "mean"), ("log_variance", "log_variance"), ("pred_x0", "pred_xstart")]:
    close(ours[key], nhwc(want[ref_key]), rtol=5e-5, atol=5e-5, err_msg=key)
  # improved-diffusion's rescaled network time: timestep_map[t] * 1000 / T_orig.
  close(gd.improved_diffusion_times(d.model_times[i], 4000),
        np.array(ref.timestep_map)[i - 1] * 1000.0 / 4000, rtol=0, atol=1e-3)


# ====================================================================================================
# The loss-aware importance sampler.
# ====================================================================================================
def test_loss_second_moment_sampler_matches_reference():
  num_steps, hist = 6, 3
  ref = RefLossSecondMomentResampler(num_steps, history_per_term=hist, uniform_prob=0.05)
  state = gd.loss_second_moment_init(num_steps, history_per_term=hist)
  update = jax.jit(chex.assert_max_traces(gd.loss_second_moment_update, n=1))
  r = np.random.RandomState(4)
  warmed_seen = False
  for _ in range(12):
    ts = r.randint(0, num_steps, 5)                      # repeats within a batch: order matters
    losses = r.rand(5) * (1 + ts)
    ref.update_with_all_losses(ts, losses)
    state = update(state, jnp.asarray(ts + 1, jnp.int32), jnp.asarray(losses, jnp.float32))
    want = ref.weights() / np.sum(ref.weights())          # ScheduleSampler.sample's p
    close(gd.loss_second_moment_probs(state, uniform_prob=0.05), want, rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(state.counts, ref._loss_counts)
    close(state.history, ref._loss_history, rtol=1e-6, atol=0)
    warmed_seen |= ref._warmed_up()
  assert warmed_seen and not np.allclose(want, 1.0 / num_steps)
  # Sampling: steps in {1..T} with frequencies p, weights 1 / (T p).
  i, w = gd.loss_second_moment_sample(jax.random.PRNGKey(0), state, 40000, uniform_prob=0.05)
  p = np.asarray(gd.loss_second_moment_probs(state, uniform_prob=0.05), np.float64)
  assert int(i.min()) >= 1 and int(i.max()) <= num_steps
  close(w, 1.0 / (num_steps * p[np.asarray(i) - 1]), rtol=1e-6, atol=0)
  freq = np.bincount(np.asarray(i) - 1, minlength=num_steps) / 40000
  assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / 40000) + 1e-4), (freq, p)
  # The uniform sampler: steps in {1..T}, all of them drawn, weights one.
  iu, wu = gd.sample_steps(jax.random.PRNGKey(1), 600, num_steps)
  assert set(np.asarray(iu).tolist()) == set(range(1, num_steps + 1))
  np.testing.assert_array_equal(wu, 1.0)
  # Defaults are the reference's: history_per_term=10, uniform_prob=0.001; uniform until warm.
  st = gd.loss_second_moment_init(4)
  assert st.history.shape == (4, 10)
  close(gd.loss_second_moment_probs(st), np.full(4, 0.25), rtol=0, atol=0)


# ====================================================================================================
# The ancestral sampler.
# ====================================================================================================
def test_sampler_with_fixed_small_eps_model_is_vdiff_ddpm():
  sched = S.linear(gamma_min=-10.0, gamma_max=6.0)
  num_steps, mu, s = 50, 0.3, 0.5

  def eps_fn(z, t):
    g = vdm.bcast(sched.gamma(t), z)
    a, sg = S.alpha_from_gamma(g), S.sigma_from_gamma(g)
    return sg * (z - a * mu) / (a ** 2 * s ** 2 + sg ** 2)

  d = gd.from_schedule(sched, num_steps)
  rng = jax.random.PRNGKey(11)
  ours = gd.p_sample_loop(rng, eps_fn, d, (64, 3), mean_type="eps", var_type="fixed_small")
  theirs = samplers.ddpm(rng, eps_fn, sched, (64, 3), num_steps=num_steps, variance="small")
  close(ours, theirs, rtol=0, atol=2e-4)


def test_learned_variance_samples_gaussian_exactly_in_few_respaced_steps():
  """For Gaussian data the exact reverse kernel (learned log variance) makes ancestral sampling exact at
  any number of steps: a T = 4000 cosine process respaced to 10 steps gives mean mu and variance s^2
  (to Monte-Carlo error), where the fixed small variance in the same 10 steps is visibly off."""
  mu, s, n = 0.3, 0.5, 20000
  d = gd.make_diffusion(gd.cosine_betas(4000), respacing="10")

  def model(learned):
    def fn(x, t):
      j = jnp.argmin(jnp.abs(d.model_times[None, :] - t[:, None]), axis=1)   # respaced step of t
      a = d.sqrt_alphas_cumprod[j][:, None]
      sg2 = d.one_minus_alphas_cumprod[j][:, None]
      v = a * a * s * s + sg2
      eps = jnp.sqrt(sg2) * (x - a * mu) / v
      if not learned:
        return eps
      c1 = d.posterior_mean_coef1[j][:, None]
      return jnp.concatenate([eps, jnp.log(d.posterior_variance[j][:, None] + c1 * c1 * s * s * sg2 / v)], -1)
    return fn

  rng = jax.random.PRNGKey(12)
  exact = np.asarray(gd.p_sample_loop(rng, model(True), d, (n, 1), mean_type="eps", var_type="learned",
                                      clip_x0=False), np.float64)
  se_var = s * s * math.sqrt(2.0 / n)
  assert abs(exact.mean() - mu) < 4 * s / math.sqrt(n)
  assert abs(exact.var() - s * s) < 4 * se_var, exact.var()
  small = np.asarray(gd.p_sample_loop(rng, model(False), d, (n, 1), mean_type="eps", var_type="fixed_small",
                                      clip_x0=False), np.float64)
  assert abs(small.var() - s * s) > 10 * se_var, small.var()


def test_one_step_diffusion():
  """T = 1: the bound is the prior plus the decoder from x_1 (log variance log beta_1: no beta~_2)."""
  d = gd.make_diffusion(np.array([0.3]))
  close(d.posterior_log_variance_clipped[1], math.log(0.3), rtol=1e-6, atol=0)
  x0 = jnp.asarray(X0_DDPM, jnp.float32)
  nats, ex = gd.full_bound(jax.random.PRNGKey(0), x0, diffusion=d, model_fn=vdiff_model("eps", "fixed_small"),
                           mean_type="eps", var_type="fixed_small", num_levels=256)
  assert np.all(np.isfinite(np.asarray(nats))) and ex["terms"].shape == (B, 1)
  close(nats, ex["prior"] + ex["decoder"], rtol=1e-6, atol=1e-5)


def test_sampler_returns_levels_and_trajectory():
  d = gd.make_diffusion(gd.linear_betas(30))
  out, traj = gd.p_sample_loop(jax.random.PRNGKey(0), vdiff_model("eps", "learned_range"), d, (B, H, W, C),
                               mean_type="eps", var_type="learned_range", num_levels=256,
                               return_trajectory=True)
  assert out.dtype == jnp.int32 and out.shape == (B, H, W, C)
  assert int(out.min()) >= 0 and int(out.max()) <= 255
  assert traj.shape == (31, B, H, W, C)


# ====================================================================================================
# Compilation: nothing retraces.
# ====================================================================================================
def test_no_retracing():
  d = gd.make_diffusion(gd.cosine_betas(20))
  model_fn = vdiff_model("eps", "learned_range")
  kw = dict(mean_type="eps", var_type="learned_range")

  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss(diffusion, x0, i, noise):
    return gd.training_losses(diffusion, model_fn, x0, i, noise, loss_type="hybrid", **kw)[0]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def bound(rng, x0):
    return gd.full_bound(rng, x0, diffusion=d, model_fn=model_fn, num_levels=256, **kw)[0]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def sample(rng):
    return gd.p_sample_loop(rng, model_fn, d, (B, H, W, C), **kw)

  x0 = jnp.asarray(X0_DDPM, jnp.float32)
  for seed in range(3):
    r = jax.random.PRNGKey(seed)
    i = jax.random.randint(r, (B,), 1, 21)
    loss(d, x0 * (1 - 0.1 * seed), i, jax.random.normal(r, x0.shape)).block_until_ready()
    bound(r, x0).block_until_ready()
    sample(r).block_until_ready()


# ====================================================================================================
# Bad input: ValueError naming the argument, before any compute.
# ====================================================================================================
def _never_called(x, t):
  raise AssertionError("the model must not be called before the arguments are checked")


def test_bad_arguments_raise_before_compute():
  d = gd.make_diffusion(gd.linear_betas(100))
  x0 = jnp.asarray(X0_DDPM, jnp.float32)
  i = jnp.array([1, 2, 3, 4])
  kw = dict(mean_type="eps", var_type="learned_range", loss_type="hybrid")
  cases = [
      ("mean_type", dict(kw, mean_type="EPSILON")),
      ("var_type", dict(kw, var_type="fixed")),
      ("loss_type", dict(kw, loss_type="l2")),
      ("lambda_vlb", dict(kw, lambda_vlb=-0.1)),
      ("loss_type", dict(kw, var_type="fixed_small")),            # hybrid needs a learned variance
      ("decoder", dict(kw, decoder="tanh")),
  ]
  for name, args in cases:
    with pytest.raises(ValueError, match=name):
      gd.training_losses(d, _never_called, x0, i, x0, **args)
  with pytest.raises(ValueError, match="i must hold step indices"):
    gd.training_losses(d, _never_called, x0, jnp.array([0, 1, 2, 3]), x0, **kw)
  # A learned variance needs 2C output channels (last axis).
  with pytest.raises(ValueError, match="model_output"):
    gd.training_losses(d, vdiff_model("eps", "fixed_small"), x0, i, x0, **kw)
  with pytest.raises(ValueError, match="model_output"):
    gd.p_mean_variance(d, jnp.zeros((B, H, W, C + 1)), x0, i, mean_type="eps", var_type="learned")
  with pytest.raises(ValueError, match="model_output"):
    gd.p_sample_loop(jax.random.PRNGKey(0), vdiff_model("eps", "fixed_small"), d, (B, H, W, C),
                     mean_type="eps", var_type="learned_range")
  with pytest.raises(ValueError, match="mean_type"):
    gd.full_bound(jax.random.PRNGKey(0), x0, diffusion=d, model_fn=_never_called, mean_type="v",
                  var_type="fixed_small", num_levels=256)
  with pytest.raises(ValueError, match="num_samples"):
    gd.bound_estimate(jax.random.PRNGKey(0), x0, diffusion=d, model_fn=_never_called, mean_type="eps",
                      var_type="fixed_small", num_levels=256, num_samples=0)
  # T < 1.
  for fn in (gd.linear_betas, gd.cosine_betas, gd.loss_second_moment_init,
             lambda n: gd.from_schedule(S.linear(), n)):
    with pytest.raises(ValueError, match="num_steps"):
      fn(0)
  with pytest.raises(ValueError, match="betas"):
    gd.make_diffusion(np.zeros((0,)))
  with pytest.raises(ValueError, match="betas"):
    gd.make_diffusion(np.array([0.1, 1.0]))
  # Respacing to more steps than T.
  for counts in ("ddim200", "101", [60, 60], "ddim0", [0]):
    with pytest.raises(ValueError, match="section_counts"):
      gd.make_diffusion(gd.linear_betas(100), respacing=counts)
  with pytest.raises(ValueError, match="steps"):
    gd.respace_betas(gd.linear_betas(100), [0, 5])
