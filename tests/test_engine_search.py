import torch

from embforge.engine import search as search_mod
from embforge.engine.search import search, search_chunks


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def test_chunked_topk_equals_full_topk():
    g = torch.Generator().manual_seed(0)
    q, d = _unit(torch.randn(37, 16, generator=g)), _unit(torch.randn(1000, 16, generator=g))
    ref_s, ref_i = (q @ d.T).topk(25, dim=1)
    for chunk, block in [(1000, 1024), (64, 8), (7, 5), (1, 37)]:
        s, i = search(q, d, 25, doc_chunk=chunk, query_block=block)
        assert torch.equal(i, ref_i), (chunk, block)
        assert torch.allclose(s, ref_s)


def test_corpus_smaller_than_k_returns_only_real_documents():
    q, d = _unit(torch.randn(3, 4)), _unit(torch.randn(5, 4))
    s, i = search(q, d, 100, doc_chunk=2)
    assert i.shape == (3, 5)
    assert sorted(i[0].tolist()) == [0, 1, 2, 3, 4]
    assert torch.all(s[:, :-1] >= s[:, 1:])


def test_million_doc_stream_keeps_score_blocks_bounded(monkeypatch):
    """A 1M-document corpus, generated chunk by chunk, is searched without ever scoring more than one chunk."""
    n_docs, dim, chunk, k = 1_000_000, 8, 65_536, 10
    planted = {0: 123_456, 1: 999_999, 2: 7}  # query -> the doc that equals it (cosine 1, all others < 1)
    g = torch.Generator().manual_seed(1)
    queries = _unit(torch.randn(3, dim, generator=g))

    def stream():
        for start in range(0, n_docs, chunk):
            block = _unit(torch.randn(min(chunk, n_docs - start), dim, generator=g)) * 0.999
            for qi, doc in planted.items():
                if start <= doc < start + block.shape[0]:
                    block[doc - start] = queries[qi]
            yield block

    shapes = []
    real = search_mod._score_block
    monkeypatch.setattr(search_mod, "_score_block", lambda a, b: shapes.append(tuple(b.shape)) or real(a, b))
    scores, idx = search_chunks(queries, stream(), k, query_block=2)
    assert max(s[0] for s in shapes) <= chunk  # never more than one chunk of scores at a time
    assert sum(s[0] for s in shapes) == 2 * n_docs  # every document scored, in 2 query blocks
    assert [idx[qi, 0].item() for qi in planted] == list(planted.values())
    assert idx.shape == (3, k)
