"""Changing clinical data safely: declared writes, a dry run, a write journal, resume
without writing twice. A copy of the template with CHANGES_DATA = True, run as a child
process as users and runners run it, against the fake platform's records over real sockets.
Its job is the worked modification example of README_TEMPLATE.md, taken from the README."""

import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from conftest import (
    ROOT,
    assert_one_clear_line,
    journal_lines,
    run_unattended,
    script_environment,
    start_unattended,
    wait_until,
    write_copy,
)

UPDATE = "/api/records/byPatient"
LOGIN = "/api/auth/ziwig-pro/login"
PATIENTS = 356  # the fake's inclusions: 12 + 0 + 57 + 130 + 3 + 41 + 88 + 25

README = (ROOT / "README_TEMPLATE.md").read_text(encoding="utf-8")
WORKED_EXAMPLE = re.search(r"```python\n(    # Worked modification example.*?)```", README, re.S)[1]
CHANGES_DATA = ("CHANGES_DATA = False", "CHANGES_DATA = True")


def update_job(tmp_path, job=WORKED_EXAMPLE, replacements=()):
    return write_copy(tmp_path, job, replacements=[CHANGES_DATA, *replacements])


def run(script, fake, dry_run="0", **settings):
    return run_unattended(script, fake, EB_DRY_RUN=dry_run, EB_THREADS="8", **settings)


def writes_of_run(directory, run_index=-1):
    """{outcome: count} of the final outcome lines of one run of the journal."""
    lines = journal_lines(directory, "my_job")
    runs = [line["run"] for line in lines if line.get("event") == "start"]
    return Counter(line["outcome"] for line in lines
                   if line["run"] == runs[run_index] and "key" in line and line["outcome"] != "sending")


def end_of_run(directory, run_index=-1):
    return [line for line in journal_lines(directory, "my_job") if line.get("event") == "end"][run_index]


def every_record_changed_once(fake):
    changes = Counter(fake.changes(patient) for patient in fake_patients(fake))
    return changes == Counter({1: PATIENTS})


def fake_patients(fake):
    return [f"pat-{org + 1:03d}-{number + 1:04d}" for org, count in enumerate((12, 0, 57, 130, 3, 41, 88, 25))
            for number in range(count)]


# --- Declared writes and the dry run ---------------------------------------------------


def test_a_dry_run_sends_no_write_journals_what_it_would_send_and_says_so(tmp_path, fake):
    result = run(update_job(tmp_path), fake, dry_run="1")
    assert result.returncode == 0, result.stderr
    assert fake.calls(UPDATE) == 0 and fake.total_changes() == 0
    assert writes_of_run(tmp_path) == {"dry-run": PATIENTS}
    line = next(line for line in journal_lines(tmp_path, "my_job") if line.get("outcome") == "dry-run")
    assert line["method"] == "PATCH" and line["body"] == {"fields": {"consentVersion": "v2"}}
    assert "DRY RUN" in result.stdout and f"Dry run: {PATIENTS} writes built, none sent" in result.stdout
    assert f"A real run would send {PATIENTS}, skip 0" in result.stdout


@pytest.mark.parametrize("value", [None, "", "yes", "2"])
def test_an_unattended_run_of_a_script_that_changes_data_must_say_dry_or_real(tmp_path, fake, value):
    result = run(update_job(tmp_path), fake, dry_run=value)
    assert result.returncode == 2
    assert_one_clear_line(result.stderr, "EB_DRY_RUN")
    assert fake.calls(LOGIN) == 0


def test_a_script_that_does_not_change_data_needs_no_eb_dry_run_and_cannot_write(tmp_path, fake):
    script = write_copy(tmp_path, "    update_record_fields('pat-001-0001', {'consentVersion': 'v2'})\n")
    result = run_unattended(script, fake)
    assert result.returncode == 1
    assert "CHANGES_DATA" in result.stderr
    assert fake.calls(UPDATE) == 0
    assert not (tmp_path / "my_job.journal.jsonl").exists()


def test_a_real_run_changes_each_record_once_and_journals_each_write(tmp_path, fake):
    result = run(update_job(tmp_path), fake)
    assert result.returncode == 0, result.stderr
    assert every_record_changed_once(fake)
    assert writes_of_run(tmp_path) == {"done": PATIENTS}
    assert end_of_run(tmp_path)["exit_status"] == 0
    assert f"done {PATIENTS}" in (tmp_path / "my_job.log").read_text(encoding="utf-8")


# --- Retries of writes, summary and exit status --------------------------------------


