"""Real data for RLHF: TL;DR and Anthropic HH through TFDS (array_record) and grain."""
from p3o_jax.data.builders import HhRlhf, TldrComparisons, TldrSft, prepare
from p3o_jax.data.validate import DataError
