"""The OpenAI backend's request loop for one image: retries with backoff, a shared request/token budget,
and the API key kept out of every message.

Retried: HTTP 408/409/429/5xx, timeouts, connection errors and replies that break the answer
protocol (exponential backoff with full jitter, or the server's Retry-After). HTTP 401/403/404 stop
the whole run (every later request would fail too); other 4xx fail the image at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from llava_brain.instructions.answers import MalformedAnswer, answer_to_conversation
from llava_brain.instructions.context import ImageContext
from llava_brain.instructions.prompts import Prompts, pick_question

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS architecture blog), or the server's Retry-After."""

    max_retries: int = 6
    base_delay: float = 1.0  # seconds; attempt k waits U(0, min(max_delay, base_delay * 2**k))
    max_delay: float = 60.0  # seconds; also caps a server's Retry-After

    def delay(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_delay)
        return (rng or random).uniform(0.0, min(self.max_delay, self.base_delay * 2**attempt))


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds a response asks the client to wait (`retry-after-ms`, OpenAI's, or `retry-after` in seconds)."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(float(value) * scale, 0.0)
        except ValueError:
            continue  # an HTTP date: fall back to our own backoff
    return None


RETRIED_STATUS = frozenset({408, 409, 429})  # plus every 5xx
# These mean every later request fails too (wrong key, no access, unknown model or URL): stop the run.
FATAL_STATUS = frozenset({401, 403, 404})


@dataclass
class ApiStats:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retry_reasons: Counter = field(default_factory=Counter)
    failures: list[tuple[int, str]] = field(default_factory=list)  # (nsd_id, last error)

    def cost(self, price_in_per_1k: float, price_out_per_1k: float) -> float:
        return self.prompt_tokens / 1000 * price_in_per_1k + self.completion_tokens / 1000 * price_out_per_1k


class Budget:
    """Caps on requests sent and tokens used, shared by the concurrent workers of one event loop.

    A request may start only while both caps hold; once one is reached the run stops cleanly:
    requests in flight finish (their tokens may overshoot the token cap) and are stored.
    """

    def __init__(self, stats: ApiStats, max_requests: int | None = None, max_tokens: int | None = None):
        self.stats, self.max_requests, self.max_tokens = stats, max_requests, max_tokens
        self.stop_reason: str | None = None
        self.fatal = False
        self._stopped = asyncio.Event()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def stop(self, reason: str, fatal: bool = False) -> None:
        if not self.stopped:
            self.stop_reason, self.fatal = reason, fatal
            self._stopped.set()

    def acquire(self) -> bool:
        """Count one request about to be sent; False (and stop) if a cap is reached."""
        if self.stopped:
            return False
        if self.max_requests is not None and self.stats.requests >= self.max_requests:
            self.stop(f"--max-requests {self.max_requests} reached")
            return False
        used = self.stats.prompt_tokens + self.stats.completion_tokens
        if self.max_tokens is not None and used >= self.max_tokens:
            self.stop(f"--max-tokens-budget {self.max_tokens} reached ({used} tokens used)")
            return False
        self.stats.requests += 1
        return True

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds`, or less if the run stops meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), timeout=seconds)


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "[redacted]") if secret else text


@dataclass(frozen=True)
class RequestSettings:
    model: str
    prompt_type: str
    timeout: float
    seed: int
    policy: RetryPolicy


async def request_conversation(
    client: Any, ctx: ImageContext, prompts: Prompts, settings: RequestSettings, budget: Budget, secret: str | None
) -> list[dict[str, str]] | None:
    """The conversation of one image from the API, retried per `settings.policy`.

    Returns None when the image is not done: it failed (recorded in `budget.stats.failures`) or the
    run stopped first. Retried: 408/409/429/5xx, timeouts, connection errors and replies that break
    the protocol; 401/403/404 stop the whole run; other 4xx fail the image at once.
    """
    import openai  # the client library is needed only by this backend

    stats, policy = budget.stats, settings.policy
    question = pick_question(prompts.detail_questions, ctx.nsd_id, settings.seed)
    messages = [{"role": "system", "content": prompts.system}, {"role": "user", "content": ctx.text()}]
    error = "not attempted"
    for attempt in range(policy.max_retries + 1):
        if not budget.acquire():
            return None
        if attempt:
            stats.retries += 1
        retry_after = None
        try:
            response = await client.chat.completions.create(
                model=settings.model, messages=messages, timeout=settings.timeout, seed=settings.seed
            )
        except openai.APIStatusError as err:
            status = err.status_code
            error = f"HTTP {status} {type(err).__name__}: {redact(str(err), secret)}"
            if status in FATAL_STATUS:
                budget.stop(error, fatal=True)
                return None
            if status not in RETRIED_STATUS and status < 500:
                stats.failures.append((ctx.nsd_id, error))
                return None
            stats.retry_reasons[f"http_{status}"] += 1
            retry_after = retry_after_seconds(err.response.headers)
        except openai.APITimeoutError:
            error = f"no reply within --timeout {settings.timeout} s"
            stats.retry_reasons["timeout"] += 1
        except openai.APIConnectionError as err:
            error = f"connection error: {redact(str(err.__cause__ or err), secret)}"
            stats.retry_reasons["connection"] += 1
        except openai.APIError as err:  # e.g. a body that is not a chat completion
            error = f"unusable response: {redact(str(err), secret)}"
            stats.retry_reasons["bad_response"] += 1
        else:
            usage = getattr(response, "usage", None)
            stats.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
            stats.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)
            try:
                content = response.choices[0].message.content
                if not isinstance(content, str):
                    raise MalformedAnswer(f"message content is {type(content).__name__}, not text")
                return answer_to_conversation(settings.prompt_type, content, question)
            except (MalformedAnswer, AttributeError, IndexError, TypeError) as err:
                error = f"malformed reply: {redact(str(err), secret)}"
                stats.retry_reasons["malformed"] += 1
        if attempt < policy.max_retries:
            log.debug("nsdId %d attempt %d: %s", ctx.nsd_id, attempt + 1, error)
            await budget.sleep(policy.delay(attempt, retry_after))
            if budget.stopped:
                return None
    stats.failures.append((ctx.nsd_id, error))
    return None
