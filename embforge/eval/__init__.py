"""Offline evaluation (issue 5): BEIR retrieval, STS, E5 passkey, and an mteb adapter.

Entry points (embforge/cli wires them to the trainer and the commands; imports stay light until used):
- `embforge.eval.retrieval.evaluate_retrieval(encoder, dataset, *, instruction=None, batch_size=32,
   k_values=(10, 100), ...) -> dict`
- `embforge.eval.datasets.chatterbot_beir(out_dir=None, ...)`, `synthetic_beir(path, ...)`, `is_heldout(...)`
- `embforge.eval.sts.evaluate_sts`, `embforge.eval.passkey.evaluate_passkey`
- `embforge.eval.results.make_records` / `write_results`
- `embforge.eval.training.evaluate(embedder, data, out_dir, step, ...)`: evaluation during training
- `embforge.eval.report.evaluate_model` / `report`: the CPU demo's held-out sets and summary
See docs/eval.md.
"""
