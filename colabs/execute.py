"""Run the notebooks headless, as CI does, and keep what they show.

python colabs/execute.py                                   # every notebook here; outputs written back into it
python colabs/execute.py colabs/promptable_embeddings.ipynb
CLOC_NOTEBOOK_STEPS=20 python colabs/execute.py --check    # CI: short runs, files left as they are

Every notebook reads CLOC_NOTEBOOK_STEPS (training steps; each notebook has its own default) and runs with
colabs/ as its working directory. A cell that raises stops the run with the cell's traceback.
"""

import argparse
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = sorted(os.path.join(HERE, f) for f in os.listdir(HERE) if f.endswith(".ipynb"))


def execute(path: str, write: bool, env: dict | None = None, timeout: int = 3600) -> float:
    """Executes every cell of `path` in a fresh kernel; with `write`, saves the outputs into the file.
    Returns the seconds it took. Raises nbclient's CellExecutionError on the first failing cell."""
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": HERE}})
    client.execute(env=dict(os.environ if env is None else env))
    if write:
        nbformat.write(notebook, path)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", default=NOTEBOOKS)
    parser.add_argument("--check", action="store_true", help="execute only; leave the files as they are")
    args = parser.parse_args()
    for path in args.notebooks:
        print(f"{os.path.basename(path)}: {execute(path, write=not args.check):.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
