"""Evaluation metrics: backdoor MSE/SSIM/ASR, Fréchet distances (FID with Inception-v3, FD with a classifier).

`inception` and `classifier` are imported lazily (they are heavier and optional): use
`from diffcleanse_jax.metrics import inception, classifier`.
"""
from diffcleanse_jax.metrics.backdoor import (attack_success, backdoor_metrics, mse_per_image, pm1_to_01,
                                              ssim_per_image, ssim_success, to_uint8_quantised)
from diffcleanse_jax.metrics.frechet import (feature_statistics, frechet_distance, frechet_distance_from_features,
                                             load_statistics, save_statistics)

__all__ = [
    "attack_success", "backdoor_metrics", "mse_per_image", "pm1_to_01", "ssim_per_image", "ssim_success",
    "to_uint8_quantised", "feature_statistics", "frechet_distance", "frechet_distance_from_features",
    "load_statistics", "save_statistics",
]
