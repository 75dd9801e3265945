"""JSONL -> examples -> batches: the three record shapes and their labels, malformed lines,
truncation, packing (same per-example loss as unpacked), length grouping, streaming and resume,
the eval split."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from peftloop.config import DataConfig
from peftloop.data import (
    IGNORE_INDEX,
    DataError,
    ExampleBuilder,
    SFTDataset,
    StreamingSFTDataset,
    collate,
    load_datasets,
    micro_batches,
    pack,
)
from peftloop.tokenizer import Tokenizer
from tests.helpers import StopAt, tiny_model, write_jsonl
from tests.helpers import tokenizer as tokenizer  # fixture
from tests.hf_builders import build_tokenizer_folder

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "Blue, on a clear day."}, {"role": "user", "content": "And bees?"},
        {"role": "assistant", "content": "Honey."}]


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    return Tokenizer.from_pretrained(build_tokenizer_folder(tmp_path_factory.mktemp("tok"), "llama2"))


def build(tokenizer, record, **config):
    return ExampleBuilder(tokenizer, DataConfig(**config))(record, "f.jsonl:1")


def labelled(example):
    return [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]


# ---- the three shapes ------------------------------------------------------------------------


def test_text_records_train_on_every_token_and_end_with_eos(llama_tokenizer):
    example = build(llama_tokenizer, {"text": "The river runs past the mill."})
    expected = [*llama_tokenizer.encode("The river runs past the mill."), llama_tokenizer.eos_token_id]
    assert example["input_ids"] == expected and example["labels"] == expected
    assert example["input_ids"][0] == llama_tokenizer.bos_token_id
    without_eos = build(llama_tokenizer, {"text": "x"}, add_eos=False)
    assert without_eos["input_ids"][-1] != llama_tokenizer.eos_token_id


def test_prompt_completion_labels_only_the_completion(llama_tokenizer):
    tok = llama_tokenizer
    example = build(tok, {"prompt": "What do bees make?", "completion": "Honey."})
    prompt = tok.encode("What do bees make?")
    completion = [*tok.encode("Honey.", add_special_tokens=False), tok.eos_token_id]
    assert example["input_ids"] == prompt + completion
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + completion
    everything = build(tok, {"prompt": "What do bees make?", "completion": "Honey."},
                       completion_only_loss=False)
    assert everything["labels"] == everything["input_ids"]


def test_messages_label_exactly_the_assistant_turns(tokenizer):
    example = build(tokenizer, {"messages": CHAT})
    assert example["input_ids"] == tokenizer.apply_chat_template(CHAT)
    trained = tokenizer.decode(labelled(example), skip_special_tokens=False)
    assert trained == "Blue, on a clear day.<|im_end|>\nHoney.<|im_end|>\n"
    everything = build(tokenizer, {"messages": CHAT}, completion_only_loss=False)
    assert everything["labels"] == everything["input_ids"]


def test_conversational_prompt_completion(tokenizer):
    record = {"prompt": CHAT[:4], "completion": CHAT[4:]}
    example = build(tokenizer, record)
    assert example["input_ids"] == tokenizer.apply_chat_template(CHAT)
    assert tokenizer.decode(labelled(example), skip_special_tokens=False) == "Honey.<|im_end|>\n"


def test_format_can_be_forced_and_fields_renamed(tokenizer):
    example = build(tokenizer, {"question": "Sky?", "answer": "Blue.", "text": "ignored"},
                    format="prompt_completion", prompt_field="question", completion_field="answer")
    assert tokenizer.decode(labelled(example)) == "Blue."


# ---- malformed input ------------------------------------------------------------------------

BAD_LINES = [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ({"prompt": "Sky?"}, "missing field 'completion'"),
    ({"prompt": "Sky?", "completion": "   "}, "field 'completion' is empty"),
    ({"prompt": "Sky?", "completion": 3}, "field 'completion' must be a string, got int"),
    ({"question": "Sky?"}, "no 'text', 'prompt'/'completion' or 'messages' field"),
    ({"messages": [{"role": "user"}]}, "messages[0] must be an object with string \"role\" and \"content\""),
    ({"messages": [{"role": "user", "content": "hi"}]}, "'messages' has no assistant message"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "messages[1] is an empty assistant message"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_a_bad_line_is_an_error_naming_file_and_line(tmp_path, tokenizer, line, message):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "good"}, "", line])
    with pytest.raises(DataError) as error:
        load_datasets(DataConfig(train_file=str(path)), tokenizer)
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)


def test_invalid_utf8_names_its_line(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid UTF-8"):
        load_datasets(DataConfig(train_file=str(path)), tokenizer)


def test_skip_bad_lines_skips_and_counts(tmp_path, tokenizer):
    lines = [{"text": "one"}, *[line for line, _ in BAD_LINES], {"text": "two"}]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    train, _ = load_datasets(DataConfig(train_file=str(path), skip_bad_lines=True), tokenizer)
    assert len(train) == 2
    stats = train.stats
    assert stats.records == len(lines) and sum(stats.skipped.values()) == len(BAD_LINES)
    assert stats.skipped["invalid JSON"] == 1 and stats.skipped["missing 'completion'"] == 1
    assert stats.first_skipped.startswith(f"{path}:2: invalid JSON")
    assert "9 bad lines skipped" in stats.summary()


def test_messages_without_a_chat_template_is_an_error_even_when_skipping(tmp_path, tokenizer):
    tokenizer = Tokenizer(tokenizer.backend, {"eos_token": "<|im_end|>"}, chat_template=None, source="tok")
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}])
    with pytest.raises(ValueError, match="has no chat_template"):
        load_datasets(DataConfig(train_file=str(path), skip_bad_lines=True), tokenizer)


def test_missing_files_name_the_key(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data.train_file: .*nope.jsonl: file not found"):
        load_datasets(DataConfig(train_file=str(tmp_path / "nope.jsonl")), tokenizer)


# ---- truncation -----------------------------------------------------------------------------


def test_truncation_is_counted_and_unlabelled_examples_dropped(tmp_path, tokenizer):
    long_prompt = "the river runs past the old mill " * 10
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"text": "short"},
        {"text": long_prompt},  # truncated, still has labels
        {"prompt": long_prompt, "completion": "Blue."},  # the completion is cut off entirely: dropped
    ])
    train, _ = load_datasets(DataConfig(train_file=str(path), max_seq_len=16), tokenizer)
    assert len(train) == 2 and max(len(e["input_ids"]) for e in train) == 16
    assert (train.stats.truncated, train.stats.dropped_no_labels) == (2, 1)
    assert "2 truncated" in train.stats.summary() and "1 dropped" in train.stats.summary()


# ---- packing --------------------------------------------------------------------------------


def per_example_losses(model, batch, documents):
    """Summed next-token loss of each document [start, end), from one forward pass over a (packed)
    row: positions start..end-2 predict tokens start+1..end-1."""
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch.get("position_ids"))
    token_loss = F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], reduction="none")
    return [float(token_loss[start:end - 1].sum()) for start, end in documents]


def test_packing_gives_each_example_its_unpacked_loss():
    model = tiny_model(seed=1).eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 1, 1, 7, 3):  # two length-1 documents back to back
        ids = torch.randint(3, 61, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": ids[:1] + [IGNORE_INDEX] * (n > 3) + ids[1 + (n > 3):]})
    (packed,) = list(pack(examples, max_seq_len=32))
    assert packed["position_ids"] == [0, 1, 2, 3, 4, 0, 0, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    bounds = list(itertools.accumulate([0] + [len(e["input_ids"]) for e in examples]))
    packed_losses = per_example_losses(model, collate([packed]), list(zip(bounds[:-1], bounds[1:])))
    alone = [per_example_losses(model, collate([e]), [(0, len(e["input_ids"]))])[0] for e in examples]
    assert packed_losses == pytest.approx(alone, abs=1e-5)
    with torch.no_grad():  # and the model's summed loss, which the loop uses
        batch = collate([packed])
        summed = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
    assert float(summed) == pytest.approx(sum(alone), abs=1e-4)


def test_packing_fills_rows_up_to_max_seq_len(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "word " * k} for k in range(1, 30)])
    plain, _ = load_datasets(DataConfig(train_file=str(path), max_seq_len=64), tokenizer)
    packed, _ = load_datasets(DataConfig(train_file=str(path), max_seq_len=64, packing=True), tokenizer)
    assert len(packed) < len(plain) and all(len(e["input_ids"]) <= 64 for e in packed)
    assert sum(len(e["input_ids"]) for e in packed) == sum(len(e["input_ids"]) for e in plain)
    assert sum(e["position_ids"].count(0) for e in packed) == len(plain)


# ---- length grouping ------------------------------------------------------------------------


def test_length_grouping_is_seeded_per_epoch_and_groups_similar_lengths():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    data = SFTDataset([{"input_ids": [5] * n, "labels": [5] * n} for n in lengths], group_by_length=True)
    first = data.order_for_epoch(epoch=0, seed=1, shuffle=True, batch_size=4)
    assert first == data.order_for_epoch(epoch=0, seed=1, shuffle=True, batch_size=4)
    assert first != data.order_for_epoch(epoch=1, seed=1, shuffle=True, batch_size=4)
    assert sorted(first) == list(range(400))
    assert lengths[first[0]] == max(lengths)  # the largest micro-batch first

    def padding(order):
        batches = [order[i:i + 4] for i in range(0, len(order), 4)]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = SFTDataset(data.examples).order_for_epoch(0, 1, True, 4)
    assert padding(first) < padding(shuffled) / 10
    sizes = [len(b["input_ids"]) for b in micro_batches(data, 4, epoch=0, seed=1, shuffle=True)]
    assert sizes == [len(b) for b in [first[i:i + 4] for i in range(0, 400, 4)]]


# ---- streaming ------------------------------------------------------------------------------


def test_streaming_reads_lazily_and_matches_in_memory(tmp_path, tokenizer):
    records = [{"text": f"line {i} " + "word " * (i % 7)} for i in range(300)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    config = DataConfig(train_file=str(path), streaming=True, shuffle_buffer=8)
    stream, _ = load_datasets(config, tokenizer)
    assert not hasattr(stream, "__len__")
    next(micro_batches(stream, 4, epoch=0, seed=0, shuffle=True))
    assert stream.stats.records <= 8 + 4  # one buffer and one batch read, not the file
    in_memory, _ = load_datasets(DataConfig(train_file=str(path)), tokenizer)
    assert list(stream) == list(in_memory)  # unshuffled, the same examples in file order


def test_streaming_order_is_seeded_and_resume_skips_exactly(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": f"line {i}"} for i in range(50)])
    stream, _ = load_datasets(DataConfig(train_file=str(path), streaming=True, shuffle_buffer=16), tokenizer)

    def batches(epoch, skip=0):
        it = micro_batches(stream, 4, epoch=epoch, seed=3, shuffle=True)
        return [b["input_ids"].tolist() for b in itertools.islice(it, skip, None)]

    epoch0 = batches(0)
    assert epoch0 == batches(0) and epoch0 != batches(1)
    assert batches(0, skip=5) == epoch0[5:]
    texts = sorted(tokenizer.decode(row) for b in epoch0 for row in b)
    assert texts == sorted(f"line {i}" for i in range(50))  # a permutation of the file


def test_streaming_with_packing_and_grouping(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "word " * (i % 9 + 1)} for i in range(60)])
    config = DataConfig(train_file=str(path), streaming=True, packing=True, max_seq_len=32)
    stream, _ = load_datasets(config, tokenizer)
    in_memory, _ = load_datasets(DataConfig(train_file=str(path), packing=True, max_seq_len=32), tokenizer)
    assert list(stream) == list(in_memory)
    grouped, _ = load_datasets(DataConfig(train_file=str(path), streaming=True, group_by_length=True),
                               tokenizer)
    lengths = [len(e["input_ids"]) for e in grouped.examples_for_epoch(0, 0, False, batch_size=1)]
    # windows of 50 micro-batches of 1, each sorted longest first
    assert lengths[:50] == sorted(lengths[:50], reverse=True)
    assert lengths[50:] == sorted(lengths[50:], reverse=True)
    assert lengths != sorted(lengths, reverse=True)
    assert isinstance(stream, StreamingSFTDataset)


# ---- the eval split -------------------------------------------------------------------------


def test_eval_split_holds_out_the_same_lines_streamed_or_not(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": f"line {i}"} for i in range(200)])
    train, evaluation = load_datasets(DataConfig(train_file=str(path), eval_split=0.2), tokenizer, seed=5)
    stream, stream_eval = load_datasets(DataConfig(train_file=str(path), eval_split=0.2, streaming=True),
                                        tokenizer, seed=5)
    train_texts = {tokenizer.decode(e["input_ids"]) for e in train}
    eval_texts = {tokenizer.decode(e["input_ids"]) for e in evaluation}
    assert not train_texts & eval_texts and len(train_texts | eval_texts) == 200
    assert 20 <= len(eval_texts) <= 60
    assert {tokenizer.decode(e["input_ids"]) for e in stream} == train_texts
    assert list(stream_eval) == list(evaluation)
    _, other_seed = load_datasets(DataConfig(train_file=str(path), eval_split=0.2), tokenizer, seed=6)
    assert {tokenizer.decode(e["input_ids"]) for e in other_seed} != eval_texts


def test_eval_file_is_used_as_is(tmp_path, tokenizer):
    train_path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}] * 3)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "Sky?", "completion": "Blue."}])
    train, evaluation = load_datasets(DataConfig(train_file=str(train_path), eval_file=str(eval_path),
                                                 eval_split=0.5, packing=True), tokenizer)
    assert len(train) == 1 and len(evaluation) == 1 and "position_ids" not in evaluation[0]


# ---- resume through the loop ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["streaming", "grouped"])
def test_resume_with_streamed_or_grouped_data_is_bit_exact(tmp_path, tokenizer, kind):
    """The loop resumes by skipping the micro-batches of the epoch it had consumed; with a
    streaming dataset (shuffle buffer) or length grouping that must land on the same examples."""
    from peftloop.checkpoint import read_safetensors
    from peftloop.config import LoraConfig, TrainConfig
    from peftloop.inject import inject_lora
    from peftloop.train import train

    records = [{"text": "word " * (i % 5 + 1) + f"line {i}"} for i in range(11)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    config = DataConfig(train_file=str(path), streaming=kind == "streaming",
                        group_by_length=kind == "grouped", shuffle_buffer=4)
    data, _ = load_datasets(config, tokenizer)

    def run(out, callbacks=(), resume=None):
        model = tiny_model(vocab_size=tokenizer.vocab_size)
        torch.manual_seed(0)
        inject_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        cfg = TrainConfig(output_dir=str(out), max_steps=9, micro_batch_size=3, save_every=5,
                          progress_bar=False, learning_rate=1e-2, resume_from_checkpoint=resume)
        train(model, data, None, cfg, callbacks=list(callbacks))
        return read_safetensors(out / "adapter" / "adapter_model.safetensors")

    straight = run(tmp_path / "straight")
    run(tmp_path / "resumed", callbacks=[StopAt(5)])
    resumed = run(tmp_path / "resumed", resume=True)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
