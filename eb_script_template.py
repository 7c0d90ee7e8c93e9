# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "httpx>=0.28,<1",
#     "questionary>=2.0",
#     "rich>=13.0",
#     "tqdm>=4.66",
# ]
# ///
"""Endobest script template: the starting point of every script that reads or changes data
on the Endobest clinical research platform (IAM, RC and GDD microservices).

How to use a copy:

    cp eb_script_template.py my_script.py     # then edit my_script.py:
    1. CONFIGURATION CONSTANTS: the microservices you need, the endpoints you call, and
       CHANGES_DATA = True if the script changes data.
    2. API TEMPLATES: one decorated function per API call (reads and writes shown below).
    3. main(): replace the TODO block (from "TODO" to "END OF TODO BLOCK") with your job.
    python my_script.py                       # or: uv run my_script.py

It asks for the login, the password and the number of threads (and, for a script that
changes data, whether this is a dry run), shows progress bars and writes my_script.log in
the current directory; a script that changes data also keeps every write in
my_script.journal.jsonl. Run without a terminal (cron, a runner), it never prompts: it
reads EB_* environment variables and its exit status tells the outcome (0 success,
1 failure, 2 bad setting, 130 Ctrl+C, 143 SIGTERM). README_TEMPLATE.md has the details.
"""

__version__ = "2.0.0"

# ============================================================================
# IMPORTS
# ============================================================================

import argparse
import contextlib
import csv
import email.utils
import functools
import getpass
import hashlib
import inspect
import ipaddress
import json
import logging
import os
import queue
import signal
import sys
import tempfile
import threading
import traceback  # noqa: F401 - not used by the template itself: kept for the scripts built from it
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed  # noqa: F401 - as_completed: see iter_completed()
from datetime import datetime, timedelta, timezone
from time import gmtime, monotonic, perf_counter, sleep  # noqa: F401 - sleep: kept for the scripts built from it

import httpcore  # installed with httpx: the connections under it, see _DeadlineStream
import httpx
import questionary
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

if os.name == "nt":
    import ctypes  # the console API, see _is_terminal()
    import msvcrt  # the lock of one run at a time, see _lock_file()
else:
    import fcntl

# ============================================================================
# CONFIGURATION CONSTANTS
# ============================================================================

# --- Credentials ------------------------------------------------------------
# The login prompt's defaults. EB_USER_NAME and EB_PASSWORD override them without an edit.
# No password is written here: this file is copied into every script and every repository.
DEFAULT_USER_NAME = os.environ.get("EB_USER_NAME", "ziwig-invest2@yopmail.com")
DEFAULT_PASSWORD = os.environ.get("EB_PASSWORD", "")

# --- Microservices ----------------------------------------------------------
# One row per microservice: add a row to reach a new one, comment out the ones you do not
# use (login asks a token for each row but IAM). Each row: app_id, base_url, endpoints.
# A base_url is https://, or http:// on this machine only: credentials never travel in clear.
MICROSERVICES = {
    "IAM": {
        "app_id": None,  # IAM does not use an app_id
        "base_url": "https://api-auth.ziwig-connect.com",
        "endpoints": {
            "login": "/api/auth/ziwig-pro/login",
            "refresh": "/api/auth/refreshToken",
        },
    },
    "RC": {
        "app_id": "602aea51-cdb2-4f73-ac99-fd84050dc393",
        "base_url": "https://api-hcp.ziwig-connect.com",
        "endpoints": {
            "config_token": "/api/auth/config-token",
            "refresh": "/api/auth/refreshToken",
            "organizations": "/api/inclusions/getAllOrganizations",
            "statistics": "/api/inclusions/inclusion-statistics",
            "search_inclusions": "/api/inclusions/search",
            "record_by_patient": "/api/records/byPatient",
            "surveys": "/api/surveys/filter/with-answers",
            # Example write endpoints, used by create_record() and update_record_fields():
            # check the real paths with the platform team first.
            "create_record": "/api/records",
            "update_record": "/api/records/byPatient",
        },
    },
    "GDD": {
        "app_id": None,  # To fill in if different from RC
        "base_url": "https://api-lab.ziwig-connect.com",
        "endpoints": {
            "config_token": "/api/auth/config-token",
            "refresh": "/api/auth/refreshToken",
            "request_by_tube": "/api/requests/by-tube-id",
        },
    },
}

# EB_<NAME>_BASE_URL (EB_IAM_BASE_URL, EB_RC_BASE_URL, EB_GDD_BASE_URL) points a row at
# another server without an edit: a staging platform, or the fake platform of the tests.
for _name, _service in MICROSERVICES.items():
    _service["base_url"] = os.environ.get(f"EB_{_name}_BASE_URL", _service["base_url"])

USER_AGENT = f"Mozilla/5.0 (compatible; eb_script_template/{__version__})"

# --- Data changes -----------------------------------------------------------
# True if this script changes data. Writes (functions decorated with
# @api_call_with_retry(app, idempotent=False)) are then journaled, rehearsed by a dry run,
# and resumed without being sent twice. While False, calling a write raises at once.
CHANGES_DATA = False
MAX_FAILED_ITEMS = 10  # process_in_pool() stops the run after this many failed items

# --- Threading --------------------------------------------------------------
MAX_THREADS = 20  # Upper limit for the main pool
SUBTASKS_POOL_SIZE = 40  # Fixed size of the subtasks pool
DEFAULT_NUMBER_OF_THREADS = 12  # The prompt's default; EB_THREADS's default when unattended
MAX_PENDING_TASKS = 1000  # process_in_pool(): tasks submitted ahead, so memory stays flat
STOP_POLL_INTERVAL = 0.1  # Seconds between two looks at the stop flag of a waiting thread
STOP_GRACE = 1.0  # Seconds a stopped run waits for calls in flight before exiting anyway

# --- Retry & Logging --------------------------------------------------------
ERROR_MAX_RETRY = 10  # Attempts per API call, the first one included
WAIT_BEFORE_RETRY = 0.5  # Seconds between attempts (fixed, not exponential)
API_TIMEOUT = 60  # Seconds for a whole API call (change it here, or pass timeout= in one call)
AUTH_TIMEOUT = 20  # Seconds for a whole login, config-token or refresh request
RETRY_AFTER_MAX = 60  # Seconds: the longest one Retry-After header makes us wait
RATE_LIMIT_MAX_WAIT = 600  # Seconds: total wait of one call on 429s with Retry-After

# What an API call retries. Any other error is raised at once, unchanged (a 404 stays an
# httpx.HTTPStatusError the caller can catch): no retry can fix it. A 401 is always
# followed by a token refresh and a retry. A 429 with Retry-After waits without using up
# an attempt, up to RATE_LIMIT_MAX_WAIT in all.
RETRY_ON_STATUS = frozenset({408, 429, *range(500, 600)})
RETRY_ON_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# What a write (idempotent=False) retries: only what proves the server did not process it.
# Besides these statuses, a write is retried when not one byte of it left this machine.
NOT_PROCESSED_STATUS = frozenset({429})

LOG_LEVEL = logging.INFO  # Default log level (DEBUG for details)
LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"  # asctime is UTC: 2026-01-31T08:00:00.123Z
LOG_BACKUP_COUNT = 5  # Logs of previous runs kept: my_script.log.1 (newest) to .log.5
# The log file is named after the script: my_script.py writes my_script.log.

# --- Progress bars ----------------------------------------------------------
BAR_N_FMT_WIDTH = 4
BAR_TOTAL_FMT_WIDTH = 4
BAR_TIME_WIDTH = 8
BAR_RATE_WIDTH = 10

custom_bar_format = (
    "{l_bar}{bar}"
    f" {{n_fmt:>{BAR_N_FMT_WIDTH}}}/{{total_fmt:<{BAR_TOTAL_FMT_WIDTH}}} "
    f"[{{elapsed:<{BAR_TIME_WIDTH}}}<{{remaining:>{BAR_TIME_WIDTH}}}, "
    f"{{rate_fmt:>{BAR_RATE_WIDTH}}}]{{postfix}}"
)

# --- Console and result files ------------------------------------------------
REDIRECTED_OUTPUT_WIDTH = 400  # Columns of rich's output when it is not a terminal
CSV_SEPARATOR = ";"  # write_csv(): French Excel expects ";", English Excel ","

# --- Exit statuses (what cron or a runner sees) -----------------------------
EXIT_SUCCESS = 0
EXIT_FAILURE = 1  # Any failure: login, an API call, a failed item, a write not done
EXIT_BAD_SETTING = 2  # A wrong or missing setting, found before any login
EXIT_INTERRUPTED = 130  # Ctrl+C, as a shell reports a process stopped by SIGINT
EXIT_TERMINATED = 143  # SIGTERM (a runner's timeout, `timeout`, a service manager)

# --- Example job (the TODO block of main(); delete with it) -----------------
PROTOCOL_ID = ""  # The study whose inclusions search_inclusions() looks for
INCLUSIONS_PAGE_SIZE = 50
RESULTS_FILE_NAME = "inclusions_by_organization"  # .csv and .json, in the current directory

# ============================================================================
# GLOBAL VARIABLES
# ============================================================================

# Tokens per microservice: {app_name: {"access_token": ..., "refresh_token": ...}}.
# A refresh replaces an app's whole dict, so a reader never sees half of a pair.
tokens = {}

# Thread-safe pool of HTTP clients: one httpx.Client per thread, keyed by thread id
httpx_clients = {}

