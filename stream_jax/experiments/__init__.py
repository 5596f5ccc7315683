"""Experiments: one call from a loaded model and a text or a task to a frozen result.

    from stream_jax.models import load_model
    from stream_jax import experiments as ex
    model = load_model("gemma3-270m")
    res = ex.trace_text(model, "Some long text ...", ex.Settings(StreamConfig(top_k=8)))
    res.report.summary(), res.trace                     # FaithfulnessReport, Trace
    sweep = ex.niah_sweep(model, [600, 3000], samples=4)  # NiahSweep: rows, comparison, success_rates()
    anchors = ex.anchors_for_text(model, cot)           # AnchorsResult: report, sentences, trace
    demo = ex.demo(model, length=10_240)                # DemoResult: answers, needle mass, route

  runs     the pipelines (trace_text, faithfulness_pair, niah_sweep, answer_niah, anchors_for_text, demo)
           and their result dataclasses; no printing, plotting or files
  reports  result -> report folder (report.json, trace, figures, index.html) via stream_jax.report
  ablation the causal tests that intervene on the model: attention suppression (suppression_matrix) and
           route ablation (verify_routes); their pure parts are stream_jax.analysis.causal

The `stream-jax` command, the notebooks in colab/ and benchmarks/analysis_evidence.py call these. Needs the
[models] extra (and [viz] for reports' figures).
"""

from stream_jax.experiments.runs import (
    MIN_SENTENCES, NIAH_MIN_TOKENS, AnchorsResult, DemoResult, FaithfulnessPair, InputError, NiahRow, NiahSweep,
    Settings, TextTrace, anchors_for_text, answer_niah, check_length, check_needle_length, check_settings,
    compare_niah_rows, context_length, demo, faithfulness_pair, first_global, niah_sweep, niah_task, pruning_notice,
    trace_text)

__all__ = [
    "MIN_SENTENCES", "NIAH_MIN_TOKENS", "AnchorsResult", "DemoResult", "FaithfulnessPair", "InputError",
    "NiahRow", "NiahSweep", "Settings", "TextTrace", "anchors_for_text", "answer_niah", "check_length",
    "check_needle_length", "check_settings", "compare_niah_rows", "context_length", "demo", "faithfulness_pair",
    "first_global", "niah_sweep", "niah_task", "pruning_notice", "trace_text",
]
