"""At home on Windows and in a runner: stdin from NUL, output redirected, encodings that
never crash, password files as Windows editors save them, a working directory where
nothing can be written, output a runner e-mails, result files a colleague opens in Excel.
Run on Linux and, by tests/run_on_windows.sh, on the official Windows CPython under Wine."""

import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_unattended, script_environment, write_copy
from fake_platform import DEMO_PASSWORD, DEMO_USER_NAME

LONG_NAME = "Centre Hospitalier Universitaire de Saint-Étienne, site de Bellevue, service de gynécologie"


def test_stdin_from_the_null_device_is_an_unattended_run(tmp_path, fake):
    script = write_copy(tmp_path)
    with open(os.devnull) as null:  # NUL on Windows, where isatty() says True for it
        result = subprocess.run(
            [sys.executable, script.name], cwd=tmp_path, stdin=null, capture_output=True, text=True, timeout=60,
            env=script_environment(fake, EB_USER_NAME=DEMO_USER_NAME, EB_PASSWORD=DEMO_PASSWORD),
        )
    assert result.returncode == 0, result.stderr
    assert "Press Enter" not in result.stdout


def test_the_null_device_is_not_taken_for_a_terminal(tmp_path):
    code = "import sys, eb_script_template as t; print(sys.stdin.isatty(), t._is_terminal(sys.stdin))"
    with open(os.devnull) as null:
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, stdin=null, capture_output=True,
                                text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    isatty, is_terminal = result.stdout.split()
    assert is_terminal == "False", result.stderr
    if sys.platform == "win32":
        assert isatty == "True"  # why the template asks the console API instead


@pytest.mark.skipif(sys.platform != "win32", reason="cmd.exe and its NUL device are Windows'")
def test_python_my_script_from_cmd_with_stdin_from_nul_is_an_unattended_run(tmp_path, fake):
    script = write_copy(tmp_path)
    result = subprocess.run(
        f'cmd /s /c ""{sys.executable}" {script.name} < NUL"', cwd=tmp_path, capture_output=True, text=True,
        timeout=60, env=script_environment(fake, EB_USER_NAME=DEMO_USER_NAME, EB_PASSWORD=DEMO_PASSWORD),
    )
    assert result.returncode == 0, result.stderr
    assert "Elapsed time" in result.stdout and "Press Enter" not in result.stdout


@pytest.mark.fake(organization_names=["Szpital Łódź", "Hôpital Sainte-Anne", "Klinikum Göttingen"])
def test_server_data_the_output_cannot_encode_is_replaced_and_the_results_keep_it(tmp_path, fake):
    # What Windows gives a redirected output: cp1252, strict (unless the template says otherwise)
    result = run_unattended(write_copy(tmp_path), fake, encoding="cp1252", PYTHONIOENCODING="cp1252")
    assert result.returncode == 0, result.stderr
    assert "Szpital ?" in result.stdout and "Hôpital Sainte-Anne" in result.stdout
    text = (tmp_path / "inclusions_by_organization.csv").read_text(encoding="utf-8-sig")
    assert "Szpital Łódź;Paris;12" in text
    rows = json.loads((tmp_path / "inclusions_by_organization.json").read_text(encoding="utf-8"))
    assert {"organization": "Szpital Łódź", "city": "Paris", "inclusions": 12} in rows


@pytest.mark.fake(organization_names=[LONG_NAME])
def test_output_that_is_not_a_terminal_is_not_cut_at_80_columns(tmp_path, fake):
    result = run_unattended(write_copy(tmp_path), fake, PYTHONIOENCODING="utf-8")  # É on Windows too
    assert result.returncode == 0, result.stderr
    assert any(LONG_NAME in line for line in result.stdout.splitlines())