# Threads management (progress bar positions)
threads_list = []
_threads_list_lock = threading.Lock()
_token_refresh_lock = threading.Lock()

# Thread pools, created by main()
main_thread_pool = None
subtasks_thread_pool = None

# Rich console (see _prepare_output())
console = Console(soft_wrap=True)

# What login() was given, for a silent login when a refresh token is rejected
_credentials = {}

# Every password and token seen by this run: the log formatter writes *** in their place
_secrets = set()

# {app: (how many token renewals failed for good, the last error)}: a thread that waited
# for a renewal that failed raises its error instead of trying again in its turn
_failed_renewals = {}

# One TLS context for every client: building one costs 30-60 ms of CPU (certificates)
_ssl_context = None
_ssl_context_lock = threading.Lock()

# Set when the run stops (Ctrl+C, SIGTERM, a worker's error): no request leaves after it
_stop_requested = threading.Event()
# The signal that stopped the run (SIGINT or SIGTERM), None if none did
_stop_signal = None
# Set once the run is ending: a signal then no longer interrupts the closing steps
_finishing = threading.Event()

# Per thread: the deadline, the request and the answer of the call under way, and the
# write it belongs to (see _before_request)
_call_state = threading.local()

# Items process_in_pool() could not process, for the exit status: [(item, error line)]
failed_items = []

# The write journal of a script that changes data (see WRITE JOURNAL)
_journal = {"file": None, "run": None, "dry_run": False, "resume": {}, "resumed_runs": [], "uncertain": []}
_journal_lock = threading.Lock()
_write_outcomes = Counter()  # {outcome: writes of this run}
_dry_run_would = Counter()  # {"send" | "skip" | "stay unknown": writes of this dry run}
_writes_in_flight = {}  # {id: _Write}: written to the journal as unknown if the run stops first

# The OS lock that keeps a second run of this script in this directory from starting
_run_lock = None

# ============================================================================
# UTILITIES
# ============================================================================


def get_nested_value(data_structure, path, default=None):
    """
    Extracts a value from nested dict/list structures.

    Args:
        data_structure: Nested dict/list to navigate
        path: List of keys/indices. Use '*' for list wildcard.
        default: Value to return if path not found

    Returns:
        Value at path or default

    Examples:
        get_nested_value({"a": {"b": 1}}, ["a", "b"]) -> 1
        get_nested_value({"items": [{"x": 1}, {"x": 2}]}, ["items", "*", "x"]) -> [1, 2]
        get_nested_value({"a": [10, 20]}, ["a", -1]) -> 20
        get_nested_value({"a": [10, 20]}, ["a", 5], default=0) -> 0

    A missing key, an index out of range or a step into the wrong type gives `default`;
    it never raises on a bad path. A '*' applies the rest of the path to every item of a
    list and returns the list of what was found: items where the rest is missing are
    left out (so it may be []), and '*' on anything but a list gives `default`.
    A wildcard after a wildcard returns a list of lists, one per item of the first:
        get_nested_value({"a": [{"b": [1, 2]}, {"b": [3]}]}, ["a", "*", "b", "*"])
            -> [[1, 2], [3]]
    """
    missing = object()
    found = _follow_path(data_structure, list(path), missing)
    return default if found is missing else found


def _follow_path(data, path, missing):
    """get_nested_value()'s walk: the value at `path`, or `missing`."""
    for position, step in enumerate(path):
        if step == "*":
            if not isinstance(data, list):
                return missing
            found = (_follow_path(item, path[position + 1:], missing) for item in data)
            return [value for value in found if value is not missing]
        if isinstance(data, dict):
            try:
                data = data[step]
            except (KeyError, TypeError):  # TypeError: a step that cannot be a key
                return missing
        elif isinstance(data, list) and type(step) is int and -len(data) <= step < len(data):
            data = data[step]
        else:
            return missing
    return data


def get_httpx_client() -> httpx.Client:
    """
    Get or create thread-local HTTP client with keep-alive enabled.
    Each thread gets its own httpx.Client instance to avoid connection conflicts.

    Every request it sends is bounded as a whole by its timeout (API_TIMEOUT unless the
    call passes timeout=), is never sent once the run is stopping, and, inside a write,
    is journaled first (see _before_request).
    """
    thread_id = threading.get_ident()
    client = httpx_clients.get(thread_id)
    if client is None:
        # Each thread writes only its own key, so the dict needs no lock.
        client = httpx.Client(
            verify=_shared_ssl_context(),
            timeout=API_TIMEOUT,
            event_hooks={"request": [_before_request], "response": [_after_response]},
            # Plain http:// goes to this machine only, and never through a proxy (HTTP_PROXY):
            # credentials would otherwise travel in clear to the proxy's machine.
            mounts={f"http://{host}": None for host in ("127.0.0.1", "localhost", "[::1]")},
        )
        _bound_connections_by_deadline(client)
        httpx_clients[thread_id] = client
    return client


def _shared_ssl_context():
    """The process's one TLS context, built on first use (httpx builds one per client)."""
    global _ssl_context
    with _ssl_context_lock:
        if _ssl_context is None:
            _ssl_context = httpx.create_ssl_context()
        return _ssl_context


def get_thread_position() -> int:
    """
    Get the position of the current thread in the threads list.
    Used for managing progress bar positions in multithreaded environment.
    """
    thread_id = threading.get_ident()
    with _threads_list_lock:
        if thread_id not in threads_list:
            threads_list.append(thread_id)
        return threads_list.index(thread_id)


def iter_completed(futures):
    """
    Yield futures as they complete, like as_completed(), but seeing Ctrl+C at once.

    Use it in the main thread instead of as_completed(): on Windows before Python 3.14 a
    wait with no timeout cannot be interrupted, so Ctrl+C would wait for the next task to
    end. Each task is handed over the moment it finishes, and nothing is kept once handed
    over: memory is what the caller keeps (see process_in_pool() for very large inputs).
    """
    finished = queue.SimpleQueue()
    pending = set()  # submitted, not yet handed over: a future given twice is handed over once
    for future in futures:
        if future not in pending:
            pending.add(future)
            future.add_done_callback(finished.put)
    while pending:
        future = _next_finished(finished)
        pending.discard(future)
        yield future


def _next_finished(finished):
    """The next finished task, waiting in short slices so that a signal is seen at once."""
    while True:
        try:
            return finished.get(timeout=STOP_POLL_INTERVAL)
        except queue.Empty:
            pass


def process_in_pool(pool, function, items, description="Processing"):
    """
    Run function(item) on `pool` for every item; yield (item, result) as each succeeds.

    The pattern of a job over many items, at constant memory whatever their number: at
    most MAX_PENDING_TASKS tasks are submitted ahead, and `items` may be a generator. A
    progress bar shows on a terminal. An item whose function raises is logged with its
    traceback, reported on one line, added to failed_items and skipped: the run goes on,
    and ends with exit status 1. After MAX_FAILED_ITEMS failed items, TooManyFailures
    stops the run. A stop (Ctrl+C, SIGTERM) ends the loop at once.
    """
    total = len(items) if hasattr(items, "__len__") else None
    pending = {}  # future -> item, for the tasks submitted and not yet handed over
    finished = queue.SimpleQueue()
    items = iter(items)
    with tqdm(total=total, desc=description, bar_format=custom_bar_format, disable=None) as bar, \
            _cancelled_at_exit(pending):
        while True:
            while len(pending) < MAX_PENDING_TASKS and (item := next(items, _NO_MORE)) is not _NO_MORE:
                future = pool.submit(function, item)
                pending[future] = item
                future.add_done_callback(finished.put)
            if not pending:
                return
            future = _next_finished(finished)
            item = pending.pop(future)
            bar.update(1)
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - one failed item does not stop the run
                _item_failed(item, exc)
                continue
            yield item, result


_NO_MORE = object()


@contextlib.contextmanager
def _cancelled_at_exit(pending):
    """However the loop ends (a break, an error, Ctrl+C), the tasks it submitted and that
    have not started are cancelled: none of them runs, none of its writes is sent."""
    try:
        yield
    finally:
        for future in list(pending):
            future.cancel()


class TooManyFailures(Exception):
    """MAX_FAILED_ITEMS items failed: process_in_pool() stops the run."""


def _item_failed(item, exc):
    """Record a failed item; stop the run when failures pile up."""
    if isinstance(exc, RunStopped):
        raise exc
    line = f"Item {item!r} failed: {describe_error(exc)}"
    failed_items.append((item, line))
    logging.error(line, exc_info=exc)
    _report(line)
    if len(failed_items) >= MAX_FAILED_ITEMS:
        raise TooManyFailures(f"{len(failed_items)} items failed (MAX_FAILED_ITEMS): the run stops")


