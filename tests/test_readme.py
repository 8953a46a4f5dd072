"""The README's promises: its API example runs as written, and the Makefile's install is idempotent."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


EXAMPLES = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_api_example_runs_as_written(capsys):
    exec(compile(EXAMPLES[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"task loss \d+\.\d+, LNSR penalty \S+ \(\d+\.\d% of the loss\), fell back to Gaussian: \d+", out), out


# The complete examples (the backends', the peer methods'); the others continue the first one.
COMPLETE = [code for code in EXAMPLES[1:] if code.startswith("import")]


@pytest.mark.parametrize("code", COMPLETE, ids=range(len(COMPLETE)))
def test_every_complete_readme_example_runs_as_written(code):
    exec(compile(code, "README.md", "exec"), {})


def test_readme_has_the_backends_and_methods_examples():
    assert len(COMPLETE) >= 2, COMPLETE


@pytest.mark.skipif(shutil.which("make") is None or not (ROOT / ".venv" / ".installed").exists(),
                    reason="needs make and the .venv that `make test` creates")
def test_make_rerun_installs_nothing():
    # `make -q` exits 0 only when every target is up to date, i.e. a re-run would run no command.
    assert subprocess.run(["make", "-q", "install"], cwd=ROOT).returncode == 0


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
