"""InfoNCE kernel vs an independent float64 reference (Triton epilogue runs in the interpreter on CPU)."""
import itertools

import pytest
import torch

import embforge.kernels.infonce as K
from embforge.kernels import infonce_loss


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(K, "POISON_BUFFERS", True)


def reference(q, d, tau, pos, *, cand_ids=None, q_ids=None, same_tower=False, eps=1e-6):
    """Written from the formula, in float64: L = mean_i LSE_j(s_ij/tau) - s_ip/tau over allowed j."""
    q, d = q.double(), d.double()
    u = q / q.norm(dim=1, keepdim=True).clamp_min(eps)
    cands = torch.cat([d, q]) if same_tower else d
    v = cands / cands.norm(dim=1, keepdim=True).clamp_min(eps)
    s = u @ v.T
    B, N = s.shape
    allowed = torch.ones(B, N, dtype=torch.bool)
    for i in range(B):
        for j in range(N):
            if j == pos[i]:
                continue
            if same_tower and j == d.shape[0] + i:
                allowed[i, j] = False
            if cand_ids is not None:
                cid = int(cand_ids[j])
                if cid >= 0 and (cid == int(cand_ids[pos[i]]) or (q_ids is not None and cid == int(q_ids[i]))):
                    allowed[i, j] = False
    logits = (s / tau).masked_fill(~allowed, float("-inf"))
    return (torch.logsumexp(logits, 1) - logits[torch.arange(B), pos]).mean()


def run_both(q, d, tau, backend, **kw):
    """Loss and grads from the kernel, and from the float64 reference on the same (rounded) inputs."""
    qk = q.detach().clone().requires_grad_()
    dk = d.detach().clone().requires_grad_()
    loss = infonce_loss(qk, dk, tau, backend=backend, **kw)
    loss.backward()
    q64 = q.detach().double().requires_grad_()
    d64 = d.detach().double().requires_grad_()
    B, N = q.shape[0], d.shape[0]
    pos = kw.get("positive_index")
    pos = torch.arange(B) * (N // B) if pos is None else torch.as_tensor(pos)
    cand_ids = kw.get("doc_ids")
    if cand_ids is not None and kw.get("same_tower"):
        q_ids = kw.get("query_ids")
        cand_ids = torch.cat([torch.as_tensor(cand_ids),
                              torch.as_tensor(q_ids) if q_ids is not None else torch.full((B,), -1)])
    ref = reference(q64, d64, tau, pos, cand_ids=cand_ids, q_ids=kw.get("query_ids"),
                    same_tower=kw.get("same_tower", False))
    ref.backward()
    return loss, qk.grad, dk.grad, ref, q64.grad, d64.grad


def assert_close_rel(actual, expected, rtol, what, natural_scale=0.0):
    """Max error relative to the largest reference entry; a saturated loss (all grads ~0) is compared
    against 1% of the gradient's natural scale 1/(B tau sqrt(H)) instead."""
    actual = actual.double()
    scale = expected.abs().max().clamp_min(max(1e-12, 0.01 * natural_scale))
    err = (actual - expected).abs().max() / scale
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert err <= rtol, f"{what}: max error {err:.3g} (relative to max |ref| {scale:.3g}) > {rtol}"


TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (2e-5, 1.5e-2)}  # (loss rtol, grad rtol)


def make(B, K_neg, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, generator=g).to(dtype)
    d = torch.randn(B * (1 + K_neg), H, generator=g)
    # Make positives genuinely similar so low temperatures give peaked, non-trivial distributions.
    d[:: 1 + K_neg] = q.float() + 0.7 * torch.randn(B, H, generator=g)
    return q, d.to(dtype)


