"""`embforge synth relabel`: Gecko-style relabelling of (instruction, query) pairs.

For each record: retrieve the top-k passages of a corpus with an embedder (the seed positive is always added
as a candidate, so we can tell whether it kept its place), have the LLM grade every (query, passage) pair with
one or more grading prompts, rank the candidates per grader, fuse the rankings by reciprocal rank, and write
positive = fused top and hard negatives = the configured fused ranks. Grades go through the same durable
ledger as generation, so an interrupted relabel resumes without paying for a grade twice.
"""
from __future__ import annotations

import asyncio
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from embforge.common import atomic_write_json
from embforge.data import records

from .client import ChatRequest, ChatResult, LLMClient, RetryPolicy, redact_url, require_api_key
from .cost import DEFAULT_PRICES, Budget, CostTracker
from .config import LocalConfig
from .generate import log, sidecar
from .ledger import Ledger
from .plan import request_id
from .runner import Runner
from .store import JsonlAppender, StoreError, read_jsonl
from .templates import load_template

SCORE_SCHEMA = {"type": "object", "properties": {"score": {"type": "integer", "enum": [0, 1, 2, 3]}},
                "required": ["score"], "additionalProperties": False}
GRADERS = ("relevance", "query_likelihood")


@dataclass
class RelabelConfig:
    base_url: str = "https://api.openai.com/v1"
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    api_key: str | None = None
    input: str = ""
    corpus: str | None = None
    out: str = ""
    embedder: str = "minilm"
    top_k: int = 20
    graders: list[str] = field(default_factory=lambda: list(GRADERS))
    rrf_k: int = 60
    negative_ranks: list[int] = field(default_factory=lambda: [-1])  # Gecko: the lowest-ranked neighbour
    use_logprobs: bool = True
    max_passage_chars: int = 2000
    embed_batch_size: int = 64
    concurrency: int = 8
    budget_usd: float | None = None
    structured_output: str = "auto"
    max_tokens: int = 16
    request_timeout: float = 60.0
    max_retries: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_retry_after: float = 300.0
    parse_attempts: int = 2
    template_version: str = "v1"
    template_dir: str | None = None
    prices: dict[str, dict[str, float]] = field(default_factory=dict)
    local: LocalConfig = field(default_factory=LocalConfig)
    progress: bool = True
    fsync: bool = True

    def validate(self) -> None:
        from embforge.config import ConfigError

        bad = [g for g in self.graders if g not in GRADERS]
        if bad or not self.graders:
            raise ConfigError(f"graders: {bad or self.graders} not valid (choose from {', '.join(GRADERS)})")
        if self.top_k < 2:
            raise ConfigError(f"top_k: must be >= 2, got {self.top_k}")
        if any(r == 0 for r in self.negative_ranks):
            raise ConfigError("negative_ranks: ranks are 1-based (1 = best, -1 = lowest); 0 is not a rank")


def score_from_logprobs(raw: dict | None) -> float | None:
    """Expected grade under the model's distribution over the score token (None if no logprobs came back)."""
    try:
        tokens = raw["choices"][0]["logprobs"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    for tok in tokens or []:
        if tok.get("token", "").strip() in ("0", "1", "2", "3"):
            probs: dict[int, float] = {}
            for alt in tok.get("top_logprobs") or [tok]:
                t = alt.get("token", "").strip()
                if t in ("0", "1", "2", "3"):
                    probs[int(t)] = max(probs.get(int(t), 0.0), math.exp(alt["logprob"]))
            total = sum(probs.values())
            return sum(k * p for k, p in probs.items()) / total if total > 0 else None
    return None


def reciprocal_rank_fusion(rankings: list[list[int]], k: int) -> list[tuple[int, float]]:
    """Fuse rankings (lists of candidate indices, best first) -> [(candidate, fused score)] best first."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, cand in enumerate(ranking, 1):
            scores[cand] = scores.get(cand, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def load_corpus(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: corpus file not found")
    if path.suffix == ".jsonl":
        texts = []
        for lineno, obj in read_jsonl(path):
            text = obj.get("text") or obj.get("contents") or obj.get("positive")
            if not isinstance(text, str) or not text.strip():
                raise StoreError(f"{path}:{lineno}: corpus line needs a non-empty 'text' field")
            texts.append(text)
        return texts
    return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def record_key(rec: dict) -> str:
    rid = (rec.get("meta") or {}).get("request_id")
    return rid or request_id("record", rec["instruction"], rec["query"], rec["positive"])


def read_records(path: str | Path) -> list[dict]:
    """Input records through the training-record reader (file:line errors); relabel also needs an instruction."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: input records not found")
    out = []
    for lineno, rec in records.read_records(path):
        if not isinstance(rec.get("instruction"), str) or not rec["instruction"].strip():
            raise StoreError(f"{path}:{lineno}: field 'instruction' missing or empty")
        out.append(rec)
    return out


