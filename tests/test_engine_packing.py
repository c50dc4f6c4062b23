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


def embedder(path, pooling="last", dropout=0.0, **kw):
    e = Embedder.from_config(ModelConfig(path=path, pooling=pooling, lora=LoraConfig(dropout=dropout), **kw), "cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # peft starts lora_B at zero; make LoRA matter for the gradient comparison
        for n, p in e.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.2)
    e.train()
    return e


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
            assert p_res.n_chunks < d_res.n_chunks                          # real tokens fill each chunk


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


def test_varlen_attention_plumbing_with_a_reference_kernel(monkeypatch):
    """The CUDA varlen path (registered attention function + cu_seqlens kwargs through the decoder) on CPU, with
    torch's flash varlen kernel replaced by a per-sequence causal SDPA: packed must still equal padded."""
    import torch.nn.attention.varlen as V

    def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False,
                         **_):
        assert tuple(window_size) == (-1, 0) and cu_q is cu_k and max_q == max_k
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
        out = torch.empty_like(q)
        for s, t in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            qs, ks, vs = (x[s:t].transpose(0, 1) for x in (q, k, v))
            out[s:t] = torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
        return out
    monkeypatch.setattr(V, "varlen_attn", reference_varlen)
    packing.register_varlen_attention()
    e = embedder("tiny-mistral")
    e.model.get_base_model().set_attn_implementation(packing.VARLEN_ATTENTION)
    e.packed_kernel = packing.packed_kernel(e.model.config._attn_implementation, e.device)
    assert e.packed_kernel == "varlen"
    seqs = token_seqs(e, [3, 1, 12, 5])
    packed = embed(e, seqs, True)
    e.packed_kernel = "varlen"   # set_packing re-derives it: keep the varlen path
    padded = embed(e, seqs, False)   # padded calls of the same model go through SDPA with its mask
    assert (packed - padded).abs().max() <= 1e-5 * padded.abs().max()


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
        "batch.chunk_tokens=64", f"batch.packing={packing_mode}", "optim.warmup_steps=1", "steps=3",
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
    assert e.packing and e.packed_kernel in ("flash_attention_2", "varlen")
    seqs = token_seqs(e, [1, 9, 1, 17, 4, 1, 300])
    out = {}
    for packed in (True, False):
        emb = embed(e, seqs, packed)
        emb.pow(2).sum().backward()
        out[packed] = (emb.detach(), torch.cat([p.grad.flatten() for p in e.trainable_parameters()]))
        for p in e.trainable_parameters():
            p.grad = None
    (a, ga), (b, gb) = out[True], out[False]
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()
    assert (ga - gb).norm() <= 5e-2 * gb.norm()


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