def write_csv(path, rows, columns=None):
    """
    Write rows (dicts) to a CSV file that Excel opens with its accents right (UTF-8 with a
    byte-order mark, CSV_SEPARATOR between fields). Columns: `columns`, else the keys of
    the rows in order of appearance. Written to a temporary file and renamed: a run that
    fails never leaves half a file, and an earlier file stays as it was.
    """
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(file):
        writer = csv.DictWriter(file, fieldnames=columns, delimiter=CSV_SEPARATOR, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    _write_then_rename(path, write, encoding="utf-8-sig", newline="")


def write_json(path, data):
    """Write data as indented UTF-8 JSON, to a temporary file then renamed (see write_csv)."""
    _write_then_rename(path, lambda file: json.dump(data, file, ensure_ascii=False, indent=2, default=str))


def _write_then_rename(path, write, **open_options):
    """Call write(file) on a temporary file beside `path`, then put it in place at once."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path), suffix=".tmp")
    try:
        with open(handle, "w", encoding=open_options.pop("encoding", "utf-8"), **open_options) as file:
            write(file)
        os.chmod(temporary, 0o644)  # mkstemp makes it private (0600): a result is for colleagues too
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


class RunStopped(Exception):
    """Raised by an API call started after the run began to stop: it is not sent."""


class SettingError(Exception):
    """A missing or wrong setting: the script exits with EXIT_BAD_SETTING."""


class BadAnswer(Exception):
    """An answer the script cannot use: not JSON, or without a field it must have."""


def describe_error(exc) -> str:
    """One line saying what went wrong, naming the request (method and URL) when there is one."""
    if isinstance(exc, httpx.HTTPStatusError):
        request, response = exc.request, exc.response
        return f"{response.status_code} {response.reason_phrase} from {request.method} {request.url}"
    first_line = str(exc).strip().split("\n")[0]
    if isinstance(exc, httpx.RequestError) and not isinstance(exc, RetriesExhausted):
        request = _request_of(exc)
        words = next((words for kind, words in _TRANSPORT_ERROR_WORDS if isinstance(exc, kind)), "failed")
        where = f"{request.method} {request.url}: " if request is not None else ""
        return f"{where}{words} ({type(exc).__name__}: {first_line})"
    if isinstance(exc, (RetriesExhausted, RunStopped, SettingError, BadAnswer, TooManyFailures)):
        return first_line
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


# What a transport error means, in words a data manager understands; the first match wins.
_TRANSPORT_ERROR_WORDS = (
    (httpx.ConnectTimeout, "no connection within the time allowed"),
    (httpx.ConnectError, "cannot connect"),
    (httpx.ReadTimeout, "no complete answer within the time allowed"),
    (httpx.WriteTimeout, "the request could not be sent within the time allowed"),
    (httpx.PoolTimeout, "no free connection within the time allowed"),
    (httpx.RemoteProtocolError, "the server closed the connection without a complete answer"),
    (httpx.NetworkError, "the connection was lost"),
)


def _request_of(exc):
    """The request an httpx error is about, or None."""
    try:
        return exc.request
    except RuntimeError:  # an httpx error raised without a request
        return None


def is_interactive() -> bool:
    """True when someone can answer prompts: stdin and stdout are a terminal (on Windows, a
    console: the NUL device, a pipe or a file is not one) and EB_NON_INTERACTIVE is not set
    to 1 (for environments that fake a terminal). Otherwise the run is unattended."""
    if os.environ.get("EB_NON_INTERACTIVE", "").strip().lower() in ("1", "true", "yes"):
        return False
    return _is_terminal(sys.stdin) and _is_terminal(sys.stdout)


def _is_terminal(stream) -> bool:
    """Whether `stream` is a terminal. On Windows isatty() is True for NUL (`< NUL`, a
    runner's DEVNULL): ask the console API, as Windows itself does."""
    try:
        descriptor = stream.fileno()
    except (AttributeError, OSError, ValueError):  # None, closed, or not a real file
        return False
    if os.name != "nt":
        return os.isatty(descriptor)
    try:
        handle = msvcrt.get_osfhandle(descriptor)
    except OSError:
        return False
    mode = ctypes.c_uint32()
    return bool(ctypes.windll.kernel32.GetConsoleMode(handle, ctypes.byref(mode)))


def _prepare_output():
    """Printing server data never fails a run: a character the console or a redirected
    output cannot show (cp1252 on Windows) is replaced; the log file is UTF-8, complete.
    And output that is not a terminal (a file, a runner's pipe) is not cut at rich's 80
    columns: a path or a message stays on one line of the runner's e-mail."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    if not _is_terminal(sys.stdout):
        console.width = REDIRECTED_OUTPUT_WIDTH


def _report(message):
    """Print one line on stderr without tearing a progress bar."""
    tqdm.write(message, file=sys.stderr)


def _ask(question):
    """question.ask(), where Ctrl+C or Ctrl+D cancels the run instead of answering None."""
    try:
        answer = question.ask()
    except EOFError:
        answer = None
    if answer is None:
        raise KeyboardInterrupt
    return answer


def _is_valid_thread_count(text) -> bool:
    try:
        return 0 < int(text) <= MAX_THREADS
    except ValueError:
        return False


def _threads_setting() -> int:
    """EB_THREADS, or DEFAULT_NUMBER_OF_THREADS when it is not set."""
    value = os.environ.get("EB_THREADS", "").strip()
    if not value:
        return DEFAULT_NUMBER_OF_THREADS
    if not _is_valid_thread_count(value):
        raise SettingError(f"EB_THREADS must be a whole number from 1 to {MAX_THREADS}, not {value!r}")
    return int(value)


def _dry_run_setting() -> bool:
    """EB_DRY_RUN of an unattended run of a script that changes data: 1 (dry) or 0 (real)."""
    value = os.environ.get("EB_DRY_RUN", "").strip()
    if value not in ("0", "1"):
        shown = f"not {value!r}" if value else "it is not set"
        raise SettingError(f"EB_DRY_RUN must be 1 (dry run: nothing is changed) or 0 (real run), {shown}")
    return value == "1"


def _password_setting() -> str:
    """The password the environment gives: EB_PASSWORD_FILE's content, else DEFAULT_PASSWORD.
    EB_PASSWORD_FILE's value is never shown: someone may have typed the password there."""
    path = os.environ.get("EB_PASSWORD_FILE", "")
    if not path:
        return DEFAULT_PASSWORD
    if os.environ.get("EB_PASSWORD"):
        raise SettingError("Set EB_PASSWORD or EB_PASSWORD_FILE, not both")
    if not os.path.isfile(path):
        raise SettingError("EB_PASSWORD_FILE names no file (its value is not shown: it may be a password)")
    try:
        with open(path, "rb") as file:
            return _decode_password(file.read())
    except OSError as exc:
        raise SettingError(f"EB_PASSWORD_FILE: cannot read {path} ({exc.strerror})") from None


def _decode_password(content) -> str:
    """A password file's text, as Windows editors save it: UTF-8 with or without a
    byte-order mark (Notepad), UTF-16 with one (PowerShell 5.1's `>`). Final line breaks
    are not part of the password."""
    for mark, encoding in ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if content.startswith(mark):
            content, chosen = content[len(mark):], encoding
            break
    else:
        chosen = "utf-8"
    try:
        return content.decode(chosen).rstrip("\r\n")
    except UnicodeDecodeError:
        raise SettingError(
            "EB_PASSWORD_FILE is not a text file in UTF-8 or UTF-16: save it again as UTF-8"
        ) from None


def _check_base_urls():
    """No credential or token ever goes in clear to another machine: a base_url is
    https://, or http:// to this machine (127.0.0.0/8, ::1, localhost) only."""
    for name, service in MICROSERVICES.items():
        variable = f"EB_{name}_BASE_URL"
        source = variable if os.environ.get(variable) else f'MICROSERVICES["{name}"]["base_url"]'
        try:
            url = httpx.URL(service["base_url"])
        except httpx.InvalidURL as exc:
            raise SettingError(f"{source} is not a URL ({exc})") from None
        if url.scheme == "https" and url.host:
            continue
        if url.scheme == "http" and _is_this_machine(url.host):
            continue
        raise SettingError(
            f"{source} is {service['base_url']!r}: use https:// (plain http:// is allowed to this machine only,"
            " so that no password or token travels in clear)"
        )


def _is_this_machine(host) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_settings():
    """Fail fast on a wrong setting: before any prompt or network call."""
    _check_base_urls()
    _threads_setting()
    _password_setting()
    if CHANGES_DATA and not is_interactive():
        _dry_run_setting()


class _UtcSecretRedactingFormatter(logging.Formatter):
    """Log formatter with UTC times (2026-01-31T08:00:00.123Z: unambiguous, whatever the
    machine's time zone) that writes *** in place of the password and of every token seen:
    the log file is read and shared, a secret must never reach it, whatever the level."""

    converter = gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def format(self, record):
        return _redact(super().format(record))


def _redact(text):
    for secret in tuple(_secrets):
        escaped = json.dumps(secret, ensure_ascii=False)[1:-1]  # as it stands in a JSON line
        text = text.replace(secret, "***").replace(escaped, "***")
    return text


def _remember_secrets(*values):
    """Let the log formatter and the journal hide these values, from now on."""
    _secrets.update(value for value in values if value)

# ============================================================================
# STOPPING AND DEADLINES
# ============================================================================
# A run stops at once and cleanly on Ctrl+C, SIGTERM or a worker's error: no request
# leaves after it, calls in flight end within STOP_POLL_INTERVAL, and every call is
# bounded as a whole by its timeout, whatever the server does (httpx's own timeouts
# bound each read, and a server that trickles bytes would hold a call forever).


class StoppableThreadPool(ThreadPoolExecutor):
    """
    A ThreadPoolExecutor whose `with` block, when an exception leaves it (a worker's error
    re-raised, Ctrl+C), stops the run: queued tasks of both pools are cancelled and running
    ones end at once, and the block does not wait for them (the entry point does, up to
    STOP_GRACE). A plain executor would run every queued task first.
    """

    def __exit__(self, exc_type, exc_value, exc_traceback):
        if exc_type is None:
            return super().__exit__(exc_type, exc_value, exc_traceback)
        request_stop()
        self.shutdown(wait=False, cancel_futures=True)  # also when it is not a global pool
        return False


def request_stop():
    """Stop the run: no request leaves any more, calls in flight end, queued tasks of both
    pools are cancelled."""
    _stop_requested.set()
    for pool in (main_thread_pool, subtasks_thread_pool):
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _check_not_stopping(what):
    if _stop_requested.is_set():
        raise RunStopped(f"{what} not sent: the run is stopping")


def _on_stop_signal(signum, frame):
    """Ctrl+C or SIGTERM: stop the run. A second one exits at once."""
    global _stop_signal
    if _stop_signal is not None:
        logging.warning("Second stop signal: exit at once")
        logging.shutdown()
        os._exit(_exit_status_of_signal(signum))
    _stop_signal = signum
    _stop_requested.set()
    if not _finishing.is_set():
        raise KeyboardInterrupt


def _install_stop_signals():
    """Ctrl+C (SIGINT) and SIGTERM stop the run the same way. A signal this process was
    started with ignored (a shell's background job) stays ignored."""
    for name in ("SIGINT", "SIGTERM"):
        number = getattr(signal, name)
        if signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, _on_stop_signal)


def _exit_status_of_signal(signum):
    return EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED


def _before_request(request):
    """Every request, just before it leaves: refused once the run is stopping; given its
    deadline; and, inside a write, journaled (or, in a dry run, kept from leaving)."""
    _check_not_stopping(f"{request.method} {request.url}")
    state = _call_state
    state.deadline = _deadline_of(request)
    state.sent = False
    state.response = None
    state.sending_write = None
    write = getattr(state, "write", None)
    if request.method in _READ_METHODS:
        return
    if write is None:
        if request.method in _WRITE_ONLY_METHODS:
            raise UndeclaredWrite(
                f"{request.method} {request.url} changes data: send it from a function decorated with"
                " @api_call_with_retry(app, idempotent=False)"
            )
        return
    _journal_request(write, request)


def _after_response(response):
    _call_state.response = response
    write = getattr(_call_state, "sending_write", None)
    if write is not None:
        write.status = response.status_code


# Methods that never change data, and methods that always do (a POST may be a search).
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_WRITE_ONLY_METHODS = frozenset({"PUT", "PATCH", "DELETE"})


class UndeclaredWrite(Exception):
    """A PUT, PATCH or DELETE sent from a function not declared as a write."""


def _deadline_of(request):
    """When the request must be over: now plus its timeout (API_TIMEOUT, or the call's
    timeout=), or None when the call asked for no timeout."""
    timeouts = [value for value in request.extensions.get("timeout", {}).values() if value is not None]
    return monotonic() + max(timeouts) if timeouts else None


def _time_left(timeout, timeout_error):
    """The seconds a network operation may take: its own timeout, cut to what is left
    before the call's deadline; timeout_error once nothing is left."""
    deadline = getattr(_call_state, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - monotonic()
    if left <= 0:
        raise timeout_error("the whole call did not end within its timeout")
    return left if timeout is None else min(timeout, left)


def _bound_connections_by_deadline(client):
    """Make the connections of `client` (direct or through a proxy) obey _DeadlineStream."""
    for transport in (client._transport, *client._mounts.values()):
        pool = getattr(transport, "_pool", None)
        if pool is not None:
            pool._network_backend = _DeadlineBackend(pool._network_backend)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend, whose connections are _DeadlineStreams."""

    def __init__(self, backend):
        self._backend = backend

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        _check_not_stopping(f"connection to {host}")
        left = _time_left(timeout, httpcore.ConnectTimeout)
        stream = self._backend.connect_tcp(host, port, left, local_address, socket_options)
        return _DeadlineStream(stream)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        left = _time_left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._backend.connect_unix_socket(path, left, socket_options))

    def sleep(self, seconds):
        self._backend.sleep(seconds)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose reads end at the call's deadline and as soon as the run stops:
    it waits for the server in STOP_POLL_INTERVAL slices. It also tells the retry rules
    whether any byte of the request left this machine (_call_state.sent)."""

    def __init__(self, stream):
        self._stream = stream

    def read(self, max_bytes, timeout=None):
        while True:
            left = _time_left(timeout, httpcore.ReadTimeout)
            try:
                return self._stream.read(max_bytes, min(left or STOP_POLL_INTERVAL, STOP_POLL_INTERVAL))
            except httpcore.ReadTimeout:
                _check_not_stopping("the rest of the answer")

    def write(self, buffer, timeout=None):
        _check_not_stopping("the request")
        _call_state.sent = True
        write = getattr(_call_state, "sending_write", None)
        if write is not None:
            write.sent = True
        self._stream.write(buffer, _time_left(timeout, httpcore.WriteTimeout))

    def close(self):
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        left = _time_left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, left))

    def get_extra_info(self, info):
        return self._stream.get_extra_info(info)

