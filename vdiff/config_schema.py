"""Every config key's declared type and range, in one table, and the check of a config against it.

The config itself is experiments/configs/base.py (its defaults) plus one file per experiment; this
table says, for each of its keys, what values a run can use. `errors(config)` checks every key of a
config against the table in one pass, before any compute, and returns one line per bad key naming the
key, the value and the range (the trainer's `validate_config` raises them together); `describe()` is the
table as text (`python -m experiments.main --help` prints it). Checks that relate several keys (a batch
size against the device count, gamma_min < gamma_max, an estimator against the family) stay in
`vdiff.train.validate_config` and `vdiff.evaluate.Settings`, after the table has passed.

A key in a config but not in the table is an error too (tests/test_config_schema.py checks that every
key of every config file is declared), except below the free-form sections of `FREE_SECTIONS` (a user
family's `model.options`) and a data source's own options (`data.patch_size`, ...), declared here too.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

# Names the trainer and evaluator accept (the modules that act on them check the same tuples).
FAMILIES_BUILTIN = ("vdm", "diffenc", "cdm")
PARAMETERIZATIONS = ("eps", "v")
SCHEDULE_KINDS = ("linear", "cosine", "learned_scalar", "learned_net", "learned_pinned")
ENCODER_KINDS = ("identity", "nontrainable", "trainable")
CDM_GRIDS = ("ddpm", "uniform", "schedule")
LR_SCHEDULES = ("constant", "cosine")
NAN_POLICIES = ("skip", "stop")
COMPUTE_DTYPES = ("float32", "bfloat16")
ESTIMATORS = ("elbo", "cdm", "ode")
DEQUANTIZATIONS = ("uniform", "forward")
DIVERGENCES = ("hutchinson", "exact")
PRECISIONS = ("default", "high", "highest")
CONDITIONS = ("label", "none")
PARAMS = ("ema", "raw")
SAMPLERS = ("vdm_ancestral", "ddpm", "ddim", "ode", "dpm_solver", "dpm_solver++", "heun", "pc", "langevin")
DPM_ALGORITHMS = ("dpm_solver", "dpm_solver++")
DPM_METHODS = ("multistep", "singlestep", "singlestep_fixed")
DPM_SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
PC_PREDICTORS = ("reverse_diffusion", "euler_maruyama", "ancestral", "none")
PC_CORRECTORS = ("langevin", "none")

FREE_SECTIONS = ("model.options",)
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Key:
  """One key's declared values.

  kind: "int" | "float" | "bool" | "str" | "choice" | "ints" (a tuple of ints) | "bool_or_none".
  lo, hi: the bounds of an int or float (None: unbounded); lo_open / hi_open exclude the bound.
  For "ints", the bounds apply to every element. choices: the names of a "choice".
  """

  kind: str
  doc: str
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  choices: tuple[str, ...] = ()
  nonempty: bool = False

  def range_text(self) -> str:
    """The declared values in words: "an integer >= 1", "a finite number in [0, 1)", "one of (...)"."""
    if self.kind == "choice":
      return f"one of {self.choices}"
    if self.kind == "bool":
      return "True or False"
    if self.kind == "bool_or_none":
      return "None, True or False"
    if self.kind == "str":
      return "a non-empty string" if self.nonempty else "a string"
    what = {"int": "an integer", "float": "a finite number", "ints": "a tuple of integers, each"}[self.kind]
    bounds = self._bounds_text()
    return f"{what} {bounds}" if bounds else what

  def _bounds_text(self) -> str:
    fmt = (lambda v: str(int(v))) if self.kind in ("int", "ints") else (lambda v: f"{v:g}")
    if self.lo is None and self.hi is None:
      return ""
    if self.hi is None:
      return f"{'>' if self.lo_open else '>='} {fmt(self.lo)}"
    if self.lo is None:
      return f"{'<' if self.hi_open else '<='} {fmt(self.hi)}"
    return (f"in {'(' if self.lo_open else '['}{fmt(self.lo)}, {fmt(self.hi)}"
            f"{')' if self.hi_open else ']'}")

  def problem(self, value: Any) -> str | None:
    """None if `value` is allowed, else the refusal without the key's name: "must be ..., got ..."."""
    k = self.kind
    if k == "float" and isinstance(value, float) and not math.isfinite(value):
      return f"must be finite, got {value}"
    if k == "choice" and value not in self.choices:
      close = difflib.get_close_matches(str(value), self.choices, n=1)
      return (f"must be one of {self.choices}, got {value!r}"
              + (f" (did you mean {close[0]!r}?)" if close else ""))
    if self._allowed(value):
      return None
    if k in ("int", "float") and self._is_number(value):  # the right type, out of bounds
      return f"must be {self._bounds_text()}, got {value!r}"
    return f"must be {self.range_text()}, got {value!r}"

  def _is_number(self, value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float) if self.kind == "float" else int)

  def _allowed(self, value: Any) -> bool:
    k = self.kind
    if k == "bool":
      return isinstance(value, bool)
    if k == "bool_or_none":
      return value is None or isinstance(value, bool)
    if k == "str":
      return isinstance(value, str) and bool(value.strip() or not self.nonempty)
    if k == "choice":
      return value in self.choices
    if k == "ints":
      return isinstance(value, (list, tuple)) and all(
          isinstance(v, int) and not isinstance(v, bool) and not self._out_of_range(v) for v in value)
    return self._is_number(value) and not self._out_of_range(value)

  def _out_of_range(self, v) -> bool:
    if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
      return True
    return self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi)


