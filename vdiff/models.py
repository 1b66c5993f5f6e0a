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

from vdiff import cdm
from vdiff import diffenc
from vdiff import likelihood
from vdiff import schedules as schedules_lib
from vdiff import varmin
from vdiff import vdm
from vdiff.nets import classifier as classifier_nets
from vdiff.nets import encoder as encoder_nets
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


class Family:
  """What every family shares: labels with dropout for guidance, and sampling through any sampler."""

  num_labels = 0
  p_uncond = 0.0
  data_shape: tuple = ()
  num_levels = 2

  @property
  def num_dims(self) -> int:
    return int(np.prod(self.data_shape))

  @property
  def grid_steps(self) -> int:
    """Length of the discrete grid DDIM sub-samples (the model's own T where it has one)."""
    return 1000

  def _labels(self, rng, batch, train):
    if not self.num_labels:
      return None
    labels = batch["label"].astype(jnp.int32)
    if train:
      labels = drop_labels(rng, labels, p_uncond=self.p_uncond, null_label=self.num_labels)
    return labels

  def sample(self, params, rng, num: int, *, num_steps: int = 256, label=None, guidance_weight=0.0,
             sampler: str = "vdm_ancestral", eta: float = 0.0):
    """Integer samples [num, H, W, C] from the model's denoiser with the named sampler."""
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
                           grid_steps=max(self.grid_steps, num_steps), num_levels=self.num_levels)
    if sampler == "ode":
      return samplers.probability_flow_sample(rng, eps_fn, schedule, shape,
                                              num_levels=self.num_levels)
    raise ValueError(f"unknown sample.sampler {sampler!r}; expected vdm_ancestral, ddpm, ddim or ode.")

  def sampler_extras(self) -> dict:
    return {}

  supports_ode = True  # the probability-flow ODE applies to the model's denoiser and schedule

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


class VDMFamily(Family):
  """VDM: a score network and a (fixed or learned) schedule, trained on the negative ELBO (nats)."""

  family_name = "vdm"
  native_estimator = "elbo"   # its own likelihood estimator (the ODE applies to every family)
  dequantized = False         # the ELBO bounds -log P(k) of the discrete data directly
  nfe_per_sample = 1          # one network evaluation per time sample

  def __init__(self, *, data_shape, num_levels: int, num_labels: int = 0, schedule: ScheduleSpec,
               score_kwargs: dict, parameterization: str = "eps", num_steps: int = 0,
               antithetic: bool = True, p_uncond: float = 0.0, variance_minimization: bool = False):
    if variance_minimization and schedule.kind != "learned_pinned":
      raise ValueError("model.schedule.variance_minimization needs model.schedule.kind="
                       f"'learned_pinned' (endpoints and shape learned apart), got {schedule.kind!r}.")
    self.variance_minimization = variance_minimization
    self.data_shape = tuple(data_shape)
    self.num_levels = int(num_levels)
    self.num_labels = int(num_labels)
    self.schedule_spec = schedule
    self.net = score_nets.ScoreUNet(num_labels=self.num_labels, **score_kwargs)
    self.parameterization = parameterization
    self.num_steps = int(num_steps) or None  # 0 = continuous time
    self.antithetic = antithetic
    self.p_uncond = p_uncond

  # -- parameters -----------------------------------------------------------------------------------
  def init(self, rng) -> Params:
    r_net, r_sched = jax.random.split(rng)
    z = jnp.zeros((1,) + self.data_shape, jnp.float32)
    label = jnp.zeros((1,), jnp.int32) if self.num_labels else None
    return {"score": self.net.init(r_net, z, jnp.zeros((1,)), label)["params"],
            "schedule": self.schedule_spec.init(r_sched)}

  def schedule(self, params) -> schedules_lib.Schedule:
    return self.schedule_spec.bind(params["schedule"])

  def _eps_fn_for(self, params, schedule, label, *, train: bool, rng):
    rngs = {"dropout": rng} if train else {}

    def apply_fn(z, g_norm):
      lab = None
      if self.num_labels:
        lab = jnp.full(z.shape[:1], self.num_labels, jnp.int32) if label is None else label
      return self.net.apply({"params": params["score"]}, z, g_norm, lab, train=train, rngs=rngs)

    return vdm.make_eps_fn(apply_fn, schedule, parameterization=self.parameterization,
                           gamma_min=self.schedule_spec.gamma_min,
                           gamma_max=self.schedule_spec.gamma_max)

  def eps_fn(self, params, label=None, *, train: bool = False, rng=None):
    """The denoiser eps_fn(z, t) of these parameters (label: [B] class labels of a conditional model)."""
    return self._eps_fn_for(params, self.schedule(params), label, train=train, rng=rng)

  def encoder(self, params):  # pylint: disable=unused-argument
    """The DiffEnc encoder of these parameters; None for plain VDM (the identity)."""
    return None

  # -- losses ---------------------------------------------------------------------------------------
  def negative_elbo(self, params, rng, batch, *, train: bool):
    r_lab, r_drop, r_elbo = jax.random.split(rng, 3)
    x = likelihood.encode(batch["image"], self.num_levels)
    labels = self._labels(r_lab, batch, train)
    enc = self.encoder(params)
    common = dict(num_levels=self.num_levels, num_steps=self.num_steps, antithetic=self.antithetic)
    if self.variance_minimization and train:
      # Same value; the schedule's shape gets the gradient of E[L_diff^2] (VDM sec. 5).
      return varmin.negative_elbo(
          r_elbo, x, gamma_module=self.schedule_spec.module(), schedule_params=params["schedule"],
          eps_fn_from_schedule=lambda sched, lab: self._eps_fn_for(params, sched, lab, train=train,
                                                                   rng=r_drop),
          cond=labels, encoder=enc, **common)
    eps_fn = self._eps_fn_for(params, self.schedule(params), labels, train=train, rng=r_drop)
    if enc is None:
      return vdm.negative_elbo(r_elbo, x, schedule=self.schedule(params), eps_fn=eps_fn, **common)
    return diffenc.negative_elbo(r_elbo, x, schedule=self.schedule(params), encoder=enc,
                                 eps_fn=eps_fn, **common)

  def loss(self, params, rng, batch, *, train: bool = True):
    return self.negative_elbo(params, rng, batch, train=train)

  def nll(self, params, rng, batch):
    """One-sample negative ELBO in nats: an upper bound on -log P(k), no dequantisation offset."""
    nelbo, _ = self.negative_elbo(params, rng, batch, train=False)
    return nelbo, None

