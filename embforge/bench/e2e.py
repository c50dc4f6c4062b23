"""End-to-end GradCache training step: ours vs sentence-transformers' cached loss, and one lever at a time.

One row per (system, lever): the median of `steps` measured steps after a small warm-up step, with tokens/s, model
and hardware FLOP utilization (embforge/bench/flops.py), peak memory, the time split (pass 1 / loss / pass 2 /
optimizer), the chunk shapes the decoder really ran (tracker.py) and the environment. Rows are written as soon as
they exist, and a lever that fails becomes a row saying why: one broken lever never loses the others.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from embforge.bench import common, flops, models, peer, synthetic
from embforge.bench.levers import Lever, apply_lever, levers_for, plant_slow_layers
from embforge.bench.plots import plot
from embforge.bench.setup import Setup, setup_for
from embforge.bench.tracker import Tracker
from embforge.engine.precision import auto_dtype

QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: {query}"


# ------------------------------------------------------------------------------------------------ systems

def load_embedder(model_dir, setup: Setup, lever: Lever, device: str):
    from embforge.engine.model import Embedder, ModelConfig
    cfg = ModelConfig(path=str(model_dir), quantization=lever.quantization or setup.quantization,
                      gradient_checkpointing=_ckpt(setup, lever), attn_implementation="auto",
                      query_template=QUERY_TEMPLATE, query_max_length=setup.max_length,
                      doc_max_length=setup.max_length)
    if getattr(cfg.lora, "r", setup.lora_r) != setup.lora_r:
        cfg.lora.r = setup.lora_r
    emb = Embedder.from_config(cfg, device=device)
    emb.train()
    return emb


def _ckpt(setup: Setup, lever: Lever) -> bool:
    return setup.gradient_checkpointing if lever.gradient_checkpointing is None else lever.gradient_checkpointing


def _seconds_to_ms(timings: dict) -> dict:
    """The engine's own perf_counter split (not synchronized on CUDA: kept beside the tracker's event split)."""
    return {f"engine_{k}_ms": round(float(v) * 1e3, 3) for k, v in (timings or {}).items()}


def ours_step(embedder, texts, setup: Setup, lever: Lever, global_len: int | None = None):
    """global_len: the padded-globally lever -- chunks of chunk_tokens // global_len rows (the same token budget
    once every row is padded to the step's longest, as a globally padded batch sliced into mini-batches is)."""
    from embforge.engine.gradcache import ContrastiveBatch, contrastive_step
    queries, instructions, documents = texts
    batch = ContrastiveBatch(queries=queries, instructions=instructions, documents=documents)
    chunk_tokens = lever.chunk_tokens or setup.chunk_tokens
    max_rows = max(1, chunk_tokens // global_len) if global_len else None

    def step() -> dict:
        r = contrastive_step(embedder, batch, temperature=setup.temperature, chunk_tokens=chunk_tokens,
                             max_chunk_seqs=max_rows)
        return {"loss": float(r.loss), "engine_chunks": r.n_chunks, "engine_tokens": r.tokens,
                "engine_padded_tokens": getattr(r, "padded_tokens", ""), "packing": getattr(r, "packed", ""),
                **_seconds_to_ms(r.timings)}
    return step


def peer_step(st, texts, setup: Setup, lever: Lever, device: str):
    queries, instructions, documents = texts
    feats = peer.features(st, queries, instructions, documents, setup.docs_per_query, QUERY_TEMPLATE, device)
    loss_fn = peer.make_loss(st, temperature=setup.temperature, mini_batch_size=setup.peer_mini_batch,
                             mini_batch_num_tokens=setup.chunk_tokens if lever.peer_token_budget else None)

    mode = peer.peer_mode(st, lever.peer_token_budget)

    def step() -> dict:
        loss = loss_fn(feats, None)
        loss.backward()
        return {"loss": float(loss.detach()), "peer_mode": mode}
    return step


# ------------------------------------------------------------------------------------------------ measuring

def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _memory_reset(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    gc.collect()
    common.reset_peak_rss()
    return common.current_rss_mb()


def _memory_peak(device) -> dict:
    if torch.device(device).type == "cuda":
        return {"peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                "peak_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1)}
    return {"peak_mem_mb": round(common.peak_rss_mb(), 1)}


def measure(step_fn, params, device: str, tracker: Tracker, n_steps: int, warmup_fn=None,
            profile_path: Path | None = None) -> dict:
    """Median over the steps after the first (the first alone when n_steps is 1) of one step + AdamW update; memory
    and chunk shapes of that step.
    step_over_matmul = fastest step / fastest dense matmul, the matmul timed just before each step: on shared CPU
    cores other processes only ever add time, so minima of neighbouring measurements are the stable estimate."""
    opt = torch.optim.AdamW(params, lr=1e-4, fused=torch.device(device).type == "cuda")
    if warmup_fn is not None:  # kernels, allocator and autotuning warm, off the clock
        warmup_fn()
        opt.step()
        opt.zero_grad(set_to_none=True)
    runs = []
    for _ in range(n_steps):
        ref_ms = common.time_fn(_matmul_fn(device), device, warmup=1, reps=3)["p20_ms"]
        base_mb = _memory_reset(device)
        with tracker.step() as trace:
            t0 = time.perf_counter()
            info = step_fn()
            tracker.mark("end")
        opt.step()
        opt.zero_grad(set_to_none=True)
        tracker.mark("optimizer_end")
        _sync(device)
        step_ms = (time.perf_counter() - t0) * 1e3
        runs.append({**info, "step_ms": step_ms, **tracker.split_ms(), "matmul_ms_before": ref_ms,
                     "mem_before_step_mb": round(base_mb, 1), **_memory_peak(device), "trace": trace})
    if profile_path is not None:
        _profile_step(step_fn, opt, device, profile_path)
    warm = runs[1:] or runs  # with 2+ steps the first is a warm-up on the clock (see setup_for)
    mid = sorted(warm, key=lambda r: r["step_ms"])[(len(warm) - 1) // 2]
    out = {k: v for k, v in mid.items() if k not in ("trace", "matmul_ms_before")}
    out["first_step_ms"] = round(runs[0]["step_ms"], 1)
    out["step_ms_all"] = ";".join(f"{r['step_ms']:.1f}" for r in runs)
    out["step_over_matmul"] = round(min(r["step_ms"] for r in warm) / min(r["matmul_ms_before"] for r in runs), 3)
    out.update(mid["trace"].summary())
    out["_trace"] = mid["trace"]
    return out


def _profile_step(step_fn, opt, device: str, path: Path):
    """One more step (not counted) under torch.profiler: the operators that take the device's time, to find what
    keeps the step from the matmul rate."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=acts) as prof:
        step_fn()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
    table = None
    keys = ["self_device_time_total", "self_cuda_time_total"] if torch.device(device).type == "cuda" \
        else ["self_cpu_time_total"]
    for key in keys:  # newer torch calls the device column "device", older "cuda"
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=70)
            break
        except (KeyError, AttributeError, RuntimeError):
            continue
    path.write_text(table or str(prof.key_averages()))


_MATMUL = {}


def _matmul_fn(device):
    """The reference matmul of common.reference_matmul, inputs made once."""
    if device not in _MATMUL:
        dtype, n = auto_dtype(device), (8192 if torch.device(device).type == "cuda" else 1024)
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        _MATMUL[device] = lambda: a @ b
    return _MATMUL[device]


def data_lengths(tokenizer, texts, setup: Setup) -> list[int]:
    """Real tokens of every sequence as both systems see it: template applied, truncated, EOS appended."""
    queries, instructions, documents = texts
    q = [QUERY_TEMPLATE.format(instruction=i, query=t) for t, i in zip(queries, instructions)]
    out = []
    for batch in (q, documents):
        ids = tokenizer(batch, add_special_tokens=False, truncation=True, max_length=setup.max_length - 1)
        out += [len(x) + 1 for x in ids["input_ids"]]
    return out


def flop_columns(m: dict, lengths: list[int], shape: flops.DecoderShape, setup: Setup, ckpt: bool, reference: dict,
                 device_name: str) -> dict:
    trace = m.pop("_trace")
    n_docs = setup.n_queries * setup.docs_per_query
    model = flops.model_flops(shape, lengths, setup.n_queries, n_docs)
    hw = flops.hardware_flops(shape, [s for f in trace.passes(False) for s in f.shapes()],
                              [s for f in trace.passes(True) for s in f.shapes()], ckpt, setup.n_queries, n_docs)
    sec = m["step_ms"] / 1e3
    peak = flops.peak_tflops(device_name)
    cols = {"real_tokens": sum(lengths), "tokens_per_s": round(sum(lengths) / sec, 1), "model_flops": model,
            "hw_flops": hw["total"], "hw_flops_pass1": hw["pass1"], "hw_flops_recompute": hw["recompute"],
            "model_tflops_per_s": round(model / sec / 1e12, 3), "hw_tflops_per_s": round(hw["total"] / sec / 1e12, 3),
            "peak_tflops": peak or "",
            "mfu": round(model / sec / 1e12 / peak, 4) if peak else "",
            "hfu": round(hw["total"] / sec / 1e12 / peak, 4) if peak else "",
            "mfu_vs_matmul": round(model / sec / 1e12 / reference["matmul_tflops"], 4),
            "hfu_vs_matmul": round(hw["total"] / sec / 1e12 / reference["matmul_tflops"], 4)}
    return cols


FORMULAS = ("model=sum_seq(fwd(n)+bwd(n))+6*B*N*H at real n; hw=[pass1 fwd]+[pass2 fwd]+[ckpt recompute fwd]+[bwd] "
            "on padded (rows,len), a packed row as its sequences; fwd(n)=2*(Pb+Pl)*n+A(n); "
            "bwd(n)=2*Pb*n+4*Pl*n+2*A(n)-2*n*Q1; "
            "A(n)=4*layers*heads*head_dim*n(n+1)/2; Pb=base linear params, Pl=LoRA params, "
            "Q1=first layer q,k,v base+LoRA-A params (no input grad: frozen embedding)")


# ------------------------------------------------------------------------------------------------ running

class _Rows:
    """Rows kept in memory and rewritten to CSV + JSONL after every row (a crash keeps what was measured)."""

    def __init__(self, out_dir: Path, stem: str, env: dict):
        self.rows, self.env = [], env
        self.csv, self.jsonl = out_dir / f"{stem}.csv", out_dir / f"{stem}.jsonl"
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.jsonl.write_text("")

    def add(self, row: dict):
        row = {**row, **self.env}
        self.rows.append(row)
        common.write_csv(self.rows, self.csv)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        keys = ("system", "lever", "status", "step_ms", "tokens_per_s", "hfu", "hfu_vs_matmul", "peak_mem_mb")
        print("e2e " + "  ".join(f"{k}={row[k]}" for k in keys if k in row), file=sys.stderr, flush=True)


def _free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run(device: str = "cpu", out_dir: str | Path = "bench/results", quick: bool = False, *, part: str = "e2e",
        model_cache: str | Path | None = None, budget_s: float | None = None, levers: list[str] | None = None,
        setup: Setup | None = None, plant: dict | None = None, profile: bool = False) -> list[dict]:
    """Run the headline step, the peer and the levers of `part` ("e2e" or "e2e_big"); return the rows.
    `profile`: one extra baseline step under torch.profiler, table written to <part>_profile_<device>.txt.
    `plant` injects a known regression for the check's own test ({"pad_global": True} or {"slow_layers": k})."""
    if torch.device(device).type == "cpu":
        # One thread on CPU: on shared cores OpenMP's worker barriers turn other processes' load into 10-100x
        # slowdowns of the same step (seen here: 0.5 s and 58 s); a single thread only loses its share of the core.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _run(device, out_dir, quick, part, model_cache, budget_s, levers, setup, plant, profile)
        finally:
            torch.set_num_threads(threads)
    return _run(device, out_dir, quick, part, model_cache, budget_s, levers, setup, plant, profile)


def _run(device, out_dir, quick, part, model_cache, budget_s, levers, setup, plant, profile) -> list[dict]:
    t_start = time.monotonic()
    out_dir = Path(out_dir)
    setup = setup or setup_for(part, device, quick)
    tag = "cuda" if device == "cuda" else "cpu"
    model_dir = models.random_model_dir(setup.shape, Path(model_cache or Path.home() / ".cache/embforge/bench")
                                        / f"mistral-{setup.shape}-{tag}", device)
    init_s = time.monotonic() - t_start
    reference = common.reference_matmul(device)
    env = {**common.env_columns(device), "threads": torch.get_num_threads(),
           **{k: round(v, 4) if isinstance(v, float) else v for k, v in reference.items()}}
    rows = _Rows(out_dir, f"{part}_{tag}", env)
    hf_cfg = models.mistral_config(setup.shape)
    n_docs = setup.n_queries * setup.docs_per_query
    texts = synthetic.make_batch_texts(setup.n_queries, setup.docs_per_query, setup.lengths, hf_cfg.vocab_size)
    warm = (synthetic.make_batch_texts(setup.warmup_queries, setup.docs_per_query, setup.lengths,
                                       hf_cfg.vocab_size, seed=1) if setup.warmup_queries else None)
    from transformers import AutoTokenizer
    lengths = data_lengths(AutoTokenizer.from_pretrained(model_dir), texts, setup)
    global_len = max(lengths)  # the step's longest sequence: what global padding pads every chunk to
    chosen = levers_for(setup, device, quick) if part == "e2e" else [Lever("baseline")]
    if levers:
        chosen = [lv for lv in chosen if lv.name in levers]
    plant = plant or {}
    # (system, base weights) -> the loaded model, reused by the levers that only toggle something. One at a time,
    # so a row's peak memory is its own model's (loading again from the page cache took 3-4 s for 7B on the H100).
    systems: dict = {}
    shape = flops.DecoderShape.from_hf_config(hf_cfg, setup.lora_r)
    baseline_s: list[float] = []  # the headline's wall time: the unit of the levers' cost estimates

    def system_for(lever: Lever):
        key = (lever.system, lever.quantization or setup.quantization)
        if key not in systems:
            systems.clear()
            _free(device)
            if lever.system == "embforge":
                obj = load_embedder(model_dir, setup, lever, device)
            else:
                dtype = auto_dtype(device)
                obj = peer.build_st_model(model_dir, device=device, dtype=dtype, quantization=key[1],
                                          gradient_checkpointing=setup.gradient_checkpointing,
                                          max_length=setup.max_length, lora_r=setup.lora_r)
            if plant.get("slow_layers"):
                plant_slow_layers(obj, int(plant["slow_layers"]))
            systems[key] = obj
        return systems[key]

    for lever in chosen:
        base = {"part": part, "setup": setup.name, "system": lever.system, "lever": lever.name,
                "n_queries": setup.n_queries, "n_docs": n_docs, "max_length": setup.max_length,
                "chunk_tokens": lever.chunk_tokens or setup.chunk_tokens,
                "peer_mini_batch": setup.peer_mini_batch if lever.system != "embforge" else "",
                "quantization": lever.quantization or setup.quantization, "grad_ckpt": _ckpt(setup, lever),
                "lora_r": setup.lora_r, "model_init_s": round(init_s, 1)}
        elapsed = time.monotonic() - t_start
        estimate = lever.cost * baseline_s[0] if baseline_s else 0.0
        if budget_s is not None and elapsed + estimate > budget_s:
            rows.add({**base, "status": f"skipped: {elapsed:.0f}s spent + ~{estimate:.0f}s estimated > budget "
                                        f"{budget_s:.0f}s"})
            continue
        tracker, undo = None, []
        t_lever = time.monotonic()
        try:
            obj = system_for(lever)
            load_s = time.monotonic() - t_lever
            apply_lever(obj, lever, setup, global_len, plant, undo)
            tracker = Tracker(obj, track_saved=device != "cuda")
            pad = global_len if (lever.pad_global or plant.get("pad_global")) else None
            if lever.system == "embforge":
                step, warm_step = (ours_step(obj, texts, setup, lever, pad),
                                   ours_step(obj, warm, setup, lever, pad) if warm else None)
                params = list(obj.trainable_parameters())
            else:
                step, warm_step = (peer_step(obj, texts, setup, lever, device),
                                   peer_step(obj, warm, setup, lever, device) if warm else None)
                params = peer.trainable_parameters(obj)
            prof = out_dir / f"{part}_profile_{tag}.txt" if profile and lever.name == "baseline" else None
            m = measure(step, params, device, tracker, min(setup.steps, lever.max_steps or setup.steps), warm_step,
                        prof)
            cols = flop_columns(m, lengths, shape, setup, _ckpt(setup, lever), reference, env["device"])
            lever_s = time.monotonic() - t_lever
            if lever.name == "baseline":
                baseline_s.append(lever_s)
            rows.add({**base, "status": "ok", "load_s": round(load_s, 1), "lever_s": round(lever_s, 1), **m, **cols,
                      "formulas": FORMULAS})
        except torch.OutOfMemoryError as e:
            rows.add({**base, "status": f"oom: {str(e).splitlines()[0][:200]}"})
        except Exception as e:  # noqa: BLE001 -- one broken lever must not lose the other rows
            traceback.print_exc(file=sys.stderr)
            rows.add({**base, "status": f"error: {type(e).__name__}: {e}"[:300]})
        finally:
            if tracker is not None:
                tracker.remove()
            for fn in reversed(undo):
                fn()
            if lever.quantization or lever.liger or lever.compile_layers:
                # a one-off base-weight format, or a model patched for good: never reused, memory given back
                systems.pop((lever.system, lever.quantization or setup.quantization), None)
            _free(device)
    systems.clear()
    _free(device)
    _add_ratios(rows.rows)
    common.write_csv(rows.rows, rows.csv)
    plot(rows.rows, out_dir / f"{part}_{tag}.png")
    return rows.rows


def _add_ratios(rows: list[dict]):
    """On the embforge baseline row: speedup_vs_peer (the peer's normalized step over ours, same data and batch),
    tokens_per_s_ratio_vs_peer (medians), speedup_vs_best_peer (against the best peer configuration measured)."""
    ok = {r["lever"]: r for r in rows if r.get("status") == "ok"}
    ours = ok.get("baseline")
    peers = [r for r in ok.values() if r["system"] == "sentence-transformers"]
    if not ours:
        return
    for r in rows:
        if r.get("status") == "ok":
            r["speedup_vs_baseline"] = round(ours["step_ms"] / r["step_ms"], 3)
    if "peer" in ok and ok["peer"]["tokens_per_s"]:
        # each side's fastest step over the matmul timed beside it (measure()): robust to load that changes
        # between the two systems' turns; on a quiet GPU it equals the plain ratio of step times
        ours["speedup_vs_peer"] = round(ok["peer"]["step_over_matmul"] / ours["step_over_matmul"], 3)
        ours["tokens_per_s_ratio_vs_peer"] = round(ours["tokens_per_s"] / ok["peer"]["tokens_per_s"], 3)
    if peers:
        ours["speedup_vs_best_peer"] = round(min(p["step_ms"] for p in peers) / ours["step_ms"], 3)


def setup_dict(setup: Setup) -> dict:
    return dataclasses.asdict(setup)
