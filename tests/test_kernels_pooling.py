"""Pooling kernels (Triton, run in the interpreter on CPU) and the torch path vs an independent float64 reference."""
import itertools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest sets it too)

import pytest  # noqa: E402
import torch  # noqa: E402

import embforge.kernels.pooling as P  # noqa: E402
from embforge.kernels import last_token_pool, last_token_pool_packed, mean_pool, mean_pool_packed  # noqa: E402

EPS = 1e-6


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    # Every output buffer starts as NaN: a kernel that skips an element shows up as a non-finite value.
    monkeypatch.setattr(P, "POISON_BUFFERS", True)


# ---------------------------------------------------------------------------------------------------------
# float64 reference, written from the definitions with explicit loops (shares no code with the module)
# ---------------------------------------------------------------------------------------------------------
def ref_normalize(rows, normalize):
    """Row-wise x / max(|x|, eps); the branch is taken on the value so autograd never sees sqrt at 0."""
    if not normalize:
        return rows
    out = []
    for x in rows:
        norm_sq = (x * x).sum()
        out.append(x / torch.sqrt(norm_sq) if norm_sq.item() >= EPS ** 2 else x / EPS)
    return torch.stack(out)


def weights_from_mask(mask, mode):
    """[B, T] pooling weights built by scanning the mask in Python: one-hot at the last non-zero entry, or
    1/count at every non-zero entry."""
    B, T = mask.shape
    w = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        real = [t for t in range(T) if mask[b, t] != 0]
        if mode == "last":
            w[b, real[-1]] = 1.0
        else:
            for t in real:
                w[b, t] = 1.0 / len(real)
    return w


def ref_last_token(hidden, mask, normalize=True):
    return ref_normalize(torch.einsum("bt,bth->bh", weights_from_mask(mask, "last"), hidden), normalize)


def ref_packed(hidden, cu, normalize=True):
    sel = torch.zeros(len(cu) - 1, hidden.shape[0], dtype=torch.float64)
    for i in range(len(cu) - 1):
        sel[i, int(cu[i + 1]) - 1] = 1.0
    return ref_normalize(sel @ hidden, normalize)


def ref_mean_packed(hidden, cu, normalize=True):
    sel = torch.zeros(len(cu) - 1, hidden.shape[0], dtype=torch.float64)
    for i in range(len(cu) - 1):
        start, end = int(cu[i]), int(cu[i + 1])
        sel[i, start:end] = 1.0 / (end - start)
    return ref_normalize(sel @ hidden, normalize)


def ref_mean(hidden, mask, normalize=True):
    return ref_normalize(torch.einsum("bt,bth->bh", weights_from_mask(mask, "mean"), hidden), normalize)


def make_mask(B, T, padding, g):
    """Random lengths in [1, T]; 'left' / 'right' padding, or 'holes' (arbitrary zeros, ragged)."""
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T  # one full row
    pos = torch.arange(T)
    if padding == "right":
        return (pos[None, :] < lengths[:, None]).long()
    if padding == "left":
        return (pos[None, :] >= T - lengths[:, None]).long()
    m = (torch.rand(B, T, generator=g) < 0.5).long()
    m[torch.arange(B), torch.randint(0, T, (B,), generator=g)] = 1
    return m


TOL = {torch.float32: (2e-6, 2e-5), torch.bfloat16: (8e-3, 1.6e-2)}  # (output, gradient) max-abs / max|ref|


def check(actual, expected, tol, what):
    assert actual.dtype in (torch.float32, torch.bfloat16, torch.float16)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten output?)"
    scale = expected.abs().max().clamp_min(1e-12)
    err = ((actual.double() - expected).abs().max() / scale).item()
    assert err <= tol, f"{what}: max error {err:.3g} relative to max |ref| {scale:.3g} > {tol}"


