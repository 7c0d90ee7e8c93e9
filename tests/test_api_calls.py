"""API calls through the retry decorator, over real sockets against the fake platform."""

import threading
from time import perf_counter

import httpx
import pytest

from conftest import journal_lines
from fake_platform import DEMO_USER_NAME

ORGANIZATIONS = "/api/inclusions/getAllOrganizations"
SEARCH = "/api/inclusions/search"
RECORDS = "/api/records"
UPDATE = "/api/records/byPatient"


def test_a_decorated_get_returns_the_json(logged_in):
    organizations = logged_in.get_all_organizations()
    assert [org["id"] for org in organizations][:2] == ["org-001", "org-002"]


def test_a_decorated_post_returns_the_requested_page(logged_in):
    page = logged_in.search_inclusions("org-004", 50, 3)
    assert page["total"] == 130
    assert len(page["data"]) == 30
    assert page["data"][0]["id"] == "inc-004-0101"


def test_an_expired_token_is_refreshed_and_the_call_succeeds(logged_in, fake):
    old_token = logged_in.tokens["RC"]["access_token"]
    fake.expire_access_tokens("RC")
    assert logged_in.get_all_organizations()
    assert fake.refreshes == 1
    assert fake.calls(ORGANIZATIONS) == 2
    assert logged_in.tokens["RC"]["access_token"] != old_token


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_a_server_error_is_retried_until_it_succeeds(logged_in, fake, status):
    fake.fail_next(ORGANIZATIONS, count=3, status=status)
    assert logged_in.get_all_organizations()
    assert fake.calls(ORGANIZATIONS) == 4


def test_a_dropped_connection_is_retried(logged_in, fake):
    fake.fail_next(ORGANIZATIONS, count=2, drop=True)
    assert logged_in.get_all_organizations()
    assert fake.calls(ORGANIZATIONS) == 3


def test_a_429_waits_as_long_as_retry_after_says(logged_in, fake, monkeypatch):
    waits = []
    monkeypatch.setattr(logged_in, "_pause", waits.append)
    fake.fail_next(ORGANIZATIONS, status=429, headers={"Retry-After": "2"})
    assert logged_in.get_all_organizations()
    assert waits == [2.0]


def test_a_429_really_waits_before_the_next_attempt(logged_in, fake):
    fake.fail_next(ORGANIZATIONS, status=429, headers={"Retry-After": "1"})
    assert logged_in.get_all_organizations()
    (first, _, _), (second, _, _) = [t for t in fake.request_times() if t[2] == ORGANIZATIONS]
    assert second - first >= 0.95


@pytest.mark.parametrize("status", [400, 403, 404, 409, 422])
def test_a_client_error_is_raised_at_once_with_its_status(logged_in, fake, status):
    fake.fail_next(ORGANIZATIONS, status=status)
    with pytest.raises(httpx.HTTPStatusError) as raised:
        logged_in.get_all_organizations()
    assert raised.value.response.status_code == status
    assert fake.calls(ORGANIZATIONS) == 1


def test_an_unknown_id_is_a_404_the_caller_can_catch(logged_in, fake):
    with pytest.raises(httpx.HTTPStatusError) as raised:
        logged_in.search_inclusions("org-999", 50, 1)
    assert raised.value.response.status_code == 404
    assert fake.calls(SEARCH) == 1


def test_a_persistent_error_stops_after_exactly_error_max_retry_attempts(logged_in, fake, monkeypatch):
    monkeypatch.setattr(logged_in, "ERROR_MAX_RETRY", 4)
    fake.fail_next(ORGANIZATIONS, count=10, status=502)
    with pytest.raises(httpx.RequestError) as raised:
        logged_in.get_all_organizations()
    assert fake.calls(ORGANIZATIONS) == 4
    assert isinstance(raised.value.__cause__, httpx.HTTPStatusError)
    assert raised.value.__cause__.response.status_code == 502
    assert "after 4 attempts: 502 Bad Gateway" in str(raised.value)


def test_a_server_that_is_down_is_retried_then_reported(logged_in, monkeypatch):
    monkeypatch.setattr(logged_in, "ERROR_MAX_RETRY", 3)
    monkeypatch.setitem(logged_in.MICROSERVICES["RC"], "base_url", "http://127.0.0.1:9")
    with pytest.raises(httpx.RequestError) as raised:
        logged_in.get_all_organizations()
    assert isinstance(raised.value.__cause__, httpx.ConnectError)


