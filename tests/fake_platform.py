"""A fake Endobest clinical research platform, for tests and for a first run.

It serves the three microservices a script talks to, each over real HTTP/1.1
on its own free port of 127.0.0.1:

* IAM: login (user name + password -> master token)
* RC:  research data (organizations, inclusions, records, surveys)
* GDD: lab requests (by tube id)

The data are deterministic and built from ``inclusion_counts``; nothing is
persisted. Every answer is JSON.

In a test::

    from fake_platform import FakePlatform, DEMO_USER_NAME, DEMO_PASSWORD

    with FakePlatform(latency=0.01) as fake:
        env = fake.environment()          # EB_IAM_BASE_URL, EB_RC_BASE_URL, ...
        fake.fail_next("/api/inclusions/search", status=429, headers={"Retry-After": "1"})
        ...                               # run the code under test against env
        assert fake.calls("/api/inclusions/search", service="RC") == 2

Knobs (``latency``, ``auth_latency``, token TTLs, ``revoke_previous_access_token``)
are plain attributes, read on every request, so a test may change them at any time.

From a shell::

    python tests/fake_platform.py                      # prints the EB_... lines to use
    python tests/fake_platform.py --run my_script.py   # runs the script against the fake

A process that started the fake as a child can read its counters with
``GET <any service URL>/_fake/stats`` (no token needed).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
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
        "/api/records/byPatient": "record",
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
    path: str
    service: str | None
    remaining: int
    status: int
    headers: dict
    drop: bool


# --------------------------------------------------------------------------
# Research data
# --------------------------------------------------------------------------


class _Dataset:
    """The deterministic RC/GDD data, plus the records created by POST /api/records."""

    def __init__(self, inclusion_counts):
        self._organizations = []  # {"id", "name", "city"}
        self._inclusions_by_org = {}  # org id -> list of inclusion dicts
        self._patients = {}  # patient id -> (org index, inclusion index)
        for i, count in enumerate(inclusion_counts):
            org_id = f"org-{i + 1:03d}"
            self._organizations.append({"id": org_id, "name": f"Hospital {i + 1}", "city": CITIES[i % len(CITIES)]})
            self._inclusions_by_org[org_id] = [self._inclusion(i, j) for j in range(count)]
            for j in range(count):
                self._patients[f"pat-{i + 1:03d}-{j + 1:04d}"] = (i, j)
        self._all_inclusions = [inc for incs in self._inclusions_by_org.values() for inc in incs]
        # Precomputed answers: the hot endpoints must be cheap (see the capacity check).
        self._organizations_json = json.dumps(self._organizations).encode()
        self._statistics_json = json.dumps(self._statistics(self._organizations)).encode()
        self._records = []
        self._records_lock = threading.Lock()

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
        patient_id = _str_param(params, "patientId")
        if not patient_id:
            raise HttpError(400, "patientId is required")
        if patient_id not in self._patients:
            raise HttpError(404, f"unknown patient {patient_id!r}")
        return self._patients[patient_id]

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
        i, j = self._patient(params)
        fields = {
            "birthYear": 1960 + (7 * i + 13 * j) % 40,
            "inclusionDate": f"2023-{1 + j % 12:02d}-{1 + (i + j) % 28:02d}",
            "painScore": (3 * i + 5 * j) % 11,
            "dysmenorrhea": j % 3 != 0,
            "bmi": round(19.0 + (i + 2 * j) % 12 * 0.7, 1),
        }
        return 200, {"patientId": params["patientId"], "organizationId": f"org-{i + 1:03d}", "fields": fields}

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
        self._patient(params)
        fields = params.get("fields") or {}
        if not isinstance(fields, dict):
            raise HttpError(400, "fields must be an object")
        with self._records_lock:
            record = {"id": f"rec-{len(self._records) + 1}", "patientId": params["patientId"], "fields": fields}
            self._records.append(record)
        return 201, record

    def created_records(self) -> list[dict]:
        with self._records_lock:
            return list(self._records)

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
    ):
        self.latency = latency
        self.auth_latency = auth_latency
        self.access_token_ttl = access_token_ttl
        self.refresh_token_ttl = refresh_token_ttl
        self.revoke_previous_access_token = revoke_previous_access_token
        self.users = dict(users) if users is not None else {DEMO_USER_NAME: DEMO_PASSWORD}
        self.user_ids = {name: f"user-{n + 1:04d}" for n, name in enumerate(self.users)}
        self.urls = {}
        self._data = _Dataset(inclusion_counts)
        self._servers = {}
        self._threads = []
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

    def fail_next(self, path, count=1, status=503, headers=None, drop=False, service=None) -> None:
        """Make the next `count` requests to `path` fail.

        `path` is the URL path without the query string; `service` limits the rule to
        one service. A failing request is counted as usual, gets no latency, and is
        checked before its token: it is answered `status` with `headers` and
        {"message": "injected failure"}, or, with drop=True, read and then left
        unanswered on a closed connection (the client sees the server disconnect).
        """
        if count <= 0:
            return
        with self._lock:
            self._failures.append(_Failure(path, service, count, status, dict(headers or {}), drop))

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
        with self._lock:
            return {
                "calls": {f"{service} {path}": n for (service, path), n in sorted(self._calls.items())},
                "connections": {service: self._connections[service] for service in SERVICES},
                "refreshes": self.refreshes,
                "refresh_attempts": self.refresh_attempts,
                "logins": self.logins,
                "created_records": len(self._data.created_records()),
            }

    # -- called by the handlers ---------------------------------------------

    def _connection_opened(self, service, sock) -> None:
        with self._lock:
            self._connections[service] += 1
            self._open_sockets.add(sock)

    def _connection_closed(self, sock) -> None:
        with self._lock:
            self._open_sockets.discard(sock)

    def _record_request(self, service, path) -> _Failure | None:
        """Count a request; return the injected failure it must get, if any."""
        with self._lock:
            self._request_times.append((time.monotonic(), service, path))
            self._calls[(service, path)] += 1
            if path == REFRESH_PATH:
                self.refresh_attempts += 1
            for failure in self._failures:
                if failure.path == path and failure.service in (None, service):
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

    def _send(self, status, payload, headers=None):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
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
        failure = self.platform._record_request(self.service, path)
        if failure is not None:
            self._fail(failure)
            return
        try:
            status, payload = self._route(path, query, body)
        except HttpError as error:
            status, payload = error.status, {"message": error.message}
        self._send(status, payload)

    def _fail(self, failure: _Failure):
        if failure.drop:
            # Answer nothing; handle() then closes the socket, and the client
            # sees the server disconnect.
            self.close_connection = True
            return
        self._send(failure.status, {"message": "injected failure"}, failure.headers)

    def _route(self, path, query, body):
        endpoint = ROUTES[self.service].get(path)
        if endpoint is None and self.service == "GDD" and path.startswith(TUBE_PATH + "/"):
            endpoint = "tube"
        if endpoint is None:
            raise HttpError(404, f"no endpoint {path} on {self.service}")
        if self.command not in ("GET", "POST"):
            raise HttpError(405, "only GET and POST are served")
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


def _parse_args(argv):
    parser = argparse.ArgumentParser(description="Run a fake Endobest platform (IAM, RC, GDD) on 127.0.0.1.")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every data request")
    parser.add_argument("--auth-latency", type=float, default=0.0, help="seconds added to login and token requests")
    parser.add_argument("--access-token-ttl", type=float, default=3600.0)
    parser.add_argument("--refresh-token-ttl", type=float, default=86400.0)
    parser.add_argument(
        "--revoke-previous-access-token",
        action="store_true",
        help="a new access token revokes the earlier ones of the same user and service",
    )
    parser.add_argument("--run", metavar="SCRIPT", help="run SCRIPT against the fake, then stop")
    return parser.parse_args(argv)


def _credentials() -> dict:
    return {"EB_USER_NAME": DEMO_USER_NAME, "EB_PASSWORD": DEMO_PASSWORD}


def _serve_forever(fake: FakePlatform) -> int:
    print("Fake Endobest platform running")
    for service, url in fake.urls.items():
        print(f"  {service:<4}{url}")
    print("Point a script at it with these environment variables:")
    for name, value in fake.environment().items():
        print(f"{name}={value}")
    print("Demo credentials (the password of a fake, not a secret):")
    for name, value in _credentials().items():
        print(f"{name}={value}")
    print("Press Ctrl+C to stop.", flush=True)
    try:
        while True:
            time.sleep(1)  # short sleeps: Ctrl+C is noticed promptly on every OS
    except KeyboardInterrupt:
        return 0


def _run_script(fake: FakePlatform, script: str) -> int:
    print(f"Fake Endobest platform running; running {script} against it", file=sys.stderr, flush=True)
    env = {**os.environ, **fake.environment(), **_credentials()}
    child = subprocess.Popen([sys.executable, script], env=env)
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
    fake = FakePlatform(
        latency=args.latency,
        auth_latency=args.auth_latency,
        access_token_ttl=args.access_token_ttl,
        refresh_token_ttl=args.refresh_token_ttl,
        revoke_previous_access_token=args.revoke_previous_access_token,
    )
    with fake:
        if args.run:
            return _run_script(fake, args.run)
        return _serve_forever(fake)


if __name__ == "__main__":
    sys.exit(main())
