"""The evaluation protocol's settings (`config.eval`): validation and the samplers they name.

Shared by `diffcleanse_jax.evaluation` (the evaluate mode) and `defense.cleanse.local_evaluate_model` (the
cleanse's dependency-free evaluation), so both draw the backdoor and FD samples with the same samplers. The fields
and what they measure: the `diffcleanse_jax.evaluation` module docstring.
"""
from __future__ import annotations

from typing import Any, Mapping

from diffcleanse_jax.diffusion import samplers

EVAL_DEFAULTS: dict[str, Any] = dict(num_samples=64, method="ddpm", num_steps=0, eta=0.0, clip_sample=False,
                                     batch_size=64, asr_threshold=1e-3, fd_num_samples=0, clean=True,
                                     fd_method="", fd_num_steps=0)
FD_METHODS = ("", "ddpm", "ddim")


def eval_settings(cfg_eval: Mapping[str, Any] | Any | None) -> dict[str, Any]:
  """`config.eval` (ConfigDict or mapping, missing fields take EVAL_DEFAULTS) -> validated plain dict."""
  d = dict(EVAL_DEFAULTS)
  if cfg_eval is not None:
    given = cfg_eval.to_dict() if hasattr(cfg_eval, "to_dict") else dict(cfg_eval)
    bad = sorted(set(given) - set(EVAL_DEFAULTS))
    if bad:
      raise ValueError(f"config.eval: unknown field {bad[0]!r}; valid fields: {', '.join(sorted(EVAL_DEFAULTS))}")
    d.update(given)
  for k in ("num_samples", "batch_size"):
    if int(d[k]) < 1:
      raise ValueError(f"config.eval.{k}={d[k]} must be >= 1")
  if d["fd_method"] not in FD_METHODS:
    raise ValueError(f"config.eval.fd_method={d['fd_method']!r}; expected one of {FD_METHODS} ('' = eval.method)")
  for k in ("num_steps", "fd_num_samples", "fd_num_steps"):
    if int(d[k]) < 0:
      raise ValueError(f"config.eval.{k}={d[k]} must be >= 0 (0 = default)")
  if not float(d["asr_threshold"]) > 0:
    raise ValueError(f"config.eval.asr_threshold={d['asr_threshold']} must be > 0")
  return d


def eval_sampler_config(model, cfg_eval: Mapping[str, Any] | Any | None,
                        fd: bool = False) -> samplers.SamplerConfig:
  """The evaluation sampler of `model` (anything with a `scheduler_config`): `config.eval`
  method/num_steps/eta/clip_sample over the model's scheduler defaults.
  fd=True: the FD samples' sampler (`fd_method`/`fd_num_steps` where set; a new method with fd_num_steps 0 takes
  that method's default steps)."""
  e = eval_settings(cfg_eval)
  method, steps = str(e["method"]), int(e["num_steps"])
  if fd and e["fd_method"] and e["fd_method"] != method:
    method, steps = str(e["fd_method"]), 0
  if fd and int(e["fd_num_steps"]):
    steps = int(e["fd_num_steps"])
  return samplers.SamplerConfig.from_scheduler_config(
      model.scheduler_config, method=method, num_steps=steps or None, eta=float(e["eta"]),
      clip_sample=bool(e["clip_sample"]))