class DiffEncFamily(VDMFamily):
  """DiffEnc (Nielsen et al., arXiv:2310.19789): VDM whose diffusion runs on x_t = enc(x, gamma_t).

  encoder_kind: "identity" (plain VDM), "nontrainable" (x_t = alpha_t^2 x) or "trainable"
  (x_t = alpha_t^2 x + sigma_t^2 y_phi(x, gamma_t), y_phi an `EncoderUNet`, zero at initialisation).
  Samplers add the modelled mean shift of the encoder (docs/math.md sec. 3) unless the encoder is the identity.
  """

  family_name = "diffenc"
  ENCODERS = ("identity", "nontrainable", "trainable")

  def __init__(self, *, encoder_kind: str = "nontrainable", encoder_kwargs: dict | None = None, **kw):
    if encoder_kind not in self.ENCODERS:
      raise ValueError(f"model.encoder.kind must be one of {self.ENCODERS}, got {encoder_kind!r}.")
    super().__init__(**kw)
    self.encoder_kind = encoder_kind
    self.encoder_net = (encoder_nets.EncoderUNet(**(encoder_kwargs or {}))
                        if encoder_kind == "trainable" else None)

  def init(self, rng) -> Params:
    r_base, r_enc = jax.random.split(rng)
    params = super().init(r_base)
    if self.encoder_net is not None:
      x = jnp.zeros((1,) + self.data_shape, jnp.float32)
      params["encoder"] = self.encoder_net.init(r_enc, x, jnp.zeros((1,)))["params"]
    return params

  def encoder(self, params):
    if self.encoder_kind == "identity":
      return diffenc.identity_encoder()
    if self.encoder_kind == "nontrainable":
      return diffenc.nontrainable_encoder()
    return diffenc.trainable_encoder(diffenc.y_fn_from_module(
        self.encoder_net, params["encoder"], gamma_min=self.schedule_spec.gamma_min,
        gamma_max=self.schedule_spec.gamma_max))

  def sampler_extras(self) -> dict:
    return {"encoder_shift": self.encoder_kind != "identity"}

  @property
  def supports_ode(self) -> bool:
    # The probability-flow ODE of docs/math.md sec. 5 transports the marginals of z_t = alpha_t x + sigma_t eps;
    # with an encoder the marginals are those of alpha_t x_t + sigma_t eps, whose flow has an extra drift
    # (d x_t / dt) that the ODE estimator does not model. Only the identity encoder qualifies.
    return self.encoder_kind == "identity"


