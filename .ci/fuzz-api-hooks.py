# Schemathesis hooks for .ci/fuzz-api (loaded through SCHEMATHESIS_HOOKS).
#
# Without steering, every generated `{instance}` is a random string and almost
# every request stops at 404 "Instance not found". These hooks point a share of
# the generated cases at instances that exist, so the settings, publish and
# WebSocket code paths are reached too:
#   - fuzz-1       created by the script with websocketEnabled=true; the target
#                  of POST /api/events/websocket (which may disable it).
#   - fuzz-ws      created by the script, enabled, never touched by the fuzzer,
#                  so GET /ws/fuzz-ws reaches the upgrade-header check.
#   - fuzz-victim  the target of DELETE; re-created before every such request.
# The choice is a function of the generated case (CRC32), never of a random
# source, so Hypothesis replays and shrinks cases consistently.
#
# The token is steered the same way: most cases carry the TokenAccount (in the
# `token` header, as `Authorization: Bearer`, or as `?token=`), some carry the
# TokenInstance of fuzz-ws (own instance, another instance, account-only
# endpoints), an unknown token, or whatever Schemathesis generated (often
# nothing). GET /ws also gets an allowed or a refused `Origin` now and then
# (the script starts the server with EVENTGATE_WS_ALLOWED_ORIGINS=ORIGIN_OK).
#
# Besides Schemathesis's own checks, three checks of the contract that the
# document cannot express are registered here and enabled by name in the
# script: contract_error_envelope (every 4xx/5xx is the error envelope with a
# literal the contract gives for that status), contract_rate_limit_headers
# (X-RateLimit-* on /api/* and /ws/*, none elsewhere) and contract_auth_outcome
# (the status follows from the token the contract's precedence selects).
# filter_failure drops ignored_auth findings whose "generated" token is in fact
# a real one that Schemathesis picked up from a reply.
#
# Environment: EVENTGATE_FUZZ_URL (base URL), EVENTGATE_FUZZ_TOKEN (the
# TokenAccount), EVENTGATE_FUZZ_INSTANCE_TOKEN (fuzz-ws's TokenInstance),
# EVENTGATE_FUZZ_STATS (optional: a file that gets one line
# "METHOD /path/template STATUS error.message" per response, for the summary).
import json
import os
import zlib
from urllib.parse import parse_qs, unquote, urlsplit

import requests
import schemathesis
from requests.structures import CaseInsensitiveDict

BASE_URL = os.environ["EVENTGATE_FUZZ_URL"].rstrip("/")
TOKEN = os.environ["EVENTGATE_FUZZ_TOKEN"]
INSTANCE_TOKEN = os.environ["EVENTGATE_FUZZ_INSTANCE_TOKEN"]
UNKNOWN_TOKEN = "unknown-token-0123456789abcdef0123456789abcdef"
CUSTOM_TOKEN_PREFIX = "fuzz-custom-"
ORIGIN_OK = "https://app.example"
ORIGIN_BAD = "https://evil.example"
AUTH_NAMES = ("token", "authorization")
STATS = os.environ.get("EVENTGATE_FUZZ_STATS")
VALID_EVENTS = [
    "message.exchange",
    "message.status",
    "call.update",
    "group.flow",
    "instance.state",
    "label.update",
]


def _fingerprint(case) -> int:
    try:
        body = json.dumps(case.body, sort_keys=True, default=repr)
    except Exception:  # noqa: BLE001 - any unserialisable body still gets a stable value
        body = repr(case.body)
    text = "|".join(
        [case.method, case.path, repr(sorted((case.path_parameters or {}).items())),
         repr(sorted((case.query or {}).items())), body]
    )
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


def _coverage_target(case) -> str:
    """The parameter a coverage-phase case was built to test ("" otherwise); such a case stays as generated."""
    meta = getattr(case, "meta", None) or getattr(case, "_meta", None)
    data = getattr(getattr(meta, "phase", None), "data", None)
    return str(getattr(data, "parameter", None) or "").lower()


