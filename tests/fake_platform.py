"""A fake Endobest clinical research platform, for tests and for a first run.

It serves the three microservices a script talks to, each over real HTTP/1.1
on its own free port of 127.0.0.1:

* IAM: login (user name + password -> master token)
* RC:  research data (organizations, inclusions, records, surveys)
* GDD: lab requests (by tube id)

The data are deterministic and built from ``inclusion_counts``; nothing is
persisted. Every answer is JSON, unless a test injects another body.

Records change: each patient (``pat-001-0001``...) has a record whose fields start
deterministic. ``GET /api/records/byPatient?patientId=X`` answers the current record,
``PATCH`` on that path with ``{"fields": {...}}`` merges fields into it, ``PUT``
replaces all its fields (both answer 200 with the updated record), and
``POST /api/records`` creates a separate record (201). Each applied change counts
one for the patient (``changes()``, ``total_changes()``).

In a test::

    from fake_platform import FakePlatform, DEMO_USER_NAME, DEMO_PASSWORD

    with FakePlatform(latency=0.01) as fake:
        env = fake.environment()          # EB_IAM_BASE_URL, EB_RC_BASE_URL, ...
        fake.fail_next("/api/inclusions/search", status=429, headers={"Retry-After": "1"})
        ...                               # run the code under test against env
        assert fake.calls("/api/inclusions/search", service="RC") == 2

Constructor knobs (keyword only):

* ``latency`` (0): seconds added to every data request.
* ``auth_latency`` (0): seconds added to login, config-token and refresh requests.
* ``access_token_ttl`` (3600), ``refresh_token_ttl`` (86400): token lifetimes, seconds.
* ``revoke_previous_access_token`` (False): a new access token of a user and service
  revokes the earlier ones.
* ``inclusion_counts`` ((12, 0, 57, 130, 3, 41, 88, 25)): one organization per
  number, with that many inclusions (patients).
* ``organization_names`` (None): the organizations' names, in order, instead of
  "Hospital 1", "Hospital 2"...; organizations beyond the list keep "Hospital N".
* ``users`` (None): {user name: password}; by default the demo account only.

``latency``, ``auth_latency``, the TTLs, ``revoke_previous_access_token`` and ``users``
are plain attributes, read on every request, so a test may change them at any time.

Faults: ``fail_next(path, ...)`` makes the next requests to a path go wrong (see its
docstring): an error status, a dropped connection, a body that is not the expected
JSON, an answer lost after the change was applied (``after_processing``), an answer
sent one byte at a time (``trickle``) or one that stops after its headers (``stall``).

Test controls and counters: ``fail_next``, ``expire_access_tokens``,
``expire_refresh_tokens``, ``calls``, ``connections``, ``request_times``,
``issued_secrets``, ``created_records``, ``changes``, ``total_changes``,
``record_fields``, ``stats``, and the attributes ``logins``, ``refreshes``,
``refresh_attempts``.

From a shell::

    python tests/fake_platform.py                      # prints the EB_... lines to use
    python tests/fake_platform.py --run my_script.py   # runs the script against the fake
    python tests/fake_platform.py --fail-next /api/records/byPatient,method=PATCH,status=503 \\
        --run my_script.py --resolve abc=done          # args after SCRIPT go to the script

Options (``--help`` describes them; the fake's options go before ``--run``):

* ``--latency SECONDS``, ``--auth-latency SECONDS``, ``--access-token-ttl SECONDS``,
  ``--refresh-token-ttl SECONDS``, ``--revoke-previous-access-token``: the knobs above.
* ``--inclusion-counts 12,0,57``: comma-separated ``inclusion_counts``.
* ``--organization-names "Szpital Łódź;Hôpital Sainte-Anne"``: semicolon-separated.
* ``--users NAME=PASSWORD`` (repeatable): the accounts, instead of the demo one; the
  first one is given to a ``--run`` script as EB_USER_NAME/EB_PASSWORD.
* ``--fail-next SPEC`` (repeatable): a ``fail_next()`` rule set at start. SPEC is
  ``PATH[,key=value...]`` with the keys ``count``, ``status``, ``drop``, ``service``,
  ``method``, ``after_processing``, ``body``, ``content_type``, ``trickle``, ``stall``
  and ``retry_after`` (the Retry-After header). Booleans are 1, 0, true or false.
  A comma not followed by ``key=`` belongs to the value, so that
  ``body={"data": [1, 2`` works.
* ``--run SCRIPT [ARGS...]``: run SCRIPT with ARGS against the fake, with the EB_*
  variables and the credentials set, then stop; the exit status is the script's.

A process that started the fake as a child needs no token for two paths, served by
every service, neither counted nor subject to fail_next():

* ``GET /_fake/stats``: the counters, as ``stats()`` returns them.
* ``POST /_fake/fail-next`` with a JSON object of the SPEC keys plus ``"path"``: adds a
  ``fail_next()`` rule at run time (200, or 400 with a message for a bad rule).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import secrets
import select
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote

DEMO_USER_NAME = "ziwig-invest2@yopmail.com"  # same as the template's DEFAULT_USER_NAME
DEMO_PASSWORD = "fake-platform-password"  # a fake's credential, not a secret

SERVICES = ("IAM", "RC", "GDD")

LOGIN_PATH = "/api/auth/ziwig-pro/login"
CONFIG_TOKEN_PATH = "/api/auth/config-token"
REFRESH_PATH = "/api/auth/refreshToken"
TUBE_PATH = "/api/requests/by-tube-id"
STATS_PATH = "/_fake/stats"
FAIL_NEXT_PATH = "/_fake/fail-next"
RECORD_PATH = "/api/records/byPatient"

# URL path -> endpoint name, per service. Auth endpoints are methods of
# FakePlatform (prefixed with "_"); data endpoints are methods of _Dataset.
ROUTES = {
    "IAM": {
        LOGIN_PATH: "login",
        REFRESH_PATH: "refresh",
    },
    "RC": {
        CONFIG_TOKEN_PATH: "config_token",
        REFRESH_PATH: "refresh",
        "/api/inclusions/getAllOrganizations": "organizations",
        "/api/inclusions/inclusion-statistics": "statistics",
        "/api/inclusions/search": "search",
        RECORD_PATH: "record",  # GET/POST read; PATCH and PUT write (see _Handler._route)
        "/api/surveys/filter/with-answers": "surveys",
        "/api/records": "create_record",
    },
    "GDD": {
        CONFIG_TOKEN_PATH: "config_token",
        REFRESH_PATH: "refresh",
        TUBE_PATH: "tube",
    },
}
AUTH_ENDPOINTS = {"login", "config_token", "refresh"}

CITIES = ("Paris", "Lyon", "Marseille", "Toulouse", "Bordeaux", "Lille", "Nantes", "Strasbourg")


class HttpError(Exception):
    """Raised by endpoint code to answer `status` with {"message": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Token:
    kind: str  # "master" (IAM access token), "access" or "refresh"
    service: str
    user_id: str
    expires_at: float  # time.monotonic() based
    revoked: bool = False
    used: bool = False  # refresh tokens are single-use

    def is_valid(self) -> bool:
        return not self.revoked and not self.used and time.monotonic() < self.expires_at


@dataclass
class _Failure:
    """One fail_next() rule; see fail_next() for what each field does."""

    path: str
    service: str | None
    remaining: int
    status: int
    headers: dict
    drop: bool
    method: str | None = None
    after_processing: bool = False
    body: bytes | None = None
    content_type: str | None = None
    trickle: float | None = None
    stall: bool = False

    def processes_request(self) -> bool:
        """True when the request is served normally before the fault shows."""
        return self.after_processing or self.trickle is not None or self.stall


def _new_failure(
    path,
    count=1,
    status=503,
    headers=None,
    drop=False,
    service=None,
    *,
    method=None,
    after_processing=False,
    body=None,
    content_type=None,
    trickle=None,
    stall=False,
) -> _Failure:
    """A checked fail_next() rule; ValueError says what is wrong with the arguments."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"the path must start with '/', not {path!r}")
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValueError(f"count must be an integer, not {count!r}")
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError(f"status must be an HTTP status (100..599), not {status!r}")
    if service is not None and service not in SERVICES:
        raise ValueError(f"service must be one of {', '.join(SERVICES)}, not {service!r}")
    if method is not None:
        if not isinstance(method, str) or not method.isalpha():
            raise ValueError(f"method must be an HTTP method such as PATCH, not {method!r}")
        method = method.upper()
    if body is not None and not isinstance(body, (str, bytes)):
        raise ValueError("body must be a str or bytes")
    if isinstance(body, str):
        body = body.encode("utf-8")
    if trickle is not None and (isinstance(trickle, bool) or not isinstance(trickle, (int, float)) or trickle <= 0):
        raise ValueError(f"trickle must be a number of seconds above 0, not {trickle!r}")
    if trickle is not None and stall:
        raise ValueError("trickle and stall do not go together")
    if (trickle is not None or stall) and (drop or body is not None or content_type is not None):
        raise ValueError("trickle and stall send the real answer: no drop, body or content_type with them")
    if drop and (body is not None or content_type is not None):
        raise ValueError("drop answers nothing: no body or content_type with it")
    return _Failure(
        path, service, count, status, dict(headers or {}), bool(drop), method=method,
        after_processing=bool(after_processing), body=body, content_type=content_type, trickle=trickle,
        stall=bool(stall),
    )


def _as_int(name, value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    raise ValueError(f"{name} must be an integer, not {value!r}")


def _as_float(name, value) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"{name} must be a number, not {value!r}")


def _as_bool(name, value) -> bool:
    # JSON gives true/false; the command line gives text.
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true"):
        return True
    if text in ("0", "false"):
        return False
    raise ValueError(f"{name} must be 1, 0, true or false, not {value!r}")


def _as_str(name, value) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"{name} must be a string, not {value!r}")


def _as_header_value(name, value) -> str:
    # Retry-After: 1 reads naturally as a number in JSON.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _as_str(name, value)


# The keys of a --fail-next SPEC and of POST /_fake/fail-next: name -> converter.
FAIL_NEXT_KEYS = {
    "count": _as_int,
    "status": _as_int,
    "drop": _as_bool,
    "service": _as_str,
    "method": _as_str,
    "after_processing": _as_bool,
    "body": _as_str,
    "content_type": _as_str,
    "trickle": _as_float,
    "stall": _as_bool,
    "retry_after": _as_header_value,
}


def fail_next_arguments(options: dict) -> dict:
    """fail_next()'s keyword arguments (path included) from SPEC keys and a "path";
    values may be text (command line) or JSON values. ValueError when a key is unknown,
    a value has the wrong type or the rule makes no sense."""
    unknown = sorted(set(options) - set(FAIL_NEXT_KEYS) - {"path"})
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; the keys are path, {', '.join(FAIL_NEXT_KEYS)}")
    if "path" not in options:
        raise ValueError("a path is required")
    arguments = {"path": _as_str("path", options["path"])}
    for name, value in options.items():
        if name != "path":
            arguments[name] = FAIL_NEXT_KEYS[name](name, value)
    retry_after = arguments.pop("retry_after", None)
    if retry_after is not None:
        arguments["headers"] = {"Retry-After": retry_after}
    _new_failure(**arguments)  # raises ValueError for a rule that makes no sense
    return arguments


def parse_fail_next_spec(spec: str) -> dict:
    """fail_next()'s keyword arguments from a --fail-next SPEC, "PATH[,key=value...]".

    A comma followed by a lower-case word and "=" starts the next key; any other comma
    belongs to the value before it, so that body={"data": [1, 2 keeps its comma.
    ValueError with a message for the user when the SPEC is wrong.
    """
    path, *pieces = spec.split(",")
    options = {"path": path.strip()}
    name = None
    for piece in pieces:
        match = re.match(r"([a-z_]+)=(.*)", piece, re.S)
        if match:
            name, value = match[1], match[2]
            if name in options:
                raise ValueError(f"{name} is given twice")
            options[name] = value
        elif name is not None:
            options[name] += "," + piece
        else:
            raise ValueError(f"expected key=value after the path, not {piece!r}")
    return fail_next_arguments(options)


# --------------------------------------------------------------------------
# Research data
# --------------------------------------------------------------------------


class _Dataset:
    """The deterministic RC/GDD data, the patients' records as writes changed them, and
    the records created by POST /api/records."""

    def __init__(self, inclusion_counts, organization_names=None):
        names = list(organization_names or ())
        self._organizations = []  # {"id", "name", "city"}
        self._inclusions_by_org = {}  # org id -> list of inclusion dicts
        self._patients = {}  # patient id -> (org index, inclusion index)
        for i, count in enumerate(inclusion_counts):
            org_id = f"org-{i + 1:03d}"
            name = names[i] if i < len(names) else f"Hospital {i + 1}"
            self._organizations.append({"id": org_id, "name": name, "city": CITIES[i % len(CITIES)]})
            self._inclusions_by_org[org_id] = [self._inclusion(i, j) for j in range(count)]
            for j in range(count):
                self._patients[f"pat-{i + 1:03d}-{j + 1:04d}"] = (i, j)
        self._all_inclusions = [inc for incs in self._inclusions_by_org.values() for inc in incs]
        # Precomputed answers: the hot endpoints must be cheap (see the capacity check).
        self._organizations_json = json.dumps(self._organizations).encode()
        self._statistics_json = json.dumps(self._statistics(self._organizations)).encode()
        # One lock for everything writes change: the records' fields, the created
        # records and the change counters, so that concurrent writes lose nothing.
        self._records_lock = threading.Lock()
        self._records = []  # created by POST /api/records
        # Only the records a write changed are stored: the others are computed when
        # read, so that a big dataset costs no memory up front.
        self._changed_fields = {}  # patient id -> fields
        self._changes = Counter()  # patient id -> applied writes

    @staticmethod
    def _inclusion(i: int, j: int) -> dict:
        return {
            "id": f"inc-{i + 1:03d}-{j + 1:04d}",
            "patientId": f"pat-{i + 1:03d}-{j + 1:04d}",
            "organizationId": f"org-{i + 1:03d}",
            "status": "included",
        }

    def _statistics(self, organizations) -> dict:
        rows = [
            {"id": org["id"], "name": org["name"], "inclusions": len(self._inclusions_by_org[org["id"]])}
            for org in organizations
        ]
        return {"organizations": rows, "total": sum(row["inclusions"] for row in rows)}

    def _organization(self, org_id) -> dict:
        for org in self._organizations:
            if org["id"] == org_id:
                return org
        raise HttpError(404, f"unknown center {org_id!r}")

    def _patient(self, params) -> tuple[int, int]:
        return self._patients[self._patient_id(params)]

    def _patient_id(self, params) -> str:
        patient_id = _str_param(params, "patientId")
        if not patient_id:
            raise HttpError(400, "patientId is required")
        if patient_id not in self._patients:
            raise HttpError(404, f"unknown patient {patient_id!r}")
        return patient_id

    def _initial_fields(self, patient_id) -> dict:
        i, j = self._patients[patient_id]
        return {
            "birthYear": 1960 + (7 * i + 13 * j) % 40,
            "inclusionDate": f"2023-{1 + j % 12:02d}-{1 + (i + j) % 28:02d}",
            "painScore": (3 * i + 5 * j) % 11,
            "dysmenorrhea": j % 3 != 0,
            "bmi": round(19.0 + (i + 2 * j) % 12 * 0.7, 1),
        }

    def _current_fields(self, patient_id) -> dict:
        """The record's fields now (the caller holds _records_lock); a copy, so that the
        caller may serialize it while other writes go on."""
        fields = self._changed_fields.get(patient_id)
        return dict(fields) if fields is not None else self._initial_fields(patient_id)

    def _record_answer(self, patient_id, fields) -> dict:
        i, _ = self._patients[patient_id]
        return {"patientId": patient_id, "organizationId": f"org-{i + 1:03d}", "fields": fields}

    # Endpoints: each takes the merged query/body parameters, returns (status, payload).

    def organizations(self, params):
        return 200, self._organizations_json

    def statistics(self, params):
        center = _str_param(params, "center")
        if not center:
            return 200, self._statistics_json
        return 200, self._statistics([self._organization(center)])

    def search(self, params):
        limit = _int_param(params, "limit", 50)
        page = _int_param(params, "page", 1)
        if not 1 <= limit <= 1000 or page < 1:
            raise HttpError(400, "limit must be 1..1000 and page >= 1")
        center = _str_param(params, "center")
        if center:
            inclusions = self._inclusions_by_org[self._organization(center)["id"]]
        else:
            inclusions = self._all_inclusions
        start = (page - 1) * limit
        return 200, {"data": inclusions[start : start + limit], "total": len(inclusions), "page": page, "limit": limit}

    def record(self, params):
        patient_id = self._patient_id(params)
        with self._records_lock:
            fields = self._current_fields(patient_id)
        return 200, self._record_answer(patient_id, fields)

    def update_record(self, params):
        """PATCH: merge the given fields into the record."""
        patient_id = self._patient_id(params)
        fields = _fields_param(params)
        with self._records_lock:
            merged = {**self._current_fields(patient_id), **fields}
            self._changed_fields[patient_id] = merged
            self._changes[patient_id] += 1
            return 200, self._record_answer(patient_id, dict(merged))

    def replace_record(self, params):
        """PUT: the given fields become all the record's fields."""
        patient_id = self._patient_id(params)
        fields = _fields_param(params)
        with self._records_lock:
            self._changed_fields[patient_id] = dict(fields)
            self._changes[patient_id] += 1
            return 200, self._record_answer(patient_id, dict(fields))

    def surveys(self, params):
        i, j = self._patient(params)
        patient_id = params["patientId"]
        return 200, [
            {
                "id": f"survey-{patient_id}-1",
                "name": "Endometriosis Health Profile (EHP-5)",
                "answers": [
                    {"question": "Pain prevented going to work", "answer": ("never", "sometimes", "often")[j % 3]},
                    {"question": "Pain while sitting", "answer": ("never", "rarely", "always")[(i + j) % 3]},
                ],
            },
            {
                "id": f"survey-{patient_id}-2",
                "name": "Symptoms questionnaire",
                "answers": [
                    {"question": "Pelvic pain (0-10)", "answer": str((3 * i + 5 * j) % 11)},
                    {"question": "Dyspareunia", "answer": "yes" if j % 2 else "no"},
                ],
            },
        ]

    def create_record(self, params):
        patient_id = self._patient_id(params)
        fields = params.get("fields") or {}
        if not isinstance(fields, dict):
            raise HttpError(400, "fields must be an object")
        with self._records_lock:
            record = {"id": f"rec-{len(self._records) + 1}", "patientId": patient_id, "fields": fields}
            self._records.append(record)
            self._changes[patient_id] += 1
        return 201, record

    def created_records(self) -> list[dict]:
        with self._records_lock:
            return list(self._records)

    def record_fields(self, patient_id) -> dict:
        if patient_id not in self._patients:
            raise KeyError(patient_id)
        with self._records_lock:
            return self._current_fields(patient_id)

    def changes(self) -> Counter:
        with self._records_lock:
            return Counter(self._changes)

    def tube(self, params):
        tube_id = _str_param(params, "tubeId")
        if not tube_id:
            raise HttpError(400, "tubeId is required")
        patient_id = "pat-" + tube_id[len("tube-") :] if tube_id.startswith("tube-") else None
        if patient_id not in self._patients:
            raise HttpError(404, f"unknown tube {tube_id!r}")
        return 200, {
            "tubeId": tube_id,
            "patientId": patient_id,
            "status": "received",
            "analyses": [
                {"code": "MIRNA", "name": "Endotest miRNA signature", "status": "done", "result": "negative"},
                {"code": "QC", "name": "Sample quality control", "status": "done", "result": "ok"},
            ],
        }


def _str_param(params: dict, name: str) -> str | None:
    """A string parameter, or None when absent; 400 when the JSON body gave another type."""
    value = params.get(name)
    if value is not None and not isinstance(value, str):
        raise HttpError(400, f"{name} must be a string")
    return value


def _fields_param(params: dict) -> dict:
    """The "fields" object of a PATCH or PUT body; 400 when missing or not an object."""
    fields = params.get("fields")
    if not isinstance(fields, dict):
        raise HttpError(400, 'a JSON body {"fields": {...}} is required')
    return fields


def _int_param(params: dict, name: str, default: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool):
        raise HttpError(400, f"{name} must be an integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise HttpError(400, f"{name} must be an integer") from None


# --------------------------------------------------------------------------
# The platform: servers, tokens, failure injection, counters
# --------------------------------------------------------------------------


class FakePlatform:
    """Three fake microservices (IAM, RC, GDD) sharing one state."""

    def __init__(
        self,
        *,
        latency=0.0,
        auth_latency=0.0,
        access_token_ttl=3600.0,
        refresh_token_ttl=86400.0,
        revoke_previous_access_token=False,
        inclusion_counts=(12, 0, 57, 130, 3, 41, 88, 25),
        users=None,
        organization_names=None,
    ):
        self.latency = latency
        self.auth_latency = auth_latency
        self.access_token_ttl = access_token_ttl
        self.refresh_token_ttl = refresh_token_ttl
        self.revoke_previous_access_token = revoke_previous_access_token
        self.users = dict(users) if users is not None else {DEMO_USER_NAME: DEMO_PASSWORD}
        self.user_ids = {name: f"user-{n + 1:04d}" for n, name in enumerate(self.users)}
        self.urls = {}
        self._data = _Dataset(inclusion_counts, organization_names)
        self._servers = {}
        self._threads = []
        # Set by stop(): handlers that trickle or stall an answer end when they see it.
        self._stopping = threading.Event()
        # One lock protects everything below: tokens, failures and counters.
        self._lock = threading.Lock()
        self._tokens = {}  # secret -> Token
        self._access_by_user = {}  # (service, user_id) -> [access secrets], for revocation
        self._failures = []
        self._calls = Counter()  # (service, path) -> n
        self._connections = Counter()  # service -> n
        self._open_sockets = set()  # closed on stop, so no thread keeps answering
        self._request_times = []
        self.refreshes = 0
        self.refresh_attempts = 0
        self.logins = 0

    # -- life cycle --------------------------------------------------------

    def start(self) -> FakePlatform:
        self._stopping.clear()
        for service in SERVICES:
            server = _Server(("127.0.0.1", 0), _Handler)
            server.platform = self
            server.service = service
            self._servers[service] = server
            self.urls[service] = f"http://127.0.0.1:{server.server_address[1]}"
            # A short poll interval makes stop() quick.
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"fake-{service}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        servers, self._servers = self._servers, {}
        # shutdown() waits up to a poll interval: shut the three down in parallel.
        stoppers = [threading.Thread(target=server.shutdown) for server in servers.values()]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        for server in servers.values():
            server.server_close()
        # Keep-alive connections outlive the listening socket: cut them too.
        with self._lock:
            open_sockets, self._open_sockets = self._open_sockets, set()
        for sock in open_sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join()
        self._threads = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def environment(self) -> dict:
        return {f"EB_{service}_BASE_URL": self.urls[service] for service in SERVICES}

    # -- test controls -----------------------------------------------------

    def fail_next(
        self,
        path,
        count=1,
        status=503,
        headers=None,
        drop=False,
        service=None,
        *,
        method=None,
        after_processing=False,
        body=None,
        content_type=None,
        trickle=None,
        stall=False,
    ) -> None:
        """Make the next `count` requests to `path` fail.

        `path` is the URL path without the query string; `service` limits the rule to
        one service, `method` (e.g. "PATCH") to one HTTP method. Rules apply in the
        order they were added: a request uses up one count of the first rule it matches.

        By default a failing request is counted as usual, gets no latency, and is
        checked before its token: it is answered `status` with `headers` and
        {"message": "injected failure"}, or, with drop=True, read and then left
        unanswered on a closed connection (the client sees the server disconnect).

        `body` (str or bytes) with `content_type` (default "application/json") replace
        {"message": "injected failure"}: an HTML proxy page, a truncated JSON...

        after_processing=True: the request is first served as usual (latency, token
        check, the change applied and counted), then its answer is lost: dropped
        (drop=True) or replaced by the injected one, whatever the real one was. The
        server acted but the client never learnt it.

        trickle=SECONDS: the request is served as usual and its real answer (status
        line and headers included) is sent one byte every SECONDS.
        stall=True: the request is served as usual, the status line and headers of its
        real answer are sent, then nothing more until the client leaves or the fake
        stops. After a trickle or a stall the connection is closed.
        Neither goes with drop, body or content_type, nor with each other.
        """
        failure = _new_failure(
            path, count, status, headers, drop, service, method=method, after_processing=after_processing,
            body=body, content_type=content_type, trickle=trickle, stall=stall,
        )
        if count <= 0:
            return
        with self._lock:
            self._failures.append(failure)

    def expire_access_tokens(self, service=None) -> None:
        """Expire every access token issued so far (IAM master tokens count as IAM's access tokens)."""
        self._expire({"access", "master"}, service)

    def expire_refresh_tokens(self, service=None) -> None:
        self._expire({"refresh"}, service)

    def _expire(self, kinds, service) -> None:
        now = time.monotonic()
        with self._lock:
            for token in self._tokens.values():
                if token.kind in kinds and service in (None, token.service):
                    token.expires_at = min(token.expires_at, now)

    def created_records(self) -> list[dict]:
        return self._data.created_records()

    def record_fields(self, patient_id) -> dict:
        """The current fields of a patient's record (a copy); KeyError for an unknown patient."""
        return self._data.record_fields(patient_id)

    def changes(self, patient_id) -> int:
        """The changes applied to a patient's record: PATCH, PUT and POST /api/records."""
        return self._data.changes()[patient_id]

    def total_changes(self) -> int:
        return sum(self._data.changes().values())

    # -- counters ----------------------------------------------------------

    def calls(self, path, service=None) -> int:
        with self._lock:
            if service is not None:
                return self._calls[(service, path)]
            return sum(n for (_, p), n in self._calls.items() if p == path)

    def connections(self, service=None) -> int:
        with self._lock:
            if service is not None:
                return self._connections[service]
            return sum(self._connections.values())

    def request_times(self) -> list[tuple[float, str, str]]:
        with self._lock:
            return list(self._request_times)

    def issued_secrets(self) -> set[str]:
        with self._lock:
            return set(self._tokens)

    def stats(self) -> dict:
        changes = self._data.changes()
        with self._lock:
            return {
                "calls": {f"{service} {path}": n for (service, path), n in sorted(self._calls.items())},
                "connections": {service: self._connections[service] for service in SERVICES},
                "refreshes": self.refreshes,
                "refresh_attempts": self.refresh_attempts,
                "logins": self.logins,
                "created_records": len(self._data.created_records()),
                "changes": dict(sorted(changes.items())),
                "total_changes": sum(changes.values()),
            }

    # -- called by the handlers ---------------------------------------------

    def _connection_opened(self, service, sock) -> None:
        with self._lock:
            self._connections[service] += 1
            self._open_sockets.add(sock)

    def _connection_closed(self, sock) -> None:
        with self._lock:
            self._open_sockets.discard(sock)

    def _record_request(self, service, method, path) -> _Failure | None:
        """Count a request; return the injected failure it must get, if any."""
        with self._lock:
            self._request_times.append((time.monotonic(), service, path))
            self._calls[(service, path)] += 1
            if path == REFRESH_PATH:
                self.refresh_attempts += 1
            for failure in self._failures:
                if failure.path == path and failure.service in (None, service) and failure.method in (None, method):
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        self._failures.remove(failure)
                    return failure
        return None

    def _check_access(self, service, secret) -> str:
        """Return the user id of a valid access token of `service`, else raise 401."""
        with self._lock:
            token = self._tokens.get(secret)
            if token is None or token.kind != "access" or token.service != service or not token.is_valid():
                raise HttpError(401, "invalid or expired token")
            return token.user_id

    def _issue(self, kind, service, user_id) -> str:
        """Issue a token; the caller holds the lock."""
        ttl = self.refresh_token_ttl if kind == "refresh" else self.access_token_ttl
        secret = secrets.token_urlsafe(24)
        self._tokens[secret] = Token(kind, service, user_id, time.monotonic() + ttl)
        return secret

    def _issue_pair(self, service, user_id) -> dict:
        """Issue an access (master for IAM) + refresh pair; the caller holds the lock."""
        issued = self._access_by_user.setdefault((service, user_id), [])
        if self.revoke_previous_access_token:
            for secret in issued:
                self._tokens[secret].revoked = True
        access = self._issue("master" if service == "IAM" else "access", service, user_id)
        issued.append(access)
        return {"access_token": access, "refresh_token": self._issue("refresh", service, user_id)}

    # Auth endpoints: (service, bearer secret or None, JSON body) -> (status, payload).

    def _login(self, service, bearer, body):
        username, password = body.get("username"), body.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            raise HttpError(400, "username and password are required")
        if self.users.get(username) != password:
            raise HttpError(401, "invalid user name or password")
        with self._lock:
            # setdefault: a test may add users after construction.
            user_id = self.user_ids.setdefault(username, f"user-{len(self.user_ids) + 1:04d}")
            # Login does not revoke earlier master tokens: only config-token and refresh do.
            master = self._issue("master", "IAM", user_id)
            self._access_by_user.setdefault(("IAM", user_id), []).append(master)
            # A refresh token as well, so that IAM's refresh endpoint can be exercised.
            refresh = self._issue("refresh", "IAM", user_id)
            self.logins += 1
        return 200, {"access_token": master, "refresh_token": refresh, "userId": user_id}

    def _config_token(self, service, bearer, body):
        with self._lock:
            master = self._tokens.get(bearer)
            if master is None or master.kind != "master" or not master.is_valid():
                raise HttpError(401, "invalid or expired master token")
            if body.get("userId") != master.user_id:
                raise HttpError(403, "userId does not match the master token")
            return 200, self._issue_pair(service, master.user_id)

    def _refresh(self, service, bearer, body):
        refresh_secret = body.get("refresh_token")
        if not isinstance(refresh_secret, str):
            raise HttpError(400, "refresh_token is required")
        with self._lock:
            # The access token may be expired or revoked, but must be one this service issued.
            access = self._tokens.get(bearer)
            if access is None or access.kind not in ("access", "master") or access.service != service:
                raise HttpError(401, "unknown access token")
            refresh = self._tokens.get(refresh_secret)
            if (
                refresh is None
                or refresh.kind != "refresh"
                or refresh.service != service
                or refresh.user_id != access.user_id
                or not refresh.is_valid()
            ):
                raise HttpError(401, "invalid, used or expired refresh token")
            refresh.used = True
            self.refreshes += 1
            return 200, self._issue_pair(service, access.user_id)


# --------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    platform: FakePlatform
    service: str

    def handle_error(self, request, client_address):
        # A client that hangs up mid-request is normal here (timeouts, benchmarks,
        # retry tests): no traceback for that. Anything else is a bug of the fake.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn(), which can stall on a
        # reverse DNS lookup (notably on Windows); we know the name already.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _Handler(BaseHTTPRequestHandler):
    """One instance per TCP connection; handles the requests of that connection."""

    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True
    # Buffered writes: status line, headers and body leave in one send().
    # BaseHTTPRequestHandler flushes after each request.
    wbufsize = 64 * 1024
    server: _Server

    def setup(self):
        super().setup()
        self.platform = self.server.platform
        self.service = self.server.service
        self.platform._connection_opened(self.service, self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            self.platform._connection_closed(self.connection)

    def log_message(self, format, *args):
        pass  # silence: a benchmark would otherwise spend its time printing

    def do_GET(self):
        self._handle()

    # Other methods are counted (and may get injected failures), then refused with a 405.
    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def send_error(self, code, message=None, explain=None):
        # The base class answers protocol errors with an HTML page; ours are JSON.
        message = message or self.responses.get(code, ("error",))[0]
        self._send(code, {"message": message}, {"Connection": "close"})

    def _send(self, status, payload, headers=None, content_type="application/json"):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)  # "Connection: close" also sets close_connection
        if self.close_connection and "Connection" not in (headers or {}):
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _handle(self):
        path, _, query = self.path.partition("?")
        try:
            body = self._read_body()
        except HttpError as error:
            # We could not find the end of the request: the connection is unusable.
            self._send(error.status, {"message": error.message}, {"Connection": "close"})
            return
        if path == STATS_PATH:
            self._send(200, self.platform.stats())
            return
        if path == FAIL_NEXT_PATH:
            self._add_failure(body)
            return
        failure = self.platform._record_request(self.service, self.command, path)
        if failure is not None and not failure.processes_request():
            self._fail(failure)
            return
        try:
            status, payload = self._route(path, query, body)
        except HttpError as error:
            status, payload = error.status, {"message": error.message}
        if failure is None:
            self._send(status, payload)
        elif failure.trickle is not None:
            self._send_slowly(self._rendered(status, payload), failure.trickle)
        elif failure.stall:
            self._send_headers_then_stall(self._rendered(status, payload))
        else:
            self._fail(failure)  # after_processing: the real answer is lost

    def _fail(self, failure: _Failure):
        if failure.drop:
            # Answer nothing; handle() then closes the socket, and the client
            # sees the server disconnect.
            self.close_connection = True
            return
        body = failure.body if failure.body is not None else {"message": "injected failure"}
        self._send(failure.status, body, failure.headers, failure.content_type or "application/json")

    def _add_failure(self, body):
        if self.command != "POST":
            self._send(405, {"message": f"POST a rule to {FAIL_NEXT_PATH}"})
            return
        try:
            options = _json_object(body)
            if options is None:
                raise HttpError(400, "a JSON object body is required")
            self.platform.fail_next(**fail_next_arguments(options))
        except HttpError as error:
            self._send(error.status, {"message": error.message})
        except ValueError as error:
            self._send(400, {"message": str(error)})
        else:
            self._send(200, {"message": "rule added"})

    def _rendered(self, status, payload) -> bytes:
        """The bytes _send() would write for this answer: status line, headers, body.
        The connection is closed after them: a trickle or a stall may end midway."""
        real_wfile, self.wfile = self.wfile, io.BytesIO()
        try:
            self._send(status, payload, {"Connection": "close"})
            return self.wfile.getvalue()
        finally:
            self.wfile = real_wfile

    def _send_slowly(self, data: bytes, interval: float):
        """Send `data` one byte every `interval` seconds, until done, the client
        leaves, or the fake stops."""
        for index in range(len(data)):
            if index and self.platform._stopping.wait(interval):
                return
            try:
                self.connection.sendall(data[index : index + 1])
            except OSError:  # the client left (BrokenPipe, ConnectionReset...) or stop() cut the socket
                return

    def _send_headers_then_stall(self, data: bytes):
        """Send the status line and headers of an answer, then hold the connection,
        silent, until the client leaves or the fake stops."""
        head = data[: data.index(b"\r\n\r\n") + 4]
        try:
            self.connection.sendall(head)
        except OSError:
            return
        # Short waits: stop() must not wait for us, and a client that gave up
        # must not leave a thread behind for long.
        while not self.platform._stopping.wait(0.05):
            if self._client_left():
                return

    def _client_left(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            # Readable with nothing to read: the client closed its end.
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # ValueError: the socket was closed
            return True

    def _route(self, path, query, body):
        endpoint = ROUTES[self.service].get(path)
        if endpoint is None and self.service == "GDD" and path.startswith(TUBE_PATH + "/"):
            endpoint = "tube"
        if endpoint is None:
            raise HttpError(404, f"no endpoint {path} on {self.service}")
        writes_record = endpoint == "record" and self.command in ("PATCH", "PUT")
        if self.command not in ("GET", "POST") and not writes_record:
            raise HttpError(405, f"only GET and POST are served, and PATCH and PUT on {RECORD_PATH}")
        if endpoint in AUTH_ENDPOINTS:
            _sleep(self.platform.auth_latency)
            body_object = _json_object(body)
            if body_object is None:
                raise HttpError(400, "a JSON object body is required")
            return getattr(self.platform, "_" + endpoint)(self.service, self._bearer(), body_object)
        _sleep(self.platform.latency)
        self.platform._check_access(self.service, self._bearer())
        if endpoint == "create_record" and self.command != "POST":
            raise HttpError(405, "POST a record to create it")
        params = {name: values[-1] for name, values in parse_qs(query, keep_blank_values=True).items()}
        params.update(_json_object(body) or {})  # the body wins over the query string
        if endpoint == "tube" and path != TUBE_PATH:
            params["tubeId"] = unquote(path.rsplit("/", 1)[1])
        if writes_record:
            endpoint = "update_record" if self.command == "PATCH" else "replace_record"
        return getattr(self.platform._data, endpoint)(params)

    def _bearer(self) -> str | None:
        scheme, _, secret = self.headers.get("Authorization", "").partition(" ")
        return secret.strip() if scheme.lower() == "bearer" else None

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            size = int(length)
        except ValueError:
            raise HttpError(400, "bad Content-Length") from None
        if size < 0:
            raise HttpError(400, "bad Content-Length")
        return self.rfile.read(size)

    def _read_chunked(self) -> bytes:
        chunks = []
        try:
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after the chunk
        except ValueError:
            raise HttpError(400, "bad chunked body") from None
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(chunks)


def _json_object(body: bytes) -> dict | None:
    """The JSON object in a request body: None if empty; 400 if not a JSON object."""
    if not body.strip():
        return None
    try:
        value = json.loads(body)
    except ValueError:
        raise HttpError(400, "body is not JSON") from None
    if not isinstance(value, dict):
        raise HttpError(400, "body is not a JSON object")
    return value


def _sleep(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _inclusion_counts_argument(text) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")] if text.strip() else []
    except ValueError:
        message = f"expected numbers separated by commas, such as 12,0,57, not {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if any(count < 0 for count in counts):
        raise argparse.ArgumentTypeError(f"inclusion counts cannot be negative: {text!r}")
    return counts


def _organization_names_argument(text) -> list[str]:
    return [name.strip() for name in text.split(";")] if text.strip() else []


def _user_argument(text) -> tuple[str, str]:
    name, equals, password = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=PASSWORD, not {text!r}")
    return name, password


def _fail_next_argument(spec) -> dict:
    try:
        return parse_fail_next_spec(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{spec!r}: {error}") from None


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Run a fake Endobest platform (IAM, RC, GDD) on 127.0.0.1.",
        epilog="The fake's options go before --run: what follows the script goes to the script.",
    )
    seconds = {"type": float, "metavar": "SECONDS"}
    parser.add_argument("--latency", default=0.0, help="seconds added to every data request", **seconds)
    parser.add_argument("--auth-latency", default=0.0, help="seconds added to login and token requests", **seconds)
    parser.add_argument("--access-token-ttl", default=3600.0, help="an access token's life (default: 3600)", **seconds)
    parser.add_argument(
        "--refresh-token-ttl", default=86400.0, help="a refresh token's life (default: 86400)", **seconds
    )
    parser.add_argument(
        "--revoke-previous-access-token",
        action="store_true",
        help="a new access token revokes the earlier ones of the same user and service",
    )
    parser.add_argument(
        "--inclusion-counts",
        type=_inclusion_counts_argument,
        metavar="N,N,...",
        help="one organization per number, with that many inclusions (default: 12,0,57,130,3,41,88,25)",
    )
    parser.add_argument(
        "--organization-names",
        type=_organization_names_argument,
        metavar="NAME;NAME;...",
        help='the organizations\' names, semicolon-separated (default: "Hospital 1", "Hospital 2"...)',
    )
    parser.add_argument(
        "--users",
        type=_user_argument,
        action="append",
        metavar="NAME=PASSWORD",
        help="an account (repeatable), instead of the demo one; the first one is given to a --run script",
    )
    parser.add_argument(
        "--fail-next",
        type=_fail_next_argument,
        action="append",
        default=[],
        metavar="SPEC",
        help=(
            "make the next requests to a path fail (repeatable). SPEC is PATH[,key=value...], keys: "
            + ", ".join(FAIL_NEXT_KEYS)
            + " (booleans: 1, 0, true, false). Example: "
            "/api/records/byPatient,method=PATCH,status=503,after_processing=1,count=2"
        ),
    )
    parser.add_argument(
        "--run",
        nargs=argparse.REMAINDER,
        metavar="SCRIPT [ARGS]",
        help="SCRIPT [ARGS...]: run SCRIPT, with ARGS, against the fake, then stop; the exit status is the script's",
    )
    args = parser.parse_args(argv)
    if args.run == []:
        parser.error("--run needs a SCRIPT")
    return args


def _credentials(fake: FakePlatform) -> dict:
    # The first account: the demo one unless --users gave others.
    name, password = next(iter(fake.users.items()), ("", ""))
    return {"EB_USER_NAME": name, "EB_PASSWORD": password}


def _serve_forever(fake: FakePlatform) -> int:
    print("Fake Endobest platform running")
    for service, url in fake.urls.items():
        print(f"  {service:<4}{url}")
    print("Point a script at it with these environment variables:")
    for name, value in fake.environment().items():
        print(f"{name}={value}")
    print("Credentials (the password of a fake, not a secret):")
    for name, value in _credentials(fake).items():
        print(f"{name}={value}")
    print("Press Ctrl+C to stop.", flush=True)
    try:
        while True:
            time.sleep(1)  # short sleeps: Ctrl+C is noticed promptly on every OS
    except KeyboardInterrupt:
        return 0


def _run_script(fake: FakePlatform, script: str, script_args=()) -> int:
    print(f"Fake Endobest platform running; running {script} against it", file=sys.stderr, flush=True)
    env = {**os.environ, **fake.environment(), **_credentials(fake)}
    child = subprocess.Popen([sys.executable, script, *script_args], env=env)
    while True:
        try:
            status = child.wait()
            break
        except KeyboardInterrupt:
            pass  # the child got the Ctrl+C too: let it decide how to end
    # A POSIX child killed by a signal has a negative status; report it as a shell would.
    return 128 - status if status < 0 else status


def main(argv=None) -> int:
    args = _parse_args(argv)
    knobs = {}
    if args.inclusion_counts is not None:
        knobs["inclusion_counts"] = args.inclusion_counts
    if args.users:
        knobs["users"] = dict(args.users)
    fake = FakePlatform(
        latency=args.latency,
        auth_latency=args.auth_latency,
        access_token_ttl=args.access_token_ttl,
        refresh_token_ttl=args.refresh_token_ttl,
        revoke_previous_access_token=args.revoke_previous_access_token,
        organization_names=args.organization_names,
        **knobs,
    )
    for rule in args.fail_next:
        fake.fail_next(**rule)
    with fake:
        if args.run:
            return _run_script(fake, args.run[0], args.run[1:])
        return _serve_forever(fake)


if __name__ == "__main__":
    sys.exit(main())