def outcomes(directory, key=None):
    """The outcome lines of the journal's writes, in order."""
    return [line["outcome"] for line in journal_lines(directory) if "key" in line and key in (None, line["key"])]


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_write_answered_5xx_is_sent_once_and_journaled_unknown(writing, fake, tmp_path, status):
    fake.fail_next(RECORDS, status=status)
    with pytest.raises(httpx.HTTPStatusError):
        writing.create_record("pat-001-0001", {"weight": 70})
    assert fake.calls(RECORDS) == 1
    assert outcomes(tmp_path) == ["sending", "unknown"]
    assert writing.writes_left_undone() == 1


def test_a_write_the_server_applied_before_answering_503_is_applied_once(writing, fake, tmp_path):
    fake.fail_next(UPDATE, method="PATCH", status=503, after_processing=True)
    with pytest.raises(httpx.HTTPStatusError):
        writing.update_record_fields("pat-001-0001", {"consent": "v2"})
    assert fake.changes("pat-001-0001") == 1
    assert fake.calls(UPDATE) == 1
    assert outcomes(tmp_path) == ["sending", "unknown"]


def test_a_write_whose_answer_is_lost_is_not_sent_again(writing, fake, tmp_path):
    fake.fail_next(UPDATE, method="PATCH", drop=True, after_processing=True)
    with pytest.raises(httpx.RemoteProtocolError):
        writing.update_record_fields("pat-001-0001", {"consent": "v2"})
    assert fake.changes("pat-001-0001") == 1
    assert outcomes(tmp_path) == ["sending", "unknown"]


def test_a_write_is_not_repeated_after_a_read_timeout(writing, fake, tmp_path):
    fake.latency = 1.0

    @writing.api_call_with_retry("RC", idempotent=False)
    def create_record_with_short_timeout():
        client = writing.get_httpx_client()
        response = client.post(
            fake.urls["RC"] + RECORDS,
            headers={"Authorization": f"Bearer {writing.tokens['RC']['access_token']}"},
            json={"patientId": "pat-001-0001", "fields": {}},
            timeout=0.3,
        )
        response.raise_for_status()
        return response.json()

    with pytest.raises(httpx.ReadTimeout):
        create_record_with_short_timeout()
    assert fake.calls(RECORDS) == 1
    assert outcomes(tmp_path) == ["sending", "unknown"]


@pytest.mark.fake(latency=0.5)
def test_a_read_that_times_out_is_retried(logged_in, fake, monkeypatch):
    monkeypatch.setattr(logged_in, "ERROR_MAX_RETRY", 2)
    monkeypatch.setattr(logged_in, "API_TIMEOUT", 0.1)
    with pytest.raises(httpx.RequestError) as raised:
        logged_in.get_all_organizations()
    assert isinstance(raised.value.__cause__, httpx.ReadTimeout)
    assert fake.calls(ORGANIZATIONS) == 2


def test_a_write_refused_with_429_is_sent_again_and_done_once(writing, fake, tmp_path):
    fake.fail_next(RECORDS, status=429)
    record = writing.create_record("pat-001-0001", {"weight": 70})
    assert record["patientId"] == "pat-001-0001"
    assert fake.calls(RECORDS) == 2
    assert len(fake.created_records()) == 1
    assert outcomes(tmp_path) == ["sending", "sending", "done"]


def test_a_write_refused_with_4xx_is_journaled_failed(writing, fake, tmp_path):
    with pytest.raises(httpx.HTTPStatusError):
        writing.update_record_fields("pat-999-9999", {"consent": "v2"})
    assert outcomes(tmp_path) == ["sending", "failed"]
    assert journal_lines(tmp_path)[-1]["status"] == 404


def test_a_write_is_retried_after_a_refused_connection_then_journaled_failed(writing, fake, monkeypatch, tmp_path):
    monkeypatch.setattr(writing, "ERROR_MAX_RETRY", 2)
    monkeypatch.setitem(writing.MICROSERVICES["RC"], "base_url", "http://127.0.0.1:9")
    with pytest.raises(httpx.RequestError) as raised:
        writing.create_record("pat-001-0001", {})
    assert "after 2 attempts: POST http://127.0.0.1:9/api/records: cannot connect" in str(raised.value)
    assert outcomes(tmp_path) == ["sending", "sending", "failed"]


def test_a_write_with_an_expired_token_is_refreshed_and_sent_once(writing, fake, tmp_path):
    fake.expire_access_tokens("RC")
    writing.create_record("pat-001-0001", {"weight": 70})
    assert fake.refreshes == 1
    assert len(fake.created_records()) == 1
    assert outcomes(tmp_path) == ["sending", "sending", "done"]  # the 401, then the write


