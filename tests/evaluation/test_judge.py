"""The offline LLM judge: score parsing, the prompt, aggregation, and whole runs on tiny local models.

The models are built here and saved into tmp folders; nothing is downloaded. A "lookup" model has
attention and MLP outputs zeroed and one-hot embeddings, so its next token depends only on the current
one through a table written into `lm_head`: its reply to a prompt is known in advance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from m3d_lit.errors import InputError
from m3d_lit.evaluation.judge import JUDGE_PROMPT, aggregate, build_prompts, judge, load_judge, parse_score

WORDS = "Score : 7 / 10 8 bleed left ASSISTANT USER"
# Renders the user message between USER and ASSISTANT, so a chat prompt ends in "ASSISTANT".
CHAT_TEMPLATE = "{% for m in messages %}USER {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}ASSISTANT{% endif %}"
RECORDS = [
    {
        "question": "Is there a bleed?",
        "answer": "Yes, a bleed on the left.",
        "prediction": "Yes, on the left.",
    },
    {"answer": "No intracranial hemorrhage.", "prediction": "There is a subdural hemorrhage on the right."},
    {"question": "Describe.", "answer": "A bleed.", "prediction": "Normal scan: no hemorrhage seen here."},
]


def make_tokenizer(chat: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    special = ["<unk>", "<pad>", "<s>", "</s>"]
    backend.train_from_iterator([WORDS], trainers.WordLevelTrainer(special_tokens=special))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def save_model(folder: Path, tok, table: dict[str, str] | None, dtype: torch.dtype = torch.float32) -> Path:
    """A 1-layer Llama: random weights without `table`, else the lookup model for `table`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tok)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=1.0,  # large random weights: replies differ from prompt to prompt
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if table is not None:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.model.embed_tokens.weight.copy_(torch.eye(vocab, 32))
            model.lm_head.weight.zero_()
            for current, following in table.items():
                model.lm_head.weight[
                    tok.convert_tokens_to_ids(following), tok.convert_tokens_to_ids(current)
                ] = 1
    model.to(dtype).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ":" ends the plain prompt ("Score:"); "ASSISTANT" ends the chat prompt.
SEVEN = {":": "7", "7": "/", "/": "10", "10": "</s>", "ASSISTANT": "8", "8": "</s>"}
WORDY = {":": "bleed", "bleed": "left", "left": "</s>"}


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("7", 7.0),
        ("8.5", 8.5),
        ("  9\n", 9.0),
        ("0", 0.0),
        ("10/10", 10.0),
        ("Score: 7/10", 7.0),
        ("Score: 7 / 10.", 7.0),
        ("7.5 out of 10", 7.5),
        ("I would rate it 6 out of 10 because the side is wrong.", 6.0),
        ("**Score:** 9", 9.0),
        ("The answer names 2 of the 3 findings. Score: 6", 6.0),
        ("I'd give it 4.", 4.0),
        ("6. The type is right but the side is wrong.", 6.0),
        ("11", None),
        ("Score: 12", None),
        ("-2", None),
        ("Score: 85/100", None),
        ("It matches 2 of 3 findings and 1 side", None),
        ("no idea", None),
        ("", None),
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_aggregate():
    result = aggregate(["Score: 8/10", "6", "nonsense", "7 out of 10", "15"])
    assert result == {
        "judge_mean": 7.0,
        "judge_n": 5,
        "judge_unparsable": 2,
        "scores": [8.0, 6.0, None, 7.0, None],
    }
    assert aggregate(["?"])["judge_mean"] is None
    assert aggregate([]) == {"judge_mean": None, "judge_n": 0, "judge_unparsable": 0, "scores": []}


def test_prompt_plain_and_chat():
    plain = build_prompts(make_tokenizer(), RECORDS)
    assert plain[0] == JUDGE_PROMPT.format(
        question="Is there a bleed?", reference="Yes, a bleed on the left.", prediction="Yes, on the left."
    )
    assert "from 0 (wrong or unrelated) to 10" in plain[0] and plain[0].endswith("Score:")
    assert "Question: (none)\nReference answer: No intracranial hemorrhage.\n" in plain[1]
    chat = build_prompts(make_tokenizer(chat=True), RECORDS)
    assert chat == [f"USER {p} ASSISTANT" for p in plain]


@pytest.mark.parametrize("bad", [[{"answer": "a"}], [{"answer": "a", "prediction": None}], ["text"]])
def test_bad_records(bad, tmp_path):
    with pytest.raises(ValueError, match="record 0"):
        judge(bad, tmp_path)


def test_judge_end_to_end(tmp_path):
    folder = save_model(tmp_path / "judge", make_tokenizer(), SEVEN, dtype=torch.bfloat16)
    result = judge(RECORDS, folder, batch_size=2, device="cpu")
    assert result == {
        "judge_mean": 7.0,
        "judge_n": 3,
        "judge_unparsable": 0,
        "scores": [7.0] * 3,
        "replies": ["7 / 10"] * 3,
    }
    model, tok = load_judge(folder, torch.device("cpu"))
    assert model.dtype == torch.float32 and tok.padding_side == "left"  # saved bf16, runs fp32 on CPU


def test_judge_uses_the_chat_template(tmp_path):
    folder = save_model(tmp_path / "chat", make_tokenizer(chat=True), SEVEN)
    result = judge(RECORDS[:2], folder, batch_size=4, device="cpu")
    assert result["replies"] == ["8", "8"] and result["judge_mean"] == 8.0


def test_judge_counts_unparsable(tmp_path):
    folder = save_model(tmp_path / "wordy", make_tokenizer(), WORDY)
    result = judge(RECORDS, folder, batch_size=3, device="cpu")
    assert result["replies"] == ["bleed left"] * 3
    assert (result["judge_mean"], result["judge_n"], result["judge_unparsable"]) == (None, 3, 3)
    assert result["scores"] == [None] * 3


def test_batching_does_not_change_replies(tmp_path):
    """Prompts of different lengths: left padding must give each the reply it gets alone."""
    folder = save_model(tmp_path / "random", make_tokenizer(), None)
    records = [{**r, "prediction": r["prediction"] + " bleed 7 left" * i} for i, r in enumerate(RECORDS * 2)]
    alone = judge(records, folder, batch_size=1, max_new_tokens=6, device="cpu")["replies"]
    together = judge(records, folder, batch_size=4, max_new_tokens=6, device="cpu")["replies"]
    assert together == alone
    assert len(set(alone)) > 1  # the check means something only if prompts lead to different replies


def test_no_records_and_bad_folders(tmp_path):
    assert judge([], tmp_path) == {
        "judge_mean": None,
        "judge_n": 0,
        "judge_unparsable": 0,
        "scores": [],
        "replies": [],
    }
    with pytest.raises(InputError, match="judge model directory not found"):
        judge(RECORDS, tmp_path / "missing")
    with pytest.raises(InputError, match="not a loadable local causal LM"):
        judge(RECORDS, tmp_path, device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        judge(RECORDS, tmp_path, batch_size=0)
