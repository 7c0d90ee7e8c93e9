"""Every run ends, promptly and clearly: whole-call deadlines, Ctrl+C and SIGTERM, no secret
in clear, one clear line for every bad answer. Over real sockets against the fake platform,
the script run as a child process the way users and runners run it."""

import signal
import socket
import sys
import time
from time import perf_counter

import httpx
import pytest

from conftest import assert_one_clear_line, run_unattended, start_unattended, wait_until, write_copy
from fake_platform import DEMO_PASSWORD

ORGANIZATIONS = "/api/inclusions/getAllOrganizations"
LOGIN = "/api/auth/ziwig-pro/login"
POSIX_SIGNALS = pytest.mark.skipif(sys.platform == "win32", reason="sends POSIX signals to one process")


# --- A deadline per call ------------------------------------------------------


@pytest.mark.parametrize("fault", [{"trickle": 0.5}, {"stall": True}])
def test_a_server_that_trickles_or_stalls_is_cut_off_at_the_call_timeout(logged_in, fake, monkeypatch, fault):
    monkeypatch.setattr(logged_in, "API_TIMEOUT", 1.0)
    monkeypatch.setattr(logged_in, "ERROR_MAX_RETRY", 2)
    fake.fail_next(ORGANIZATIONS, count=2, **fault)
    started = perf_counter()
    with pytest.raises(logged_in.RetriesExhausted) as raised:
        logged_in.get_all_organizations()
    elapsed = perf_counter() - started
    assert 2.0 <= elapsed < 3.0  # two attempts of one second each, and the wait between them
    assert isinstance(raised.value.__cause__, httpx.ReadTimeout)
    assert "no complete answer within the time allowed" in str(raised.value)


def test_a_call_cut_off_by_its_deadline_is_retried_and_can_succeed(logged_in, fake, monkeypatch):
    monkeypatch.setattr(logged_in, "API_TIMEOUT", 1.0)
    fake.fail_next(ORGANIZATIONS, trickle=0.5)
    assert logged_in.get_all_organizations()
    assert fake.calls(ORGANIZATIONS) == 2


# --- Ctrl+C and SIGTERM ---------------------------------------------------------

BUSY_JOB = """\
    with main_thread_pool as executor:
        futures = [executor.submit(get_all_organizations) for _ in range(400)]
        for future in {wait}(futures):
            future.result()
"""


def start_busy_run(tmp_path, fake, wait="iter_completed"):
    """A copy whose 20 threads are each in a call the fake answers in 30 s."""
    script = write_copy(tmp_path, BUSY_JOB.format(wait=wait))
    process = start_unattended(script, fake, EB_THREADS="20")
    wait_until(lambda: fake.calls(ORGANIZATIONS) >= 20, timeout=30)
    assert fake.calls(ORGANIZATIONS) == 20
    time.sleep(0.3)  # the 20 calls are well under way
    return process


@POSIX_SIGNALS
@pytest.mark.fake(latency=30.0)
@pytest.mark.usefixtures("sigint_reaches_children")
@pytest.mark.parametrize("stop, status, words", [(signal.SIGINT, 130, "by the user (Ctrl+C)"),
                                                 (signal.SIGTERM, 143, "by SIGTERM")])
@pytest.mark.parametrize("wait", ["iter_completed", "as_completed"])
def test_a_stop_signal_with_20_calls_in_flight_ends_the_run_within_2_seconds(tmp_path, fake, stop, status, words, wait):
    process = start_busy_run(tmp_path, fake, wait)
    signalled_at = time.monotonic()
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=30)
    exited_after = time.monotonic() - signalled_at

    assert process.returncode == status
    assert exited_after < 2.0
    assert assert_one_clear_line(stderr) == f"Interrupted {words}."
    late = [arrived - signalled_at for arrived, _, path in fake.request_times() if arrived > signalled_at + 0.05]
    assert late == [], "requests reached the server after the stop"
    log = (tmp_path / "my_job.log").read_text(encoding="utf-8")
    assert f"Run interrupted {words}" in log
    assert log.rstrip().endswith(f"Exit status {status}")


SLOW_TO_CLEAN_UP = """\
    try:
        print("waiting", flush=True)
        sleep(60)
    except KeyboardInterrupt:
        print("cleaning up", flush=True)
        sleep(60)
        raise
"""


@POSIX_SIGNALS
@pytest.mark.usefixtures("sigint_reaches_children")
def test_a_second_ctrl_c_exits_at_once(tmp_path, fake):
    script = write_copy(tmp_path, SLOW_TO_CLEAN_UP)
    process = start_unattended(script, fake)
    assert "waiting" in read_until(process, "waiting")  # inside the job's try
    process.send_signal(signal.SIGINT)
    assert "cleaning up" in read_until(process, "cleaning up")
    second_at = time.monotonic()
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=30)
    assert time.monotonic() - second_at < 1.0
    assert process.returncode == 130
    assert "Second stop signal" in (tmp_path / "my_job.log").read_text(encoding="utf-8")


def read_until(process, text, timeout=30):
    """What the process printed on stdout, up to the line holding `text`."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        seen.append(line)
        if text in line or not line:
            break
    return "".join(seen)


# --- No secret in clear -----------------------------------------------------------


@pytest.fixture
def capture_server():
    """A socket on 127.0.0.1 that accepts nothing: the test asks it afterwards whether
    anyone tried to connect."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(0.2)
        yield server


def connections_to(server):
    try:
        server.accept()[0].close()
        return 1
    except socket.timeout:
        return 0