def _steer_token(case, fp: int) -> None:
    if not _needs_token(case) or _coverage_target(case) in AUTH_NAMES:
        return
    choice = fp % 20
    if choice >= 18:
        return  # as generated: no token, or a random one
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() not in AUTH_NAMES}
    query = {k: v for k, v in (case.query or {}).items() if k != "token"}
    if choice < 12:
        headers["token"] = TOKEN
    elif choice < 14:
        headers["Authorization"] = ("Bearer " if choice == 12 else "bearer ") + TOKEN
    elif choice == 14:
        query["token"] = TOKEN
    elif choice < 17:
        headers["token"] = INSTANCE_TOKEN
    else:
        headers["token"] = UNKNOWN_TOKEN
    case.headers = CaseInsensitiveDict(headers)
    case.query = query
    # The token is chosen here, not generated: the ignored_auth check then
    # probes the same request without a token and with an invalid one, instead
    # of taking a 2xx for "accepted a generated (invalid) token".
    case._has_explicit_auth = True


def _needs_token(case) -> bool:
    return case.path.startswith(("/api/", "/ws/"))


def _mark_custom_token(case) -> None:
    # A custom TokenInstance given to POST /api/instance/new becomes a valid
    # token. Hypothesis likes simple values ("000...0") and generates the same
    # ones as `?token=` elsewhere, which then authenticate for real and make
    # the ignored_auth check report a 2xx for "generated" auth. A fixed prefix
    # (same length, visible ASCII) keeps the two apart.
    body = case.body
    if case.path == "/api/instance/new" and isinstance(body, dict) and isinstance(body.get("token"), str):
        token = body["token"]
        if len(token) >= len(CUSTOM_TOKEN_PREFIX):
            case.body = {**body, "token": CUSTOM_TOKEN_PREFIX + token[len(CUSTOM_TOKEN_PREFIX):]}


@schemathesis.hook
def map_case(context, case):
    _mark_custom_token(case)
    _steer_token(case, _fingerprint(case) >> 20)
    if "instance" not in (case.path_parameters or {}) or _coverage_target(case) == "instance":
        return case
    fp = _fingerprint(case)
    # 3 of 4 cases go to a real instance, 1 of 4 keeps the generated name.
    if fp % 4 == 0:
        return case
    if case.path.startswith("/api/instance/delete/"):
        name = "fuzz-victim"
    elif case.path.startswith("/api/events/websocket/"):
        name = "fuzz-1"
    else:
        name = "fuzz-ws" if (fp >> 4) % 2 else "fuzz-1"
    case.path_parameters = {**case.path_parameters, "instance": name}
    if case.path == "/ws/{instance}" and (fp >> 8) % 2:
        # Half of these with a valid ?events= list, so the request gets past the
        # events check to the settings and upgrade checks.
        k = (fp >> 12) % (len(VALID_EVENTS) + 1)
        case.query = {**(case.query or {}), "events": ",".join(VALID_EVENTS[:k])}
    if case.path == "/ws/{instance}" and (fp >> 16) % 8 == 0:
        origin = ORIGIN_BAD if (fp >> 19) % 2 else ORIGIN_OK
        case.headers = CaseInsensitiveDict({**(case.headers or {}), "Origin": origin})
    return case


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.path.startswith("/api/instance/delete/") and case.path_parameters.get("instance") == "fuzz-victim":
        # 201, or 409 when the previous delete did not remove it: both are fine.
        requests.post(
            f"{BASE_URL}/api/instance/new",
            json={"name": "fuzz-victim", "websocketEnabled": True},
            headers={"token": TOKEN},
            timeout=10,
        )


