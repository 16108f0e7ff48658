"""DESIGN.md's import rule, checked on the project's own source by an AST scan:

- dependencies point one way: rtdp -> evaluation -> deploy -> planners -> policy; evaluation -> envs; envs depends on
  no other package of ours, and deploy does not import envs;
- inside a package, modules form no cycle (an import inside a function counts: hiding a back edge is still one);
- no module imports another module's private (`_name`) names.

The scan is also run on small trees made here that break each rule, so it is seen to catch them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rtdp", "evaluation", "deploy", "planners", "policy", "envs")
ALLOWED = {"rtdp": {"evaluation", "deploy", "planners", "policy", "envs"},
           "evaluation": {"deploy", "planners", "policy", "envs"},
           "deploy": {"planners", "policy"}, "planners": {"policy"}, "policy": set(), "envs": set()}


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []:
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it) for every import of ours in the file, wherever it stands."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, None) if sub in known else (target, a.name))
    resolved = []
    for target, taken in out:
        if target.split(".")[0] not in PACKAGES:
            continue
        while target not in known and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in known and target != name:
            resolved.append((target, taken))
    return resolved


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), leaving out a package's __init__ that
    re-exports its own submodules."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)

    def reexport(c):
        return all(any(o.startswith(x + ".") or x.startswith(o + ".") for o in c if o != x) for x in c)
    return [c for c in found if not reexport(c)]


def scan(root: Path) -> list[str]:
    known = modules(root)
    edges: dict[str, set[str]] = {}
    findings = set()
    for name, path in known.items():
        for target, taken in imports(name, path, known):
            edges.setdefault(name, set()).add(target)
            src, dst = name.split(".")[0], target.split(".")[0]
            if src != dst and dst not in ALLOWED[src]:
                findings.add(f"against the arrows: {name} -> {target}")
            if taken and taken.startswith("_") and not taken.startswith("__"):
                findings.add(f"private name: {name} imports {target}.{taken}")
    findings |= {"cycle: " + " <-> ".join(c) for c in cycles(edges)}
    return sorted(findings)


def test_the_project_follows_the_import_rule():
    assert scan(ROOT) == []


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize("files,finding", [
    ({"deploy/__init__.py": "", "deploy/a.py": "def f():\n    from .b import g\n", "deploy/b.py": "from .a import f\n"},
     "cycle: deploy.a <-> deploy.b"),
    ({"deploy/__init__.py": "", "deploy/a.py": "from envs.tasks import make_env\n", "envs/__init__.py": "",
      "envs/tasks.py": ""}, "against the arrows: deploy.a -> envs.tasks"),
    ({"policy/__init__.py": "", "policy/a.py": "import deploy.b\n", "deploy/__init__.py": "", "deploy/b.py": ""},
     "against the arrows: policy.a -> deploy.b"),
    ({"deploy/__init__.py": "", "deploy/a.py": "from .b import _helper\n", "deploy/b.py": "def _helper(): ...\n"},
     "private name: deploy.a imports deploy.b._helper"),
])
def test_the_scan_catches_each_kind_of_breach(tmp_path, files, finding):
    assert finding in scan(write(tmp_path, files))


def test_a_package_reexporting_its_modules_is_no_cycle(tmp_path):
    root = write(tmp_path, {"policy/__init__.py": "from .a import f\n", "policy/a.py": "from . import b\n",
                            "policy/b.py": "X = 1\n"})
    assert scan(root) == []
