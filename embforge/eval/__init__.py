"""Offline evaluation (issue 5): BEIR retrieval, STS, E5 passkey, and an mteb adapter.

Entry points for other packages (the trainer calls these; imports stay light until used):
- `embforge.eval.retrieval.evaluate_retrieval(encoder, dataset, *, instruction=None, batch_size=32,
   k_values=(10, 100), ...) -> dict`
- `embforge.eval.datasets.chatterbot_beir(out_dir=None, ...)`, `synthetic_beir(path, ...)`, `is_heldout(...)`
- `embforge.eval.sts.evaluate_sts`, `embforge.eval.passkey.evaluate_passkey` / `rope_override`
- `embforge.eval.results.make_records` / `write_results`
See docs/eval.md.
"""
