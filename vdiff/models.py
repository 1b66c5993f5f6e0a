"""Model families for the trainer: each bundles its networks, its loss and its likelihood estimator.

A family is built from explicit arguments (`from_config` only unpacks a config into them) and exposes
pure functions of a parameter pytree:

  init(rng)                                  -> params
  loss(params, rng, batch, *, train)         -> (per-example loss [B] in nats, {name: [B]})
  nll(params, rng, batch)                    -> (per-example NLL [B] in nats bounding -log P(k), extras)
  eps_fn(params, label=None)                 -> a denoiser eps_fn(z, t) for every sampler
  sample(params, rng, num, *, ...)           -> integer samples [num, H, W, C]

batch = {"image": int [B, H, W, C] K-level data, "label": int [B]}. `FamilyProtocol` states the whole
contract the trainer relies on. The families are registered in `FAMILIES`, one visible name-to-class
map; a user's family is named in the config by an import path (`model.family =
"mypkg.models:MyFamily"`) or registered by name with `register_family`, and usually subclasses
`DenoiserFamily` (write init, eps_fn and loss; everything else is inherited).
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from vdiff import cdm
from vdiff import diffenc
from vdiff import likelihood
from vdiff import sampling
from vdiff import schedules as schedules_lib
from vdiff import varmin
from vdiff import vdm
from vdiff.nets import classifier as classifier_nets
from vdiff.nets import encoder as encoder_nets
from vdiff.nets import score as score_nets

Array = jax.Array
Params = Any


@runtime_checkable
class FamilyProtocol(Protocol):
  """What the trainer (`vdiff.train`) needs from a model family; implement it to train your own networks.

  A family bundles its Flax modules, its loss and its likelihood estimator, and exposes pure functions of
  a parameter pytree. Given one, the trainer provides data parallelism, EMA parameters, checkpoints and
  resumption, evaluation with every estimator that applies (the family's native one and, where
  `supports_ode`, the probability-flow ODE likelihood of docs/math.md sec. 6) and sampling with every
  sampler.
  Subclass `DenoiserFamily` for a denoiser trained on the VDM negative ELBO: it supplies every member
  below except `init`, `eps_fn` and `loss`.

  Naming a family in the config: `model.family` is a built-in or registered name (`FAMILIES`,
  `register_family`) or an import path "package.module:ClassName" (importable from the working directory
  or installed). Constructor contract, tried in this order:

    cls.from_config(model_cfg, *, data_shape, num_levels, num_labels)   a classmethod, if defined;
    cls(data_shape=..., num_levels=..., num_labels=..., **model_cfg.options)   otherwise,

  where model_cfg is the config's `model` sub-tree, `model.options` a free-form ConfigDict for the
  family's own hyperparameters (declare its keys in the config file; the command line can then override
  them), data_shape the data's (H, W, C), num_levels K, and num_labels the number of classes the model
  conditions on (0 unless model.conditional; label num_labels is the null label of guidance).

  batch = {"image": int [B, H, W, C] in {0..K-1}, "label": int [B]} (the global batch under jit; the
  trainer shards it over devices). Every function must be pure and jit-able; `params` is whatever
  pytree `init` returns (the trainer keeps its EMA and checkpoints it).

  Attributes:
    family_name: a label for messages and logs.
    native_estimator: the eval.estimator name under which `nll` is used ("elbo" for the negative ELBO,
      "cdm" for the CDM one-step estimator).
    dequantized: True if `nll` bounds -log P(k) through a density on uniformly dequantised data (its
      nats include the D log(K / 2) of the dequantisation bound), False if it bounds -log P(k)
      directly (an ELBO). It only labels the convention in eval.json and the printed line: either way
      bits/dim are `likelihood.nats_to_bpd(nats, D)`.
    nfe_per_sample: network evaluations per image of one `nll` call (reported as nfe).
    supports_ode: whether the probability-flow ODE of `eps_fn` and `schedule` describes the model.
    grid_steps: length of the discrete time grid DDIM sub-samples (1000 for continuous time).
    data_shape: (H, W, C). num_levels: K. num_labels: classes conditioned on (0 = unconditional).
    num_dims: H * W * C.
  """

  family_name: str
  native_estimator: str
  dequantized: bool
  nfe_per_sample: int
  supports_ode: bool
  grid_steps: int
  data_shape: tuple
  num_levels: int
  num_labels: int
  num_dims: int

  def init(self, rng: Array) -> Params:
    """A new parameter pytree (everything trained, including a learned schedule's parameters)."""

  def schedule(self, params: Params) -> schedules_lib.Schedule:
    """The noise schedule of these parameters (for the ODE estimator and the samplers)."""

  def loss(self, params: Params, rng: Array, batch: dict, *, train: bool) -> tuple[Array, dict]:
    """The training loss: (per-example loss [B] in nats, {name: per-example values [B]}); the trainer
    minimises its batch mean and logs the batch mean of every term; a "bpd" term is logged as given,
    otherwise bits/dim = loss / (D ln 2) are logged only when `native_estimator` is "elbo" (the loss
    is then a bound on -log P(k) in nats)."""

  def nll(self, params: Params, rng: Array, batch: dict) -> tuple[Array, Any]:
    """(nats [B], extras): per example an upper bound (in expectation) on the discrete -log P(k) of
    batch["image"] in nats, whatever `dequantized` says (a density on dequantised data folds in
    D log(K / 2): the return convention of `vdiff.likelihood`), and extras (a dict, or None)."""

  def eps_fn(self, params: Params, label: Array | None = None) -> Callable[[Array, Array], Array]:
    """The denoiser eps_fn(z [B, H, W, C], t [B]) -> eps_hat [B, H, W, C] of these parameters, label
    [B] (or None: unconditional) for a conditional model."""

  def sample(self, params: Params, rng: Array, num: int, *, num_steps: int = 256, label=None,
             guidance_weight: float = 0.0, sampler: str = "vdm_ancestral",
             eta: float = 0.0) -> Array:
    """Integer samples [num, H, W, C] in {0..K-1} with the named sampler (`Family.sample`)."""


PROTOCOL_MEMBERS = ("family_name", "native_estimator", "dequantized", "nfe_per_sample", "supports_ode",
                    "grid_steps", "data_shape", "num_levels", "num_labels", "num_dims", "init",
                    "schedule", "loss", "nll", "eps_fn", "sample")


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

  SAMPLERS = sampling.SAMPLERS
  CLIPPING_SAMPLERS = sampling.CLIPPING_SAMPLERS   # the samplers that take clip_x0

  @property
  def supported_samplers(self) -> tuple[str, ...]:
    """The `sample.sampler` values this family can sample with (checked before any sampling or training).

    Every sampler takes the family's denoiser and schedule; DiffEnc's encoder shift reaches all of them
    through `sampler_extras` (see `vdiff.sampling`).
    """
    return self.SAMPLERS

  def _check_supported(self, sampler: str) -> None:
    if sampler not in self.supported_samplers:
      raise ValueError(f"sample.sampler={sampler!r} is not supported by the "
                       f"{getattr(self, 'family_name', type(self).__name__)!r} family; "
                       f"expected one of {self.supported_samplers}.")

  def check_sample_args(self, sampler: str, clip_x0=None, *, num_steps: int = 256,
                        options: dict | None = None) -> None:
    """Refuse a sampler this family does not support, then clip_x0 or sampler options that the sampler
    cannot use (`vdiff.sampling.check`)."""
    self._check_supported(sampler)
    sampling.check(sampler, num_steps=num_steps, options=options, clip_x0=clip_x0)

  def sample(self, params, rng, num: int, *, num_steps: int = 256, label=None, guidance_weight=0.0,
             sampler: str = "vdm_ancestral", eta: float = 0.0, clip_x0: bool | None = None,
             options: dict | None = None, return_nfe: bool = False):
    """Integer samples [num, H, W, C] from the model's denoiser with the named sampler (`vdiff.sampling`).

    clip_x0: clip x0_hat to [-1, 1] in `ddpm` / `ddim`; None keeps each sampler's own default (DDPM
    clips, DDIM does not). options: the sampler-specific settings (`sampling.DEFAULT_OPTIONS`).
    return_nfe: also return the denoiser evaluations per sample. The sampler and its settings are
    checked before any sampling work (the family's support here, the rest in `sampling.draw`).
    """
    self._check_supported(sampler)
    eps_fn = self.guided_eps_fn(params, label, guidance_weight)
    samples, nfe = sampling.draw(sampler, rng, eps_fn, self.schedule(params), (num,) + self.data_shape,
                                 num_steps=num_steps, num_levels=self.num_levels, eta=eta, clip_x0=clip_x0,
                                 options=options, grid_steps=self.grid_steps, **self.sampler_extras())
    return (samples, nfe) if return_nfe else samples

  def sampler_extras(self) -> dict:
    """Keyword arguments every sampler receives from this family (DiffEnc: the encoder shift)."""
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
               antithetic: bool = True, p_uncond: float = 0.0, variance_minimization: bool = False,
               compute_dtype: str = "float32"):
    if compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"training.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                       f"got {compute_dtype!r}.")
    if variance_minimization and schedule.kind != "learned_pinned":
      raise ValueError("model.schedule.variance_minimization needs model.schedule.kind="
                       f"'learned_pinned' (endpoints and shape learned apart), got {schedule.kind!r}.")
    self.variance_minimization = variance_minimization
    self.data_shape = tuple(data_shape)
    self.num_levels = int(num_levels)
    self.num_labels = int(num_labels)
    self.schedule_spec = schedule
    if score_kwargs.get("fourier_damping"):
      # The network recovers sigma_t from g_norm with the range make_eps_fn normalises by (_eps_fn_for).
      score_kwargs = dict(score_kwargs, gamma_min=schedule.gamma_min, gamma_max=schedule.gamma_max)
    self.net = score_nets.ScoreUNet(num_labels=self.num_labels, **score_kwargs)
    # The training loss's network: the same parameters (float32), computed in compute_dtype. Evaluation,
    # likelihoods and sampling (train=False) always use the float32 `net`.
    self.compute_dtype = compute_dtype
    self.train_net = self.net.clone(dtype=COMPUTE_DTYPES[compute_dtype])
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
      net = self.train_net if train else self.net
      return net.apply({"params": params["score"]}, z, g_norm, lab, train=train, rngs=rngs)

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
    # Every sampler of vdiff.sampling models the encoder's mean shift.
    return {"encoder_shift": self.encoder_kind != "identity"}

  @property
  def supports_ode(self) -> bool:
    # The probability-flow ODE of docs/math.md sec. 5 transports the marginals of z_t = alpha_t x + sigma_t eps;
    # with an encoder the marginals are those of alpha_t x_t + sigma_t eps, whose flow has an extra drift
    # (d x_t / dt) that the ODE estimator does not model. Only the identity encoder qualifies.
    return self.encoder_kind == "identity"


