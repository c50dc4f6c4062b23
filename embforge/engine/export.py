"""`embforge export`: adapter, merged model, and a sentence-transformers folder that embeds exactly like
`embforge encode`.

The sentence-transformers folder is a merged full-precision model plus three modules: Transformer (with separate
query / document max lengths), Pooling (last token or mean, by mask) and Normalize; the query template becomes the
"query" prompt. Two details must match embforge's tokenization or the embeddings silently differ:
  - EOS is appended after truncation: the saved tokenizer's post-processor gets EOS at the end of every sequence
    (tokenizers reserve room for special tokens when truncating, so a long text still ends in EOS);
  - a prompt is a prefix: `prompt + query` must equal the template, so the template must end in `{query}`.
The written folder is loaded back and checked token for token against embforge before export reports success.
"""
from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

DEFAULT_EXPORT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
_PROBE_TEXTS = ["hello world", "A longer probe sentence, with punctuation; and digits 12345."]


class ExportError(ValueError):
    pass


def load_for_export(model_dir: str | Path, dtype: str = "auto"):
    """The trained embedder with its base in full precision (never nf4): merging LoRA into 4-bit weights would
    round the adapter's update to the 4-bit grid, so the exported model would not be the trained one."""
    from embforge.engine.model import Embedder

    return Embedder.from_pretrained(model_dir, device="cpu", quantization="none", dtype=dtype)


def merged_model(emb):
    """The backbone with LoRA folded into its weights (a plain HF model); the embedder's model is consumed."""
    model = emb.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model


def query_prompt(template: str, instruction: str) -> str:
    """The prefix that sentence-transformers prepends: the template with the instruction, up to `{query}`."""
    if not template.endswith("{query}"):
        raise ExportError(f"model.query_template {template!r} has text after {{query}}; sentence-transformers "
                          "prompts are prefixes, so this template cannot be exported")
    return template[: -len("{query}")].format(instruction=instruction)


def eos_appending_tokenizer(tokenizer):
    """A copy of `tokenizer` whose post-processor adds the tokens it already adds in front (BOS, if any) and EOS at
    the end, the way embforge tokenizes (see text.tokenize_texts)."""
    import copy

    from tokenizers.processors import TemplateProcessing

    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise ExportError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; the "
                          "sentence-transformers export needs one to append EOS")
    tok = copy.deepcopy(tokenizer)
    eos, eos_id = tok.eos_token, tok.eos_token_id
    plain = tok("x", add_special_tokens=False)["input_ids"]
    full = tok("x", add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i: i + len(plain)] == plain), None)
    if start is None:
        raise ExportError("cannot locate the text inside the tokenizer's special-token template")
    prefix, suffix = full[:start], full[start + len(plain):]
    if suffix not in ([], [eos_id]):
        raise ExportError(f"the tokenizer appends {suffix} after the text; only nothing or EOS is supported")

    def template_ok():
        return tok("x", add_special_tokens=True)["input_ids"] == prefix + plain + [eos_id]

    if prefix in ([], [tok.bos_token_id]) and hasattr(tok, "add_eos_token"):
        # transformers 5 rebuilds the post-processor from these two flags whenever one is set
        try:
            tok.add_bos_token = bool(prefix)
            tok.add_eos_token = True
        except (AttributeError, TypeError):
            pass
    if not template_ok():
        prefix_tokens = tok.convert_ids_to_tokens(prefix)
        specials = dict(zip(prefix_tokens, prefix))
        specials[eos] = eos_id
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single=prefix_tokens + ["$A:0", eos],
            pair=prefix_tokens + ["$A:0", eos, "$B:1", eos],
            special_tokens=list(specials.items()))
    if not template_ok():
        raise ExportError(f"could not make {type(tok).__name__} append EOS after {prefix} + text")
    return tok


def _check_attention_for_st(cfg, auto_model):
    """The folder must attend the way embforge trained: sentence-transformers loads the decoder with plain
    transformers, which honours config.json's is_causal=false (5.23 does); probe the loaded model to be sure."""
    if getattr(cfg, "attention", "causal") == "causal":
        return
    from embforge.engine.attention import check_bidirectional
    try:
        check_bidirectional(auto_model)
    except RuntimeError as e:
        raise ExportError("model.attention=bidirectional: the sentence-transformers folder would load with causal "
                          "attention under this transformers version; use the embforge folder (embforge encode / "
                          f"eval) or --merge instead ({e})") from e


