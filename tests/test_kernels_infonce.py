"""InfoNCE (torch and Triton backends) against an independent float64 reference.

Data rules (issue 13), so that every check can fail:
- similarities are unsaturated: random directions, positives at a cosine of about 2 tau, tau between 0.05 and 1, so
  the loss is O(1) and every gradient entry carries signal (`check` asserts the reference loss is > 0.05);
- duplicated texts get identical vectors, so an unmasked duplicate competes with the positive as hard as the
  positive itself;
- each feature test first shows, on the reference, that the feature moves the loss or gradient by a clear margin,
  then compares loss, dL/dq, dL/dd (and dL/dtau) with the reference; tolerances are relative to the reference's
  own magnitude, with no absolute floors.
The Triton epilogue runs in the interpreter on CPU (conftest sets TRITON_INTERPRET=1): shapes stay small and odd.
"""
import pytest
import torch

import embforge.kernels.infonce as K
import embforge.kernels.utils as U   # POISON_BUFFERS lives with the shared allocator
from embforge.kernels import infonce_loss
from infonce_reference import reference_total


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(U, "POISON_BUFFERS", True)


def default_pos(B, N):
    return torch.arange(B) * (N // B)


# ----------------------------------------------------------------------------------------------------------
# Data and comparison helpers
# ----------------------------------------------------------------------------------------------------------
def make(B, K_neg, H, *, tau=0.1, dtype=torch.float32, seed=0, lead=2.0):
    """Random directions with random norms (0.5..2: the kernels must normalize); each positive sits at a cosine of
    about min(0.6, lead * tau) from its query, so the positive's logit leads by ~lead and the softmax is far from
    one-hot."""
    g = torch.Generator().manual_seed(seed)
    N = B * (1 + K_neg)

    def unit(n):
        x = torch.randn(n, H, generator=g, dtype=torch.float64)
        return x / x.norm(dim=1, keepdim=True)

    uq, d, z = unit(B), unit(N), unit(B)
    c = min(0.6, lead * tau)
    d[:: 1 + K_neg] = c * uq + (1 - c * c) ** 0.5 * z
    q = uq * (0.5 + 1.5 * torch.rand(B, 1, generator=g, dtype=torch.float64))
    d = d * (0.5 + 1.5 * torch.rand(N, 1, generator=g, dtype=torch.float64))
    return q.to(dtype), d.to(dtype)


def rel_err(actual, expected):
    """max |actual - expected| relative to max |expected| (no floor: expected must carry signal)."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    scale = expected.abs().max()
    assert scale > 0, "the reference is identically zero: this case tests nothing"
    assert torch.isfinite(actual).all(), "non-finite values"
    return float((actual - expected).abs().max() / scale)


def differs(a, b, margin, what):
    """The data exercises a feature: two reference variants differ by more than `margin` (relative)."""
    e = rel_err(a, b)
    assert e > margin, f"{what}: the feature moves this by only {e:.3g} (relative): the test would be vacuous"


def kernel(q, d, tau, backend, *, grad_out=1.0, tau_tensor=False, **kw):
    """Loss and gradients from the code under test (q, d in their own dtype; tau float or fp32 leaf)."""
    qk, dk = q.clone().requires_grad_(), d.clone().requires_grad_()
    t = torch.tensor(float(tau), requires_grad=True) if tau_tensor else tau
    loss = infonce_loss(qk, dk, t, backend=backend, **kw)
    (loss * grad_out).backward()
    return loss.detach(), qk.grad, dk.grad, (t.grad if tau_tensor else None)


def ref(q, d, tau, *, grad_out=1.0, positive_index=None, **kw):
    """The reference's loss and gradients on the same (already rounded) inputs, in float64."""
    q64 = q.detach().double().requires_grad_()
    d64 = d.detach().double().requires_grad_()
    t64 = torch.tensor(float(tau), dtype=torch.float64, requires_grad=True)
    pos = default_pos(q.shape[0], d.shape[0]) if positive_index is None else positive_index
    loss = reference_total(q64, d64, t64, pos, **kw)
    (loss * grad_out).backward()
    return loss.detach(), q64.grad, d64.grad, t64.grad


REF_KEYS = ("positive_index", "query_ids", "doc_ids", "same_tower", "matryoshka_dims", "matryoshka_weights")
TOL = {torch.float32: dict(loss=2e-5, grad=1e-4, tau=2e-4), torch.bfloat16: dict(loss=2e-5, grad=1e-2, tau=2e-4)}


def check(q, d, tau, backend, *, tol=None, grad_out=1.0, tau_tensor=True, **kw):
    """Kernel vs reference: loss, dq, dd (and dtau), each relative to the reference's magnitude."""
    tol = tol or TOL[q.dtype]
    lk, gq, gd, gt = kernel(q, d, tau, backend, grad_out=grad_out, tau_tensor=tau_tensor, **kw)
    lr, rq, rd, rt = ref(q, d, tau, grad_out=grad_out, **{k: v for k, v in kw.items() if k in REF_KEYS})
    assert float(lr) > 0.05, f"reference loss {float(lr):.3g}: saturated data tests nothing"
    assert gq.dtype == q.dtype and gd.dtype == d.dtype
    assert rel_err(lk, lr) <= tol["loss"], (float(lk), float(lr))
    assert rel_err(gq, rq) <= tol["grad"], f"dL/dq: {rel_err(gq, rq):.3g}"
    assert rel_err(gd, rd) <= tol["grad"], f"dL/dd: {rel_err(gd, rd):.3g}"
    if tau_tensor:
        assert rel_err(gt, rt) <= tol["tau"], f"dL/dtau: {float(gt)} vs {float(rt)}"
    return lr


# ----------------------------------------------------------------------------------------------------------
# Plain loss over shapes, temperatures and dtypes
# ----------------------------------------------------------------------------------------------------------
BK = [(1, 1), (1, 3), (3, 0), (3, 1), (3, 3), (37, 0), (37, 1), (37, 3)]
GRID = [(b, k, h, t) for b, k in BK for h in (16, 96) for t in (0.05, 0.2, 1.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,K_neg,H,tau", GRID, ids=[f"B{b}-K{k}-H{h}-t{t}" for b, k, h, t in GRID])
def test_torch_backend_grid(B, K_neg, H, tau, dtype):
    q, d = make(B, K_neg, H, tau=tau, dtype=dtype, seed=B * 1000 + K_neg * 10 + H)
    check(q, d, tau, "torch", chunk_size=16)


# Small, odd shapes (the interpreter is slow); every B, K, dtype and tau region; a chunked case; N > BLOCK_N.
TRITON_CASES = [(1, 1, 16, 0.1, torch.float32), (1, 4, 24, 1.0, torch.bfloat16), (3, 0, 8, 0.05, torch.float32),
                (5, 2, 40, 0.2, torch.bfloat16), (7, 1, 33, 0.5, torch.float32), (13, 3, 16, 0.07, torch.float32),
                (37, 1, 24, 0.3, torch.bfloat16)]


@pytest.mark.parametrize("B,K_neg,H,tau,dtype", TRITON_CASES,
                         ids=[f"B{b}-K{k}-H{h}-t{t}-{str(dt)[6:]}" for b, k, h, t, dt in TRITON_CASES])
def test_triton_backend(B, K_neg, H, tau, dtype):
    q, d = make(B, K_neg, H, tau=tau, dtype=dtype, seed=B * 1000 + K_neg * 10 + H)
    check(q, d, tau, "triton", chunk_size=16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_more_candidates_than_one_block_and_positive_index(backend):
    """N = 1031 > BLOCK_N = 1024: both sweeps of the Triton epilogue cross a block boundary; positives anywhere."""
    B, N, H, tau = 3, 1031, 8, 0.5
    g = torch.Generator().manual_seed(4)
    q, d = torch.randn(B, H, generator=g), torch.randn(N, H, generator=g)
    pos = torch.tensor([1030, 5, 1024])
    d[pos] = q + 0.8 * torch.randn(B, H, generator=g)
    check(q, d, tau, backend, positive_index=pos, chunk_size=2)


def test_single_candidate_loss_and_gradients_are_exactly_zero():
    """B = 1, no negatives: softmax over one entry, the loss is 0 by definition (not a saturation artefact)."""
    for backend in ("torch", "triton"):
        lk, gq, gd, gt = kernel(torch.randn(1, 16), torch.randn(1, 16), 0.1, backend, tau_tensor=True)
        assert float(lk) == 0.0 and gq.abs().max() == 0 and gd.abs().max() == 0 and float(gt) == 0


# ----------------------------------------------------------------------------------------------------------
# Masking of duplicates / known false negatives, and same-tower negatives
# ----------------------------------------------------------------------------------------------------------
def duplicate_batch(dtype=torch.float32, tau=0.1, B=7, K_neg=2, H=24, seed=11):
    """Every masking rule has a case in this batch, each duplicate pointing exactly the way of what it duplicates
    (cosine 1; norms differ, so normalization stays part of what is tested)."""
    assert B >= 7 and K_neg >= 2
    # Positives lead by ~3.5 logits: a duplicate of a positive then takes a large share of its query's softmax.
    q, d = make(B, K_neg, H, tau=tau, dtype=torch.float64, seed=seed, lead=3.5)
    G = 1 + K_neg
    doc_ids = torch.arange(B * G) + 100
    query_ids = torch.arange(B) + 1000
    # "dup": query 0's positive text is also query 2's hard negative.
    d[2 * G + 1], doc_ids[2 * G + 1] = d[0] * 1.7, doc_ids[0]
    # "qid": query 4's own text is query 5's hard negative (cosine 1 with query 4).
    d[5 * G + 1], doc_ids[5 * G + 1] = q[4] * 0.8, query_ids[4]
    # unknown ids (-1) never mask: an exact copy of query 1's positive stays a live negative for query 1.
    d[3 * G + 2], doc_ids[3 * G + 2] = d[G], -1
    # queries 5 and 6 are the same text (with same_tower, each one's copy is a duplicate of the other query).
    q[6], query_ids[6] = q[5] * 1.2, query_ids[5]
    return q.to(dtype), d.to(dtype), query_ids, doc_ids


def ref_loss(q, d, tau, **kw):
    return ref(q, d, tau, **kw)[0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_masking_of_duplicates_and_query_ids(backend, dtype):
    tau = 0.1
    q, d, qid, did = duplicate_batch(dtype, tau)
    ids = dict(query_ids=qid, doc_ids=did)
    right = ref_loss(q, d, tau, **ids)
    # The data exercises each rule: dropping it moves the (batch-mean) loss by > 1%, 500x the loss tolerance.
    differs(ref_loss(q, d, tau), right, 0.01, "all id masking")
    differs(ref_loss(q, d, tau, skip_rules=("dup",), **ids), right, 0.01, "duplicate-of-positive rule")
    differs(ref_loss(q, d, tau, skip_rules=("qid",), **ids), right, 0.01, "query-id rule")
    G = 3                                   # duplicate_batch's group size (K_neg = 2)
    did_masking_unknown = did.clone()
    did_masking_unknown[3 * G + 2] = did[G]  # give the copy of query 1's positive that positive's id
    differs(ref_loss(q, d, tau, query_ids=qid, doc_ids=did_masking_unknown), right, 0.004, "unknown id kept")
    # The code applies exactly these rules (loss and every gradient), also with doc ids alone.
    check(q, d, tau, backend, chunk_size=3, **ids)
    check(q, d, tau, backend, chunk_size=4, doc_ids=did)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_same_tower(backend):
    tau = 0.1
    q, d, qid, did = duplicate_batch(torch.float32, tau)
    kw = dict(same_tower=True, query_ids=qid, doc_ids=did)
    right = ref(q, d, tau, **kw)
    differs(ref_loss(q, d, tau, query_ids=qid, doc_ids=did), right[0], 0.02, "same_tower on/off")
    differs(ref_loss(q, d, tau, same_tower=True, skip_rules=("self",)), ref_loss(q, d, tau, same_tower=True), 0.5,
            "self column")   # (with ids, a query's own copy is also caught by the query-id rule)
    differs(ref_loss(q, d, tau, skip_rules=("qid",), **kw), right[0], 0.05, "identical queries")
    # The gradient flows through the queries-as-candidates copy too: detaching it visibly changes dL/dq.
    differs(ref(q, d, tau, detach_copy=True, **kw)[1], right[1], 0.02, "gradient through the query copy")
    check(q, d, tau, backend, chunk_size=3, **kw)
    # Same tower without any ids: only the self column is masked.
    check(q, d, tau, backend, same_tower=True)
    # Query ids alone also mask identical queries among the same-tower candidates.
    check(q, d, tau, backend, same_tower=True, query_ids=qid)


# ----------------------------------------------------------------------------------------------------------
# Matryoshka, temperature, gradient scale
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matryoshka_every_term_counts(backend):
    B, K_neg, H, tau = 9, 1, 48, 0.2
    q, d = make(B, K_neg, H, tau=tau, seed=5)
    dims, weights = [H, 16, 8], [1.0, 0.6, 0.3]
    right = ref(q, d, tau, matryoshka_dims=dims, matryoshka_weights=weights)
    # Each term, the full-dimension one included, moves the loss and the gradient; weights follow their dims.
    for drop in range(3):
        keep = [i for i in range(3) if i != drop]
        wrong = ref(q, d, tau, matryoshka_dims=[dims[i] for i in keep], matryoshka_weights=[weights[i] for i in keep])
        differs(wrong[0], right[0], 0.1, f"matryoshka term {dims[drop]}")
        differs(wrong[1], right[1], 0.1, f"matryoshka term {dims[drop]} (dq)")
    differs(ref(q, d, tau, matryoshka_dims=dims, matryoshka_weights=weights[::-1])[0], right[0], 0.05, "weights")
    # only the full-dimension term reaches columns 16.. of the gradient
    assert right[1][:, 16:].abs().max() > 0.1 * right[1].abs().max()
    check(q, d, tau, backend, matryoshka_dims=dims, matryoshka_weights=weights, chunk_size=4)
    # Matryoshka combined with masking and same tower
    q, d, qid, did = duplicate_batch(torch.float32, 0.1, H=32)
    check(q, d, 0.1, backend, matryoshka_dims=[32, 8], matryoshka_weights=[0.7, 1.3], same_tower=True,
          query_ids=qid, doc_ids=did, chunk_size=5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_temperature_tensor_gradient_and_value(backend):
    """dL/dtau against the reference at two temperatures; the loss really depends on tau."""
    q, d = make(6, 3, 24, tau=0.1, seed=2)
    assert abs(float(ref_loss(q, d, 0.07)) - float(ref_loss(q, d, 0.7))) > 0.2
    for tau in (0.07, 0.7):
        _, _, _, rt = ref(q, d, tau)
        assert abs(float(rt)) > 0.01         # the temperature gradient carries signal (50x its tolerance)
        check(q, d, tau, backend, tau_tensor=True)
    # A tau tensor without grad is just a value.
    t = torch.tensor(0.3)
    assert rel_err(infonce_loss(q, d, t, backend=backend), ref_loss(q, d, 0.3)) < 2e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradient_scales_with_the_upstream_gradient(backend):
    """backward of c * L gives c * dL (q, d and tau): the precomputed gradient is scaled by grad_output."""
    q, d, qid, did = duplicate_batch(torch.float32, 0.2)
    check(q, d, 0.2, backend, grad_out=-2.5, query_ids=qid, doc_ids=did, same_tower=True)


# ----------------------------------------------------------------------------------------------------------
# Chunking and no-grad forward
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunking_gives_the_same_loss_and_gradients(backend):
    q, d, qid, did = duplicate_batch(torch.float32, 0.1, B=11, K_neg=2, H=16)
    kw = dict(query_ids=qid, doc_ids=did, same_tower=True)
    _, rq, rd, rt = ref(q, d, 0.1, **kw)
    outs = []
    for chunk in (1, 4, 11):
        check(q, d, 0.1, backend, chunk_size=chunk, **kw)
        outs.append(kernel(q, d, 0.1, backend, chunk_size=chunk, tau_tensor=True, **kw))
    for lk, gq, gd, gt in outs[1:]:
        assert rel_err(lk, outs[0][0]) < 1e-6
        assert rel_err(gq, outs[0][1]) < 1e-5 and rel_err(gd, outs[0][2]) < 1e-5 and rel_err(gt, outs[0][3]) < 1e-5
    # chunk rows from the budget do not depend on B, and the scratch fits the budget
    assert K.choose_chunk_rows(131072, 2048, 65536) == K.choose_chunk_rows(131072, 2048, 10**9)
    assert K.choose_chunk_rows(131072, 2048, 65536) * 131072 * 8 <= 2048 * 2**20
    # a small budget really splits the rows (and still gives the reference's loss)
    assert K.choose_chunk_rows(d.shape[0] + q.shape[0], 1e-3, q.shape[0], backend) < q.shape[0]
    lk = infonce_loss(q, d, 0.1, backend=backend, memory_budget_mb=1e-3, **kw)
    assert rel_err(lk, ref_loss(q, d, 0.1, **kw)) < 2e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_grad_forward_matches_reference(backend):
    q, d, qid, did = duplicate_batch(torch.float32, 0.1)
    kw = dict(query_ids=qid, doc_ids=did, same_tower=True, chunk_size=3)
    right = ref_loss(q, d, 0.1, **{k: v for k, v in kw.items() if k != "chunk_size"})
    with torch.no_grad():
        a = infonce_loss(q.clone().requires_grad_(), d, 0.1, backend=backend, **kw)
    b = infonce_loss(q, d, torch.tensor(0.1), backend=backend, **kw)    # nothing requires grad
    assert not a.requires_grad and not b.requires_grad
    assert rel_err(a, right) < 2e-5 and rel_err(b, right) < 2e-5


def test_gradcheck_float64_with_every_feature():
    """float64 end to end (torch epilogue): autograd's numerical check, masking + same tower + matryoshka + tau."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 8, dtype=torch.float64, generator=g).requires_grad_()
    d = torch.randn(8, 8, dtype=torch.float64, generator=g).requires_grad_()
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    qid, did = torch.tensor([0, 1, 0, 2]), torch.tensor([3, 4, 5, 3, 1, 6, 7, -1])
    kw = dict(query_ids=qid, doc_ids=did, same_tower=True, matryoshka_dims=[8, 3], matryoshka_weights=[1.0, 0.5])
    assert torch.autograd.gradcheck(lambda a, b, t: infonce_loss(a, b, t, backend="torch", chunk_size=3, **kw),
                                    (q, d, tau), eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Properties, robustness, errors
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_properties_rows_of_G_sum_to_zero_and_radial_grad_is_zero(backend):
    B, N, H = 7, 21, 40
    q, d = torch.randn(B, H), torch.randn(N, H)
    S = q @ d.T
    rq, rd = 1 / q.norm(dim=1), 1 / d.norm(dim=1)
    pos = torch.arange(B) * 3
    G = torch.full((B, N), float("nan"))
    epi = K._rows_triton if backend == "triton" else K._rows_torch
    lse, spos, rowdot = epi(S.clone(), rq, rd, pos, None, None, None, None, 1 / 0.2, 1 / (B * 0.2), G)
    G_true = G / rd[None, :]   # the epilogue writes G_ij / |d_j|
    assert torch.isfinite(G).all() and G_true.abs().max() > 0.01
    assert G_true.sum(1).abs().max() < 1e-5 * G_true.abs().max()
    assert rel_err(rowdot, (G_true * (S * rq[:, None] * rd[None, :])).sum(1)) < 1e-5
    qk = q.clone().requires_grad_()
    infonce_loss(qk, d, 0.2, backend=backend).backward()
    radial = (qk.grad * q).sum(1)
    assert radial.abs().max() < 1e-5 * qk.grad.abs().max() * q.norm(dim=1).max()


def test_bf16_low_temperature_is_stable():
    q, d = make(64, 1, 128, dtype=torch.bfloat16)
    q[0] = d[0]  # a perfect match: logit 100 at tau 0.01
    for backend in ("torch", "triton"):
        qk, dk = q.clone().requires_grad_(), d.clone().requires_grad_()
        loss = infonce_loss(qk, dk, 0.01, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(qk.grad).all() and torch.isfinite(dk.grad).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_norm_inputs_are_finite(backend):
    q, d = torch.randn(3, 8), torch.randn(6, 8)
    q[1] = 0
    d[2] = 0
    qk, dk = q.clone().requires_grad_(), d.clone().requires_grad_()
    loss = infonce_loss(qk, dk, 0.02, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(qk.grad).all() and torch.isfinite(dk.grad).all()


@pytest.mark.parametrize("bad,msg", [
    (lambda: infonce_loss(torch.randn(3, 8), torch.randn(7, 8)), "multiple of B"),
    (lambda: infonce_loss(torch.randn(3, 8), torch.randn(6, 9)), "widths differ"),
    (lambda: infonce_loss(torch.randn(3), torch.randn(6, 8)), "2-D"),
    (lambda: infonce_loss(torch.randn(3, 8).int(), torch.randn(6, 8)), "float32/bfloat16"),
    (lambda: infonce_loss(torch.randn(3, 8), torch.randn(6, 8), 0.0), "temperature"),
    (lambda: infonce_loss(torch.randn(3, 8), torch.randn(6, 8), backend="cuda"), "backend"),
    (lambda: infonce_loss(torch.randn(3, 8), torch.randn(6, 8), positive_index=[0, 1, 6]), "positive_index"),
    (lambda: infonce_loss(torch.randn(3, 8), torch.randn(6, 8), positive_index=[0, 1]), "shape"),
    (lambda: infonce_loss(torch.randn(3, 8), torch.randn(6, 8), doc_ids=torch.zeros(6)), "integer"),
    (lambda: infonce_loss(torch.randn(3, 8), torch.randn(6, 8), matryoshka_dims=[9]), "matryoshka"),
    (lambda: infonce_loss(torch.randn(3, 8), torch.randn(6, 8), matryoshka_dims=[8, 4],
                          matryoshka_weights=[1.0]), "matryoshka_weights"),
    (lambda: infonce_loss(torch.randn(3, 8), torch.randn(6, 8), memory_budget_mb=1e-9), "too small"),
    (lambda: infonce_loss(torch.randn(3, 8), torch.randn(6, 8, device="meta")), "device|meta"),
])
def test_bad_inputs_give_clear_errors(bad, msg):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=msg):
        bad()


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        infonce_loss(torch.randn(2, 4), torch.randn(2, 4), backend="triton")


# ----------------------------------------------------------------------------------------------------------
# GPU: the compiled Triton kernel and the bf16 tensor-core matmuls, with the same data rules.
# ----------------------------------------------------------------------------------------------------------
# bf16 on GPU: S and the gradient matmuls take bf16 operands (G' and the normalized queries are rounded to bf16),
# accumulated in fp32; the loss stays fp32-accurate. Tolerances relative to each quantity's own magnitude.
GPU_TOL = {torch.float32: dict(loss=1e-4, grad=1e-3, tau=1e-3), torch.bfloat16: dict(loss=1e-3, grad=3e-2, tau=1e-2)}


def device_case(device, B, K_neg, H, tau, dtype, features):
    """One GPU case, also run on CPU (Triton interpreter, small shape) so that the check itself is exercised."""
    kw = {}
    if features == "plain":
        q, d = make(B, K_neg, H, tau=tau, dtype=dtype, seed=B + H)
    else:
        q, d, qid, did = duplicate_batch(dtype, tau, B=B, K_neg=K_neg, H=H, seed=B + H)
        kw = dict(query_ids=qid, doc_ids=did, same_tower=True, matryoshka_dims=[H, H // 4],
                  matryoshka_weights=[1.0, 0.5])
        plain = {k: kw[k] for k in ("matryoshka_dims", "matryoshka_weights")}
        differs(ref_loss(q, d, tau, **plain), ref_loss(q, d, tau, **kw), 0.02, "masking + same tower")
    lr, rq, rd, rt = ref(q, d, tau, **kw)
    assert float(lr) > 0.05, f"reference loss {float(lr):.3g}: saturated data tests nothing"
    qk, dk = q.to(device).requires_grad_(), d.to(device).requires_grad_()
    t = torch.tensor(tau, device=device, requires_grad=True)
    dev_kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
    loss = infonce_loss(qk, dk, t, backend="triton", chunk_size=64, **dev_kw)
    loss.backward()
    tol = GPU_TOL[dtype]
    assert qk.grad.dtype == dtype and dk.grad.dtype == dtype
    assert rel_err(loss.detach().cpu(), lr) <= tol["loss"], (float(loss), float(lr))
    assert rel_err(qk.grad.cpu(), rq) <= tol["grad"], f"dq {rel_err(qk.grad.cpu(), rq):.3g}"
    assert rel_err(dk.grad.cpu(), rd) <= tol["grad"], f"dd {rel_err(dk.grad.cpu(), rd):.3g}"
    assert rel_err(t.grad.cpu(), rt) <= tol["tau"], f"dtau {float(t.grad)} vs {float(rt)}"


GPU_CASES = [(37, 3, 384, 0.05, "plain"), (130, 7, 96, 0.1, "plain"), (300, 1, 4096, 0.05, "plain"),
             (1, 3, 64, 1.0, "plain"), (200, 2, 1024, 0.1, "features"), (129, 2, 256, 0.5, "features")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B,K_neg,H,tau,features", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_triton_matches_reference(B, K_neg, H, tau, features, dtype, monkeypatch):
    compiled_kernels(monkeypatch)
    device_case("cuda", B, K_neg, H, tau, dtype, features)


def compiled_kernels(monkeypatch):
    """conftest sets TRITON_INTERPRET=1 before triton is imported, and Triton chooses interpreter or compiler when a
    kernel is decorated: swap in compiled versions of the same kernel functions for the GPU tests."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if hasattr(triton, "knobs"):
        monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    import embforge.kernels.infonce_terms as KT
    for module, name in ((K, "_infonce_rows_kernel"), (U, "_project_rows_kernel"), (KT, "_segment_kernel")):
        kernel = getattr(module, name)
        if isinstance(kernel, InterpretedFunction):
            monkeypatch.setattr(module, name, JITFunction(kernel.fn))
        assert isinstance(getattr(module, name), JITFunction)


@pytest.mark.parametrize("features", ["plain", "features"])
def test_gpu_check_runs_on_cpu(features):
    device_case("cpu", 7, 2, 32, 0.1, torch.float32, features)


def test_compiled_kernel_swap_is_undone(monkeypatch):
    """The GPU tests' kernel swap constructs on CPU too (nothing compiles until a launch) and is undone after."""
    import embforge.kernels.infonce_terms as KT
    before = K._infonce_rows_kernel, U._project_rows_kernel, KT._segment_kernel
    with monkeypatch.context() as m:
        compiled_kernels(m)
    assert (K._infonce_rows_kernel, U._project_rows_kernel, KT._segment_kernel) == before