class CDMFamily(Family):
  """Classification Diffusion Model (Yadin et al., arXiv:2402.10095): a noise-level classifier over the
  classes {0 (clean), 1..T, T+1 (pure noise)} of a class grid, trained with w_ce CE + MSE through its
  input gradient on uniformly dequantised data; its logits give log p(y) in one evaluation.

  grid (`cdm.class_grid`): "ddpm" (DDPM's linear betas beta_start..beta_end over beta_steps steps,
  resampled at T levels, so any T ends where that schedule ends), "uniform" (the paper's
  sqrt(1 - abar_t) = t / (T + 1), its likelihood grid: abar_T ~ 2 / T is not noise, so a sampler that
  starts from N(0, I) at class T starts from an approximation) or "schedule" (the fixed `schedule`
  sampled at t = i / T).

  The training loss is not a likelihood and `loss` returns no bits/dim term: the trainer's logged
  "bpd" of a CDM run is then its fallback, loss / (D ln 2), a scaled training loss. The model's bits/dim
  come from `nll` (the evaluation's one-step estimator, eval-mode network, no label dropout).
  """

  family_name = "cdm"
  native_estimator = "cdm"
  dequantized = True      # a density on dequantised data (nll folds in its D log(K / 2))
  nfe_per_sample = 1      # one classifier evaluation per image

  def __init__(self, *, data_shape, num_levels: int, num_labels: int = 0, num_steps: int = 1000,
               grid: str = "ddpm", beta_start: float = 1e-4, beta_end: float = 0.02,
               beta_steps: int = 1000, schedule: ScheduleSpec | None = None, w_ce: float = 1e-3,
               classifier_kwargs: dict | None = None, p_uncond: float = 0.0):
    self.data_shape = tuple(data_shape)
    self.num_levels = int(num_levels)
    self.num_labels = int(num_labels)
    self.num_steps = int(num_steps)
    self.w_ce = w_ce
    self.p_uncond = p_uncond
    if grid == "schedule" and (schedule is None or schedule.learned):
      raise ValueError("model.cdm.grid='schedule' needs a fixed schedule (model.schedule.kind one of "
                       f"{sorted(schedules_lib.FIXED)}), got "
                       f"{None if schedule is None else repr(schedule.kind)}.")
    self.grid = grid
    self.abar, self._schedule = cdm.class_grid(
        grid, self.num_steps, beta_start=beta_start, beta_end=beta_end, num_betas=beta_steps,
        schedule=schedule.bind({}) if grid == "schedule" else None)
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
    """The schedule through the class grid: `discrete_alpha2(T)` is abar_0..abar_T."""
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
    """(w_ce CE + MSE per example [B], {"ce", "mse"}): one classifier evaluation (and its gradients)."""
    r_lab, r_drop, r_deq, r_loss = jax.random.split(rng, 4)
    y = likelihood.dequantize(r_deq, batch["image"], self.num_levels)
    logits_fn = self.logits_fn(params, self._labels(r_lab, batch, train), train=train, rng=r_drop)
    return cdm.loss(r_loss, y, logits_fn, self.abar, w_ce=self.w_ce)

  DEQUANTIZATIONS = cdm.DEQUANTIZATIONS
  # The class of the forward-dequantised bound: None = cdm.forward_class(abar, K) (half a bin of noise).
  forward_class: int | None = None

  def nll(self, params, rng, batch, *, dequantization: str = "uniform", num_samples: int = 1):
    """One-step NLL (CDM Thm 3.2), one network evaluation per draw, conditioned on batch["label"] (the
    null label gives the unconditional density): `cdm.one_step_nll` with this family's class grid.

    dequantization="uniform": -log (1/m) sum_j p(y_j) + D log(K / 2) of m uniformly dequantised copies
      y_j (class 0, the data density).
    dequantization="forward": -log (1/m) sum_j p_t(z_j) p(k | z_j) / q(z_j | k), z_j ~ q(z | k) =
      N(sqrt(abar_t) x, (1 - abar_t) I), with p_t the density of class t = `cdm.forward_class(abar, K)`
      (Thm 3.2; class 1 unless its noise is below half a bin) and p(k | z) the K-level decoder at
      abar_t (`likelihood.forward_dequantization_bound`).
    Both are upper bounds on -log P(k) (bits/dim = `likelihood.nats_to_bpd(nats, D)`).
    Returns (nats [B], {"nfe": int32 [B]}).
    """
    if dequantization not in self.DEQUANTIZATIONS:
      raise ValueError(f"eval.dequantization must be one of {self.DEQUANTIZATIONS}, got "
                       f"{dequantization!r}.")
    logits_fn = self.logits_fn(params, self._labels(None, batch, train=False))
    return cdm.one_step_nll(rng, logits_fn, batch["image"], num_levels=self.num_levels,
                            dequantization=dequantization, num_samples=num_samples, abar=self.abar,
                            t=self.forward_class)


