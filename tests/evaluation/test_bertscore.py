"""BERTScore F1 (m3d protocol, `--bertscore-model DIR`) on a tiny random BERT saved here, against a plain
token-by-token computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from m3d_lit.commands.score import main as score_main
from m3d_lit.errors import InputError
from m3d_lit.evaluation.bertscore import bertscore_f1
from m3d_lit.evaluation.grouped_scores import compute_metrics

PAIRS = [
    ("There is a subdural hemorrhage on the left side.", "Subdural hemorrhage on the left side."),
    ("No, there is no fracture.", "Yes, there is a fracture."),
    ("Yes", "Yes, there is a chronic bleed."),
    ("It is [SEG].", "There is no hemorrhage to segment."),
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory):
    from transformers import BertConfig, BertModel

    from m3d_lit.models.tokenizer import build_text_tokenizer

    folder = tmp_path_factory.mktemp("bert")
    tokenizer = build_text_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


def _plain(pred: str, ref: str, folder, tokenizer, layer: int) -> float:
    """One text at a time, no padding; greedy matching with explicit loops in float64."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder).eval()
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id}

    def tokens(text):
        enc = tokenizer(text.strip(), return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states[layer][0].double().numpy()
        ids = enc["input_ids"][0].tolist()
        return [(v / np.linalg.norm(v), i not in special) for v, i in zip(hidden, ids)]

    hyp, gold = tokens(pred), tokens(ref)
    p_terms = [max(float(h @ g) for g, _ in gold) for h, real in hyp if real]
    r_terms = [max(float(h @ g) for h, _ in hyp) for g, real in gold if real]
    if not p_terms or not r_terms:
        return 0.0
    p, r = sum(p_terms) / len(p_terms), sum(r_terms) / len(r_terms)
    return 2 * p * r / (p + r)


@pytest.mark.parametrize("layer", [None, 1])
def test_bertscore_equals_plain_greedy_matching(tiny_bert, layer):
    folder, tokenizer = tiny_bert
    got = bertscore_f1([p for p, _ in PAIRS], [r for _, r in PAIRS], folder, layer=layer)
    for (pred, ref), value in zip(PAIRS, got):
        want = _plain(pred, ref, folder, tokenizer, 3 if layer is None else layer)
        # float32 hidden states of a padded batch against unpadded ones round differently (~1e-7 relative
        # per component); measured here: F1 moves by 1.4e-9. 1e-6 leaves room, a real difference is >1e-3.
        assert value == pytest.approx(want, abs=1e-6), (pred, ref)
    assert len(set(got)) == len(got)  # the pairs really differ


def test_bertscore_edge_cases_and_bad_model(tiny_bert, tmp_path):
    folder, _ = tiny_bert
    same, empty = bertscore_f1(["No fracture.", ""], ["No fracture.", "No fracture."], folder)
    assert same == pytest.approx(1.0, abs=1e-12) and empty == 0.0
    with pytest.raises(InputError, match="no config.json"):
        bertscore_f1(["a"], ["a"], tmp_path)
    with pytest.raises(InputError, match="has 3 layers; --bertscore-layer 4"):
        bertscore_f1(["a"], ["a"], folder, layer=4)


def test_bertscore_in_m3d_protocol_and_score(tiny_bert, tmp_path, capsys):
    folder, _ = tiny_bert
    records = [
        {"prediction": p, "answer": r, "kind": "open", "id": f"p{i}:q"} for i, (p, r) in enumerate(PAIRS)
    ]
    got = compute_metrics(records, "m3d", resamples=0, bertscore_model=str(folder))
    values = bertscore_f1([p for p, _ in PAIRS], [r for _, r in PAIRS], folder)
    assert got["bertscore_f1"] == pytest.approx(sum(values) / len(values), abs=1e-15)
    with pytest.raises(ValueError, match="BERTScore belongs to the m3d protocol"):
        compute_metrics(records, "corpus", bertscore_model=str(folder))
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert score_main([str(path), "--bertscore-model", str(folder), "--bootstrap", "0"]) == 0
    assert "bertscore_f1 [m3d]" in capsys.readouterr().out
    with pytest.raises(InputError, match="--bertscore-model belongs to --protocol m3d"):
        score_main([str(path), "--protocol", "corpus", "--bertscore-model", str(folder)])
