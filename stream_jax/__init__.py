"""stream_jax: sparse tracing of attention with hierarchical block-sparse masks."""

import os as _os

# `models/` is a top-level folder of the repository that installs as `stream_jax.models` (pyproject's
# package-dir). From a bare checkout (no install, the repository root on sys.path) the same name resolves
# through this package path entry: <root>/models. An install ships stream_jax/models, found first.
_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(__path__[0], "models"))
    and _os.path.isfile(_os.path.join(_ROOT, "models", "__init__.py"))
    and _os.path.isfile(_os.path.join(_ROOT, "pyproject.toml"))):
  __path__.append(_ROOT)

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
from stream_jax.ideal import IdealTrace, ideal_mask
from stream_jax.blocksparse import (
    block_coverage,
    dense_block_mass,
    reference_attention,
    sparse_attention,
)
from stream_jax.dense import dense_attention
from stream_jax.band import window_attention

__version__ = "0.1.0"