def run_case(fn, ref_fn, hidden, selector, backend, normalize=True, out_dtype=None):
    """Output and grad from the module, and from the float64 reference on the same (rounded) inputs."""
    h = hidden.detach().clone().requires_grad_()
    out = fn(h, selector, normalize=normalize, backend=backend, out_dtype=out_dtype)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g.to(out.dtype))
    h64 = hidden.detach().double().requires_grad_()
    ref = ref_fn(h64, selector, normalize)
    ref.backward(g.to(out.dtype).double())
    return out, h.grad, ref, h64.grad


SHAPES = list(itertools.product([1, 3, 37], [1, 5, 33], [16, 96, 384]))


@pytest.mark.parametrize("B,T,H", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_last_token_padded(B, T, H, dtype):
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + H)
    hidden = (3 * torch.randn(B, T, H, generator=g)).to(dtype)
    for padding in ("left", "right", "holes"):
        mask = make_mask(B, T, padding, g)
        out, grad, ref, ref_grad = run_case(last_token_pool, ref_last_token, hidden, mask, "triton")
        what = f"B={B} T={T} H={H} {dtype} {padding}"
        assert out.shape == (B, H) and out.dtype == dtype and grad.dtype == dtype
        check(out, ref, TOL[dtype][0], "output " + what)
        check(grad, ref_grad, TOL[dtype][1], "grad " + what)
        # Only the pooled rows get gradient; every other position is exactly zero.
        pooled = torch.zeros(B, T, dtype=torch.bool)
        pooled[torch.arange(B), P.last_token_index(mask)] = True
        assert (grad[~pooled] == 0).all(), what
        assert (grad[pooled].abs().sum(-1) > 0).all(), what