class DenoiserFamily(Family, abc.ABC):
  """Base class for a user's family: a denoiser network on a VDM schedule, trained on the negative ELBO.

  A subclass writes three things (see examples/own_network.py):

    init(self, rng) -> params      the network's parameters, e.g. {"net": ..., "schedule":
                                   self.schedule_spec.init(rng)} (the schedule entry holds a learned
                                   schedule's parameters; {} for a fixed one);
    eps_fn(self, params, label=None, *, train=False, rng=None) -> eps_fn(z, t)
                                   the network as a denoiser, usually through `vdm.make_eps_fn`;
    loss(self, params, rng, batch, *, train=True) -> (nats [B], terms)
                                   usually `vdm.negative_elbo` of `likelihood.encode(batch["image"])`
                                   with that eps_fn (docs/math.md sec. 2), or `self.negative_elbo`.

  It inherits the rest of `FamilyProtocol`: the schedule (`schedule_spec`, from model.schedule), `nll`
  (the one-sample negative ELBO, the loss with train=False: an upper bound on -log P(k), no
  dequantisation offset), every sampler and classifier-free guidance (`Family.sample`), the probability-
  flow ODE estimator, and `from_config`, which passes model.schedule, model.num_steps, model.antithetic,
  model.p_uncond and the entries of model.options to the constructor.
  """

  native_estimator = "elbo"
  dequantized = False
  nfe_per_sample = 1

  def __init__(self, *, data_shape, num_levels: int, num_labels: int = 0,
               schedule: ScheduleSpec | None = None, num_steps: int = 0, antithetic: bool = True,
               p_uncond: float = 0.0):
    self.data_shape = tuple(data_shape)
    self.num_levels = int(num_levels)
    self.num_labels = int(num_labels)
    self.schedule_spec = schedule if schedule is not None else ScheduleSpec()
    self.num_steps = int(num_steps) or None  # 0 = continuous time
    self.antithetic = antithetic
    self.p_uncond = p_uncond

  @property
  def family_name(self) -> str:
    return type(self).__name__

  @classmethod
  def from_config(cls, model_cfg, *, data_shape, num_levels: int, num_labels: int):
    """The family of the config's `model` sub-tree (num_labels: 0 unless model.conditional)."""
    s = model_cfg.schedule
    options = model_cfg.options.to_dict() if "options" in model_cfg else {}
    return cls(data_shape=data_shape, num_levels=num_levels, num_labels=num_labels,
               schedule=ScheduleSpec(s.kind, s.gamma_min, s.gamma_max), num_steps=model_cfg.num_steps,
               antithetic=model_cfg.antithetic, p_uncond=model_cfg.p_uncond, **options)

  def schedule(self, params) -> schedules_lib.Schedule:
    return self.schedule_spec.bind(params.get("schedule", {}) if self.schedule_spec.learned else {})

  # The three members a subclass writes; abstract, so that a family missing one is refused when it is
  # constructed (TypeError naming the method), not at its first use inside a jitted step.
  @abc.abstractmethod
  def init(self, rng) -> Params:
    """A new parameter pytree: the network's parameters and {"schedule": self.schedule_spec.init(rng)}."""

  @abc.abstractmethod
  def eps_fn(self, params, label=None, *, train: bool = False, rng=None):
    """The network as a denoiser eps_fn(z, t) (usually through `vdm.make_eps_fn`)."""

  @abc.abstractmethod
  def loss(self, params, rng, batch, *, train: bool = True):
    """(nats [B], terms): usually `return self.negative_elbo(params, rng, batch, train=train)`."""

  def negative_elbo(self, params, rng, batch, *, train: bool):
    """The VDM negative ELBO of the batch in nats, (nelbo [B], {prior, recon, diff: [B]}), with this
    family's eps_fn, schedule, label dropout (train=True) and time discretisation (docs/math.md sec. 2)."""
    r_lab, r_drop, r_elbo = jax.random.split(rng, 3)
    x = likelihood.encode(batch["image"], self.num_levels)
    labels = self._labels(r_lab, batch, train)
    eps_fn = self.eps_fn(params, labels, train=train, rng=r_drop)
    return vdm.negative_elbo(r_elbo, x, schedule=self.schedule(params), eps_fn=eps_fn,
                             num_levels=self.num_levels, num_steps=self.num_steps,
                             antithetic=self.antithetic)

  def nll(self, params, rng, batch):
    """One-sample negative ELBO in nats (the loss in evaluation mode): an upper bound on -log P(k)."""
    nats, _ = self.loss(params, rng, batch, train=False)
    return nats, None


