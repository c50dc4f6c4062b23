"""Padding-free packed chunks: chunk formation, packed == padded embeddings and GradCache gradients (fp32, tiny
Llama / Mistral / Qwen2 and the real SmolLM2), the same training losses either way, and the budget accounting.

LoRA dropout is off wherever packed and padded runs are compared: a dropout mask is drawn for the tensor shape the
layer sees ([1, total] packed vs [rows, longest] padded), so with dropout both are valid steps but not the same one.
"""
import json

import pytest
import torch

from embforge.engine import ContrastiveBatch, Embedder, LoraConfig, ModelConfig, contrastive_step
from embforge.engine import packing
from embforge.engine.packing import make_packed_chunks, pack_sequences

FAMILIES = ["llama", "mistral", "qwen2"]


def nonzero_lora_b(e, seed=0):
    """peft starts lora_B at zero, where lora_A gets no gradient: make LoRA matter for the gradient comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in e.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.2)


def embedder(path, pooling="last", dropout=0.0, **kw):
    e = Embedder.from_config(ModelConfig(path=path, pooling=pooling, lora=LoraConfig(dropout=dropout), **kw), "cpu")
    nonzero_lora_b(e)
    e.train()
    return e


def probe_loss(emb: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of the embeddings. Not |emb|^2: the final RMSNorm makes the raw embedding's norm
    nearly constant, so that loss's gradients are rounding noise and any two paths 'differ' by percents."""
    w = torch.randn(emb.shape, generator=torch.Generator().manual_seed(1))
    return (emb.float() * w.to(emb.device)).sum()


def token_seqs(e, lengths, seed=0):
    """Random token sequences of the given lengths, ending in EOS as tokenize makes them (one-token sequences are
    one random token each, so that two of them differ)."""
    g = torch.Generator().manual_seed(seed)
    eos = e.tokenizer.eos_token_id
    vocab = min(e.model.config.vocab_size, 5000)
    return [torch.randint(3, vocab, (n - 1,), generator=g).tolist() + [eos] if n > 1
            else torch.randint(3, vocab, (1,), generator=g).tolist() for n in lengths]


def embed(e, seqs, packed: bool):
    e.set_packing(packed)
    return e.embed_chunk(seqs)


# ------------------------------------------------------------------------------------------------ chunks
def test_packed_chunks_fill_budget_with_real_tokens():
    lengths = [7, 1, 16, 3, 16, 20, 1, 9, 5, 2]
    chunks = make_packed_chunks(lengths, 16)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))   # every sequence exactly once
    for c in chunks:
        total = sum(lengths[i] for i in c)
        assert total <= 16 or len(c) == 1, (c, total)
    assert [5] in chunks                              # longer than the budget: a chunk of its own
    assert [2] in chunks and [4] in chunks            # exactly at the budget: full on its own
    # first-fit decreasing fills the rest: the 60 tokens besides the long one fit the minimum of 4 chunks of 16
    assert len(chunks) == 1 + 4
    assert make_packed_chunks([1], 16) == [[0]]      # a chunk of one one-token sequence
    capped = make_packed_chunks([1] * 10, 100, max_chunk_seqs=3)
    assert [len(c) for c in capped] == [3, 3, 3, 1]


def test_packed_chunk_errors():
    with pytest.raises(ValueError, match="chunk_tokens"):
        make_packed_chunks([3], 0)
    with pytest.raises(ValueError, match="max_chunk_seqs"):
        make_packed_chunks([3], 8, max_chunk_seqs=0)
    with pytest.raises(ValueError, match=r"\[1\] are empty"):
        make_packed_chunks([3, 0], 8)
    with pytest.raises(ValueError, match="empty"):
        pack_sequences([[1], []], "cpu")