def check_case(B, K_neg, H, tau, dtype, backend, **kw):
    q, d = make(B, K_neg, H, dtype, seed=B * 1000 + K_neg * 10 + H)
    loss, gq, gd, ref, rq, rd = run_both(q, d, tau, backend, chunk_size=kw.pop("chunk_size", 16), **kw)
    lt, gt = TOL[dtype]
    assert abs(float(loss.detach()) - float(ref)) <= lt * max(1.0, abs(float(ref))), (float(loss.detach()), float(ref))
    assert gq.dtype == dtype and gd.dtype == dtype
    natural = 1.0 / (B * tau * H ** 0.5)
    assert_close_rel(gq, rq, gt, "dL/dq", natural)
    assert_close_rel(gd, rd, gt, "dL/dd", natural)


GRID = list(itertools.product([1, 3, 37, 130], [0, 1, 3, 7], [16, 96, 384], [0.01, 0.02, 0.05, 1.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,K_neg,H,tau", GRID, ids=[f"B{b}-K{k}-H{h}-t{t}" for b, k, h, t in GRID])
def test_torch_backend_full_grid(B, K_neg, H, tau, dtype):
    check_case(B, K_neg, H, tau, dtype, "torch")


# The interpreter is slow: cover every value of every axis, and every (B, K) pair, with tau/H/dtype rotating.
TRITON_CASES = [(b, k, [16, 96, 384][(i + j) % 3], [0.01, 0.02, 0.05, 1.0][(i + 2 * j) % 4],
                 [torch.float32, torch.bfloat16][(i + j) % 2])
                for i, b in enumerate([1, 3, 37, 130]) for j, k in enumerate([0, 1, 3, 7])]


@pytest.mark.parametrize("B,K_neg,H,tau,dtype", TRITON_CASES,
                         ids=[f"B{b}-K{k}-H{h}-t{t}-{str(dt)[6:]}" for b, k, h, t, dt in TRITON_CASES])
def test_triton_backend(B, K_neg, H, tau, dtype):
    check_case(B, K_neg, H, tau, dtype, "triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_false_negative_masking_and_same_tower(backend, dtype):
    B, K_neg, H = 13, 2, 48
    q, d = make(B, K_neg, H, dtype, seed=7)
    N = d.shape[0]
    g = torch.Generator().manual_seed(3)
    doc_ids = torch.randint(0, 9, (N,), generator=g)   # many collisions -> many masked entries
    doc_ids[::5] = -1                                   # unknown ids never mask
    query_ids = torch.randint(0, 9, (B,), generator=g)
    for same_tower in (False, True):
        check_case(B, K_neg, H, 0.02, dtype, backend, doc_ids=doc_ids, query_ids=query_ids,
                   same_tower=same_tower, chunk_size=5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_positive_index_override(backend):
    B, H = 9, 32
    q, d = make(B, 2, H, torch.float32)
    perm_pos = torch.randperm(d.shape[0], generator=torch.Generator().manual_seed(1))[:B]
    check_case(B, 2, H, 0.05, torch.float32, backend, positive_index=perm_pos)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matryoshka(backend):
    B, K_neg, H = 11, 1, 64
    q, d = make(B, K_neg, H, torch.float32)
    qk, dk = q.clone().requires_grad_(), d.clone().requires_grad_()
    loss = infonce_loss(qk, dk, 0.02, matryoshka_dims=[64, 16], matryoshka_weights=[1.0, 0.5], backend=backend)
    loss.backward()
    q64, d64 = q.double().requires_grad_(), d.double().requires_grad_()
    pos = torch.arange(B) * (1 + K_neg)
    ref = reference(q64, d64, 0.02, pos) + 0.5 * reference(q64[:, :16], d64[:, :16], 0.02, pos)
    ref.backward()
    # fp32 loss = lse - s_p/tau cancels terms of size ~1/tau: compare on that scale
    assert abs(float(loss.detach()) - float(ref)) < 2e-6 / 0.02
    assert_close_rel(qk.grad, q64.grad, 1e-4, "dq")
    assert_close_rel(dk.grad, d64.grad, 1e-4, "dd")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_learnable_temperature_gradient(backend):
    q, d = make(6, 3, 24, torch.float32)
    tau = torch.tensor(0.05, requires_grad=True)
    loss = infonce_loss(q, d, tau, backend=backend)
    loss.backward()
    tau64 = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    ref = reference(q.double(), d.double(), tau64, torch.arange(6) * 4)
    ref.backward()
    assert abs(float(tau.grad) - float(tau64.grad)) < 1e-4 * abs(float(tau64.grad))


def test_gradcheck_float64():
    backend = "torch"  # float64 end to end; the Triton epilogue is fp32 and is checked against float64 above
    q = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    d = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, t: infonce_loss(a, b, t, backend=backend, chunk_size=3),
                                    (q, d, tau), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_properties_rows_of_G_sum_to_zero_and_radial_grad_is_zero(backend):
    B, N, H = 7, 21, 40
    q, d = torch.randn(B, H), torch.randn(N, H)
    S = q @ d.T
    rq, rd = 1 / q.norm(dim=1), 1 / d.norm(dim=1)
    pos = torch.arange(B) * 3
    G = torch.full((B, N), float("nan"))
    epi = K._rows_triton if backend == "triton" else K._rows_torch
    lse, spos, rowdot = epi(S.clone(), rq, rd, pos, None, None, None, None, 1 / 0.02, 1 / (B * 0.02), G)
    G_true = G / rd[None, :]   # the epilogue writes G_ij / |d_j|
    assert torch.isfinite(G).all()
    assert G_true.sum(1).abs().max() < 1e-5
    assert torch.allclose(rowdot, (G_true * (S * rq[:, None] * rd[None, :])).sum(1), atol=1e-5)
    qk = q.clone().requires_grad_()
    infonce_loss(qk, d, 0.02, backend=backend).backward()
    radial = (qk.grad * q).sum(1)
    assert radial.abs().max() < 1e-5 * qk.grad.abs().max() * q.norm(dim=1).max()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunking_does_not_change_result_and_memory_is_bounded(backend):
    q, d = make(40, 3, 32, torch.float32)
    losses = []
    for chunk in (1, 7, 40):
        qk = q.clone().requires_grad_()
        losses.append((float(infonce_loss(qk, d, 0.02, backend=backend, chunk_size=chunk)), qk.grad))
    assert max(abs(a - losses[0][0]) for a, _ in losses) < 1e-5
    # chunk rows from the budget do not depend on B
    assert K.choose_chunk_rows(131072, 2048, 65536) == K.choose_chunk_rows(131072, 2048, 10**9)
    assert K.choose_chunk_rows(131072, 2048, 65536) * 131072 * 8 <= 2048 * 2**20


def test_bf16_low_temperature_is_stable():
    q, d = make(64, 1, 128, torch.bfloat16)
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


def test_no_grad_forward_matches():
    q, d = make(10, 1, 16, torch.float32)
    with torch.no_grad():
        a = infonce_loss(q, d, 0.02)
    b = infonce_loss(q.clone().requires_grad_(), d, 0.02)
    assert abs(float(a) - float(b)) < 1e-6


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B,K_neg,H,tau", [(37, 3, 384, 0.01), (130, 7, 96, 0.02), (300, 1, 4096, 0.02),
                                           (1, 0, 16, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_triton_matches_reference(B, K_neg, H, tau, dtype, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, d = make(B, K_neg, H, dtype, seed=5)
    q, d = q.cuda(), d.cuda()
    qk, dk = q.clone().requires_grad_(), d.clone().requires_grad_()
    loss = infonce_loss(qk, dk, tau, chunk_size=64)   # auto -> triton on CUDA
    loss.backward()
    q64, d64 = q.double().cpu().requires_grad_(), d.double().cpu().requires_grad_()
    ref = reference(q64, d64, tau, torch.arange(B) * (1 + K_neg))
    ref.backward()
    lt, gt = TOL[dtype]
    assert abs(float(loss.detach()) - float(ref)) <= 1e-4 * max(1.0, abs(float(ref)))
    natural = 1.0 / (B * tau * H ** 0.5)
    assert_close_rel(qk.grad.cpu(), q64.grad, gt, "dq", natural)
    assert_close_rel(dk.grad.cpu(), d64.grad, gt, "dd", natural)
