"""The layout's one hard rule (DESIGN.md): the data plane, `jobs/`, never imports the control plane."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_jobs_never_import_orchestrator():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "orchestrator")
                 for p in (ROOT / "jobs").glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}
    assert len(offenders) > 10, "the check must see the jobs modules"
