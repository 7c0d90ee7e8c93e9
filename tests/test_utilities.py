"""The pure helpers of the template, tested in process."""

import logging
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest

import eb_script_template as template
from conftest import ROOT, script_environment
from eb_script_template import get_nested_value
from fake_platform import DEMO_PASSWORD

DATA = {
    "a": {"b": 1, "none": None, "zero": 0},
    "items": [{"x": 1, "tags": ["t1", "t2"]}, {"x": 2, "tags": []}, {"y": 3}],
    "matrix": [[1, 2], [3]],
    7: "int key",
}


@pytest.mark.parametrize(
    "path, expected",
    [
        (["a", "b"], 1),
        (("a", "b"), 1),
        (["a"], {"b": 1, "none": None, "zero": 0}),
        ([], DATA),
        (["a", "zero"], 0),
        (["a", "none"], None),
        (["items", 0, "x"], 1),
        (["items", -1, "y"], 3),
        (["items", "*", "x"], [1, 2]),
        (["items", "*", "tags"], [["t1", "t2"], []]),
        (["items", "*", "tags", "*"], [["t1", "t2"], []]),
        (["items", "*", "tags", 0], ["t1"]),
        (["matrix", "*", "*"], [[1, 2], [3]]),
        (["matrix", "*", 1], [2]),
        (["items", "*", "missing"], []),
        ([7], "int key"),
    ],
)
def test_get_nested_value_finds_what_the_path_names(path, expected):
    assert get_nested_value(DATA, path) == expected


@pytest.mark.parametrize(
    "path",
    [
        ["missing"],
        ["a", "b", "c"],  # step into an int
        ["a", "missing"],
        ["items", 3],  # index out of range
        ["items", -4],
        ["items", "0"],  # a string is not an index
        ["items", True],  # nor is a bool
        ["a", 0],  # an index into a dict with no such key
        ["a", "*"],  # a wildcard on a dict
        ["a", "b", "*"],  # a wildcard on an int
        [["unhashable"]],
    ],
)
def test_get_nested_value_gives_the_default_on_a_bad_path(path):
    assert get_nested_value(DATA, path, default="default") == "default"


@pytest.mark.parametrize("data", [None, 42, "text", [], {}])
def test_get_nested_value_never_raises_on_odd_data(data):
    assert get_nested_value(data, ["a", "*", 0], default="default") == "default"


def test_get_nested_value_docstring_examples_hold():
    assert get_nested_value({"a": {"b": 1}}, ["a", "b"]) == 1
    assert get_nested_value({"items": [{"x": 1}, {"x": 2}]}, ["items", "*", "x"]) == [1, 2]
    assert get_nested_value({"a": [10, 20]}, ["a", -1]) == 20
    assert get_nested_value({"a": [10, 20]}, ["a", 5], default=0) == 0
    assert get_nested_value({"a": [{"b": [1, 2]}, {"b": [3]}]}, ["a", "*", "b", "*"]) == [[1, 2], [3]]


def test_thread_position_is_stable_within_a_thread_and_distinct_across_threads():
    barrier = threading.Barrier(8)

    def positions():
        barrier.wait()  # all 8 threads alive at once: no thread id can be reused
        return template.get_thread_position(), template.get_thread_position()

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = [future.result() for future in [pool.submit(positions) for _ in range(8)]]
    assert all(first == second for first, second in results)
    assert len({first for first, _ in results}) == 8


def test_each_thread_gets_one_client_and_reuses_it(template):
    barrier = threading.Barrier(4)

    def clients():
        barrier.wait()
        return template.get_httpx_client(), template.get_httpx_client()

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = [future.result() for future in [pool.submit(clients) for _ in range(4)]]
    assert all(first is second for first, second in results)
    assert len({id(first) for first, _ in results}) == 4


def test_clients_of_all_threads_share_one_tls_context_so_a_new_thread_starts_fast(template):
    with ThreadPoolExecutor(max_workers=3) as pool:
        clients = list(pool.map(lambda _: template.get_httpx_client(), range(3)))
    contexts = {id(client._transport._pool._ssl_context) for client in clients}
    assert contexts == {id(template._ssl_context)}


def test_a_second_phase_pool_left_by_ctrl_c_runs_none_of_its_queued_tasks(template):
    started = []

    def task():
        started.append(1)
        threading.Event().wait(0.05)

    with pytest.raises(KeyboardInterrupt):
        with template.StoppableThreadPool(max_workers=2) as pool:
            for _ in range(300):
                pool.submit(task)
            raise KeyboardInterrupt
    assert len(started) <= 4
    assert template._stop_requested.is_set()


