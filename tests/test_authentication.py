"""login() answered through prompt_toolkit pipe input, new_token() and main() against the
fake platform over real sockets."""

from contextlib import contextmanager

import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from fake_platform import DEMO_PASSWORD, DEMO_USER_NAME

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
    assert "Login Error: ConnectError" in capsys.readouterr().err


def test_login_when_a_config_token_fails_is_an_error(interactive, fake, capsys):
    fake.fail_next("/api/auth/config-token", status=500, service="GDD")
    with keyboard(ENTER, DEMO_PASSWORD + ENTER):
        assert interactive.login() == "Error"
    assert "Config-token Error for GDD: 500" in capsys.readouterr().err


def test_login_with_empty_answers_exits(interactive, fake):
    with keyboard(ERASE_DEFAULT + ENTER, ENTER):
        assert interactive.login() == "Exit"
    assert fake.calls("/api/auth/ziwig-pro/login") == 0


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


def test_a_refresh_that_keeps_failing_is_reported_with_its_cause(logged_in, fake, monkeypatch):
    monkeypatch.setattr(logged_in, "ERROR_MAX_RETRY", 3)
    fake.fail_next("/api/auth/refreshToken", count=10, status=503, service="RC")
    with pytest.raises(logged_in.httpx.RequestError) as raised:
        logged_in.new_token("RC")
    assert "refresh_token for RC: 503" in str(raised.value)
    assert fake.refresh_attempts == 3


def test_the_default_main_counts_every_inclusion_end_to_end(interactive, fake, capsys):
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


def test_a_wrong_password_is_asked_again_at_the_terminal(interactive, fake):
    with keyboard(ENTER, "wrong" + ENTER, ENTER, DEMO_PASSWORD + ENTER):
        assert interactive.login() == "Error"
        assert interactive.login() == "Success"
    assert interactive._credentials["user_name"] == DEMO_USER_NAME