def test_a_write_line_says_who_what_when_and_holds_no_token(writing, fake, tmp_path):
    writing.update_record_fields("pat-001-0002", {"consent": "v2"})
    sending, done = [line for line in journal_lines(tmp_path) if "key" in line]
    assert sending["method"] == "PATCH" and sending["url"].endswith(UPDATE + "?patientId=pat-001-0002")
    assert sending["body"] == {"fields": {"consent": "v2"}}
    assert sending["user"] == DEMO_USER_NAME and sending["call"] == "update_record_fields"
    assert done["status"] == 200 and done["time"].endswith("Z") and done["key"] == sending["key"]
    text = (tmp_path / "eb_script_template.journal.jsonl").read_text(encoding="utf-8")
    assert [secret for secret in fake.issued_secrets() if secret in text] == []


def test_the_same_write_with_the_same_arguments_has_the_same_key(writing):
    function = writing.update_record_fields.__wrapped__
    first = writing._Write(function, ("pat-1", {"a": 1, "b": 2}), {})
    again = writing._Write(function, (), {"fields": {"b": 2, "a": 1}, "patient_id": "pat-1"})
    other = writing._Write(function, ("pat-2", {"a": 1, "b": 2}), {})
    assert first.key == again.key != other.key


def test_a_write_in_a_script_that_does_not_change_data_is_refused_before_anything_is_sent(logged_in, fake):
    with pytest.raises(logged_in.WritesNotAllowed, match="CHANGES_DATA"):
        logged_in.update_record_fields("pat-001-0001", {"consent": "v2"})
    assert fake.calls(UPDATE) == 0


def test_a_put_from_a_function_not_declared_as_a_write_is_refused(logged_in, fake):
    @logged_in.api_call_with_retry("RC")
    def sneaky_put():
        client = logged_in.get_httpx_client()
        return client.put(fake.urls["RC"] + UPDATE, params={"patientId": "pat-001-0001"}, json={"fields": {}})

    with pytest.raises(logged_in.UndeclaredWrite, match="idempotent=False"):
        sneaky_put()
    assert fake.calls(UPDATE) == 0


def test_no_call_starts_once_the_run_is_stopping(logged_in, fake):
    logged_in.request_stop()
    with pytest.raises(logged_in.RunStopped):
        logged_in.get_all_organizations()
    assert fake.calls(ORGANIZATIONS) == 0


def test_a_stop_ends_the_wait_between_attempts(logged_in, fake, monkeypatch):
    monkeypatch.setattr(logged_in, "WAIT_BEFORE_RETRY", 30)
    fake.fail_next(ORGANIZATIONS, count=5, status=503)
    threading.Timer(0.3, logged_in.request_stop).start()
    started = perf_counter()
    with pytest.raises(logged_in.RunStopped):
        logged_in.get_all_organizations()
    assert perf_counter() - started < 2
    assert fake.calls(ORGANIZATIONS) == 1


# --- What review found: each of these sent a write twice, or journaled it wrongly -----


def patch_then_read(template, fake):
    """A write function that changes a record and then reads something."""

    @template.api_call_with_retry("RC", idempotent=False)
    def set_consent_then_count(patient_id):
        client = template.get_httpx_client()
        headers = {"Authorization": f"Bearer {template.tokens['RC']['access_token']}"}
        client.patch(fake.urls["RC"] + UPDATE, params={"patientId": patient_id}, headers=headers,
                     json={"fields": {"consent": "v2"}}).raise_for_status()
        client.get(fake.urls["RC"] + ORGANIZATIONS, headers=headers).raise_for_status()

    return set_consent_then_count


@pytest.mark.parametrize("status", [401, 429, 503])
def test_a_read_failing_after_the_write_in_the_same_function_does_not_send_the_write_again(writing, fake, tmp_path,
                                                                                          status):
    fake.fail_next(ORGANIZATIONS, status=status, count=3)
    with pytest.raises(httpx.HTTPStatusError):
        patch_then_read(writing, fake)("pat-001-0001")
    assert fake.changes("pat-001-0001") == 1
    assert outcomes(tmp_path) == ["sending", "done"]  # applied; only what came after failed


def test_a_token_renewal_inside_a_write_function_is_not_journaled_as_the_write(writing, fake, tmp_path):
    @writing.api_call_with_retry("RC", idempotent=False)
    def read_then_patch(patient_id):
        writing.get_record(patient_id)
        return writing.update_record_fields.__wrapped__(patient_id, {"consent": "v3"})

    fake.expire_access_tokens("RC")
    read_then_patch("pat-001-0001")
    sending = [line for line in journal_lines(tmp_path) if line.get("outcome") == "sending"]
    assert [line["method"] for line in sending] == ["PATCH"]
    assert fake.refreshes == 1 and fake.changes("pat-001-0001") == 1


