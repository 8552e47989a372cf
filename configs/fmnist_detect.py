"""Diff-Cleanse stage 1 (BBTI detection) for the Fashion-MNIST 32x32 CPU models.

  python launch.py --config=configs/fmnist_detect.py --mode=detect --model=runs/attack --workdir=runs/detect
  python launch.py --config=configs/fmnist_detect.py --mode=detect --model=runs/fmnist --workdir=runs/detect_clean
  python launch.py --config=configs/fmnist_detect.py --mode=detect --model=runs/attack --workdir=runs/detect_wb \
      --config.detection.method=whitebox
  python launch.py --config=configs/fmnist_detect.py --mode=scan --models_dir=runs/zoo/models --workdir=runs/scan

The base is the paper/code defaults (ALGORITHMS §4.1, §10): B = 16 fixed noises, DDPM-20, Adam lr 0.1 on p, grad
scale 1e3 (32 px), lambda_g = 0, at most 100 epochs, backdoored iff MSCR > 0.5. The Fashion-MNIST deviations
from it are listed below. `--config.inversion.faithful_code_bug`
reproduces the released code's gradient bug (§4.2); `--config.inversion.restarts=R` optimises R p_0 draws at once.

White-box gradient through DDPM-20 on this 0.69M-parameter UNet (B = 16, 2 shared CPU cores, load ~5; first
call = compile + one epoch, then seconds per epoch): unrolled, no remat 112 s / 4.1 s; unrolled + jax.checkpoint
160 s / 6.5 s; lax.scan + checkpoint 44 s / 23 s; lax.scan 44 s / 24 s. BBTI (forward scan) 10 s / 1.3 s.
Activations of 20 unrolled steps are small at this size, so remat is off here (keep it on for big UNets).

Fashion-MNIST deviations from the reference defaults (chosen on one pilot pair: clean runs/fm1 and a weak
BadDiffusion BOX_14 -> HAT model whose backdoor fires with DDPM-1000 but gives black images under DDPM-20):
* init_mean = 0.5 (p_0 ~ N(0.5, 1), so g_0 = 1 - 2 p_0 is centred on 0): the reference's g_0 ~ N(1, 4) drives every
  output of these models to black at epoch 0 (all excluded, L_s = 0, the run stops with MSCR 0);
* num_steps = 50 (DDPM-50): the backdoor needs a longer chain than DDPM-20 to fire. On the first pilot: true-trigger
  MSCR 0 / 0.31 / 0.5 at DDPM-20 / 100 / 1000, backdoored pilot MSCR 0.4375 (DDPM-20) and 0.75 (DDPM-100,
  flagged), clean fm1 0 with both; sessions 4-10 used DDPM-100. DDPM-50 halves the epoch (the 2-minute target of
  issue 4; idle `--mode=detect` wall time 48 s on a clean model, 41 s on the demo, against 398 s / 183 s before).
  The true trigger's MSCR on the fixed batch (benchmarks/chain_mscr.py) is 0 at DDPM-20/25 and 1.0 at DDPM-50/100
  on the demo (tests/test_examples.py pins it) and on zoo smbox-cat-p0.2, but only 0.25 at DDPM-50 (0.81 at
  DDPM-100) for the zoo's user-image trigger. Clean models stay at 0 (clean-s1, clean-s2, base). docs/RESULTS.md,
  "Session 11".
  White-box inverts through the same DDPM-50 chain, with the exact gradient through its first 10 steps and the
  identity through the other 40 (inversion.whitebox_backprop_steps / whitebox_window; defense/inversion.py). Until
  session 15 it used an exact DDPM-20 chain (whitebox_num_steps = 20): it missed both CORNER zoo models, whose
  backdoors do not fire at DDPM-20 (docs/RESULTS.md, "Session 15"). On the demo (3 restarts, 2 cores shared with
  a training job) the exact DDPM-50 gradient took, for compile + first epoch / each further epoch: unrolled 814 s
  / 34 s, lax.scan + checkpoint 115 s / 102 s; the 10-step window 71 s / 13 s (docs/RESULTS.md, "Session 16").
  The window keeps the clean base at 0, flags the demo, and flags the rebuilt smbox-corner-p0.05 (MSCR 2/16 at
  3 epochs) that exact DDPM-20 missed; its reported trigger there has ASR 0. The whole zoo was not re-run with it.
  White-box runs 6 restarts (inversion.whitebox_restarts; BBTI keeps 3). With 3 it missed stop14-corner-p0.1 and
  user-shoe-p0.2 (zoo accuracy 0.833, session 21). With 6, a new restart collapses 2 of 16 outputs on each:
  restart 4 at epoch 16 (stop14-corner), restart 3 at epochs 8, 11 and 17 (user-shoe). The 4 clean models stay at
  0 over all 6 x 25 epochs.
  Restart r is seeded with fold_in(key, r), so restarts 0-2 are those of the 3-restart runs. The cost doubles:
  713-816 s on a clean model on one shared core, against 290-418 s (docs/RESULTS.md, "Session 21").
* Elijah's detection sampler: DDPM-100 instead of DDIM-50, for the same reason (see get_config).
* threshold tau = 1/16 (flagged iff at least one pair of the 16 outputs collapses, cos > 0.999, at some epoch)
  instead of the paper's 0.5, calibrated on clean models as `detection.calibrate_threshold(clean, margin=1/B,
  floor=0)`: the largest clean MSCR plus one sample. Clean MSCR measured: 0 at every one of 30 epochs on the zoo's
  clean-s1..s4 with BBTI and with white-box, and on the base runs/fmnist with BBTI (docs/RESULTS.md, "Detection
  zoo"). |T| is 0 or >= 2, so the smallest MSCR that is not clean is 2/16. At tau 0.5, 2 of the 5
  firing zoo backdoors were missed by each method. Their MSCR peaked at 2-9 of 16 before the oscillating Adam
  walk moved away again.
* restarts = 3, max_epochs = 25 (the reference: one run of 100 epochs), stop_mscr = 0.75 (a restart stops once
  12 of the 16 outputs collapse; the reference waits for all 16) and stop_any (all restarts stop with the first
  that gets there). Collapses come and go as the Adam walk oscillates, and a single run can miss a backdoor that
  its chain carries weakly: zoo user-shoe-p0.2 (true-trigger MSCR 0.25 at DDPM-50) never collapsed in one run of
  30 epochs, while restarts 2 and 3 collapsed it at epochs 3-7; the latest first collapse seen in restart 0 was
  epoch 19 (stop14-corner-p0.1). 3 x 25 epochs is the most that fits the 2-minute target on a clean model, which
  runs every epoch of every restart (docs/RESULTS.md, "Session 13"). No refinement (refine_epochs = 0): the fresh-noise refinement (session 5's default)
  drove the demo's collapse from 1.0 to 0 within 11 epochs. The score is the main loop's MSCR.
* No shift term in the loop (inversion.shift_weight = 0, the reference losses). Sessions 7-10 added Elijah's
  distribution-shift loss to the BBTI pattern loss (shift_weight = 1e7, defense/inversion.py) because it raised the
  demo's BBTI-pattern ASR from 0.44 to 0.75; it was only checked on the demo and clean models. On the rebuilt zoo
  smbox-cat-p0.2 (true trigger: ASR 1, MSCR 1) it makes BBTI miss the backdoor: score 0 at DDPM-50 and at DDPM-100
  (the term pulls the pattern away from the first epoch's near-collapse, max pair cosine 0.994 -> 0.73), against
  0.5625 without it (docs/RESULTS.md, "Session 11"). The trigger quality it bought now comes from trigger_from =
  'shift' below, so the decision keeps the reference losses.
* detection.trigger_from = 'target' (our option, defense/target_inversion.py): once the MSCR flags a model, its
  pattern is run once more on the fixed batch, the image the batch collapsed onto is the target estimate, and the
  reported trigger is inverted towards it with BadDiffusion's noise-prediction identity at every timestep (200
  Adam steps). DDPM-1000 ASR (64 samples) on the zoo: docs/RESULTS.md, "Session 13" (smbox-cat-p0.2: 0.94 on 32
  samples, against 0.05 for the MSCR pattern and 0 for the shift estimate below).
  One refinement round (target_trigger.refine_rounds = 1): the inverted trigger is run on 64 fixed noises, and
  if a larger share of them collapses than of the pattern's batch, the trigger is inverted again towards that
  cluster's mean (box14-shoe-p0.05, a 2-of-16 collapse: zoo ASR 0.547 -> 0.859; docs/RESULTS.md, "Session 14").
* (before session 13) detection.trigger_from = 'shift': once the MSCR flags a model, the reported
  trigger is re-estimated by the distribution-shift objective alone (Elijah's inversion: 50 noises instead of
  Elijah's 100, 100 Adam steps from its own init); the MSCR pattern is kept as mscr_trigger.npy. On the demo model
  the DDPM-1000 ASR (64 samples) of the shift trigger is 0.91 with 50 noises and 0.84-0.88 with 100, against 0.70
  for the BBTI pattern (docs/RESULTS.md, "Session 9").
  Clean models are not flagged, so they pay nothing for it.
"""
from configs.common import base_config


