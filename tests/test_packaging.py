"""The files around the template say the same thing as the template."""

import re

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import eb_script_template as template
from conftest import ROOT

README = (ROOT / "README_TEMPLATE.md").read_text(encoding="utf-8")


def pep723_dependencies():
    """The dependencies of the template's `# /// script` block."""
    text = (ROOT / "eb_script_template.py").read_text(encoding="utf-8")
    block = re.search(r"^# /// script\n(.*?)^# ///$", text, re.S | re.M)[1]
    return tomllib.loads("\n".join(line.removeprefix("# ").removeprefix("#") for line in block.splitlines()))


def test_the_three_dependency_lists_agree():
    requirements = [
        line.strip()
        for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert sorted(requirements) == sorted(pep723_dependencies()["dependencies"]) == sorted(pyproject["dependencies"])
    assert pep723_dependencies()["requires-python"] == pyproject["requires-python"]


def test_the_runtime_dependencies_are_the_four_the_user_fixed():
    names = {re.split(r"[<>=]", requirement)[0] for requirement in pep723_dependencies()["dependencies"]}
    assert names == {"httpx", "questionary", "tqdm", "rich"}


def test_ci_runs_exactly_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    test_command = commands[1].split(" && ")[-1]
    assert test_command == ".venv/bin/python -m pytest"
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command in ci_lines


@pytest.mark.parametrize(
    "name",
    ["MAX_THREADS", "SUBTASKS_POOL_SIZE", "ERROR_MAX_RETRY", "WAIT_BEFORE_RETRY", "API_TIMEOUT",
     "DEFAULT_NUMBER_OF_THREADS", "AUTH_TIMEOUT", "RETRY_AFTER_MAX", "STOP_POLL_INTERVAL", "CHANGES_DATA",
     "MAX_FAILED_ITEMS", "MAX_PENDING_TASKS", "STOP_GRACE", "RATE_LIMIT_MAX_WAIT", "LOG_BACKUP_COUNT",
     "REDIRECTED_OUTPUT_WIDTH", "CSV_SEPARATOR", "WRITE_OUTCOMES"],
)
def test_the_readme_gives_each_constant_its_real_default(name):
    row = re.search(rf"^\| `{name}` \| `([^`]*)` \|", README, re.M)
    assert row, f"{name} missing from the README's constants table"
    assert row[1] == repr(getattr(template, name))


def test_the_readme_documents_every_constant():
    constants = [name for name in vars(template) if name.isupper() and not name.startswith("_")]
    missing = [name for name in constants if f"`{name}`" not in README]
    assert missing == []


def test_the_readme_documents_every_environment_variable_the_template_reads():
    text = (ROOT / "eb_script_template.py").read_text(encoding="utf-8")
    variables = set(re.findall(r'"(EB_[A-Z_]+)"', text)) - {"EB_"}
    missing = [name for name in sorted(variables) if f"`{name}`" not in README]
    assert variables and missing == []


def test_the_spec_keeps_the_user_s_defaults():
    assert (template.MAX_THREADS, template.SUBTASKS_POOL_SIZE) == (20, 40)
    assert (template.ERROR_MAX_RETRY, template.WAIT_BEFORE_RETRY, template.API_TIMEOUT) == (10, 0.5, 60)
    assert template.LOG_FORMAT == "%(asctime)s - %(levelname)s - %(message)s"
    assert template.custom_bar_format == (
        "{l_bar}{bar} {n_fmt:>4}/{total_fmt:<4} [{elapsed:<8}<{remaining:>8}, {rate_fmt:>10}]{postfix}"
    )
