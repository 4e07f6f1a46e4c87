"""Dependencies point one way (docs/ARCHITECTURE.md): no library module imports scripts/ (by package, by a script's
module name, or through a sys.path entry to the folder)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("diffusion", "controlnet", "sde")


def script_references(path: Path, script_modules: set[str]) -> list[str]:
    """Imports of `scripts` or of a module in scripts/, and the string "scripts" (a sys.path hack), with lines."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [] if node.level else [node.module or ""]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip("/") == "scripts":
            names = ["scripts"]
        else:
            continue
        found += [f"{node.lineno}: {n}" for n in names if n.split(".")[0] in script_modules | {"scripts"}]
    return found


def test_no_library_module_imports_scripts():
    script_modules = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    assert {"make_fill_dataset", "make_tiny_sd"} <= script_modules
    bad = {str(p.relative_to(ROOT)): refs for pkg in LIBRARY for p in sorted((ROOT / pkg).rglob("*.py"))
           if (refs := script_references(p, script_modules))}
    assert not bad, f"library modules importing scripts/: {bad}"


def test_the_scan_sees_each_kind_of_reference(tmp_path):
    src = tmp_path / "m.py"
    for code in ("import make_fill_dataset", "from scripts.make_tiny_sd import x", "import scripts",
                 "p = ROOT / 'scripts'"):
        src.write_text(code + "\n")
        assert script_references(src, {"make_fill_dataset", "make_tiny_sd"}), code
    src.write_text("from .scripts import x\nimport diffusion.models.tokenizer\n")
    assert not script_references(src, {"make_fill_dataset"})


def test_schedule_core_imports_in_any_order_and_keeps_its_public_names():
    """diffusion/schedule.py re-exports schedule_base.py and schedule_discrete.py (a DAG, no import cycle): the
    discrete module loads first in a bare interpreter (no package __init__), and every public name has one home."""
    import subprocess
    import sys

    import diffusion
    from diffusion import schedule, schedule_base, schedule_discrete

    for name in schedule.__all__:
        assert getattr(schedule, name) is getattr(diffusion, name, getattr(schedule, name))
    assert schedule.Discrete is schedule_discrete.Discrete and schedule.Schedule is schedule_base.Schedule
    code = ("import sys, types; pkg = types.ModuleType('diffusion'); pkg.__path__ = [sys.argv[1]];"
            "sys.modules['diffusion'] = pkg; import diffusion.schedule_discrete as d, diffusion.schedule as s;"
            "assert s.get_schedule('linear').__class__ is d.Discrete")
    subprocess.run([sys.executable, "-c", code, str(ROOT / "diffusion")], check=True, cwd=ROOT)