def get_config():
  c = base_config("fmnist-cpu")
  c.inversion.log_every = 5
  c.inversion.whitebox_remat = False
  c.inversion.init_mean = 0.5
  c.inversion.num_steps = 50  # DDPM-50: half the cost of DDPM-100 (what it carries: module docstring)
  c.inversion.restarts = 3
  c.inversion.max_epochs = 25
  c.inversion.stop_mscr = 0.75
  c.inversion.stop_any = True
  # White-box: the same DDPM-50 chain as BBTI (no zoo backdoor fires at DDPM-20), exact through its first 10
  # steps (an unrolled DDPM-50 backward pass takes ~14 min to compile; module docstring).
  c.inversion.whitebox_num_steps = 0
  c.inversion.whitebox_backprop_steps = 10
  c.inversion.whitebox_window = "first"
  c.inversion.whitebox_restarts = 6  # 3 white-box restarts missed 2 of 8 zoo backdoors (module docstring)
  # Elijah's detection samples 16 images from noise + its inverted trigger: with its default DDIM-50 (an ODE
  # sampler) a BadDiffusion (SDE) backdoor does not fire (zoo box14-hat-p0.1, ASR 1.0 under DDPM-1000: uniformity
  # 0.28, missed), so these models are checked with an ancestral DDPM-100 chain.
  c.detection.trigger_from = "target"  # a flagged model's trigger, inverted towards its collapse (module docstring)
  c.detection.shift_trigger.num_noise = 50
  c.detection.threshold = 1.0 / 16  # clean-calibrated (module docstring); the paper's majority rule is 0.5
  c.detection.elijah.sampler = "ddpm"
  c.detection.elijah.sampler_steps = 100
  return c
