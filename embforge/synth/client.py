"""One chat-completions call done right: structured output by capability, retries, truncation, refusals.

Transport faults (429, 5xx, 408/409, timeouts, dropped connections, unparseable response bodies) are retried
with exponential backoff and jitter; a Retry-After / retry-after-ms header overrides the backoff. Content
faults (finish_reason=length, text that holds no valid JSON) are re-asked a limited number of times, with a
doubled max_tokens after a truncation. Refusals and content filtering are final.

Structured output is negotiated once per client and shared: json_schema (OpenAI, vLLM) ->
json_object+schema (llama.cpp's grammar mode) -> json_object -> plain text with JSON extraction. A server
that rejects a mode with an error mentioning response_format drops us to the next one; any other error is
an ordinary fault and never changes the mode.
"""
from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from .jsonx import JSONExtractError, extract_json

MODES = ("json_schema", "json_object_schema", "json_object", "text")


class FatalAPIError(RuntimeError):
    """An error no retry can fix (bad key, unknown model): the whole run stops."""


class UnreachableError(FatalAPIError):
    """Every attempt of a request failed before a connection was made (DNS failure, connection refused, connect
    timeout): the endpoint is down or mistyped, so the rest of the plan would fail the same way."""


def redact_url(url: str) -> str:
    """Drop user:password@ and the query string, where keys sometimes hide, before a URL is logged."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"  # an IPv6 literal keeps its brackets
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: leave it out rather than fail while reporting an error
        port = None
    if port:
        netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def is_loopback(url: str) -> bool:
    """True for servers on this machine (127.0.0.0/8, ::1, localhost): no key needed, no proxy used."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always the loopback interface
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_api_key(base_url: str, api_key: str | None, env_name: str) -> None:
    """Refuse, before any request, a remote endpoint without a key: it would only answer 401 after retries.

    Loopback servers (llama.cpp, vLLM on localhost) usually run without a key, so they are let through.
    """
    from embforge.config import ConfigError

    if api_key or is_loopback(base_url):
        return
    raise ConfigError(f"no API key for {redact_url(base_url) or '(empty base_url)'}: set the environment variable "
                      f"{env_name} (or name another variable with --api-key-env / api_key_env); only loopback "
                      f"servers (127.0.0.0/8, ::1, localhost) are used without a key")


def _scrub(text: str, url: str) -> str:
    """Blank out the parts of `url` that may be secrets (user, password, query) wherever `text` repeats them."""
    parts = urlsplit(url)
    for secret in (parts.password, parts.username, parts.query):
        if secret:
            text = text.replace(secret, "***")
    return text


def _connect_failure(err: BaseException) -> str | None:
    """Why no connection was made (DNS failure, refused, connect timeout), or None if the fault came later.

    Matched by class name along the exception chain, not by import: the SDK wraps httpx's errors, and newer
    SDKs ship the same classes under another package name (httpx2 / httpcore2).
    """
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    connect = any(type(c).__name__ in ("ConnectError", "ConnectTimeout")
                  and type(c).__module__.startswith(("httpx", "httpcore")) for c in chain)
    if not connect and not any(isinstance(c, (socket.gaierror, ConnectionRefusedError)) for c in chain):
        return None
    os_errors = [c for c in chain if isinstance(c, OSError) and str(c)]  # the resolver's or kernel's own words
    return str(os_errors[-1] if os_errors else chain[-1])[:300] or type(chain[-1]).__name__


def _unreachable(base_url: str, why: str, attempts: int) -> UnreachableError:
    return UnreachableError(f"cannot reach {redact_url(base_url)}: {_scrub(why, base_url)} ({attempts} attempt(s)); "
                            f"check --base-url and the network, then rerun (finished work is kept)")


def as_fatal(err: Exception, base_url: str) -> FatalAPIError | None:
    """The run-stopping error `err` stands for (bad key, unknown model or route, no connection), else None."""
    import openai

    if isinstance(err, FatalAPIError):
        return err
    if isinstance(err, (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)):
        return FatalAPIError(f"{type(err).__name__} from {redact_url(base_url)}: {_scrub(err.message, base_url)}")
    why = _connect_failure(err) if isinstance(err, openai.APIConnectionError) else None
    return _unreachable(base_url, why, 1) if why else None