def _int(doc, lo=None, hi=None):
  return Key("int", doc, lo=lo, hi=hi)


def _float(doc, lo=None, hi=None, *, lo_open=False, hi_open=False):
  return Key("float", doc, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)


def _choice(doc, choices):
  return Key("choice", doc, choices=tuple(choices))


def _bool(doc):
  return Key("bool", doc)


_GAMMA = 30.0  # |gamma| beyond this is alpha^2 or sigma^2 below float32's 1e-13: no usable schedule

SCHEMA: dict[str, Key] = {
    "seed": _int("seed of the initialisation, the data order and every random draw", 0, _INT32_MAX - 1),
    "data.name": Key("str", "digits | mnist | cifar10 | downsampled_imagenet/32x32 | npz | photos | "
                     "gaussian_mixture | uniform | any tfds name", nonempty=True),
    "data.data_dir": Key("str", "tfds data_dir"),
    "data.path": Key("str", "the .npz file of data.name=npz"),
    "data.random_flip": _bool("random horizontal flips of the training images"),
    "data.patch_size": _int("photos: the side of the square patches", 1, 4096),
    "data.patch_stride": _int("photos: the stride between patches", 1, 4096),
    "model.family": Key("str", "vdm | diffenc | cdm | a registered name | package.module:ClassName",
                        nonempty=True),
    "model.parameterization": _choice("what the score network predicts", PARAMETERIZATIONS),
    "model.num_steps": _int("T of the diffusion loss; 0 = continuous time", 0, 10**7),
    "model.antithetic": _bool("stratified time sampling over the global batch"),
    "model.conditional": _bool("condition on the class label (classifier-free guidance)"),
    "model.p_uncond": _float("label dropout probability of a conditional model", 0.0, 1.0, hi_open=True),
    "model.schedule.kind": _choice("the noise schedule gamma(t)", SCHEDULE_KINDS),
    "model.schedule.gamma_min": _float("gamma(0) (must be < gamma_max)", -_GAMMA, _GAMMA),
    "model.schedule.gamma_max": _float("gamma(1)", -_GAMMA, _GAMMA),
    "model.schedule.variance_minimization": _bool("learned_pinned: learn the shape by minimising "
                                                  "Var[L_diff]"),
    "model.score.ch": _int("channels of the score network", 1, 8192),
    "model.score.num_blocks": _int("ResNet blocks of the score network", 1, 1024),
    "model.score.dropout": _float("dropout rate", 0.0, 1.0, hi_open=True),
    "model.score.attention": _bool("attention in the score network"),
    "model.score.fourier_min": _int("lowest Fourier feature exponent", 0, 30),
    "model.score.fourier_max": _int("highest Fourier feature exponent (>= fourier_min)", 0, 30),
    "model.score.fourier_damping": _bool("damp the Fourier features by exp(-w^2 sigma_t^2 / 2)"),
    "model.score.num_groups": _int("GroupNorm groups (must divide ch)", 1, 8192),
    "model.score.remat": _bool("rematerialise the ResNet blocks in the backward pass"),
    "model.encoder.kind": _choice("the DiffEnc encoder", ENCODER_KINDS),
    "model.encoder.ch": _int("encoder channels", 1, 8192),
    "model.encoder.ch_mult": Key("ints", "encoder channel multipliers per resolution", lo=1, hi=64),
    "model.encoder.num_res_blocks": _int("encoder ResNet blocks per resolution", 1, 64),
    "model.encoder.attn_resolutions": Key("ints", "resolutions with attention in the encoder", lo=1,
                                          hi=4096),
    "model.encoder.num_groups": _int("encoder GroupNorm groups", 1, 8192),
    "model.cdm.num_steps": _int("T of the CDM: classes 0..T+1", 1, 100_000),
    "model.cdm.grid": _choice("the CDM class grid", CDM_GRIDS),
    "model.cdm.beta_start": _float("ddpm grid: the first beta", 0.0, 1.0, lo_open=True, hi_open=True),
    "model.cdm.beta_end": _float("ddpm grid: the last beta (>= beta_start)", 0.0, 1.0, lo_open=True,
                                 hi_open=True),
    "model.cdm.beta_steps": _int("ddpm grid: the number of DDPM steps the betas span", 2, 10**6),
    "model.cdm.w_ce": _float("weight of the classifier's cross-entropy", 0.0, None),
    "model.cdm.ch": _int("classifier channels", 1, 8192),
    "model.cdm.ch_mult": Key("ints", "classifier channel multipliers per resolution", lo=1, hi=64),
    "model.cdm.num_res_blocks": _int("classifier ResNet blocks per resolution", 1, 64),
    "model.cdm.attn_resolutions": Key("ints", "resolutions with attention in the classifier", lo=1,
                                      hi=4096),
    "model.cdm.dropout": _float("classifier dropout rate", 0.0, 1.0, hi_open=True),
    "model.cdm.num_groups": _int("classifier GroupNorm groups", 1, 8192),
    "optim.learning_rate": _float("peak learning rate", 0.0, 10.0, lo_open=True),
    "optim.warmup_steps": _int("linear warm-up steps", 0, None),
    "optim.b1": _float("Adam's first-moment decay", 0.0, 1.0, hi_open=True),
    "optim.b2": _float("Adam's second-moment decay", 0.0, 1.0, hi_open=True),
    "optim.eps": _float("Adam's epsilon", 0.0, 1.0),
    "optim.weight_decay": _float("decoupled weight decay", 0.0, None),
    "optim.grad_clip": _float("global gradient-norm clip; 0 = none", 0.0, None),
    "optim.lr_schedule": _choice("learning-rate schedule after the warm-up", LR_SCHEDULES),
    "training.batch_size": _int("global batch size", 1),
    "training.num_steps": _int("optimisation steps", 0),
    "training.steps_per_dispatch": _int("steps per jit dispatch (lax.scan); divides num_steps", 1),
    "training.ema_decay": _float("EMA decay", 0.0, 1.0, hi_open=True),
    "training.ema_warmup": _bool("EMA decay min(ema_decay, (1 + n) / (10 + n))"),
    "training.log_every": _int("steps between metrics rows", 1, None),
    "training.eval_every": _int("steps between evaluations; 0 = only at the end", 0, None),
    "training.checkpoint_every": _int("steps between checkpoints; 0 = only at the end", 0, None),
    "training.sample_every": _int("steps between sample grids; 0 = only at the end", 0, None),
    "training.max_checkpoints_to_keep": _int("checkpoints kept (the newest always is)", 1),
    "training.async_checkpointing": _bool("save checkpoints in the background"),
    "training.nan_policy": _choice("what a non-finite step does", NAN_POLICIES),
    "training.compute_dtype": _choice("the training loss's activations and matmuls", COMPUTE_DTYPES),
    "training.inject_nan_at_step": _int("testing switch: that step's loss is NaN; -1 = none", -1, None),
    "training.allow_config_change": _bool("resume even if a guarded key changed"),
    "eval.split": Key("str", "the evaluated split", nonempty=True),
    "eval.batch_size": _int("global evaluation batch", 1),
    "eval.num_examples": _int("examples evaluated; 0 = the whole split", 0, None),
    "eval.estimator": _choice("the NLL estimator", ESTIMATORS),
    "eval.num_time_samples": _int("ELBO: Monte-Carlo time draws per image", 1),
    "eval.params": _choice("the parameters evaluations use", PARAMS),
    "eval.dequantization": _choice("cdm / ode: dequantisation", DEQUANTIZATIONS),
    "eval.num_dequantization_samples": _int("cdm / ode: importance samples per image", 1),
    "eval.ode_t0": _float("forward dequantisation of the ODE: time of z", 0.0, 1.0, hi_open=True),
    "eval.ode_rtol": _float("ODE relative tolerance", 0.0, 1.0, lo_open=True),
    "eval.ode_atol": _float("ODE absolute tolerance", 0.0, 1.0, lo_open=True),
    "eval.ode_divergence": _choice("ODE divergence", DIVERGENCES),
    "eval.precision": _choice("matmul/conv precision of the evaluation", PRECISIONS),
    "eval.condition": _choice("conditional models: -log p(x | c) or -log p(x)", CONDITIONS),
    "sample.sampler": _choice("the sampler", SAMPLERS),
    "sample.num_steps": _int("sampler steps", 1),
    "sample.eta": _float("DDIM's eta (0 deterministic, 1 DDPM-like)", 0.0, 1.0),
    "sample.clip_x0": Key("bool_or_none", "ddpm / ddim: clip x0_hat to [-1, 1]; None = the sampler's "
                          "default"),
    "sample.guidance_weight": _float("classifier-free guidance weight w (-1 = unconditional)", -1.0,
                                     1000.0),
    "sample.label": _int("class to sample when conditional; -1 = unconditional", -1, None),
    "sample.num_samples": _int("samples drawn", 0),
    "sample.params": _choice("the parameters --mode=sample uses", PARAMS),
    "sample.order": _int("dpm_solver / dpm_solver++: the solver's order", 1, 3),
    "sample.method": _choice("dpm_solver / dpm_solver++: multistep or singlestep", DPM_METHODS),
    "sample.skip_type": _choice("dpm_solver / dpm_solver++: the time grid", DPM_SKIP_TYPES),
    "sample.thresholding": Key("bool", "dpm_solver++: dynamic thresholding of x0_hat"),
    "sample.predictor": _choice("pc: the predictor", PC_PREDICTORS),
    "sample.corrector": _choice("pc: the corrector", PC_CORRECTORS),
    "sample.snr": _float("pc: the Langevin corrector's signal-to-noise ratio", 0.0, None, lo_open=True),
    "sample.corrector_steps": _int("pc: corrector steps per noise level", 1),
    "sample.steps_per_level": _int("langevin: Langevin steps per noise level", 1),
    "sample.step_size": _float("langevin: the step size at the smallest noise level", 0.0, None,
                               lo_open=True),
    "sample.sigma_min": _float("langevin: the smallest noise level (raised to the schedule's smallest)",
                               0.0, None, lo_open=True),
}