FAMILIES: dict[str, Callable[..., Any]] = {
    "vdm": VDMFamily,
    "diffenc": DiffEncFamily,
    "cdm": CDMFamily,
}
_BUILTIN = {VDMFamily, DiffEncFamily, CDMFamily}  # unpacked from their config sections below


def register_family(name: str, cls):
  """Make `model.family = name` build `cls` (see `FamilyProtocol` for the constructor contract).

  Registration happens when the registering module is imported, so it serves programs that import it
  before calling `vdiff.train.train_and_evaluate`; on the command line name the class by its import path
  instead (`--config.model.family=mypkg.models:MyFamily`). Returns cls.
  """
  if not isinstance(name, str) or not name or ":" in name:
    raise ValueError(f"register_family: name must be a non-empty string without ':' (':' marks an "
                     f"import path), got {name!r}.")
  if not callable(cls):
    raise ValueError(f"register_family({name!r}, ...): expected a family class, got {cls!r}.")
  if FAMILIES.get(name, cls) is not cls:
    raise ValueError(f"register_family: model.family {name!r} is already {FAMILIES[name]!r}; choose "
                     "another name.")
  FAMILIES[name] = cls
  return cls


def resolve_family(name: str):
  """The family class that model.family names: a key of `FAMILIES` or "package.module:ClassName"."""
  if not isinstance(name, str):
    raise ValueError(f"model.family must be a string, got {name!r}.")
  if name in FAMILIES:
    return FAMILIES[name]
  expected = (f"expected one of {sorted(FAMILIES)} (or a name added by models.register_family) or an "
              "import path 'package.module:ClassName'")
  module_name, colon, attr = name.partition(":")
  if not colon:
    raise ValueError(f"unknown model.family {name!r}; {expected}.")
  if not module_name or not attr:
    raise ValueError(f"model.family {name!r} is not an import path; {expected}.")
  try:
    obj = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"model.family {name!r}: cannot import module {module_name!r} ({e}); run from the "
                     "directory that holds the package, add it to PYTHONPATH or install it.") from e
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise ValueError(f"model.family {name!r}: module {module_name!r} has no attribute {attr!r}.")
    obj = getattr(obj, part)
  if not callable(obj):
    raise ValueError(f"model.family {name!r}: {attr!r} is a {type(obj).__name__}, not a family class.")
  return obj


