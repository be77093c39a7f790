"""The package's folders are its layers: engine < tasks < report < pipeline. A module imports only its own layer
or lower ones, no import circle exists, and imports inside functions are kept for heavy optional packages."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kvlib"
LAYERS = ("engine", "tasks", "report", "pipeline")
# imported inside functions on purpose: heavy to import, or needed only on the path that uses them
DEFERRED_OK = {"torch", "transformers", "peft", "accelerate", "vllm", "lm_eval", "llama_cpp", "openai", "matplotlib",
               "pandas", "scipy", "statsmodels", "papermill", "nbconvert", "nbformat", "IPython", "tiktoken",
               "sentencepiece", "mistral_common", "gguf", "huggingface_hub", "pooch", "fcntl", "pyarrow"}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PACKAGE.rglob("*.py"))}


def _kvlib_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported kvlib module, line, inside a function) for every import of a kvlib module in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = _modules()
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvlib"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.append((sub if sub in modules else node.module, node.lineno, id(node) in in_function))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kvlib"):
                    out.append((alias.name, node.lineno, id(node) in in_function))
    return out


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_lives_in_a_layer():
    loose = [m for m in _modules() if _layer(m) is None and m not in ("kvlib", "kvlib.__main__")]
    assert not loose, f"modules outside kvlib/{{{','.join(LAYERS)}}}/: {loose}"


def test_no_upward_import():
    bad = []
    for module, path in _modules().items():
        own = _layer(module)
        for target, line, _ in _kvlib_imports(path):
            if own is not None and target != "kvlib" and (_layer(target) or 0) > own:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({LAYERS[own]}) imports {target}")
    assert not bad, "a lower layer imports a higher one:\n" + "\n".join(bad)


def test_no_import_circle():
    modules = _modules()
    graph = {m: sorted({t for t, _, _ in _kvlib_imports(p) if t in modules and t != m and t != "kvlib"})
             for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_inside_functions_only_for_heavy_packages():
    bad = []
    for path in _modules().values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                else:
                    continue
                bad += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {n}" for n in names
                        if n.split(".")[0] not in DEFERRED_OK]
    assert not bad, "imports inside functions (hoist them to the module's top):\n" + "\n".join(sorted(set(bad)))


def test_every_module_imports():
    """Every module imports in a fresh interpreter (an import circle that the static check misses fails here)."""
    import subprocess
    import sys

    for module in sorted(_modules()):
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=PACKAGE.parent,
                       capture_output=True, text=True)