def flatten(config) -> dict[str, Any]:
  """{dotted key: value} of a ConfigDict or dict (tuples and lists are values, not sections)."""
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      key = f"{prefix}{k}"
      if hasattr(v, "items"):
        if key in FREE_SECTIONS:
          continue
        walk(v, key + ".")
      else:
        out[key] = v

  walk(config, "")
  return out


def errors(config) -> list[str]:
  """One line per key of `config` whose value is outside its declared range, or that the table lacks:
  "KEY must be RANGE, got VALUE"."""
  out = []
  for key, value in flatten(config).items():
    spec = SCHEMA.get(key)
    if spec is None:
      close = difflib.get_close_matches(key, SCHEMA, n=1)
      out.append(f"{key} is not a declared config key (vdiff.config_schema.SCHEMA)"
                 + (f"; did you mean {close[0]!r}?" if close else ""))
      continue
    problem = spec.problem(value)
    if problem:
      out.append(f"{key} {problem}")
  return out


def describe(defaults=None) -> str:
  """The table as text: key, range, default (from `defaults`, a config, if given) and meaning."""
  flat = flatten(defaults) if defaults is not None else {}
  lines = []
  for key, spec in SCHEMA.items():
    default = f" (default {flat[key]!r})" if key in flat else ""
    lines.append(f"  {key}: {spec.range_text()}{default}. {spec.doc}.")
  return "\n".join(lines)
