"""GradCache step == one full-batch backward, on tiny Llama/Mistral decoders in fp32.

Two references. With LoRA dropout the full-batch graph must draw the same dropout masks, and a mask's shape is the
padded chunk's shape, so the reference embeds the same chunks from the same starting RNG state, but all inside one
autograd graph followed by one backward: any mismatch of the replayed RNG in pass 2 shows up as a gradient error.
Without dropout the reference is the plain unchunked batch (one forward of everything, one backward). Same tower,
Matryoshka and duplicate masking are checked against an independent step: every text embedded alone with grad, the
float64 reference loss of tests/infonce_reference.py, one backward; and through train's YAML config."""
import pytest
import torch

from embforge.engine import ContrastiveBatch, Embedder, LoraConfig, ModelConfig, contrastive_step, make_chunks
from embforge.engine.batch import text_ids
from embforge.engine.gradcache import CPU_CHUNK_TOKENS
from embforge.kernels import infonce_loss
from infonce_reference import reference_total

QUERIES = ["what is a cat", "how do planes fly at high altitude over the oceans", "x", "define entropy",
           "capital of France"]


def make_batch():
    docs = []
    for i, q in enumerate(QUERIES):
        docs += [f"answer {i} about {q} " * (i % 3 + 1), f"unrelated text number {i} lorem ipsum " * (2 - i % 2)]
    docs[3] = docs[0]  # query 1's hard negative is query 0's positive: must not serve as a negative for query 0
    return ContrastiveBatch(QUERIES, ["Retrieve the answer"] * 4 + [None], docs)


def embedder(family, dropout, device="cpu", **kw):
    e = Embedder.from_config(ModelConfig(path=f"tiny-{family}", lora=LoraConfig(dropout=dropout), **kw), device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # peft starts lora_B at zero, where lora_A gets no gradient and dropout does nothing
        for n, p in e.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.2)
    e.train()
    e.set_packing(False)   # this file checks the padded chunks; packed ones: tests/test_engine_packing.py
    return e


def take_grads(e):
    params = e.trainable_parameters()
    g = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return g


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def all_seqs(e, batch):
    return e.tokenize(batch.queries, is_query=True, instructions=batch.instructions) + \
        e.tokenize(batch.documents, is_query=False)


def same_chunks_one_graph_loss(e, batch, chunks):
    """The full-batch reference under dropout: same chunks, same RNG stream, one autograd graph."""
    seqs = all_seqs(e, batch)
    reps = [None] * len(seqs)
    for c in chunks:
        out = e.forward_tokens(*e.collate([seqs[i] for i in c]))
        for k, i in enumerate(c):
            reps[i] = out[k]
    reps = torch.stack(reps)
    qid, did = text_ids(batch.queries, batch.documents)
    B = len(batch.queries)
    return infonce_loss(reps[:B], reps[B:], 0.02, query_ids=qid.to(reps.device), doc_ids=did.to(reps.device))


@pytest.mark.parametrize("family,checkpointing", [("llama", False), ("mistral", True)])
def test_gradcache_equals_full_batch_with_lora_dropout(family, checkpointing):
    e = embedder(family, 0.1, gradient_checkpointing=checkpointing)
    batch = make_batch()
    torch.manual_seed(1)
    res = contrastive_step(e, batch, chunk_tokens=24)
    rng_after_step = torch.get_rng_state()
    g_cache = take_grads(e)
    assert res.n_chunks > 2
    assert len({len(s) for s in all_seqs(e, batch)}) > 5               # uneven lengths

    torch.manual_seed(1)
    chunks = make_chunks([len(s) for s in all_seqs(e, batch)], 24)
    loss = same_chunks_one_graph_loss(e, batch, chunks)
    loss.backward()
    g_ref = take_grads(e)
    assert torch.equal(rng_after_step, torch.get_rng_state())          # RNG left as one pass leaves it
    assert abs(res.loss - float(loss)) <= 1e-5 * abs(float(loss))
    assert g_ref.norm() > 0 and g_cache.abs().max() > 0
    assert rel_err(g_cache, g_ref) < 1e-4

    # The same step with different dropout draws gives visibly different gradients: the check above has teeth.
    torch.manual_seed(2)
    contrastive_step(e, batch, chunk_tokens=24)
    assert rel_err(take_grads(e), g_ref) > 1e-2


