# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "httpx>=0.28",
#     "questionary>=2.0",
#     "rich>=13.0",
#     "tqdm>=4.66",
# ]
# ///
"""Endobest script template: the starting point of every script that reads or changes data
on the Endobest clinical research platform (IAM, RC and GDD microservices).

How to use a copy:

    cp eb_script_template.py my_script.py     # then edit my_script.py:
    1. CONFIGURATION CONSTANTS: the microservices you need, the endpoints you call.
    2. API TEMPLATES: one decorated function per API call (GET and POST examples below).
    3. main(): replace the TODO block (from "TODO" to "END OF TODO BLOCK") with your job.
    python my_script.py                       # or: uv run my_script.py

It asks for the login, the password and the number of threads, shows progress bars and
writes my_script.log in the current directory. Run without a terminal (cron, a runner),
it never prompts: it reads EB_* environment variables and its exit status tells the outcome
(0 success, 1 failure, 2 bad setting, 130 interrupted). README_TEMPLATE.md has the details.
"""

__version__ = "1.0.0"

# ============================================================================
# IMPORTS
# ============================================================================

import email.utils
import functools
import json  # noqa: F401 - not used by the template itself: kept for the scripts built from it
import logging
import os
import queue
import sys
import threading
import traceback  # noqa: F401 - not used by the template itself: kept for the scripts built from it
from concurrent.futures import ThreadPoolExecutor, as_completed  # noqa: F401 - as_completed: see iter_completed()
from datetime import datetime, timedelta, timezone
from time import perf_counter, sleep

import httpx
import questionary
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

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
            # Example write endpoint, used by create_record(): check the real path first.
            "create_record": "/api/records",
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

# --- Threading --------------------------------------------------------------
MAX_THREADS = 20  # Upper limit for the main pool
SUBTASKS_POOL_SIZE = 40  # Fixed size of the subtasks pool
DEFAULT_NUMBER_OF_THREADS = 12  # The prompt's default; EB_THREADS's default when unattended
STOP_POLL_INTERVAL = 0.1  # Seconds between two looks of a waiting main thread (Ctrl+C, results)

# --- Retry & Logging --------------------------------------------------------
ERROR_MAX_RETRY = 10  # Attempts per API call, the first one included
WAIT_BEFORE_RETRY = 0.5  # Seconds between attempts (fixed, not exponential)
API_TIMEOUT = 60  # Seconds (change it here, or pass timeout= in one API call)
AUTH_TIMEOUT = 20  # Seconds, for login, config-token and refresh requests
RETRY_AFTER_MAX = 60  # Seconds: the longest a server's Retry-After header makes us wait

# What an API call retries. Any other error is raised at once, unchanged (a 404 stays an
# httpx.HTTPStatusError the caller can catch): no retry can fix it. A 401 is always
# followed by a token refresh and a retry.
RETRY_ON_STATUS = frozenset({408, 429, *range(500, 600)})
RETRY_ON_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# What a call marked idempotent=False (not safe to repeat: it changes data) retries: only
# failures that prove the server did not process the request.
NOT_PROCESSED_STATUS = frozenset({429, 503})
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

LOG_LEVEL = logging.INFO  # Default log level (DEBUG for details)
LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"
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

# --- Exit statuses (what cron or a runner sees) -----------------------------
EXIT_SUCCESS = 0
EXIT_FAILURE = 1  # Any failure: login, an API call, a worker's exception
EXIT_BAD_SETTING = 2  # A wrong or missing EB_* setting
EXIT_INTERRUPTED = 130  # Ctrl+C, as a shell reports a process stopped by SIGINT

# --- Example job (the TODO block of main(); delete with it) -----------------
PROTOCOL_ID = ""  # The study whose inclusions search_inclusions() looks for
INCLUSIONS_PAGE_SIZE = 50

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

# Rich console
console = Console()

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

