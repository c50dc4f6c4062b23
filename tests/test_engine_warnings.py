"""Third-party warnings that tell the user nothing are filtered where they arise (engine/model.py), by exact message,
category and module: peft reading transformers' deprecated `is_gradient_checkpointing` on every model load. Run in
a fresh interpreter, since pytest installs its own warning filters over the module's."""
import subprocess
import sys

import pytest

PROBE = """
import warnings
from transformers import LlamaConfig, LlamaModel
model = LlamaModel(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1))
if {import_embforge}:
    import embforge.engine.model
model.is_gradient_checkpointing                      # what peft reads on every get_peft_model / from_pretrained
warnings.warn("an unrelated FutureWarning", FutureWarning)   # still shown: the filter is not a blanket ignore
"""


def _stderr(import_embforge: bool) -> str:
    return subprocess.run([sys.executable, "-c", PROBE.format(import_embforge=import_embforge)],
                          capture_output=True, text=True, timeout=300).stderr


@pytest.mark.slow     # two fresh interpreters importing transformers
def test_is_gradient_checkpointing_warning_filtered_only_that_one():
    without, with_ = _stderr(False), _stderr(True)
    assert "is_gradient_checkpointing" in without          # the warning exists in this transformers version
    assert "is_gradient_checkpointing" not in with_
    assert "an unrelated FutureWarning" in with_