def test_pack_sequences_restarts_positions_and_keeps_one_token_sequences_apart():
    row = pack_sequences([[5, 6, 7], [8], [9, 10]], "cpu")
    assert row.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert row.position_ids.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert row.cu_seqlens.tolist() == [0, 3, 4, 6] and row.cu_seqlens.dtype == torch.int32
    assert row.max_len == 3
    # two one-token sequences side by side stay two sequences (positions 0, 0: a restart each)
    row = pack_sequences([[1], [2], [3, 4]], "cpu")
    assert row.position_ids.tolist() == [[0, 0, 0, 1]] and row.cu_seqlens.tolist() == [0, 1, 2, 4]


def test_pack_sequences_into_rows_with_filler_segments():
    seqs = [[1] * 5, [2] * 3, [3], [4] * 6]
    rows = pack_sequences(seqs, "cpu", row_tokens=6, pad_id=0)
    assert rows.input_ids.shape == (3, 6)            # first-fit: [6], [5, 1], [3 + filler 3]
    flat_ids, flat_pos = rows.input_ids.flatten(), rows.position_ids.flatten()
    cu = rows.cu_seqlens.tolist()
    for i, s in enumerate(seqs):                     # each sequence is its own segment, positions from 0
        a, b = cu[int(rows.order[i])], cu[int(rows.order[i]) + 1]
        assert flat_ids[a:b].tolist() == s and flat_pos[a:b].tolist() == list(range(len(s)))
    assert cu[-1] == 18 and len(cu) - 1 == len(seqs) + 1   # one filler segment
    assert pack_sequences([[1] * 9], "cpu", row_tokens=4).input_ids.shape == (1, 9)   # longer than a row
    assert pack_sequences([[1] * 3, [2]], "cpu", row_tokens=6).input_ids.shape == (1, 4)   # all fit: no filler


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_packed_embeddings_equal_padded(family, pooling, monkeypatch):
    e = embedder(f"tiny-{family}", pooling)
    assert e.packed_kernel == "mask"   # CPU: transformers' block-diagonal mask from the restarting positions
    seqs = token_seqs(e, [1, 9, 1, 17, 4, 1])   # one-token sequences first, between and last
    monkeypatch.setattr(packing, "MASK_ROW_TOKENS", 12)   # several CPU rows, a filler tail, reordered sequences
    with torch.no_grad():
        packed, padded = embed(e, seqs, True), embed(e, seqs, False)
        alone = torch.cat([embed(e, [s], False) for s in seqs])   # each sequence by itself: no neighbours at all
    assert packed.dtype == torch.float32 and packed.shape == (len(seqs), e.hidden_size)
    scale = padded.abs().max()
    assert (packed - padded).abs().max() <= 1e-5 * scale, (packed - padded).abs().max()
    assert (packed - alone).abs().max() <= 1e-5 * scale
    assert (packed[0] - packed[2]).abs().max() > 1e-3   # distinct one-token sequences were not merged


def test_packed_embeddings_equal_padded_smollm2():
    e = Embedder.from_config(ModelConfig(path="smollm2", lora=None), "cpu")
    texts = ["a", "what is the boiling point of water at sea level?", "Paris is the capital of France. " * 3]
    seqs = e.tokenize(texts, is_query=False)
    assert len(seqs[0]) <= 2
    with torch.no_grad():
        packed, padded = embed(e, seqs, True), embed(e, seqs, False)
    assert (packed - padded).abs().max() <= 1e-5 * padded.abs().max()
    # encode (the eval path) follows the embedder's setting and agrees too
    e.set_packing(True)
    a = e.encode(texts)
    e.set_packing(False)
    b = e.encode(texts)
    assert (a - b).abs().max() <= 1e-5


def make_batch():
    queries = ["", "what is a cat", "how do planes fly at high altitude over the oceans", "define entropy"]
    docs = []
    for i, q in enumerate(queries):
        docs += [f"answer {i} about {q} " * (i % 3 + 1), f"unrelated text number {i} lorem ipsum " * (2 - i % 2)]
    return ContrastiveBatch(queries, [None, "Retrieve the answer", None, "Retrieve the answer"], docs)


