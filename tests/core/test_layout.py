"""The house rules that keep the library a library: the core never reaches into the testbed or the
benchmarks, and no module imports another's private names."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "memfree"
PACKAGES = [CORE, ROOT / "testbed" / "memfree_testbed", ROOT / "benchmarks" / "memfree_bench", ROOT / "experiments"]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_the_core_never_names_the_testbed_or_the_benchmarks():
    for path in CORE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for module, _ in _imports(path):
            assert not module.startswith(("memfree_testbed", "memfree_bench")), f"{path} imports {module}"
        assert "memfree_testbed" not in text and "memfree_bench" not in text, path
        assert "testbed/" not in text and "manifest.json" not in text, f"{path} names a testbed path"


def test_no_module_imports_a_private_name_from_another():
    for root in PACKAGES:
        for path in root.rglob("*.py"):
            for module, names in _imports(path):
                private = [n for n in names if n.startswith("_") and n != "__future__"]
                assert not private, f"{path} imports {private} from {module}"


def test_the_testbed_does_not_import_the_benchmarks():
    for path in (ROOT / "testbed" / "memfree_testbed").rglob("*.py"):
        assert not any(m.startswith("memfree_bench") for m, _ in _imports(path)), path
