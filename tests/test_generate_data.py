"""The data side of generate: reading inputs, chat rendering + loss masks, the tokenized cache, tiny targets."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hsstore.generate import dataset as dataset_module
from hsstore.generate.chat import encode_conversation, encode_record, tokenizer_info
from hsstore.generate.dataset import tokenize_dataset
from hsstore.generate.inputs import load_samples
from hsstore.generate.jsonstream import JSONStreamError, iter_json_values
from hsstore.generate.prepare import prepare
from hsstore.generate.skips import DataError, Reason, SkipCounter, SkipSample
from hsstore.generate.sources import Record, load_records
from hsstore.generate.tiny import STAMP, STYLES, build_tiny_target

TINY_TEMPLATES = tuple(STYLES)
Loader = Callable[[str], Any]

SYSTEM = "You are terse. Answer in one line."
CONVERSATION = (
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy? Answer with code."},
    {"role": "assistant", "content": "Rome.\n```py\nprint('Rome')\n```\n"},
)
REPLIES = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
# what each template renders for one reply, through its end-of-turn token
EXPECTED_REPLY: dict[str, Callable[[str], str]] = {
    "llama3": lambda reply: reply.strip() + "<|eot_id|>",
    "chatml": lambda reply: reply + "<|im_end|>",
    "mistral": lambda reply: " " + reply + "</s>",
}
HEADER_TOKENS = {
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>"),
    "chatml": ("<|im_start|>",),
    "mistral": ("[INST]", "[/INST]", "<s>"),
}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def masked_runs(tokenizer: Any, input_ids: list[int], loss_mask: list[int]) -> list[str]:
    """The decoded text of each contiguous run of loss tokens."""
    runs: list[list[int]] = []
    for i, (token, masked) in enumerate(zip(input_ids, loss_mask, strict=True)):
        if masked:
            if i == 0 or not loss_mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return [tokenizer.decode(run) for run in runs]


# --- sources ----------------------------------------------------------------------------------------
def test_reads_sharegpt_json_role_jsonl_and_text_rows(tmp_path: Path) -> None:
    sharegpt = tmp_path / "sg.json"
    sharegpt.write_text(
        json.dumps(
            [
                {"id": "a1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
                {
                    "id": "a2",
                    "conversations": [
                        {"from": "system", "value": "sys"},
                        {"from": "human", "value": "q"},
                        {"from": "chatgpt", "value": "x"},
                        {"from": "human", "value": "q2"},
                        {"from": "bard", "value": "y"},
                    ],
                },
            ],
            indent=2,
        )
    )
    roles = write_jsonl(
        tmp_path / "roles.jsonl",
        [
            {"id": 7, "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
            {"text": "<|begin_of_text|>plain text"},
        ],
    )
    # JSON Lines saved as .json (a common mistake) reads the same
    as_json = tmp_path / "lines.json"
    as_json.write_text(roles.read_text())

    records = load_records([sharegpt, roles, as_json])
    assert [(r.source, r.sample_id) for r in records] == [
        (str(sharegpt), "a1"),
        (str(sharegpt), "a2"),
        (str(roles), "7"),
        (str(roles), "1"),  # no id: the row's index in its source
        (str(as_json), "7"),
        (str(as_json), "1"),
    ]
    assert records[0].messages == ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"})
    assert [m["role"] for m in records[1].messages or ()] == ["system", "user", "assistant", "user", "assistant"]
    assert records[3] == Record(str(roles), "1", text="<|begin_of_text|>plain text")


def test_max_samples_shuffle_and_mixing(tmp_path: Path) -> None:
    def conversation(i: int) -> dict[str, Any]:
        return {
            "id": f"c{i}",
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
        }

    a = write_jsonl(tmp_path / "a.jsonl", [conversation(i) for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [conversation(i) for i in range(20, 40)])
    ordered = load_records([a, b], max_samples=25)
    assert [r.sample_id for r in ordered] == [f"c{i}" for i in range(25)]
    shuffled = load_records([a, b], max_samples=25, shuffle=True, seed=3)
    assert shuffled == load_records([a, b], max_samples=25, shuffle=True, seed=3)
    assert shuffled != load_records([a, b], max_samples=25, shuffle=True, seed=4)
    assert len(shuffled) == 25 and {r.source for r in shuffled} == {str(a), str(b)}
    with pytest.raises(DataError, match="max_samples"):
        load_records([a], max_samples=-1)


def test_sharegpt_package_stops_cleanly_at_its_truncation() -> None:
    skips = SkipCounter()
    records = load_records(["sharegpt"], skips=skips)
    assert len(records) > 10_000
    assert any("cut off after" in note for note in skips.notes), skips.report()
    assert Reason.TRUNCATED_FILE not in skips.counts
    for record in records:
        assert record.source == "sharegpt" and record.sample_id
        roles = [m["role"] for m in record.messages or ()]
        assert next(r for r in roles if r != "system") == "user" and "assistant" in roles
        assert all(isinstance(m["content"], str) for m in record.messages or ())
    assert load_records(["sharegpt"], max_samples=3) == records[:3]


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_json_stream_chunk_boundaries_and_truncation(chunk: int) -> None:
    rows = [{"id": i, "text": f'caf\u00e9 \\u00e9 {"x" * i} "q"', "n": 12345678 * i} for i in range(30)]
    text = json.dumps(rows, indent=1)
    assert [value for _, value in iter_json_values(io.StringIO(text), chunk)] == rows
    cut = text[: text.index('"id": 20')]
    got = []
    with pytest.raises(JSONStreamError) as info:
        got.extend(value for _, value in iter_json_values(io.StringIO(cut), chunk))
    assert got == rows[:20] and info.value.truncated and info.value.index == 20


def test_local_json_truncated_is_counted_malformed_is_an_error(tmp_path: Path) -> None:
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    text = json.dumps([{"id": f"r{i}", "messages": turns} for i in range(3)], indent=1)
    truncated = tmp_path / "cut.json"
    truncated.write_text(text[: len(text) - 30])
    skips = SkipCounter()
    assert len(load_records([truncated], skips=skips)) == 2
    assert skips.counts[Reason.TRUNCATED_FILE] == 1
    broken = tmp_path / "broken.json"
    at = text.index('"role": "user"', text.index('"r1"'))  # break the second record only
    broken.write_text(text[:at] + '"role" "user"' + text[at + len('"role": "user"') :])
    line = text.count("\n", 0, at) + 1
    with pytest.raises(DataError, match=rf"broken\.json: line {line}, element 1: malformed.*json\.tool"):
        load_records([broken])


def test_missing_file_and_offline_hub_name_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_records([tmp_path / "missing.jsonl"])
    with pytest.raises(DataError, match="unsupported file type"):
        load_records([write_jsonl(tmp_path / "data.csv", ["a,b"])])
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps(GOOD_ROW).replace("q", "caf\u00e9").encode("latin-1") + b"\n")
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_records([latin1])
    with pytest.raises(DataError, match=r"ultrachat_200k.*local JSON/JSONL file") as info:
        load_records(["ultrachat"])
    assert "\n" not in str(info.value)


BAD_ROWS: list[tuple[Reason, Any]] = [
    (Reason.MALFORMED_JSON, '{"id": "x", "messages": ['),
    (Reason.NOT_A_CONVERSATION, {"id": "nc", "prompt": "hi"}),
    (Reason.EMPTY, {"id": "empty", "conversations": []}),
    (Reason.MISSING_ROLE, {"id": "norole", "messages": [{"content": "hi"}, {"role": "assistant", "content": "a"}]}),
    (Reason.UNKNOWN_ROLE, {"id": "tool", "messages": [{"role": "tool", "content": "x"}]}),
    (Reason.BAD_CONTENT, {"id": "none", "messages": [{"role": "user", "content": None}]}),
    (Reason.STARTS_WITH_ASSISTANT, {"id": "gptfirst", "conversations": [{"from": "gpt", "value": "hello"}]}),
    (Reason.NO_ASSISTANT, {"id": "noreply", "messages": [{"role": "user", "content": "anyone?"}]}),
]
GOOD_ROW = {"id": "ok", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def test_each_bad_input_kind_is_skipped_and_counted(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_ROW, *(row for _, row in BAD_ROWS), GOOD_ROW])
    skips = SkipCounter()
    assert [r.sample_id for r in load_records([path], skips=skips)] == ["ok", "ok"]
    assert skips.counts == {reason: 1 for reason, _ in BAD_ROWS}
    assert skips.examples[Reason.MALFORMED_JSON] == [f"{path}:2: malformed JSON (Expecting value)"]
    assert skips.examples[Reason.STARTS_WITH_ASSISTANT][0].startswith(f"{path}:8 id=gptfirst")
    report = skips.report()
    assert "skipped 8 sample(s)" in report and "'role' (user/assistant/system)" in report


@pytest.mark.parametrize(("reason", "row"), BAD_ROWS, ids=[reason.name for reason, _ in BAD_ROWS])
def test_strict_mode_stops_at_the_bad_row_with_the_fix(tmp_path: Path, reason: Reason, row: Any) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD_ROW, row])
    with pytest.raises(DataError, match=rf"bad\.jsonl:2.*{reason.value}.*fix: "):
        load_records([path], skips=SkipCounter(strict=True))


def test_prepare_writes_jsonl_that_reads_back_identically(tmp_path: Path) -> None:
    result = prepare(["sharegpt"], tmp_path / "out" / "prep.jsonl", max_samples=20)
    assert result.written == 20 and result.per_source == {"sharegpt": 20}
    first = json.loads(result.path.read_text().splitlines()[0])
    assert set(first) == {"id", "source", "messages"} and first["source"] == "sharegpt"
    assert load_records([result.path]) == load_records(["sharegpt"], max_samples=20)
    with pytest.raises(DataError, match="already exists"):
        prepare(["sharegpt"], result.path, max_samples=1)
    again = prepare([result.path], result.path, shuffle=True, seed=2, max_samples=5, overwrite=True)
    assert again.written == 5 and len(result.path.read_text().splitlines()) == 5


# --- chat rendering and loss masks ------------------------------------------------------------------
@pytest.mark.parametrize("template", TINY_TEMPLATES)
def test_loss_mask_is_exactly_the_assistant_replies(tiny_tokenizer: Loader, template: str) -> None:
    tokenizer = tiny_tokenizer(template)
    encoded = encode_conversation(CONVERSATION, tokenizer, 4096)
    rendered = tokenizer.apply_chat_template(list(CONVERSATION), tokenize=False)
    assert tokenizer.decode(encoded.input_ids) == rendered
    expected = [EXPECTED_REPLY[template](reply) for reply in REPLIES]
    assert masked_runs(tokenizer, encoded.input_ids, encoded.loss_mask) == expected
    headers = set(tokenizer.convert_tokens_to_ids(list(HEADER_TOKENS[template])))
    masked_ids = {t for t, m in zip(encoded.input_ids, encoded.loss_mask, strict=True) if m}
    assert not masked_ids & headers
    unmasked = tokenizer.decode([t for t, m in zip(encoded.input_ids, encoded.loss_mask, strict=True) if not m])
    for message in CONVERSATION:
        if message["role"] != "assistant":
            assert message["content"] in unmasked


# Templates whose render of a prefix is not a prefix of the full render, so some turns need the search.
SYSTEM_IN_LAST_USER_TURN = (  # Mistral v0.3 style
    "{%- set sys = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | list %}"
    "{%- set convo = messages | rejectattr('role', 'equalto', 'system') | list %}"
    "{%- set last_user = convo | selectattr('role', 'equalto', 'user') | list | last %}"
    "{%- for m in convo %}{%- if m.role == 'user' %}{{ '<|im_start|>user\\n' }}"
    "{%- if m is sameas last_user and sys %}{{ sys[0] + '\\n\\n' }}{%- endif %}{{ m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>assistant\\n' + m.content | trim + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
THINK_ON_LAST_TURN_ONLY = (  # Qwen3 style: only the final reply keeps its (here empty) reasoning block
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.role == 'assistant' and loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{ m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (SYSTEM_IN_LAST_USER_TURN, [r.strip() + "<|im_end|>" for r in REPLIES]),
        (THINK_ON_LAST_TURN_ONLY, [REPLIES[0] + "<|im_end|>", "<think>\n\n</think>\n\n" + REPLIES[1] + "<|im_end|>"]),
    ],
    ids=["system-in-last-user-turn", "think-on-last-turn"],
)
def test_templates_that_rewrite_earlier_turns(tiny_chatml: Path, template: str, expected: list[str]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chatml)
    tokenizer.chat_template = template
    rendered = tokenizer.apply_chat_template(list(CONVERSATION), tokenize=False)
    assert not rendered.startswith(tokenizer.apply_chat_template(list(CONVERSATION[:3]), tokenize=False))
    encoded = encode_conversation(CONVERSATION, tokenizer, 4096)
    assert masked_runs(tokenizer, encoded.input_ids, encoded.loss_mask) == expected


@pytest.mark.parametrize("template", TINY_TEMPLATES)
def test_truncation_keeps_the_mask_prefix(tiny_tokenizer: Loader, template: str) -> None:
    tokenizer = tiny_tokenizer(template)
    full = encode_conversation(CONVERSATION, tokenizer, 4096)
    first_loss = full.loss_mask.index(1)
    cut = encode_conversation(CONVERSATION, tokenizer, first_loss + 3)
    assert cut.input_ids == full.input_ids[: first_loss + 3] and cut.loss_mask == full.loss_mask[: first_loss + 3]
    with pytest.raises(SkipSample) as info:
        encode_conversation(CONVERSATION, tokenizer, first_loss)
    assert info.value.reason is Reason.NO_LOSS_TOKENS


def test_text_rows_are_tokenized_as_is_with_loss_on_every_token(tiny_tokenizer: Loader) -> None:
    tokenizer = tiny_tokenizer("llama3")
    text = "<|begin_of_text|>Just some text."
    encoded = encode_record(Record("s", "t", text=text), tokenizer, 100)
    assert tokenizer.decode(encoded.input_ids) == text  # no BOS added on top of the text's own
    assert encoded.loss_mask == [1] * len(encoded.input_ids)


def test_tokenizer_without_chat_template_is_a_clear_error(tiny_llama3: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama3)
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        tokenize_dataset([Record("s", "1", messages=CONVERSATION)], tokenizer, 128, None)


# --- tokenized dataset: skips and the cache ---------------------------------------------------------
def _records_for_dataset() -> list[Record]:
    user_assistant = CONVERSATION[1:3]
    return [
        Record("a", "good", messages=CONVERSATION),
        Record("a", "control", messages=({"role": "user", "content": "say </s> now"}, CONVERSATION[2])),
        Record("b", "alternate", messages=(*user_assistant, CONVERSATION[2])),  # mistral refuses two replies
        Record("b", "long-prompt", messages=({"role": "user", "content": "word " * 200}, CONVERSATION[2])),
        Record("b", "text", text="pre-formatted"),
    ]


def test_tokenize_dataset_skips_with_reasons_and_reuses_its_cache(
    tiny_tokenizer: Loader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = tiny_tokenizer("mistral")
    records = _records_for_dataset()
    skips = SkipCounter()
    table = tokenize_dataset(records, tokenizer, 64, tmp_path / "cache", skips=skips)
    assert table.column_names == ["input_ids", "loss_mask", "source", "sample_id"]
    assert list(table["sample_id"]) == ["good", "text"]
    assert dict(skips.counts) == {Reason.CONTROL_TOKEN: 1, Reason.TEMPLATE_ERROR: 1, Reason.NO_LOSS_TOKENS: 1}
    assert skips.examples[Reason.CONTROL_TOKEN] == [
        "a id=control: control token inside a message ('</s>' in a user message)"
    ]
    files_before = sorted(p.name for p in (tmp_path / "cache").rglob("*.arrow"))

    def no_tokenizing(*args: Any) -> None:
        raise AssertionError("the cache should have answered")

    from datasets.exceptions import DatasetGenerationError

    monkeypatch.setattr(dataset_module, "encode_record", no_tokenizing)
    again = SkipCounter()
    cached = tokenize_dataset(records, tokenizer, 64, tmp_path / "cache", skips=again)
    assert cached.cache_files == table.cache_files and cached[:] == table[:]
    assert again.counts == skips.counts  # the skip report survives a cache hit
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.arrow")) == files_before
    with pytest.raises(DatasetGenerationError) as info:  # another length is another key: tokenizes again
        tokenize_dataset(records, tokenizer, 65, tmp_path / "cache")
    assert "cache should have answered" in str(info.value.__cause__)
    with pytest.raises(DataError, match="a id=control"):
        tokenize_dataset(records, tokenizer, 64, tmp_path / "cache", skips=SkipCounter(strict=True))


def test_load_samples_gives_pipeline_ready_samples(tiny_tokenizer: Loader, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "messages": list(CONVERSATION)}, GOOD_ROW])
    tokenizer = tiny_tokenizer("llama3")
    loaded = load_samples([data], tokenizer, seq_length=256, cache_dir=tmp_path / "cache")
    assert [s.sample_id for s in loaded.samples] == ["x", "ok"]
    sample = loaded.samples[0]
    assert sample.input_ids.dtype.name == "int32" and sample.loss_mask.dtype.name == "uint8"
    assert sample.source == str(data) and 0 < sample.loss_mask.sum() < len(sample.input_ids)
    assert loaded.tokenizer_info == tokenizer_info(tokenizer) and loaded.tokenizer_info.chat_template_hash
    assert [(s.name, s.path) for s in loaded.sources] == [(str(data), str(data))]
    assert loaded.sources[0].content_hash
    only_bad = write_jsonl(tmp_path / "bad.jsonl", [row for _, row in BAD_ROWS])
    with pytest.raises(DataError, match=r"no usable samples in .*bad\.jsonl\nskipped 8 sample"):
        load_samples([only_bad], tokenizer, seq_length=256, cache_dir=tmp_path / "cache")


# --- the tiny target ----------------------------------------------------------------------------------
def test_tiny_target_loads_offline_and_renders(tiny_target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    model = AutoModelForCausalLM.from_pretrained(tiny_target)
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == len(tokenizer)
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 64
    ids = tokenizer.apply_chat_template(list(CONVERSATION[:2]), add_generation_prompt=True, return_dict=False)
    assert tokenizer.decode(ids).startswith(tokenizer.bos_token or "<|im_start|>")
    assert "What is the capital of France?" in tokenizer.decode(ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer)) and torch.isfinite(logits).all()


def test_tiny_target_is_reused_rebuilt_on_change_and_never_clobbers(tmp_path: Path) -> None:
    out = tmp_path / "target"
    build_tiny_target(out, "chatml", vocab_size=600, train_lines=300)
    stamp_mtime = (out / STAMP).stat().st_mtime_ns
    build_tiny_target(out, "chatml", vocab_size=600, train_lines=300)
    assert (out / STAMP).stat().st_mtime_ns == stamp_mtime
    build_tiny_target(out, "chatml", vocab_size=600, train_lines=300, num_layers=2)
    assert json.loads((out / STAMP).read_text())["num_layers"] == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="not a tiny target"):
        build_tiny_target(foreign, "chatml")
    assert (foreign / "notes.txt").exists()
