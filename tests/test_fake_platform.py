"""The fake platform itself: records that writes change, the faults a test can inject,
organization names and the command line. Over real sockets on 127.0.0.1, as the
template and users' scripts talk to it."""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fake_platform import (
    CONFIG_TOKEN_PATH,
    DEMO_PASSWORD,
    DEMO_USER_NAME,
    FAIL_NEXT_PATH,
    LOGIN_PATH,
    RECORD_PATH,
    STATS_PATH,
    FakePlatform,
    _parse_args,
    parse_fail_next_spec,
)

FAKE_SCRIPT = Path(__file__).resolve().parent / "fake_platform.py"
ORGANIZATIONS = "/api/inclusions/getAllOrganizations"
STATISTICS = "/api/inclusions/inclusion-statistics"
CREATE = "/api/records"
PATIENT = "pat-001-0001"
TRICKLE = 0.005  # seconds per byte: a 200-byte answer takes about one second


def rc_token(client, fake) -> str:
    """An RC access token for the demo user, obtained as a script does: login, then config-token."""
    login = client.post(fake.urls["IAM"] + LOGIN_PATH, json={"username": DEMO_USER_NAME, "password": DEMO_PASSWORD})
    login.raise_for_status()
    master = login.json()
    answer = client.post(
        fake.urls["RC"] + CONFIG_TOKEN_PATH,
        headers={"Authorization": f"Bearer {master['access_token']}"},
        json={"userId": master["userId"]},
    )
    answer.raise_for_status()
    return answer.json()["access_token"]


@pytest.fixture
def rc(fake):
    """An httpx client of RC, logged in. One client per test: each costs some 50 ms."""
    with httpx.Client(base_url=fake.urls["RC"], timeout=5) as client:
        client.headers["Authorization"] = f"Bearer {rc_token(client, fake)}"
        yield client


@pytest.fixture
def token(rc):
    return rc.headers["Authorization"].removeprefix("Bearer ")


def patch(rc, fields, patient=PATIENT):
    return rc.patch(RECORD_PATH, params={"patientId": patient}, json={"fields": fields})


def get_record(rc, patient=PATIENT):
    response = rc.get(RECORD_PATH, params={"patientId": patient})
    response.raise_for_status()
    return response.json()


def raw_request(url, path, token, method="GET") -> socket.socket:
    """A request sent on a bare socket, so that a test sees each byte of the answer as it comes."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    request = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    sock.sendall(request.encode())
    return sock


def read_until(sock, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before {marker!r}: {data!r}"
        data += chunk
    return data


def closed_by_server(sock) -> bool:
    """True when the server ends the connection within a second (whatever it sends first)."""
    sock.settimeout(1)
    try:
        while sock.recv(4096):
            pass
    except socket.timeout:
        return False
    except ConnectionError:
        pass
    return True


def handler_threads() -> set:
    """The fake's threads that serve one connection each."""
    return {thread for thread in threading.enumerate() if "process_request_thread" in thread.name}


# --- Records that writes change ------------------------------------------------------


def test_a_patch_merges_fields_into_the_record_and_a_get_shows_the_change(fake, rc):
    before = get_record(rc)["fields"]
    response = patch(rc, {"consentVersion": "v2", "painScore": 0})
    assert response.status_code == 200
    expected = {**before, "consentVersion": "v2", "painScore": 0}
    assert response.json() == {"patientId": PATIENT, "organizationId": "org-001", "fields": expected}
    assert get_record(rc)["fields"] == expected
    assert fake.record_fields(PATIENT) == expected
    assert get_record(rc, "pat-001-0002")["fields"].get("consentVersion") is None  # other records unchanged


def test_each_applied_write_counts_one_change_of_its_patient_creates_included(fake, rc):
    patch(rc, {"a": 1}).raise_for_status()
    patch(rc, {"a": 2}).raise_for_status()
    rc.post(CREATE, json={"patientId": "pat-003-0001", "fields": {"source": "import"}}).raise_for_status()
    get_record(rc, "pat-003-0002")  # a read changes nothing
    assert fake.changes(PATIENT) == 2
    assert fake.changes("pat-003-0001") == 1
    assert fake.changes("pat-003-0002") == 0
    assert fake.total_changes() == 3
    stats = rc.get(STATS_PATH).json()
    assert stats["changes"] == {PATIENT: 2, "pat-003-0001": 1}
    assert stats["total_changes"] == 3