def write_sentence_transformers(emb, merged, out_dir: str | Path, instruction: str) -> Path:
    """A folder `SentenceTransformer(out_dir)` loads: `.encode_query(qs)` == `embforge encode --instruction`,
    `.encode_document(docs)` == `embforge encode` (checked here on probe texts, token for token)."""
    try:
        from sentence_transformers import SentenceTransformer
        try:  # sentence-transformers >= 6; `.models` before (now a deprecated alias)
            from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
        except ImportError:
            from sentence_transformers.models import Normalize, Pooling, Transformer
    except ImportError as e:
        raise ExportError("the sentence-transformers export needs sentence-transformers: "
                          "pip install -c constraints.txt 'embforge[eval]'") from e
    cfg = emb.config
    prompt = query_prompt(cfg.query_template, instruction)
    out = Path(out_dir)
    hf_dir = out / "_hf"
    tok = eos_appending_tokenizer(emb.tokenizer)
    tok.padding_side = cfg.padding_side
    merged.save_pretrained(hf_dir, safe_serialization=True)
    tok.save_pretrained(hf_dir)
    max_len = max(cfg.query_max_length, cfg.doc_max_length)
    kw = {}
    if "modality_config" in inspect.signature(Transformer.__init__).parameters:
        # sentence-transformers >= 6 would wrap text in the tokenizer's chat template when it has one (SmolLM2,
        # Qwen2...): pin the plain text path, as embforge trained
        kw = dict(modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
                  module_output_name="token_embeddings", query_length=cfg.query_max_length,
                  document_length=cfg.doc_max_length)
    transformer = Transformer(str(hf_dir), max_seq_length=max_len, **kw,
                              model_kwargs={"dtype": next(merged.parameters()).dtype, "attn_implementation": "sdpa"})
    _check_attention_for_st(cfg, transformer.auto_model)
    pooling = Pooling(merged.config.hidden_size, pooling_mode="lasttoken" if cfg.pooling == "last" else "mean",
                      include_prompt=True)
    st = SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu",
                             prompts={"query": prompt, "document": ""}, similarity_fn_name="cosine")
    st.save(str(out))
    shutil.rmtree(hf_dir, ignore_errors=True)
    (out / "embforge_export.json").write_text(json.dumps(
        {"query_instruction": instruction, "query_prompt": prompt, "query_template": cfg.query_template,
         "pooling": cfg.pooling, "query_max_length": cfg.query_max_length, "doc_max_length": cfg.doc_max_length},
        indent=2))
    _check_tokenization(emb, out, instruction, prompt)
    return out


def _check_tokenization(emb, out: Path, instruction: str, prompt: str):
    """Refuse to leave a folder behind whose tokenizer disagrees with embforge's (no EOS, a doubled BOS...)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    for text in _PROBE_TEXTS:
        for is_query, full in ((False, text), (True, prompt + text)):
            want = emb.tokenize([text], is_query=is_query, instructions=[instruction] if is_query else None)[0]
            max_len = emb.config.query_max_length if is_query else emb.config.doc_max_length
            got = tok(full, add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"]
            if got != want:
                raise ExportError(f"the exported tokenizer in {out} gives {got} for {full!r}, embforge gives {want}; "
                                  "the sentence-transformers folder would not reproduce embforge encode")


def export(model_dir: str | Path, out_dir: str | Path, *, merge: bool = False, sentence_transformers: bool = False,
           instruction: str = DEFAULT_EXPORT_INSTRUCTION, dtype: str = "auto") -> dict:
    """Write `out_dir/` (embforge folder: adapter + config, what `embforge encode` loads), and optionally
    `out_dir/merged/` and `out_dir/sentence-transformers/`. Returns what was written."""
    emb = load_for_export(model_dir, dtype)
    source = json.loads((Path(model_dir) / "embforge_config.json").read_text())
    trained = source["model"]
    out = Path(out_dir)
    if not hasattr(emb.model, "peft_config"):
        if not source.get("merged"):
            raise ExportError(f"{model_dir} holds no LoRA adapter and no merged model; export a run's "
                              "output_dir/final")
        return _export_full(emb, Path(model_dir), source, out, sentence_transformers, instruction)
    written = {"embforge": str(emb.save_pretrained(out))}
    meta_file = out / "embforge_config.json"
    meta = json.loads(meta_file.read_text())
    for key in ("quantization", "dtype"):  # encode the export the way the run was trained, not as loaded here
        meta["model"][key] = trained.get(key, meta["model"][key])
    if merge or sentence_transformers:
        merged = merged_model(emb)  # emb keeps its tokenizer and config: all `emb.tokenize` (the check below) needs
    if merge:
        merged.save_pretrained(out / "merged", safe_serialization=True)
        emb.tokenizer.save_pretrained(out / "merged")
        meta["merged"] = True  # self-contained: from_pretrained loads merged/ (the adapter stays for reference)
        written["merged"] = str(out / "merged")
    meta_file.write_text(json.dumps(meta, indent=2))
    if sentence_transformers:
        written["sentence_transformers"] = str(write_sentence_transformers(emb, merged, out / "sentence-transformers",
                                                                           instruction))
    _write_cards(model_dir, meta["model"], written, instruction)
    return written


def _write_cards(model_dir, model: dict, written: dict, instruction: str):
    """README.md model cards in the embforge folder and the sentence-transformers folder (engine/card.py)."""
    from embforge.engine.card import run_record, write_card

    record = run_record(model_dir)
    st_path = written.get("sentence_transformers", str(Path(written["embforge"]) / "sentence-transformers"))
    for key, library in (("embforge", "embforge"), ("sentence_transformers", "sentence-transformers")):
        if key in written:
            write_card(written[key], model, record, library=library, instruction=instruction, st_path=st_path,
                       ef_path=written["embforge"])


def _export_full(emb, source_dir: Path, source: dict, out: Path, sentence_transformers: bool,
                 instruction: str) -> dict:
    """A full model without adapter (a merged export, `embforge merge`): the embforge folder is the model itself."""
    model = emb.model
    model.save_pretrained(out / "merged", safe_serialization=True)
    emb.tokenizer.save_pretrained(out / "merged")
    emb.tokenizer.save_pretrained(out / "tokenizer")
    meta = {"model": source["model"], "merged": True}
    (out / "embforge_config.json").write_text(json.dumps(meta, indent=2))
    if (source_dir / "merge.json").exists():
        shutil.copy(source_dir / "merge.json", out / "merge.json")
    written = {"embforge": str(out), "merged": str(out / "merged")}
    if sentence_transformers:
        written["sentence_transformers"] = str(write_sentence_transformers(emb, model, out / "sentence-transformers",
                                                                           instruction))
    _write_cards(source_dir, source["model"], written, instruction)
    return written