# ============================================================================
# AUTHENTICATION
# ============================================================================


def login():
    """
    Authenticate with IAM and configure tokens for all microservices.

    Interactive: asks login and password (defaults from the constants). Unattended: takes
    them from the environment (EB_USER_NAME, EB_PASSWORD or EB_PASSWORD_FILE). Transient
    failures (5xx, 429, timeouts, lost answers) are retried like any API call; a refused
    password (401) is not. The config-tokens of the microservices are asked in parallel.

    Returns:
        "Success", "Error", or "Exit" (empty login or password at the prompt)
    """
    user_name, password = _ask_credentials()
    if not (user_name and password):
        return "Exit"
    try:
        master_token, user_id = _call_with_retries(
            functools.partial(_log_in_to_iam, user_name, password), "login", idempotent=True
        )
    except (httpx.RequestError, httpx.HTTPStatusError, BadAnswer) as exc:
        return _login_failed(f"Login Error: {describe_error(exc)}")
    apps = [app for app in MICROSERVICES if app != "IAM"]  # IAM does not need a config-token
    with StoppableThreadPool(max_workers=max(len(apps), 1)) as pool:  # Ctrl+C: no wait for them
        futures = {pool.submit(_configure_token_with_retries, app, master_token, user_id): app for app in apps}
        for future in iter_completed(futures):
            try:
                tokens[futures[future]] = future.result()
            except (httpx.RequestError, httpx.HTTPStatusError, BadAnswer) as exc:
                return _login_failed(f"Config-token Error for {futures[future]}: {describe_error(exc)}")
    _credentials["password"] = password
    print("\nLogin Success")
    logging.info(f"Login Success as {user_name}")
    return "Success"


def _ask_credentials():
    """(user name, password): asked at the prompt, or from the environment when unattended."""
    user_name = _credentials.get("user_name", DEFAULT_USER_NAME)
    password = _password_setting()
    if not is_interactive():
        if not (user_name and password):
            raise SettingError("No credentials: set EB_USER_NAME and EB_PASSWORD (or EB_PASSWORD_FILE)")
        _credentials["user_name"] = user_name
        _remember_secrets(password)
        return user_name, password
    user_name = _ask(questionary.text("login:", default=user_name))
    _credentials["user_name"] = user_name  # the default of the next prompt, if this login fails
    password = _ask(questionary.password("password:", default=password))
    _remember_secrets(password)
    return user_name, password


def _login_failed(message):
    _report(message)
    logging.warning(message, exc_info=True)
    return "Error"


def _log_in_to_iam(user_name, password):
    """(master token, user id) from IAM."""
    iam = MICROSERVICES["IAM"]
    response = get_httpx_client().post(
        iam["base_url"] + iam["endpoints"]["login"],
        json={"username": user_name, "password": password},
        timeout=AUTH_TIMEOUT,
    )
    response.raise_for_status()
    master_token, user_id = _fields_of(response, "login", "access_token", "userId")
    _remember_secrets(master_token)
    return master_token, user_id


def _configure_token_with_retries(app, master_token, user_id):
    call = functools.partial(_configure_token, app, master_token, user_id)
    return _call_with_retries(call, f"config-token for {app}", idempotent=True)


def _configure_token(app, master_token, user_id):
    """The access/refresh pair of one microservice, from the IAM master token."""
    service = MICROSERVICES[app]
    response = get_httpx_client().post(
        service["base_url"] + service["endpoints"]["config_token"],
        headers={"Authorization": f"Bearer {master_token}"},
        json={"userId": user_id, "clientId": service["app_id"], "userAgent": USER_AGENT},
        timeout=AUTH_TIMEOUT,
    )
    response.raise_for_status()
    return _token_pair(response, "config-token")


def _token_pair(response, what):
    access_token, refresh_token = _fields_of(response, what, "access_token", "refresh_token")
    _remember_secrets(access_token, refresh_token)
    return {"access_token": access_token, "refresh_token": refresh_token}


def _fields_of(response, what, *names):
    """The values of `names` in a JSON answer; BadAnswer, naming the request, without them."""
    try:
        body = response.json()
    except ValueError:
        raise BadAnswer(_not_json(response)) from None
    missing = [name for name in names if not isinstance(body, dict) or not body.get(name)]
    if missing:
        request = response.request
        raise BadAnswer(f"{what} answer from {request.method} {request.url} has no {', '.join(missing)}")
    return [body[name] for name in names]


def _not_json(response):
    request = response.request
    content_type = response.headers.get("Content-Type", "no content type").split(";")[0]
    return f"answer from {request.method} {request.url} is not JSON ({content_type})"


