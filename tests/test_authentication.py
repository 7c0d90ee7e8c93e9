"""login() answered through prompt_toolkit pipe input, new_token() and main() against the
fake platform over real sockets."""

import threading
from contextlib import contextmanager
from time import perf_counter

import httpx
import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from conftest import errors_in_threads
from fake_platform import DEMO_PASSWORD, DEMO_USER_NAME

LOGIN = "/api/auth/ziwig-pro/login"
REFRESH = "/api/auth/refreshToken"
ENTER = "\r"
CTRL_C = "\x03"
ERASE_DEFAULT = "\x7f" * 60  # backspaces over a prefilled default


@contextmanager
def keyboard(*keys):
    """Keys typed at the questionary prompts, in order."""
    with create_pipe_input() as pipe:
        with create_app_session(input=pipe, output=DummyOutput()):
            pipe.send_text("".join(keys))
            yield


@pytest.fixture
def interactive(template, monkeypatch):
    """The template as if run from a terminal (pytest's stdin is not one)."""
    monkeypatch.setattr(template, "is_interactive", lambda: True)
    return template


def test_login_with_the_default_user_name_and_a_typed_password_succeeds(interactive, fake):
    with keyboard(ENTER, DEMO_PASSWORD + ENTER):
        assert interactive.login() == "Success"
    assert set(interactive.tokens) == {"RC", "GDD"}
    for pair in interactive.tokens.values():
        assert pair["access_token"] in fake.issued_secrets()
        assert pair["refresh_token"] in fake.issued_secrets()
    assert fake.logins == 1


def test_login_with_a_wrong_password_is_an_error(interactive, fake, capsys):
    with keyboard(ENTER, "wrong-password" + ENTER):
        assert interactive.login() == "Error"
    assert interactive.tokens == {}
    assert "Login Error: 401 Unauthorized" in capsys.readouterr().err


def test_login_when_iam_is_down_is_an_error(interactive, monkeypatch, capsys):
    monkeypatch.setitem(interactive.MICROSERVICES["IAM"], "base_url", "http://127.0.0.1:9")
    with keyboard(ENTER, DEMO_PASSWORD + ENTER):
        assert interactive.login() == "Error"
    error = capsys.readouterr().err
    assert "Login Error: " in error and "cannot connect" in error and "after 10 attempts" in error


def test_login_when_a_config_token_keeps_failing_is_an_error(interactive, fake, capsys):
    fake.fail_next("/api/auth/config-token", count=20, status=500, service="GDD")
    with keyboard(ENTER, DEMO_PASSWORD + ENTER):
        assert interactive.login() == "Error"
    assert "Config-token Error for GDD: Persistent error" in capsys.readouterr().err
    assert fake.calls("/api/auth/config-token", service="GDD") == 10


@pytest.mark.parametrize("path, failure", [(LOGIN, {"status": 503}), (LOGIN, {"drop": True}),
                                           ("/api/auth/config-token", {"status": 502})])
def test_a_transient_failure_at_the_first_login_is_retried_and_the_login_succeeds(interactive, fake, path, failure):
    fake.fail_next(path, **failure)
    with keyboard(ENTER, DEMO_PASSWORD + ENTER):
        assert interactive.login() == "Success"
    assert set(interactive.tokens) == {"RC", "GDD"}


def test_a_wrong_password_is_not_retried(interactive, fake):
    with keyboard(ENTER, "wrong-password" + ENTER):
        assert interactive.login() == "Error"
    assert fake.calls(LOGIN) == 1


@pytest.mark.fake(auth_latency=0.5)
def test_the_config_tokens_are_asked_in_parallel(interactive, fake):
    with keyboard(ENTER, DEMO_PASSWORD + ENTER):
        started = perf_counter()
        assert interactive.login() == "Success"
        elapsed = perf_counter() - started
    # One login then RC and GDD together: two round trips of 0.5 s, not three (1.5 s).
    assert 1.0 <= elapsed < 1.4


def test_login_with_empty_answers_exits(interactive, fake):
    with keyboard(ERASE_DEFAULT + ENTER, ENTER):
        assert interactive.login() == "Exit"
    assert fake.calls("/api/auth/ziwig-pro/login") == 0


@pytest.mark.timeout(10)  # answering None would leave login() waiting at the next prompt
def test_ctrl_c_at_the_login_prompt_cancels_instead_of_answering_none(interactive, fake):
    with keyboard(CTRL_C), pytest.raises(KeyboardInterrupt):
        interactive.login()
    assert fake.calls("/api/auth/ziwig-pro/login") == 0


def test_a_refresh_replaces_both_tokens_and_the_old_refresh_token_is_spent(logged_in, fake):
    before = dict(logged_in.tokens["RC"])
    logged_in.new_token("RC")
    after = logged_in.tokens["RC"]
    assert after["access_token"] != before["access_token"]
    assert after["refresh_token"] != before["refresh_token"]
    assert fake.refreshes == 1


