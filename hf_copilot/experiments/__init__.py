"""The experiment toolkit: offline tasks, data, tokenizer, evaluation, recipes, plots and the CLI.

It imports the plugin (`hf_copilot`); the plugin never imports it. Its own dependencies come with
`pip install "hf-copilot[experiments]"`.
"""

import importlib.util

_MISSING = [name for name in ("datasets", "evaluate", "matplotlib") if importlib.util.find_spec(name) is None]
if _MISSING:
    raise ImportError(
        f"hf_copilot.experiments needs {', '.join(_MISSING)}: install the toolkit's extra with "
        "pip install 'hf-copilot[experiments]' (the plugin itself, hf_copilot, works without them)."
    )
