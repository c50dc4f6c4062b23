"""Mutation pass over the InfoNCE loss and its callers: break the code on purpose, check that some test fails.

For each mutation: copy embforge/, tests/ and pyproject.toml to a fresh temp dir, apply one text substitution (it
must change the source: asserted), run the relevant tests there with PYTHONPATH pointing at the copy (stopping at
the first failure), and record killed (a test failed) or survived (all passed). The unmutated copy is run first
(baseline): a mutation only counts as killed when the same tests pass without it.

    python scripts/mutation_check.py                     # every mutation
    python scripts/mutation_check.py --only dtau-sign    # some of them (repeatable)
    python scripts/mutation_check.py --list

Exit code 0 when every mutation is killed and every baseline passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "embforge/kernels/infonce.py"
GRADCACHE = "embforge/engine/gradcache.py"
TRAIN = "embforge/engine/train.py"
TEMPERATURE = "embforge/engine/temperature.py"
CHECKPOINT = "embforge/engine/checkpoint.py"
MIXTURE = "embforge/data/mixture.py"

# Test sets (pytest node ids, run in the copy). Kept to the tests that target the mutated code.
# Feature tests first (pytest runs node ids in the order given, and -x stops at the first failure), then the grids.
KERNEL_TESTS = [f"tests/test_kernels_infonce.py::{t}" for t in (
    "test_masking_of_duplicates_and_query_ids", "test_same_tower", "test_matryoshka_every_term_counts",
    "test_temperature_tensor_gradient_and_value", "test_gradient_scales_with_the_upstream_gradient",
    "test_chunking_gives_the_same_loss_and_gradients", "test_no_grad_forward_matches_reference",
    "test_gpu_check_runs_on_cpu", "test_more_candidates_than_one_block_and_positive_index",
    "test_single_candidate_loss_and_gradients_are_exactly_zero", "test_gradcheck_float64_with_every_feature",
    "test_properties_rows_of_G_sum_to_zero_and_radial_grad_is_zero", "test_triton_backend",
    "test_torch_backend_grid")]
GRADCACHE_TESTS = ["tests/test_engine_gradcache.py::test_gradcache_matches_independent_reference",
                   "tests/test_engine_gradcache.py::test_loss_equals_hand_written_reference_with_duplicates_masked",
                   "tests/test_engine_gradcache.py::test_gradcache_equals_unchunked_batch_without_dropout"]
TRAIN_CONFIG_TESTS = ["tests/test_engine_gradcache.py::test_train_config_passes_same_tower_and_matryoshka"]
LEARN_TAU_TESTS = ["tests/test_engine_train.py::test_learnable_temperature_trains_and_is_restored_on_resume"]
SIGNAL_TESTS = ["tests/test_engine_train.py::test_sigint_checkpoints_after_the_current_step_and_resume_continues"]
PRUNE_TESTS = ["tests/test_engine_train.py::test_save_checkpoint_keeps_the_last_two_in_step_order"]
MIXTURE_TESTS = [f"tests/test_data_mixture.py::{t}" for t in (
    "test_weights_give_the_empirical_shares", "test_homogeneous_batches_come_from_one_dataset_mixed_ones_do_not",
    "test_no_duplicate_texts_in_a_batch_and_skipped_examples_come_later",
    "test_resume_from_a_saved_position_continues_exactly")]


@dataclass
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: list[str]
    count: int = 1        # occurrences that must be replaced (all of them)
    why: str = ""


MUTATIONS = [
    # --- masking ---------------------------------------------------------------------------------------------
    Mutation("triton-no-id-mask", KERNEL, "keep = keep & ((cols == pos) | (~false_neg))", "keep = keep",
             KERNEL_TESTS, 2, "Triton kernel: no duplicate / false-negative masking at all (both sweeps)"),
    Mutation("triton-no-id-mask-grad-sweep", KERNEL,
             "                keep = keep & ((cols == pos) | (~false_neg))", "                keep = keep",
             KERNEL_TESTS, 1, "Triton kernel: id masking in the loss sweep only, not in the gradient sweep"),
    Mutation("triton-no-query-id-rule", KERNEL, "((cid == pos_id) | (cid == q_id))", "(cid == pos_id)",
             KERNEL_TESTS, 2, "Triton kernel: a candidate with the query's own id stays a negative"),
    Mutation("torch-no-query-id-rule", KERNEL, " | (cid[None, :] == q_id[:, None])", "", KERNEL_TESTS, 1,
             "torch epilogue: a candidate with the query's own id stays a negative"),
    Mutation("torch-no-dup-rule", KERNEL, "(cid[None, :] == pos_id[:, None]) | ", "", KERNEL_TESTS, 1,
             "torch epilogue: a duplicate of the positive stays a negative"),
    Mutation("torch-positive-masked-too", KERNEL, "        drop[rows, pos] = False", "        pass",
             KERNEL_TESTS, 1, "torch epilogue: the positive is masked when a duplicate rule hits it"),
    Mutation("unknown-ids-mask", KERNEL, "false_neg = (cid >= 0) & (", "false_neg = (cid >= -1) & (",
             KERNEL_TESTS, 2, "Triton kernel: id -1 (unknown) masks like a real id"),
    # --- same tower ------------------------------------------------------------------------------------------
    Mutation("same-tower-copy-detached", KERNEL, "candidates = torch.cat([d, tq.to(d.dtype)], dim=0)",
             "candidates = torch.cat([d, tq.detach().to(d.dtype)], dim=0)", KERNEL_TESTS, 1,
             "no gradient through the queries-as-candidates copy"),
    Mutation("torch-self-column-kept", KERNEL, "            drop[rows, self_col] = True", "            pass",
             KERNEL_TESTS, 1, "torch epilogue: a query competes with its own copy"),
    Mutation("triton-self-column-kept", KERNEL, "keep = keep & (cols != self_col)", "keep = keep",
             KERNEL_TESTS, 2, "Triton kernel: a query competes with its own copy"),
    # --- Matryoshka --------------------------------------------------------------------------------------------
    Mutation("matryoshka-skip-full-dim", KERNEL, "        part = _single_dim_loss(q[:, : int(m_dim)]",
             "        if int(m_dim) == H:\n            continue\n        part = _single_dim_loss(q[:, : int(m_dim)]",
             KERNEL_TESTS, 1, "the full-dimension Matryoshka term is skipped"),
    Mutation("matryoshka-weights-ignored", KERNEL, "tower_queries=tq, **kw) \\\n            * float(w)",
             "tower_queries=tq, **kw)",
             KERNEL_TESTS, 1, "Matryoshka weights ignored"),
    # --- temperature -------------------------------------------------------------------------------------------
    Mutation("inv-tau-squared", KERNEL, "_infonce_chunked(q, d, 1.0 / tau,", "_infonce_chunked(q, d, 1.0 / tau ** 2,",
             KERNEL_TESTS, 1, "logits scaled by 1/tau^2"),
    Mutation("tau-ignored", KERNEL, "        tau = float(temperature)\n", "        tau = 0.02\n", KERNEL_TESTS, 1,
             "the given temperature is ignored (default 0.02 used)"),
    Mutation("dtau-sign", KERNEL, "dtau = (-gs / tau)", "dtau = (gs / tau)", KERNEL_TESTS, 1,
             "dL/dtau with the wrong sign"),
    Mutation("dtau-missing-1/tau", KERNEL, "dtau = (-gs / tau)", "dtau = (-gs)", KERNEL_TESTS, 1,
             "dL/dtau missing its 1/tau factor"),
    # --- gradient scale ----------------------------------------------------------------------------------------
    Mutation("grad-scale-x2", KERNEL, "grad_scale = inv_tau / B", "grad_scale = 2 * inv_tau / B", KERNEL_TESTS, 1,
             "every gradient twice too large"),
    Mutation("grad-scale-no-1/B", KERNEL, "grad_scale = inv_tau / B", "grad_scale = inv_tau", KERNEL_TESTS, 1,
             "gradient not averaged over the batch"),
    Mutation("grad-output-ignored", KERNEL, "gq = dq * grad_out.to(dq.dtype)", "gq = dq", KERNEL_TESTS, 1,
             "backward ignores the upstream gradient for q"),
    # --- the GradCache call and train's config -------------------------------------------------------------------
    Mutation("gradcache-no-ids", GRADCACHE, "loss_kw = dict(query_ids=qid.to(dev), doc_ids=did.to(dev),",
             "loss_kw = dict(query_ids=None, doc_ids=None,", GRADCACHE_TESTS, 1,
             "contrastive_step does not pass text ids: duplicates are negatives"),
    Mutation("gradcache-same-tower-dropped", GRADCACHE, "same_tower=same_tower,\n", "same_tower=False,\n",
             GRADCACHE_TESTS, 1, "contrastive_step ignores same_tower"),
    Mutation("gradcache-matryoshka-dropped", GRADCACHE,
             "matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights",
             "matryoshka_dims=None, matryoshka_weights=None", GRADCACHE_TESTS, 1,
             "contrastive_step ignores Matryoshka"),
    Mutation("gradcache-pass2-grad-x2", GRADCACHE, "grad_tensors=grad.index_select(0, idx)",
             "grad_tensors=2 * grad.index_select(0, idx)", GRADCACHE_TESTS, 1,
             "pass 2 pushes twice the cached gradient"),
    Mutation("train-same-tower-not-passed", TRAIN, "same_tower=cfg.loss.same_tower", "same_tower=False",
             TRAIN_CONFIG_TESTS, 1, "train ignores loss.same_tower"),
    Mutation("train-matryoshka-not-passed", TRAIN, "matryoshka_dims=cfg.loss.matryoshka_dims",
             "matryoshka_dims=None", TRAIN_CONFIG_TESTS, 1, "train ignores loss.matryoshka_dims"),
    Mutation("train-tau-not-learned", TEMPERATURE, "return self.log_tau.exp() if self.learnable",
             "return self.log_tau.exp().detach() if self.learnable", LEARN_TAU_TESTS, 1,
             "learnable temperature gets no gradient"),
    Mutation("checkpoint-log-tau-not-restored", CHECKPOINT, "            log_tau.copy_(tau)", "            pass",
             LEARN_TAU_TESTS, 1, "resume starts the temperature over"),
    Mutation("checkpoint-keep-3", CHECKPOINT, '.glob("step-*"))[:-keep]', '.glob("step-*"))[:-keep - 1]',
             PRUNE_TESTS, 1, "prunes to keep+1 checkpoints"),
    Mutation("train-signal-ignored", TRAIN, "self.flag = True", "self.flag = False", SIGNAL_TESTS, 1,
             "SIGINT/SIGTERM no longer stop and checkpoint"),
    Mutation("mixture-weights-ignored", MIXTURE, "self._cumulative = [sum(d.weight for d in datasets[:k + 1]) / total",
             "self._cumulative = [(k + 1) / len(datasets)", MIXTURE_TESTS, 1, "datasets drawn uniformly, not by weight"),
    Mutation("mixture-duplicates-kept", MIXTURE, "if ex.query in seen or ex.positive in seen:", "if False:",
             MIXTURE_TESTS, 1, "a homogeneous batch may repeat a query or positive text"),
    Mutation("mixture-deferred-dropped", MIXTURE, "left = sorted(deferred + pending[scanned:])",
             "left = sorted(pending[scanned:])", MIXTURE_TESTS, 1, "a skipped duplicate is dropped from the epoch"),
    Mutation("mixture-unseeded-draw", MIXTURE, 'random.Random(f"embforge-mixture:{self.seed}:{step}").random()',
             "random.random()", MIXTURE_TESTS, 1,
             "each process draws its own dataset per step (ranks and resumes disagree)"),
    Mutation("train-tau-weight-decay", TEMPERATURE, '"weight_decay": 0.0}', '"weight_decay": 0.1}',
             LEARN_TAU_TESTS, 1, "weight decay (the test config's 0.1) pulls the learnable temperature toward 1"),
]

# --- issue 22: the loss terms (embforge/kernels/infonce_terms.py); one mutant per feature -----------------------
TERMS = "embforge/kernels/infonce_terms.py"
TERMS_TESTS = [f"tests/test_kernels_infonce_terms.py::{t}" for t in (
    "test_torch_backend_every_combination", "test_triton_backend_every_combination", "test_triton_backend_without_ids",
    "test_margin_ids_and_own_group_with_positive_index", "test_nan_teacher_rows_are_unscored",
    "test_matryoshka_with_every_term", "test_rank_slices_sum_to_the_full_loss", "test_gradcheck_float64_with_every_term",
    "test_odd_shapes_everything_on", "test_chunking_gives_the_same_loss_and_gradients")]
MUTATIONS += [
    Mutation("terms-margin-flipped", TERMS, "drop.append(s > seg.thr[:, None])", "drop.append(s < seg.thr[:, None])",
             TERMS_TESTS, 1, "torch epilogue: drops the negatives BELOW the positive + margin"),
    Mutation("triton-margin-flipped", TERMS, "keep = keep & ~(s > thr)", "keep = keep & ~(s < thr)", TERMS_TESTS, 1,
             "Triton: drops the negatives BELOW the positive + margin"),
    Mutation("terms-margin-sign", TERMS, "thr = s_pos + L.margin if", "thr = s_pos - L.margin if", TERMS_TESTS, 1,
             "margin subtracted from the positive's cosine"),
    Mutation("terms-q2q-off", TERMS, 'a_qry="q2q" in dirs,', "a_qry=False,", TERMS_TESTS, 1,
             "q2q requested but its columns never enter the partition"),
    Mutation("terms-d2q-off", TERMS, 'b_hi = N + T if "d2q" in dirs else N', "b_hi = N", TERMS_TESTS, 1,
             "d2q requested but segment B never covers the queries"),
    Mutation("terms-d2d-off", TERMS, 'b_lo = 0 if "d2d" in dirs else N', "b_lo = N", TERMS_TESTS, 1,
             "d2d requested but segment B never covers the candidates"),
    Mutation("terms-d2q-self-kept", TERMS, "has_pos=False, ex1=self_c - lo_b,", "has_pos=False, ex1=none_col[:C],",
             TERMS_TESTS, 1, "d2q: query i itself stays a negative for its own positive"),
    Mutation("terms-d2d-self-kept", TERMS, "ex2=pos - lo_b, thr=thr", "ex2=none_col[:C], thr=thr", TERMS_TESTS, 1,
             "d2d: the positive stays a negative of itself"),
    Mutation("triton-self-columns-kept", TERMS, "keep = keep & inb & (cols != ex1) & (cols != ex2)",
             "keep = keep & inb", TERMS_TESTS, 1, "Triton segment kernel: no self exclusion (q2q, d2q, d2d)"),
    Mutation("terms-d2d-anchor-grad-missing", TERMS, "            h.index_add_(0, pos, ",
             "            0 and h.index_add_(0, pos, ", TERMS_TESTS, 1,
             "segment B's gradient never reaches its anchor (the positive)"),
    Mutation("terms-d2q-column-grad-missing", TERMS,
             "base.accumulate_f32_(h[L.b_range[0]: L.b_range[1]], GB.t(), vp_c, first=False)", "pass",
             TERMS_TESTS, 1, "segment B's gradient never reaches its columns (the other queries / candidates)"),
    Mutation("terms-in-batch-ignored", TERMS, "group=None if opts.in_batch else group_size", "group=None",
             TERMS_TESTS, 1, "in_batch_negatives=False has no effect"),
    Mutation("triton-own-group-ignored", TERMS, "doc_ok = doc_ok & (cols >= pos) & (cols < pos + group)",
             "doc_ok = doc_ok", TERMS_TESTS, 1, "Triton: own-group-only keeps every candidate"),
    Mutation("distill-term-dropped", TERMS, "            loss += kl\n", "            loss += 0 * kl\n",
             TERMS_TESTS, 1, "the distillation KL is left out of the loss value"),
    Mutation("distill-grad-dropped", TERMS, "(g_grp * rE[grp_cols]).to(GA.dtype)",
             "(0 * g_grp * rE[grp_cols]).to(GA.dtype)", TERMS_TESTS, 1, "no gradient from the distillation term"),
    Mutation("distill-rowdot-missing", TERMS, "rowdot = rowdot + (g_grp * s_grp).sum(1)", "rowdot = rowdot",
             TERMS_TESTS, 1, "distillation left out of the normalization chain rule and dL/dtau"),
    Mutation("distill-teacher-temperature-ignored", TERMS, "T, 0.0) / opts.teacher_temperature", "T, 0.0)",
             TERMS_TESTS, 1, "teacher_temperature ignored"),
    Mutation("nan-rows-counted", TERMS, "R = int(scored_all.sum())", "R = rows_all", TERMS_TESTS, 1,
             "unscored (NaN) teacher rows count in the distillation mean"),
]


def make_copy(dest: Path):
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "embforge", dest / "embforge", ignore=ignore)
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")


def apply(m: Mutation, dest: Path):
    path = dest / m.path
    src = path.read_text()
    found = src.count(m.old)
    assert found == m.count, f"{m.name}: expected {m.count} occurrence(s) of {m.old!r} in {m.path}, found {found}"
    out = src.replace(m.old, m.new)
    assert out != src, f"{m.name}: the substitution does not change {m.path}"
    path.write_text(out)


def run_tests(dest: Path, tests: list[str], timeout: int) -> tuple[bool, str, float]:
    env = {**os.environ, "PYTHONPATH": str(dest), "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    probe = subprocess.run([sys.executable, "-c", "import embforge; print(embforge.__file__)"], cwd=dest, env=env,
                           capture_output=True, text=True)
    assert probe.stdout.strip().startswith(str(dest)), f"embforge imports from {probe.stdout.strip()}, not the copy"
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=dest,
                           env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timeout", time.time() - t0
    lines = [l for l in r.stdout.splitlines() if l.startswith("FAILED") or l.startswith("ERROR")]
    summary = lines[0][:110] if lines else (r.stdout.strip().splitlines() or ["(no output)"])[-1][:110]
    return r.returncode == 0, summary, time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], help="run only these mutations (by name)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--skip-baseline", action="store_true", help="trust that the unmutated tests pass")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per test run")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:34s} {m.path:32s} {m.why}")
        return 0
    unknown = set(args.only) - {m.name for m in MUTATIONS}
    if unknown:
        ap.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    ok = True
    with tempfile.TemporaryDirectory(prefix="embforge-mutation-") as tmp:
        tmp = Path(tmp)
        if not args.skip_baseline:
            for tests in {tuple(m.tests) for m in chosen}:
                dest = tmp / f"baseline-{abs(hash(tests))}"
                make_copy(dest)
                passed, summary, secs = run_tests(dest, list(tests), args.timeout)
                print(f"baseline {'passed' if passed else 'FAILED'} ({secs:.0f}s): {' '.join(tests)}"
                      + ("" if passed else f"\n  {summary}"), flush=True)
                ok &= passed
                shutil.rmtree(dest)
        rows = []
        for m in chosen:
            dest = tmp / m.name
            make_copy(dest)
            apply(m, dest)
            passed, summary, secs = run_tests(dest, m.tests, args.timeout)
            verdict = "SURVIVED" if passed else "killed"
            ok &= not passed
            rows.append((m.name, verdict, f"{secs:.0f}s", summary if not passed else m.why))
            print(f"{m.name:34s} {verdict:8s} {secs:5.0f}s  {rows[-1][3]}", flush=True)
            shutil.rmtree(dest)
    print("\n| mutation | result | time | first failing test |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3].replace('|', '/')} |")
    killed = sum(r[1] == "killed" for r in rows)
    print(f"\n{killed}/{len(rows)} mutations killed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
