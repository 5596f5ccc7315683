"""Experiments: one call from a loaded model and a text or a task to a frozen result.

    from stream_jax.models import load_model
    from stream_jax import experiments as ex
    model = load_model("gemma3-270m")
    res = ex.trace_text(model, "Some long text ...", ex.Settings(StreamConfig(top_k=8)))
    res.report.summary(), res.trace                     # FaithfulnessReport, Trace
    sweep = ex.niah_sweep(model, [600, 3000], samples=4)  # NiahSweep: rows, comparison, success_rates()
    anchors = ex.anchors_for_text(model, cot)           # AnchorsResult: report, sentences, trace
    demo = ex.demo(model, length=10_240)                # DemoResult: answers, needle mass, route

  settings     Settings, input checks (InputError), the pruning notice, progress bars
  tracing      faithfulness_pair, trace_text: a text traced with Stream and compared with dense
  needles      niah_sweep, answer_niah: needle prompts answered, needle mass and routes
  anchoring    anchors_for_text: thought anchors of a chain of thought
  needle_demo  demo: the main job
  ablation     the causal tests that intervene on the model: attention suppression (suppression_matrix)
               and route ablation (verify_routes); their pure parts are stream_jax.analysis.causal
  edge_ablation  AtP over the kept edges vs real ablations of them
  calibration  the coverage budget's calibration against exact passes
  reports      result -> report folder (report.json, trace, figures, index.html) via stream_jax.report
The pipelines return frozen result dataclasses; nothing but `reports` prints, plots or writes files.

The `stream-jax` command, the notebooks in colab/ and benchmarks/analysis_evidence.py call these. Needs the
[models] extra (and [viz] for reports' figures).
"""

from stream_jax.experiments.anchoring import AnchorsResult, anchors_for_text
from stream_jax.experiments.needle_demo import DEMO_LENGTH, DemoResult, demo
from stream_jax.experiments.needles import (
    NiahRow, NiahSweep, answer_niah, check_needle_length, compare_niah_rows, niah_sweep, niah_task)
from stream_jax.experiments.settings import (
    MIN_SENTENCES, NIAH_MIN_TOKENS, InputError, Settings, check_length, check_settings, context_length,
    first_global, pruning_notice)
from stream_jax.experiments.tracing import FaithfulnessPair, TextTrace, faithfulness_pair, trace_text

__all__ = [
    "DEMO_LENGTH", "MIN_SENTENCES", "NIAH_MIN_TOKENS", "AnchorsResult", "DemoResult", "FaithfulnessPair", "InputError",
    "NiahRow", "NiahSweep", "Settings", "TextTrace", "anchors_for_text", "answer_niah", "check_length",
    "check_needle_length", "check_settings", "compare_niah_rows", "context_length", "demo", "faithfulness_pair",
    "first_global", "niah_sweep", "niah_task", "pruning_notice", "trace_text",
]
