"""p3o_jax: RLHF with relative feedback (P3O) in JAX/Flax."""

__version__ = "0.1.0"
