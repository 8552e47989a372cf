"""Pilot: does re-estimating y_hat from the target-inverted trigger's own collapse help a weak backdoor?

  python benchmarks/target_refine_pilot.py runs/zoo/models/box14-shoe-p0.05 [ASR_SAMPLES=64]

For one zoo model (a workdir with model/ and target.npy): BBTI detection with configs/fmnist_detect.py, then the
DDPM-1000 ASR of the reported trigger, of the MSCR pattern itself, of triggers inverted towards the collapse of that trigger on 16 and 64 fixed
noises, and of the trigger inverted towards the true target (oracle). Prints cluster sizes, MSE of each target
estimate to the true target, final target losses and ASRs (docs/RESULTS.md, "Session 14").
"""
import os, sys, time
import numpy as np, jax
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.fmnist_detect import get_config
from diffcleanse_jax.defense.workflow import load_model_dir
from diffcleanse_jax.defense.inversion import trigger_mscr
from diffcleanse_jax.defense.detection import detect_bbti
from diffcleanse_jax.defense import target_inversion as ti
from diffcleanse_jax.evaluation import evaluate_model

mdir = sys.argv[1]; nasr = int(sys.argv[2]) if len(sys.argv) > 2 else 64
model = load_model_dir(mdir + '/model'); cfg = get_config()
cfg.detection.target_trigger.refine_rounds = 0  # the reported trigger before refinement (the pilot's baseline)
y_true = np.load(mdir + '/target.npy').astype(np.float32)
ev = dict(cfg.eval.to_dict(), num_samples=nasr, batch_size=nasr, clean=False)
def asr(r): return evaluate_model(model, r, y_true, ev, jax.random.key(5), log=lambda s: None)['asr']
def mse(a): return float(((a - y_true) ** 2).mean())
t0 = time.time(); res = detect_bbti(model, cfg); print('score', res.score, 'det s', round(time.time() - t0), flush=True)
r1 = res.trigger; y0 = res.arrays['target_estimate']
print('cluster0', res.details['target_trigger']['cluster_size'], 'mse y0', mse(y0), 'loss1', res.details['target_trigger']['final_loss'], flush=True)
print('asr r1', asr(r1), flush=True)
pat = res.arrays['mscr_trigger']  # the MSCR pattern itself (what 'same_batch' compares with)
print('asr pattern', asr(pat), 'pattern mscr on 64 fresh', trigger_mscr(model, pat, cfg.inversion, jax.random.key(123),
      batch_size=64, num_steps=50)['mscr'], flush=True)
for bs, nsteps in ((16, 50), (64, 50)):
  out = trigger_mscr(model, r1, cfg.inversion, jax.random.key(123), batch_size=bs, num_steps=nsteps)
  try:
    y1, mem = ti.collapse_target(out['images01'])
  except ti.NoCollapseError as e:
    print('no collapse', bs, nsteps); continue
  print('refine', bs, nsteps, 'mscr', out['mscr'], 'cluster', int(mem.sum()), 'mse y1', mse(y1), flush=True)
  r2, d = ti.invert_toward_target(model, y1, cfg.detection.target_trigger, jax.random.key(9))
  print('  loss2', d['final_loss'], 'asr r2', asr(r2), flush=True)
ro, d = ti.invert_toward_target(model, y_true, cfg.detection.target_trigger, jax.random.key(9))
print('oracle loss', d['final_loss'], 'asr', asr(ro), flush=True)
