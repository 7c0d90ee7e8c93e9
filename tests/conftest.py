"""Fixtures shared by the tests: the fake platform on 127.0.0.1, the template module
pointed at it, and the way users and runners run a copy of the template."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fake_platform import DEMO_PASSWORD, DEMO_USER_NAME, FakePlatform

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "eb_script_template.py"

# The TODO block of main(): from its first comment line to its end marker, both kept out.
TODO_BLOCK = re.compile(r"(    # TODO: Developer implements.*?\n)(.*?)(    # END OF TODO BLOCK\n)", re.S)

# Variables of the developer's environment that would change how a child script behaves.
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """Neither a proxy nor an EB_* setting of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.upper() in PROXY_VARIABLES or name.startswith("EB_"):
            monkeypatch.delenv(name)


@pytest.fixture
def sigint_reaches_children():
    """A child started during the test gets Ctrl+C (SIGINT) even when this process was
    started with SIGINT ignored, as background jobs of a shell are: an ignored signal is
    inherited across exec, a handler is reset to the default."""
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def fake(request):
    """The fake platform, on free ports of 127.0.0.1. A test sets its knobs with a marker:
    @pytest.mark.fake(latency=2.0, revoke_previous_access_token=True)."""
    marker = request.node.get_closest_marker("fake")
    with FakePlatform(**(marker.kwargs if marker else {})) as platform:
        yield platform


@pytest.fixture
def template(fake, monkeypatch):
    """The template module, pointed at the fake, with fresh state and short retry waits."""
    import eb_script_template as module

    for name, url in fake.urls.items():
        monkeypatch.setitem(module.MICROSERVICES[name], "base_url", url)
    monkeypatch.setattr(module, "WAIT_BEFORE_RETRY", 0.01)
    reset_state(module)
    yield module
    for client in module.httpx_clients.values():
        client.close()
    reset_state(module)


def reset_state(module):
    """The template's globals as a new process has them."""
    if module._journal["file"] is not None:
        module._journal["file"].close()
    for collection in (module.tokens, module.httpx_clients, module._credentials, module._secrets,
                       module._failed_renewals, module.failed_items, module._write_outcomes,
                       module._writes_in_flight, module._dry_run_would):
        collection.clear()
    module._journal.update(file=None, run=None, dry_run=False, resume={}, resumed_runs=[], uncertain=[])
    module._stop_requested.clear()
    module._finishing.clear()
    module._stop_signal = None
    module.main_thread_pool = module.subtasks_thread_pool = None


@pytest.fixture
def logged_in(template, monkeypatch):
    """The template after a successful unattended login to the fake."""
    monkeypatch.setenv("EB_NON_INTERACTIVE", "1")
    monkeypatch.setattr(template, "DEFAULT_USER_NAME", DEMO_USER_NAME)
    monkeypatch.setattr(template, "DEFAULT_PASSWORD", DEMO_PASSWORD)
    assert template.login() == "Success"
    return template


@pytest.fixture
def writing(logged_in, monkeypatch, tmp_path):
    """The template logged in, as a script that changes data in a real run: CHANGES_DATA
    True, its write journal open in a temporary working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(logged_in, "CHANGES_DATA", True)
    logged_in.start_journal(dry_run=False)
    return logged_in


def journal_lines(directory, name="eb_script_template"):
    """The lines of a write journal, parsed."""
    path = Path(directory) / f"{name}.journal.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def errors_in_threads(function, count):
    """Run function() in `count` threads at once; the exceptions they raised."""
    errors = []

    def call():
        try:
            function()
        except Exception as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def write_copy(directory, job=None, name="my_job.py", replacements=()):
    """Copy the template the way a user does, its TODO block replaced by `job` (code
    indented for main()), and each (old, new) of `replacements` applied once."""
    text = TEMPLATE.read_text(encoding="utf-8")
    if job is not None:
        text, count = TODO_BLOCK.subn(lambda match: match[1] + job + match[3], text)
        assert count == 1, "the template's TODO block markers changed"
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, 1)
    script = Path(directory) / name
    script.write_text(text, encoding="utf-8")
    return script


def script_environment(fake, **settings):
    """The environment of a child script: this one, the fake's URLs, then `settings`
    (None removes a variable)."""
    environment = dict(os.environ, **fake.environment(), PYTHONUNBUFFERED="1")
    for name, value in settings.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return environment


def run_unattended(script, fake, timeout=60, encoding="utf-8", **settings):
    """Run a copy as cron or a runner would: no terminal, stdin from /dev/null; its output
    read in `encoding`."""
    command, options = unattended_command(script, fake, settings)
    return subprocess.run(command, **options, capture_output=True, encoding=encoding, timeout=timeout)


def start_unattended(script, fake, output=subprocess.PIPE, **settings):
    """Start a copy as run_unattended() runs it, without waiting: for a test that signals
    or kills it. Its stdout and stderr go to `output` (read as text)."""
    command, options = unattended_command(script, fake, settings)
    return subprocess.Popen(command, **options, stdout=output, stderr=output, text=True)


def unattended_command(script, fake, settings):
    """(command, options) of an unattended run: credentials of the fake's demo account
    unless `settings` say otherwise, no terminal, stdin from /dev/null."""
    settings.setdefault("EB_USER_NAME", DEMO_USER_NAME)
    settings.setdefault("EB_PASSWORD", DEMO_PASSWORD)
    options = {"cwd": script.parent, "env": script_environment(fake, **settings), "stdin": subprocess.DEVNULL}
    return [sys.executable, script.name], options


def wait_until(condition, timeout=60):
    """Poll condition() until it is true or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def assert_one_clear_line(stderr, *expected):
    """The one line a failure prints on stderr, without a traceback, holding `expected`."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for text in expected:
        assert text in lines[0]
    return lines[0]
