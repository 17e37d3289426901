"""Text half: the format, the strict parser, the frequency penalty, the generation loop."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from engine.errors import InvalidInput
from training.datagen.content_filter import WordListFilter, load_content_filter
from training.datagen.text_format import (
    ParseError,
    format_completion,
    format_prompt,
    normalize_caption,
    parse_completion,
    same_caption,
)
from training.datagen.text_generation import (
    FrequencyPenaltyLogitsProcessor,
    TransformersSampler,
    generate_edits,
    load_causal_lm,
    progress_path_for,
    read_captions,
    read_seed_examples,
)

SEED_FILE = Path(__file__).resolve().parents[2] / "resources" / "seed_edits.jsonl"

# ---------------------------------------------------------------------------- format


def test_format_matches_the_paper():
    assert format_prompt("a cat on a mat") == "a cat on a mat\n##\n"
    assert (
        format_completion("make it a dog", "a dog on a mat")
        == "make it a dog\n%%\na dog on a mat\nEND"
    )


def test_parse_good_completion_and_text_after_end():
    parsed = parse_completion("make it a dog\n%%\na dog on a mat\nEND")
    assert (parsed.edit, parsed.output) == ("make it a dog", "a dog on a mat")
    # leading space (common after "\n##\n" with BPE) and junk after END are fine
    parsed = parse_completion(" make it snow\n%%\na snowy street\nEND\nanother caption\n##\n")
    assert (parsed.edit, parsed.output) == ("make it snow", "a snowy street")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("make it a dog\n%%\na dog on a m", "truncated"),  # ran out of tokens
        ("make it a dog\n%%\na dog on a mat\nEN", "truncated"),
        ("", "truncated"),
        ("make it a dog\na dog on a mat\nEND", "malformed"),  # no separator
        ("make it\n%%\na dog\n%%\na cat\nEND", "malformed"),  # two separators
        ("\n%%\na dog on a mat\nEND", "malformed"),  # empty instruction
        ("make it a dog\n%%\n\nEND", "malformed"),  # empty caption
        ("make it a dog\nplease\n%%\na dog\nEND", "malformed"),  # instruction on two lines
        ("make it a dog\n%%\n##\nEND", "malformed"),  # a marker as the caption
    ],
)
def test_parse_rejects_malformed_and_truncated(text, reason):
    with pytest.raises(ParseError) as caught:
        parse_completion(text)
    assert caught.value.reason == reason


def test_caption_equality_ignores_case_and_punctuation():
    assert same_caption("A dog, on a mat!", "a dog on a mat")
    assert same_caption("a dog’s “toy”", "A DOGS TOY")
    assert not same_caption("a dog on a mat", "a dog on a rug")
    assert normalize_caption("  Hello,   World. ") == "hello world"


# ---------------------------------------------------------------------------- penalty


def test_frequency_penalty_subtracts_penalty_times_count_of_generated_tokens():
    prompt = torch.tensor([[5, 5, 5]])  # prompt tokens do not count
    generated = torch.tensor([[2, 2, 2, 3]])
    processor = FrequencyPenaltyLogitsProcessor(0.1, prompt_length=3)
    scores = torch.zeros(1, 6)
    out = processor(torch.cat([prompt, generated], dim=1), scores.clone())
    assert torch.allclose(out, torch.tensor([[0, 0, -0.3, -0.1, 0, 0]]))


def test_frequency_penalty_grows_with_count_unlike_repetition_penalty():
    from transformers import RepetitionPenaltyLogitsProcessor

    once = torch.tensor([[7, 1]])
    thrice = torch.tensor([[7, 1, 1, 1]])
    scores = torch.full((1, 4), 2.0)
    frequency = FrequencyPenaltyLogitsProcessor(0.5, prompt_length=1)
    assert frequency(once, scores.clone())[0, 1] == pytest.approx(1.5)
    assert frequency(thrice, scores.clone())[0, 1] == pytest.approx(0.5)
    repetition = RepetitionPenaltyLogitsProcessor(1.5)
    assert repetition(once, scores.clone())[0, 1] == repetition(thrice, scores.clone())[0, 1]


def test_frequency_penalty_per_row_and_zero_is_identity():
    ids = torch.tensor([[0, 1, 1], [0, 2, 3]])
    scores = torch.zeros(2, 4)
    out = FrequencyPenaltyLogitsProcessor(1.0, prompt_length=1)(ids, scores.clone())
    assert out.tolist() == [[0, -2, 0, 0], [0, 0, -1, -1]]
    assert torch.equal(FrequencyPenaltyLogitsProcessor(0.0, 1)(ids, scores.clone()), scores)


# ---------------------------------------------------------------------------- the loop


class ScriptedSampler:
    """Answers each caption from a script of completions, in order, and logs the calls."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: list[list[str]] = []

    def __call__(self, captions: Sequence[str]) -> list[str]:
        self.calls.append(list(captions))
        return [self.script[c].pop(0) for c in captions]


