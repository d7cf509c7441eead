"""The package's shape: layers that only import downwards, no import cycles, no command imported by a library."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "giseg"
# lowest first; a module may import its own layer and those below, never one above
LAYERS = ("utils", "data", "models", "inference", "evaluation", "training", "commands", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else "cli"
    return LAYERS.index("cli" if part in ("cli", "__main__") else part)


def package_imports(path: Path) -> list[tuple[str, int]]:
    """(imported giseg module, line) for every import in the file, at any depth (function-level ones too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("giseg")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("giseg"):
            base = node.module
            for a in node.names:  # `from giseg.data import gi` imports the module giseg.data.gi
                sub = f"{base}.{a.name}"
                out.append((sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file() else base,
                            node.lineno))
    return out


def graph() -> dict[str, list[tuple[str, int]]]:
    files = [p for p in PACKAGE.rglob("*.py") if "gi_dice" not in p.parts]
    return {module_name(p): package_imports(p) for p in files}


def test_layers_import_only_downwards():
    upward = [f"{m}:{line} imports {dep}" for m, deps in graph().items() for dep, line in deps
              if dep != "giseg" and layer(dep) > layer(m)]
    assert upward == []


def test_no_library_module_imports_a_command():
    offenders = [f"{m}:{line} imports {dep}" for m, deps in graph().items() for dep, line in deps
                 if dep.startswith("giseg.commands") and layer(m) < LAYERS.index("commands")]
    assert offenders == []
    for top in ("trainer", "model", "utils"):  # nor the top-level files that users open
        assert all(not dep.startswith(top) for deps in graph().values() for dep, _ in deps)


def test_no_import_cycles():
    edges = {m: {d for d, _ in deps if d != m and d != "giseg"} for m, deps in graph().items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_graph_check_sees_function_level_imports(tmp_path):
    """The checks above read imports at any depth, so a lazy import cannot hide an upward one."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from giseg.training.config import TrainConfig\n    import giseg.commands.cv\n")
    assert [d for d, _ in package_imports(f)] == ["giseg.training.config", "giseg.commands.cv"]


def test_every_registered_dataset_is_a_module_of_the_data_layer():
    """The registry names its adapters as "module:class" strings (one line per dataset), which the import graph
    above cannot see: they must be data-layer modules, so the layering holds for them too."""
    from giseg.data.registry import ADAPTERS, DATASETS

    for name, ref in ADAPTERS.items():
        module = ref.split(":")[0]
        assert module.startswith("giseg.data.") and (ROOT / (module.replace(".", "/") + ".py")).is_file(), ref
        assert DATASETS[name].name == name


def test_no_package_module_is_over_400_lines():
    """A module that grows past ~400 lines holds more than one job: split it by job (issue #39 split utils.py,
    data/hf.py and data/nnunet.py)."""
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if "gi_dice" not in p.parts
            and (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
