import json

from memfree.tokenizer import build_clip_tokenizer, byte_characters


def test_known_clip_ids(tmp_path):
    tok = build_clip_tokenizer(tmp_path)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408
    assert tok.pad_token_id == 49407 and tok.bos_token_id == 49406


def test_vocab_layout(tmp_path):
    build_clip_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    chars = byte_characters()
    assert len(set(chars)) == 256
    assert vocab["!"] == 0 and vocab["a</w>"] == 320
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_long_prompt_is_truncated_to_77(tmp_path):
    tok = build_clip_tokenizer(tmp_path)
    ids = tok(" ".join(["cat"] * 200), truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
