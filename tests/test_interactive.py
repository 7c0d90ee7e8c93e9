"""A copy of the template run the way a user runs it: `python my_job.py` in a terminal
(a pseudo-terminal driven by pexpect), answering the prompts."""

import sys

import pytest

from conftest import script_environment, write_copy
from fake_platform import DEMO_PASSWORD

if sys.platform == "win32":
    pytest.skip("pseudo-terminals (pexpect.spawn) are POSIX-only", allow_module_level=True)

import pexpect  # noqa: E402 - after the skip: pexpect.spawn does not exist on Windows

pytestmark = pytest.mark.usefixtures("sigint_reaches_children")

MY_JOB = """\
    organizations = get_all_organizations()
    with tqdm(total=len(organizations), desc="Records", bar_format=custom_bar_format, disable=None) as pbar:
        with main_thread_pool as executor:
            futures = [executor.submit(search_inclusions, org["id"], 10, 1) for org in organizations]
            for future in iter_completed(futures):
                future.result()
                pbar.update(1)
    tqdm.write(f"My job saw {len(organizations)} organizations")
"""


def spawn(script, fake, **settings):
    """`python my_job.py` in a fresh pseudo-terminal; the user did not export EB_PASSWORD."""
    settings = {"TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1", "EB_PASSWORD": None, "EB_USER_NAME": None, **settings}
    environment = script_environment(fake, **settings)
    return pexpect.spawn(
        sys.executable, [script.name], cwd=str(script.parent), env=environment,
        encoding="utf-8", timeout=30, dimensions=(40, 160),
    )


def finish_job(child):
    """Wait for the job's output and the final pause, press Enter; the exit status."""
    child.expect("My job saw 8 organizations")
    child.expect(r"Elapsed time: \d+:\d\d:\d\d")
    child.expect("Press Enter to exit...")
    child.send("\r")
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def answer_prompts(child, password=DEMO_PASSWORD, threads="\r"):
    child.expect("login:")
    child.send("\r")  # the default user name
    child.expect("password:")
    child.send(password + "\r")
    child.expect("Login Success")
    child.expect("Number of threads:")
    child.send(threads)


@pytest.mark.parametrize("log_level", ["INFO", "DEBUG"])
def test_a_user_runs_a_copy_answers_the_prompts_and_finds_the_log(tmp_path, fake, log_level):
    script = write_copy(
        tmp_path, MY_JOB, replacements=[("LOG_LEVEL = logging.INFO", f"LOG_LEVEL = logging.{log_level}")]
    )
    child = spawn(script, fake)
    answer_prompts(child)
    assert finish_job(child) == 0

    log = (tmp_path / "my_job.log").read_text(encoding="utf-8")
    assert "Exit status 0" in log
    assert DEMO_PASSWORD not in log
    leaked = [secret for secret in fake.issued_secrets() if secret in log]
    assert leaked == []
    if log_level == "DEBUG":
        assert "HTTP Request: POST" in log  # a DEBUG log says much more, still no secret


def test_ctrl_c_at_the_login_prompt_cancels_the_run(tmp_path, fake):
    child = spawn(write_copy(tmp_path), fake)
    child.expect("login:")
    child.sendintr()
    child.expect(pexpect.EOF, timeout=10)
    child.close()
    assert child.exitstatus == 130
    assert "Press Enter" not in child.before
    assert fake.calls("/api/auth/ziwig-pro/login") == 0


def test_a_wrong_password_at_the_terminal_is_asked_again(tmp_path, fake):
    child = spawn(write_copy(tmp_path, MY_JOB), fake)
    child.expect("login:")
    child.send("\r")
    child.expect("password:")
    child.send("wrong\r")
    child.expect("Login Error: 401 Unauthorized")
    answer_prompts(child)
    assert finish_job(child) == 0


def test_an_invalid_thread_count_is_refused_at_the_prompt(tmp_path, fake):
    child = spawn(write_copy(tmp_path, MY_JOB), fake)
    answer_prompts(child, threads="\x7f\x7f" + "99\r")
    child.expect("Invalid input")
    child.send("\x7f\x7f5\r")
    assert finish_job(child) == 0


def test_eb_non_interactive_makes_a_terminal_run_unattended(tmp_path, fake):
    child = spawn(write_copy(tmp_path, MY_JOB), fake, EB_NON_INTERACTIVE="1", EB_PASSWORD=DEMO_PASSWORD)
    child.expect("My job saw 8 organizations")
    child.expect("Elapsed time")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "login:" not in child.before and "Press Enter" not in child.before


UPDATE_JOB = """\
    for patient_id in ("pat-001-0001", "pat-001-0002"):
        update_record_fields(patient_id, {"consentVersion": "v2"})
    tqdm.write("My job saw 8 organizations")
"""
DOWN = "\x1b[B"


@pytest.mark.parametrize("keys, changes", [("\r", 0), (DOWN + "\r", 2)], ids=["enter-dry-run", "real-run"])
def test_a_script_that_changes_data_asks_dry_or_real_run_after_the_threads_dry_by_default(tmp_path, fake, keys,
                                                                                            changes):
    script = write_copy(tmp_path, UPDATE_JOB, replacements=[("CHANGES_DATA = False", "CHANGES_DATA = True")])
    child = spawn(script, fake)
    answer_prompts(child)
    child.expect("Run mode:")
    child.send(keys)
    if not changes:
        child.expect("DRY RUN")
    assert finish_job(child) == 0
    assert fake.total_changes() == changes


def test_a_resume_is_announced_at_the_terminal_before_it_is_done(tmp_path, fake):
    script = write_copy(tmp_path, UPDATE_JOB, replacements=[("CHANGES_DATA = False", "CHANGES_DATA = True")])
    fake.fail_next("/api/records/byPatient", method="PATCH", status=500)
    first = spawn(script, fake)
    answer_prompts(first)
    first.expect("Run mode:")
    first.send(DOWN + "\r")
    first.expect("Press Enter to exit...")
    first.send("\r")
    first.expect(pexpect.EOF)
    first.close()
    assert first.exitstatus == 1

    second = spawn(script, fake)
    answer_prompts(second)
    second.expect("Run mode:")
    second.send(DOWN + "\r")
    second.expect("Resuming 1 unfinished run")
    assert finish_job(second) == 0
    assert fake.changes("pat-001-0001") == 1 and fake.changes("pat-001-0002") == 1


def test_a_run_whose_output_is_redirected_is_unattended_even_at_a_terminal(tmp_path, fake):
    script = write_copy(tmp_path, MY_JOB)
    environment = script_environment(fake, EB_PASSWORD=None, EB_USER_NAME=None, TERM="xterm")
    child = pexpect.spawn("sh", ["-c", f'exec "{sys.executable}" {script.name} > out.txt'], cwd=str(tmp_path),
                          env=environment, encoding="utf-8", timeout=30)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2  # no prompt could be drawn: unattended, and no credentials set
    assert "No credentials" in child.before and "login:" not in child.before


@pytest.mark.parametrize("no_color", [None, "1"])
def test_no_color_turns_the_colours_off(tmp_path, fake, no_color):
    child = spawn(write_copy(tmp_path, MY_JOB), fake, NO_COLOR=no_color)
    answer_prompts(child)
    child.expect("Starting main processing")
    coloured = "\x1b[1;36m" in child.before + child.after
    assert finish_job(child) == 0
    assert coloured == (no_color is None)