def new_token(app, rejected_token=None):
    """
    Refresh access token for a specific microservice.

    Args:
        app: Microservice name (e.g., "RC", "GDD")
        rejected_token: the access token a server just refused. If another thread has
            already replaced it, nothing is done: one refresh per expiry, however many
            threads saw the 401. None refreshes unconditionally.

    When the refresh token is refused (expired, already used), or may have been spent by
    a refresh whose answer was lost, logs in again with the credentials given at login,
    without a prompt: a refresh token is never presented twice.
    """
    failures_before_waiting, _ = _failed_renewals.get(app, (0, None))
    _acquire_token_refresh_lock()
    try:
        if rejected_token is not None and rejected_token != tokens[app]["access_token"]:
            return
        failures, error = _failed_renewals.get(app, (0, None))
        if failures > failures_before_waiting:
            raise httpx.RequestError(f"Token renewal for {app} failed: {describe_error(error)}") from error
        try:
            tokens[app] = _within_write(None, functools.partial(_renew_tokens, app))  # never a write's request
        except (httpx.RequestError, httpx.HTTPStatusError, BadAnswer) as exc:
            _failed_renewals[app] = (failures + 1, exc)
            raise
    finally:
        _token_refresh_lock.release()


def _acquire_token_refresh_lock():
    """Wait for the refresh lock in short slices: a stop (Ctrl+C) is not held up by it."""
    while not _token_refresh_lock.acquire(timeout=STOP_POLL_INTERVAL):
        _check_not_stopping("token refresh")


def _renew_tokens(app):
    """A new pair for `app`: refreshed, or from a new login when the refresh token is unusable."""
    try:
        return _call_with_retries(functools.partial(_refresh_tokens, app), f"refresh_token for {app}", idempotent=False)
    except RetriesExhausted:
        raise  # the server never processed the refresh: a new login would not reach it either
    except (httpx.RequestError, httpx.HTTPStatusError, BadAnswer) as exc:
        logging.info(f"Refresh token for {app} unusable ({describe_error(exc)}): logging in again")
    return _call_with_retries(functools.partial(_log_in_again, app), f"login again for {app}", idempotent=True)


def _refresh_tokens(app):
    """A new access/refresh pair from the refresh endpoint (called with the lock held)."""
    service = MICROSERVICES[app]
    response = get_httpx_client().post(
        service["base_url"] + service["endpoints"]["refresh"],
        headers={"Authorization": f"Bearer {tokens[app]['access_token']}"},
        json={"refresh_token": tokens[app]["refresh_token"]},
        timeout=AUTH_TIMEOUT,
    )
    response.raise_for_status()
    return _token_pair(response, "refresh")


def _log_in_again(app):
    """A new pair for `app` from the credentials given at login, without a prompt."""
    master_token, user_id = _log_in_to_iam(_credentials["user_name"], _credentials["password"])
    logging.info(f"Logged in again for {app}")
    return _configure_token(app, master_token, user_id)

# ============================================================================
# DECORATORS
# ============================================================================


def api_call_with_retry(app, idempotent=True, verify=None):
    """
    Decorator for API calls with automatic retry and token refresh on 401 errors.

    Args:
        app: Microservice name (e.g., "RC", "GDD")
        idempotent: False declares a write: a call that changes data, whatever its HTTP
            method. It is then refused unless CHANGES_DATA is True, journaled, not sent in
            a dry run, not sent again by a resumed run once done, and retried only when
            the server cannot have processed it (nothing sent, NOT_PROCESSED_STATUS, 401).
        verify: for a write, a function taking the write's own arguments that returns
            True when the change is already on the platform. A resumed run calls it
            before sending again a write whose outcome was unknown.

    Usage:
        @api_call_with_retry("RC")
        def get_organizations():
            ...

    Each request is bounded as a whole by its timeout (API_TIMEOUT, or the call's timeout=).
    Retried: RETRY_ON_ERRORS and RETRY_ON_STATUS, after WAIT_BEFORE_RETRY seconds or the
    server's Retry-After (up to RETRY_AFTER_MAX); a 429 with Retry-After uses up no
    attempt, up to RATE_LIMIT_MAX_WAIT of waiting in all (then RateLimited); a 401
    refreshes the token, then retries. An answer that is not JSON raises BadAnswer. Any
    other error is raised at once, unchanged. After ERROR_MAX_RETRY attempts:
    RetriesExhausted (an httpx.RequestError), with the last error as its __cause__.
    Once the run is stopping (Ctrl+C, SIGTERM, a worker's error), no request leaves: RunStopped.
    """

    def decorator(func):
        def refresh_rejected_token(exc):
            logging.info(f"Token expired for {func.__name__}. Refreshing token for {app}.")
            new_token(app, rejected_token=_bearer_token(exc.request))

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            call = functools.partial(func, *args, **kwargs)
            if idempotent:  # a read, also when a write function calls it: never journaled
                return _within_write(None, functools.partial(
                    _call_with_retries, call, func.__name__, True, on_unauthorized=refresh_rejected_token))
            write = _Write(func, args, kwargs)
            send = functools.partial(_call_with_retries, functools.partial(_within_write, write, call),
                                     func.__name__, False, on_unauthorized=refresh_rejected_token, write=write)
            return _perform_write(write, send, verify)

        return wrapper

    return decorator


class RetriesExhausted(httpx.RequestError):
    """ERROR_MAX_RETRY attempts failed; the last error is the __cause__."""


class RateLimited(httpx.RequestError):
    """The server kept answering 429 for longer than RATE_LIMIT_MAX_WAIT."""


def _call_with_retries(call, name, idempotent, on_unauthorized=None, write=None):
    """call(), retried by the rules of api_call_with_retry(); on_unauthorized(error), when
    given, runs after a 401 and before the next attempt. For a write, the rules look at the
    write's own request, not at a read the function sent before or after it."""
    attempt = 0
    rate_limit_wait = 0.0
    while True:
        _check_not_stopping(name)
        try:
            return call()
        except ValueError as exc:  # response.json() of an answer that is not JSON
            response = getattr(_call_state, "response", None)
            if not isinstance(exc, json.JSONDecodeError) or response is None:
                raise
            raise BadAnswer(_not_json(response)) from exc
        except (httpx.RequestError, httpx.HTTPStatusError) as exc:
            error = exc
        if write is not None and write.sent and write.status not in (401, *NOT_PROCESSED_STATUS):
            raise error  # the write's request left and the server may have processed it
        retry_after = _retry_after(error)
        if _status_of(error) == 429 and retry_after is not None:
            retry_after = max(retry_after, WAIT_BEFORE_RETRY)  # Retry-After: 0 is no reason to hammer
            rate_limit_wait += retry_after
            if rate_limit_wait > RATE_LIMIT_MAX_WAIT:
                raise RateLimited(
                    f"{describe_error(error)}: still rate limited after {rate_limit_wait - retry_after:.0f} s"
                    f" of waiting (RATE_LIMIT_MAX_WAIT is {RATE_LIMIT_MAX_WAIT} s)"
                ) from error
            logging.info(f"{name} rate limited: waiting {retry_after:.1f} s as the server asks")
            _pause(retry_after)
            continue
        attempt += 1
        unauthorized = on_unauthorized is not None and _status_of(error) == 401
        if not (unauthorized or _is_retryable(error, idempotent or (write is not None and not write.sent))):
            logging.info(f"Error in {name}, not retried: {describe_error(error)}")
            raise error
        logging.warning(f"Error in {name} (Attempt {attempt}/{ERROR_MAX_RETRY}): {describe_error(error)}")
        if attempt >= ERROR_MAX_RETRY:
            message = f"Persistent error in {name} after {ERROR_MAX_RETRY} attempts: {describe_error(error)}"
            logging.critical(message)
            raise RetriesExhausted(message) from error
        if unauthorized:
            on_unauthorized(error)
        else:
            _pause(max(WAIT_BEFORE_RETRY, retry_after or 0.0))


def _status_of(exc):
    """The HTTP status of an httpx.HTTPStatusError, None for a transport error."""
    return exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None


def _is_retryable(exc, idempotent) -> bool:
    """Whether another attempt may succeed; for a write, only when the server cannot have
    processed this one."""
    status = _status_of(exc)
    if idempotent:
        return status in RETRY_ON_STATUS if status else isinstance(exc, RETRY_ON_ERRORS)
    return status in NOT_PROCESSED_STATUS if status else not getattr(_call_state, "sent", True)


def _bearer_token(request):
    """The token a request carried in its Authorization header, or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token if scheme == "Bearer" and token else None


def _retry_after(exc):
    """The seconds the server's Retry-After asks for, up to RETRY_AFTER_MAX; None if none."""
    value = exc.response.headers.get("Retry-After") if _status_of(exc) else None
    seconds = _seconds_from_retry_after(value)
    return min(max(seconds, 0.0), RETRY_AFTER_MAX) if seconds is not None else None


