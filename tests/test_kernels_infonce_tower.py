"""infonce_loss(tower_queries=, tower_query_ids=, query_offset=): one rank's query rows against all gathered
queries (same_tower). The ranks' slices, each scaled by its share of the rows, add up to the full loss and its
gradients, on both backends."""
import pytest
import torch

from embforge.kernels import infonce_loss


def _data(B=6, G=3, H=16):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, generator=g, dtype=torch.float64)
    d = torch.randn(B * G, H, generator=g, dtype=torch.float64)
    qid = torch.arange(B)
    qid[3] = qid[0]                                   # a duplicate query on another "rank"
    did = torch.arange(B * G) + 100
    did[4] = did[12]                                  # query 1's negative is query 4's positive
    return q, d, qid, did, G


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ranks", [2, 3])
def test_slices_sum_to_the_full_same_tower_loss(backend, ranks):
    q, d, qid, did, G = _data()
    if backend == "triton":                           # the kernel computes in fp32
        q, d = q.float(), d.float()
    kw = dict(same_tower=True, backend=backend, matryoshka_dims=[8, 16])
    qf, df = q.clone().requires_grad_(), d.clone().requires_grad_()
    full = infonce_loss(qf, df, 0.05, query_ids=qid, doc_ids=did, **kw)
    full.backward()
    qs, ds = q.clone().requires_grad_(), d.clone().requires_grad_()
    B, b = q.shape[0], q.shape[0] // ranks
    total = 0
    for r in range(ranks):
        off = r * b
        part = infonce_loss(qs[off: off + b], ds, 0.05, positive_index=(off + torch.arange(b)) * G,
                            query_ids=qid[off: off + b], doc_ids=did, tower_queries=qs, tower_query_ids=qid,
                            query_offset=off, **kw)
        total = total + part * (b / B)
    total.backward()
    tol = 1e-10 if q.dtype == torch.float64 else 1e-5
    assert float(total) == pytest.approx(float(full), rel=tol)
    assert torch.allclose(qs.grad, qf.grad, rtol=tol * 10, atol=tol)
    assert torch.allclose(ds.grad, df.grad, rtol=tol * 10, atol=tol)


def test_wrong_offset_or_missing_self_mask_changes_the_loss():
    """The self column must sit at N + query_offset: pointing it elsewhere lets a query compete with itself."""
    q, d, qid, did, G = _data()
    kw = dict(same_tower=True, backend="torch", positive_index=torch.arange(2, 4) * G, doc_ids=did)
    right = infonce_loss(q[2:4], d, 0.05, tower_queries=q, query_offset=2, **kw)
    wrong = infonce_loss(q[2:4], d, 0.05, tower_queries=q, query_offset=0, **kw)
    assert abs(float(right) - float(wrong)) > 1e-3


def test_tower_argument_errors():
    q, d, qid, did, G = _data()
    with pytest.raises(ValueError, match="only used with same_tower"):
        infonce_loss(q[:2], d, tower_queries=q, positive_index=[0, 3])
    with pytest.raises(ValueError, match="outside"):
        infonce_loss(q[:2], d, same_tower=True, tower_queries=q, query_offset=5, positive_index=[0, 3])
    with pytest.raises(ValueError, match="need tower_queries"):
        infonce_loss(q[:2], d, same_tower=True, query_offset=1, positive_index=[0, 3])
