"""Backdoor attacks on diffusion models: triggers, targets, data poisoning and the BadDiffusion objective."""
from diffcleanse_jax.attacks.objective import (
    SOLVERS,
    ObjectiveError,
    baddiffusion_eps_target,
    baddiffusion_inputs,
    baddiffusion_loss,
    eps_coef_scale,
    rho,
)
from diffcleanse_jax.attacks.poison import (
    PoisonError,
    make_batch_targets,
    num_poisoned,
    poison_dataset,
    random_hflip,
    select_poisoned,
    stamp,
    trigger_mask,
)
from diffcleanse_jax.attacks.targets import TARGET_NAMES, TargetError, bg2grey, make_target
from diffcleanse_jax.attacks.triggers import TRIGGER_NAMES, TriggerError, make_trigger

__all__ = [
    "SOLVERS", "TARGET_NAMES", "TRIGGER_NAMES",
    "ObjectiveError", "PoisonError", "TargetError", "TriggerError",
    "baddiffusion_eps_target", "baddiffusion_inputs", "baddiffusion_loss", "bg2grey", "eps_coef_scale",
    "make_batch_targets", "make_target", "make_trigger", "num_poisoned", "poison_dataset", "random_hflip",
    "rho", "select_poisoned", "stamp", "trigger_mask",
]