def test_gradcache_equals_unchunked_batch_without_dropout():
    e = embedder("mistral", 0.0)
    batch = make_batch()
    res = contrastive_step(e, batch, chunk_tokens=30, max_chunk_seqs=3, temperature=TAU)
    g_cache = take_grads(e)
    one = contrastive_step(e, batch, chunk_tokens=10**6, temperature=TAU)   # everything in one chunk: single pass
    g_full = take_grads(e)
    assert one.n_chunks == 1 and res.n_chunks > 3
    assert abs(res.loss - one.loss) <= 1e-5 * abs(one.loss)
    assert rel_err(g_cache, g_full) < 1e-4


# With the tiny random decoders, TAU = 0.1 keeps the softmax spread over many candidates (measured losses 5-7), so
# every term of the loss (duplicates, other queries, each Matryoshka prefix) carries gradient.
TAU = 0.1
GECKO = {"same_tower": True}
MRL = {"matryoshka_dims": [64, 16], "matryoshka_weights": [1.0, 0.5]}


def independent_step(e, batch, tau, *, detach_copy=False, **options):
    """An independent computation of one step: every text embedded alone with grad (no padding, no chunks, no cache),
    ids from the texts, the float64 reference loss (tests/infonce_reference.py), one backward.
    Returns (loss, flattened gradient of the trainable parameters)."""
    seqs = all_seqs(e, batch)
    reps = torch.cat([e.forward_tokens(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    texts = batch.queries + batch.documents
    ids = torch.tensor([texts.index(t) for t in texts])
    B, N = len(batch.queries), len(batch.documents)
    loss = reference_total(reps[:B].double(), reps[B:].double(), tau, torch.arange(B) * (N // B),
                           query_ids=ids[:B], doc_ids=ids[B:], detach_copy=detach_copy, **options)
    loss.backward()
    return float(loss), take_grads(e)


def assert_moves(a, b, margin, what):
    """The variant a differs from the right step b: its gradient by more than `margin` (relative), far above the
    1e-4 the comparison with contrastive_step allows, so the test cannot pass without the feature."""
    (la, ga), (lb, gb) = a, b
    assert rel_err(ga, gb) > margin, f"{what}: gradient changes by only {rel_err(ga, gb):.3g} (loss {la} vs {lb})"


@pytest.mark.parametrize("options,backend", [({}, "torch"), (GECKO, "torch"), (MRL, "torch"),
                                             pytest.param({**GECKO, **MRL}, "triton", marks=pytest.mark.slow)],
                         ids=["masking", "same_tower", "matryoshka", "both-triton"])
def test_gradcache_matches_independent_reference(options, backend):
    e = embedder("mistral", 0.0)
    batch = make_batch()
    right = independent_step(e, batch, TAU, **options)
    # The options visibly change the step, each part of them included.
    if options:
        assert_moves(independent_step(e, batch, TAU), right, 0.05, "the options")
    else:
        # The duplicate in the batch (query 1's hard negative is query 0's positive) is masked, visibly. (With
        # same_tower the other queries dominate this random model's softmax: the kernel tests cover masking there.)
        assert_moves(independent_step(e, batch, TAU, skip_rules=("dup", "qid")), right, 0.01, "masking the duplicate")
    if options.get("same_tower"):
        assert_moves(independent_step(e, batch, TAU, detach_copy=True, **options), right, 0.01,
                     "the gradient through the queries-as-candidates copy")
    if options.get("matryoshka_dims"):
        without_full = {**options, "matryoshka_dims": [16], "matryoshka_weights": [0.5]}
        assert_moves(independent_step(e, batch, TAU, **without_full), right, 0.05, "the full-dimension term")
    res = contrastive_step(e, batch, temperature=TAU, chunk_tokens=30, max_chunk_seqs=3, loss_backend=backend,
                           **options)
    g = take_grads(e)
    assert res.n_chunks > 3
    assert abs(res.loss - right[0]) <= 1e-5 * abs(right[0]), (res.loss, right[0])
    assert rel_err(g, right[1]) < 1e-4
    one = contrastive_step(e, batch, temperature=TAU, chunk_tokens=10**6, loss_backend=backend,
                           **options)     # the single-pass path
    assert one.n_chunks == 1 and abs(one.loss - right[0]) <= 1e-5 * abs(right[0])
    assert rel_err(take_grads(e), right[1]) < 1e-4


def test_train_config_passes_same_tower_and_matryoshka(tmp_path):
    """loss.same_tower / loss.matryoshka_* in the YAML config reach the step: train's first loss and gradient norm
    equal the independent reference's on the same model and batch, and differ from the plain loss's."""
    import json

    from embforge.config import load_config
    from embforge.data.records import ExampleFile, batch_at
    from embforge.data.sources import build
    from embforge.cli.train import run_training
    from embforge.engine.batch import to_batch
    from embforge.engine.train import TrainConfig

    data = tmp_path / "train.jsonl"
    build(data)
    cfg = load_config(TrainConfig, None, [
        "model.path=tiny-llama", "model.lora.dropout=0.0", f"data.train=[{data}]", "batch.queries=4",
        "batch.chunk_tokens=64", "steps=1", f"loss.temperature={TAU}", "loss.same_tower=true",
        "loss.matryoshka_dims=[64,16]", "loss.matryoshka_weights=[1.0,0.5]", f"output_dir={tmp_path / 'run'}",
        "checkpoint_every=0", "device=cpu"])
    result = run_training(cfg, progress=False)
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["chunks"] > 1
    # The same model (train seeds before building it) and the same first batch.
    torch.manual_seed(cfg.seed)
    e = Embedder.from_config(cfg.model, torch.device("cpu"))
    e.model.train()
    examples, _ = batch_at(ExampleFile(cfg.data.train), 0, cfg.batch.queries, cfg.seed)
    batch = to_batch(examples, cfg.batch.negatives)
    loss, g = independent_step(e, batch, TAU, **GECKO, **MRL)
    plain_loss, g_plain = independent_step(e, batch, TAU)
    assert abs(plain_loss - loss) > 0.05 * loss and abs(float(g_plain.norm()) - float(g.norm())) > 0.01 * g.norm()
    assert abs(result["losses"][0] - loss) <= 1e-5 * loss, (result["losses"][0], loss)
    assert abs(rec["grad_norm"] - float(g.norm())) <= 1e-4 * float(g.norm())   # clip_grad_norm_ returns the norm


def test_loss_equals_hand_written_reference_with_duplicates_masked():
    e = embedder("llama", 0.0)
    e.eval()
    batch = make_batch()
    tau = 0.5   # the random model's similarities sit far below its positives' at 0.02, hiding the mask's effect
    res = contrastive_step(e, batch, chunk_tokens=40, temperature=tau)
    with torch.no_grad():   # each text alone: no padding, no chunking
        reps = torch.cat([e.forward_tokens(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
                          for s in all_seqs(e, batch)])
    texts = batch.queries + batch.documents
    ids = torch.tensor([texts.index(t) for t in texts])
    B, N = len(batch.queries), len(batch.documents)
    q, d = torch.nn.functional.normalize(reps[:B], dim=1), torch.nn.functional.normalize(reps[B:], dim=1)
    logits = q @ d.T / tau
    pos = torch.arange(B) * (N // B)
    qid, did = ids[:B], ids[B:]
    drop = (did[None, :] == did[pos][:, None]) | (did[None, :] == qid[:, None])
    drop[torch.arange(B), pos] = False
    assert drop.sum() == 1                                   # exactly the one duplicate
    rows = torch.arange(B)
    masked = logits.masked_fill(drop, float("-inf"))
    ref = float((torch.logsumexp(masked, 1) - logits[rows, pos]).mean())
    unmasked = float((torch.logsumexp(logits, 1) - logits[rows, pos]).mean())
    assert abs(res.loss - ref) <= 1e-4 * abs(ref)
    assert abs(unmasked - ref) > 1e-3                         # the masking is visible in the loss


def test_one_forward_when_the_batch_fits_else_two_per_chunk_each_padded_to_its_own_longest():
    e = embedder("llama", 0.0)
    batch = make_batch()
    shapes = []
    hook = e.model.base_model.model.register_forward_hook(lambda m, a, kw, out: shapes.append(
        tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        res = contrastive_step(e, batch, chunk_tokens=10**6)
        assert res.n_chunks == 1 and len(shapes) == 1 and res.timings.keys() == {"pass1", "loss", "pass2"}
        shapes.clear()
        res = contrastive_step(e, batch, chunk_tokens=40)
    finally:
        hook.remove()
    lengths = sorted((len(s) for s in all_seqs(e, batch)), reverse=True)
    chunks = make_chunks(lengths, 40)
    expected = [(len(c), lengths[c[0]]) for c in chunks]
    assert len(chunks) == res.n_chunks > 2
    assert shapes == expected + expected                      # pass 1 then pass 2, same chunks
    assert all(b * t <= 40 or b == 1 for b, t in expected)
    assert res.padded_tokens == sum(b * t for b, t in expected) < len(lengths) * lengths[0]
    assert res.tokens == sum(lengths) and set(res.timings) == {"pass1", "loss", "pass2"}


def test_auto_chunk_tokens_on_cpu_and_explicit_ids():
    e = embedder("llama", 0.0)
    batch = make_batch()
    res = contrastive_step(e, batch, chunk_tokens="auto", temperature=0.5)
    assert res.chunk_tokens == CPU_CHUNK_TOKENS and res.n_chunks == 1
    take_grads(e)
    # Explicit ids override the text-derived ones: declaring query 0's hard negative a duplicate of its positive
    # removes that negative and lowers the loss.
    qid, did = text_ids(batch.queries, batch.documents)
    did[1] = did[0]
    explicit = ContrastiveBatch(batch.queries, batch.instructions, batch.documents, qid.tolist(), did.tolist())
    assert contrastive_step(e, explicit, chunk_tokens="auto", temperature=0.5).loss < res.loss - 1e-3
    with pytest.raises(ValueError, match="both query_ids and doc_ids"):
        ContrastiveBatch(batch.queries, batch.instructions, batch.documents, query_ids=qid.tolist())
    with pytest.raises(ValueError, match="chunk_tokens"):
        contrastive_step(e, batch, chunk_tokens="big")


def test_text_ids_share_ids_across_queries_and_documents():
    q, d = text_ids(["a", "b", "a"], ["b", "c", "a", "c"])
    assert q.tolist() == [0, 1, 0] and d.tolist() == [1, 2, 0, 2]


def test_make_chunks_respects_budget_and_pads_per_chunk():
    lengths = [5, 100, 7, 50, 3, 3, 60, 8, 300]
    chunks = make_chunks(lengths, 120, max_chunk_seqs=3)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for c in chunks:
        assert len(c) <= 3
        assert len(c) == 1 or len(c) * max(lengths[i] for i in c) <= 120
    assert chunks[0] == [8]                       # longer than the budget: alone
    assert chunks[1] == [1]                       # 100 + 60 would be 2 x 100 > 120
    assert [lengths[c[0]] for c in chunks] == sorted((lengths[c[0]] for c in chunks), reverse=True)
    with pytest.raises(ValueError, match="chunk_tokens"):
        make_chunks(lengths, 0)


def test_batch_validation():
    with pytest.raises(ValueError, match="multiple"):
        ContrastiveBatch(["a", "b"], [None, None], ["x", "y", "z"])
    with pytest.raises(ValueError, match="instructions"):
        ContrastiveBatch(["a", "b"], [None], ["x", "y"])
    with pytest.raises(ValueError, match="no queries"):
        ContrastiveBatch([], [], [])


def cuda(test):
    """A CUDA test: selected by `pytest -m gpu`, skipped without a GPU."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@cuda
def test_cuda_gradcache_replays_gpu_dropout_masks():
    """On GPU, LoRA dropout draws from the CUDA generator: pass 2 must restore it too (luyug/GradCache did not)."""
    e = embedder("llama", 0.1, device="cuda", dtype="float32")
    batch = make_batch()
    torch.manual_seed(1)
    res = contrastive_step(e, batch, chunk_tokens=24)
    g_cache = take_grads(e)
    torch.manual_seed(1)
    loss = same_chunks_one_graph_loss(e, batch, make_chunks([len(s) for s in all_seqs(e, batch)], 24))
    loss.backward()
    g_ref = take_grads(e)
    assert res.n_chunks > 2 and abs(res.loss - float(loss)) <= 1e-5 * abs(float(loss))
    assert rel_err(g_cache, g_ref) < 1e-4
    torch.manual_seed(2)
    contrastive_step(e, batch, chunk_tokens=24)
    assert rel_err(take_grads(e), g_ref) > 1e-2


@cuda
def test_cuda_auto_chunk_budget_keeps_grads_and_rng():
    from embforge.engine import auto_chunk_tokens
    e = embedder("llama", 0.1, device="cuda", query_max_length=64, doc_max_length=64)   # bf16 on CUDA
    marker = [torch.full_like(p, 7.0) for p in e.trainable_parameters()]
    for p, m in zip(e.trainable_parameters(), marker):
        p.grad = m.clone()
    cpu, gpu = torch.get_rng_state(), torch.cuda.get_rng_state()
    budget = auto_chunk_tokens(e)
    assert budget >= 64 and budget % 64 == 0 and auto_chunk_tokens(e) == budget   # probed once, then cached
    assert torch.equal(cpu, torch.get_rng_state()) and torch.equal(gpu, torch.cuda.get_rng_state())
    assert all(torch.equal(p.grad, m) for p, m in zip(e.trainable_parameters(), marker))
    take_grads(e)
    res = contrastive_step(e, make_batch(), chunk_tokens="auto")
    assert res.chunk_tokens == budget and res.n_chunks == 1
    assert torch.isfinite(take_grads(e)).all()


# ------------------------------------------------------------------------------------------------ cache precision
def test_cache_dtype_auto_is_bf16_only_for_a_bf16_model_on_cuda():
    from types import SimpleNamespace

    from embforge.engine.gradcache import resolve_cache_dtype

    def fake(device, dtype):
        return SimpleNamespace(device=torch.device(device), model=SimpleNamespace(dtype=dtype))
    assert resolve_cache_dtype("auto", fake("cuda", torch.bfloat16)) == torch.bfloat16
    assert resolve_cache_dtype("auto", fake("cuda", torch.float16)) == torch.bfloat16
    assert resolve_cache_dtype("auto", fake("cuda", torch.float32)) == torch.float32   # fp32 asked: fp32 kept
    assert resolve_cache_dtype("auto", fake("cpu", torch.bfloat16)) == torch.float32    # the CPU reference
    assert resolve_cache_dtype("bfloat16", fake("cpu", torch.float32)) == torch.bfloat16
    with pytest.raises(ValueError, match="cache_dtype must be"):
        resolve_cache_dtype("fp8", fake("cuda", torch.bfloat16))


def _bf16_vs_fp32_step(e, **kw):
    """Loss and LoRA gradients of one multi-chunk step with an fp32 cache and with a bf16 one."""
    out = {}
    for dt in ("float32", "bfloat16"):
        torch.manual_seed(1)
        res = contrastive_step(e, make_batch(), chunk_tokens=24, cache_dtype=dt, **kw)
        assert res.n_chunks > 2
        out[dt] = (res.loss, take_grads(e).float())
    return out


def test_bf16_cache_error_with_the_cuda_arithmetic(monkeypatch):
    """On CPU with the CUDA arithmetic emulated (the loss matmuls in the cache's dtype, bf16 products accumulated in
    fp32, G' in bf16): a bf16 cache changes the step (so the setting is live) by no more than the tolerance the GPU
    test holds it to (bench/results/cache_precision_cpu.csv has the loss-level error)."""
    import embforge.kernels.utils as U
    monkeypatch.setattr(U, "matmul_dtype", lambda x: x.dtype)
    e = embedder("llama", 0.0)
    out = _bf16_vs_fp32_step(e)
    (l32, g32), (l16, g16) = out["float32"], out["bfloat16"]
    assert 0 < abs(l16 - l32) <= 1e-2 * abs(l32)
    assert 0 < rel_err(g16, g32) < 3e-2


@cuda
def test_cuda_bf16_cache_keeps_gradcache_within_tolerance():
    """bf16 model on CUDA: cache_dtype auto picks bf16 (loss matmuls on bf16 tensor cores) and stays within the
    tolerance of the fp32 cache; fp32 models keep the fp32 cache."""
    from embforge.engine.gradcache import resolve_cache_dtype
    e = embedder("llama", 0.0, device="cuda")   # bf16 on CUDA
    assert resolve_cache_dtype("auto", e) == torch.bfloat16
    out = _bf16_vs_fp32_step(e)
    (l32, g32), (l16, g16) = out["float32"], out["bfloat16"]
    assert abs(l16 - l32) <= 1e-2 * abs(l32)
    assert 0 < rel_err(g16, g32) < 3e-2
    torch.manual_seed(1)
    res = contrastive_step(e, make_batch(), chunk_tokens=24)   # auto == bfloat16: the same step (up to CUDA's
    g_auto = take_grads(e).float()                             # non-deterministic backward reductions)
    assert res.loss == pytest.approx(l16, rel=1e-4) and rel_err(g_auto, g16) < rel_err(g_auto, g32)
    assert resolve_cache_dtype("auto", embedder("llama", 0.0, device="cuda", dtype="float32")) == torch.float32


# ------------------------------------------------------------------------------------------------ issue 22's terms
# Query 2's row is unscored (NaN): the distillation's mean runs over the other four rows.
TEACHER = [[3.0, 0.0], [0.5, 2.0], [float("nan")] * 2, [1.0, 2.5], [2.0, 2.0]]


def scored_batch():
    b = make_batch()
    return ContrastiveBatch(b.queries, b.instructions, b.documents, teacher_scores=torch.tensor(TEACHER))


def reference_options(batch, options):
    """contrastive_step's option names -> tests/infonce_reference.py reference_terms' (an independent definition)."""
    names = {"directions": "directions", "false_negative_margin": "margin", "in_batch_negatives": "in_batch",
             "teacher_temperature": "teacher_tau", "distill_weight": "distill_weight",
             "matryoshka_dims": "matryoshka_dims", "matryoshka_weights": "matryoshka_weights"}
    out = {names[k]: v for k, v in options.items()}
    if options.get("distill_weight"):
        out["teacher"] = batch.teacher_scores.double()
    return out


def independent_terms_step(e, batch, log_tau, **options):
    """As independent_step, with the float64 reference of every #22 term (reference_terms_total) and a learnable
    temperature tau = exp(log_tau): (loss, gradient of the LoRA weights, d loss / d log_tau)."""
    from infonce_reference import reference_terms_total
    seqs = all_seqs(e, batch)
    reps = torch.cat([e.forward_tokens(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
    texts = batch.queries + batch.documents
    ids = torch.tensor([texts.index(t) for t in texts])
    B, N = len(batch.queries), len(batch.documents)
    lt = torch.tensor(log_tau, dtype=torch.float64, requires_grad=True)
    loss = reference_terms_total(reps[:B].double(), reps[B:].double(), lt.exp(), torch.arange(B) * (N // B),
                                 query_ids=ids[:B], doc_ids=ids[B:], **reference_options(batch, options))
    loss.backward()
    return float(loss.detach()), take_grads(e), float(lt.grad)


TERMS = {
    "margin": dict(false_negative_margin=0.0),
    "d2q": dict(directions=["q2d", "d2q"]),
    "d2d_q2q": dict(directions=["q2d", "q2q", "d2d"]),
    "own_group": dict(in_batch_negatives=False),
    "distill": dict(distill_weight=0.7, teacher_temperature=0.5),
    "all_matryoshka": dict(directions=["q2d", "q2q", "d2q", "d2d"], false_negative_margin=0.05, distill_weight=0.5,
                           matryoshka_dims=[64, 16], matryoshka_weights=[1.0, 0.5]),
}


@pytest.mark.parametrize("name", [n if n in ("margin", "d2q", "distill") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in TERMS])
def test_gradcache_terms_equal_one_full_batch_step(name):
    """Each #22 term through GradCache at several chunkings (and the single pass) == one plain-autograd step on the
    same embeddings with the independent float64 reference loss: loss, LoRA gradient and the learnable
    temperature's gradient. First the term is shown to move the step (else the equality would prove nothing)."""
    import math
    options = TERMS[name]
    e = embedder("mistral", 0.0)
    batch = scored_batch()
    log_tau = math.log(TAU)
    right = independent_terms_step(e, batch, log_tau, **options)
    base = {k: v for k, v in options.items() if k.startswith("matryoshka")}
    off = independent_terms_step(e, batch, log_tau, **base)
    assert_moves(off[:2], right[:2], 0.01, name)
    for chunk_tokens, max_seqs in ((30, 3), (64, None), (10**6, None)):
        lt = torch.tensor(log_tau, requires_grad=True)
        res = contrastive_step(e, batch, temperature=lt.exp(), chunk_tokens=chunk_tokens, max_chunk_seqs=max_seqs,
                               **options)
        g = take_grads(e)
        assert (res.n_chunks == 1) == (chunk_tokens == 10**6) and (max_seqs is None or res.n_chunks > 3)
        assert abs(res.loss - right[0]) <= 1e-5 * abs(right[0]), (chunk_tokens, res.loss, right[0])
        assert rel_err(g, right[1]) < 1e-4, chunk_tokens
        assert abs(float(lt.grad) - right[2]) <= 1e-4 * abs(right[2]) + 1e-7, (float(lt.grad), right[2])


def test_batch_without_scored_rows_or_weight_skips_distillation():
    """distill_weight with every row unscored (or no teacher at all) is the plain step; a batch's own
    in_batch_negatives=False turns in-batch negatives off like the option."""
    e = embedder("llama", 0.0)
    b = make_batch()
    plain = contrastive_step(e, b, temperature=TAU, chunk_tokens=10**6).loss
    nan = torch.full((5, 2), float("nan"))
    unscored = ContrastiveBatch(b.queries, b.instructions, b.documents, teacher_scores=nan)
    assert contrastive_step(e, unscored, temperature=TAU, chunk_tokens=10**6, distill_weight=1.0).loss == plain
    assert contrastive_step(e, b, temperature=TAU, chunk_tokens=10**6, distill_weight=1.0).loss == plain
    own = contrastive_step(e, b, temperature=TAU, chunk_tokens=10**6, in_batch_negatives=False).loss
    flagged = ContrastiveBatch(b.queries, b.instructions, b.documents, in_batch_negatives=False)
    assert own < plain - 0.1 and contrastive_step(e, flagged, temperature=TAU, chunk_tokens=10**6).loss == own
    # the GTE directions are in-batch terms too: a flagged batch keeps its own group (q2d) with them configured
    gte = dict(directions=["q2d", "d2q", "d2d"], same_tower=True)
    assert contrastive_step(e, b, temperature=TAU, chunk_tokens=10**6, **gte).loss > plain + 0.1
    assert contrastive_step(e, flagged, temperature=TAU, chunk_tokens=10**6, **gte).loss == own
    take_grads(e)


def test_to_batch_teacher_rows_and_shards():
    """to_batch: a scored example's row is cut to the negatives used; an unscored example, or one whose group was
    filled from other examples, gets a NaN row; no scored example: None. shard_batch slices the rows."""
    from embforge.data.records import Example
    from embforge.engine.batch import shard_batch, to_batch
    from embforge.engine.distributed import Dist
    ex = [Example(None, "q0", "p0", ["n0a", "n0b"], scores=[3.0, 1.0, 0.0]),
          Example(None, "q1", "p1", ["n1a"], scores=[2.0, 1.0]),        # one negative short: filled -> NaN
          Example(None, "q2", "p2", ["n2a", "n2b"]),                      # unscored
          Example(None, "q3", "p3", ["n3a", "n3b", "n3c"], scores=[1.0, 2.0, 3.0, 4.0])]
    b = to_batch(ex, 2)
    t = b.teacher_scores
    assert t.shape == (4, 3) and t[0].tolist() == [3.0, 1.0, 0.0] and t[3].tolist() == [1.0, 2.0, 3.0]
    assert torch.isnan(t[1]).all() and torch.isnan(t[2]).all()
    assert b.documents[3:6] == ["p1", "n1a", "p2"]                        # the filled member
    assert to_batch([ex[2], ex[2]], 2).teacher_scores is None
    parts = [shard_batch(b, Dist(rank=r, world_size=2, active=True)) for r in range(2)]
    assert torch.equal(torch.cat([p.teacher_scores for p in parts]).nan_to_num(-1), t.nan_to_num(-1))
    with pytest.raises(ValueError, match="teacher_scores has shape"):
        ContrastiveBatch(b.queries, b.instructions, b.documents, teacher_scores=t[:, :2])


@pytest.mark.slow
def test_train_config_loss_keys_validated_and_passed_through(tmp_path):
    """The #22 keys under loss: are checked at load (errors name the key) and reach the step: train's first loss
    and gradient norm equal the independent reference's with them, and differ from the plain loss's."""
    import json

    from embforge.cli.train import run_training
    from embforge.config import load_config
    from embforge.data.records import ExampleFile, batch_at
    from embforge.data.sources import build
    from embforge.engine.batch import to_batch
    from embforge.engine.train import TrainConfig

    for bad, key in (("loss.directions=[q2d,x2y]", "loss.directions"), ("loss.directions=[]", "loss.directions"),
                     ("loss.false_negative_margin=.nan", "loss.false_negative_margin"),
                     ("loss.teacher_temperature=0", "loss.teacher_temperature"),
                     ("loss.distill_weight=-1", "loss.distill_weight")):
        with pytest.raises(ValueError, match=key):
            load_config(TrainConfig, None, ["data.train=[x]", bad])
    with pytest.raises(ValueError, match="loss.in_batch_negatives"):
        load_config(TrainConfig, None, ["data.train=[x]", "loss.in_batch_negatives=false", "loss.same_tower=true"])

    data = tmp_path / "train.jsonl"
    build(data)
    rows = [json.loads(l) for l in data.read_text().splitlines()]
    for i, r in enumerate(rows):      # teacher scores on every other record (one per negative, positive first)
        if i % 2 == 0:
            r["negatives"] = r["negatives"] or [rows[i - 1]["positive"]]    # else its group is filled: unscored
            r["scores"] = [float(i % 3)] + [float((i + k) % 4) for k in range(1, len(r["negatives"]) + 1)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loss_keys = dict(directions=["q2d", "d2q"], false_negative_margin=0.05, distill_weight=0.5,
                     teacher_temperature=0.5)
    overrides = ["model.path=tiny-llama", "model.lora.dropout=0.0", f"data.train=[{data}]", "batch.queries=4",
                 "batch.chunk_tokens=64", "steps=1", f"loss.temperature={TAU}", "loss.directions=[q2d,d2q]",
                 "loss.false_negative_margin=0.05", "loss.distill_weight=0.5", "loss.teacher_temperature=0.5",
                 f"output_dir={tmp_path / 'run'}", "checkpoint_every=0", "device=cpu"]
    cfg = load_config(TrainConfig, None, overrides)
    result = run_training(cfg, progress=False)
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["chunks"] > 1 and rec["packed"]       # packing on (auto), several GradCache chunks
    torch.manual_seed(cfg.seed)
    e = Embedder.from_config(cfg.model, torch.device("cpu"))
    e.model.train()
    examples, _ = batch_at(ExampleFile(cfg.data.train), 0, cfg.batch.queries, cfg.seed)
    batch = to_batch(examples, cfg.batch.negatives)
    assert batch.teacher_scores is not None and not torch.isnan(batch.teacher_scores[:, 0]).all()
    import math
    loss, g, _ = independent_terms_step(e, batch, math.log(TAU), **loss_keys)
    plain_loss, g_plain, _ = independent_terms_step(e, batch, math.log(TAU))
    assert abs(plain_loss - loss) > 0.01 * loss and abs(float(g_plain.norm()) - float(g.norm())) > 0.01 * g.norm()
    assert abs(result["losses"][0] - loss) <= 1e-5 * loss, (result["losses"][0], loss)
    assert abs(rec["grad_norm"] - float(g.norm())) <= 1e-4 * float(g.norm())

    # distill_weight with no scored record anywhere is refused before any model loads, naming the key
    plain = tmp_path / "plain.jsonl"
    build(plain)
    cfg = load_config(TrainConfig, None, [*overrides[:2], f"data.train=[{plain}]", *overrides[3:],
                                          f"output_dir={tmp_path / 'unscored'}"])    # a fresh run folder
    with pytest.raises(ValueError, match="loss.distill_weight"):
        run_training(cfg, progress=False)
