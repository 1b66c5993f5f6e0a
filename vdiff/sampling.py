"""Every sampler by name: the one entry point behind `sample.sampler` (the trainer, `--mode=sample`).

    draw(name, rng, eps_fn, schedule, shape, *, num_steps, options=None, ...) -> (samples, nfe)

name is one of `SAMPLERS` (`vdiff.config_schema.SAMPLERS`):

  vdm_ancestral, ddpm, ddim, ode   `vdiff.samplers` (num_steps: grid steps; ode: adaptive, nfe measured)
  dpm_solver, dpm_solver++         `vdiff.dpm_solver.dpm_solver` (num_steps: solver steps; options order,
                                   method, skip_type, thresholding)
  heun                             `vdiff.dpm_solver.heun` (num_steps: noise levels N, 2N - 1 evaluations)
  pc                               `vdiff.score_samplers.pc_sampler` (num_steps: N; options predictor,
                                   corrector, snr, corrector_steps)
  langevin                         `vdiff.score_samplers.annealed_langevin` (num_steps: noise levels L;
                                   options steps_per_level, step_size, sigma_min)

nfe is the number of eps_fn calls per sample (an int32 scalar inside jit; for `ode` the mean over the
batch of its per-example counts). `options` holds the sampler-specific settings (`options_from_config`
reads them from the config's `sample` section); keys a sampler does not use are ignored, so one config
serves every sampler. `settings_name` is the part of a sample file's name that records them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vdiff import checks
from vdiff import config_schema
from vdiff import dpm_solver as dpm_solver_lib
from vdiff import samplers
from vdiff import schedules as schedules_lib
from vdiff import score_samplers

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]

SAMPLERS = config_schema.SAMPLERS
CLIPPING_SAMPLERS = ("ddpm", "ddim")       # the samplers that take clip_x0
THRESHOLDING_SAMPLERS = ("dpm_solver++",)  # the sampler whose x0 prediction can be thresholded

# The sampler-specific options and their defaults (experiments/configs/base.py sets the same values).
DEFAULT_OPTIONS = {
    "order": 2, "method": "multistep", "skip_type": "logSNR", "thresholding": False,      # dpm_solver
    "predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16, "corrector_steps": 1,  # pc
    "steps_per_level": 5, "step_size": 2e-5, "sigma_min": 0.01,                           # langevin
}


def options_from_config(sample_cfg) -> dict:
  """The sampler-specific options of a config's `sample` section (`DEFAULT_OPTIONS` where absent: a
  work directory written before the option existed)."""
  return {k: sample_cfg.get(k, v) for k, v in DEFAULT_OPTIONS.items()}


def _options(options: dict | None) -> dict:
  opts = dict(DEFAULT_OPTIONS)
  if options:
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
      raise ValueError(f"unknown sampler options {unknown}; expected keys of {sorted(DEFAULT_OPTIONS)}.")
    opts.update(options)
  return opts


def check(name: str, *, num_steps: int, options: dict | None = None, clip_x0=None) -> None:
  """Refuse, naming the argument, an unknown sampler (with the nearest name), options out of range, a
  step count below the solver's order, clip_x0 or thresholding for a sampler without it: before any
  compute (the samplers check the same again when called)."""
  dpm_solver_lib.check_choice(name, SAMPLERS, "sample.sampler")
  opts = _options(options)
  checks.positive_int(num_steps, "sample.num_steps")
  if clip_x0 is not None and not isinstance(clip_x0, (bool, np.bool_)):
    raise ValueError(f"sample.clip_x0 must be None (the sampler's default), True or False, got {clip_x0!r}.")
  if clip_x0 is not None and name not in CLIPPING_SAMPLERS:
    raise ValueError(f"sample.clip_x0={clip_x0} applies to the samplers {CLIPPING_SAMPLERS}, not to "
                     f"{name!r} (its generative process never clips); leave it None.")
  if name in ("dpm_solver", "dpm_solver++"):
    if opts["order"] not in (1, 2, 3):
      raise ValueError(f"sample.order must be 1, 2 or 3, got {opts['order']!r}.")
    dpm_solver_lib.check_choice(opts["method"], dpm_solver_lib.METHODS, "sample.method")
    dpm_solver_lib.check_choice(opts["skip_type"], dpm_solver_lib.SKIP_TYPES, "sample.skip_type")
    if opts["method"] != "multistep" and num_steps < opts["order"]:
      raise ValueError(f"sample.num_steps={num_steps} is below sample.order={opts['order']} of the "
                       f"{opts['method']} solver; use num_steps >= order.")
  if opts["thresholding"] and name not in THRESHOLDING_SAMPLERS:
    raise ValueError(f"sample.thresholding=True applies to {THRESHOLDING_SAMPLERS} (x0 prediction), not to "
                     f"{name!r}.")
  if name == "heun" and num_steps < 2:
    raise ValueError(f"sample.num_steps must be >= 2 for heun (second order), got {num_steps}.")
  if name == "pc":
    dpm_solver_lib.check_choice(opts["predictor"], score_samplers.PREDICTORS, "sample.predictor")
    dpm_solver_lib.check_choice(opts["corrector"], score_samplers.CORRECTORS, "sample.corrector")
    dpm_solver_lib.check_positive(opts["snr"], "sample.snr")
    checks.positive_int(opts["corrector_steps"], "sample.corrector_steps")
    if opts["predictor"] == "none" and opts["corrector"] == "none":
      raise ValueError("sample.predictor and sample.corrector are both 'none': the pc sampler would not move.")
  if name == "langevin":
    checks.positive_int(opts["steps_per_level"], "sample.steps_per_level")
    dpm_solver_lib.check_positive(opts["step_size"], "sample.step_size")
    dpm_solver_lib.check_positive(opts["sigma_min"], "sample.sigma_min")


def settings_name(name: str, *, num_steps: int, eta: float = 0.0, guidance_weight: float = 0.0,
                  options: dict | None = None) -> str:
  """<sampler>_n<num_steps>_<its settings>_w<guidance_weight>: a sample file's record of how it was drawn.

  vdm_ancestral / ddpm / ddim / ode keep their earlier names (..._eta<eta>_w<w>); the others name
  their own options (dpm_solver++_n20_o2_multistep_logSNR_w0, pc_n100_reverse_diffusion_langevin_snr0.16_c1_w0,
  langevin_n100_s5_lr2e-05_sig0.01_w0, heun_n10_w0)."""
  o = _options(options)
  head = f"{name}_n{int(num_steps)}"
  if name in ("dpm_solver", "dpm_solver++"):
    mid = f"_o{int(o['order'])}_{o['method']}_{o['skip_type']}" + ("_thr" if o["thresholding"] else "")
  elif name == "pc":
    mid = f"_{o['predictor']}_{o['corrector']}"
    if o["corrector"] != "none":
      mid += f"_snr{float(o['snr']):g}_c{int(o['corrector_steps'])}"
  elif name == "langevin":
    mid = f"_s{int(o['steps_per_level'])}_lr{float(o['step_size']):g}_sig{float(o['sigma_min']):g}"
  elif name == "heun":
    mid = ""
  else:
    mid = f"_eta{float(eta):g}"
  return f"{head}{mid}_w{float(guidance_weight):g}"


def _langevin_sigma_min(schedule: schedules_lib.Schedule, sigma_min: float) -> Array:
  """sigma_L: `sigma_min`, raised to the schedule's smallest VE level exp(gamma(0) / 2) where that is larger
  (annealed Langevin's levels must lie inside the schedule; a learned schedule's is known only in jit)."""
  return jnp.maximum(jnp.float32(sigma_min), jnp.exp(0.5 * schedule.gamma(jnp.float32(0.0))) * (1 + 1e-5))


def draw(name: str, rng: Array, eps_fn: EpsFn, schedule: schedules_lib.Schedule, shape: Sequence[int], *,
         num_steps: int, num_levels: int | None = None, eta: float = 0.0, clip_x0: bool | None = None,
         options: dict | None = None, grid_steps: int = 1000, encoder_shift: bool = False) -> tuple[Any, Array]:
  """Samples [B, ...] (int32 levels with num_levels, else float32 x-space) and the NFE per sample.

  Args:
    name: one of `SAMPLERS` (module docstring).
    rng: PRNG key.
    eps_fn: the denoiser eps_fn(z, t) (classifier-free guidance: `samplers.classifier_free_guidance`).
    schedule: the noise schedule.
    shape: (B, ...).
    num_steps: the sampler's step count (module docstring: steps, solver steps or noise levels).
    num_levels: K; if given, decode to int32 levels.
    eta: DDIM's eta.
    clip_x0: ddpm / ddim: clip x0_hat to [-1, 1]; None keeps the sampler's default.
    options: sampler-specific settings (`DEFAULT_OPTIONS` keys).
    grid_steps: DDIM's underlying grid (max(grid_steps, num_steps) is used).
    encoder_shift: DiffEnc's encoded process (every sampler models it; see each sampler).
  Returns:
    (samples, nfe).
  """
  check(name, num_steps=num_steps, options=options, clip_x0=clip_x0)
  o = _options(options)
  common = dict(num_levels=num_levels, encoder_shift=encoder_shift)
  clip = {} if clip_x0 is None else {"clip_x0": bool(clip_x0)}
  if name == "vdm_ancestral":
    return samplers.vdm_ancestral(rng, eps_fn, schedule, shape, num_steps=num_steps, **common), num_steps
  if name == "ddpm":
    return samplers.ddpm(rng, eps_fn, schedule, shape, num_steps=num_steps, **clip, **common), num_steps
  if name == "ddim":
    return samplers.ddim(rng, eps_fn, schedule, shape, num_steps=num_steps, eta=eta,
                         grid_steps=max(grid_steps, num_steps), **clip, **common), num_steps
  if name == "ode":
    x, nfe = samplers.probability_flow_sample(rng, eps_fn, schedule, shape, return_nfe=True, **common)
    return x, jnp.mean(nfe.astype(jnp.float32))
  if name in ("dpm_solver", "dpm_solver++"):
    out = dpm_solver_lib.dpm_solver(rng, eps_fn, schedule, shape, num_steps=num_steps, order=o["order"],
                                    algorithm=name, method=o["method"], skip_type=o["skip_type"],
                                    thresholding=bool(o["thresholding"]), **common)
  elif name == "heun":
    out = dpm_solver_lib.heun(rng, eps_fn, schedule, shape, num_steps=num_steps, **common)
  elif name == "pc":
    out = score_samplers.pc_sampler(rng, eps_fn, schedule, shape, num_steps=num_steps,
                                    predictor=o["predictor"], corrector=o["corrector"], snr=o["snr"],
                                    corrector_steps=o["corrector_steps"], **common)
  else:  # langevin
    out = score_samplers.annealed_langevin(rng, eps_fn, schedule, shape, num_noise_levels=num_steps,
                                           steps_per_level=o["steps_per_level"], step_size=o["step_size"],
                                           sigma_min=_langevin_sigma_min(schedule, o["sigma_min"]), **common)
  return out.samples, out.nfe
