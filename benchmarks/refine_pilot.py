"""Pilot: does refinement on *fresh* noise (same losses, from a zoo evaluation's cached inverted trigger) raise the
ASR of the inverted trigger? Prints the start ASR/MSE (16 DDPM-1000 samples vs the true target), the |T| per
refinement epoch, and the ASR/MSE of the last and of the best-by-|T| refined pattern.

  python benchmarks/refine_pilot.py DETECTOR MODEL [K [LR [RESULTS_DIR]]]   # e.g. bbti smbox-cat-p0.2 15 0.02
RESULTS_DIR (default runs/zoo/results) holds <detector>/<model>/trigger.npy; the configs/fmnist_detect.py pilot
used the session-4 triggers (tau 0.5, 30 epochs, no refinement), kept in runs/zoo/old_s4.
"""
import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax, jax.numpy as jnp, numpy as np
import zoo
from diffcleanse_jax.defense import inversion as inv
det, name = sys.argv[1], sys.argv[2]
K = int(sys.argv[3]) if len(sys.argv) > 3 else 15
LR = float(sys.argv[4]) if len(sys.argv) > 4 else None
config = zoo.load_eval_config("configs/fmnist_detect.py", ["inversion.max_epochs=30"])
mdir = f"runs/zoo/models/{name}"
model = zoo._default_load_fn(mdir)
y = zoo.true_target(mdir)
RES = sys.argv[5] if len(sys.argv) > 5 else "runs/zoo/results"
g0 = np.load(f"{RES}/{det}/{name}/trigger.npy")
s = inv.InversionSettings.from_config(config.inversion, method=det)
import dataclasses
s_ref = dataclasses.replace(s, learning_rate=LR) if LR else s
eval_cfg = config.eval.to_dict(); eval_cfg.update(num_samples=16, batch_size=16, clean=False)
key = jax.random.key(0)
def asr(g):
  m = zoo._default_asr_fn(model, np.asarray(g, np.float32), y, eval_cfg, jax.random.fold_in(key, 1))
  return m["asr"], m["mse"]
def fresh_count(g, k):
  r = inv.trigger_mscr(model, g, config.inversion, jax.random.fold_in(key, 1000 + k), method=det)
  return r["count"]
t0 = time.time()
print(name, det, "lr", LR, "start: ASR/MSE", asr(g0), "fresh DDPM-100 counts", [fresh_count(g0, k) for k in range(2)], flush=True)
p = jnp.asarray((1.0 - g0) / 2.0)[None]
state = jax.vmap(lambda q: inv.init_state(q, s_ref))(p)
counts = []
for e in range(K):
  noise = jax.random.normal(jax.random.fold_in(key, 500 + e), (s.batch_size, *model.image_shape), jnp.float32)
  skey = jax.random.fold_in(key, 900 + e)
  state = state._replace(done=jnp.zeros_like(state.done))
  state, m = inv.epoch_step(model.apply, model.params, model.scheduler_config, s_ref, noise, skey, state)
  counts.append(int(m.count[0]))
print("refine counts (fresh noise each epoch)", counts, "%.0fs" % (time.time() - t0), flush=True)
g_last = np.asarray(inv.pattern_from_raw(state.p[0]))
g_best = np.asarray(state.best_g[0])
print("last: ASR/MSE", asr(g_last), "best: ASR/MSE", asr(g_best), "%.0fs" % (time.time() - t0), flush=True)