def step_grads(e, batch, packed, chunk_tokens):
    e.set_packing(packed)
    res = contrastive_step(e, batch, chunk_tokens=chunk_tokens)
    params = e.trainable_parameters()
    g = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return res, g


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_gradcache_step_equals_padded(family):
    e = embedder(f"tiny-{family}")
    batch = make_batch()
    seqs = e.tokenize(batch.queries, is_query=True, instructions=batch.instructions) + \
        e.tokenize(batch.documents, is_query=False)
    lengths = sorted(len(s) for s in seqs)
    assert lengths[0] == 1                       # the empty query is EOS alone: a one-token sequence
    longest = lengths[-1]
    # budget == the longest sequence: it fills a chunk exactly; budget below it: it exceeds the budget
    for budget in (longest, longest - 3, 10_000):
        p_res, p_grad = step_grads(e, batch, True, budget)
        d_res, d_grad = step_grads(e, batch, False, budget)
        assert p_res.packed and not d_res.packed
        assert abs(p_res.loss - d_res.loss) <= 1e-5 * abs(d_res.loss), (budget, p_res.loss, d_res.loss)
        assert float((p_grad - d_grad).norm() / d_grad.norm()) <= 1e-5, budget
        assert p_res.tokens == d_res.tokens == sum(lengths)
        assert p_res.padded_tokens == p_res.tokens < d_res.padded_tokens   # packed computes only real tokens
        if budget == 10_000:
            assert p_res.n_chunks == 1                                      # a chunk of everything: one pass
        else:
            assert p_res.n_chunks <= d_res.n_chunks                         # real tokens fill each chunk
        if budget == longest:
            assert p_res.n_chunks < d_res.n_chunks


def test_packed_gradcache_replays_lora_dropout_exactly():
    """With LoRA dropout (and checkpointing), the packed GradCache step equals the same packed chunks embedded in
    one autograd graph from the same RNG state (pass 2 must redraw pass 1's masks for each packed row)."""
    from embforge.engine.batch import text_ids
    from embforge.kernels import infonce_loss
    e = embedder("tiny-mistral", dropout=0.1, gradient_checkpointing=True)   # recompute inside pass 2 as well
    e.set_packing(True)
    batch = make_batch()
    torch.manual_seed(1)
    res = contrastive_step(e, batch, chunk_tokens=24)
    g_step = torch.cat([p.grad.flatten() for p in e.trainable_parameters()])
    for p in e.trainable_parameters():
        p.grad = None
    assert res.n_chunks > 2
    torch.manual_seed(1)
    seqs = e.tokenize(batch.queries, is_query=True, instructions=batch.instructions) + \
        e.tokenize(batch.documents, is_query=False)
    reps = [None] * len(seqs)
    for c in make_packed_chunks([len(s) for s in seqs], 24):
        out = e.embed_chunk([seqs[j] for j in c])
        for k, i in enumerate(c):
            reps[i] = out[k]
    reps = torch.stack(reps)
    qid, did = text_ids(batch.queries, batch.documents)
    B = len(batch.queries)
    loss = infonce_loss(reps[:B], reps[B:], 0.02, query_ids=qid, doc_ids=did)
    loss.backward()
    g_ref = torch.cat([p.grad.flatten() for p in e.trainable_parameters()])
    for p in e.trainable_parameters():
        p.grad = None
    assert abs(res.loss - float(loss)) <= 1e-5 * abs(float(loss))
    assert float((g_step - g_ref).norm() / g_ref.norm()) < 1e-4
    torch.manual_seed(2)   # other dropout draws: visibly other gradients, so the check above has teeth
    contrastive_step(e, batch, chunk_tokens=24)
    g_other = torch.cat([p.grad.flatten() for p in e.trainable_parameters()])
    assert float((g_other - g_ref).norm() / g_ref.norm()) > 1e-2


def _reference_varlen(q, k, v, cu, max_len, scale, gqa):
    """Per-sequence causal SDPA over [total, heads, d] inputs: what torch's flash varlen kernel computes."""
    assert max_len == int((cu[1:] - cu[:-1]).max())
    out = torch.empty_like(q)
    for s, t in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[s:t].transpose(0, 1) for x in (q, k, v))
        out[s:t] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa).transpose(0, 1)
    return out