def _effective_token(request) -> str:
    """The token the contract says the server uses: `token` header, else a Bearer
    `Authorization`, else `?token=`; the first that is present and non-empty."""
    token = (request.headers.get("token") or "").strip()
    if token:
        return token
    scheme, _, value = (request.headers.get("Authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for value in parse_qs(urlsplit(request.url).query, keep_blank_values=True).get("token", []):
        if value:
            return value
    return ""


@schemathesis.hook
def filter_failure(context, failure, case, response):
    # Schemathesis reuses values it saw in responses, and GET /api/instance/list
    # and POST /api/instance/new return real tokens: a "generated" token may be
    # a valid one, and then a 2xx is right. Such an ignored_auth finding stands
    # only when the token that was sent is really unknown to the server.
    if type(failure).__name__ != "IgnoredAuth" or "generated auth" not in str(getattr(failure, "message", "")):
        return True
    token = _effective_token(response.request)
    if not token:
        return True
    probe = requests.get(f"{BASE_URL}/api/instance/list", params={"token": token}, timeout=10)
    return probe.status_code != 200


def _error_message(response) -> str:
    try:
        body = json.loads(response.content)
    except Exception:  # noqa: BLE001 - not JSON: nothing to add
        return ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:160]
    return ""


@schemathesis.hook
def after_call(context, case, response):
    if STATS:
        with open(STATS, "a", encoding="utf-8") as f:
            f.write(f"{case.method} {case.path} {response.status_code} {_error_message(response)}\n")


# --- contract checks (enabled by name in .ci/fuzz-api) --------------------------
# openapi.yaml cannot say all of it: these hold the replies to the literals of
# the contract (shared/spec/events-api.md §2-§6).
ERROR_MESSAGES = {
    400: {"Invalid request body", "WebSocket upgrade expected"},
    401: {"Missing token in header, Authorization header, or query parameter", "Invalid token"},
    403: {"Instance token does not match this instance", "Origin not allowed"},
    404: {"Instance not found", "Not found", "WebSocket not configured for this instance", "Webhook not found"},
    405: {"Method not allowed"},
    409: {"Instance already exists", "Token already in use", "Maximum of 3 enabled webhooks per instance"},
    413: {"Payload too large"},
    429: {"Rate limit exceeded. Try again later."},
    500: {
        "Internal server error",
        "Failed to get instance",
        "Failed to get websocket configuration",
        "Failed to get webhook configuration",
    },
    503: {"Server is shutting down"},
}
WS_NOT_ENABLED = (
    "WebSocket is not enabled for this instance. Configure it first using POST /api/events/websocket/"
)
RATE_LIMITED_PREFIXES = ("/api/", "/ws/")
ACCOUNT_ONLY = ("/api/instance/new", "/api/instance/delete/", "/api/events/publish/")


def _request_path(response) -> str:
    return unquote(urlsplit(response.request.url).path)


@schemathesis.check
def contract_error_envelope(ctx, response, case):
    """Every 4xx/5xx is {"success":false,"error":{"message":<a literal of the contract>[,"details":str]}}
    as application/json, and its message is one the contract gives for that status."""
    if response.status_code < 400:
        return None
    path = _request_path(response)
    if path == "/readyz" and response.status_code == 503:
        return None  # the contract gives no literal for a not-ready /readyz
    content_type = (response.headers.get("content-type") or [""])[0]
    if isinstance(content_type, bytes):
        content_type = content_type.decode()
    assert content_type.split(";")[0].strip().lower() == "application/json", (
        f"error reply with Content-Type {content_type!r}, expected application/json"
    )
    try:
        body = json.loads(response.content)
    except ValueError as exc:
        raise AssertionError(f"error reply is not JSON: {response.content[:200]!r}") from exc
    assert isinstance(body, dict) and set(body) == {"success", "error"} and body["success"] is False, (
        f"error reply is not the error envelope: {body!r}"
    )
    error = body["error"]
    assert isinstance(error, dict) and isinstance(error.get("message"), str) and set(error) <= {
        "message",
        "details",
    } and isinstance(error.get("details", ""), str), f"error object is not {{message[, details]}}: {error!r}"
    message = error["message"]
    allowed = ERROR_MESSAGES.get(response.status_code, set())
    if response.status_code == 400 and message.startswith(WS_NOT_ENABLED):
        # "... /api/events/websocket/<name>" with the real instance name
        name = path[len("/ws/"):] if path.startswith("/ws/") else None
        assert name is not None and message == WS_NOT_ENABLED + name, (
            f"{message!r} does not name the instance of {path!r}"
        )
        return None
    assert message in allowed, (
        f"status {response.status_code} with error.message {message!r}; "
        f"the contract's literals for {response.status_code} are {sorted(allowed)}"
    )
    return None


@schemathesis.check
def contract_rate_limit_headers(ctx, response, case):
    """/api/* and /ws/* replies carry X-RateLimit-Limit/-Remaining/-Reset (integers, remaining >= 0);
    /healthz, /readyz, /metrics and /openapi.yaml carry none."""
    path = _request_path(response)
    names = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
    present = {name: response.headers.get(name) for name in names}
    if path.startswith(RATE_LIMITED_PREFIXES):
        for name, values in present.items():
            assert values, f"{response.status_code} reply to {path!r} has no {name} header"
            value = values[0]
            assert value.isdigit(), f"{name}: {value!r} is not a non-negative integer"
        if response.status_code == 429:
            retry = (response.headers.get("retry-after") or [""])[0]
            assert retry.isdigit() and int(retry) >= 1, f"429 with Retry-After {retry!r}"
    elif path in ("/healthz", "/readyz", "/metrics", "/openapi.yaml"):
        assert not any(present.values()), f"{path} carries X-RateLimit-* headers"
    return None


@schemathesis.check
def contract_auth_outcome(ctx, response, case):
    """The status follows from the token the contract says is used (§2): none -> 401 Missing token,
    unknown -> 401 Invalid token, fuzz-ws's TokenInstance -> 401 on account-only endpoints, 403 on
    another instance's path; the TokenAccount never gets 401/403 on an instance of its account."""
    path = _request_path(response)
    status, message = response.status_code, _message(response)
    if not path.startswith(RATE_LIMITED_PREFIXES) or status in (405, 429) or message == "Not found":
        return None  # no token needed, a wrong method, a rate limit, or no such route
    token = _effective_token(response.request)
    if not token:
        assert (status, message) == (401, ERROR_MESSAGES_401_MISSING), (
            f"no token sent (by the contract's order), got {status} {message!r}"
        )
        return None
    if token == TOKEN:
        assert status not in (401, 403) or message == "Origin not allowed", (
            f"the TokenAccount got {status} {message!r}"
        )
        return None
    if token == INSTANCE_TOKEN:
        segments = path.rstrip("/").split("/")
        # The instance is the last segment, or the one before a webhook
        # sub-resource (/api/events/webhook/<instance>/failed|retry).
        own = segments[-1] == "fuzz-ws" or (
            path.startswith("/api/events/webhook/") and segments[-1] in ("failed", "retry") and segments[-2] == "fuzz-ws"
        )
        if path.startswith(ACCOUNT_ONLY):
            assert (status, message) == (401, "Invalid token"), (
                f"a TokenInstance on an account-only endpoint got {status} {message!r}"
            )
        elif path == "/api/instance/list" or own:
            assert status not in (401, 403) or message == "Origin not allowed", (
                f"fuzz-ws's TokenInstance on its own instance got {status} {message!r}"
            )
        else:
            assert (status, message) == (403, "Instance token does not match this instance"), (
                f"fuzz-ws's TokenInstance on {path!r} got {status} {message!r}"
            )
        return None
    if status == 401 and message == "Invalid token":
        return None
    # Some other token: fine when it is real (Schemathesis reuses tokens it saw in replies).
    probe = requests.get(f"{BASE_URL}/api/instance/list", params={"token": token}, timeout=10)
    assert probe.status_code == 200, f"unknown token {token!r} got {status} {message!r}, expected 401 Invalid token"
    return None


ERROR_MESSAGES_401_MISSING = "Missing token in header, Authorization header, or query parameter"


def _message(response) -> str:
    try:
        body = json.loads(response.content)
        return body["error"]["message"] if isinstance(body, dict) and isinstance(body.get("error"), dict) else ""
    except (ValueError, KeyError, TypeError):
        return ""