# Set when the run stops (Ctrl+C, a worker's error): no API call starts after it
_stop_requested = threading.Event()

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
    """
    thread_id = threading.get_ident()
    client = httpx_clients.get(thread_id)
    if client is None:
        # Each thread writes only its own key, so the dict needs no lock.
        client = httpx.Client(verify=_shared_ssl_context(), timeout=API_TIMEOUT)
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
    Yield futures as they complete, like as_completed(), looking every STOP_POLL_INTERVAL.

    Use it in the main thread instead of as_completed(). A wait with no timeout cannot be
    interrupted on Windows before Python 3.14: Ctrl+C would be seen only when the next
    task ends. And taking finished tasks in batches, rather than waking at each one,
    leaves the CPU to the workers (about 10% more calls per second at 20 threads).
    """
    finished = queue.SimpleQueue()
    pending = set(futures)
    for future in pending:
        future.add_done_callback(finished.put)
    for _ in range(len(pending)):
        while finished.empty():
            sleep(STOP_POLL_INTERVAL)
        yield finished.get()


class RunStopped(Exception):
    """Raised by an API call started after the run began to stop: it is not sent."""


class SettingError(Exception):
    """A missing or wrong EB_* setting: the script exits with EXIT_BAD_SETTING."""


class StoppableThreadPool(ThreadPoolExecutor):
    """
    A ThreadPoolExecutor whose `with` block, when an exception leaves it (a worker's error
    re-raised, Ctrl+C), stops the run: queued tasks of both pools are cancelled and running
    ones end at their next API call. A plain executor would run every queued task first.
    """

    def __exit__(self, exc_type, exc_value, exc_traceback):
        if exc_type is not None:
            request_stop()
            self.shutdown(wait=False, cancel_futures=True)  # also when it is not a global pool
        return super().__exit__(exc_type, exc_value, exc_traceback)


def request_stop():
    """Stop the run: no API call starts any more, queued tasks of both pools are cancelled."""
    _stop_requested.set()
    for pool in (main_thread_pool, subtasks_thread_pool):
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def describe_error(exc) -> str:
    """One line for the console or the log (httpx's own message spans two lines)."""
    if isinstance(exc, httpx.HTTPStatusError):
        request, response = exc.request, exc.response
        return f"{response.status_code} {response.reason_phrase} from {request.method} {request.url}"
    first_line = str(exc).strip().split("\n")[0]
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def is_interactive() -> bool:
    """True when someone can answer prompts: stdin is a terminal and EB_NON_INTERACTIVE
    is not set to 1 (for environments that fake a terminal)."""
    if os.environ.get("EB_NON_INTERACTIVE", "").strip().lower() in ("1", "true", "yes"):
        return False
    return sys.stdin is not None and sys.stdin.isatty()


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


def _password_setting() -> str:
    """The password the environment gives: EB_PASSWORD_FILE's content, else DEFAULT_PASSWORD."""
    path = os.environ.get("EB_PASSWORD_FILE", "")
    if not path:
        return DEFAULT_PASSWORD
    if os.environ.get("EB_PASSWORD"):
        raise SettingError("Set EB_PASSWORD or EB_PASSWORD_FILE, not both")
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingError(f"EB_PASSWORD_FILE: cannot read {path!r} ({exc})") from exc


def _check_settings():
    """Fail fast on a wrong EB_* setting: before any prompt or network call."""
    _threads_setting()
    _password_setting()


class _SecretRedactingFormatter(logging.Formatter):
    """Log formatter that writes *** in place of the password and of every token seen:
    the log file is read and shared, a secret must never reach it, whatever the level."""

    def format(self, record):
        text = super().format(record)
        for secret in tuple(_secrets):
            text = text.replace(secret, "***")
        return text


def _remember_secrets(*values):
    """Let the log formatter hide these values, from now on."""
    _secrets.update(value for value in values if value)


# ============================================================================
# AUTHENTICATION
# ============================================================================


