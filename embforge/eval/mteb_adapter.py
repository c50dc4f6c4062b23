"""Run embforge encoders under mteb 2.x, offline.

`MtebEncoder` satisfies mteb's EncoderProtocol: mteb asks for query or document embeddings (`prompt_type`);
queries get the E5 template with the task's instruction (our E5 table first, then the task's own prompt),
documents get none, and symmetric tasks (prompt_type None: STS, clustering...) get it on both sides as in E5.
`beir_task` wraps a local BEIR folder as an mteb retrieval task whose `load_data` reads local files only.
"""
from __future__ import annotations

from pathlib import Path

from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from .beir import BeirDataset, load_beir
from .instructions import e5_instructions


class MtebEncoder(AbsEncoder):
    """Adapter from the embforge encoder contract to mteb's `encode(DataLoader, task_metadata, ...)`.

    `instructions` (task name -> instruction) overrides the built-in E5 table.
    """

    def __init__(self, encoder, *, name: str = "embforge/local-model", revision: str = "local",
                 instructions: dict[str, str] | None = None):
        self.encoder = encoder
        self.instructions = {**e5_instructions(), **(instructions or {})}
        self.mteb_model_meta = ModelMeta.create_empty({
            "name": name, "revision": revision, "similarity_fn_name": ScoringFunction.COSINE,
            "use_instructions": True, "framework": ["PyTorch"], "modalities": ["text"]})

    def instruction(self, task_metadata: TaskMetadata, prompt_type: PromptType | None) -> str | None:
        if prompt_type == PromptType.document:
            return None
        if task_metadata.name in self.instructions:
            return self.instructions[task_metadata.name]
        prompt = task_metadata.prompt
        if isinstance(prompt, dict):
            prompt = prompt.get(PromptType.query.value)
        return prompt or None

    def encode(self, inputs, *, task_metadata: TaskMetadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs):
        texts = [text for batch in inputs for text in batch["text"]]
        emb = self.encoder.encode(texts, instruction=self.instruction(task_metadata, prompt_type),
                                  batch_size=int(kwargs.get("batch_size") or 32))
        return emb.float().cpu().numpy()


def beir_task(data: BeirDataset | str | Path, *, name: str = "EmbforgeLocalRetrieval", split: str = "test",
              instruction: str | None = None) -> AbsTaskRetrieval:
    """An mteb retrieval task over a local BEIR split (no hub access; data is read in `load_data`)."""
    from datasets import Dataset

    metadata = TaskMetadata(
        name=name, description=f"Local BEIR-format data evaluated by embforge ({data if not isinstance(data, BeirDataset) else data.name}).",
        reference=None, dataset={"path": "local", "revision": "local"}, type="Retrieval", category="t2t",
        modalities=["text"], eval_splits=[split], eval_langs=["eng-Latn"], main_score="ndcg_at_10",
        date=None, domains=[], task_subtypes=[], license="not specified", annotations_creators="derived",
        dialect=[], sample_creation="found", bibtex_citation="",
        prompt={"query": instruction} if instruction else None)

    class _LocalBeirTask(AbsTaskRetrieval):
        def load_data(self, num_proc: int | None = None, **kwargs) -> None:
            ds = data if isinstance(data, BeirDataset) else load_beir(data, split)
            queries = Dataset.from_list([{"id": q, "text": t} for q, t in ds.queries.items() if q in ds.qrels])
            corpus = Dataset.from_list([{"id": d, "text": t, "title": ""} for d, t in ds.corpus.items()])
            self.dataset = {"default": {split: {"queries": queries, "corpus": corpus,
                                                "relevant_docs": ds.qrels, "top_ranked": None}}}
            self.data_loaded = True

    _LocalBeirTask.metadata = metadata
    _LocalBeirTask.__name__ = name
    return _LocalBeirTask()


def run_mteb(encoder, tasks, *, name: str = "embforge/local-model", batch_size: int = 32,
             output_folder: str | Path | None = None) -> dict[str, dict]:
    """Evaluate `encoder` on mteb task objects; returns {task name: scores of its first eval split}.

    Results are not cached in ~/.cache/mteb (cache=None) so a rerun always measures the current weights.
    """
    import mteb

    model = encoder if isinstance(encoder, MtebEncoder) else MtebEncoder(encoder, name=name)
    result = mteb.evaluate(model, tasks, cache=None, encode_kwargs={"batch_size": batch_size},
                           overwrite_strategy="always", show_progress_bar=False)
    out = {}
    for task_result in result.task_results:
        split = next(iter(task_result.scores))
        out[task_result.task_name] = task_result.scores[split][0]
    if output_folder is not None:
        import json

        Path(output_folder).mkdir(parents=True, exist_ok=True)
        (Path(output_folder) / "mteb_scores.json").write_text(json.dumps(out, indent=2, default=float))
    return out
