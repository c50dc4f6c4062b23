"""Run many chat requests with bounded concurrency, a budget, a progress bar and a clean stop.

Workers pull from one iterator (not one coroutine per request), so memory stays flat for 500k requests.
Stopping (budget reached, fatal API error, endpoint unreachable) only stops dispatch: requests already in
flight finish and are recorded, because they are paid for.
"""
from __future__ import annotations

import asyncio
import sys
from collections import Counter
from typing import Callable, Iterable

from .client import ChatRequest, ChatResult, FatalAPIError, LLMClient, UnreachableError
from .cost import Budget


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, unit="req", dynamic_ncols=True)

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Runner:
    def __init__(self, client: LLMClient, budget: Budget, *, concurrency: int, progress: bool = True):
        self.client, self.budget, self.concurrency, self.progress = client, budget, concurrency, progress
        self.stop_reason: str | None = None
        self.fatal: str | None = None
        self.counts = {"ok": 0, "rejected": 0, "failed": 0}

    def stop(self, err: FatalAPIError) -> None:
        """Stop dispatching: every later request would meet the same error."""
        if self.stop_reason not in ("fatal", "unreachable"):  # the first error is the one to report
            self.stop_reason = "unreachable" if isinstance(err, UnreachableError) else "fatal"
            self.fatal = str(err)

    def _charge(self, usage: dict) -> None:
        self.budget.tracker.add(self.client.model, usage)

    async def run(self, requests: Iterable[ChatRequest], handle: Callable[[ChatRequest, ChatResult], object],
                  *, total: int, desc: str) -> None:
        """`handle` may return the request's final (status, reason) after validation, e.g. ("rejected",
        "placeholder:query") for a response the API delivered fine: the bar counts those, so its ok / rejected
        numbers (and the reasons) are the report's."""
        it = iter(requests)
        bar = Progress(total, desc, self.progress)
        shown = {"ok": 0, "rejected": 0, "failed": 0}     # this phase's outcomes, on the bar
        reasons: Counter = Counter()

        async def worker():
            while self.stop_reason is None:
                try:
                    req = next(it)
                except StopIteration:
                    return
                prompt_chars = sum(len(m.get("content") or "") for m in req.messages)
                reserve = self.budget.worst_case(prompt_chars, req.max_tokens)
                if not self.budget.try_reserve(reserve):
                    self.stop_reason = "budget"
                    return
                extra: list[float] = []

                def allow_more(max_tokens: int) -> bool:
                    # A re-ask is a new charge: it must fit in the budget like a fresh request.
                    amount = self.budget.worst_case(prompt_chars, max_tokens)
                    if self.budget.try_reserve(amount):
                        extra.append(amount)
                        return True
                    return False

                try:
                    res = await self.client.complete(req, on_usage=self._charge, allow_more=allow_more)
                except FatalAPIError as e:
                    self.stop(e)
                    return
                finally:
                    self.budget.release(reserve + sum(extra))
                self.counts[res.status] += 1
                outcome = handle(req, res)
                status, reason = outcome if isinstance(outcome, tuple) else (res.status, res.reason)
                shown[status] = shown.get(status, 0) + 1
                if status != "ok" and reason:
                    reasons[reason] += 1
                why = {"why": ", ".join(f"{r} {n}" for r, n in reasons.most_common(3))} if reasons else {}
                bar.update(1, cost=f"${self.budget.tracker.total_usd:.4f}", **shown, **why)

        try:
            await asyncio.gather(*(worker() for _ in range(max(1, self.concurrency))))
        finally:
            bar.close()