def login():
    """
    Authenticate with IAM and configure tokens for all microservices.

    Interactive: asks login and password (defaults from the constants). Unattended: takes
    them from the environment (EB_USER_NAME, EB_PASSWORD or EB_PASSWORD_FILE).

    Returns:
        "Success", "Error", or "Exit" (empty login or password at the prompt)
    """
    user_name, password = _ask_credentials()
    if not (user_name and password):
        return "Exit"
    try:
        master_token, user_id = _log_in_to_iam(user_name, password)
    except (httpx.RequestError, httpx.HTTPStatusError) as exc:
        return _login_failed(f"Login Error: {describe_error(exc)}")
    for app_name in MICROSERVICES:
        if app_name == "IAM":
            continue  # IAM does not need a config-token
        try:
            tokens[app_name] = _configure_token(app_name, master_token, user_id)
        except (httpx.RequestError, httpx.HTTPStatusError) as exc:
            return _login_failed(f"Config-token Error for {app_name}: {describe_error(exc)}")
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
    body = response.json()
    _remember_secrets(body["access_token"])
    return body["access_token"], body["userId"]


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
    return _token_pair(response)


def _token_pair(response):
    body = response.json()
    _remember_secrets(body["access_token"], body["refresh_token"])
    return {"access_token": body["access_token"], "refresh_token": body["refresh_token"]}


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
            tokens[app] = _renew_tokens(app)
        except (httpx.RequestError, httpx.HTTPStatusError) as exc:
            _failed_renewals[app] = (failures + 1, exc)
            raise
    finally:
        _token_refresh_lock.release()


def _acquire_token_refresh_lock():
    """Wait for the refresh lock in short slices: a stop (Ctrl+C) is not held up by it."""
    while not _token_refresh_lock.acquire(timeout=STOP_POLL_INTERVAL):
        if _stop_requested.is_set():
            raise RunStopped("token refresh not started: the run is stopping")


def _renew_tokens(app):
    """A new pair for `app`: refreshed, or from a new login when the refresh token is unusable."""
    try:
        return _call_with_retries(functools.partial(_refresh_tokens, app), f"refresh_token for {app}", idempotent=False)
    except RetriesExhausted:
        raise  # the server never processed the refresh: a new login would not reach it either
    except (httpx.RequestError, httpx.HTTPStatusError) as exc:
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
    return _token_pair(response)


def _log_in_again(app):
    """A new pair for `app` from the credentials given at login, without a prompt."""
    master_token, user_id = _log_in_to_iam(_credentials["user_name"], _credentials["password"])
    logging.info(f"Logged in again for {app}")
    return _configure_token(app, master_token, user_id)


# ============================================================================
# DECORATORS
# ============================================================================


def api_call_with_retry(app, idempotent=True):
    """
    Decorator for API calls with automatic retry and token refresh on 401 errors.

    Args:
        app: Microservice name (e.g., "RC", "GDD")
        idempotent: False for a call that is not safe to repeat (it creates or changes
            data): it is then retried only when the server cannot have processed it
            (NOT_SENT_ERRORS, NOT_PROCESSED_STATUS, 401), never after a read timeout or a 5xx.

    Usage:
        @api_call_with_retry("RC")
        def get_organizations():
            ...

    Retried: RETRY_ON_ERRORS and RETRY_ON_STATUS, after WAIT_BEFORE_RETRY seconds or the
    server's Retry-After (up to RETRY_AFTER_MAX); a 401 refreshes the token, then retries.
    Any other error is raised at once, unchanged. After ERROR_MAX_RETRY attempts:
    RetriesExhausted (an httpx.RequestError), with the last error as its __cause__.
    Once the run is stopping (Ctrl+C, a worker's error), no attempt starts: RunStopped.
    """

    def decorator(func):
        def refresh_rejected_token(exc):
            logging.info(f"Token expired for {func.__name__}. Refreshing token for {app}.")
            new_token(app, rejected_token=_bearer_token(exc.request))

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            call = functools.partial(func, *args, **kwargs)
            return _call_with_retries(call, func.__name__, idempotent, on_unauthorized=refresh_rejected_token)

        return wrapper

    return decorator