def _same_heads(q, k, v):
    if not (q.shape[1] == k.shape[1] == v.shape[1]):
        raise RuntimeError(f"varlen_attn: key/value must have the query's {q.shape[1]} heads, got {k.shape[1]}")


# Fakes with the exact signatures of torch.nn.attention.varlen.varlen_attn per release (packing.py's docstring):
# each raises where the real one would go wrong (no GQA flag: k, v must carry every query head).
def varlen_torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert is_causal is True and cu_seq_q is cu_seq_k and max_q == max_k
    _same_heads(query, key, value)
    return _reference_varlen(query, key, value, cu_seq_q, max_q, None, False)


def varlen_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1)):
    assert window_size == (-1, 0) and cu_seq_q is cu_seq_k and max_q == max_k   # 2.11 compares the tuple
    _same_heads(query, key, value)
    return _reference_varlen(query, key, value, cu_seq_q, max_q, scale, False)


def varlen_with_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):
    assert window_size == (-1, 0) and cu_seq_q is cu_seq_k and max_q == max_k
    if not enable_gqa:
        _same_heads(query, key, value)
    elif key.shape[1] == query.shape[1]:
        raise AssertionError("enable_gqa given, yet k/v were expanded: the flag exists to avoid that copy")
    return _reference_varlen(query, key, value, cu_seq_q, max_q, scale, enable_gqa)


VARLEN_FAKES = {"torch-2.10": varlen_torch_2_10, "torch-2.11": varlen_torch_2_11, "enable_gqa": varlen_with_gqa}


def test_signature_fakes_refuse_unexpanded_gqa():
    """The fakes have teeth: a GQA call in the old spelling (k, v with fewer heads) raises where no flag exists."""
    q, kv = torch.randn(6, 4, 8), torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="must have the query's 4 heads"):
        varlen_torch_2_11(q, kv, kv, cu, cu, 4, 4, window_size=(-1, 0))
    with pytest.raises(RuntimeError, match="must have the query's 4 heads"):
        varlen_torch_2_10(q, kv, kv, cu, cu, 4, 4, is_causal=True)
    with pytest.raises(TypeError):   # 2.11 has no enable_gqa keyword: the old code's call fails here
        varlen_torch_2_11(q, kv, kv, cu, cu, 4, 4, window_size=(-1, 0), enable_gqa=True)
    varlen_with_gqa(q, kv, kv, cu, cu, 4, 4, window_size=(-1, 0), enable_gqa=True)


