"""The notebooks run top to bottom on the CPU (a copy, with its parameters cell's values replaced, as
papermill does), and what they print is what the run wrote: the quickstart's held-out domain loss
falls, and the inspection notebook's checkpoint losses are the ones the trainer logged."""

import base64
import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

ROOT = Path(__file__).resolve().parents[1]
CELL_TIMEOUT_S = 600
DUMP = os.environ.get("CPTJAX_DUMP_NOTEBOOKS")  # a folder to keep the executed notebooks in, to look at


def execute(name: str, parameters: dict, cwd: Path):
    """The executed notebook: `parameters` assigned in a cell right after the one tagged "parameters"."""
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    tagged = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: exactly one cell must be tagged 'parameters'"
    for key in parameters:  # only settings the notebook has
        assert re.search(rf"^{key} = ", notebook.cells[tagged[0]].source, re.MULTILINE), key
    injected = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    notebook.cells.insert(tagged[0] + 1, new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def printed(notebook) -> str:
    """Everything the cells printed or displayed as text."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif output.output_type in ("display_data", "execute_result"):
                parts += [output.data.get(kind, "") for kind in ("text/markdown", "text/plain")]
    return "\n".join(parts)


def images(notebook) -> list[bytes]:
    return [base64.b64decode(output.data["image/png"]) for cell in notebook.cells
            for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]


def evals(run: Path) -> dict[int, dict]:
    records = map(json.loads, (run / "logs" / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in records if r["kind"] == "eval"}


def test_committed_notebooks_have_no_outputs():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip the outputs"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("notebooks")
    notebook = execute("cpt_quickstart.ipynb", {"WORKDIR": str(cwd / "quickstart")}, cwd)
    (work,) = (cwd / "quickstart").iterdir()  # the notebook's own run-<date>-<time> folder
    if DUMP:
        nbformat.write(notebook, DUMP + "/cpt_quickstart.ipynb")
    return notebook, work, cwd


@pytest.mark.slow
def test_quickstart_trains_reports_generates_and_exports(quickstart):
    notebook, work, _ = quickstart
    text = printed(notebook)
    run = work / "cpt_run"
    logged = evals(run)
    last = max(logged)
    assert last == 80 and 0 in logged

    # The printed before/after numbers are the run's own step-0 and last evaluations, and the
    # domain (code) loss fell: by more than 0.5 nats/token (8.35 -> 6.68 on this machine).
    found = {name: (float(before), float(after)) for name, before, after in re.findall(
        r"held-out (\w+) loss \((?:domain|general)\): ([\d.]+) -> ([\d.]+) nats/token", text)}
    assert set(found) == {"code", "english"}, text[-3000:]
    for name, (before, after) in found.items():
        assert before == pytest.approx(logged[0][name]["loss"], abs=6e-5)
        assert after == pytest.approx(logged[last][name]["loss"], abs=6e-5)
    assert found["code"][1] < found["code"][0] - 0.5

    # the mixture: shares printed for both sources, and a decoded row with several documents
    assert re.search(r"^code\s+95\.0%\s+[\d.]+%", text, re.MULTILINE)
    assert re.search(r"^english\s+5\.0%\s+[\d.]+%", text, re.MULTILINE)
    assert len(re.findall(r"^=== segment \d+: \d+ tokens", text, re.MULTILINE)) >= 2

    # the report's overview shown, a generation from each model, the export with its model card
    shown = images(notebook)
    assert shown and shown[0][:8] == b"\x89PNG\r\n\x1a\n" and len(shown[0]) > 20_000
    assert (work / "report" / "report.md").is_file()
    assert "--- base model (" in text and "--- after CPT (" in text
    export = work / "cpt_hf"
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    assert (export / "README.md").is_file() and "exported step 80" in text


@pytest.mark.slow
def test_inspect_notebook_compares_checkpoints_with_the_base(quickstart):
    _, work, cwd = quickstart
    run = work / "cpt_run"
    notebook = execute("inspect_checkpoint.ipynb", {"RUN_DIR": str(run)}, cwd)
    if DUMP:
        nbformat.write(notebook, DUMP + "/inspect_checkpoint.ipynb")
    text = printed(notebook)
    logged = evals(run)
    # cptjax eval on the saved checkpoints (kept: 40 and 80) and the base gives what the trainer logged
    rows = re.findall(r"step\s+(\d+) (\w+)\s+loss now ([\d.]+), logged in training ([\d.]+)", text)
    assert {(int(step), name) for step, name, *_ in rows} == {(s, n) for s in (0, 40, 80) for n in ("code", "english")}
    for step, name, now, during in rows:
        assert float(during) == pytest.approx(logged[int(step)][name]["loss"], abs=6e-6)
        assert float(now) == pytest.approx(float(during), abs=2e-5)
    # the weight change: a figure per checkpoint, a row per layer, more change by the later step
    assert len(images(notebook)) == 3  # the loss bars and two weight-change figures
    assert len(re.findall(r"^\s+[0-3] (?:\s+\d\.\d{3}e[-+]\d\d)+$", text, re.MULTILINE)) == 4
    means = [float(m) for m in re.findall(r"mean relative change over layers and kinds ([\d.e+-]+);", text)]
    assert len(means) == 2 and 0 < means[0] < means[1]
