"""The notebooks in colabs/: each runs headless from its first cell to its last (short training runs), and the
committed files keep the outputs of a full run (pictures included)."""

import os
import shutil
import sys

import nbformat
import pytest

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "colabs"))
from execute import NOTEBOOKS, execute  # colabs/ is a folder of files, not a package

NAMES = [os.path.basename(p) for p in NOTEBOOKS]
PICTURES = {"promptable_embeddings.ipynb": 3}  # image outputs each full run shows


def test_every_notebook_is_here():
    assert {"quickstart.ipynb", "promptable_embeddings.ipynb", "weights.ipynb"} <= set(NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_headless(name, tmp_path):
    """Executes a copy (the committed outputs stay); one simulated device, as on a laptop; 20 training steps."""
    copy = shutil.copy(os.path.join(ROOT, "colabs", name), tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(CLOC_NOTEBOOK_STEPS="20", JAX_PLATFORMS="cpu")
    seconds = execute(str(copy), write=True, env=env)
    executed = nbformat.read(str(copy), as_version=4)
    images = sum("image/png" in o.get("data", {}) for c in executed.cells for o in c.get("outputs", []))
    assert images == PICTURES.get(name, 0), images
    print(f"{name}: {seconds:.0f} s")


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_keeps_a_full_runs_outputs(name):
    notebook = nbformat.read(os.path.join(ROOT, "colabs", name), as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "execute it: python colabs/execute.py " + name
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    assert images == PICTURES.get(name, 0), images
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "step 20:" not in streams, "the committed outputs come from a CI-length run"
