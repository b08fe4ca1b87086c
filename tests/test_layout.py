"""The package's shape: the plugin apart from the experiment toolkit, Hub-facing files self-contained."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import CAUSAL_HUB_FILES, SEQ2SEQ_HUB_FILES

import hf_copilot

PACKAGE = Path(hf_copilot.__file__).parent
HUB_FACING = CAUSAL_HUB_FILES | SEQ2SEQ_HUB_FILES


def plugin_imports() -> dict[str, set[str]]:
    """For each plugin module (not the experiments), the plugin modules it imports.

    An absolute import of the package counts as `hf_copilot`, which no Hub-facing file may use.
    """
    graph = {}
    for path in PACKAGE.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    imported.add(node.module.split(".")[0])
                else:
                    imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hf_copilot":
                imported.update({"hf_copilot", *node.module.split(".")[1:2]})
            elif isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names if a.name.startswith("hf_copilot"))
        graph[path.stem] = imported
    return graph


def test_plugin_modules_import_no_cycle_and_never_the_experiments():
    graph = plugin_imports()
    assert all("experiments" not in imported for imported in graph.values())
    visiting, done = set(), set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in visiting, f"import cycle: {' -> '.join([*path, module])}"
        if module in done or module not in graph:
            return
        visiting.add(module)
        for imported in graph[module]:
            visit(imported, [*path, module])
        visiting.discard(module)
        done.add(module)

    for module in graph:
        if module != "__init__":
            visit(module, [])


def test_hub_facing_files_import_only_each_other():
    graph = plugin_imports()
    for name in HUB_FACING:
        assert graph[name.removesuffix(".py")] <= {f.removesuffix(".py") for f in HUB_FACING}, name


def test_modeling_file_holds_model_code_only():
    lines = (PACKAGE / "modeling_pilot_copilot.py").read_text().count("\n")
    assert lines <= 600, f"modeling_pilot_copilot.py has {lines} lines"


def test_import_hf_copilot_works_without_the_toolkits_dependencies(tmp_path):
    blocker = tmp_path / "sitecustomize.py"
    # A None entry in sys.modules is how Python spells "not installed" to both import and find_spec.
    blocker.write_text(
        "import sys\nfor name in ('datasets', 'evaluate', 'matplotlib'):\n    sys.modules[name] = None\n"
    )
    script = (
        "import hf_copilot, sys\n"
        "try:\n    import hf_copilot.experiments\nexcept ImportError as error:\n"
        "    assert 'hf-copilot[experiments]' in str(error)\n"
        "names = ['MistakeLog', 'MistakeLogCallback', 'CopilotTrainer', 'CopilotTrainingArguments',"
        " 'PilotCopilotForCausalLM', 'CopilotConfig', 'NonFiniteTrainingError', '__version__']\n"
        "print(all(getattr(hf_copilot, n) is not None for n in hf_copilot.__all__ + names))\n"
        "print(sorted(m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in"
        " {'datasets', 'evaluate', 'matplotlib'}))\n"
        "print(hf_copilot.__version__)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(PACKAGE.parent)])}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    assert result.stdout.split("\n")[:3] == ["True", "[]", hf_copilot.__version__]
