"""The Colab notebooks run top to bottom (headless, CPU, small sizes)."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"


def _run(name, tmp_path, monkeypatch):
  monkeypatch.setenv("STREAM_JAX_NOTEBOOK_SMALL", "1")
  nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  return nb


def _outputs(nb):
  return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_quickstart_runs(tmp_path, monkeypatch):
  nb = _run("quickstart", tmp_path, monkeypatch)
  text = _outputs(nb)
  assert "identical: True" in text
  assert (tmp_path / "mask.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("name,png", [("thought_anchors", "vertical.png"), ("needle_routes", "route.png")])
def test_analysis_notebooks_run(name, png, tmp_path, monkeypatch):
  _run(name, tmp_path, monkeypatch)
  assert (tmp_path / png).stat().st_size > 0


@pytest.mark.slow  # ~75 s on 2 cores; test_quickstart_runs keeps the notebook runner in the default run and
# tests/test_attribution.py::test_check_edges_ablates_the_top_and_random_edges_it_estimated the pipeline it calls
def test_edge_attribution_notebook_runs(tmp_path, monkeypatch):
  """Gradients vs ablations on a needle prompt (the 270M, 300 tokens): both figures are drawn and the
  printed rank correlation is a number."""
  nb = _run("edge_attribution", tmp_path, monkeypatch)
  text = _outputs(nb)
  assert "kept edges; metric" in text and "Spearman" in text
  for png in ("atp_vs_ablation.png", "needle_route.png"):
    assert (tmp_path / png).stat().st_size > 0
