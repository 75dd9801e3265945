"""The README's library example runs as written (against a demo base model built here)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    from tests.helpers import save_demo_base

    monkeypatch.chdir(tmp_path)
    save_demo_base(tmp_path / "peftloop-demo" / "base")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
    assert (tmp_path / "runs" / "lib" / "my-adapter" / "adapter_model.safetensors").is_file()