def _seconds_from_retry_after(value):
    """Seconds a Retry-After header asks for (a number or an HTTP date); None if unreadable."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (when - datetime.now(timezone.utc)).total_seconds()


def _pause(seconds):
    """Wait between attempts, in short slices, ending at once when the run stops."""
    deadline = perf_counter() + seconds
    while not _stop_requested.is_set():
        remaining = deadline - perf_counter()
        if remaining <= 0:
            return
        _stop_requested.wait(min(remaining, STOP_POLL_INTERVAL))

# ============================================================================
# WRITE JOURNAL
# ============================================================================
# For a script with CHANGES_DATA = True. Every write (a function decorated with
# idempotent=False) is recorded in <script name>.journal.jsonl, one JSON object per line,
# appended across runs, flushed to disk before the request leaves and again when its
# outcome is known: sending, done (2xx), failed (refused, 4xx, or never sent), unknown
# (it may have been applied: lost answer, timeout, 5xx), not-sent (the run stopped
# first), dry-run, skipped (done by an earlier run this one resumes). A real run that
# follows real runs that did not succeed resumes them: what they did is not sent again.

WRITE_OUTCOMES = ("done", "skipped", "failed", "unknown", "not-sent", "dry-run")


class WritesNotAllowed(Exception):
    """A write was called in a script whose CHANGES_DATA is False."""


class WriteOutcomeUnknown(Exception):
    """An earlier run may have applied this write, and nothing can tell (no verify=)."""


class _DryRunWrite(BaseException):
    """Raised where a dry run's write would leave: caught by the write, never by the
    script's own `except Exception`."""


class _Write:
    """One call of a write: its identity, and what became of its request."""

    def __init__(self, func, args, kwargs):
        self.call = func.__name__
        self.args, self.kwargs = args, kwargs
        bound = inspect.signature(func).bind(*args, **kwargs)
        bound.apply_defaults()
        self.arguments = json.loads(json.dumps(bound.arguments, default=_not_a_json_value))
        identity = json.dumps([func.__qualname__, self.arguments], sort_keys=True, ensure_ascii=False)
        self.key = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]
        self.attempt = 0
        self.sent = False  # a byte of the write's request left this machine
        self.status = None  # the HTTP status of its answer

    def describe(self):
        arguments = ", ".join(f"{name}={value!r}" for name, value in self.arguments.items())
        return f"{self.call}({arguments}) [key {self.key}]"


def _not_a_json_value(value):
    raise TypeError(
        f"a write's arguments must be JSON values (str, int, float, bool, None, list, dict), not"
        f" {type(value).__name__}: they make its key, the same in every run"
    )


def _within_write(write, call):
    """call() with `write` as the thread's write (its request is journaled, not sent in a
    dry run), or with None: a read, or a token renewal, inside a write function."""
    outer = getattr(_call_state, "write", None)
    _call_state.write = write
    if write is not None:
        write.attempt += 1
        write.sent, write.status = False, None
    try:
        return call()
    finally:
        _call_state.write = outer


def _journal_request(write, request):
    """The write's request is about to leave: journal it first (in a dry run, instead)."""
    _call_state.sending_write = write
    details = {"method": request.method, "url": str(request.url), "body": _body_of(request)}
    if _journal["dry_run"]:
        _journal_write(write, "dry-run", would="send", **details)
        raise _DryRunWrite
    _journal_write(write, "sending", attempt=write.attempt, **details)


def _body_of(request):
    """A request's body for the journal: its JSON, else its text (never a header: no token)."""
    try:
        content = request.content
    except httpx.RequestNotRead:
        return "(a streamed body: not journaled)"
    try:
        return json.loads(content) if content else None
    except ValueError:
        return content.decode("utf-8", "replace")


def _perform_write(write, send, verify):
    """Send a write, or not, as CHANGES_DATA, the dry run and the resumed runs decide; journal it."""
    if not CHANGES_DATA:
        raise WritesNotAllowed(
            f"{write.call}() changes data, and CHANGES_DATA is False: set CHANGES_DATA = True in the"
            " configuration of a script that changes data"
        )
    if _journal["file"] is None:
        raise WritesNotAllowed(f"{write.call}() called before the write journal was opened (see main())")
    earlier = _journal["resume"].get(write.key)
    if earlier == "done":
        return _not_sent_again(write, "done by an earlier run")
    if earlier == "unknown":
        if verify is None:
            _journal_write(write, "dry-run" if _journal["dry_run"] else "unknown", would="stay unknown",
                           error="outcome unknown in an earlier run; no verify= to check it")
            raise WriteOutcomeUnknown(
                f"{write.describe()} may have been applied by an earlier run: not sent again."
                " Check it on the platform, then tell the next run (see README: Resume)"
            )
        try:
            verified = verify(*write.args, **write.kwargs)
        except BaseException as exc:
            _journal_write(write, "unknown", error=f"verify= failed: {describe_error(exc)}")
            raise
        if verified:
            return _not_sent_again(write, "verified: already on the platform")
    with _journal_lock:
        _writes_in_flight[id(write)] = write
    try:
        result = send()
    except _DryRunWrite:
        return _forget_in_flight(write)
    except BaseException as exc:
        _journal_write(write, _outcome_of(write, exc), status=write.status, error=describe_error(exc))
        raise
    outcome = _outcome_of(write)
    _journal_write(write, outcome, status=write.status, **({} if outcome == "done" else {
        "error": "the write function returned without its request succeeding (no raise_for_status()?)"}))
    return result


def _not_sent_again(write, reason):
    outcome = "dry-run" if _journal["dry_run"] else "skipped"
    _journal_write(write, outcome, would="skip", reason=reason)


def _forget_in_flight(write):
    with _journal_lock:
        _writes_in_flight.pop(id(write), None)


def _outcome_of(write, exc=None):
    """What a write did to the platform, as far as this machine can know, once its function
    returned (exc None) or raised exc. An answer decides: 2xx done (even if what came after
    it failed), 5xx unknown (it may have been applied), any other failed. Without an answer:
    not-sent if the run stopped first, failed if nothing left otherwise, else unknown."""
    if write.status is not None:
        if 200 <= write.status < 300:
            return "done"
        return "unknown" if write.status >= 500 else "failed"
    if not write.sent:
        return "not-sent" if isinstance(exc, (RunStopped, KeyboardInterrupt)) else "failed"
    return "unknown"


def _journal_write(write, outcome, **details):
    """One journal line about `write`; a final outcome also counts for the summary."""
    with _journal_lock:
        file = _journal_write_locked(write, outcome, details)
    # On disk before the request leaves. Outside the lock, so that the threads' syncs
    # overlap: each one holds every line written before it, ours included.
    _force_to_disk(file)


def _journal_write_locked(write, outcome, details):
    """_journal_write(), called with _journal_lock held; the line is not yet forced to disk.
    Returns the journal file (None once the run has ended)."""
    line = {"call": write.call, "key": write.key, "outcome": outcome, "status": details.pop("status", None),
            "user": _credentials.get("user_name"), "arguments": write.arguments, **details}
    file = _append_journal_line(line, sync=False)
    if outcome != "sending":
        _writes_in_flight.pop(id(write), None)
        _write_outcomes[outcome] += 1
        if outcome == "dry-run":
            _dry_run_would[details.get("would")] += 1
        if outcome in ("unknown", "not-sent"):
            _journal["uncertain"].append(write.describe())
    return file


def _append_journal_line(fields, sync=True):
    """Append one line (called with _journal_lock held) and, unless told otherwise, force
    it to disk. Returns the journal file, None once the run has ended."""
    line = {"time": _utc_now(), "run": _journal["run"], **fields}
    file = _journal["file"]
    if file is None:  # a thread that outlived the run (see _exit()): the run's end says it all
        return None
    file.write(_redact(json.dumps(line, ensure_ascii=False, default=str)) + "\n")
    file.flush()
    if sync:
        os.fsync(file.fileno())
    return file


def _force_to_disk(file):
    try:
        descriptor = file.fileno()
    except (AttributeError, ValueError):  # None, or closed by the end of the run, which synced it
        return
    os.fsync(descriptor)


def _utc_now():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _journal_path():
    return f"{_script_name()}.journal.jsonl"


def start_journal(dry_run):
    """Open the journal of a run of a script that changes data, and find what it resumes."""
    path = _journal_path()
    resume, resumed_runs = _read_open_chain(path)
    file = open(path, "a+", encoding="utf-8")
    file.seek(0, os.SEEK_END)
    if file.tell() and not _ends_with_newline(path):
        file.write("\n")  # a run killed in the middle of a line: start ours on a line of its own
    run = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + os.urandom(3).hex()
    _journal.update(file=file, run=run, dry_run=dry_run, resume=resume, resumed_runs=resumed_runs, uncertain=[])
    with _journal_lock:
        _append_journal_line({"event": "start", "script": os.path.basename(sys.argv[0] or __file__),
                              "template": __version__, "dry_run": dry_run, "user": _credentials.get("user_name"),
                              "os_user": _os_user(), "resumes": resumed_runs})
    _announce_run(path, dry_run, resume, resumed_runs)


def _ends_with_newline(path):
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def _os_user():
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):
        return None


def _announce_run(path, dry_run, resume, resumed_runs):
    if dry_run:
        console.print("[bold yellow]DRY RUN: reads are sent, writes are not; nothing will change on the platform.[/]")
    if resumed_runs:
        done = sum(1 for state in resume.values() if state == "done")
        unknown = sum(1 for state in resume.values() if state == "unknown")
        message = (f"Resuming {len(resumed_runs)} unfinished run(s) of {path} ({', '.join(resumed_runs)}):"
                   f" {done} writes done there will not be sent again, {unknown} of unknown outcome will be checked")
        console.print(f"[bold]{message}[/]", highlight=False)
        logging.info(message)
    logging.info(f"Write journal {path}, run {_journal['run']}{' (dry run)' if dry_run else ''}")