def retrieve(encoder, records: list[dict], corpus: list[str], k: int, batch_size: int) -> list[list[tuple[int, float]]]:
    import torch

    docs = encoder.encode(corpus, batch_size=batch_size)
    hits: list[list[tuple[int, float]]] = []
    by_instruction: dict[str, list[int]] = {}
    for i, rec in enumerate(records):  # one encode call per instruction: the instruction is part of the query
        by_instruction.setdefault(rec["instruction"], []).append(i)
    result: dict[int, list[tuple[int, float]]] = {}
    for instruction, idx in by_instruction.items():
        q = encoder.encode([records[i]["query"] for i in idx], instruction=instruction, batch_size=batch_size)
        sims = q.float() @ docs.float().T
        top = torch.topk(sims, min(k, len(corpus)), dim=1)
        for row, i in enumerate(idx):
            result[i] = list(zip(top.indices[row].tolist(), top.values[row].tolist()))
    for i in range(len(records)):
        hits.append(result[i])
    return hits


class Relabeler:
    def __init__(self, cfg: RelabelConfig, *, encoder=None, load_encoder=None, client: LLMClient | None = None):
        """`encoder` (encode(texts, instruction=, batch_size=)), or `load_encoder(cfg.embedder)` called only when
        there is work to do (the CLI passes embforge.eval.encoders.load_encoder)."""
        for key in ("input", "out", "model"):
            if not getattr(cfg, key):
                raise ValueError(f"{key}: required (--{key})")
        self.cfg = cfg
        self.encoder = encoder
        self.load_encoder = load_encoder
        if client is None:
            api_key = os.environ.get(cfg.api_key_env) or cfg.api_key
            require_api_key(cfg.base_url, api_key, cfg.api_key_env)  # before loading an embedder or any request
            client = LLMClient(
                cfg.base_url, cfg.model, api_key, mode=cfg.structured_output, timeout=cfg.request_timeout,
                retry=RetryPolicy(cfg.max_retries, cfg.backoff_base, cfg.backoff_max, cfg.max_retry_after,
                                  cfg.parse_attempts, 64))
        self.client = client
        self.tracker = CostTracker({**DEFAULT_PRICES, **cfg.prices})
        self.budget = Budget(self.tracker, cfg.model, cfg.budget_usd)
        self.templates = {g: load_template(f"grade_{g}", cfg.template_version, cfg.template_dir) for g in cfg.graders}

    def grade_request(self, grader: str, rec: dict, passage: str) -> ChatRequest:
        tmpl = self.templates[grader]
        passage = passage[: self.cfg.max_passage_chars]
        prompt = tmpl.render(task=rec["instruction"], query=rec["query"], passage=passage.replace("\n", " "))
        rid = request_id("grade", grader, tmpl.name, tmpl.version, tmpl.digest, rec["instruction"], rec["query"],
                         passage, self.cfg.model)
        return ChatRequest(id=rid, kind="grade", messages=[{"role": "user", "content": prompt}],
                           schema=SCORE_SCHEMA, max_tokens=self.cfg.max_tokens, temperature=0.0, top_p=1.0,
                           logprobs=self.cfg.use_logprobs, top_logprobs=5 if self.cfg.use_logprobs else 0,
                           accept=lambda v: isinstance(v, dict) and v.get("score") in (0, 1, 2, 3, "0", "1", "2", "3"),
                           meta={"grader": grader})

    def _handle(self, req: ChatRequest, res: ChatResult) -> None:
        entry = {"id": req.id, "kind": "grade", "status": res.status if res.status != "ok" else "accepted",
                 "reason": res.reason, "model": self.cfg.model, "meta": req.meta, "attempts": res.attempts,
                 "mode": res.mode, "errors": res.errors, "usage": res.usage, "content": res.content, "raw": res.raw}
        if res.status == "ok":
            entry["score"] = int(res.parsed["score"])
            entry["expected_score"] = score_from_logprobs(res.raw)
        self.ledger.append(entry)

    def _score(self, rid: str) -> tuple[float, str] | None:
        e = self.ledger.latest.get(rid)
        if e is None or e["status"] == "failed":
            return None
        if e["status"] == "rejected":
            return -1.0, "rejected"  # an ungradable pair ranks last rather than blocking the record forever
        if e.get("expected_score") is not None:
            return float(e["expected_score"]), "logprobs"
        return float(e["score"]), "json"

    async def run(self) -> dict:
        cfg, t0 = self.cfg, time.time()
        records = read_records(cfg.input)
        corpus = load_corpus(cfg.corpus) if cfg.corpus else [t for r in records for t in [r["positive"], *r.get("negatives", [])]]
        corpus = list(dict.fromkeys(t for t in corpus if t.strip()))  # exact duplicates would fill the top-k
        if len(corpus) < 2:
            raise ValueError("relabel needs a corpus of at least 2 distinct passages")
        self.ledger = Ledger(sidecar(cfg.out, ".raw.jsonl"), fsync=cfg.fsync)
        for model, usage, factor in self.ledger.usage:
            self.tracker.add(model, usage, discount=factor)
        out = JsonlAppender(cfg.out, fsync=cfg.fsync)
        done = {(r.get("meta") or {}).get("relabel", {}).get("source_id") for _, r in read_jsonl(cfg.out)}
        todo = [r for r in records if record_key(r) not in done]
        log(f"relabel: {len(records) - len(todo)} of {len(records)} record(s) already written; {len(todo)} to go")
        runner = Runner(self.client, self.budget, concurrency=cfg.concurrency, progress=cfg.progress)
        written = changed = 0
        try:
            if todo:
                if self.encoder is None:
                    if self.load_encoder is None:
                        raise ValueError("relabel: no encoder given (encoder= or load_encoder=)")
                    self.encoder = self.load_encoder(cfg.embedder)
                log(f"relabel: retrieving top-{cfg.top_k} of {len(corpus)} passages with {cfg.embedder}")
                hits = retrieve(self.encoder, todo, corpus, cfg.top_k, cfg.embed_batch_size)
                index = {t: i for i, t in enumerate(corpus)}
                cands = []
                for rec, h in zip(todo, hits):
                    c = [i for i, _ in h]
                    seed = index.get(rec["positive"])
                    if seed is not None and seed not in c:
                        c.append(seed)  # keep the seed in the race so "positive changed" means something
                    cands.append(c)
                reqs = [self.grade_request(g, rec, corpus[i]) for rec, c in zip(todo, cands) for i in c
                        for g in cfg.graders]
                pending = list({r.id: r for r in reqs if not self.ledger.finished(r.id)}.values())
                await runner.run(pending, self._handle, total=len(pending), desc="grading")
                for rec, c, h in zip(todo, cands, hits):
                    new = self._finish(rec, c, dict(h), corpus)
                    if new is not None:
                        out.append(new)
                        written += 1
                        changed += new["meta"]["relabel"]["positive_changed"]
        finally:
            await self.client.close()
            out.close()
            self.ledger.close()
        remaining = len(todo) - written
        report = {"out": cfg.out, "model": cfg.model, "base_url": redact_url(cfg.base_url), "embedder": cfg.embedder,
                  "records_in": len(records), "records_written": written, "records_pending": remaining,
                  "positive_changed": changed, "stop_reason": runner.stop_reason or ("complete" if remaining == 0
                                                                                     else "incomplete"),
                  "fatal_error": runner.fatal, "grade_outcomes": dict(self.ledger.reasons("grade")),
                  "cost": self.tracker.summary(), "elapsed_s": round(time.time() - t0, 2)}
        path = sidecar(cfg.out, ".report.json")
        atomic_write_json(path, report, indent=2, ensure_ascii=False)   # never a half-written report
        return report

    def _finish(self, rec: dict, cands: list[int], sims: dict[int, float], corpus: list[str]) -> dict | None:
        cfg = self.cfg
        scores: dict[str, dict[int, tuple[float, str]]] = {}
        for g in cfg.graders:
            for i in cands:
                s = self._score(self.grade_request(g, rec, corpus[i]).id)
                if s is None:
                    return None  # a grade is still missing: this record waits for the next run
                scores.setdefault(g, {})[i] = s
        retrieval_rank = {i: r for r, i in enumerate(cands)}
        rankings = [sorted(cands, key=lambda i: (-scores[g][i][0], retrieval_rank[i])) for g in cfg.graders]
        fused = reciprocal_rank_fusion(rankings, cfg.rrf_k)
        order = [i for i, _ in fused]
        positive = order[0]
        negatives: list[int] = []
        for r in cfg.negative_ranks:
            pos = r - 1 if r > 0 else len(order) + r
            if 0 <= pos < len(order):
                i = order[pos]
                if i != positive and i not in negatives and corpus[i].strip() != corpus[positive].strip():
                    negatives.append(i)
        seed_text = rec["positive"]
        provenance = {
            "source_id": record_key(rec), "method": "gecko-rrf", "model": cfg.model, "embedder": cfg.embedder,
            "graders": cfg.graders, "rrf_k": cfg.rrf_k, "top_k": cfg.top_k,
            "positive_changed": corpus[positive] != seed_text, "seed_positive": seed_text,
            "seed_negatives": rec.get("negatives", []),
            "ranking": [{"passage_sha": hashlib.sha1(corpus[i].encode()).hexdigest()[:12],
                         "retrieval_rank": retrieval_rank[i] + 1,
                         "cosine": round(sims[i], 4) if i in sims else None, "fused": round(f, 6),
                         **{g: scores[g][i][0] for g in cfg.graders},
                         "score_source": sorted({scores[g][i][1] for g in cfg.graders})}
                        for i, f in fused],
        }
        meta = dict(rec.get("meta") or {})
        meta["relabel"] = provenance
        return {"instruction": rec["instruction"], "query": rec["query"], "positive": corpus[positive],
                "negatives": [corpus[i] for i in negatives], "task_type": rec.get("task_type", "unknown"),
                "language": rec.get("language", "English"), "meta": meta}


def run_relabel(cfg: RelabelConfig, *, encoder=None, load_encoder=None, client: LLMClient | None = None) -> dict:
    return asyncio.run(Relabeler(cfg, encoder=encoder, load_encoder=load_encoder, client=client).run())
