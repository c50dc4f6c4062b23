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




def reference_terms(q, d, tau, pos, *, directions=("q2d",), query_ids=None, doc_ids=None, margin=None,
                    in_batch=True, group_size=None, teacher=None, teacher_tau=1.0, distill_weight=0.0,
                    skip_rules=(), eps=1e-6):
    """The issue-22 loss, from its definitions, one query row at a time over materialized matrices.

    Row i's partition: its positive s(q_i, d_p(i))/tau plus, per direction, q2d s(q_i, d_j) (j != p(i)),
    q2q s(q_i, q_k) (k != i), d2q s(q_k, d_p(i)) (k != i), d2d s(d_p(i), d_l) (l != p(i)), all over tau. A negative
    is dropped when its known id equals query i's or p(i)'s id ("ids"), or when its cosine exceeds
    s(q_i, d_p(i)) + margin ("margin", decided without gradient); in_batch=False keeps q2d's group d[p(i):p(i)+G].
    Distillation: distill_weight * mean over scored rows (not all-NaN) of KL(softmax(T_i/teacher_tau) ||
    softmax(s(q_i, d[p(i):p(i)+G])/tau)). `skip_rules` ("ids", "margin", "self": q2q/d2q/d2d keep the anchor's own entry, "nan_rows") builds wrong
    variants, to show that the data exercises each rule."""
    B, N = q.shape[0], d.shape[0]
    u = q / q.norm(dim=1, keepdim=True).clamp_min(eps)
    v = d / d.norm(dim=1, keepdim=True).clamp_min(eps)
    pos = torch.as_tensor(pos).long()
    did = torch.full((N,), -1) if doc_ids is None else torch.as_tensor(doc_ids).long()
    qid = torch.full((B,), -1) if query_ids is None else torch.as_tensor(query_ids).long()
    G = group_size if group_size is not None else (teacher.shape[1] if teacher is not None else N // B)
    QD, QQ = u @ v.T, u @ u.T                  # [B, N], [B, B]
    DQ, DD = v[pos] @ u.T, v[pos] @ v.T        # row i: i's positive against every query / candidate
    losses = []
    for i in range(B):
        p = int(pos[i])
        s_pos = QD[i, p]
        threshold = float(s_pos.detach()) + (margin if margin is not None else 0.0)

        def allowed(cos_row, ids, excluded):
            keep = torch.ones(cos_row.shape[0], dtype=torch.bool)
            if excluded is not None:
                keep[excluded] = False
            if "ids" not in skip_rules:
                keep &= ~((ids >= 0) & ((ids == qid[i]) | (ids == did[p])))
            if margin is not None and "margin" not in skip_rules:
                keep &= ~(cos_row.detach() > threshold)
            return keep

        logits = [s_pos.reshape(1)]
        if "q2d" in directions:
            keep = allowed(QD[i], did, p)
            if not in_batch:
                own = torch.zeros(N, dtype=torch.bool)
                own[p: p + G] = True
                keep &= own
            logits.append(QD[i][keep])
        self_q = None if "self" in skip_rules else i
        if "q2q" in directions:
            logits.append(QQ[i][allowed(QQ[i], qid, self_q)])
        if "d2q" in directions:
            logits.append(DQ[i][allowed(DQ[i], qid, self_q)])
        if "d2d" in directions:
            logits.append(DD[i][allowed(DD[i], did, None if "self" in skip_rules else p)])
        z = torch.cat(logits) / tau
        losses.append(torch.logsumexp(z, 0) - z[0])
    loss = torch.stack(losses).mean()
    if teacher is not None and distill_weight:
        kls = []
        for i in range(B):
            t = torch.as_tensor(teacher[i], dtype=q.dtype)
            if torch.isnan(t).all() and "nan_rows" not in skip_rules:
                continue
            t = torch.nan_to_num(t, nan=0.0)
            p = int(pos[i])
            log_pt = torch.log_softmax(t / teacher_tau, 0)
            log_ps = torch.log_softmax(QD[i, p: p + G] / tau, 0)
            kls.append((log_pt.exp() * (log_pt - log_ps)).sum())
        if kls:
            loss = loss + distill_weight * torch.stack(kls).mean()
    return loss


def reference_terms_total(q, d, tau, pos, *, matryoshka_dims=None, matryoshka_weights=None, **kw):
    """With Matryoshka dims, each prefix's loss is the whole loss at that prefix (weighted sum)."""
    if matryoshka_dims is None:
        return reference_terms(q, d, tau, pos, **kw)
    weights = matryoshka_weights or [1.0] * len(matryoshka_dims)
    return sum(w * reference_terms(q[:, :m], d[:, :m], tau, pos, **kw) for m, w in zip(matryoshka_dims, weights))