def good(edit: str, output: str) -> str:
    return format_completion(edit, output)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_edits_retries_drops_and_counts(tmp_path):
    captions = [
        "a cat on a sofa",
        "A cat on a sofa.",  # duplicate ignoring case/punctuation
        "a red barn",
        "a quiet street",
        "a big tree",
        "a bowl of soup",
    ]
    sampler = ScriptedSampler(
        {
            "a cat on a sofa": [good("make it a dog", "a dog on a sofa")],
            "a red barn": [
                "paint it blue\n%%\na blue ba",
                good("paint it blue", "a blue barn"),
            ],  # retried
            "a quiet street": [
                "garbage\nEND",
                "x\n%%\ny\n%%\nz\nEND",
                "\n%%\nempty edit\nEND",
            ],  # malformed ×3
            "a big tree": ["make it big\n%%\nA big tree!\nEND"],  # unchanged
            "a bowl of soup": ["trunc", "trunc", "make it\n%%\nsoup gon"],  # truncated last
        }
    )
    output = tmp_path / "edits.jsonl"
    stats = generate_edits(captions, sampler, output, retries=2, batch_size=3)
    assert read_jsonl(output) == [
        {"input": "a cat on a sofa", "edit": "make it a dog", "output": "a dog on a sofa"},
        {"input": "a red barn", "edit": "paint it blue", "output": "a blue barn"},
    ]
    assert stats.captions_read == 6
    assert stats.duplicates_skipped == 1
    assert stats.kept == 2
    assert stats.dropped_malformed == 1
    assert stats.dropped_truncated == 1
    assert stats.dropped_unchanged == 1
    assert stats.retries == 1 + 2 + 2
    outcomes = {r["caption"]: r["outcome"] for r in read_jsonl(progress_path_for(output))}
    assert outcomes == {
        "a cat on a sofa": "kept",
        "a red barn": "kept",
        "a quiet street": "malformed",
        "a big tree": "unchanged",
        "a bowl of soup": "truncated",
    }


def test_generate_edits_resumes_without_redoing_anything(tmp_path):
    output = tmp_path / "edits.jsonl"
    first = ["a cat", "a dog", "a fish"]
    sampler = ScriptedSampler({"a cat": [good("make it red", "a red cat")], "a dog": ["broken"]})
    generate_edits(first[:2], sampler, output, retries=0)
    # restart with the full list: only "a fish" is new ("a dog" was dropped, not forgotten)
    sampler = ScriptedSampler({"a fish": [good("make it gold", "a gold fish")]})
    stats = generate_edits(first, sampler, output, retries=0)
    assert sampler.calls == [["a fish"]]
    assert stats.already_done == 2 and stats.kept == 1
    assert [r["input"] for r in read_jsonl(output)] == ["a cat", "a fish"]


def test_resume_survives_a_torn_last_line(tmp_path):
    output = tmp_path / "edits.jsonl"
    generate_edits(
        ["a cat"], ScriptedSampler({"a cat": [good("make it red", "a red cat")]}), output
    )
    with open(progress_path_for(output), "a", encoding="utf-8") as handle:
        handle.write('{"caption": "a d')  # a crash in the middle of a write
    sampler = ScriptedSampler({"a dog": [good("make it red", "a red dog")]})
    generate_edits(["a cat", "a dog"], sampler, output)
    assert sampler.calls == [["a dog"]]


def test_an_unrelated_existing_output_is_not_overwritten(tmp_path):
    output = tmp_path / "mine.jsonl"
    output.write_text("precious\n", encoding="utf-8")
    with pytest.raises(InvalidInput, match="nothing is overwritten"):
        generate_edits(["a cat"], ScriptedSampler({}), output)
    assert output.read_text(encoding="utf-8") == "precious\n"


def test_content_filter_word_list_and_plugin(tmp_path):
    words = tmp_path / "blocked.txt"
    words.write_text("# one per line\ngore\nblood bath\n", encoding="utf-8")
    word_filter = load_content_filter(str(words))
    assert isinstance(word_filter, WordListFilter)
    assert not word_filter("A scene full of GORE")
    assert not word_filter("a blood  bath")
    assert word_filter("a gorgeous bath")  # whole words only
    plugin = tmp_path / "my_filter.py"
    plugin.write_text("def allowed(text):\n    return 'zebra' not in text\n", encoding="utf-8")
    plugin_filter = load_content_filter(f"{plugin}:allowed")
    assert plugin_filter("a horse") and not plugin_filter("a zebra")
    with pytest.raises(InvalidInput, match="content-filter"):
        load_content_filter("no_such_module_anywhere:allowed")
    with pytest.raises(InvalidInput, match="function"):
        load_content_filter(str(plugin))

    sampler = ScriptedSampler(
        {
            "a horse": [good("make it a zebra", "a zebra")],
            "a cow": [good("make it a goat", "a goat")],
        }
    )
    output = tmp_path / "edits.jsonl"
    stats = generate_edits(
        ["a zebra herd", "a horse", "a cow"], sampler, output, content_filter=plugin_filter
    )
    assert (
        stats.dropped_filtered_caption == 1
        and stats.dropped_filtered_output == 1
        and stats.kept == 1
    )
    assert [c for call in sampler.calls for c in call] == [
        "a horse",
        "a cow",
    ]  # filtered caption never sampled