def test_a_write_nested_in_another_write_keeps_the_outer_one_journaled_and_dry(logged_in, fake, tmp_path,
                                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(logged_in, "CHANGES_DATA", True)
    logged_in.start_journal(dry_run=True)

    @logged_in.api_call_with_retry("RC", idempotent=False)
    def migrate(patient_id):
        logged_in.update_record_fields(patient_id, {"consent": "v2"})
        return logged_in.create_record.__wrapped__(patient_id, {"migrated": True})

    migrate("pat-001-0001")
    assert fake.total_changes() == 0 and fake.calls(RECORDS) == 0
    dry = [line for line in journal_lines(tmp_path) if line.get("outcome") == "dry-run"]
    assert sorted((line["call"], line["method"]) for line in dry) == [("migrate", "POST"),
                                                                      ("update_record_fields", "PATCH")]


def test_a_write_whose_arguments_would_not_give_the_same_key_in_every_run_is_refused(writing, fake):
    with pytest.raises(TypeError, match="JSON values"):
        writing.update_record_fields("pat-001-0001", {"tags": {"a", "b"}})
    assert fake.calls(UPDATE) == 0


def test_a_verify_that_fails_leaves_the_write_unknown_not_forgotten(writing, fake, tmp_path, monkeypatch):
    key = writing._Write(writing.update_record_fields.__wrapped__, ("pat-001-0001", {"consent": "v2"}), {}).key
    monkeypatch.setitem(writing._journal, "resume", {key: "unknown"})
    fake.fail_next(UPDATE, method="GET", status=404)
    with pytest.raises(httpx.HTTPStatusError):
        writing.update_record_fields("pat-001-0001", {"consent": "v2"})
    assert outcomes(tmp_path) == ["unknown"] and writing.writes_left_undone() == 1
    assert fake.changes("pat-001-0001") == 0


def test_a_write_function_that_ignores_a_5xx_is_journaled_unknown_not_done(writing, fake, tmp_path):
    @writing.api_call_with_retry("RC", idempotent=False)
    def careless_patch(patient_id):
        client = writing.get_httpx_client()
        return client.patch(fake.urls["RC"] + UPDATE, params={"patientId": patient_id}, json={"fields": {}},
                            headers={"Authorization": f"Bearer {writing.tokens['RC']['access_token']}"})

    fake.fail_next(UPDATE, method="PATCH", status=502)
    careless_patch("pat-001-0001")
    assert outcomes(tmp_path) == ["sending", "unknown"]


def test_the_password_is_kept_out_of_the_journal_even_with_quotes_and_backslashes(writing, tmp_path):
    writing._remember_secrets('Secr"t\\pass')
    writing._journal_write(writing._Write(writing.create_record.__wrapped__, ("p", {"note": 'Secr"t\\pass'}), {}),
                           "failed")
    assert "Secr" not in (tmp_path / "eb_script_template.journal.jsonl").read_text(encoding="utf-8")


def test_a_write_still_in_flight_when_the_run_ends_makes_the_exit_status_1(writing):
    write = writing._Write(writing.create_record.__wrapped__, ("pat-001-0001", {}), {})
    write.sent = True
    writing._writes_in_flight[id(write)] = write
    assert writing._finish_run(writing.EXIT_SUCCESS) == writing.EXIT_FAILURE


def test_retry_after_0_does_not_hammer_the_server(logged_in, fake, monkeypatch):
    monkeypatch.setattr(logged_in, "RATE_LIMIT_MAX_WAIT", 0.05)
    fake.fail_next(ORGANIZATIONS, count=100, status=429, headers={"Retry-After": "0"})
    with pytest.raises(logged_in.RateLimited):
        logged_in.get_all_organizations()
    assert fake.calls(ORGANIZATIONS) <= 7  # WAIT_BEFORE_RETRY (0.01 s here) counted per 429


@pytest.mark.fake(latency=0.05)
def test_leaving_a_process_in_pool_loop_early_cancels_the_tasks_not_started(logged_in, fake):
    pool = logged_in.StoppableThreadPool(max_workers=2)
    for _ in logged_in.process_in_pool(pool, lambda number: logged_in.get_all_organizations(), range(200)):
        break
    pool.shutdown(wait=True)
    assert fake.calls(ORGANIZATIONS) <= 4
