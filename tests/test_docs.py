"""The runnable examples of the docs run (every python block that starts with an import)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(path.name, i, code) for path in DOCS
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))
          if code.startswith(("import", "from"))]


COMPILED = "# runs the default compiled path"  # a block saying so runs without EMOQ_COMPILE=0 (tests/conftest.py)


@pytest.mark.parametrize("name,index,code", [
    pytest.param(n, i, code, marks=[pytest.mark.compiled] if COMPILED in code else [], id=f"{n}-{i}")
    for n, i, code in BLOCKS])
def test_doc_example_runs(name, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{name}[{index}]", "exec"), {"__name__": "__doc_example__"})
