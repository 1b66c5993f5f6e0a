"""Model families for the trainer: each bundles its networks, its loss and its likelihood estimator.

A family is built from explicit arguments (`from_config` only unpacks a config into them) and exposes
pure functions of a parameter pytree:

  init(rng)                                  -> params
  loss(params, rng, batch, *, train)         -> (per-example loss [B] in nats, {name: [B]})
  nll(params, rng, batch)                    -> (per-example NLL [B] in nats, bits/dim convention)
  eps_fn(params, label=None)                 -> a denoiser eps_fn(z, t) for every sampler
  sample(params, rng, num, *, ...)           -> integer samples [num, H, W, C]

batch = {"image": int [B, H, W, C] K-level data, "label": int [B]}. The families are registered in
`FAMILIES`, one visible name-to-class map.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vdiff import likelihood
from vdiff import schedules as schedules_lib
from vdiff import vdm
from vdiff.nets import score as score_nets

Array = jax.Array
Params = Any


def drop_labels(rng: Array, labels: Array, *, p_uncond: float, null_label: int) -> Array:
  """Replace each label by the null label with probability p_uncond (classifier-free guidance training)."""
  if p_uncond <= 0:
    return labels
  drop = jax.random.bernoulli(rng, p_uncond, labels.shape)
  return jnp.where(drop, null_label, labels)


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
  """Which schedule and its endpoints. kind: linear | cosine | learned_scalar | learned_net | learned_pinned."""

  kind: str = "linear"
  gamma_min: float = schedules_lib.GAMMA_MIN
  gamma_max: float = schedules_lib.GAMMA_MAX

  def __post_init__(self):
    known = sorted(schedules_lib.FIXED) + sorted(schedules_lib.LEARNED)
    if self.kind not in known:
      raise ValueError(f"unknown schedule kind {self.kind!r}; expected one of {known}.")
    if not self.gamma_min < self.gamma_max:
      raise ValueError(f"schedule gamma_min ({self.gamma_min}) must be < gamma_max ({self.gamma_max}).")

  @property
  def learned(self) -> bool:
    return self.kind in schedules_lib.LEARNED

  def module(self):
    return schedules_lib.LEARNED[self.kind](gamma_min=self.gamma_min, gamma_max=self.gamma_max)

  def init(self, rng) -> Params:
    if not self.learned:
      return {}
    return self.module().init(rng, jnp.zeros((1,)))["params"]

  def bind(self, params: Params) -> schedules_lib.Schedule:
    if self.learned:
      return schedules_lib.from_module(self.module(), params)
    return schedules_lib.FIXED[self.kind](gamma_min=self.gamma_min, gamma_max=self.gamma_max)


class VDMFamily:
  """VDM: a score network and a (fixed or learned) schedule, trained on the negative ELBO (nats)."""

  family_name = "vdm"
  native_estimator = "elbo"   # its own likelihood estimator (the ODE applies to every family)
  dequantized = False         # the ELBO bounds -log P(k) of the discrete data directly
  nfe_per_sample = 1          # one network evaluation per time sample

  def __init__(self, *, data_shape, num_levels: int, num_labels: int = 0, schedule: ScheduleSpec,
               score_kwargs: dict, parameterization: str = "eps", num_steps: int = 0,
               antithetic: bool = True, p_uncond: float = 0.0):
    self.data_shape = tuple(data_shape)
    self.num_levels = int(num_levels)
    self.num_labels = int(num_labels)
    self.schedule_spec = schedule
    self.net = score_nets.ScoreUNet(num_labels=self.num_labels, **score_kwargs)
    self.parameterization = parameterization
    self.num_steps = int(num_steps) or None  # 0 = continuous time
    self.antithetic = antithetic
    self.p_uncond = p_uncond

  @property
  def num_dims(self) -> int:
    return int(np.prod(self.data_shape))

  # -- parameters -----------------------------------------------------------------------------------
  def init(self, rng) -> Params:
    r_net, r_sched = jax.random.split(rng)
    z = jnp.zeros((1,) + self.data_shape, jnp.float32)
    label = jnp.zeros((1,), jnp.int32) if self.num_labels else None
    return {"score": self.net.init(r_net, z, jnp.zeros((1,)), label)["params"],
            "schedule": self.schedule_spec.init(r_sched)}

  def schedule(self, params) -> schedules_lib.Schedule:
    return self.schedule_spec.bind(params["schedule"])

  def eps_fn(self, params, label=None, *, train: bool = False, rng=None):
    schedule = self.schedule(params)
    rngs = {"dropout": rng} if train else {}

    def apply_fn(z, g_norm):
        lab = None
        if self.num_labels:
          lab = jnp.full(z.shape[:1], self.num_labels, jnp.int32) if label is None else label
        return self.net.apply({"params": params["score"]}, z, g_norm, lab, train=train, rngs=rngs)

    return vdm.make_eps_fn(apply_fn, schedule, parameterization=self.parameterization,
                           gamma_min=self.schedule_spec.gamma_min,
                           gamma_max=self.schedule_spec.gamma_max)

  # -- losses ---------------------------------------------------------------------------------------
  def _labels(self, rng, batch, train):
    if not self.num_labels:
      return None
    labels = batch["label"].astype(jnp.int32)
    if train:
      labels = drop_labels(rng, labels, p_uncond=self.p_uncond, null_label=self.num_labels)
    return labels

  def negative_elbo(self, params, rng, batch, *, train: bool):
    r_lab, r_drop, r_elbo = jax.random.split(rng, 3)
    x = likelihood.encode(batch["image"], self.num_levels)
    eps_fn = self.eps_fn(params, self._labels(r_lab, batch, train), train=train, rng=r_drop)
    return vdm.negative_elbo(r_elbo, x, schedule=self.schedule(params), eps_fn=eps_fn,
                             num_levels=self.num_levels, num_steps=self.num_steps,
                             antithetic=self.antithetic)

  def loss(self, params, rng, batch, *, train: bool = True):
    return self.negative_elbo(params, rng, batch, train=train)

  def nll(self, params, rng, batch):
    """One-sample negative ELBO in nats: an upper bound on -log P(k), no dequantisation offset."""
    nelbo, _ = self.negative_elbo(params, rng, batch, train=False)
    return nelbo, None

  # -- sampling -------------------------------------------------------------------------------------
  def sample(self, params, rng, num: int, *, num_steps: int = 256, label=None, guidance_weight=0.0,
             sampler: str = "vdm_ancestral", eta: float = 0.0):
    from vdiff import samplers  # pylint: disable=g-import-not-at-top
    shape = (num,) + self.data_shape
    eps_fn = self.guided_eps_fn(params, label, guidance_weight)
    schedule = self.schedule(params)
    if sampler == "vdm_ancestral":
      return samplers.vdm_ancestral(rng, eps_fn, schedule, shape, num_steps=num_steps,
                                    num_levels=self.num_levels, **self.sampler_extras())
    if sampler == "ddpm":
      return samplers.ddpm(rng, eps_fn, schedule, shape, num_steps=num_steps,
                           num_levels=self.num_levels)
    if sampler == "ddim":
      return samplers.ddim(rng, eps_fn, schedule, shape, num_steps=num_steps, eta=eta,
                           grid_steps=max(1000, num_steps), num_levels=self.num_levels)
    if sampler == "ode":
      return samplers.probability_flow_sample(rng, eps_fn, schedule, shape,
                                              num_levels=self.num_levels)
    raise ValueError(f"unknown sampler {sampler!r}; expected vdm_ancestral, ddpm, ddim or ode.")

  def sampler_extras(self) -> dict:
    return {}

  def guided_eps_fn(self, params, label, guidance_weight):
    """The plain denoiser, or (with a label and a weight) the classifier-free-guided one."""
    if label is None or not self.num_labels:
      return self.eps_fn(params)
    if guidance_weight == 0:
      return self.eps_fn(params, label)
    from vdiff import samplers  # pylint: disable=g-import-not-at-top

    def eps_cond(z, t, lab):
      return self.eps_fn(params, lab)(z, t)

    return samplers.classifier_free_guidance(eps_cond, label, guidance_weight=guidance_weight,
                                             null_label=self.num_labels)


FAMILIES = {
    "vdm": VDMFamily,
}


def score_kwargs_from_config(cfg) -> dict:
  return dict(ch=cfg.ch, num_blocks=cfg.num_blocks, dropout=cfg.dropout, attention=cfg.attention,
              fourier_min=cfg.fourier_min, fourier_max=cfg.fourier_max, num_groups=cfg.num_groups)


def from_config(model_cfg, *, data_shape, num_levels: int, num_labels: int):
  """Build the family named by model_cfg.family from a config (the only place a config is unpacked)."""
  family = model_cfg.family
  if family not in FAMILIES:
    raise ValueError(f"unknown model.family {family!r}; expected one of {sorted(FAMILIES)}.")
  common = dict(data_shape=data_shape, num_levels=num_levels,
                num_labels=num_labels if model_cfg.conditional else 0)
  if family in ("vdm", "diffenc"):
    kw = dict(common, schedule=ScheduleSpec(model_cfg.schedule.kind, model_cfg.schedule.gamma_min,
                                            model_cfg.schedule.gamma_max),
              score_kwargs=score_kwargs_from_config(model_cfg.score),
              parameterization=model_cfg.parameterization, num_steps=model_cfg.num_steps,
              antithetic=model_cfg.antithetic, p_uncond=model_cfg.p_uncond)
    return FAMILIES[family](**kw)
  raise AssertionError(family)
