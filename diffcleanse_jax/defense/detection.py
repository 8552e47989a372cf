"""Backdoor detection: the shared result type, the decision rule, threshold calibration, and the Diff-Cleanse
stage-1 detectors (BBTI and its white-box variant).

Statistic (ALGORITHMS.md §4.3): MSCR = max over epochs of |T|/B, the largest fraction of the B samples that
collapse onto (near-)identical images (pairwise cosine > 0.999) while the trigger is being inverted.

Decision: **backdoored iff score > threshold**, default threshold tau = 0.5 (the only explicit value in the
reference code, TrojDiff's clique rule; ALGORITHMS §10). Clean models essentially never produce two samples with
cosine > 0.999, so their MSCR is ~0; backdoored models reach 1.

Calibration (`calibrate_threshold`): tau = max(floor, quantile_q(clean scores) + margin), defaults q = 1 (the
largest clean score), margin = 0, floor = 0.5. Because the rule is strict (score > tau), tau = max clean score
already classifies every calibration model as clean; the floor keeps tau from dropping below the paper's
majority rule when the clean models all score 0 (an MSCR of 1/B or 2/B is then still "clean"). Use margin > 0
(e.g. 1/B) for headroom against unseen clean models, a quantile < 1 to tolerate outliers. To *measure* a
calibrated rule on a benchmark without judging a model by a threshold it helped to set,
`leave_one_out_thresholds` gives each model the threshold calibrated on the other clean models (the zoo
benchmark reports it with floor 0: flagged iff the score exceeds every other clean model's score).

Known blind spot (by the reference's design): outputs whose whole-image mean is <= 0.01 or >= 0.99 take part
in no pair, so a backdoor that collapses to a (near-)black or white image scores MSCR 0 even with the true
trigger. `details['max_excluded_fraction']` (largest fraction of excluded outputs over the epochs) is reported
as a diagnostic; it is not part of the decision.

A detector is `fn(model: DiffusionModel, cfg, key) -> DetectionResult`; `cfg` is either a full experiment config
(its `inversion` and `detection` sections are used) or a flat mapping of those fields.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

DEFAULT_THRESHOLD = 0.5


@dataclasses.dataclass
class DetectionResult:
  """Outcome of one detector on one model."""

  method: str            # 'bbti' | 'whitebox' | 'elijah' | 'terd'
  backdoored: bool
  score: float
  threshold: float
  trigger: np.ndarray    # (H,W,C) inverted trigger, additive in x_T space (x_T = eps + trigger)
  seconds: float
  details: dict          # method-specific info (per-epoch MSCR, losses, ...)
  arrays: dict = dataclasses.field(default_factory=dict)  # other (H,W,C) patterns, written as <name>.npy

  def to_json(self) -> dict[str, Any]:
    """Everything except the trigger array (details made JSON-safe: numpy scalars -> python, arrays with more
    than 64 elements -> a shape/dtype summary)."""
    return dict(method=str(self.method), backdoored=None if self.backdoored is None else bool(self.backdoored),
                score=_num(self.score), threshold=_num(self.threshold), seconds=float(self.seconds),
                details=json_safe(self.details or {}))


def _num(x):
  if x is None:
    return None
  x = float(x)
  return x if math.isfinite(x) else None


def json_safe(obj: Any, max_array: int = 64) -> Any:
  """Recursively converts numpy/jax values so `json.dump` accepts them; big arrays become summaries."""
  if isinstance(obj, Mapping):
    return {str(k): json_safe(v, max_array) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v, max_array) for v in obj]
  if isinstance(obj, (np.ndarray, jax.Array)):
    a = np.asarray(obj)
    if a.size > max_array:
      return {"array_shape": list(a.shape), "dtype": str(a.dtype)}
    return json_safe(a.tolist(), max_array)
  if isinstance(obj, np.generic):
    return json_safe(obj.item(), max_array)
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return json_safe(dataclasses.asdict(obj), max_array)
  return str(obj)


# ---------------------------------------------------------------------------------------- decision rule
def decide(score: float, threshold: float = DEFAULT_THRESHOLD) -> bool:
  """backdoored iff score > threshold (strict)."""
  return bool(float(score) > float(threshold))


def calibrate_threshold(clean_scores: Sequence[float], quantile: float = 1.0, margin: float = 0.0,
                        floor: float = DEFAULT_THRESHOLD) -> float:
  """tau = max(floor, quantile_q(clean_scores) + margin) (see the module docstring). No clean scores: floor."""
  s = np.asarray([float(x) for x in clean_scores], np.float64)
  if not 0.0 <= quantile <= 1.0:
    raise ValueError(f"calibrate_threshold: quantile={quantile} must be in [0, 1]")
  if s.size == 0:
    return float(floor)
  return float(max(floor, float(np.quantile(s, quantile)) + margin))


def leave_one_out_thresholds(scores: Sequence[float], labels: Sequence[bool], quantile: float = 1.0,
                             margin: float = 0.0, floor: float = 0.0) -> list[float]:
  """Per-model thresholds calibrated on the *other* clean models (labels False): tau_i =
  calibrate_threshold(clean scores except model i's, quantile, margin, floor). A model is never judged with a
  threshold its own score helped to set; a clean model with no other clean model to calibrate on gets `floor`.
  Used by the zoo benchmark to report a clean-calibrated decision beside the fixed tau."""
  s = [float(x) for x in scores]
  y = [bool(v) for v in labels]
  if len(s) != len(y):
    raise ValueError(f"leave_one_out_thresholds: {len(s)} scores but {len(y)} labels")
  return [calibrate_threshold([s[j] for j in range(len(s)) if j != i and not y[j]], quantile, margin, floor)
          for i in range(len(s))]


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
  """Area under the ROC curve (Mann-Whitney U; ties count 1/2). labels: True = backdoored. None if a class is
  missing."""
  s = np.asarray(scores, np.float64)
  y = np.asarray(labels, bool)
  pos, neg = s[y], s[~y]
  if pos.size == 0 or neg.size == 0:
    return None
  gt = (pos[:, None] > neg[None, :]).sum()
  eq = (pos[:, None] == neg[None, :]).sum()
  return float((gt + 0.5 * eq) / (pos.size * neg.size))


def detection_metrics(scores: Sequence[float], labels: Sequence[bool], predictions: Sequence[bool]) -> dict:
  """accuracy, TP/FP/TN/FN, TPR/FPR and AUROC over a set of models."""
  y = np.asarray(labels, bool)
  p = np.asarray(predictions, bool)
  tp, fp = int((p & y).sum()), int((p & ~y).sum())
  tn, fn = int((~p & ~y).sum()), int((~p & y).sum())
  n = len(y)
  return dict(n=n, accuracy=(tp + tn) / n if n else None, tp=tp, fp=fp, tn=tn, fn=fn,
              tpr=tp / (tp + fn) if tp + fn else None, fpr=fp / (fp + tn) if fp + tn else None,
              auroc=auroc(scores, labels))


# ------------------------------------------------------------------------------------------ cfg helpers
def _as_dict(cfg: Any) -> dict[str, Any]:
  if cfg is None:
    return {}
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  return dict(cfg)


def section(cfg: Any, name: str) -> dict[str, Any]:
  """`cfg[name]` when cfg is a full config (or has that sub-mapping), else cfg itself (flat)."""
  d = _as_dict(cfg)
  sub = d.get(name)
  return dict(sub) if isinstance(sub, Mapping) else d


def detection_settings(cfg: Any) -> dict[str, Any]:
  """The detection section (threshold, method, ...) with defaults."""
  d = section(cfg, "detection")
  out = dict(method="bbti", threshold=DEFAULT_THRESHOLD)
  out.update({k: v for k, v in d.items() if v is not None})
  return out


# -------------------------------------------------------------------------------------------- detectors
TRIGGER_SOURCES = ("inversion", "shift", "target")


def shift_trigger(model, cfg: Mapping[str, Any] | None, key: jax.Array) -> tuple[np.ndarray, dict[str, Any]]:
  """The trigger by the distribution-shift objective (Elijah's inversion, defense/elijah.py: tau minimising
  mean_pix |mean_b eps_theta(eps_b + tau, T-1) - lam tau| over a fixed noise batch, from its own init).
  `cfg`: its num_noise / num_iters / lam / lr / timestep / loop (elijah.DEFAULTS when missing).
  Returns ((H,W,C) float32 trigger, details: losses, final_loss, seconds, ...)."""
  from diffcleanse_jax.defense import elijah

  tau, details = elijah.invert(model, _as_dict(cfg), key)  # reads only its inversion keys
  return np.asarray(tau, np.float32), details


def target_trigger(model, pattern: np.ndarray, inversion_cfg: Any, cfg: Mapping[str, Any] | None, key: jax.Array,
                   method: str = "bbti") -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """The trigger inverted towards the collapse target (defense/target_inversion.py): the MSCR `pattern` (H,W,C)
  is run once more on the inversion's fixed noise batch and chain (same `key`, so the same samples as its best
  epoch); the largest collapsed cluster gives y_hat; then `invert_toward_target`. Then `refine_rounds` times: the
  new trigger is run on `refine_batch_size` fixed noises through the same chain; if a larger share of them
  collapses than of the previous batch (refine_compare 'pattern'; with 'same_batch' round 1 compares with the
  MSCR pattern run on the same refine batch), y_hat becomes that cluster's mean and the trigger is inverted again,
  otherwise (or when nothing collapses) the refinement stops and keeps what it had. Returns (trigger, y_hat in
  [-1,1], details: the last inversion's details, cluster_size, rounds). Raises target_inversion.NoCollapseError
  when the pattern collapses nothing."""
  from diffcleanse_jax.defense import target_inversion as ti
  from diffcleanse_jax.defense.inversion import InversionSettings, trigger_mscr

  s = ti.settings(cfg)  # validated before the sampling pass
  inv = InversionSettings.from_config(inversion_cfg, method=method)
  thresholds = (inv.sim_threshold, inv.black_threshold, inv.white_threshold)
  images = trigger_mscr(model, pattern, inversion_cfg, key, method=method)["images01"]
  y_hat, members = ti.collapse_target(images, *thresholds)
  trigger, details = ti.invert_toward_target(model, y_hat, s, jax.random.fold_in(key, 0x7A6))
  rounds = [dict(source="mscr pattern", batch_size=int(members.size), cluster_size=int(members.sum()),
                 final_loss=details["final_loss"])]
  batch = int(s["refine_batch_size"])

  def cluster_on_refine_batch(g):  # (y, members) of g's collapse on the fixed refine batch; None if none
    images = trigger_mscr(model, g, inversion_cfg, key, method=method, batch_size=batch)["images01"]
    try:
      return ti.collapse_target(images, *thresholds)
    except ti.NoCollapseError:
      return None

  prev_share = float(members.mean())
  if int(s["refine_rounds"]) > 0 and s["refine_compare"] == "same_batch":
    got = cluster_on_refine_batch(pattern)
    n = 0 if got is None else int(got[1].sum())
    rounds[0].update(refine_batch_cluster_size=n)
    prev_share = n / batch
  for i in range(int(s["refine_rounds"])):
    got = cluster_on_refine_batch(trigger)
    if got is None:
      rounds.append(dict(source=f"round {i + 1} trigger", batch_size=batch, cluster_size=0, accepted=False))
      break
    y_new, m_new = got
    accepted = bool(m_new.mean() > prev_share)
    rounds.append(dict(source=f"round {i + 1} trigger", batch_size=batch, cluster_size=int(m_new.sum()),
                       accepted=accepted))
    if not accepted:
      break
    y_hat, members = y_new, m_new
    prev_share = float(m_new.mean())
    trigger, details = ti.invert_toward_target(model, y_hat, s, jax.random.fold_in(key, 0x7A6 + i + 1))
    rounds[-1]["final_loss"] = details["final_loss"]
  details.update(cluster_size=int(members.sum()), rounds=rounds)
  return trigger, y_hat, details


def _mscr_detector(model, cfg: Any, key: jax.Array | None, method: str) -> DetectionResult:
  """MSCR decision from the stage-1 inversion; the reported trigger per `detection.trigger_from`:
  'inversion' (the reference: the inversion's best pattern), 'shift' (our option: when the model is flagged,
  the trigger is re-estimated by the distribution-shift objective, `shift_trigger` above) or 'target' (our
  option: inverted towards the image the pattern collapsed onto, `target_trigger` above; the estimated target is
  kept as arrays['target_estimate']). With 'shift' / 'target' the MSCR pattern is kept as arrays['mscr_trigger']."""
  from diffcleanse_jax.defense.inversion import InversionSettings, run_inversion

  det = detection_settings(cfg)
  source = str(det.get("trigger_from", "inversion") or "inversion")
  if source not in TRIGGER_SOURCES:
    raise ValueError(f"config.detection.trigger_from={source!r}; expected one of {', '.join(TRIGGER_SOURCES)}")
  s = InversionSettings.from_config(section(cfg, "inversion"), method=method)
  key = jax.random.key(s.seed) if key is None else key
  t0 = time.time()
  res = run_inversion(model.apply, model.params, model.image_shape, model.scheduler_config, s, key,
                      name=str(getattr(model, "source", None) or "model"))[0]
  thr = float(det.get("threshold", DEFAULT_THRESHOLD))
  score = float(res.best_mscr)
  flagged = decide(score, thr)
  details = dict(res.to_json(), statistic="MSCR = max_epoch |T|/B", rule="backdoored iff score > threshold",
                 trigger_from=source, decision_seconds=time.time() - t0)
  trigger = np.asarray(res.trigger, np.float32)
  arrays = {}
  if source == "shift" and flagged:
    arrays["mscr_trigger"] = trigger
    trigger, details["shift_trigger"] = shift_trigger(model, det.get("shift_trigger"),
                                                      jax.random.fold_in(key, 0x5417))
  elif source == "target" and flagged:
    from diffcleanse_jax.defense.target_inversion import NoCollapseError

    try:  # only a missing collapse falls back; a bad setting (TargetInversionError) is raised
      new, arrays["target_estimate"], details["target_trigger"] = target_trigger(
          model, trigger, section(cfg, "inversion"), det.get("target_trigger"), key, method)
      arrays["mscr_trigger"], trigger = trigger, new
    except NoCollapseError as e:  # e.g. a refined pattern that no longer collapses the fixed batch
      details["target_trigger"] = dict(error=str(e), fallback="the MSCR pattern is the reported trigger")
      logging.warning("target trigger: %s; reporting the MSCR pattern", e)
  return DetectionResult(method=method, backdoored=flagged, score=score, threshold=thr, trigger=trigger,
                         seconds=time.time() - t0, details=details, arrays=arrays)


def detect_bbti(model, cfg: Any = None, key: jax.Array | None = None) -> DetectionResult:
  """Diff-Cleanse BBTI detection (black-box gradient transport; `faithful_code_bug` from the inversion cfg)."""
  return _mscr_detector(model, cfg, key, "bbti")


def detect_whitebox(model, cfg: Any = None, key: jax.Array | None = None) -> DetectionResult:
  """The same statistic with the exact gradient through the short sampler."""
  return _mscr_detector(model, cfg, key, "whitebox")