@dataclass
class ChatRequest:
    id: str
    kind: str
    messages: list[dict]
    schema: dict | None = None
    max_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    accept: Callable[[Any], bool] | None = None  # extra check on the parsed JSON (e.g. required keys)
    meta: dict = field(default_factory=dict)

    def body(self, model: str, mode: str) -> dict:
        body: dict[str, Any] = {"model": model, "messages": self.messages, "max_tokens": self.max_tokens,
                                "temperature": self.temperature, "top_p": self.top_p}
        if self.logprobs:
            body["logprobs"] = True
            if self.top_logprobs:
                body["top_logprobs"] = self.top_logprobs
        if self.schema is not None and mode != "text":
            if mode == "json_schema":
                body["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": f"embforge_{self.kind}", "schema": self.schema, "strict": True}}
            elif mode == "json_object_schema":
                body["response_format"] = {"type": "json_object", "schema": self.schema}
            else:
                body["response_format"] = {"type": "json_object"}
        return body


@dataclass
class ChatResult:
    status: str  # "ok" | "rejected" (final, never retried) | "failed" (transient; retried by the next run)
    reason: str | None = None
    content: str | None = None
    parsed: Any = None
    finish_reason: str | None = None
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    attempts: int = 0
    mode: str | None = None
    raw: dict | None = None
    errors: list[str] = field(default_factory=list)


def required_keys_accept(schema: dict | None) -> Callable[[Any], bool]:
    keys = list((schema or {}).get("required", []))
    return lambda v: isinstance(v, dict) and all(k in v for k in keys)


def parse_retry_after(headers) -> float | None:
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            pass
        parsed = email.utils.parsedate_to_datetime(value) if name == "retry-after" else None
        if parsed is not None:
            return max(0.0, parsed.timestamp() - time.time())
    return None


@dataclass
class RetryPolicy:
    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_retry_after: float = 300.0
    parse_attempts: int = 2
    max_tokens_cap: int = 4096

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        base = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return base * (0.5 + random.random() / 2)  # jitter so a crowd of workers does not retry in lockstep


