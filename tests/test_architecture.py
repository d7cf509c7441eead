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


def package_files():
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "gi_dice" not in p.parts]


def functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_package_function_is_over_60_lines():
    """A function that does one job reads in one screen (issue #39 split card_text, write_rtstruct, tune, ...)."""
    long = [f"{module_name(p)}.{f.name}: {f.end_lineno - f.lineno + 1} lines" for p in package_files()
            for f in functions(ast.parse(p.read_text())) if f.end_lineno - f.lineno + 1 > 60]
    assert long == []


MUTATORS = {"add", "append", "update", "setdefault", "clear", "pop", "popitem", "discard", "extend", "insert",
            "remove", "set"}


def module_state_writes(path: Path) -> list[str]:
    """Where a function changes a module-level name: `global`, NAME.add(...) and the like, NAME[...] = ..."""
    tree = ast.parse(path.read_text())
    names = {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
             for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    out = []
    for fn in functions(tree):
        for node in ast.walk(fn):
            if isinstance(node, ast.Global):
                out.append(f"{path.name}:{node.lineno} global {', '.join(node.names)}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and isinstance(node.func.value, ast.Name) and node.func.value.id in names
                  and node.func.attr in MUTATORS):
                out.append(f"{path.name}:{node.lineno} {node.func.value.id}.{node.func.attr}(...)")
            elif isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                out += [f"{path.name}:{node.lineno} {t.value.id}[...] =" for t in targets
                        if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id in names]
    return out


def test_no_function_changes_module_level_state():
    """Tables at module level are constants; what changes at run time lives in an object (training/cv.py's
    FoldRunner, not the _LIVE and _STOPPING globals it had)."""
    assert [w for p in package_files() for w in module_state_writes(p)] == []


def test_the_module_state_check_sees_globals_and_mutations(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("SEEN = set()\nN = 0\nTABLE = {}\n\ndef f():\n    global N\n    SEEN.add(1)\n    TABLE['a'] = 1\n")
    assert sorted(w.split(" ", 1)[1] for w in module_state_writes(f)) == ["SEEN.add(...)", "TABLE[...] =", "global N"]


def unexplained_lazy_imports(path: Path) -> list[str]:
    """Function-level imports of our own code with no reason beside them: a comment on the import, or on an import
    line of the same block just above it."""
    lines = path.read_text().splitlines()
    out = []
    for fn in functions(ast.parse("\n".join(lines))):
        for node in ast.walk(fn):
            own = (isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("giseg"))
                   or isinstance(node, ast.Import) and any(a.name.startswith("giseg") for a in node.names))
            if not own:
                continue
            first = node.lineno - 1
            while first > 0 and lines[first - 1].lstrip().startswith(("from ", "import ")):
                first -= 1
            if not any("#" in line for line in lines[first:node.end_lineno]):
                out.append(f"{module_name(path)}:{node.lineno} {lines[node.lineno - 1].strip()}")
    return out


def test_every_function_level_import_of_our_code_says_why():
    """A lazy import hides a dependency from the reader: each one says what it avoids (torch for --help, an
    optional extra, transformers for the ONNX backend), or it goes to the top of the module."""
    assert [x for p in package_files() for x in unexplained_lazy_imports(p)] == []


def task_name_comparisons(path: Path) -> list[str]:
    """`x == "presence"` and the like: code that decides by a task's name instead of asking the task."""
    from giseg.models.tasks import TASKS

    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            values = [node.left, *node.comparators]
            names = [v.value for v in values if isinstance(v, ast.Constant) and v.value in TASKS]
            names += [e.value for v in values if isinstance(v, (ast.Tuple, ast.List, ast.Set)) for e in v.elts
                      if isinstance(e, ast.Constant) and e.value in TASKS]
            out += [f"{module_name(path)}:{node.lineno} compares with {n!r}" for n in names]
    return out


def test_no_code_decides_by_a_task_name():
    """The task (multilabel / multiclass / presence) is one object (giseg/models/tasks.py): its labels, outputs,
    probabilities, masks and figure. Code asks it (get_task(name).background, .segments ...), so a new task is one
    entry there, not ~40 checks across 15 files."""
    assert [x for p in package_files() if p.name != "tasks.py" for x in task_name_comparisons(p)] == []


def hand_made_options(path: Path) -> list[str]:
    """dataclasses.field(metadata={...}) written out: an option declared outside utils.options.flag()."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "field":
            if any(k.arg == "metadata" and isinstance(k.value, ast.Dict) for k in node.keywords):
                out.append(f"{module_name(path)}:{node.lineno}")
    return out


def test_every_option_is_declared_with_the_one_flag_helper():
    """Training, spec, HF, run and scoring options all come from giseg.utils.options.flag() (default, help, section,
    identity, card and check beside the field): no hand-written metadata dict that could drift from it."""
    assert [x for p in package_files() for x in hand_made_options(p)] == []