@pytest.mark.parametrize("B,H", list(itertools.product([1, 3, 37], [16, 96, 384])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_last_token_packed(B, H, dtype, cu_dtype):
    g = torch.Generator().manual_seed(B * 7 + H)
    lengths = torch.randint(1, 34, (B,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(cu_dtype)
    total = int(cu[-1]) + 3  # trailing alignment rows beyond the last sequence are allowed
    hidden = (3 * torch.randn(total, H, generator=g)).to(dtype)
    out, grad, ref, ref_grad = run_case(last_token_pool_packed, ref_packed, hidden, cu, "triton")
    check(out, ref, TOL[dtype][0], f"packed output B={B} H={H}")
    check(grad, ref_grad, TOL[dtype][1], f"packed grad B={B} H={H}")
    pooled = torch.zeros(total, dtype=torch.bool)
    pooled[cu[1:].long() - 1] = True
    assert (grad[~pooled] == 0).all()


@pytest.mark.parametrize("B,H", [(1, 16), (3, 96), (9, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_mean_pool_packed(B, H, dtype, normalize):
    g = torch.Generator().manual_seed(B * 11 + H)
    lengths = torch.randint(1, 40, (B,), generator=g)
    lengths[0] = 1  # a one-token sequence must stay its own mean (never merged into a neighbour)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    total = int(cu[-1]) + 2  # trailing alignment rows get no gradient
    hidden = (torch.randn(total, H, generator=g) + torch.randn(H, generator=g)).to(dtype)
    for backend in ("triton", "torch"):
        out, grad, ref, ref_grad = run_case(mean_pool_packed, ref_mean_packed, hidden, cu, backend,
                                            normalize=normalize)
        what = f"packed mean {backend} B={B} H={H} {dtype} normalize={normalize}"
        assert out.shape == (B, H) and out.dtype == dtype and grad.dtype == dtype
        check(out, ref, TOL[dtype][0], what)
        check(grad, ref_grad, TOL[dtype][1], what + " grad")
        assert (grad[int(cu[-1]):] == 0).all(), what


def test_mean_pool_packed_equals_padded_mean():
    """The same sequences packed and right-padded pool to the same rows."""
    g = torch.Generator().manual_seed(4)
    lengths = [5, 1, 12, 3]
    rows = [torch.randn(n, 32, generator=g) for n in lengths]
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)))
    padded = torch.zeros(len(rows), max(lengths), 32)
    mask = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, : len(r)], mask[i, : len(r)] = r, 1
    a = mean_pool_packed(torch.cat(rows), cu, backend="triton")
    b = mean_pool(padded, mask, backend="triton")
    assert (a - b).abs().max() < 1e-6


# Mean pooling is the slowest kernel in the interpreter (2-D tiles over B x T x H): each shape takes one padding
# layout, cycling so that every layout meets every B, T and H.
@pytest.mark.parametrize("case", range(len(SHAPES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_pool(case, dtype):
    B, T, H = SHAPES[case]
    i, j, k = case // 9, case // 3 % 3, case % 3
    padding, normalize = [("left", True), ("right", False), ("holes", True)][(i + j + k) % 3]  # a Latin square
    g = torch.Generator().manual_seed(case)
    # A common offset makes the mean much larger than its noise, so the normalization is not near-trivial.
    hidden = (torch.randn(B, T, H, generator=g) + torch.randn(H, generator=g)).to(dtype)
    mask = make_mask(B, T, padding, g)
    out, grad, ref, ref_grad = run_case(mean_pool, ref_mean, hidden, mask, "triton", normalize=normalize)
    what = f"B={B} T={T} H={H} {dtype} {padding} normalize={normalize}"
    assert out.shape == (B, H) and out.dtype == dtype and grad.dtype == dtype
    check(out, ref, TOL[dtype][0], "mean output " + what)
    check(grad, ref_grad, TOL[dtype][1], "mean grad " + what)
    assert (grad[mask == 0] == 0).all(), what  # padding positions get exactly zero gradient


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_torch_path_and_options(backend):
    """The torch path meets the same reference; normalize=False and out_dtype=float32 on both backends."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 7, 96, generator=g).to(torch.bfloat16)
    mask = make_mask(5, 7, "left", g).bool()  # bool masks are accepted too
    for fn, ref_fn in ((last_token_pool, ref_last_token), (mean_pool, ref_mean)):
        for normalize in (True, False):
            out, grad, ref, ref_grad = run_case(fn, ref_fn, hidden, mask, backend, normalize=normalize,
                                                out_dtype=torch.float32)
            assert out.dtype == torch.float32 and grad.dtype == torch.bfloat16
            check(out, ref, 2e-6, f"{fn.__name__} {backend} normalize={normalize} fp32 out")
            check(grad, ref_grad, 1.6e-2, f"{fn.__name__} {backend} grad")
    if backend == "triton":  # unnormalized last-token pooling in the input dtype is an exact copy
        out = last_token_pool(hidden, mask, normalize=False, backend=backend)
        assert torch.equal(out, hidden[torch.arange(5), P.last_token_index(mask)])
    cu = torch.tensor([0, 4, 5, 11])
    hp = torch.randn(11, 16, generator=g)
    out, grad, ref, ref_grad = run_case(last_token_pool_packed, ref_packed, hp, cu, backend)
    check(out, ref, 2e-6, "packed torch")
    check(grad, ref_grad, 2e-5, "packed torch grad")


def test_strided_inputs_and_expanded_grad():
    """Non-contiguous hidden/mask and a stride-0 upstream gradient (from .sum()) are read through strides."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(6, 9, 2 * 48, generator=g)
    hidden = base[:, :, ::2].detach().requires_grad_()      # stride 2 along H
    mask = make_mask(9, 6, "right", g).t()                   # [6, 9], column-major
    for fn, ref_fn in ((last_token_pool, ref_last_token), (mean_pool, ref_mean)):
        hidden.grad = None
        fn(hidden, mask, backend="triton").sum().backward()
        h64 = hidden.detach().double().requires_grad_()
        ref = ref_fn(h64, mask)
        ref.sum().backward()
        check(fn(hidden, mask, backend="triton").detach(), ref.detach(), 2e-6, fn.__name__)
        check(hidden.grad, h64.grad, 2e-5, fn.__name__ + " grad")


def test_rows_wider_than_one_block_and_masks_longer_than_one_block():
    """H > 2048 makes the row kernels loop over H blocks; T > 1024 makes the mask scan loop over T blocks."""
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 3, 2500, generator=g)
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    for fn, ref_fn in ((last_token_pool, ref_last_token), (mean_pool, ref_mean)):
        out, grad, ref, ref_grad = run_case(fn, ref_fn, hidden, mask, "triton")
        check(out, ref, 2e-6, fn.__name__ + " H=2500")
        check(grad, ref_grad, 2e-5, fn.__name__ + " H=2500 grad")
    mask = torch.zeros(2, 1100, dtype=torch.long)
    mask[0, 1050] = mask[0, 3] = mask[1, :1025] = 1
    out, grad, ref, ref_grad = run_case(last_token_pool, ref_last_token, torch.randn(2, 1100, 16, generator=g),
                                        mask, "triton")
    check(out, ref, 2e-6, "T=1100")
    check(grad, ref_grad, 2e-5, "T=1100 grad")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA and compiled Triton: TRITON_INTERPRET=0 pytest -m gpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_kernels(dtype):
    """The compiled kernels (not the interpreter) against the same float64 reference, on shapes that loop."""
    g = torch.Generator().manual_seed(7)
    for B, T, H in ((3, 5, 16), (37, 33, 384), (8, 1500, 4096), (5, 700, 3000)):
        hidden = (3 * torch.randn(B, T, H, generator=g)).to(dtype)
        for padding in ("left", "right", "holes"):
            mask = make_mask(B, T, padding, g)
            for fn, ref_fn in ((last_token_pool, ref_last_token), (mean_pool, ref_mean)):
                h = hidden.cuda().requires_grad_()
                out = fn(h, mask.cuda(), backend="triton")
                up = torch.randn(out.shape, generator=g)
                out.backward(up.to(dtype).cuda())
                h64 = hidden.double().requires_grad_()
                ref = ref_fn(h64, mask)
                ref.backward(up.to(dtype).double())
                what = f"cuda {fn.__name__} B={B} T={T} H={H} {dtype} {padding}"
                check(out.detach().cpu(), ref.detach(), TOL[dtype][0], what)
                check(h.grad.cpu(), h64.grad, TOL[dtype][1], what + " grad")
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
        hp = torch.randn(int(cu[-1]), H, generator=g).to(dtype)
        out = last_token_pool_packed(hp.cuda(), cu.cuda(), backend="triton")
        check(out.cpu(), ref_packed(hp.double(), cu), TOL[dtype][0], f"cuda packed B={B} H={H}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA and compiled Triton: TRITON_INTERPRET=0 pytest -m gpu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_cuda_compiled_packed_kernels_backward(dtype, normalize):
    """The compiled packed kernels, forward AND backward, against the float64 reference: mean_pool_packed's
    backward spreads each sequence's gradient over its rows (1/length), last_token_pool_packed's reaches only the
    last row; rows past cu_seqlens[-1] get exactly zero. Shapes loop over H blocks and hold one-token sequences."""
    g = torch.Generator().manual_seed(11)
    for B, T, H in ((1, 1, 16), (5, 33, 384), (37, 700, 4096), (9, 1500, 3000)):
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = 1
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
        tail = 3   # filler rows after the last sequence: never pooled
        hidden = (3 * torch.randn(int(cu[-1]) + tail, H, generator=g)).to(dtype)
        for fn, ref_fn in ((mean_pool_packed, ref_mean_packed), (last_token_pool_packed, ref_packed)):
            h = hidden.cuda().requires_grad_()
            out = fn(h, cu.cuda(), normalize=normalize, backend="triton")
            up = torch.randn(out.shape, generator=g).to(dtype)
            out.backward(up.cuda())
            h64 = hidden[: int(cu[-1])].double().requires_grad_()
            ref = ref_fn(h64, cu, normalize)
            ref.backward(up.double())
            what = f"cuda {fn.__name__} B={B} T={T} H={H} {dtype} normalize={normalize}"
            check(out.detach().cpu(), ref.detach(), TOL[dtype][0], what)
            check(h.grad[: int(cu[-1])].cpu(), h64.grad, TOL[dtype][1], what + " grad")
            assert (h.grad[int(cu[-1]):] == 0).all(), what + " filler rows"


def test_zero_vector_is_finite_and_matches_clamped_reference():
    """A pooled row of zeros (or tiny norm) gives x / eps and gradient g / eps, never NaN."""
    hidden = torch.randn(3, 4, 16)
    hidden[1, 3] = 0.0
    hidden[2, 3] = 1e-8
    mask = torch.ones(3, 4, dtype=torch.long)
    out, grad, ref, ref_grad = run_case(last_token_pool, ref_last_token, hidden, mask, "triton")
    assert (out[1] == 0).all()
    check(out, ref, 2e-6, "zero row")
    check(grad, ref_grad, 2e-5, "zero row grad")


def test_float64_uses_torch_path_and_gradcheck():
    h = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    for fn in (last_token_pool, mean_pool):
        out = fn(h, mask, backend="triton")
        assert out.dtype == torch.float64
        assert torch.autograd.gradcheck(lambda x: fn(x, mask, backend="triton"), (h,))


def test_triton_matches_torch_bf16_bitwise_close():
    """Both backends round once from fp32, so they agree to one bf16 ulp (2^-7 relative: the interpreter casts
    fp32 -> bf16 by truncation, compiled Triton and torch round to nearest)."""
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, 8, 384, generator=g).to(torch.bfloat16)
    mask = make_mask(4, 8, "holes", g)
    for fn in (last_token_pool, mean_pool):
        a = fn(hidden, mask, backend="triton").float()
        b = fn(hidden, mask, backend="torch").float()
        assert ((a - b).abs() <= 2 ** -7 * b.abs() + 1e-6).all(), fn.__name__


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("fn", [last_token_pool, mean_pool])
def test_all_zero_mask_row_is_an_error(fn, backend):
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1]])
    with pytest.raises(ValueError, match=r"no non-zero entry in row\(s\) \[1\]"):
        fn(torch.randn(3, 3, 16), mask, backend=backend)


@pytest.mark.parametrize("fn", [last_token_pool, mean_pool])
def test_bad_inputs(fn):
    h = torch.randn(2, 3, 16)
    m = torch.ones(2, 3, dtype=torch.long)
    cases = [
        ((h[0], m), ValueError, "3-D"),
        ((h, m[:, :2]), ValueError, "does not match"),
        ((h.long(), m), TypeError, "float32"),
        ((h, m.float()), TypeError, "bool or integer"),
        ((h, m.to("meta")), ValueError, "is on meta"),
        ((h[:, :0], m[:, :0]), ValueError, "T=0"),
        (([1.0], m), TypeError, "torch.Tensor"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn(*args, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        fn(h, m, backend="cuda")
    with pytest.raises(TypeError, match="out_dtype"):
        fn(h, m, out_dtype=torch.int32)


def test_bad_cu_seqlens():
    h = torch.randn(10, 16)
    cases = [
        (torch.tensor([0, 3, 3, 9]), "empty"),
        (torch.tensor([0, 5, 3]), "empty or negative"),
        (torch.tensor([1, 3, 9]), "start at 0"),
        (torch.tensor([0, 3, 11]), "only 10 rows"),
        (torch.tensor([0]), r"\[B \+ 1\]"),
        (torch.tensor([[0, 3]]), "1-D"),
    ]
    for cu, msg in cases:
        for fn in (last_token_pool_packed, mean_pool_packed):
            with pytest.raises(ValueError, match=msg):
                fn(h, cu, backend="triton")
    with pytest.raises(TypeError, match="integers"):
        last_token_pool_packed(h, torch.tensor([0.0, 3.0]))
    with pytest.raises(ValueError, match="2-D"):
        last_token_pool_packed(h[None], torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="is on meta"):
        last_token_pool_packed(h, torch.tensor([0, 3], device="meta"))