class LLMClient:
    def __init__(self, base_url: str, model: str, api_key: str | None, *, mode: str = "auto",
                 timeout: float = 120.0, retry: RetryPolicy | None = None, sdk_client=None):
        self.base_url, self.model, self.timeout = base_url, model, timeout
        self.retry = retry or RetryPolicy()
        if mode not in ("auto",) + MODES:
            raise ValueError(f"structured_output: {mode!r} is not one of {('auto',) + MODES}")
        self.mode = "json_schema" if mode == "auto" else mode
        self.auto = mode == "auto"
        self.logprobs_ok = True
        if sdk_client is None:
            import openai

            kwargs = {}
            if is_loopback(base_url):  # never route loopback traffic through an environment proxy
                kwargs["http_client"] = openai.DefaultAsyncHttpxClient(trust_env=False)
            # The SDK's own retries are off: ours honour Retry-After, cap the wait and are recorded.
            sdk_client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "not-needed", max_retries=0,
                                            timeout=timeout, **kwargs)
        self.sdk = sdk_client

    async def close(self) -> None:
        close = getattr(self.sdk, "close", None)
        if close:
            await close()

    def _format_rejected(self, err: Exception, mode: str) -> bool:
        """True if `err` says the server does not support response_format `mode` (and we can step down)."""
        text = str(err).lower()
        return self.auto and mode != "text" and ("response_format" in text or "json_schema" in text
                                                 or "schema" in text and "json" in text)

    def _step_down(self, mode: str) -> None:
        if self.mode == mode:  # compare-and-set: concurrent failures of the same mode step down once
            self.mode = MODES[MODES.index(mode) + 1]

    async def complete(self, req: ChatRequest, *, on_usage: Callable[[dict], None] | None = None,
                       allow_more: Callable[[int], bool] | None = None) -> ChatResult:
        import openai

        res = ChatResult(status="failed")
        transient = content_tries = connect_failures = 0
        max_tokens = req.max_tokens
        accept = req.accept or (required_keys_accept(req.schema) if req.schema else None)
        while True:
            mode = self.mode
            body = ChatRequest(**{**req.__dict__, "max_tokens": max_tokens,
                                  "logprobs": req.logprobs and self.logprobs_ok}).body(self.model, mode)
            res.attempts += 1
            res.mode = mode
            try:
                resp = await self.sdk.chat.completions.create(**body, timeout=self.timeout)
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                raise as_fatal(e, self.base_url) from None
            except openai.APIStatusError as e:
                status = e.status_code
                if self._format_rejected(e, mode):
                    self._step_down(mode)
                    res.errors.append(f"mode {mode} rejected (HTTP {status}); trying {self.mode}")
                    continue
                if req.logprobs and self.logprobs_ok and "logprobs" in str(e).lower() and status < 500:
                    self.logprobs_ok = False
                    res.errors.append(f"logprobs rejected (HTTP {status}); continuing without")
                    continue
                res.errors.append(f"HTTP {status}")
                if status in (408, 409, 429) or status >= 500:
                    transient += 1
                    if transient > self.retry.max_retries:
                        res.status, res.reason = "failed", f"http_{status}"
                        return res
                    await asyncio.sleep(self.retry.delay(transient, parse_retry_after(e.response.headers)))
                    continue
                res.status, res.reason = "failed", f"http_{status}"  # other 4xx: bad request; left for a later run, not retried now
                return res
            except (openai.APITimeoutError, openai.APIConnectionError, openai.APIResponseValidationError,
                    json.JSONDecodeError) as e:
                name = {openai.APITimeoutError: "timeout", openai.APIConnectionError: "connection"}.get(
                    type(e), "bad_response_body")
                why = _connect_failure(e)
                why = why and _scrub(why, self.base_url)
                res.errors.append(f"{name}: {why}" if why else name)
                transient += 1
                connect_failures += why is not None
                if transient > self.retry.max_retries:
                    if connect_failures == transient:  # never got through once: no point sending the rest
                        raise _unreachable(self.base_url, why, res.attempts) from None
                    res.status, res.reason = "failed", name
                    return res
                await asyncio.sleep(self.retry.delay(transient, None))
                continue

            raw = resp.model_dump(exclude_none=True) if hasattr(resp, "model_dump") else dict(resp)
            usage = raw.get("usage") or {}
            if on_usage:
                on_usage(usage)
            interpret(raw, req, res, accept)
            if res.reason == "no_choices":
                transient += 1
                if transient > self.retry.max_retries:
                    return res
                continue
            if res.reason in ("truncated", "invalid_json"):
                content_tries += 1
                bigger = min(self.retry.max_tokens_cap, max_tokens * 2) if res.reason == "truncated" else max_tokens
                if content_tries < self.retry.parse_attempts and (allow_more is None or allow_more(bigger)):
                    res.errors.append(f"{res.reason} at max_tokens={max_tokens}; asking again")
                    max_tokens = bigger
                    continue
            return res


def interpret(raw: dict, req: ChatRequest, res: ChatResult, accept: Callable[[Any], bool] | None = None) -> ChatResult:
    """Fill `res` from one chat-completion body (shared by the online path and Batch API results)."""
    if accept is None:
        accept = req.accept or (required_keys_accept(req.schema) if req.schema else None)
    res.raw = raw
    for k in ("prompt_tokens", "completion_tokens"):
        res.usage[k] += int((raw.get("usage") or {}).get(k) or 0)
    res.parsed = None
    choices = raw.get("choices") or []
    if not choices:
        res.status, res.reason = "failed", "no_choices"
        return res
    choice = choices[0]
    msg = choice.get("message") or {}
    res.content, res.finish_reason = msg.get("content"), choice.get("finish_reason")
    if msg.get("refusal"):
        res.status, res.reason = "rejected", "refusal"
    elif res.finish_reason == "content_filter":
        res.status, res.reason = "rejected", "content_filter"
    elif res.finish_reason == "length":
        res.status, res.reason = "rejected", "truncated"
    elif accept is None:
        res.status, res.reason = "ok", None
    else:
        try:
            res.parsed = extract_json(res.content, accept)
            res.status, res.reason = "ok", None
        except JSONExtractError as e:
            res.status, res.reason = "rejected", "invalid_json"
            res.errors.append(str(e))
    return res
