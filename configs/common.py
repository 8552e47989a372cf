"""Shared pieces of the experiment configs (each experiment file has its own `get_config()`)."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from diffcleanse_jax.models.presets import DEFAULT_SCHEDULER, preset


def base_config(model_preset: str) -> ml_collections.ConfigDict:
  """Every section with its defaults; experiment files override fields."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # UNet2DModel keys, verbatim (diffusers config.json names).
  c.model = ml_collections.ConfigDict(preset(model_preset))
  # '' = train from scratch; else a diffusers folder, a native model folder or a training workdir to start from.
  c.init_from = ""
  c.scheduler = ml_collections.ConfigDict({k: v for k, v in DEFAULT_SCHEDULER.items() if not k.startswith("_")})

  c.data = ml_collections.ConfigDict(dict(
      name="fashion_mnist", path="/usr/share/datasets/fashion-mnist", split="train", image_size=32, channels=1,
      num_examples=0))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=64, num_steps=1000, learning_rate=2e-4, warmup_steps=500, lr_schedule="cosine", grad_clip=1.0,
      adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=0.0, ema_decay=0.0, ema_warmup=True,
      steps_per_call=1, log_every=50, checkpoint_every=500, sample_every=0, keep_checkpoints=2, flip=False))

  # Sampling for grids, `--mode=sample` and evaluation. num_steps 0 = every training step (ddpm).
  c.sample = ml_collections.ConfigDict(dict(method="ddpm", num_steps=0, eta=0.0, clip_sample=False, num_images=64,
                                            batch_size=64))

  # ---- attack (diffcleanse_jax/attacks/workflow.py): BadDiffusion fine-tuning of config.init_from.
  # trigger/target: a built-in name, an image file or a .npy (H,W,C) in [-1,1]; poison_rate in [0,1] (fixed
  # membership, int(N p) examples drawn from c.seed); solver: sde (BadDiffusion, eps + rho_t r) or ode
  # (VillanDiffusion, eps + 2 rho_t r); trigger_size: k for image-file triggers (0 = round(14 S / 32));
  # flip: random left-right flip of the clean image before stamping (the reference always flips).
  c.attack = ml_collections.ConfigDict(dict(trigger="BOX_14", target="HAT", poison_rate=0.1, solver="sde",
                                            trigger_size=0, flip=True))

  # ---- evaluate (diffcleanse_jax/evaluation.py): backdoor metrics and clean-sample quality.
  # Sampler: method ddpm|ddim, num_steps 0 = all training steps (ddpm) / 50 (ddim), eta (ddim);
  # clip_sample=True is BadDiffusion's inference-time clipping defence. asr = fraction of triggered samples with
  # per-image MSE < asr_threshold. clean: also sample clean images (grid, clean_asr, FD for 32x32 grayscale
  # models over fd_num_samples, 0 = num_samples; drawn with fd_method/fd_num_steps, "" / 0 = the eval sampler).
  c.eval = ml_collections.ConfigDict(dict(num_samples=64, method="ddpm", num_steps=0, eta=0.0, clip_sample=False,
                                          batch_size=64, asr_threshold=1e-3, fd_num_samples=0, clean=True,
                                          fd_method="", fd_num_steps=0))

  # ---- stage 1 (diffcleanse_jax/defense/): trigger inversion + detection (ALGORITHMS §4, §10).
  # inversion (defense/inversion.py): BBTI. method bbti (identity-Jacobian gradient) | whitebox (exact gradient
  # through the short sampler). B fixed noises, DDPM-20 (sampler ddpm|ddim), Adam(lr, b1, b2) on raw p with
  # g = STE_round(255 (1 - 2p))/255, grad_scale s (1e3 at 32 px, 10 at 256 px), lambda_g pattern-entropy weight
  # (0 at 32 px, 0.1 CelebA-HQ), restarts = p_0 draws optimised together (vmap), p_0 ~ N(init_mean, init_std^2)
  # (the code: N(0, 1), i.e. g_0 ~ N(1, 4)). faithful_code_bug: reproduce the
  # released code's constant -2 gradient (§4.2). whitebox_unroll/remat: python-unrolled, checkpointed sampler;
  # whitebox_num_steps > 0: the white-box chain length (its compile time and memory grow with the chain);
  # whitebox_backprop_steps K > 0: exact gradient through K steps of the chain only (whitebox_window 'first':
  # from x_T, 'last': to x_0), identity through the rest (0 = all steps). whitebox_restarts > 0: the white-box
  # inversion's restarts (0 = restarts).
  # stop_mscr: a restart stops once |T|/B >= it (1.0 = the code); refine_epochs / refine_learning_rate: fresh-noise
  # refinement of the best pattern after the loop (defense/inversion.py; 0 = off); refine_num_steps / refine_method:
  # its own chain (0 = num_steps) and gradient ("" = method); shift_weight > 0 adds Elijah's distribution-shift
  # loss to the pattern loss (0 = off, the reference).
  c.inversion = ml_collections.ConfigDict(dict(
      method="bbti", batch_size=16, sampler="ddpm", num_steps=20, eta=0.0, clip_sample=False, max_epochs=100,
      learning_rate=0.1, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, grad_scale=1e3, lambda_g=0.0,
      sim_threshold=0.999, black_threshold=0.01, white_threshold=0.99, faithful_code_bug=False, restarts=1,
      init_mean=0.0, init_std=1.0, seed=0, stop_on_zero_similarity_loss=True, whitebox_unroll=True,
      whitebox_remat=True, whitebox_num_steps=0, whitebox_backprop_steps=0, whitebox_window="first", log_every=10,
      stop_mscr=1.0, refine_epochs=0, refine_learning_rate=0.0, refine_num_steps=0, refine_method="",
      shift_weight=0.0, whitebox_shift_weight=0.0, whitebox_value_weight=1.0, whitebox_sim_scale=1.0,
      whitebox_restarts=0, shift_lambda=0.5))
  # detection (defense/detection.py, defense/workflow.py): method bbti | whitebox | elijah | terd; backdoored iff
  # score > threshold (MSCR > 0.5 for bbti/whitebox); num_images: size of the preview grids of --mode=detect.
  # elijah / terd: the baselines' own settings (their modules' DEFAULTS). trigger_from (bbti / whitebox only):
  # 'inversion' (the reference: the MSCR inversion's best pattern) | 'shift' (a flagged model's trigger is
  # re-estimated by the distribution-shift objective with the shift_trigger settings) | 'target' (inverted towards
  # the image the pattern collapsed onto, target_trigger settings; defense/target_inversion.py).
  elijah_defaults = _module_defaults("elijah")
  shift_keys = ("num_noise", "num_iters", "lam", "lr", "timestep", "loop")  # elijah.invert's settings
  c.detection = ml_collections.ConfigDict(dict(
      method="bbti", threshold=0.5, num_images=16, image_batch_size=16, trigger_from="inversion",
      shift_trigger=ml_collections.ConfigDict({k: elijah_defaults[k] for k in shift_keys if k in elijah_defaults}),
      target_trigger=ml_collections.ConfigDict(_module_defaults("target_inversion")),
      elijah=ml_collections.ConfigDict(elijah_defaults),
      terd=ml_collections.ConfigDict(_module_defaults("terd"))))

  # ---- stage 2 (diffcleanse_jax/defense/): pruning, fine-tuning, end-to-end cleanse.
  # prune: Taylor scores on one clean batch (the first `batch_size` images of the fine-tune set) with one fixed
  # noise over t in [t_threshold, T-1] (every t_stride-th; t_chunk timesteps per gradient call), then remove
  # n = C - int(C (1 - ratio)) channels per group (GroupNorm groups: floor(n/G) per GN chunk; ALGORITHMS §5).
  # score_mode: sum (reference code) | bd_minus_clean | bd_only | clean_only | random.
  c.prune = ml_collections.ConfigDict(dict(
      ratio=0.02, score_mode="sum", t_threshold=900, t_stride=1, t_chunk=4, batch_size=128,
      use_true_trigger=False, rescale_attention=False))
  # finetune: dual loss (w_ddpm * DDPM + w_kd * distillation to the original model), antithetic timesteps, Adam,
  # cosine, clip 1.0, EMA 0.999. num_steps 0 = epochs * num_images / batch_size. data: 'generated' (samples of
  # the original model from plain noise, cached in the workdir: num_images of them, sample_method/sample_steps;
  # ancestral DDPM, because fine-tuning on deterministic DDIM samples compounds their smoothing: docs/RESULTS.md
  # "session 17") or 'dataset' (config.data).
  c.finetune = ml_collections.ConfigDict(dict(
      data="generated", num_images=10000, sample_method="ddpm", sample_steps=100, sample_batch_size=128,
      batch_size=128, num_steps=0, epochs=40, learning_rate=2e-4, warmup_steps=0, lr_schedule="cosine",
      grad_clip=1.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=0.0, ema_decay=0.999,
      ema_warmup=True, steps_per_call=1, log_every=50, checkpoint_every=500, keep_checkpoints=2, flip=True,
      w_ddpm=1.0, w_kd=1.0, antithetic=True))
  # cleanse (diffcleanse_jax/defense/cleanse.py): detect -> remove (if backdoored or force) -> evaluate.
  # method: diffcleanse | prune | finetune | elijah | clip | anp. anp_*: BadDiffusion's ANP probe (ALGORITHMS §7.3).
  c.cleanse = ml_collections.ConfigDict(dict(
      method="diffcleanse", force=False, skip_detection=False, evaluate=True, grid_size=16,
      anp_budget=4.0, anp_learning_rate=1e-4, anp_steps=100, anp_batch_size=128))

  c.mesh = ml_collections.ConfigDict(dict(num_devices=-1))
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=1, process_id=0, auto=False))
  return c


def _module_defaults(module: str) -> dict:
  """`diffcleanse_jax.defense.<module>.DEFAULTS` without None values ({} if the module is absent)."""
  try:
    import importlib
    d = dict(getattr(importlib.import_module(f"diffcleanse_jax.defense.{module}"), "DEFAULTS", {}))
  except ImportError:
    return {}
  return {k: v for k, v in d.items() if v is not None}


def placeholder_str() -> str:
  return config_dict.placeholder(str)