def _read_open_chain(path):
    """({key: "done" | "unknown" | "send"}, [run ids]) of the real runs since the last one
    that succeeded: what a new real run resumes. Dry runs change nothing; a run with no
    end line was killed; a line a kill cut short is skipped."""
    states, runs, real_runs = {}, [], set()
    if not os.path.exists(path):
        return states, runs
    with open(path, encoding="utf-8", errors="replace") as file:
        for text in file:
            try:
                line = json.loads(text)
            except ValueError:
                continue
            event, run = line.get("event"), line.get("run")
            if event == "start" and not line.get("dry_run"):
                real_runs.add(run)
                runs.append(run)
            elif event == "end" and run in real_runs and line.get("exit_status") == EXIT_SUCCESS:
                states, runs = {}, []  # a success closes the chain: the next run starts afresh
            elif "key" in line and (run in real_runs or event == "resolve"):
                states[line["key"]] = _RESUME_STATE.get(line.get("outcome"), states.get(line["key"]))
    return states, runs


# A write's last outcome in the runs resumed -> what the resuming run does with it.
_RESUME_STATE = {"done": "done", "skipped": "done", "sending": "unknown", "unknown": "unknown",
                 "failed": "send", "not-sent": "send"}


def journal_writes_still_in_flight():
    """The run is ending: a write still in flight is unknown if any of it left, else not-sent."""
    with _journal_lock:
        file = _journal["file"]
        for write in list(_writes_in_flight.values()):
            outcome = "unknown" if write.sent else "not-sent"
            details = {"status": write.status, "error": "still in flight when the run ended"}
            _journal_write_locked(write, outcome, details)
    _force_to_disk(file)


def end_journal(exit_status):
    """Close the run in the journal, and show the summary of its writes."""
    with _journal_lock:
        _append_journal_line({"event": "end", "exit_status": exit_status, "writes": dict(_write_outcomes)})
        _journal["file"].close()
        _journal["file"] = None
    _show_write_summary()


def writes_left_undone():
    """How many writes of this real run did not do their job (failed, unknown, not-sent)."""
    if _journal["dry_run"]:
        return 0
    return sum(_write_outcomes[outcome] for outcome in ("failed", "unknown", "not-sent"))


def _show_write_summary():
    dry_run = _journal["dry_run"]
    title = "Writes of this DRY RUN (nothing was sent)" if dry_run else "Writes of this run"
    table = Table(title=title)
    table.add_column("Outcome")
    table.add_column("Writes", justify="right")
    for outcome in WRITE_OUTCOMES:
        table.add_row(outcome, str(_write_outcomes[outcome]))
    console.print(table)
    counts = ", ".join(f"{outcome} {_write_outcomes[outcome]}" for outcome in WRITE_OUTCOMES)
    logging.info(f"Writes of this run{' (dry run)' if dry_run else ''}: {counts}")
    if dry_run:
        built, would = _write_outcomes["dry-run"], _dry_run_would
        console.print(f"Dry run: {built} writes built, none sent; nothing changed on the platform. A real run would"
                      f" send {would['send']}, skip {would['skip']} (done by an earlier run) and leave"
                      f" {would['stay unknown']} unknown.", highlight=False)
    for described in _journal["uncertain"]:
        _report(f"Write not done for sure: {described}")
        logging.error(f"Write not done for sure: {described}")


def resolve_writes(resolutions):
    """--resolve KEY=done|failed: record in the journal what a person found on the platform
    about a write of unknown outcome: done (the next run skips it) or failed (it sends it)."""
    path = _journal_path()
    states, _ = _read_open_chain(path)
    for key, _outcome in resolutions:  # every key checked before any line is written
        if states.get(key) != "unknown":
            raise SettingError(f"--resolve: no write of unknown outcome has the key {key} in {path}")
    run = "resolution-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    with open(path, "a", encoding="utf-8") as file, _journal_lock:
        _journal.update(file=file, run=run)
        try:
            for key, outcome in resolutions:
                _append_journal_line({"event": "resolve", "key": key, "outcome": outcome, "os_user": _os_user()})
                print(f"Recorded in {path}: write {key} is {outcome}")
        finally:
            _journal["file"] = None


def ask_dry_run() -> bool:
    """A script that changes data: is this a dry run (the default) or a real run? Asked at
    the terminal, after the number of threads; EB_DRY_RUN (1 or 0) when unattended."""
    if not is_interactive():
        return _dry_run_setting()
    choice = _ask(questionary.select("Run mode:", choices=[_DRY_RUN_CHOICE, _REAL_RUN_CHOICE], default=_DRY_RUN_CHOICE))
    return choice == _DRY_RUN_CHOICE


_DRY_RUN_CHOICE = "Dry run: read, build the writes, send none"
_REAL_RUN_CHOICE = "Real run: send the writes"

# ============================================================================
# API TEMPLATES
# ============================================================================
# One decorated function per API call, returning response.json(). Choose the HTTP method;
# keep response.raise_for_status(): it is what lets the decorator retry. A call that
# changes data is a write: idempotent=False, one request that changes data per function.


@api_call_with_retry("RC")
def get_all_organizations():
    """Example API call: Get all organizations (GET)."""
    client = get_httpx_client()
    client.base_url = MICROSERVICES["RC"]["base_url"]
    response = client.get(
        MICROSERVICES["RC"]["endpoints"]["organizations"],
        headers={"Authorization": f"Bearer {tokens['RC']['access_token']}"},
        timeout=API_TIMEOUT,  # Or a specific timeout
    )
    response.raise_for_status()
    return response.json()


@api_call_with_retry("RC")
def search_inclusions(organization_id, limit, page):
    """Example API call: Search inclusions (POST that only reads, so safe to repeat)."""
    client = get_httpx_client()
    client.base_url = MICROSERVICES["RC"]["base_url"]
    response = client.post(
        f"{MICROSERVICES['RC']['endpoints']['search_inclusions']}?limit={limit}&page={page}",
        headers={"Authorization": f"Bearer {tokens['RC']['access_token']}"},
        json={"protocolId": PROTOCOL_ID, "center": organization_id, "keywords": ""},
        timeout=API_TIMEOUT,
    )
    response.raise_for_status()
    return response.json()


@api_call_with_retry("RC")
def get_record(patient_id):
    """Example API call: a patient's record (GET), {"patientId", "organizationId", "fields"}."""
    client = get_httpx_client()
    client.base_url = MICROSERVICES["RC"]["base_url"]
    response = client.get(
        MICROSERVICES["RC"]["endpoints"]["record_by_patient"],
        params={"patientId": patient_id},
        headers={"Authorization": f"Bearer {tokens['RC']['access_token']}"},
        timeout=API_TIMEOUT,
    )
    response.raise_for_status()
    return response.json()


def record_has_fields(patient_id, fields):
    """verify= of update_record_fields(): True when the record already has these values."""
    record_fields = get_record(patient_id)["fields"]
    return all(record_fields.get(name) == value for name, value in fields.items())


@api_call_with_retry("RC", idempotent=False, verify=record_has_fields)
def update_record_fields(patient_id, fields):
    """Example write: sets fields of a patient's record (PATCH). Journaled, sent once."""
    client = get_httpx_client()
    client.base_url = MICROSERVICES["RC"]["base_url"]
    response = client.patch(
        MICROSERVICES["RC"]["endpoints"]["update_record"],
        params={"patientId": patient_id},
        headers={"Authorization": f"Bearer {tokens['RC']['access_token']}"},
        json={"fields": fields},
        timeout=API_TIMEOUT,
    )
    response.raise_for_status()
    return response.json()


@api_call_with_retry("RC", idempotent=False)
def create_record(patient_id, fields):
    """Example write: creates a record (POST), so a repeat would create two. Without
    verify=, a resumed run does not send it again when its outcome is unknown."""
    client = get_httpx_client()
    client.base_url = MICROSERVICES["RC"]["base_url"]
    response = client.post(
        MICROSERVICES["RC"]["endpoints"]["create_record"],
        headers={"Authorization": f"Bearer {tokens['RC']['access_token']}"},
        json={"patientId": patient_id, "fields": fields},
        timeout=API_TIMEOUT,
    )
    response.raise_for_status()
    return response.json()


# ============================================================================
# MAIN FUNCTION
# ============================================================================


