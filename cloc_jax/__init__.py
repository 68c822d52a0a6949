"""cloc_jax: region-aware CLIP pretraining (CLOC, UMG-CLIP) in JAX."""

from cloc_jax.weights import load

__all__ = ["load"]