def test_a_put_replaces_all_the_fields_of_the_record(fake, rc):
    response = rc.put(RECORD_PATH, params={"patientId": PATIENT}, json={"fields": {"only": "this"}})
    assert response.status_code == 200
    assert response.json()["fields"] == {"only": "this"}
    assert get_record(rc)["fields"] == {"only": "this"}
    patch(rc, {"more": 1}).raise_for_status()
    assert fake.record_fields(PATIENT) == {"only": "this", "more": 1}
    assert fake.changes(PATIENT) == 2


@pytest.mark.parametrize("method", ["PATCH", "PUT"])
@pytest.mark.parametrize(
    "patient, body, status",
    [
        ("pat-999-9999", b'{"fields": {"a": 1}}', 404),
        (PATIENT, b"", 400),
        (PATIENT, b"not json", 400),
        (PATIENT, b"[1, 2]", 400),
        (PATIENT, b'{"fields": [1, 2]}', 400),
        (PATIENT, b'{"fields": "a=1"}', 400),
        (PATIENT, b'{"other": {"a": 1}}', 400),
    ],
    ids=["unknown-patient", "no-body", "not-json", "not-an-object", "fields-a-list", "fields-a-string", "no-fields"],
)
def test_a_write_to_an_unknown_patient_or_with_a_bad_body_is_refused_and_changes_nothing(
    fake, rc, method, patient, body, status
):
    before = fake.record_fields(PATIENT)
    response = rc.request(method, RECORD_PATH, params={"patientId": patient}, content=body,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert "message" in response.json()
    assert fake.total_changes() == 0
    assert fake.record_fields(PATIENT) == before


def test_a_write_without_a_valid_token_is_refused_401_and_changes_nothing(fake, rc):
    response = rc.patch(RECORD_PATH, params={"patientId": PATIENT}, json={"fields": {"a": 1}},
                        headers={"Authorization": "Bearer not-a-token"})
    assert response.status_code == 401
    assert fake.total_changes() == 0
    assert "a" not in fake.record_fields(PATIENT)


def test_patches_from_many_threads_at_once_are_all_kept(fake, rc):
    def write(thread):
        for number in range(20):
            patch(rc, {f"t{thread}-{number}": number}).raise_for_status()

    threads = [threading.Thread(target=write, args=(thread,)) for thread in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake.changes(PATIENT) == 160
    fields = fake.record_fields(PATIENT)
    assert all(fields[f"t{thread}-{number}"] == number for thread in range(8) for number in range(20))


def test_a_patch_and_a_put_are_refused_405_elsewhere_than_on_records(fake, rc):
    assert rc.patch(ORGANIZATIONS, json={"fields": {}}).status_code == 405
    assert rc.put(CREATE, json={"fields": {}}).status_code == 405
    assert fake.total_changes() == 0


# --- Faults: the method, the answer lost after the change ----------------------------------


def test_a_rule_for_patch_leaves_gets_alone(fake, rc):
    fake.fail_next(RECORD_PATH, method="PATCH", status=500)
    assert rc.get(RECORD_PATH, params={"patientId": PATIENT}).status_code == 200
    assert patch(rc, {"a": 1}).status_code == 500
    assert fake.changes(PATIENT) == 0  # failed before it was applied
    assert patch(rc, {"a": 1}).status_code == 200


def test_a_write_applied_then_dropped_changes_the_record_once_and_the_client_sees_a_disconnect(fake, rc):
    fake.fail_next(RECORD_PATH, method="PATCH", drop=True, after_processing=True)
    with pytest.raises(httpx.RemoteProtocolError):
        patch(rc, {"consentVersion": "v2"})
    assert fake.changes(PATIENT) == 1
    assert fake.record_fields(PATIENT)["consentVersion"] == "v2"
    assert get_record(rc)["fields"]["consentVersion"] == "v2"  # the rule is used up


def test_a_write_applied_then_answered_503_changes_the_record_once_and_the_client_sees_the_503(fake, rc):
    fake.fail_next(RECORD_PATH, method="PATCH", status=503, headers={"Retry-After": "1"}, after_processing=True)
    response = patch(rc, {"consentVersion": "v2"})
    assert response.status_code == 503
    assert response.json() == {"message": "injected failure"}
    assert response.headers["Retry-After"] == "1"
    assert fake.changes(PATIENT) == 1
    assert fake.record_fields(PATIENT)["consentVersion"] == "v2"


def test_a_create_applied_then_answered_503_creates_one_record(fake, rc):
    fake.fail_next(CREATE, method="POST", status=503, after_processing=True)
    response = rc.post(CREATE, json={"patientId": PATIENT, "fields": {"source": "import"}})
    assert response.status_code == 503
    assert len(fake.created_records()) == 1
    assert fake.changes(PATIENT) == 1


def test_rules_apply_in_the_order_they_were_added(fake, rc):
    fake.fail_next(RECORD_PATH, method="PATCH", count=2, drop=True, after_processing=True)
    fake.fail_next(RECORD_PATH, method="PATCH", count=1, status=500)
    for _ in range(2):
        with pytest.raises(httpx.RemoteProtocolError):
            patch(rc, {"a": 1})
    assert patch(rc, {"a": 1}).status_code == 500
    assert patch(rc, {"a": 1}).status_code == 200
    assert fake.changes(PATIENT) == 3  # two lost answers and one success; the 500 changed nothing
    assert fake.calls(RECORD_PATH) == 4


# --- Faults: answers that are not the expected JSON -------------------------------------


def test_a_proxy_page_can_stand_in_for_an_answer(fake, rc):
    page = "<html><body>Proxy login</body></html>"
    fake.fail_next(ORGANIZATIONS, status=200, body=page, content_type="text/html")
    response = rc.get(ORGANIZATIONS)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html"
    assert response.text == page
    assert rc.get(ORGANIZATIONS).json()[0]["id"] == "org-001"  # then the real answers again


def test_a_truncated_json_answer_cannot_be_parsed(fake, rc):
    fake.fail_next(ORGANIZATIONS, status=200, body='{"data": [1, 2', content_type="application/json")
    response = rc.get(ORGANIZATIONS)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    assert response.content == b'{"data": [1, 2'
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_a_login_answer_can_come_without_an_access_token(fake):
    fake.fail_next(LOGIN_PATH, status=200, body='{"userId": "u"}', content_type="application/json")
    response = httpx.post(fake.urls["IAM"] + LOGIN_PATH, json={"username": DEMO_USER_NAME, "password": DEMO_PASSWORD})
    assert response.status_code == 200
    assert response.json() == {"userId": "u"}
    assert fake.logins == 0  # answered before the login was processed


def test_nonsensical_rules_are_refused_when_added(fake):
    for arguments in ({"drop": True, "body": "x"}, {"trickle": 0.1, "stall": True}, {"stall": True, "drop": True},
                      {"trickle": 0}, {"status": 42}, {"service": "XYZ"}, {"method": "GET /"}):
        with pytest.raises(ValueError):
            fake.fail_next(ORGANIZATIONS, **arguments)


# --- Faults: slow answers ----------------------------------------------------------------


@pytest.mark.fake(inclusion_counts=(3,))  # one organization: a short answer
def test_a_trickled_answer_comes_byte_by_byte_and_is_complete_only_after_every_pause(fake, rc, token):
    real_body = rc.get(ORGANIZATIONS).content
    fake.fail_next(ORGANIZATIONS, trickle=TRICKLE)
    sock = raw_request(fake.urls["RC"], ORGANIZATIONS, token)
    started = time.perf_counter()
    data, arrivals = b"", []
    with sock:
        while chunk := sock.recv(4096):
            data += chunk
            arrivals.append(time.perf_counter())
    assert arrivals[0] - started < 0.3  # the first bytes come at once
    assert arrivals[-1] - started >= (len(data) - 1) * TRICKLE  # the last only after every pause
    assert len(arrivals) > len(data) / 4  # in many small pieces, not at once
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.endswith(b"\r\n\r\n" + real_body)  # the real answer, complete


@pytest.mark.fake(inclusion_counts=(3,))
def test_a_trickled_answer_never_trips_a_read_timeout_though_it_takes_longer(fake, rc):
    fake.fail_next(ORGANIZATIONS, trickle=TRICKLE)
    started = time.perf_counter()
    response = rc.get(ORGANIZATIONS, timeout=httpx.Timeout(5, read=0.2))
    assert time.perf_counter() - started > 0.5
    assert response.json()[0]["id"] == "org-001"


def test_a_stalled_answer_sends_its_headers_then_nothing_and_the_write_is_applied(fake, rc):
    fake.fail_next(RECORD_PATH, method="PATCH", stall=True)
    request = rc.build_request("PATCH", RECORD_PATH, params={"patientId": PATIENT}, json={"fields": {"a": 1}},
                               timeout=httpx.Timeout(5, read=0.3))
    response = rc.send(request, stream=True)
    try:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json"
        with pytest.raises(httpx.ReadTimeout):
            response.read()
    finally:
        response.close()
    assert fake.changes(PATIENT) == 1
    assert fake.record_fields(PATIENT)["a"] == 1


def test_a_client_that_gives_up_on_a_stalled_answer_frees_the_fakes_thread(fake, rc, token):
    fake.fail_next(ORGANIZATIONS, stall=True)
    before = handler_threads()
    sock = raw_request(fake.urls["RC"], ORGANIZATIONS, token)
    read_until(sock, b"\r\n\r\n")
    stalled = handler_threads() - before
    assert len(stalled) == 1
    sock.close()
    thread = stalled.pop()
    thread.join(timeout=1)
    assert not thread.is_alive()


def test_stop_returns_within_a_second_with_a_stalled_and_a_trickling_connection_open():
    fake = FakePlatform().start()
    sockets = []
    try:
        with httpx.Client(timeout=5) as client:
            token = rc_token(client, fake)
        fake.fail_next(ORGANIZATIONS, stall=True)
        fake.fail_next(STATISTICS, trickle=1.0)
        stalled = raw_request(fake.urls["RC"], ORGANIZATIONS, token)
        trickling = raw_request(fake.urls["RC"], STATISTICS, token)
        sockets = [stalled, trickling]
        read_until(stalled, b"\r\n\r\n")
        assert trickling.recv(1) == b"H"
        started = time.perf_counter()
        fake.stop()
        assert time.perf_counter() - started < 1.0
        assert closed_by_server(stalled) and closed_by_server(trickling)
    finally:
        fake.stop()
        for sock in sockets:
            sock.close()


# --- Organization names ------------------------------------------------------------------


@pytest.mark.fake(organization_names=["Szpital Łódź", "Hôpital Sainte-Anne"], inclusion_counts=(1, 2, 3))
def test_organization_names_with_accents_come_back_intact_and_the_rest_are_numbered(fake, rc):
    response = rc.get(ORGANIZATIONS)
    names = [org["name"] for org in json.loads(response.content.decode("utf-8"))]
    assert names == ["Szpital Łódź", "Hôpital Sainte-Anne", "Hospital 3"]
    statistics = rc.get(STATISTICS).json()
    assert [row["name"] for row in statistics["organizations"]] == names
    center = rc.get(STATISTICS, params={"center": "org-001"}).json()
    assert center["organizations"][0]["name"] == "Szpital Łódź"


# --- Faults at run time, from another process ------------------------------------------------


def test_a_rule_posted_to_the_fail_next_endpoint_applies_to_the_next_request(fake, rc):
    # No token: the process that started the fake has none.
    response = httpx.post(fake.urls["RC"] + FAIL_NEXT_PATH,
                          json={"path": ORGANIZATIONS, "status": 429, "retry_after": 2, "count": 2})
    assert response.status_code == 200
    for _ in range(2):
        failed = rc.get(ORGANIZATIONS)
        assert failed.status_code == 429 and failed.headers["Retry-After"] == "2"
    assert rc.get(ORGANIZATIONS).status_code == 200


@pytest.mark.parametrize(
    "rule",
    [{"status": 429}, {"path": ORGANIZATIONS, "colour": "red"}, {"path": ORGANIZATIONS, "count": "many"},
     {"path": ORGANIZATIONS, "drop": True, "body": "x"}],
    ids=["no-path", "unknown-key", "bad-count", "nonsense"],
)
def test_a_bad_rule_posted_to_the_fail_next_endpoint_is_refused_400_with_a_reason(fake, rc, rule):
    response = rc.post(FAIL_NEXT_PATH, json=rule)
    assert response.status_code == 400
    assert response.json()["message"]
    assert rc.get(ORGANIZATIONS).status_code == 200  # no rule was added


# --- The command line --------------------------------------------------------------------------


def test_a_fail_next_spec_gives_the_arguments_of_fail_next():
    spec = "/api/records/byPatient,method=PATCH,status=503,after_processing=1,count=2"
    assert parse_fail_next_spec(spec) == {
        "path": "/api/records/byPatient", "method": "PATCH", "status": 503, "after_processing": True, "count": 2,
    }
    assert parse_fail_next_spec("/x,drop=true,service=RC,stall=false") == {
        "path": "/x", "drop": True, "service": "RC", "stall": False,
    }
    assert parse_fail_next_spec("/x,trickle=0.5") == {"path": "/x", "trickle": 0.5}
    assert parse_fail_next_spec("/x,status=429,retry_after=2") == {
        "path": "/x", "status": 429, "headers": {"Retry-After": "2"},
    }


def test_a_comma_inside_a_body_stays_in_the_body():
    spec = '/x,status=200,body={"data": [1, 2,content_type=application/json'
    assert parse_fail_next_spec(spec) == {
        "path": "/x", "status": 200, "body": '{"data": [1, 2', "content_type": "application/json",
    }


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("/x,colour=red", "unknown key"),
        ("/x,count=two", "count must be an integer"),
        ("/x,drop=maybe", "drop must be 1, 0, true or false"),
        ("/x,status=999", "status must be an HTTP status"),
        ("/x,service=ABC", "service must be one of"),
        ("/x,trickle=slow", "trickle must be a number"),
        ("/x,drop=1,body=oops", "drop answers nothing"),
        ("/x,count=1,count=2", "count is given twice"),
        ("x,count=1", "must start with '/'"),
        ("/x,5", "expected key=value"),
    ],
)
def test_a_bad_fail_next_spec_is_refused_with_a_reason(spec, reason, capsys):
    with pytest.raises(ValueError, match=reason):
        parse_fail_next_spec(spec)
    with pytest.raises(SystemExit) as exited:
        _parse_args(["--fail-next", spec])
    assert exited.value.code == 2
    assert "--fail-next" in capsys.readouterr().err


