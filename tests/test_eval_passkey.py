import pytest
import torch

from embforge.eval.encoders import HashingEncoder, minilm_path
from embforge.eval.passkey import evaluate_passkey, make_passkey_task


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


@pytest.mark.parametrize("length", [256, 2048])
def test_generator_lengths_names_and_needles(tokenizer, length):
    task = make_passkey_task(tokenizer, length, n_candidates=100, n_queries=50, seed=1)
    unit = len(tokenizer(" " + "The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
                         "back again.", add_special_tokens=False)["input_ids"])
    assert len(task.documents) == 100 and len(task.queries) == 50
    assert len(set(task.names)) == 100 and len(set(task.answers)) == 50
    for doc, n, name, key in zip(task.documents, task.doc_tokens, task.names, task.passkeys):
        assert length - unit <= n <= length
        assert n == len(tokenizer(doc, add_special_tokens=False)["input_ids"])
        assert doc.count(f"pass key of {name} is {key}") == 1
    for q, i in zip(task.queries, task.answers):
        assert q == f"what is the pass key for {task.names[i]}?"
    positions = {doc.index("pass key") for doc in task.documents}
    # needles sit at random depths (a 256-token document only has ~10 possible slots)
    assert len(positions) >= min(10, length // (2 * unit))


def test_generator_is_deterministic_per_seed(tokenizer):
    a = make_passkey_task(tokenizer, 256, n_candidates=20, n_queries=5, seed=0)
    b = make_passkey_task(tokenizer, 256, n_candidates=20, n_queries=5, seed=0)
    c = make_passkey_task(tokenizer, 256, n_candidates=20, n_queries=5, seed=1)
    assert a == b and a.passkeys != c.passkeys


class _ConstantEncoder:
    def encode(self, texts, *, instruction=None, batch_size=32):
        return torch.nn.functional.normalize(torch.ones(len(texts), 4), dim=1)


def test_accuracy_tracks_encoder_quality(tokenizer):
    # Names are the only difference between documents, so a lexical encoder finds every one; a constant one
    # always answers document 0 (argmax of ties), right at most once.
    good = evaluate_passkey(HashingEncoder(), tokenizer, [256, 512], n_candidates=30, n_queries=10, progress=False)
    bad = evaluate_passkey(_ConstantEncoder(), tokenizer, [256], n_candidates=30, n_queries=10, progress=False)
    assert good == {"passkey_acc_at_256": 1.0, "passkey_acc_at_512": 1.0}
    assert bad["passkey_acc_at_256"] <= 0.1