class RetriesExhausted(httpx.RequestError):
    """ERROR_MAX_RETRY attempts failed; the last error is the __cause__."""


def _call_with_retries(call, name, idempotent, on_unauthorized=None):
    """call(), retried by the rules of api_call_with_retry(); on_unauthorized(error), when
    given, runs after a 401 and before the next attempt."""
    last_error = None
    for attempt in range(1, ERROR_MAX_RETRY + 1):
        if _stop_requested.is_set():
            raise RunStopped(f"{name} not called: the run is stopping")
        try:
            return call()
        except (httpx.RequestError, httpx.HTTPStatusError) as exc:
            unauthorized = on_unauthorized is not None and _status_of(exc) == 401
            if not (unauthorized or _is_retryable(exc, idempotent)):
                logging.info(f"Error in {name}, not retried: {describe_error(exc)}")
                raise
            last_error = exc
            logging.warning(f"Error in {name} (Attempt {attempt}/{ERROR_MAX_RETRY}): {describe_error(exc)}")
            if unauthorized:
                on_unauthorized(exc)
            elif attempt < ERROR_MAX_RETRY:
                _pause(_retry_delay(exc))
    message = f"Persistent error in {name} after {ERROR_MAX_RETRY} attempts: {describe_error(last_error)}"
    logging.critical(message)
    raise RetriesExhausted(message) from last_error


def _status_of(exc):
    """The HTTP status of an httpx.HTTPStatusError, None for a transport error."""
    return exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None


def _is_retryable(exc, idempotent) -> bool:
    """Whether another attempt may succeed; for a call that is not idempotent, only when
    the server cannot have processed this one."""
    status = _status_of(exc)
    if idempotent:
        return status in RETRY_ON_STATUS if status else isinstance(exc, RETRY_ON_ERRORS)
    return status in NOT_PROCESSED_STATUS if status else isinstance(exc, NOT_SENT_ERRORS)


def _bearer_token(request):
    """The token a request carried in its Authorization header, or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token if scheme == "Bearer" and token else None


def _retry_delay(exc) -> float:
    """WAIT_BEFORE_RETRY, or the server's Retry-After when longer, up to RETRY_AFTER_MAX."""
    retry_after = exc.response.headers.get("Retry-After") if _status_of(exc) else None
    return max(WAIT_BEFORE_RETRY, min(_seconds_from_retry_after(retry_after), RETRY_AFTER_MAX))


def _seconds_from_retry_after(value) -> float:
    """Seconds a Retry-After header asks for (a number or an HTTP date); 0 if unreadable."""
    if not value:
        return 0.0
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
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
# API TEMPLATES
# ============================================================================
# One decorated function per API call, returning response.json(). Choose the HTTP method;
# keep response.raise_for_status(): it is what lets the decorator retry.


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