def test_a_write_applied_then_answered_503_is_sent_once_unknown_and_the_run_fails(tmp_path, fake):
    fake.fail_next(UPDATE, method="PATCH", status=503, after_processing=True)
    result = run(update_job(tmp_path), fake)
    assert result.returncode == 1
    assert every_record_changed_once(fake)
    assert fake.calls(UPDATE) == PATIENTS  # the 503 was not retried
    assert writes_of_run(tmp_path) == {"done": PATIENTS - 1, "unknown": 1}
    assert "Write not done for sure: update_record_fields(patient_id=" in result.stderr


# --- Resume --------------------------------------------------------------------------


def test_a_run_that_stops_midway_is_resumed_and_every_record_is_changed_once(tmp_path, fake):
    script = update_job(tmp_path)
    # Ten writes applied whose answers are lost, and ten refused with 500: MAX_FAILED_ITEMS
    # (10) is reached and the run stops midway.
    fake.fail_next(UPDATE, method="PATCH", count=5, drop=True, after_processing=True)
    fake.fail_next(UPDATE, method="PATCH", count=5, status=500)
    first = run(script, fake)
    assert first.returncode == 1
    assert "MAX_FAILED_ITEMS" in first.stderr
    first_writes = writes_of_run(tmp_path)
    assert first_writes["unknown"] >= 10 and first_writes["done"] < PATIENTS - 10

    second = run(script, fake)
    assert second.returncode == 0, second.stderr
    assert "Resuming 1 unfinished run(s)" in second.stdout
    assert every_record_changed_once(fake)
    second_writes = writes_of_run(tmp_path)
    # Skipped: the writes done, the five lost answers (found applied by verify=), and any
    # write the stop cut off after the fake applied it.
    assert second_writes["skipped"] >= first_writes["done"] + 5
    assert second_writes["done"] == PATIENTS - second_writes["skipped"]


@pytest.mark.fake(latency=0.05)
def test_a_run_killed_without_warning_is_resumed_and_every_record_is_changed_once(tmp_path, fake):
    script = update_job(tmp_path)
    process = start_unattended(script, fake, output=subprocess.DEVNULL, EB_DRY_RUN="0", EB_THREADS="8")
    wait_until(lambda: fake.total_changes() >= 100)
    process.kill()  # SIGKILL; TerminateProcess on Windows: no clean-up at all
    process.wait(timeout=30)
    time.sleep(0.2)  # let the writes that reached the fake finish there
    killed_at = fake.total_changes()
    assert 100 <= killed_at < PATIENTS

    result = run(script, fake)
    assert result.returncode == 0, result.stderr
    assert every_record_changed_once(fake)
    resuming_run = [line for line in journal_lines(tmp_path, "my_job") if line["run"] == end_of_run(tmp_path)["run"]]
    assert resuming_run[0]["resumes"]  # it named the killed run, which has no end line
    assert writes_of_run(tmp_path)["skipped"] >= 100


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, which Windows cannot send to one process")
@pytest.mark.fake(latency=0.05)
@pytest.mark.usefixtures("sigint_reaches_children")
def test_ctrl_c_midway_shows_the_summary_and_the_resume_changes_every_record_once(tmp_path, fake):
    script = update_job(tmp_path)
    process = start_unattended(script, fake, EB_DRY_RUN="0", EB_THREADS="8")
    wait_until(lambda: fake.total_changes() >= 100)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "Writes of this run" in stdout
    first = writes_of_run(tmp_path)
    assert first["done"] >= 100 and end_of_run(tmp_path)["exit_status"] == 130

    result = run(script, fake)
    assert result.returncode == 0, result.stderr
    assert every_record_changed_once(fake)


CREATE_JOB = """\
    for number in range(1, 6):
        try:
            create_record(f"pat-004-{number:04d}", {"source": "import"})
        except Exception as exc:
            logging.error(f"record {number}: {exc}")
"""


