"""The InfoNCE reference the tests compare against: plain torch, float64, the full B x N matrix, its own masking.

Written from the formula (L = mean_i LSE_j(s_ij/tau) - s_ip/tau) and the documented masking rules, not from
embforge's code, which it never imports. Shared by the kernel tests and the GradCache tests; lives in tests/
(pytest puts this folder on sys.path)."""
import torch


def reference(q, d, tau, pos, *, query_ids=None, doc_ids=None, same_tower=False, detach_copy=False,
              skip_rules=(), eps=1e-6):
    """L = mean_i [ LSE_{j allowed}(s_ij / tau) - s_{i,p(i)} / tau ], s = cosine similarity.

    Candidate j is not allowed for query i when (j is not i's positive and) its known id (>= 0) equals the id of
    i's positive ("dup") or of query i ("qid"), or, with same_tower, j is query i's own copy ("self").
    `skip_rules` / `detach_copy` build deliberately wrong variants, to show that the data exercises each rule."""
    B, N = q.shape[0], d.shape[0]
    cands = torch.cat([d, q.detach() if detach_copy else q]) if same_tower else d
    u = q / q.norm(dim=1, keepdim=True).clamp_min(eps)
    v = cands / cands.norm(dim=1, keepdim=True).clamp_min(eps)
    logits = (u @ v.T) / tau
    rows = torch.arange(B)
    pos = torch.as_tensor(pos)
    did = torch.full((N,), -1) if doc_ids is None else torch.as_tensor(doc_ids).long()
    qid = torch.full((B,), -1) if query_ids is None else torch.as_tensor(query_ids).long()
    cid = torch.cat([did, qid]) if same_tower else did
    banned = torch.zeros(logits.shape, dtype=torch.bool)
    known = (cid >= 0)[None, :]
    if "dup" not in skip_rules:
        banned |= known & (cid[None, :] == cid[pos][:, None])
    if "qid" not in skip_rules:
        banned |= known & (cid[None, :] == qid[:, None])
    if same_tower and "self" not in skip_rules:
        banned[rows, N + rows] = True
    banned[rows, pos] = False
    logits = logits.masked_fill(banned, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - logits[rows, pos]).mean()


def reference_total(q, d, tau, pos, *, matryoshka_dims=None, matryoshka_weights=None, **kw):
    if matryoshka_dims is None:
        return reference(q, d, tau, pos, **kw)
    weights = matryoshka_weights or [1.0] * len(matryoshka_dims)
    return sum(w * reference(q[:, :m], d[:, :m], tau, pos, **kw) for m, w in zip(matryoshka_dims, weights))


