"""Many threads sharing one set of tokens, against the fake platform over real sockets."""

import threading
from time import perf_counter

import pytest

from conftest import errors_in_threads, run_unattended, write_copy

ORGANIZATIONS = "/api/inclusions/getAllOrganizations"


def call_from_40_threads_at_once(template):
    """get_all_organizations() from 20 threads of a main pool and 20 of a subtasks pool,
    released together; returns how many succeeded."""
    barrier = threading.Barrier(40)

    def call():
        barrier.wait()
        return template.get_all_organizations()

    with template.StoppableThreadPool(20) as main_pool, template.StoppableThreadPool(40) as subtasks_pool:
        futures = [pool.submit(call) for pool in (main_pool, subtasks_pool) for _ in range(20)]
        return sum(1 for future in futures if future.result())


@pytest.mark.fake(auth_latency=0.2)
def test_forty_threads_with_an_expired_token_cause_one_refresh(logged_in, fake):
    fake.expire_access_tokens("RC")
    assert call_from_40_threads_at_once(logged_in) == 40
    assert fake.refresh_attempts == 1
    assert fake.calls(ORGANIZATIONS) == 80  # each thread: one 401, one success


@pytest.mark.fake(latency=0.2, revoke_previous_access_token=True)
def test_one_refresh_even_when_a_new_token_revokes_the_calls_in_flight(logged_in, fake):
    fake.expire_access_tokens("RC")
    assert call_from_40_threads_at_once(logged_in) == 40
    assert fake.refresh_attempts == 1


def test_a_401_for_a_token_already_replaced_does_not_refresh_again(logged_in, fake):
    logged_in.new_token("RC", rejected_token="a-token-replaced-since")
    assert fake.refresh_attempts == 0


# Refresh tokens that die before the access token they came with: every expiry of an
# access token finds its refresh token rejected, and only a new login can go on.
@pytest.mark.fake(access_token_ttl=0.6, refresh_token_ttl=0.3, latency=0.02)
def test_a_run_longer_than_the_refresh_token_lifetime_logs_in_again_and_goes_on(logged_in, fake):
    duration = 2.5
    stop_at = perf_counter() + duration

    def keep_calling():
        while perf_counter() < stop_at:
            logged_in.get_all_organizations()

    assert errors_in_threads(keep_calling, 10) == []
    assert fake.logins >= 3  # the fixture's, then one per expiry
    assert fake.refreshes == 0
    # One renewal per access-token lifetime, not one per thread.
    assert fake.logins - 1 <= duration / 0.6 + 1


JOB_OF_2000_CALLS = """\
    with main_thread_pool as executor:
        futures = [executor.submit(get_all_organizations) for _ in range(2000)]
        print("calls:", sum(1 for future in iter_completed(futures) if future.result()))
"""


def test_2000_calls_on_20_threads_open_one_connection_per_thread(tmp_path, fake):
    script = write_copy(tmp_path, JOB_OF_2000_CALLS)
    result = run_unattended(script, fake, EB_THREADS="20")
    assert result.returncode == 0, result.stderr
    assert "calls: 2000" in result.stdout
    assert fake.calls(ORGANIZATIONS) == 2000
    # login's thread opens one per microservice, each of the 20 workers one to RC.
    assert fake.connections("RC") <= 21
    assert fake.connections("IAM") == 1 and fake.connections("GDD") == 1
