"""stream_jax: sparse tracing of attention with hierarchical block-sparse masks."""

from stream_jax.config import StreamConfig
from stream_jax.mask import (
    BlockMask,
    block_density,
    causal_interactions,
    describe,
    kept_fraction,
    kept_interactions,
    masks_equal,
    take_blocks,
    to_block_dense,
    to_dense,
    window_mask,
)
from stream_jax.numerics import AttentionStats
from stream_jax.estimate import estimate_mask
from stream_jax.attention import (
    block_coverage,
    dense_attention,
    dense_block_mass,
    sparse_attention,
)

__version__ = "0.1.0"