@pytest.mark.parametrize("spelling", sorted(VARLEN_FAKES))
def test_varlen_inputs_expand_gqa_for_each_signature(spelling):
    """_varlen_inputs against each release's signature: k, v expanded (head h reads kv head h // group) where no
    enable_gqa exists, passed as they are with the flag where it does; the options bind to that signature."""
    import inspect
    fake = VARLEN_FAKES[spelling]
    q, k, v = torch.randn(7, 4, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    k2, v2, opts = packing._varlen_inputs(fake, q, k, v, 8 ** -0.5)
    inspect.signature(fake).bind(q, k2, v2, None, None, 1, 1, **opts)   # raises on a keyword it lacks
    if spelling == "enable_gqa":
        assert opts["enable_gqa"] is True and k2 is k and v2 is v
    else:
        assert "enable_gqa" not in opts and k2.shape == v2.shape == (7, 4, 8)
        for h in range(4):
            assert torch.equal(k2[:, h], k[:, h // 2]) and torch.equal(v2[:, h], v[:, h // 2])
    assert opts.get("window_size", (-1, 0)) == (-1, 0) and opts.get("is_causal", True) is True
    q1, k1, v1 = torch.randn(7, 4, 8), torch.randn(7, 4, 8), torch.randn(7, 4, 8)   # no GQA: nothing changes
    k3, v3, opts = packing._varlen_inputs(fake, q1, k1, v1, None)
    assert k3 is k1 and v3 is v1 and "enable_gqa" not in opts
    with pytest.raises(ValueError, match="not a multiple"):
        packing._varlen_inputs(fake, torch.randn(7, 4, 8), torch.randn(7, 3, 8), torch.randn(7, 3, 8), None)


def test_varlen_inputs_bind_to_the_installed_torch():
    """The options bind to the real varlen_attn of the torch installed here (lock.txt), GQA shapes included."""
    import inspect
    if not packing.torch_varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    from torch.nn.attention.varlen import varlen_attn
    q, k, v = torch.randn(7, 4, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    k2, v2, opts = packing._varlen_inputs(varlen_attn, q, k, v, 8 ** -0.5)
    inspect.signature(varlen_attn).bind(q, k2, v2, None, None, 1, 1, **opts)
    heads_kv = 2 if "enable_gqa" in opts else 4
    assert k2.shape[1] == v2.shape[1] == heads_kv


@pytest.mark.parametrize("spelling", sorted(VARLEN_FAKES))
def test_varlen_attention_plumbing_with_each_signature(monkeypatch, spelling):
    """The CUDA varlen path (registered attention function + cu_seqlens kwargs through the decoder) on CPU, with
    torch's flash varlen kernel replaced by a fake of each release's signature (tiny-mistral: 4 query heads over 2
    kv heads): packed must equal padded, embeddings and LoRA gradients (lora_B nonzero, so lora_A's count)."""
    import torch.nn.attention.varlen as V
    monkeypatch.setattr(V, "varlen_attn", VARLEN_FAKES[spelling])
    packing.register_varlen_attention()
    e = embedder("tiny-mistral")
    assert e.model.config.num_attention_heads != e.model.config.num_key_value_heads   # GQA is what is tested
    e.model.get_base_model().set_attn_implementation(packing.VARLEN_ATTENTION)
    seqs = token_seqs(e, [3, 1, 12, 5])
    out = {}
    for packed in (True, False):
        e.set_packing(packed)
        e.packed_kernel = "varlen"   # set_packing re-derives it: keep the varlen path (padded calls go to SDPA)
        emb = e.embed_chunk(seqs)
        probe_loss(emb).backward()
        grads = {n: p.grad.clone() for n, p in e.model.named_parameters() if p.grad is not None}
        e.model.zero_grad(set_to_none=True)
        out[packed] = (emb.detach(), grads)
    (a, ga), (b, gb) = out[True], out[False]
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert any("lora_A" in n for n in ga) and ga.keys() == gb.keys()
    for n in ga:
        assert (ga[n] - gb[n]).norm() <= 1e-4 * gb[n].norm() + 1e-12, n


# ------------------------------------------------------------------------------------------------ policy
def test_resolve_packing_policy(monkeypatch):
    e = embedder("tiny-llama")
    e.set_packing("auto")
    assert e.packing is True                           # exact here: on by default
    e.set_packing(False)
    assert e.packing is False
    with pytest.raises(ValueError, match="batch.packing must be"):
        e.set_packing("yes")
    # a bidirectional model (model.attention) cannot pack: auto turns it off, true is an error that says why
    monkeypatch.setattr(e.config, "attention", "bidirectional", raising=False)
    e.set_packing("auto")
    assert e.packing is False
    with pytest.raises(ValueError, match="bidirectional"):
        e.set_packing(True)
    monkeypatch.setattr(e.config, "attention", "causal", raising=False)
    monkeypatch.setattr(e.model.config, "model_type", "gpt2")
    with pytest.raises(ValueError, match="gpt2"):
        e.set_packing(True)
    # a dense mask on a GPU computes the blocks it masks: no packing there without a varlen kernel
    assert packing.packed_kernel("sdpa", torch.device("cuda")) is None
    assert packing.packed_kernel("flash_attention_2", torch.device("cuda")) == "flash_attention_2"
    assert packing.packed_kernel(packing.VARLEN_ATTENTION, torch.device("cuda")) == "varlen"
    assert packing.packed_kernel("sdpa", torch.device("cpu")) == "mask"


# ------------------------------------------------------------------------------------------------ training
def _train_cfg(tmp_path, out, packing_mode):
    from embforge.config import load_config
    from embforge.data.sources import build
    from embforge.engine.train import TrainConfig
    data = tmp_path / "train.jsonl"
    if not data.exists():
        build(data)
    return load_config(TrainConfig, None, [
        "model.path=tiny-llama", "model.lora.dropout=0.0", f"data.train=[{data}]", "batch.queries=6",
        "batch.chunk_tokens=128", f"batch.packing={packing_mode}", "optim.warmup_steps=1", "steps=3",
        f"output_dir={out}", "checkpoint_every=0", "device=cpu"])


def test_training_logs_same_losses_packed_and_padded(tmp_path):
    from embforge.cli.train import run_training
    packed = run_training(_train_cfg(tmp_path, tmp_path / "p", "true"), progress=False)["losses"]
    padded = run_training(_train_cfg(tmp_path, tmp_path / "d", "false"), progress=False)["losses"]
    assert len(packed) == 3 and len({round(x, 5) for x in packed}) > 1   # the loss moves: the steps trained
    assert packed == pytest.approx(padded, rel=1e-5, abs=1e-6)
    recs = {m: [json.loads(l) for l in (tmp_path / m / "metrics.jsonl").read_text().splitlines()] for m in "pd"}
    for p, d in zip(recs["p"], recs["d"]):
        assert p["packed"] is True and d["packed"] is False
        assert p["real_tokens"] == d["real_tokens"] == p["computed_tokens"] < d["computed_tokens"]


def test_train_config_rejects_bad_packing(tmp_path):
    from embforge.config import load_config
    from embforge.engine.train import TrainConfig
    with pytest.raises(ValueError, match="batch.packing must be true, false or 'auto', got 'maybe'"):
        load_config(TrainConfig, None, ["data.train=[x.jsonl]", "batch.packing=maybe"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_padded_on_gpu_varlen(family):
    """On CUDA, bf16: packing picks a varlen kernel (flash-attn, or torch's own) and matches padded chunks at bf16
    tolerance, gradients included."""
    e = Embedder.from_config(ModelConfig(path=f"tiny-{family}", lora=LoraConfig(dropout=0.0)), "cuda")
    nonzero_lora_b(e)   # else lora_A's gradient is zero in both runs and compares nothing
    assert e.packing and e.packed_kernel in ("flash_attention_2", "varlen")
    seqs = token_seqs(e, [1, 9, 1, 17, 4, 1, 300])
    out = {}
    for packed in (True, False):
        emb = embed(e, seqs, packed)
        probe_loss(emb).backward()
        out[packed] = (emb.detach(), torch.cat([p.grad.flatten() for p in e.trainable_parameters()]))
        assert any(p.grad.norm() > 0 for n, p in e.model.named_parameters() if "lora_A" in n)
        for p in e.trainable_parameters():
            p.grad = None
    (a, ga), (b, gb) = out[True], out[False]
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()
    assert gb.norm() > 0 and (ga - gb).norm() <= 5e-2 * gb.norm()


def test_bench_tracker_counts_a_packed_row_as_its_sequences():
    """The benchmark's HFU counts attention per sequence for a packed row (varlen kernels do only those blocks)."""
    from embforge.bench.tracker import Tracker
    e = embedder("tiny-llama")
    e.set_packing(True)
    seqs = token_seqs(e, [5, 1, 7])
    tracker = Tracker(e)
    try:
        with tracker.step() as trace, torch.no_grad():
            e.embed_chunk(seqs)
            e.set_packing(False)
            e.embed_chunk(seqs)
    finally:
        tracker.remove()
    packed, padded = trace.forwards
    assert (packed.rows, packed.length, packed.segments) == (1, 13, (5, 1, 7))
    assert packed.shapes() == [(1, 5), (1, 1), (1, 7)]
    assert padded.segments is None and padded.shapes() == [(3, 7)]
