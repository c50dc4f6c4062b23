"""What a training run will do, from its config and its data alone (no model weights): `embforge train --dry-run`
prints it.

Tokens and chunks per step are measured on the first batches the run will really take (the multi-dataset
sampler's, embforge/data/mixture.py): their texts tokenized as the trainer tokenizes them (template, truncation,
EOS) and grouped by the trainer's own chunking, padded and packed."""
from __future__ import annotations

import math

from embforge.engine.gradcache import CPU_CHUNK_TOKENS, make_chunks
from embforge.engine.packing import make_packed_chunks
from embforge.engine.text import format_query, tokenize_texts


def training_plan(cfg, batches, tokenizer=None, *, sample_batches: int = 3) -> dict:
    """The plan of a run: datasets and their examples, steps per epoch, epochs, the sampler's notes (small data,
    skipped lines), and (given the tokenizer) queries, documents, tokens and chunks per step over the first
    `sample_batches` batches."""
    datasets = batches.datasets
    n, q = sum(len(d.data) for d in datasets), cfg.batch.queries
    plan = {"datasets": [{"name": d.name, "path": ", ".join(map(str, d.data.paths)), "examples": len(d.data),
                          "weight": d.weight} for d in datasets],
            "examples": n, "skipped_lines": sum(len(d.data.skipped) for d in datasets), "queries_per_step": q,
            "documents_per_step": q * (1 + cfg.batch.negatives), "steps": cfg.steps,
            "steps_per_epoch": math.ceil(n / q), "epochs": round(cfg.steps * q / n, 2), "output_dir": cfg.output_dir}
    if tokenizer is not None:
        budget = CPU_CHUNK_TOKENS if cfg.batch.chunk_tokens == "auto" else int(cfg.batch.chunk_tokens)
        m = cfg.model
        tokens, docs, chunks, packed, position = [], [], [], [], 0
        for _ in range(min(sample_batches, cfg.steps)):
            batch, position = batches(position)
            q_seqs = tokenize_texts(tokenizer, [format_query(m.query_template, t, i) for t, i in
                                                zip(batch.queries, batch.instructions)], m.query_max_length)
            d_seqs = tokenize_texts(tokenizer, batch.documents, m.doc_max_length)
            lengths = [len(s) for s in q_seqs + d_seqs]
            tokens.append(sum(lengths))
            docs.append(len(d_seqs))
            chunks.append(len(make_chunks(lengths, budget, cfg.batch.max_chunk_seqs)))
            packed.append(len(make_packed_chunks(lengths, budget, cfg.batch.max_chunk_seqs)))
        k = len(tokens)
        plan.update(tokens_per_step=round(sum(tokens) / k), documents_per_step=round(sum(docs) / k, 1),
                    chunks_per_step=round(sum(chunks) / k, 1),
                    packed_chunks_per_step=round(sum(packed) / k, 1) if cfg.batch.packing is not False else None,
                    chunk_tokens=cfg.batch.chunk_tokens if cfg.batch.chunk_tokens != "auto" else
                    f"auto (CPU: {CPU_CHUNK_TOKENS}; GPU: probed at start)", sampled_batches=k)
    plan["notes"] = list(batches.notes)      # what the run's log would say first
    return plan


def format_plan(plan: dict, model: str) -> str:
    lines = ["embforge train --dry-run: config and data are valid", f"  model: {model}"]
    lines += [f"  dataset {d['name']}: {d['path']}: {d['examples']} examples (weight {d['weight']:g})"
              for d in plan["datasets"]]
    if plan["skipped_lines"]:
        lines.append(f"  skipped bad lines: {plan['skipped_lines']}")
    lines += [f"  examples: {plan['examples']}; steps: {plan['steps']} ({plan['steps_per_epoch']} per epoch, "
              f"{plan['epochs']} epochs)",
              f"  per step: {plan['queries_per_step']} queries, {plan['documents_per_step']:g} documents"]
    if "tokens_per_step" in plan:
        packed = plan["packed_chunks_per_step"]
        lines.append(f"  tokens per step: ~{plan['tokens_per_step']} (first {plan['sampled_batches']} batches), "
                     f"chunks per step: ~{plan['chunks_per_step']} padded"
                     + (f" or ~{packed} packed (where packing applies)" if packed is not None else "")
                     + f", chunk budget {plan['chunk_tokens']} tokens")
    lines.append(f"  output_dir: {plan['output_dir']}")
    lines += [f"  note: {note.removeprefix('[train] ')}" for note in plan["notes"]]
    return "\n".join(lines)
