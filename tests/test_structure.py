"""The package's shape: folders by role in layers that import only downwards, no import cycles
(function-local imports included), modules a reader can hold in their head, and a README layout
that lists every module that exists, and only those."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cptjax"
MAX_LINES = 400
# The layers, lowest first: a module imports only from its own layer and the ones before it. The
# top level (cli.py, demo.py, convert.py, __init__.py) may import anything.
LAYERS = ("core", "model", "data", "hf", "io", "train", "measure")
TOP = "cptjax"


def _modules() -> dict[str, Path]:
    """'cptjax.data.read' -> its file, for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The cptjax modules `name` imports anywhere in its file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from cptjax.data import read` imports the module cptjax.data.read
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_the_import_graph_has_no_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    # The package's own lazy re-exports (cptjax/__init__.py) name modules in strings, not imports.
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else len(LAYERS)


def test_every_module_sits_in_a_layer_folder_or_is_a_command():
    modules = _modules()
    top = sorted(name for name in modules if name.count(".") == 1 and name.split(".")[1] not in LAYERS)
    assert top == ["cptjax.cli", "cptjax.convert", "cptjax.demo"], top
    folders = {name.split(".")[1] for name in modules if name.count(".") >= 1}
    assert folders - {"cli", "convert", "demo"} == set(LAYERS), folders


def test_lower_layers_never_import_higher_ones():
    modules = _modules()
    upward = sorted(f"{name} ({LAYERS[_layer(name)]}) imports {target} ({LAYERS[_layer(target)]})"
                    for name, path in modules.items() if name != TOP and _layer(name) < len(LAYERS)
                    for target in _imports(name, path, set(modules))
                    if target != TOP and _layer(target) > _layer(name))
    assert not upward, "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check above reads function-local imports too: a model module importing the trainer counts."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from cptjax.train.trainer import run\n")
    modules = set(_modules())
    found = _imports("cptjax.model.fake", module, modules)
    assert found == {"cptjax.train.trainer"}
    assert _layer("cptjax.train.trainer") > _layer("cptjax.model.fake")
    assert _layer("cptjax.cli") == len(LAYERS) and _layer("cptjax.core.errors") == 0


def test_a_run_folder_is_named_in_one_module():
    """io/run_layout.py names what a run folder holds; every other module asks it (RunPaths)."""
    from cptjax.io import run_layout

    names = {run_layout.CHECKPOINTS, run_layout.LOGS, run_layout.METRICS, run_layout.TENSORBOARD, run_layout.CONFIG,
             run_layout.WANDB_RUN}
    spelled = sorted(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}"
                     for name, path in _modules().items() if name != "cptjax.io.run_layout"
                     for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.Constant) and node.value in names)
    assert not spelled, spelled


def test_no_module_is_longer_than_a_reader_can_follow():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_readme_layout_lists_every_module_once():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^(cptjax/\S+\.py)\s", section, flags=re.MULTILINE)
    actual = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py"))
    assert sorted(listed) == actual, {"missing from README": sorted(set(actual) - set(listed)),
                                      "listed but absent": sorted(set(listed) - set(actual)),
                                      "listed twice": sorted({p for p in listed if listed.count(p) > 1})}


def test_docs_config_reference_is_the_generated_one():
    from cptjax.train.config_reference import reference_markdown

    page = (ROOT / "docs" / "config.md").read_text()
    assert reference_markdown() in page, "docs/config.md is stale: paste `cptjax config reference` into it"


def test_the_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 350
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert all(f"](docs/{page})" in readme for page in pages), [p for p in pages if f"](docs/{p})" not in readme]