@pytest.mark.parametrize("service", ["IAM", "RC"])
def test_plain_http_to_another_machine_is_a_bad_setting_and_nothing_is_sent(tmp_path, fake, capture_server, service):
    proxy = f"http://127.0.0.1:{capture_server.getsockname()[1]}"  # where a request would go
    result = run_unattended(
        write_copy(tmp_path), fake, **{f"EB_{service}_BASE_URL": "http://platform.example.org"},
        HTTP_PROXY=proxy, HTTPS_PROXY=proxy, ALL_PROXY=proxy,
    )
    assert result.returncode == 2
    line = assert_one_clear_line(result.stderr)
    assert f"EB_{service}_BASE_URL" in line and "https://" in line
    assert connections_to(capture_server) == 0
    assert fake.calls(LOGIN) == 0


@pytest.mark.parametrize("url", ["http://localhost:9", "http://127.0.0.2:9", "http://[::1]:9"])
def test_plain_http_to_this_machine_is_allowed(template, monkeypatch, url):
    monkeypatch.setitem(template.MICROSERVICES["RC"], "base_url", url)
    template._check_base_urls()


def test_a_password_typed_as_the_password_file_is_never_shown(tmp_path, fake):
    result = run_unattended(write_copy(tmp_path), fake, EB_PASSWORD=None, EB_PASSWORD_FILE=DEMO_PASSWORD)
    assert result.returncode == 2
    assert_one_clear_line(result.stderr, "EB_PASSWORD_FILE")
    assert DEMO_PASSWORD not in result.stderr + result.stdout
    assert DEMO_PASSWORD not in (tmp_path / "my_job.log").read_text(encoding="utf-8")


# --- Robust first login, one clear line for every failure -------------------------


def test_a_transient_503_at_the_first_login_does_not_fail_the_run(tmp_path, fake):
    fake.fail_next(LOGIN, status=503)
    result = run_unattended(write_copy(tmp_path), fake)
    assert result.returncode == 0, result.stderr
    assert fake.calls(LOGIN) == 2


@pytest.mark.parametrize(
    "path, fault, expected",
    [
        (ORGANIZATIONS, {"status": 200, "body": "<html><body>Proxy login</body></html>", "content_type": "text/html"},
         "answer from GET {RC}/api/inclusions/getAllOrganizations is not JSON (text/html)"),
        (ORGANIZATIONS, {"status": 200, "body": '{"data": [1, 2', "content_type": "application/json"},
         "answer from GET {RC}/api/inclusions/getAllOrganizations is not JSON (application/json)"),
        (LOGIN, {"status": 200, "body": '{"userId": "user-0001"}', "content_type": "application/json"},
         "login answer from POST {IAM}/api/auth/ziwig-pro/login has no access_token"),
        (ORGANIZATIONS, {"drop": True, "count": 10},
         "GET {RC}/api/inclusions/getAllOrganizations: the server closed the connection without a complete answer"),
        (ORGANIZATIONS, {"status": 403}, "403 Forbidden from GET {RC}/api/inclusions/getAllOrganizations"),
    ],
    ids=["html", "truncated-json", "login-without-token", "lost-answer", "forbidden"],
)
def test_a_bad_answer_ends_the_run_with_one_line_naming_the_request(tmp_path, fake, path, fault, expected):
    fake.fail_next(path, **fault)
    script = write_copy(tmp_path, replacements=[("WAIT_BEFORE_RETRY = 0.5", "WAIT_BEFORE_RETRY = 0.01")])
    result = run_unattended(script, fake)
    assert result.returncode == 1
    assert_one_clear_line(result.stderr, expected.format(**fake.urls))
    assert "Traceback" in (tmp_path / "my_job.log").read_text(encoding="utf-8")


# --- Rate limits are waited out ------------------------------------------------------


def test_twelve_429s_with_retry_after_are_waited_out_and_the_call_succeeds(logged_in, fake):
    fake.fail_next(ORGANIZATIONS, count=12, status=429, headers={"Retry-After": "1"})
    started = perf_counter()
    assert logged_in.get_all_organizations()
    assert perf_counter() - started >= 11.5
    assert fake.calls(ORGANIZATIONS) == 13  # more than ERROR_MAX_RETRY: no attempt used up


def test_a_rate_limit_longer_than_the_cap_fails_the_call_and_says_so(logged_in, fake, monkeypatch):
    monkeypatch.setattr(logged_in, "RATE_LIMIT_MAX_WAIT", 2)
    fake.fail_next(ORGANIZATIONS, count=10, status=429, headers={"Retry-After": "1"})
    with pytest.raises(logged_in.RateLimited, match="RATE_LIMIT_MAX_WAIT"):
        logged_in.get_all_organizations()
    assert fake.calls(ORGANIZATIONS) == 3


def test_plain_http_to_this_machine_never_goes_through_a_proxy(tmp_path, fake, capture_server):
    proxy = f"http://127.0.0.1:{capture_server.getsockname()[1]}"
    result = run_unattended(write_copy(tmp_path), fake, HTTP_PROXY=proxy, ALL_PROXY=proxy)
    assert result.returncode == 0, result.stderr
    assert connections_to(capture_server) == 0


@POSIX_SIGNALS
@pytest.mark.fake(auth_latency=30.0)
@pytest.mark.usefixtures("sigint_reaches_children")
def test_ctrl_c_during_a_slow_login_ends_the_run_within_2_seconds(tmp_path, fake):
    script = write_copy(tmp_path)
    process = start_unattended(script, fake)
    wait_until(lambda: fake.calls(LOGIN) > 0, timeout=30)
    time.sleep(0.3)
    signalled_at = time.monotonic()
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=30)
    assert process.returncode == 130
    assert time.monotonic() - signalled_at < 2.0
