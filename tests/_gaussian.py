"""The exact denoiser of Gaussian data, shared by the sampler tests (docs/math.md sec. 7)."""

from vdiff import schedules

MU, S = 0.5, 0.6


def gaussian_eps_fn(schedule, mu=MU, s=S, power=1):
  """E[eps | z_t] for x ~ N(mu, s^2) (docs/math.md sec. 7).

  power=1: a = alpha_t (plain diffusion). power=3: a = alpha_t^3, the DiffEnc non-trainable encoder
  x_t = alpha_t^2 x diffused as z_t = alpha_t x_t + sigma_t eps (docs/math.md sec. 3).
  """

  def eps_fn(z, t):
    g = schedule.gamma(t).reshape((-1,) + (1,) * (z.ndim - 1))
    a = schedules.alpha_from_gamma(g) ** power
    sg = schedules.sigma_from_gamma(g)
    return sg * (z - a * mu) / (a**2 * s**2 + sg**2)

  return eps_fn