def test_the_command_line_reads_every_knob_and_leaves_what_follows_the_script_to_it():
    args = _parse_args([
        "--inclusion-counts", "12,0,57", "--organization-names", "Szpital Łódź;Hôpital Sainte-Anne",
        "--users", "ana=secret", "--users", "bob=pw=with=equals",
        "--fail-next", "/a,status=500", "--fail-next", "/b,drop=1",
        "--run", "my_script.py", "--resolve", "abc=done", "--latency", "9",
    ])
    assert args.inclusion_counts == [12, 0, 57]
    assert args.organization_names == ["Szpital Łódź", "Hôpital Sainte-Anne"]
    assert args.users == [("ana", "secret"), ("bob", "pw=with=equals")]
    assert args.fail_next == [{"path": "/a", "status": 500}, {"path": "/b", "drop": True}]
    assert args.run == ["my_script.py", "--resolve", "abc=done", "--latency", "9"]
    assert args.latency == 0.0  # after --run, for the script


@pytest.mark.parametrize("argv", [["--inclusion-counts", "1,x"], ["--inclusion-counts", "-1"],
                                  ["--users", "nopassword"], ["--run"]])
def test_bad_command_line_values_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        _parse_args(argv)
    assert exited.value.code == 2
    assert "error" in capsys.readouterr().err


