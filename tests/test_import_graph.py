"""Imports run one way, down the rooms of DESIGN.md: a room never imports a room above it.

Every `import` and `from ... import` statement of every module under prefopt_jax/ counts,
those inside functions (lazy imports) included.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "prefopt_jax")

# Room of each top-level module or package of prefopt_jax (DESIGN.md, "Rule of the road").
ROOMS = {
    "hostmem": 0, "errors": 0,
    "losses": 1, "models": 1, "tokenmdp": 1,
    "data": 2,
    "scoring": 3,
    "sampling": 4, "rewards": 4,
    "train": 5,
    "online": 6, "diffusion": 6,
    "evals": 7,
    "cli": 8, "commands": 8, "registry": 8,
}


def room_of(module: str) -> int | None:
    """The room of a dotted module name inside prefopt_jax (None: the package itself)."""
    parts = module.split(".")
    if parts[0] != "prefopt_jax" or len(parts) == 1:
        return None
    if parts[1] not in ROOMS:
        raise AssertionError(f"prefopt_jax.{parts[1]} has no room in ROOMS; add it")
    return ROOMS[parts[1]]


def module_name(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)[:-len(".py")].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dotted name) of every module an AST imports, relative imports resolved."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            # `from prefopt_jax import train` imports the room named after the dot.
            names = [f"{name}.{a.name}" if name == "prefopt_jax" else name for a in node.names]
            out += [(node.lineno, n) for n in names]
    return out


def upward_imports(package_dir: str = PACKAGE) -> list[str]:
    """Every import of a higher room, as 'path:line: importer (room) -> imported (room)'."""
    found, root = [], os.path.dirname(os.path.abspath(package_dir))
    for dirpath, dirnames, files in os.walk(package_dir):
        dirnames.sort()
        for file in sorted(files):
            if not file.endswith(".py"):
                continue
            path = os.path.join(dirpath, file)
            module = module_name(path, root)
            own = room_of(module)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for line, name in imported(tree, module, file == "__init__.py"):
                target = room_of(name)
                if own is not None and target is not None and target > own:
                    found.append(f"{os.path.relpath(path, root)}:{line}: {module} (room {own}) "
                                 f"imports {name} (room {target})")
    return found


def test_no_room_imports_a_higher_room():
    assert upward_imports() == []


def test_the_check_finds_lazy_upward_imports(tmp_path):
    """The check itself can fail: a lazy import of `train` inside a `losses` function."""
    package = tmp_path / "prefopt_jax"
    (package / "losses").mkdir(parents=True)
    (package / "losses" / "bad.py").write_text(
        "def f():\n    from prefopt_jax.train import loop\n    return loop\n")
    (package / "sampling").mkdir()
    (package / "sampling" / "worse.py").write_text("from prefopt_jax import evals\n")
    found = upward_imports(str(package))
    assert len(found) == 2
    assert "prefopt_jax.losses.bad (room 1) imports prefopt_jax.train (room 5)" in found[0]
    assert "prefopt_jax.sampling.worse (room 4) imports prefopt_jax.evals (room 7)" in found[1]


def test_every_module_has_a_room():
    for name in os.listdir(PACKAGE):
        stem = name[:-3] if name.endswith(".py") else name
        if stem.startswith("__") or not (name.endswith(".py") or
                                         os.path.isdir(os.path.join(PACKAGE, name))):
            continue
        if stem == "__pycache__":
            continue
        assert stem in ROOMS, f"prefopt_jax/{name} has no room"
