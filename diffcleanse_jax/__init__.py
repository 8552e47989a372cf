"""diffcleanse_jax: attack, audit and repair diffusion models in JAX/Flax."""
