"""The README's quick start and CI run the same test command (DEVELOPERS: `.ci/run` runs exactly it)."""

import re

from tests.conftest import REPO


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmds = [b.strip() for b in blocks if "pytest" in b]
    assert len(test_cmds) == 1, test_cmds
    ci = (REPO / ".ci" / "run").read_text()
    (ci_cmd,) = re.findall(r"^TEST_COMMAND='(.*)'$", ci, flags=re.M)
    assert ci_cmd == test_cmds[0]


def test_readme_main_command_runs_evalkit_on_defaults():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    main = [b.strip() for b in blocks if b.strip().endswith("python -m evalkit")]
    assert len(main) == 1 and "pip install -e ." in main[0]