def test_read_captions_txt_and_jsonl(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("a cat\n\n  a   dog \n", encoding="utf-8")
    assert read_captions(txt) == ["a cat", "a dog"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"caption": "a cat"}\n{"input": "a dog"}\n', encoding="utf-8")
    assert read_captions(jsonl) == ["a cat", "a dog"]
    jsonl.write_text('{"title": "a cat"}\n', encoding="utf-8")
    with pytest.raises(InvalidInput, match="line 1"):
        read_captions(jsonl)


# ---------------------------------------------------------------------------- seeds + LM


def test_bundled_seed_set_is_large_diverse_and_well_formed():
    examples = read_seed_examples(SEED_FILE)
    assert len(examples) >= 100
    assert len({normalize_caption(e.input) for e in examples}) == len(examples)
    assert not any(same_caption(e.input, e.output) for e in examples)
    edits = " ".join(e.edit.lower() for e in examples)
    for kind in (
        "painting",
        "replace",
        "background",
        "rain",
        "snow",
        "night",
        "sunset",
        "autumn",
        "out of",
        "remove",
        "add",
        "give",
    ):
        assert kind in edits, f"no seed edit mentions {kind!r}"
    for e in examples:  # each one round-trips through the format
        parsed = parse_completion(format_completion(e.edit, e.output))
        assert (parsed.edit, parsed.output) == (e.edit, e.output)


def test_transformers_sampler_stops_at_end_and_applies_the_penalty(tiny_lm_dir, monkeypatch):
    model, tokenizer = load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), torch.float32)
    seen: list = []
    original = FrequencyPenaltyLogitsProcessor.__call__

    def spy(self, input_ids, scores):
        seen.append((self.penalty, self.prompt_length, input_ids.shape[1]))
        return original(self, input_ids, scores)

    monkeypatch.setattr(FrequencyPenaltyLogitsProcessor, "__call__", spy)
    sampler = TransformersSampler(model, tokenizer, max_new_tokens=12, seed=0)
    completions = sampler(["a cat on a sofa", "a red barn in a field"])
    assert len(completions) == 2 and all(isinstance(c, str) for c in completions)
    assert seen and all(penalty == 0.1 for penalty, _, _ in seen)
    prompt_length = seen[0][1]
    assert seen[0][2] == prompt_length and seen[-1][2] <= prompt_length + 12 - 1


def test_few_shot_prompt_shows_seed_examples(tiny_lm_dir):
    model, tokenizer = load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), torch.float32)
    examples = read_seed_examples(SEED_FILE)
    sampler = TransformersSampler(model, tokenizer, few_shot=examples, shots=3, seed=1)
    prompt = sampler.prompt_text("a blue door")
    assert prompt.endswith("a blue door\n##\n")
    assert prompt.count("\nEND\n\n") == 3 and prompt.count("\n%%\n") == 3


def test_few_shot_uses_the_chat_template_when_there_is_one(tiny_lm_dir):
    model, tokenizer = load_causal_lm(str(tiny_lm_dir), torch.device("cpu"), torch.float32)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    examples = read_seed_examples(SEED_FILE)
    sampler = TransformersSampler(model, tokenizer, few_shot=examples, shots=2, seed=1)
    prompt = sampler.prompt_text("a blue door")
    assert prompt.startswith("<system>") and prompt.endswith(
        "<user>a blue door\n##\n</user><assistant>"
    )
    assert prompt.count("<assistant>") == 3 and prompt.count("\nEND</assistant>") == 2
    with pytest.raises(InvalidInput, match="--shots"):  # the tiny model's context is 512 tokens
        TransformersSampler(model, tokenizer, few_shot=examples, shots=40)(["a blue door"])
    short = TransformersSampler(model, tokenizer, few_shot=examples, shots=1, max_new_tokens=4)
    assert len(short(["a blue door"])) == 1
    plain = TransformersSampler(
        model, tokenizer, few_shot=examples, shots=2, use_chat_template=False
    )
    assert "<system>" not in plain.prompt_text("a blue door")
