"""Corpus encoding throughput: `embforge encode --out-dir` (engine/corpus.py: length-sorted token-budget batches,
packed where exact, shards + manifest) against sentence-transformers' `encode_document` on the same exported
model and the same corpus, in one run. Also checks that both give the same vectors.

    python bench/bench_encode.py [--model smollm2] [--docs 400] [--out bench/results/encode_cpu.md]

The model is the base with a random LoRA adapter (throughput does not depend on the adapter's values), exported
with `embforge export --sentence-transformers`. The corpus: the positives of the demo's Python-docs source.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--docs", type=int, default=400)
    p.add_argument("--token-budget", type=int, default=8192)
    p.add_argument("--st-batch-size", type=int, default=32)
    p.add_argument("--out", default="bench/results/encode_cpu.md")
    args = p.parse_args()

    from sentence_transformers import SentenceTransformer

    from embforge.common import read_jsonl
    from embforge.data.sources import build
    from embforge.engine import Embedder, ModelConfig
    from embforge.engine.corpus import encode_corpus, load_corpus
    from embforge.engine.export import export

    tmp = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    build(tmp / "docs.jsonl", sources=("stdlib",))
    texts = [rec["positive"] for _, rec in read_jsonl(tmp / "docs.jsonl")][: args.docs]
    torch.manual_seed(0)
    emb = Embedder.from_config(ModelConfig(path=args.model, doc_max_length=256), "cpu")
    with torch.no_grad():
        for n, prm in emb.model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.01)
    emb.save_pretrained(tmp / "final")
    export(tmp / "final", tmp / "exp", sentence_transformers=True)

    model = Embedder.from_pretrained(tmp / "exp", device="cpu")
    t0 = time.perf_counter()
    encode_corpus(model, texts, tmp / "enc", token_budget=args.token_budget, progress=False)
    t_ef = time.perf_counter() - t0
    _, ours = load_corpus(tmp / "enc")

    st = SentenceTransformer(str(tmp / "exp" / "sentence-transformers"), device="cpu")
    t0 = time.perf_counter()
    theirs = torch.as_tensor(st.encode_document(texts, batch_size=args.st_batch_size))
    t_st = time.perf_counter() - t0
    diff = float((ours - theirs).abs().max())

    tokens = sum(len(s) for s in model.tokenize(texts, is_query=False))
    rows = [("embforge encode --out-dir", f"token budget {args.token_budget}, packed={model.packing}", t_ef),
            ("sentence-transformers encode_document", f"batch size {args.st_batch_size}", t_st)]
    lines = [f"# Corpus encoding: embforge vs sentence-transformers ({args.model}, CPU)", "",
             f"{datetime.now(timezone.utc).isoformat(timespec='minutes')}, {platform.processor() or platform.machine()}"
             f", torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
             f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end "
             "(on a shared machine neither the rates nor their ratio are reliable).", "",
             f"{len(texts)} documents, {tokens} tokens (doc_max_length 256); same exported model; "
             f"max |difference| of the vectors: {diff:.2e}.", "",
             "| encoder | setting | seconds | docs/s | tokens/s |", "|---|---|---|---|---|"]
    for name, setting, sec in rows:
        lines.append(f"| {name} | {setting} | {sec:.2f} | {len(texts) / sec:.1f} | {tokens / sec:.0f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