def _check_protocol(model, name: str):
  missing = [m for m in PROTOCOL_MEMBERS if not hasattr(model, m)]
  if missing:
    raise ValueError(f"model.family {name!r} built a {type(model).__name__} without {missing}, which "
                     "the trainer needs (see vdiff.models.FamilyProtocol; subclass DenoiserFamily).")
  return model


# training.compute_dtype -> the score network's computation dtype in the training loss (None: float32).
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def score_kwargs_from_config(cfg) -> dict:
  return dict(ch=cfg.ch, num_blocks=cfg.num_blocks, dropout=cfg.dropout, attention=cfg.attention,
              fourier_min=cfg.fourier_min, fourier_max=cfg.fourier_max, num_groups=cfg.num_groups,
              remat=bool(cfg.get("remat", False)),
              fourier_damping=bool(cfg.get("fourier_damping", False)))


def from_config(model_cfg, *, data_shape, num_levels: int, num_labels: int,
                compute_dtype: str = "float32"):
  """Build the family named by model_cfg.family from a config (the only place a config is unpacked).

  compute_dtype (training.compute_dtype) applies to the VDM and DiffEnc score network's training loss.
  """
  family = model_cfg.family
  cls = resolve_family(family)
  common = dict(data_shape=data_shape, num_levels=num_levels,
                num_labels=num_labels if model_cfg.conditional else 0)
  if compute_dtype != "float32" and cls not in (VDMFamily, DiffEncFamily):
    raise ValueError(f"training.compute_dtype={compute_dtype!r} applies to the 'vdm' and 'diffenc' "
                     f"families; model.family={family!r} trains in 'float32' only.")
  if cls not in _BUILTIN:
    if hasattr(cls, "from_config"):
      return _check_protocol(cls.from_config(model_cfg, **common), family)
    options = model_cfg.options.to_dict() if "options" in model_cfg else {}
    return _check_protocol(cls(**common, **options), family)
  if cls in (VDMFamily, DiffEncFamily):
    kw = dict(common, schedule=ScheduleSpec(model_cfg.schedule.kind, model_cfg.schedule.gamma_min,
                                            model_cfg.schedule.gamma_max),
              score_kwargs=score_kwargs_from_config(model_cfg.score),
              parameterization=model_cfg.parameterization, num_steps=model_cfg.num_steps,
              antithetic=model_cfg.antithetic, p_uncond=model_cfg.p_uncond,
              variance_minimization=model_cfg.schedule.variance_minimization,
              compute_dtype=compute_dtype)
    if cls is DiffEncFamily:
      e = model_cfg.encoder
      kw.update(encoder_kind=e.kind, encoder_kwargs=dict(
          ch=e.ch, ch_mult=tuple(e.ch_mult), num_res_blocks=e.num_res_blocks,
          attn_resolutions=tuple(e.attn_resolutions), num_groups=e.num_groups))
    return cls(**kw)
  c = model_cfg.cdm
  grid_schedule = None
  if c.grid == "schedule":
    s = model_cfg.schedule
    if s.kind not in schedules_lib.FIXED:
      raise ValueError("model.cdm.grid='schedule' samples model.schedule, which must then be fixed: "
                       f"model.schedule.kind one of {sorted(schedules_lib.FIXED)}, got {s.kind!r}.")
    grid_schedule = ScheduleSpec(s.kind, s.gamma_min, s.gamma_max)
  elif c.grid not in cdm.GRIDS:
    raise ValueError(f"unknown model.cdm.grid {c.grid!r}; expected one of {cdm.GRIDS}.")
  return CDMFamily(**common, num_steps=c.num_steps, grid=c.grid, beta_start=c.beta_start,
                   beta_end=c.beta_end, beta_steps=c.beta_steps, schedule=grid_schedule,
                   w_ce=c.w_ce, p_uncond=model_cfg.p_uncond, classifier_kwargs=dict(
                       ch=c.ch, ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks,
                       attn_resolutions=tuple(c.attn_resolutions), dropout=c.dropout,
                       num_groups=c.num_groups))
