"""Defences: Diff-Cleanse stage 1 (trigger inversion + detection) and stage 2 (pruning + fine-tuning), baselines.

Stage 1 public API:

* `invert_trigger(model, cfg, key) -> InversionResult` (`defense.inversion`): BBTI / white-box trigger inversion;
  `invert_many` / `invert_models`: several same-architecture models in one vmapped program.
* `DetectionResult`, `calibrate_threshold`, `detection_metrics` (`defense.detection`); detectors
  `DETECTORS['bbti' | 'whitebox' | 'elijah' | 'terd'](model, cfg, key)` (`defense.workflow`).

Nothing under `diffcleanse_jax/defense/` imports `diffcleanse_jax.attacks` (a defence must not see the true
trigger); the glue that compares with the true trigger lives in tests, benchmarks and `evaluation.py`.
"""
from diffcleanse_jax.defense.detection import (DetectionResult, auroc, calibrate_threshold, decide, detect_bbti,
                                               detect_whitebox, detection_metrics)
from diffcleanse_jax.defense.inversion import (InversionResult, InversionSettings, invert_many, invert_models,
                                               invert_trigger)

__all__ = ["DetectionResult", "InversionResult", "InversionSettings", "auroc", "calibrate_threshold", "decide",
           "detect_bbti", "detect_whitebox", "detection_metrics", "invert_many", "invert_models", "invert_trigger"]