@api_call_with_retry("RC", idempotent=False)
def create_record(patient_id, fields):
    """Example write: creates a record, so a repeat could create two. idempotent=False:
    never retried once the server may have received it."""
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

    # ============================================================================
    # INITIALIZATION
    # ============================================================================
    start_time = perf_counter()
    _stop_requested.clear()

    # Initialize thread pools
    main_thread_pool = StoppableThreadPool(max_workers=number_of_threads)
    subtasks_thread_pool = StoppableThreadPool(max_workers=SUBTASKS_POOL_SIZE)

    # ============================================================================
    # MAIN PROCESSING BLOCK
    # ============================================================================
    print()
    console.print("[bold cyan]Starting main processing...[/bold cyan]")

    # TODO: Developer implements processing logic here, replacing this example (up to
    # "END OF TODO BLOCK"). It counts each organization's inclusions: organizations are
    # processed in the main pool, the pages of each one's inclusions in the subtasks pool.
    # A worker's exception stops the run: logged, the other tasks cancelled, re-raised.

    def count_inclusions(organization_id):
        first_page = search_inclusions(organization_id, INCLUSIONS_PAGE_SIZE, 1)
        last_page = -(-first_page["total"] // INCLUSIONS_PAGE_SIZE)  # ceiling division
        other_pages = [
            subtasks_thread_pool.submit(search_inclusions, organization_id, INCLUSIONS_PAGE_SIZE, page)
            for page in range(2, last_page + 1)
        ]
        return len(first_page["data"]) + sum(len(future.result()["data"]) for future in other_pages)

    organizations = get_all_organizations()
    inclusions_by_organization = {}
    with tqdm(total=len(organizations), desc="Organizations", bar_format=custom_bar_format, disable=None) as pbar:
        with main_thread_pool as executor:
            futures = {executor.submit(count_inclusions, org["id"]): org for org in organizations}
            for future in iter_completed(futures):
                organization = futures[future]
                try:
                    inclusions_by_organization[organization["name"]] = future.result()
                except Exception as exc:
                    logging.critical(f"Error in worker for {organization['name']}: {describe_error(exc)}")
                    executor.shutdown(wait=False, cancel_futures=True)
                    raise
                pbar.update(1)

    table = Table(title="Inclusions by organization")
    table.add_column("Organization")
    table.add_column("Inclusions", justify="right")
    for name, count in sorted(inclusions_by_organization.items()):
        table.add_row(name, str(count))
    table.add_row("Total", str(sum(inclusions_by_organization.values())), style="bold")
    console.print(table)
    logging.info(f"Counted {sum(inclusions_by_organization.values())} inclusions in {len(organizations)} organizations")
    # END OF TODO BLOCK

    # ============================================================================
    # FINALIZATION
    # ============================================================================
    print()
    print(f"Elapsed time: {str(timedelta(seconds=perf_counter() - start_time))}")


# ============================================================================
# ENTRY POINT
# ============================================================================


def _configure_logging():
    """Log to <script name>.log in the current directory, secrets redacted."""
    script_name = os.path.splitext(os.path.basename(__file__))[0]
    log_file_name = f"{script_name}.log"
    handler = logging.FileHandler(log_file_name, mode="w", encoding="utf-8")
    handler.setFormatter(_SecretRedactingFormatter(LOG_FORMAT))
    logging.basicConfig(level=LOG_LEVEL, handlers=[handler])
    # httpx logs every request at INFO: keep those lines for DEBUG runs only. httpcore's
    # DEBUG trace includes response headers (cookies): never logged.
    logging.getLogger("httpx").setLevel(logging.INFO if LOG_LEVEL <= logging.DEBUG else logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _main() -> int:
    """Run main() as a terminal user or an unattended runner expects. Returns the exit status."""
    _configure_logging()
    logging.info(f"{os.path.basename(__file__)} started (template {__version__})")
    try:
        _check_settings()
        exit_status = main() or EXIT_SUCCESS
    except KeyboardInterrupt:
        exit_status = EXIT_INTERRUPTED
        logging.warning("Run interrupted by the user (Ctrl+C)")
        _report("Interrupted by the user.")
    except SettingError as exc:
        exit_status = EXIT_BAD_SETTING
        logging.critical(f"Setting error: {exc}", exc_info=True)
        _report(f"Setting error: {exc}")
    except Exception as exc:
        exit_status = EXIT_FAILURE
        logging.critical(f"Script terminated with exception: {exc}", exc_info=True)
        _report(f"Script stopped due to error: {describe_error(exc)}")
    finally:
        # Shutdown thread pools: cancel what is queued, let running calls end
        request_stop()
    logging.info(f"Exit status {exit_status}")
    # Pause before exit, so that a console opened for the script does not close at once
    if is_interactive() and exit_status != EXIT_INTERRUPTED:
        print("\n")
        try:
            input("Press Enter to exit...")
        except (EOFError, KeyboardInterrupt):
            pass
    return exit_status


if __name__ == "__main__":
    sys.exit(_main())