def test_iter_completed_yields_each_task_once_as_it_finishes(template):
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(threading.Event().wait, delay) for delay in (0.3, 0.0, 0.15)]
        futures.append(futures[1])  # a future given twice is yielded once, as as_completed() does
        finished = list(template.iter_completed(futures))
    assert finished == [futures[1], futures[2], futures[0]]


def test_iter_completed_yields_a_cancelled_task_too(template):
    with ThreadPoolExecutor(max_workers=1) as pool:
        release = threading.Event()
        running, queued = pool.submit(release.wait), pool.submit(int)
        queued.cancel()
        release.set()
        assert set(template.iter_completed([running, queued])) == {running, queued}


def test_a_stop_cancels_the_tasks_still_queued_in_both_pools(template):
    release = threading.Event()
    template.main_thread_pool = template.StoppableThreadPool(1)
    template.subtasks_thread_pool = template.StoppableThreadPool(1)
    queued = []
    for pool in (template.main_thread_pool, template.subtasks_thread_pool):
        pool.submit(release.wait)
        queued += [pool.submit(int) for _ in range(5)]
    template.request_stop()
    release.set()
    assert all(future.cancelled() for future in queued)


def test_the_log_shows_stars_instead_of_the_password_and_tokens(logged_in):
    pair = logged_in.tokens["RC"]
    record = logging.LogRecord("job", logging.DEBUG, __file__, 1, "%s", None, None)
    record.args = (f"password={DEMO_PASSWORD} access={pair['access_token']} refresh={pair['refresh_token']}",)
    text = logged_in._UtcSecretRedactingFormatter("%(message)s").format(record)
    assert text == "password=*** access=*** refresh=***"


def test_a_password_file_keeps_spaces_and_drops_only_the_final_line_break(template, tmp_path, monkeypatch):
    path = tmp_path / "password.txt"
    path.write_bytes(b"  pass word \t\r\n")
    monkeypatch.setenv("EB_PASSWORD_FILE", str(path))
    assert template._password_setting() == "  pass word \t"


def test_an_http_error_is_described_on_one_line():
    request = httpx.Request("GET", "http://127.0.0.1:1/api/x?page=2")
    error = httpx.HTTPStatusError("long\nmessage", request=request, response=httpx.Response(404, request=request))
    assert template.describe_error(error) == "404 Not Found from GET http://127.0.0.1:1/api/x?page=2"
    refused = httpx.ConnectError("refused\nmore", request=request)
    expected = "GET http://127.0.0.1:1/api/x?page=2: cannot connect (ConnectError: refused)"
    assert template.describe_error(refused) == expected
    lost = httpx.RemoteProtocolError("Server disconnected", request=request)
    assert "the server closed the connection without a complete answer" in template.describe_error(lost)
    assert template.describe_error(RuntimeError()) == "RuntimeError"


@pytest.mark.parametrize(
    "value, low, high",
    [("3", 3, 3), ("1.5", 1.5, 1.5), ("-5", -5, -5)],
)
def test_retry_after_in_seconds_is_understood(value, low, high):
    assert low <= template._seconds_from_retry_after(value) <= high


@pytest.mark.parametrize("value", [None, "", "soon"])
def test_a_missing_or_nonsense_retry_after_is_ignored(value):
    assert template._seconds_from_retry_after(value) is None


def test_retry_after_as_an_http_date_is_understood():
    in_ten_seconds = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=10), usegmt=True)
    assert 8 <= template._seconds_from_retry_after(in_ten_seconds) <= 10


def test_retry_after_is_read_up_to_the_cap_and_only_from_an_answer(monkeypatch):
    monkeypatch.setattr(template, "RETRY_AFTER_MAX", 30)

    def retry_after(headers):
        request = httpx.Request("GET", "http://127.0.0.1:1/")
        response = httpx.Response(429, headers=headers, request=request)
        return template._retry_after(httpx.HTTPStatusError("", request=request, response=response))

    assert retry_after({}) is None
    assert retry_after({"Retry-After": "0"}) == 0
    assert retry_after({"Retry-After": "-3"}) == 0
    assert retry_after({"Retry-After": "4"}) == 4
    assert retry_after({"Retry-After": "3600"}) == 30
    assert template._retry_after(httpx.ReadTimeout("slow")) is None


def test_importing_the_template_prompts_nothing_connects_nowhere_and_writes_nothing(tmp_path, fake):
    code = (
        "import threading, eb_script_template as t;"
        "assert threading.active_count() == 1, threading.enumerate();"
        "assert t.main_thread_pool is None and t.tokens == {} and t.httpx_clients == {};"
        "print(t.MICROSERVICES['RC']['base_url'])"
    )
    environment = script_environment(fake, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == fake.urls["RC"]  # EB_RC_BASE_URL applied at import
    assert list(tmp_path.iterdir()) == []  # no log file
    assert fake.connections() == 0