def test_an_unknown_write_without_verify_is_not_sent_again_until_a_person_resolves_it(tmp_path, fake):
    script = update_job(tmp_path, CREATE_JOB)
    fake.fail_next("/api/records", method="POST", status=503, after_processing=True)
    assert run(script, fake).returncode == 1
    assert len(fake.created_records()) == 5

    second = run(script, fake)
    assert second.returncode == 1
    assert len(fake.created_records()) == 5  # the uncertain one was not created twice
    assert writes_of_run(tmp_path) == {"skipped": 4, "unknown": 1}
    key = next(line["key"] for line in journal_lines(tmp_path, "my_job") if line.get("outcome") == "unknown")
    assert f"create_record(patient_id='pat-004-0001', fields={{'source': 'import'}}) [key {key}]" in second.stderr

    resolved = subprocess.run([sys.executable, script.name, "--resolve", f"{key}=done"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, env=script_environment(fake))
    assert resolved.returncode == 0, resolved.stderr
    third = run(script, fake)
    assert third.returncode == 0, third.stderr
    assert writes_of_run(tmp_path) == {"skipped": 5}
    assert len(fake.created_records()) == 5


def test_a_successful_run_closes_the_chain_so_a_daily_job_writes_again(tmp_path, fake):
    script = update_job(tmp_path)
    assert run(script, fake).returncode == 0
    assert run(script, fake).returncode == 0
    assert writes_of_run(tmp_path) == {"done": PATIENTS}
    assert fake.total_changes() == 2 * PATIENTS


def test_a_dry_run_shows_what_the_resume_would_skip_and_leaves_the_chain_open(tmp_path, fake):
    script = update_job(tmp_path)
    fake.fail_next(UPDATE, method="PATCH", count=10, status=500)
    assert run(script, fake).returncode == 1
    done_before = writes_of_run(tmp_path)["done"]

    dry = run(script, fake, dry_run="1")
    assert dry.returncode == 0, dry.stderr
    would = Counter(line.get("would") for line in journal_lines(tmp_path, "my_job")
                    if line.get("outcome") == "dry-run" and line["run"] == end_of_run(tmp_path)["run"])
    # Skipped: the writes done, and those cut off by the stop after the fake applied them
    # (unknown, then found applied by verify=).
    assert would["skip"] >= done_before and would["skip"] + would["send"] == PATIENTS
    assert fake.total_changes() == would["skip"]  # nothing was sent by the dry run

    assert run(script, fake).returncode == 0
    assert every_record_changed_once(fake)


# --- One run at a time, logs kept -----------------------------------------------------


@pytest.mark.fake(latency=0.5)
def test_a_second_copy_started_in_the_same_folder_is_refused_and_touches_nothing(tmp_path, fake):
    script = update_job(tmp_path)
    first = start_unattended(script, fake, output=subprocess.DEVNULL, EB_DRY_RUN="0")
    try:
        wait_until(lambda: fake.calls(UPDATE) > 0, timeout=30)
        log_before = (tmp_path / "my_job.log").read_bytes()
        journal_before = (tmp_path / "my_job.journal.jsonl").read_bytes()
        started = time.monotonic()
        second = run(script, fake)
        assert time.monotonic() - started < 5
        assert second.returncode == 1
        assert_one_clear_line(second.stderr, "already running")
        assert (tmp_path / "my_job.log").read_bytes().startswith(log_before)
        assert (tmp_path / "my_job.journal.jsonl").read_bytes().startswith(journal_before)
        assert not (tmp_path / "my_job.log.1").exists()
        assert fake.logins == 1
    finally:
        first.kill()
        first.wait(timeout=30)


def test_three_runs_leave_three_logs_the_newest_first(tmp_path, fake):
    script = write_copy(tmp_path, "    logging.info(f'run marker {os.environ[\"RUN_MARKER\"]}')\n")
    for marker in ("first", "second", "third"):
        assert run_unattended(script, fake, RUN_MARKER=marker).returncode == 0
    assert "run marker third" in (tmp_path / "my_job.log").read_text(encoding="utf-8")
    assert "run marker second" in (tmp_path / "my_job.log.1").read_text(encoding="utf-8")
    assert "run marker first" in (tmp_path / "my_job.log.2").read_text(encoding="utf-8")
    assert not (tmp_path / "my_job.log.3").exists()
    first_line = (tmp_path / "my_job.log").read_text(encoding="utf-8").splitlines()[0]
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z - INFO - ", first_line)


def test_resolving_a_key_that_is_not_unknown_is_a_bad_setting_that_writes_nothing(tmp_path, fake):
    script = update_job(tmp_path, CREATE_JOB)
    assert run(script, fake).returncode == 0
    journal_before = (tmp_path / "my_job.journal.jsonl").read_bytes()
    result = subprocess.run([sys.executable, script.name, "--resolve", "0123456789abcdef=done"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, env=script_environment(fake))
    assert result.returncode == 2
    assert "--resolve: no write of unknown outcome has the key 0123456789abcdef" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "my_job.journal.jsonl").read_bytes() == journal_before