class CDMFamily(Family):
  """Classification Diffusion Model (Yadin et al., arXiv:2402.10095): a noise-level classifier over the
  classes {0 (clean), 1..T, T+1 (pure noise)} of a discrete schedule, trained with w_ce CE + MSE through
  its input gradient on uniformly dequantised data; its logits give log p(y) in one evaluation."""

  family_name = "cdm"
  native_estimator = "cdm"
  dequantized = True      # a density on dequantised data: bits/dim carry the + log2(K/2) offset
  nfe_per_sample = 1      # one classifier evaluation per image

  def __init__(self, *, data_shape, num_levels: int, num_labels: int = 0, num_steps: int = 1000,
               beta_start: float = 1e-4, beta_end: float = 0.02, w_ce: float = 1e-3,
               classifier_kwargs: dict | None = None, p_uncond: float = 0.0):
    self.data_shape = tuple(data_shape)
    self.num_levels = int(num_levels)
    self.num_labels = int(num_labels)
    self.num_steps = int(num_steps)
    self.w_ce = w_ce
    self.p_uncond = p_uncond
    self._schedule = schedules_lib.ddpm_linear_beta(beta_start=beta_start, beta_end=beta_end,
                                                     num_steps=self.num_steps)
    self.abar = cdm.abar_grid(self._schedule, self.num_steps)
    self.net = classifier_nets.NoiseLevelClassifier(num_classes_out=self.num_steps + 2,
                                                   num_labels=self.num_labels,
                                                   **(classifier_kwargs or {}))

  @property
  def grid_steps(self) -> int:
    return self.num_steps

  def init(self, rng) -> Params:
    x = jnp.zeros((1,) + self.data_shape, jnp.float32)
    label = jnp.zeros((1,), jnp.int32) if self.num_labels else None
    return {"classifier": self.net.init(rng, x, label)["params"]}

  def schedule(self, params) -> schedules_lib.Schedule:  # pylint: disable=unused-argument
    return self._schedule

  def logits_fn(self, params, label=None, *, train: bool = False, rng=None):
    rngs = {"dropout": rng} if train else {}

    def fn(x):
      lab = label
      if self.num_labels and lab is None:
        lab = jnp.full(x.shape[:1], self.num_labels, jnp.int32)
      return self.net.apply({"params": params["classifier"]}, x, lab, train=train, rngs=rngs)

    return fn

  def eps_fn(self, params, label=None):
    """The MMSE denoiser eps_hat = sqrt(1 - abar_t) (grad_x F(x, t) + x) on the grid t = i / T."""
    return cdm.make_denoiser(self.logits_fn(params, label), self.abar, num_steps=self.num_steps)

  def loss(self, params, rng, batch, *, train: bool = True):
    r_lab, r_drop, r_deq, r_loss = jax.random.split(rng, 4)
    y = likelihood.dequantize(r_deq, batch["image"], self.num_levels)
    logits_fn = self.logits_fn(params, self._labels(r_lab, batch, train), train=train, rng=r_drop)
    per_example, terms = cdm.loss(r_loss, y, logits_fn, self.abar, w_ce=self.w_ce)
    # The loss is not a likelihood; log the one-step bits/dim of the clean batch beside it (one more
    # forward pass, no gradient).
    nats = -cdm.one_step_log_density(logits_fn, y)
    terms = dict(terms, bpd=jax.lax.stop_gradient(
        likelihood.nats_to_bpd(nats, self.num_dims, num_levels=self.num_levels)))
    return per_example, terms

  def nll(self, params, rng, batch):
    """-log p(y) in nats of one uniformly dequantised copy y of the batch, one network evaluation."""
    y = likelihood.dequantize(rng, batch["image"], self.num_levels)
    return -cdm.one_step_log_density(self.logits_fn(params), y), None


FAMILIES = {
    "vdm": VDMFamily,
    "diffenc": DiffEncFamily,
    "cdm": CDMFamily,
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
              antithetic=model_cfg.antithetic, p_uncond=model_cfg.p_uncond,
              variance_minimization=model_cfg.schedule.variance_minimization)
    if family == "diffenc":
      e = model_cfg.encoder
      kw.update(encoder_kind=e.kind, encoder_kwargs=dict(
          ch=e.ch, ch_mult=tuple(e.ch_mult), num_res_blocks=e.num_res_blocks,
          attn_resolutions=tuple(e.attn_resolutions), num_groups=e.num_groups))
    return FAMILIES[family](**kw)
  c = model_cfg.cdm
  return CDMFamily(**common, num_steps=c.num_steps, beta_start=c.beta_start, beta_end=c.beta_end,
                   w_ce=c.w_ce, p_uncond=model_cfg.p_uncond, classifier_kwargs=dict(
                       ch=c.ch, ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks,
                       attn_resolutions=tuple(c.attn_resolutions), dropout=c.dropout,
                       num_groups=c.num_groups))