def main():
    """Main processing function. Returns the exit status, or None for success."""
    global main_thread_pool, subtasks_thread_pool

    # ============================================================================
    # AUTHENTICATION
    # ============================================================================
    print()
    login_status = login()
    while login_status == "Error" and is_interactive():
        login_status = login()
    if login_status == "Exit":
        return EXIT_SUCCESS
    if login_status == "Error":
        return EXIT_FAILURE  # Unattended: no second try; login() said why on stderr

    # ============================================================================
    # CONFIGURATION
    # ============================================================================
    print()
    number_of_threads = _threads_setting()
    if is_interactive():
        number_of_threads = int(
            _ask(
                questionary.text(
                    "Number of threads:",
                    default=str(number_of_threads),
                    validate=_is_valid_thread_count,
                )
            )
        )
    dry_run = ask_dry_run() if CHANGES_DATA else False

    # ============================================================================
    # INITIALIZATION
    # ============================================================================
    start_time = perf_counter()
    _stop_requested.clear()

    # Initialize thread pools
    main_thread_pool = StoppableThreadPool(max_workers=number_of_threads)
    subtasks_thread_pool = StoppableThreadPool(max_workers=SUBTASKS_POOL_SIZE)
    if CHANGES_DATA:
        start_journal(dry_run)  # the write journal; says what an unfinished earlier run left

    # ============================================================================
    # MAIN PROCESSING BLOCK
    # ============================================================================
    print()
    console.print("[bold cyan]Starting main processing...[/bold cyan]")

    # TODO: Developer implements processing logic here, replacing this example (up to
    # "END OF TODO BLOCK"). It counts each organization's inclusions: organizations are
    # processed in the main pool by process_in_pool(), the pages of each one's inclusions
    # in the subtasks pool; then it shows a table and writes it as CSV and JSON.

    def count_inclusions(organization):
        first_page = search_inclusions(organization["id"], INCLUSIONS_PAGE_SIZE, 1)
        last_page = -(-first_page["total"] // INCLUSIONS_PAGE_SIZE)  # ceiling division
        other_pages = [
            subtasks_thread_pool.submit(search_inclusions, organization["id"], INCLUSIONS_PAGE_SIZE, page)
            for page in range(2, last_page + 1)
        ]
        return len(first_page["data"]) + sum(len(future.result()["data"]) for future in other_pages)

    organizations = get_all_organizations()
    rows = [
        {"organization": organization["name"], "city": organization["city"], "inclusions": count}
        for organization, count in process_in_pool(main_thread_pool, count_inclusions, organizations, "Organizations")
    ]
    rows.sort(key=lambda row: row["organization"])

    table = Table(title="Inclusions by organization")
    table.add_column("Organization")
    table.add_column("Inclusions", justify="right")
    for row in rows:
        table.add_row(row["organization"], str(row["inclusions"]))
    table.add_row("Total", str(sum(row["inclusions"] for row in rows)), style="bold")
    console.print(table)
    write_csv(f"{RESULTS_FILE_NAME}.csv", rows)
    write_json(f"{RESULTS_FILE_NAME}.json", rows)
    logging.info(f"Counted {sum(row['inclusions'] for row in rows)} inclusions in {len(rows)} organizations,"
                 f" written to {RESULTS_FILE_NAME}.csv and .json")
    # END OF TODO BLOCK

    # ============================================================================
    # FINALIZATION
    # ============================================================================
    print()
    print(f"Elapsed time: {str(timedelta(seconds=perf_counter() - start_time))}")


# ============================================================================
# ENTRY POINT
# ============================================================================


def _script_name():
    """The script's name without .py: my_script.py writes my_script.log."""
    return os.path.splitext(os.path.basename(__file__))[0]


class AlreadyRunning(Exception):
    """Another run of the same script holds the lock of this directory."""


def _parse_arguments(argv):
    """The command line: only --resolve, to record what a person found about unknown writes."""
    parser = argparse.ArgumentParser(
        prog=os.path.basename(__file__),
        description="Without arguments, run the script. With --resolve, record in the write journal"
        " what you found on the platform about writes of unknown outcome, and run nothing.",
    )
    parser.add_argument(
        "--resolve", action="append", default=[], type=_resolution, metavar="KEY=done|failed",
        help="done: the change is on the platform (the next run skips it); failed: it is not (it sends it)",
    )
    return parser.parse_args(argv).resolve


def _resolution(text):
    key, _, outcome = text.partition("=")
    if not key or outcome not in ("done", "failed"):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=done or KEY=failed")
    return key, outcome


def _lock_working_directory():
    """One run at a time of a script in a directory: an OS lock on <script>.lock, which
    the OS frees when the process ends, however it ends (kill -9, a closed console)."""
    path = f"{_script_name()}.lock"
    try:
        file = open(path, "a+")
    except OSError as exc:
        raise SettingError(
            f"cannot write in {os.getcwd()} ({exc.strerror}): run the script from a folder where you can write"
            " (its log and journal go there; for the Task Scheduler, set 'Start in')"
        ) from None
    try:
        _lock_file(file)
    except OSError:
        file.close()
        raise AlreadyRunning(
            f"{_script_name()} is already running in {os.getcwd()}: this run did not start (one at a time)"
        ) from None
    return file


def _lock_file(file):
    """Take the lock of an open file without waiting; OSError if another process has it."""
    if os.name == "nt":
        file.seek(0)
        msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _configure_logging():
    """Log to <script name>.log in the current directory, afresh, the previous runs' logs
    kept as .log.1 (newest) to .log.<LOG_BACKUP_COUNT>; UTC times; secrets redacted."""
    log_file_name = f"{_script_name()}.log"
    try:
        _keep_previous_logs(log_file_name)
        handler = logging.FileHandler(log_file_name, mode="w", encoding="utf-8")
    except OSError as exc:
        raise SettingError(
            f"cannot write the log {os.path.abspath(log_file_name)} ({exc.strerror}):"
            " run the script from a folder where you can write"
        ) from None
    handler.setFormatter(_UtcSecretRedactingFormatter(LOG_FORMAT))
    logging.basicConfig(level=LOG_LEVEL, handlers=[handler])
    # httpx logs every request at INFO: keep those lines for DEBUG runs only. httpcore's
    # DEBUG trace includes response headers (cookies): never logged.
    logging.getLogger("httpx").setLevel(logging.INFO if LOG_LEVEL <= logging.DEBUG else logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _keep_previous_logs(path):
    """my_script.log -> my_script.log.1 -> .log.2 ... up to LOG_BACKUP_COUNT; the oldest goes."""
    if LOG_BACKUP_COUNT <= 0 or not os.path.exists(path):
        return
    for number in range(LOG_BACKUP_COUNT - 1, 0, -1):
        if os.path.exists(f"{path}.{number}"):
            os.replace(f"{path}.{number}", f"{path}.{number + 1}")
    os.replace(path, f"{path}.1")


def _main(argv=None) -> int:
    """Run main() as a terminal user or an unattended runner expects. Returns the exit status."""
    global _run_lock
    _prepare_output()
    resolutions = _parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        _run_lock = _lock_working_directory()
        _configure_logging()
    except SettingError as exc:
        _report(f"Setting error: {exc}")
        return EXIT_BAD_SETTING
    except AlreadyRunning as exc:
        _report(str(exc))
        return EXIT_FAILURE
    _install_stop_signals()
    logging.info(f"{os.path.basename(__file__)} started (template {__version__})")
    try:
        if resolutions:
            resolve_writes(resolutions)  # no login: it only records what a person found
            exit_status = EXIT_SUCCESS
        else:
            _check_settings()
            exit_status = main() or EXIT_SUCCESS
    except KeyboardInterrupt:
        exit_status = _exit_status_of_signal(_stop_signal) if _stop_signal else EXIT_INTERRUPTED
        what = "by SIGTERM" if exit_status == EXIT_TERMINATED else "by the user (Ctrl+C)"
        logging.warning(f"Run interrupted {what}")
        _report(f"Interrupted {what}.")
    except SystemExit as exc:  # sys.exit(N) in the script's own code
        exit_status = exc.code if isinstance(exc.code, int) else EXIT_FAILURE if exc.code else EXIT_SUCCESS
        if isinstance(exc.code, str):
            _report(exc.code)
    except SettingError as exc:
        exit_status = EXIT_BAD_SETTING
        logging.critical(f"Setting error: {exc}", exc_info=True)
        _report(f"Setting error: {exc}")
    except Exception as exc:
        exit_status = EXIT_FAILURE
        logging.critical(f"Script terminated with exception: {exc}", exc_info=True)
        _report(f"Script stopped due to error: {describe_error(exc)}")
    finally:
        _finishing.set()  # from here on, a signal is noted, not raised
        # Shutdown thread pools: cancel what is queued; calls in flight end at once
        request_stop()
    exit_status = _finish_run(exit_status)
    logging.info(f"Exit status {exit_status}")
    # Pause before exit, so that a console opened for the script does not close at once
    if is_interactive() and _stop_signal is None and exit_status != EXIT_INTERRUPTED:
        print("\n")
        try:
            input("Press Enter to exit...")
        except (EOFError, KeyboardInterrupt):
            pass
    return exit_status


def _finish_run(exit_status):
    """Wait for calls in flight (up to STOP_GRACE), close the journal with its summary,
    and make the exit status say whether everything was done."""
    _wait_for_threads(STOP_GRACE)
    if failed_items and exit_status == EXIT_SUCCESS:
        exit_status = EXIT_FAILURE
        _report(f"{len(failed_items)} items failed (see the log): exit status {EXIT_FAILURE}")
    if _journal["file"] is not None:
        journal_writes_still_in_flight()
        if exit_status == EXIT_SUCCESS and writes_left_undone():
            exit_status = EXIT_FAILURE
        end_journal(exit_status)
    if _stop_signal is not None and exit_status not in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        exit_status = _exit_status_of_signal(_stop_signal)  # a signal while the run was ending
    return exit_status


def _other_threads():
    return [thread for thread in threading.enumerate() if thread is not threading.main_thread() and not thread.daemon]


def _wait_for_threads(seconds):
    """Let the pools' threads end, for `seconds` at most in all."""
    deadline = monotonic() + seconds
    for thread in _other_threads():
        thread.join(max(deadline - monotonic(), 0))


def _exit(exit_status):
    """Exit with this status, even if a call stuck where no stop can reach it (a DNS
    lookup, a connection being made) keeps a thread alive."""
    stuck = [thread for thread in _other_threads() if thread.is_alive()]
    if stuck:
        logging.warning(f"{len(stuck)} threads still busy: exit without waiting for them")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_status)
    sys.exit(exit_status)


if __name__ == "__main__":
    _exit(_main())
