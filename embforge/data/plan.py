"""What a training run will do, from its config and its data alone (no model weights): `embforge train --dry-run`
prints it, and every run logs its one warning (a batch larger than the data repeats examples).

Tokens and chunks per step are measured on the first batches the run will really take: their texts tokenized as
the trainer tokenizes them (template, truncation, EOS) and grouped by the trainer's own chunking (padded chunks;
packed ones hold no more tokens than that)."""
from __future__ import annotations

import math

from embforge.engine.gradcache import CPU_CHUNK_TOKENS, make_chunks
from embforge.engine.packing import make_packed_chunks
from embforge.engine.text import format_query, tokenize_texts


def repeat_warning(n_examples: int, queries: int) -> str | None:
    """The one line a run logs when a batch must hold the same example more than once."""
    if n_examples >= queries:
        return None
    return (f"[train] warning: batch.queries={queries} but the data holds {n_examples} usable examples: each batch "
            f"repeats examples (each about {queries / n_examples:.1f} times), so in-batch negatives include copies "
            "of the positive's own query; add data or lower batch.queries")


def training_plan(cfg, batches, tokenizer=None, *, sample_batches: int = 3) -> dict:
    """The plan of a run: datasets and their examples, steps per epoch, epochs, and (given the tokenizer) tokens
    and chunks per step over the first `sample_batches` batches."""
    data = batches.data
    per_file = [0] * len(data.paths)
    for fi, _, _ in data.offsets:
        per_file[fi] += 1
    n, q = len(data), cfg.batch.queries
    plan = {"datasets": [{"path": str(p), "examples": k} for p, k in zip(data.paths, per_file)],
            "examples": n, "skipped_lines": len(data.skipped), "queries_per_step": q,
            "documents_per_step": q * (1 + cfg.batch.negatives), "steps": cfg.steps,
            "steps_per_epoch": math.ceil(n / q), "epochs": round(cfg.steps * q / n, 2),
            "repeats_in_batch": n < q, "output_dir": cfg.output_dir}
    if tokenizer is None:
        return plan
    budget = CPU_CHUNK_TOKENS if cfg.batch.chunk_tokens == "auto" else int(cfg.batch.chunk_tokens)
    m = cfg.model
    tokens, chunks, packed, position = [], [], [], 0
    for _ in range(min(sample_batches, cfg.steps)):
        batch, position = batches(position)
        q_seqs = tokenize_texts(tokenizer, [format_query(m.query_template, t, i) for t, i in
                                            zip(batch.queries, batch.instructions)], m.query_max_length)
        d_seqs = tokenize_texts(tokenizer, batch.documents, m.doc_max_length)
        lengths = [len(s) for s in q_seqs + d_seqs]
        tokens.append(sum(lengths))
        chunks.append(len(make_chunks(lengths, budget, cfg.batch.max_chunk_seqs)))
        packed.append(len(make_packed_chunks(lengths, budget, cfg.batch.max_chunk_seqs)))
    plan.update(tokens_per_step=round(sum(tokens) / len(tokens)), chunks_per_step=round(sum(chunks) / len(chunks), 1),
                packed_chunks_per_step=round(sum(packed) / len(packed), 1) if cfg.batch.packing is not False else None,
                chunk_tokens=cfg.batch.chunk_tokens if cfg.batch.chunk_tokens != "auto" else
                f"auto (CPU: {CPU_CHUNK_TOKENS}; GPU: probed at start)",
                sampled_batches=len(tokens))
    return plan


def format_plan(plan: dict, model: str) -> str:
    lines = ["embforge train --dry-run: config and data are valid", f"  model: {model}"]
    lines += [f"  dataset: {d['path']}: {d['examples']} examples" for d in plan["datasets"]]
    if plan["skipped_lines"]:
        lines.append(f"  skipped bad lines: {plan['skipped_lines']}")
    lines += [f"  examples: {plan['examples']}; steps: {plan['steps']} ({plan['steps_per_epoch']} per epoch, "
              f"{plan['epochs']} epochs)",
              f"  per step: {plan['queries_per_step']} queries, {plan['documents_per_step']} documents"]
    if "tokens_per_step" in plan:
        packed = plan["packed_chunks_per_step"]
        lines.append(f"  tokens per step: ~{plan['tokens_per_step']} (first {plan['sampled_batches']} batches), "
                     f"chunks per step: ~{plan['chunks_per_step']} padded"
                     + (f" or ~{packed} packed (where packing applies)" if packed is not None else "")
                     + f", chunk budget {plan['chunk_tokens']} tokens")
    lines.append(f"  output_dir: {plan['output_dir']}")
    warning = repeat_warning(plan["examples"], plan["queries_per_step"])
    if warning:
        lines.append("  " + warning.replace("[train] ", ""))
    return "\n".join(lines)
