"""The locally built tokenizers give the same ids in every process (checkpoints depend on it)."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = (
    "import json; from m3d_lit.models.tokenizer import build_text_tokenizer, build_llm_tokenizer; "
    "print(json.dumps([sorted(build_text_tokenizer().get_vocab().items()), "
    "sorted(build_llm_tokenizer().get_vocab().items())]))"
)


def test_tokenizers_are_identical_across_hash_seeds() -> None:
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
        )
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