RUN_SCRIPT = """\
import json, os, sys, urllib.error, urllib.request

def call(service, path, body=None, token=None):
    request = urllib.request.Request(os.environ[f"EB_{service}_BASE_URL"] + path,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        return error.code, None

_, master = call("IAM", "/api/auth/ziwig-pro/login",
                 {"username": os.environ["EB_USER_NAME"], "password": os.environ["EB_PASSWORD"]})
_, pair = call("RC", "/api/auth/config-token", {"userId": master["userId"]}, master["access_token"])
first, _ = call("RC", "/api/inclusions/getAllOrganizations", token=pair["access_token"])
second, organizations = call("RC", "/api/inclusions/getAllOrganizations", token=pair["access_token"])
print(json.dumps({"argv": sys.argv[1:], "statuses": [first, second],
                  "names": [org["name"] for org in organizations]}))
sys.exit(3)
"""


def test_run_gives_the_script_its_arguments_the_settings_and_the_fakes_exit_status_is_the_scripts(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(RUN_SCRIPT, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(FAKE_SCRIPT), "--users", "ana=secret", "--inclusion-counts", "1,2",
         "--organization-names", "Szpital Łódź", "--fail-next", f"{ORGANIZATIONS},status=418",
         "--run", str(script), "a", "--resolve", "abc=done"],
        capture_output=True, text=True, encoding="utf-8", timeout=30,
    )
    assert result.returncode == 3, result.stderr
    seen = json.loads(result.stdout)
    assert seen["argv"] == ["a", "--resolve", "abc=done"]
    assert seen["statuses"] == [418, 200]  # the --fail-next rule, then the real answer
    assert seen["names"] == ["Szpital Łódź", "Hospital 2"]  # logged in as ana, with --users