@pytest.mark.parametrize(
    "content",
    [b"\xef\xbb\xbf" + DEMO_PASSWORD.encode() + b"\r\n",  # Notepad: UTF-8 with a byte-order mark
     b"\xff\xfe" + (DEMO_PASSWORD + "\r\n").encode("utf-16-le")],  # PowerShell 5.1: `"..." > file`
    ids=["utf-8-bom", "utf-16"],
)
def test_a_password_file_saved_by_a_windows_editor_is_read(tmp_path, fake, content):
    password_file = tmp_path / "password.txt"
    password_file.write_bytes(content)
    result = run_unattended(write_copy(tmp_path), fake, EB_PASSWORD=None, EB_PASSWORD_FILE=str(password_file))
    assert result.returncode == 0, result.stderr
    assert fake.logins == 1


def test_a_password_file_that_is_not_text_is_a_bad_setting_with_a_clear_line(tmp_path, fake):
    password_file = tmp_path / "password.txt"
    password_file.write_bytes(b"\x80\x81\xfe\x00caf\xe9")
    result = run_unattended(write_copy(tmp_path), fake, EB_PASSWORD=None, EB_PASSWORD_FILE=str(password_file))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "EB_PASSWORD_FILE" in result.stderr
    assert "UTF-8" in result.stderr and "Traceback" not in result.stderr
    assert fake.calls("/api/auth/ziwig-pro/login") == 0


def test_a_folder_where_nothing_can_be_written_is_a_bad_setting_with_a_clear_line(tmp_path, fake):
    script = write_copy(tmp_path)
    (tmp_path / "my_job.lock").mkdir()  # what the script must create there cannot be a file
    result = run_unattended(script, fake)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "cannot write in" in line and str(tmp_path) in line and "folder where you can write" in line
    assert fake.calls("/api/auth/ziwig-pro/login") == 0


def test_a_log_that_cannot_be_written_is_a_bad_setting_naming_its_path(tmp_path, fake):
    script = write_copy(tmp_path, replacements=[("LOG_BACKUP_COUNT = 5", "LOG_BACKUP_COUNT = 0")])
    (tmp_path / "my_job.log").mkdir()
    result = run_unattended(script, fake)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"cannot write the log {tmp_path / 'my_job.log'}" in line


def test_write_csv_gives_excel_a_byte_order_mark_the_separator_and_every_accent(template, tmp_path):
    rows = [{"organization": "Hôpital Sainte-Anne", "inclusions": 3}, {"organization": "Szpital Łódź", "note": "a;b"}]
    template.write_csv(tmp_path / "out.csv", rows)
    content = (tmp_path / "out.csv").read_bytes()
    assert content.startswith(b"\xef\xbb\xbf")
    with open(tmp_path / "out.csv", encoding="utf-8-sig", newline="") as file:
        read = list(csv.reader(file, delimiter=";"))
    assert read == [["organization", "inclusions", "note"], ["Hôpital Sainte-Anne", "3", ""],
                    ["Szpital Łódź", "", "a;b"]]


def test_write_json_keeps_accents_readable(template, tmp_path):
    template.write_json(tmp_path / "out.json", [{"organization": "Szpital Łódź"}])
    text = (tmp_path / "out.json").read_text(encoding="utf-8")
    assert "Szpital Łódź" in text and json.loads(text) == [{"organization": "Szpital Łódź"}]


@pytest.mark.parametrize("writer", ["write_csv", "write_json"])
def test_a_result_file_is_never_left_half_written(template, tmp_path, writer):
    path = tmp_path / "results.out"
    path.write_text("the previous complete result", encoding="utf-8")

    def rows():
        yield {"organization": "first"}
        raise RuntimeError("the run failed while the rows were being produced")

    with pytest.raises(RuntimeError):
        getattr(template, writer)(path, rows() if writer == "write_csv" else {"rows": RowsThatFail()})
    assert path.read_text(encoding="utf-8") == "the previous complete result"
    assert [entry.name for entry in tmp_path.iterdir()] == ["results.out"]


class RowsThatFail:
    """A value json.dump() fails on halfway (it writes it with str())."""

    def __str__(self):
        raise RuntimeError("cannot serialise")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_a_result_file_is_readable_by_colleagues_like_any_other_file(template, tmp_path):
    template.write_csv(tmp_path / "out.csv", [{"a": 1}])
    assert (tmp_path / "out.csv").stat().st_mode & 0o777 == 0o644
