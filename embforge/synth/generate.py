"""`embforge synth generate`: E5 two-step generation with per-request resume.

Files, for --out DATA.jsonl:
  DATA.jsonl         training records (the trainer's input), one per accepted example
  DATA.raw.jsonl     the ledger: every response in full (audit), status and reason; drives resume
  DATA.report.json   counts, rejection reasons, cost; rewritten at the end of every run
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path

from embforge.common import atomic_write_json

from .client import ChatRequest, ChatResult, LLMClient, RetryPolicy, as_fatal, redact_url, require_api_key
from .config import SynthConfig
from .cost import DEFAULT_PRICES, Budget, CostTracker
from .ledger import Ledger
from .plan import brainstorm_requests, build_record, example_requests, tasks_from_brainstorms
from .runner import Runner
from .store import JsonlAppender, read_jsonl
from .tasks import TASK_TYPES
from .validate import Deduper, check_content, check_example, check_record


def sidecar(out: str | Path, suffix: str) -> Path:
    out = Path(out)
    stem = out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + suffix)


def resolve_api_key(cfg: SynthConfig) -> str | None:
    return os.environ.get(cfg.api_key_env) or cfg.api_key


def log(msg: str) -> None:
    print(f"[synth] {msg}", file=sys.stderr, flush=True)


class Generator:
    def __init__(self, cfg: SynthConfig, *, client: LLMClient | None = None):
        if not cfg.out:
            raise ValueError("out: an output path is required (--out FILE.jsonl)")
        if not cfg.model:
            raise ValueError("model: a model name is required (--model NAME)")
        self.cfg = cfg
        self.out = Path(cfg.out)
        if client is None:
            require_api_key(cfg.base_url, resolve_api_key(cfg), cfg.api_key_env)
            client = LLMClient(
                cfg.base_url, cfg.model, resolve_api_key(cfg), mode=cfg.structured_output,
                timeout=cfg.request_timeout, retry=RetryPolicy(cfg.max_retries, cfg.backoff_base, cfg.backoff_max,
                                                               cfg.max_retry_after, cfg.parse_attempts,
                                                               cfg.max_tokens_cap))
        self.client = client
        prices = {**DEFAULT_PRICES, **cfg.prices}
        self.tracker = CostTracker(prices, discount=cfg.batch.discount if cfg.batch.enabled else 1.0)
        self.budget = Budget(self.tracker, cfg.model, cfg.budget_usd)
        self.deduper = Deduper(cfg.validation.near_dup_threshold if cfg.validation.dedup else 1.0)
        self.run_counts: Counter = Counter()

    # -- opening and reconciling ------------------------------------------------------------------------
    def _open(self) -> None:
        self.ledger = Ledger(sidecar(self.out, ".raw.jsonl"), fsync=self.cfg.fsync)
        for model, usage, factor in self.ledger.usage:  # cumulative spend: the budget spans reruns
            self.tracker.add(model, usage, discount=factor)
        self.records = JsonlAppender(self.out, fsync=self.cfg.fsync)
        if self.ledger.torn_bytes or self.records.torn_bytes:
            log(f"repaired a torn last line left by an interrupted run (kept in *.torn)")
        in_out: set[str] = set()
        if self.out.exists():
            for lineno, rec in read_jsonl(self.out):
                rid = (rec.get("meta") or {}).get("request_id")
                if rid:
                    in_out.add(rid)
                if self.cfg.validation.dedup and "query" in rec and "positive" in rec:
                    self.deduper.check(rec)
        # A crash after the ledger line and before the output line: the ledger holds the record, restore it.
        restored = 0
        for rid, entry in self.ledger.latest.items():
            if entry["status"] == "accepted" and entry.get("record") and rid not in in_out:
                self.records.append(entry["record"])
                if self.cfg.validation.dedup:  # a restored record must block its duplicates like any other
                    self.deduper.check(entry["record"])
                restored += 1
        if restored:
            log(f"restored {restored} accepted record(s) missing from {self.out} after an interruption")
        self.resumed = sum(1 for e in self.ledger.latest.values() if e["status"] in ("accepted", "rejected"))

    # -- handling results ----------------------------------------------------------------------------
    def _entry(self, req: ChatRequest, res: ChatResult, status: str, reason: str | None, **extra) -> dict:
        return {"id": req.id, "kind": req.kind, "task_type": req.meta.get("task_type"), "status": status,
                "reason": reason, "model": self.cfg.model, "price_factor": self.tracker.discount,
                "meta": req.meta, "attempts": res.attempts, "mode": res.mode, "errors": res.errors,
                "finish_reason": res.finish_reason, "usage": res.usage, "content": res.content,
                "raw": res.raw, **extra}

    def _handle_brainstorm(self, req: ChatRequest, res: ChatResult) -> None:
        if res.status != "ok":
            self.ledger.append(self._entry(req, res, res.status, res.reason))
        else:
            tasks = tasks_from_brainstorms([res.parsed], 10 ** 6)
            status, reason = ("accepted", None) if tasks else ("rejected", "no_tasks")
            self.ledger.append(self._entry(req, res, status, reason, tasks=tasks))
            self.run_counts[f"brainstorm:{status}"] += 1
            return ("ok" if tasks else "rejected"), reason

    def _handle_example(self, req: ChatRequest, res: ChatResult) -> tuple[str, str | None]:
        """Validate and record one example response; returns its final (status, reason) for the progress bar."""
        if res.status != "ok":
            self.ledger.append(self._entry(req, res, res.status, res.reason))
            self.run_counts[f"example:{res.status}:{res.reason}"] += 1
            return res.status, res.reason
        task = TASK_TYPES[req.meta["task_type"]]
        reason = check_example(task.name, res.parsed, task.output_keys, task.long_fields, self.cfg.validation)
        record = None
        if reason is None:
            record = build_record(req, res.parsed, self.cfg.model, self.cfg.seed)
            reason = (check_record(record) or check_content(record, task.name, req.meta["params"],
                                                            self.cfg.validation)
                      or (self.deduper.check(record) if self.cfg.validation.dedup else None))
        if reason:
            self.ledger.append(self._entry(req, res, "rejected", reason, parsed=res.parsed))
            self.run_counts[f"example:rejected:{reason}"] += 1
            return "rejected", reason
        # Ledger first (it carries the record), output second: a crash in between is repaired on restart.
        self.ledger.append(self._entry(req, res, "accepted", None, parsed=res.parsed, record=record))
        self.records.append(record)
        self.run_counts["example:accepted"] += 1
        return "ok", None

    # -- the two phases --------------------------------------------------------------------------------
    async def _execute(self, requests: list[ChatRequest], handle, desc: str) -> None:
        todo = [r for r in requests if not self.ledger.finished(r.id)]
        if len(todo) < len(requests):
            log(f"{desc}: {len(requests) - len(todo)} of {len(requests)} request(s) already finished, skipping")
        if not todo or self.runner.stop_reason:
            return
        if self.cfg.batch.enabled:
            from .batch import BatchExecutor

            try:
                await BatchExecutor(self.client, self.cfg.batch, sidecar(self.out, f".batch-{desc}.json"),
                                    progress=self.cfg.progress).run(todo, handle, self.tracker)
            except Exception as e:  # the Batch API calls the SDK directly: same fatal rules as the online path
                fatal = as_fatal(e, self.cfg.base_url)
                if fatal is None:
                    raise
                self.runner.stop(fatal)
        else:
            await self.runner.run(todo, handle, total=len(todo), desc=desc)

    def _tasks_by_type(self, brainstorms: list[ChatRequest]) -> dict[str, list[str]]:
        parsed: dict[str, list] = {}
        for req in sorted(brainstorms, key=lambda r: r.meta["call"]):
            e = self.ledger.latest.get(req.id)
            if e and e["status"] == "accepted":
                parsed.setdefault(req.meta["task_type"], []).append(e.get("tasks") or [])
        return {t: tasks_from_brainstorms(p, self.cfg.tasks_per_type) for t, p in parsed.items()}

    async def run(self) -> dict:
        t0 = time.time()
        self._open()
        self.runner = Runner(self.client, self.budget, concurrency=self.cfg.concurrency, progress=self.cfg.progress)
        self.ledger.note({"type": "run_start", "model": self.cfg.model, "base_url": redact_url(self.cfg.base_url),
                          "seed": self.cfg.seed, "template_version": self.cfg.template_version})
        brainstorms, tasks, examples = brainstorm_requests(self.cfg), {}, []
        try:
            await self._execute(brainstorms, self._handle_brainstorm, "brainstorm")
            tasks = self._tasks_by_type(brainstorms)
            examples = example_requests(self.cfg, tasks)
            await self._execute(examples, self._handle_example, "examples")
        finally:
            await self.client.close()
            report = self.report(brainstorms, tasks, examples, time.time() - t0)
            self.ledger.note({"type": "run_end", "stop_reason": report["stop_reason"]})
            self.ledger.close()
            self.records.close()
        return report

    def _mode_used(self) -> str:
        """The negotiated output mode; a run that sent nothing reports the mode its predecessor ended with."""
        if sum(self.runner.counts.values()) or self.cfg.batch.enabled:
            return self.client.mode
        modes = [e.get("mode") for e in self.ledger.latest.values() if e.get("mode")]
        return modes[-1] if modes else self.client.mode

    def report(self, brainstorms, tasks, examples, elapsed: float) -> dict:
        led = self.ledger
        ex_ids = {r.id for r in examples}
        planned = Counter(r.meta["task_type"] for r in examples)
        accepted = Counter(e["task_type"] for rid, e in led.latest.items()
                           if rid in ex_ids and e["status"] == "accepted")
        shortfall = {t: self.cfg.tasks_per_type - len(tasks.get(t, [])) for t in self.cfg.task_types
                     if TASK_TYPES[t].two_step and len(tasks.get(t, [])) < self.cfg.tasks_per_type}
        pending = sum(1 for r in brainstorms + examples if not led.finished(r.id))
        stop_reason = self.runner.stop_reason
        if stop_reason is None:
            stop_reason = "incomplete" if pending else "complete" if sum(accepted.values()) else "nothing_accepted"
        report = {
            "out": str(self.out), "model": self.cfg.model, "base_url": redact_url(self.cfg.base_url),
            "structured_output": self._mode_used(), "seed": self.cfg.seed, "elapsed_s": round(elapsed, 2),
            "stop_reason": stop_reason,
            "fatal_error": self.runner.fatal, "resumed_finished_requests": self.resumed,
            "requests_this_run": dict(self.run_counts), "pending_requests": pending,
            "examples_planned": dict(planned), "examples_accepted": dict(accepted),
            "brainstorm_outcomes": dict(led.reasons("brainstorm")), "example_outcomes": dict(led.reasons("example")),
            "task_shortfall": shortfall, "cost": self.tracker.summary(), "budget_usd": self.cfg.budget_usd,
        }
        path = sidecar(self.out, ".report.json")
        atomic_write_json(path, report, indent=2, ensure_ascii=False)   # never a half-written report
        return report


def run_generate(cfg: SynthConfig, client: LLMClient | None = None) -> dict:
    return asyncio.run(Generator(cfg, client=client).run())
