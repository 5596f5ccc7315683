"""Analysis of Stream traces: pure functions of the compact trace (never T x T).

  faithfulness  dense vs Stream: next-token KL, top-1/top-5, residual error, kept fractions, oracle recall
  anchors       thought anchors: sentences, sentence x sentence mass, vertical scores, receiver heads
  niah          RULER-style needle-in-a-haystack prompts fitted to an exact token length, string-match scoring
  routes        needle mass at the final block, routes of kept blocks from needle to output
"""

from stream_jax.analysis import anchors, faithfulness, niah, routes
from stream_jax.analysis.anchors import AnchorReport, sentences, thought_anchors
from stream_jax.analysis.faithfulness import (FaithfulnessReport, faithfulness_report, format_report,
                                              run_faithfulness)
from stream_jax.analysis.niah import NiahSample, NiahTask, VARIANTS, generate_sample, string_match_all
from stream_jax.analysis.routes import Route, compare, route, trace_needle_mass

__all__ = [
    "anchors", "faithfulness", "niah", "routes", "AnchorReport", "sentences", "thought_anchors",
    "FaithfulnessReport", "faithfulness_report", "format_report", "run_faithfulness", "NiahSample",
    "NiahTask", "VARIANTS", "generate_sample", "string_match_all", "Route", "compare", "route",
    "trace_needle_mass",
]
