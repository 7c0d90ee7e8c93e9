"""A copy of the template run as cron or a runner runs it: a child process with no
terminal (stdin from /dev/null), judged by its exit status, stderr and log file."""

import socket
import subprocess
import sys
import time

import pytest

from conftest import assert_one_clear_line, run_unattended, script_environment, write_copy
from fake_platform import DEMO_PASSWORD

ORGANIZATIONS = "/api/inclusions/getAllOrganizations"


def closed_port_url():
    """The URL of a port of 127.0.0.1 where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_the_template_runs_unattended_without_a_prompt_or_a_pause(tmp_path, fake):
    script = write_copy(tmp_path)
    result = run_unattended(script, fake)
    assert result.returncode == 0, result.stderr
    assert "Total" in result.stdout and "356" in result.stdout
    assert "Elapsed time: " in result.stdout
    assert "Press Enter" not in result.stdout
    assert result.stderr == ""
    log = (tmp_path / "my_job.log").read_text(encoding="utf-8")
    assert "Exit status 0" in log
    assert "HTTP Request:" not in log  # httpx's line per request only at DEBUG


def test_a_wrong_password_fails_at_once_with_one_line(tmp_path, fake):
    started = time.monotonic()
    result = run_unattended(write_copy(tmp_path), fake, EB_PASSWORD="wrong-password")
    assert time.monotonic() - started < 5
    assert result.returncode == 1
    assert_one_clear_line(result.stderr, "Login Error: 401 Unauthorized")
    assert fake.calls("/api/auth/ziwig-pro/login") == 1  # no retry loop without a terminal
    assert "wrong-password" not in (tmp_path / "my_job.log").read_text(encoding="utf-8")


def test_an_unreachable_iam_fails_in_bounded_time(tmp_path, fake):
    started = time.monotonic()
    result = run_unattended(write_copy(tmp_path), fake, EB_IAM_BASE_URL=closed_port_url())
    assert time.monotonic() - started < 10  # ten attempts, 0.5 s apart
    assert result.returncode == 1
    assert_one_clear_line(result.stderr, "Login Error: ", "cannot connect", "after 10 attempts")


def test_missing_credentials_are_a_bad_setting(tmp_path, fake):
    result = run_unattended(write_copy(tmp_path), fake, EB_PASSWORD=None)
    assert result.returncode == 2
    assert_one_clear_line(result.stderr, "EB_PASSWORD")
    assert fake.calls("/api/auth/ziwig-pro/login") == 0


@pytest.mark.parametrize("threads", ["0", "99", "abc", "-3", "2.5"])
def test_a_bad_thread_count_is_a_bad_setting_reported_before_login(tmp_path, fake, threads):
    result = run_unattended(write_copy(tmp_path), fake, EB_THREADS=threads)
    assert result.returncode == 2
    assert_one_clear_line(result.stderr, "EB_THREADS", repr(threads))
    assert fake.calls("/api/auth/ziwig-pro/login") == 0


def test_the_password_can_come_from_a_file(tmp_path, fake):
    password_file = tmp_path / "password.txt"
    password_file.write_text(DEMO_PASSWORD + "\n", encoding="utf-8")
    result = run_unattended(write_copy(tmp_path), fake, EB_PASSWORD=None, EB_PASSWORD_FILE=str(password_file))
    assert result.returncode == 0, result.stderr
    assert fake.logins == 1


def test_an_unreadable_password_file_is_a_bad_setting(tmp_path, fake):
    missing = tmp_path / "no-such-file"
    result = run_unattended(write_copy(tmp_path), fake, EB_PASSWORD=None, EB_PASSWORD_FILE=str(missing))
    assert result.returncode == 2
    assert_one_clear_line(result.stderr, "EB_PASSWORD_FILE names no file")
    assert "no-such-file" not in result.stderr  # the value is never shown: it may be a password


def test_a_password_and_a_password_file_together_are_a_bad_setting(tmp_path, fake):
    password_file = tmp_path / "password.txt"
    password_file.write_text(DEMO_PASSWORD, encoding="utf-8")
    result = run_unattended(write_copy(tmp_path), fake, EB_PASSWORD_FILE=str(password_file))
    assert result.returncode == 2
    assert_one_clear_line(result.stderr, "not both")


WORKER_FAILS = """\
    def process(number):
        if number == 3:
            raise ValueError("record 3 is inconsistent")
        return get_all_organizations()

    with main_thread_pool as executor:
        futures = [executor.submit(process, number) for number in range(200)]
        for future in iter_completed(futures):
            try:
                future.result()
            except Exception as exc:
                logging.critical(f"Error in worker: {exc}")
                executor.shutdown(wait=False, cancel_futures=True)
                raise
"""


@pytest.mark.fake(latency=0.05)
def test_a_worker_exception_fails_the_run_and_cancels_the_rest(tmp_path, fake):
    result = run_unattended(write_copy(tmp_path, WORKER_FAILS), fake, EB_THREADS="4")
    assert result.returncode == 1
    assert_one_clear_line(result.stderr, "ValueError: record 3 is inconsistent")
    assert fake.calls(ORGANIZATIONS) < 50
    log = (tmp_path / "my_job.log").read_text(encoding="utf-8")
    assert "Traceback" in log and "Exit status 1" in log


def test_a_closed_stdin_is_an_unattended_run(tmp_path, fake):
    if sys.platform == "win32":
        pytest.skip("closes file descriptor 0 with a POSIX shell")
    script = write_copy(tmp_path)
    environment = script_environment(fake, EB_USER_NAME=None, EB_PASSWORD=DEMO_PASSWORD)
    result = subprocess.run(
        ["sh", "-c", f'exec 0<&- && exec "{sys.executable}" {script.name}'],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Elapsed time" in result.stdout
