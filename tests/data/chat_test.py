"""Chat data: the template's ids and loss masks, record formats, packing that keeps masks, errors."""
import json

import numpy as np
import pytest

from configs.sft import dolly_tiny
from fmjax.data import chat, tokenizer as tokenizer_lib


class ChatTokenizer:
    """Characters as ids 9.. (pad 0, bos 2, eos 3; chat markers 5-8 as in trained tokenizers)."""
    pad_id, bos_id, eos_id, vocab_size = 0, 2, 3, 64
    token_bytes = np.ones(64, np.int32)

    def encode(self, text):
        return [9 + ord(c) % 55 for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + (i - 9) % 26) for i in ids if i >= 9)

    def piece_id(self, piece):
        return dict(zip(tokenizer_lib.CHAT_PIECES, (5, 6, 7, 8))).get(piece)


def config(tmp_path, records, **data):
    c = dolly_tiny.get_config()
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    c.data.update(path=str(path), seq_len=16, **data)
    c.train.update(batch_size=4, eval_batches=2)
    return c


def test_multi_turn_ids_and_mask_train_only_assistant_content_and_its_end(tmp_path):
    tok = ChatTokenizer()
    template = chat.Template.from_config(dolly_tiny.get_config(), tok)
    a, b, c, d = (tok.encode(s) for s in ("sys", "hi", "yo", "ok?"))
    ids, mask = template.encode(tok, [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok?"},
                                      {"role": "assistant", "content": ""}])
    assert ids == [2, 5, *a, 8, 6, *b, 8, 7, *c, 8, 6, *d, 8, 7, 8]
    assert mask == [0] * 11 + [1] * 3 + [0] * 6 + [1]
    assert template.prompt(tok, [{"role": "user", "content": "hi"}]) == [2, 6, *b, 8, 7]


def test_record_formats_and_system_prompt():
    dolly = chat.conversation({"instruction": "Q", "context": "C", "response": "A"})
    assert dolly == [{"role": "user", "content": "Q\n\nC"}, {"role": "assistant", "content": "A"}]
    alpaca = chat.conversation({"instruction": "Q", "input": " ", "output": "A"}, system_prompt="S")
    assert alpaca == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A"}]
    turns = [{"role": "system", "content": "own"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}]
    assert chat.conversation({"messages": turns}, system_prompt="S") == turns  # its own system turn stays
    for record, message in [({"instruction": "Q"}, "needs 'messages', or string fields"),
                            ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\] must be"),
                            ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
                            ([1, 2], "must be a JSON object")]:
        with pytest.raises(ValueError, match=message):
            chat.conversation(record)


def test_packed_batches_keep_each_conversations_mask_and_resume_exactly(tmp_path):
    records = [{"instruction": "q" * (i % 5) + str(i), "response": "r" * (1 + i % 4)} for i in range(60)]
    c = config(tmp_path, records, validation_fraction=0.2)
    tok = ChatTokenizer()
    template = chat.Template.from_config(c, tok)
    conversations = chat.validate(c)
    expected = {}
    for conv in conversations.train:
        example = chat.example(template, tok, 16)(conv)
        expected[tuple(example["inputs"])] = example
    it = chat.make_train_iterator(c, tok, template, conversations)
    for _ in range(3):
        batch = next(it)
        assert batch["inputs"].shape == (4, 16)
        for row in range(4):
            seg = batch["segment_ids"][row]
            for s in set(seg) - {0}:
                span = seg == s
                example = expected[tuple(batch["inputs"][row][span])]  # whole conversations, never split
                np.testing.assert_array_equal(batch["loss_mask"][row][span], example["loss_mask"])
                np.testing.assert_array_equal(batch["targets"][row][span], example["targets"])
                np.testing.assert_array_equal(batch["positions"][row][span], np.arange(span.sum()))
            assert not batch["loss_mask"][row][seg == 0].any()
    state = json.loads(json.dumps(it.get_state()))
    following = [next(it) for _ in range(2)]
    resumed = chat.make_train_iterator(c, tok, template, conversations)
    resumed.set_state(state)
    for want in following:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_eval_batches_are_the_validation_split_in_order_padded(tmp_path):
    records = [{"instruction": f"q{i}", "response": "r" * 10} for i in range(40)]
    c = config(tmp_path, records, validation_fraction=0.5)
    tok = ChatTokenizer()
    template = chat.Template.from_config(c, tok)
    conversations = chat.validate(c)
    batches = chat.make_eval_batches(c, tok, template, conversations)
    assert 1 <= len(batches) <= 2 and all(b["inputs"].shape == (4, 16) for b in batches)
    halves = [chat.make_eval_batches(c, tok, template, conversations, i, 2) for i in range(2)]
    for b, first, second in zip(batches, *halves):
        np.testing.assert_array_equal(b["inputs"], np.concatenate([first["inputs"], second["inputs"]]))


def test_errors_name_the_file_line_or_field(tmp_path):
    c = config(tmp_path, [{"instruction": "q", "response": "r"}])
    with open(c.data.path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:2: not valid JSON"):
        chat.validate(c)
    c = config(tmp_path, [{"instruction": "q", "response": "r"}, {"prompt": "x"}])
    with pytest.raises(ValueError, match=r"chat.jsonl:2: a record needs 'messages'"):
        chat.validate(c)
    c.data.path = str(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"data.path=.*missing.jsonl' is not a file"):
        chat.validate(c)
    c = config(tmp_path, [{"instruction": "q", "response": "r"}])
    c.data.chat.user = "<|human|>"
    with pytest.raises(ValueError, match=r"data.chat.user='<\|human\|>' is not a piece of the tokenizer"):
        chat.Template.from_config(c, ChatTokenizer())