def test_a_rejected_refresh_token_logs_in_again_silently(logged_in, fake):
    fake.expire_refresh_tokens("RC")
    fake.expire_access_tokens("RC")
    assert logged_in.get_all_organizations()
    assert fake.logins == 2  # the fixture's login, then the silent one
    assert fake.refreshes == 0


def test_a_refresh_the_server_never_processed_is_retried_then_reported(logged_in, fake, monkeypatch):
    monkeypatch.setattr(logged_in, "ERROR_MAX_RETRY", 3)
    fake.fail_next(REFRESH, count=10, status=429, service="RC")
    with pytest.raises(httpx.RequestError) as raised:
        logged_in.new_token("RC")
    assert "refresh_token for RC after 3 attempts: 429" in str(raised.value)
    assert fake.refresh_attempts == 3
    assert fake.logins == 1


@pytest.mark.parametrize("failure", [{"status": 500}, {"status": 503}, {"drop": True}])
def test_a_refresh_that_may_have_spent_the_refresh_token_is_not_repeated(logged_in, fake, failure):
    fake.fail_next(REFRESH, service="RC", **failure)
    logged_in.new_token("RC")
    assert fake.refresh_attempts == 1  # the refresh token is never presented twice
    assert fake.logins == 2  # a new login replaced it
    assert logged_in.get_all_organizations()


def test_a_silent_login_refused_because_the_password_changed_is_not_repeated(logged_in, fake):
    fake.users[DEMO_USER_NAME] = "changed-since-the-run-started"
    fake.expire_refresh_tokens("RC")
    with pytest.raises(httpx.HTTPStatusError) as raised:
        logged_in.new_token("RC")
    assert raised.value.response.status_code == 401
    assert fake.calls(LOGIN) == 2  # the fixture's, then one refused: no lockout by retries


def test_a_silent_login_forbidden_by_iam_is_tried_once(logged_in, fake):
    fake.expire_refresh_tokens("RC")
    fake.fail_next(LOGIN, count=20, status=403)
    with pytest.raises(httpx.HTTPStatusError):
        logged_in.new_token("RC")
    assert fake.calls(LOGIN) == 2


@pytest.mark.fake(auth_latency=0.1)
def test_threads_that_waited_for_a_failed_refresh_do_not_each_try_again(logged_in, fake, monkeypatch):
    monkeypatch.setattr(logged_in, "ERROR_MAX_RETRY", 3)
    fake.fail_next(REFRESH, count=100, status=429, service="RC")
    rejected = logged_in.tokens["RC"]["access_token"]
    errors = errors_in_threads(lambda: logged_in.new_token("RC", rejected_token=rejected), 10)
    assert len(errors) == 10 and all(isinstance(error, httpx.RequestError) for error in errors)
    assert fake.refresh_attempts == 3


def test_a_stop_ends_a_failing_refresh_at_once(logged_in, fake, monkeypatch):
    monkeypatch.setattr(logged_in, "WAIT_BEFORE_RETRY", 5)
    fake.fail_next(REFRESH, count=100, status=429, service="RC")
    threading.Timer(0.2, logged_in.request_stop).start()
    started = perf_counter()
    with pytest.raises(logged_in.RunStopped):
        logged_in.new_token("RC")
    assert perf_counter() - started < 2
    assert fake.refresh_attempts == 1


def test_the_default_main_counts_every_inclusion_end_to_end(interactive, fake, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with keyboard(ENTER, DEMO_PASSWORD + ENTER, ERASE_DEFAULT + "4" + ENTER):
        status = interactive.main()
    assert status is None
    output = capsys.readouterr().out
    assert "Login Success" in output
    # The fake's organizations have 12, 0, 57, 130, 3, 41, 88 and 25 inclusions: 356 in
    # all, in 1 + 1 + 2 + 3 + 1 + 1 + 2 + 1 = 12 pages of 50.
    assert "│ Total        │        356 │" in output
    assert "Elapsed time: " in output
    assert fake.calls("/api/inclusions/search") == 12
    assert "Hospital 4;Toulouse;130" in (tmp_path / "inclusions_by_organization.csv").read_text(encoding="utf-8-sig")


@pytest.mark.fake(users={DEMO_USER_NAME: DEMO_PASSWORD, "someone@else.org": "her-password"})
def test_after_a_failed_login_the_next_prompt_offers_the_user_name_typed(interactive, fake):
    with keyboard(ERASE_DEFAULT + "someone@else.org" + ENTER, "wrong" + ENTER, ENTER, "her-password" + ENTER):
        assert interactive.login() == "Error"
        assert interactive.login() == "Success"
    assert interactive._credentials["user_name"] == "someone@else.org"
