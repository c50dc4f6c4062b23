"""GradCache step == one full-batch backward (same dropout masks), on tiny Llama/Mistral decoders."""
import pytest
import torch

from embforge.engine import ContrastiveBatch, Embedder, LoraConfig, ModelConfig, contrastive_step
from embforge.engine.gradcache import make_chunks, text_ids
from embforge.kernels import infonce_loss

QUERIES = ["what is a cat", "how do planes fly at high altitude over the oceans", "x", "define entropy",
           "capital of France"]


def make_batch():
    docs = []
    for i, q in enumerate(QUERIES):
        docs += [f"answer {i} about {q} " * (i % 3 + 1), f"unrelated text number {i} lorem ipsum " * (2 - i % 2)]
    docs[3] = docs[0]  # a duplicate text: must not serve as a negative for query 0
    return ContrastiveBatch(QUERIES, ["Retrieve the answer"] * 4 + [None], docs)


def grads(params):
    return torch.cat([p.grad.flatten() for p in params])


def reference_loss(emb, batch, chunks):
    """Embed the same chunks under the same RNG stream, but in one autograd graph, then one backward."""
    q_seqs = emb.tokenize(batch.queries, is_query=True, instructions=batch.instructions)
    d_seqs = emb.tokenize(batch.documents, is_query=False)
    seqs = q_seqs + d_seqs
    reps = [None] * len(seqs)
    for c in chunks:
        ids, mask = emb.collate([seqs[i] for i in c])
        e = emb.forward_tokens(ids, mask)
        for k, i in enumerate(c):
            reps[i] = e[k]
    reps = torch.stack(reps)
    qid, did = text_ids(batch.queries, batch.documents)
    B = len(q_seqs)
    return infonce_loss(reps[:B], reps[B:], 0.02, query_ids=qid, doc_ids=did), seqs


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_gradcache_equals_full_batch_with_lora_dropout(family):
    emb = Embedder.from_config(ModelConfig(path=f"tiny-{family}", lora=LoraConfig(dropout=0.1)), "cpu")
    emb.model.train()
    params = emb.trainable_parameters()
    batch = make_batch()
    torch.manual_seed(1)
    res = contrastive_step(emb, batch, chunk_tokens=24)
    assert res.n_chunks > 2
    g_cache = grads(params).clone()
    for p in params:
        p.grad = None
    torch.manual_seed(1)
    seqs = emb.tokenize(batch.queries, is_query=True, instructions=batch.instructions) + \
        emb.tokenize(batch.documents, is_query=False)
    chunks = make_chunks([len(s) for s in seqs], 24)
    loss, _ = reference_loss(emb, batch, chunks)
    loss.backward()
    g_ref = grads(params)
    assert abs(res.loss - float(loss.detach())) < 1e-5 * abs(float(loss.detach()))
    assert ((g_cache - g_ref).norm() / g_ref.norm()) < 1e-4
    assert g_ref.abs().sum() > 0


def test_gradcache_equals_unchunked_batch_without_dropout():
    emb = Embedder.from_config(ModelConfig(path="tiny-mistral", lora=LoraConfig(dropout=0.0)), "cpu")
    params = emb.trainable_parameters()
    batch = make_batch()
    res = contrastive_step(emb, batch, chunk_tokens=30, max_chunk_seqs=3)
    g_cache = grads(params).clone()
    for p in params:
        p.grad = None
    one = contrastive_step(emb, batch, chunk_tokens=10**6)   # everything in one chunk: single pass
    assert one.n_chunks == 1 and res.n_chunks > 1
    g_full = grads(params)
    assert abs(res.loss - one.loss) < 1e-5 * abs(one.loss)
    assert ((g_cache - g_full).norm() / g_full.norm()) < 1e-4


def test_make_chunks_respects_budget_and_pads_per_chunk():
    lengths = [5, 100, 7, 50, 3, 3, 60, 8]
    chunks = make_chunks(lengths, 120, max_chunk_seqs=3)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for c in chunks:
        assert len(c) <= 3
        assert len(c) == 1 or len(c) * max(lengths[i] for i in c) <= 120
    # longest sequences are grouped together, so short ones never pay for the longest
    assert chunks[0][0] == 1


def test_batch_validation():
    with pytest.raises(ValueError, match="multiple"):
        ContrastiveBatch(["a", "b"], [None, None], ["x", "y", "z"])
    with pytest.raises(ValueError, match="instructions"):
        ContrastiveBatch(["a", "b"], [None], ["x", "y"])
