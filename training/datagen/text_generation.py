"""Caption → (instruction, edited caption) with a causal language model, the paper's way.

Sampling follows the paper's GPT-3 settings: temperature 0.7, frequency penalty 0.1, at
most 256 new tokens, stop at "\\nEND". transformers has no frequency penalty (its
`repetition_penalty` divides a logit once a token has appeared at all, whatever the count,
which is a different thing), so `FrequencyPenaltyLogitsProcessor` implements OpenAI's
definition: every logit loses penalty × (times that token was generated so far).

The loop around the sampler (`generate_edits`) is independent of any model: it parses
strictly, retries malformed outputs, drops unchanged captions, de-duplicates, applies the
content filter, appends results as it goes and records each finished caption, so a
restarted run picks up where the last one stopped.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper

from engine.errors import InvalidInput

from .content_filter import ContentFilter
from .text_format import (
    END_MARKER,
    ParseError,
    format_completion,
    format_prompt,
    normalize_caption,
    parse_completion,
    same_caption,
)

TEMPERATURE = 0.7
FREQUENCY_PENALTY = 0.1
MAX_NEW_TOKENS = 256
FEW_SHOT_SYSTEM = (
    "You write image edits. Given an image caption, reply with one short editing instruction, "
    "a line with %%, the caption of the edited image, and a line with END. Change one thing; "
    "keep the rest of the caption."
)


class FrequencyPenaltyLogitsProcessor(LogitsProcessor):
    """OpenAI's frequency penalty: logit[t] −= penalty · count of t among the generated tokens.

    Only tokens generated after the prompt count (`prompt_length`, the padded prompt width),
    as in OpenAI's definition ("how often the token was sampled prior").
    """

    def __init__(self, penalty: float, prompt_length: int) -> None:
        self.penalty = float(penalty)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        if self.penalty == 0 or generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.penalty * counts


class Sampler(Protocol):
    """Maps captions to raw completions (the text after the prompt), one per caption."""

    def __call__(self, captions: Sequence[str]) -> list[str]: ...


@dataclass(frozen=True)
class SeedExample:
    input: str
    edit: str
    output: str


def read_seed_examples(path: str | Path) -> list[SeedExample]:
    """Seed triplets {"input", "edit", "output"} (resources/seed_edits.jsonl's format)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"seed data not found: {path}", "seed_data")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            example = SeedExample(
                str(item["input"]).strip(), str(item["edit"]).strip(), str(item["output"]).strip()
            )
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InvalidInput(
                f'{path} line {number}: expected {{"input", "edit", "output"}} ({err})', "seed_data"
            ) from err
        if not (example.input and example.edit and example.output):
            raise InvalidInput(
                f"{path} line {number}: input, edit and output must be non-empty", "seed_data"
            )
        if "\n" in example.edit + example.output + example.input:
            raise InvalidInput(f"{path} line {number}: fields must be single lines", "seed_data")
        examples.append(example)
    if not examples:
        raise InvalidInput(f"{path} holds no triplets", "seed_data")
    return examples


def load_causal_lm(model: str, device: torch.device, dtype: torch.dtype):
    """A transformers causal LM and its tokenizer from an id or folder (a LoRA folder works too)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        if (Path(model) / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            lm = AutoPeftModelForCausalLM.from_pretrained(model, dtype=dtype).merge_and_unload()
        else:
            lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    except (OSError, ValueError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise InvalidInput(
            f"cannot load the language model {model!r}: {first_line}. Pass --model with a "
            "transformers causal LM id (cached or downloadable) or a folder from finetune-text",
            "model",
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only: generation continues right after the prompt
    return lm.to(device).eval(), tokenizer


class TransformersSampler:
    """Samples completions with a local causal LM: fine-tuned (prompt = caption + "\\n##\\n")
    or, with `few_shot` examples, an instruction-tuned LM shown k seed edits first."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        temperature: float = TEMPERATURE,
        frequency_penalty: float = FREQUENCY_PENALTY,
        max_new_tokens: int = MAX_NEW_TOKENS,
        few_shot: Sequence[SeedExample] | None = None,
        shots: int = 8,
        use_chat_template: bool | None = None,
        seed: int = 0,
    ) -> None:
        if temperature <= 0:
            raise InvalidInput("--temperature must be above 0", "temperature")
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.frequency_penalty = frequency_penalty
        self.max_new_tokens = max_new_tokens
        self.few_shot = list(few_shot or [])
        self.shots = shots
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        if self.use_chat_template and not has_template:
            raise InvalidInput("the tokenizer has no chat template; drop --chat", "chat")
        self._rng = random.Random(seed)
        torch.manual_seed(seed)

    def prompt_text(self, caption: str) -> str:
        if not self.few_shot:
            return format_prompt(caption)
        examples = self._rng.sample(self.few_shot, min(self.shots, len(self.few_shot)))
        if self.use_chat_template:
            messages = [{"role": "system", "content": FEW_SHOT_SYSTEM}]
            for example in examples:
                messages.append({"role": "user", "content": format_prompt(example.input)})
                messages.append(
                    {
                        "role": "assistant",
                        "content": format_completion(example.edit, example.output),
                    }
                )
            messages.append({"role": "user", "content": format_prompt(caption)})
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        shown = "".join(
            format_prompt(e.input) + format_completion(e.edit, e.output) + "\n\n" for e in examples
        )
        return shown + format_prompt(caption)

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> list[str]:
        prompts = [self.prompt_text(c) for c in captions]
        add_special = not (self.few_shot and self.use_chat_template)  # the template has them
        batch = self.tokenizer(
            prompts, return_tensors="pt", padding=True, add_special_tokens=add_special
        )
        batch = batch.to(self.model.device)
        prompt_length = batch["input_ids"].shape[1]
        config = self.model.config
        context = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        if context is not None and prompt_length + self.max_new_tokens > context:
            raise InvalidInput(
                f"a prompt of {prompt_length} tokens plus --max-new-tokens {self.max_new_tokens} "
                f"exceeds the model's context of {context} tokens; use fewer --shots, a smaller "
                "--batch-size with shorter captions, or a model with a longer context",
                "shots",
            )
        processors = LogitsProcessorList(
            [
                FrequencyPenaltyLogitsProcessor(self.frequency_penalty, prompt_length),
                TemperatureLogitsWarper(self.temperature),
            ]
        )
        generated = self.model.generate(
            **batch,
            do_sample=True,
            # temperature is applied by our processor list, after the penalty (as OpenAI does);
            # top-k/top-p off: the paper samples from the full distribution.
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=self.max_new_tokens,
            logits_processor=processors,
            stop_strings=[END_MARKER],
            tokenizer=self.tokenizer,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new_tokens = generated[:, prompt_length:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def read_captions(path: str | Path) -> list[str]:
    """Captions: a .txt file (one per line) or .jsonl with a "caption", "input" or "text" key."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"captions file not found: {path}", "captions")
    captions: list[str] = []
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if jsonl:
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidInput(
                    f"{path} line {number} is not valid JSON ({err.msg})", "captions"
                ) from err
            text = next(
                (
                    item[k]
                    for k in ("caption", "input", "text")
                    if isinstance(item, dict) and k in item
                ),
                None,
            )
            if not isinstance(text, str):
                raise InvalidInput(
                    f'{path} line {number} has no "caption", "input" or "text" string', "captions"
                )
        else:
            text = line
        text = " ".join(text.split())  # one line, single spaces: the format is line-based
        if text:
            captions.append(text)
    return captions


@dataclass
class TextGenerationStats:
    captions_read: int = 0
    duplicates_skipped: int = 0
    already_done: int = 0
    kept: int = 0
    retries: int = 0
    dropped_malformed: int = 0
    dropped_truncated: int = 0
    dropped_unchanged: int = 0
    dropped_filtered_caption: int = 0
    dropped_filtered_output: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def table(self) -> str:
        rows = [(name.replace("_", " "), value) for name, value in self.as_dict().items()]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value:>8}" for name, value in rows)


def progress_path_for(output: Path) -> Path:
    return output.with_name(output.name + ".progress.jsonl")


def _finished_captions(output: Path, progress: Path) -> set[str]:
    """Normalised captions that a previous run finished (kept or dropped)."""
    done: set[str] = set()
    for path, key in ((progress, "caption"), (output, "input")):
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                done.add(normalize_caption(json.loads(line)[key]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line from a crash: that caption is simply redone
    return done


def _batched(items: Sequence[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def generate_edits(
    captions: Sequence[str],
    sampler: Sampler | Callable[[Sequence[str]], list[str]],
    output: Path,
    *,
    retries: int = 2,
    batch_size: int = 8,
    content_filter: ContentFilter | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> TextGenerationStats:
    """Write {"input", "edit", "output"} lines to `output` for each caption; resumable.

    Each finished caption (kept or dropped) is also recorded in OUTPUT.progress.jsonl with
    its outcome, so a restart does not redo dropped ones either.
    """
    if retries < 0 or batch_size < 1:
        raise InvalidInput("--retries must be >= 0 and --batch-size >= 1", "retries")
    progress = progress_path_for(output)
    if output.exists() and not progress.exists():
        raise InvalidInput(
            f"--output {output} exists but was not written by generate-text (no {progress.name} "
            "next to it); give a new file name so nothing is overwritten",
            "output",
        )
    stats = TextGenerationStats(captions_read=len(captions))
    seen: set[str] = set()
    unique: list[str] = []
    for caption in captions:
        key = normalize_caption(caption)
        if key in seen or not key:
            stats.duplicates_skipped += 1
            continue
        seen.add(key)
        unique.append(caption)
    finished = _finished_captions(output, progress)
    pending = [c for c in unique if normalize_caption(c) not in finished]
    stats.already_done = len(unique) - len(pending)

    output.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(output, "a", encoding="utf-8") as results,
        open(progress, "a", encoding="utf-8") as record,
    ):

        def finish(caption: str, outcome: str, edit: tuple[str, str] | None = None) -> None:
            if edit is not None:
                results.write(
                    json.dumps(
                        {"input": caption, "edit": edit[0], "output": edit[1]}, ensure_ascii=False
                    )
                    + "\n"
                )
                results.flush()
            record.write(
                json.dumps({"caption": caption, "outcome": outcome}, ensure_ascii=False) + "\n"
            )
            record.flush()
            if on_progress:
                on_progress(1)

        for batch in _batched(pending, batch_size):
            todo: list[str] = []
            for caption in batch:
                if content_filter is not None and not content_filter(caption):
                    stats.dropped_filtered_caption += 1
                    finish(caption, "filtered_caption")
                else:
                    todo.append(caption)
            last_failure: dict[str, str] = {}
            for attempt in range(retries + 1):
                if not todo:
                    break
                if attempt:
                    stats.retries += len(todo)
                completions = sampler(todo)
                if len(completions) != len(todo):
                    raise RuntimeError(
                        f"the sampler returned {len(completions)} completions for {len(todo)} captions"
                    )
                again: list[str] = []
                for caption, completion in zip(todo, completions, strict=True):
                    try:
                        parsed = parse_completion(completion)
                    except ParseError as err:
                        last_failure[caption] = err.reason
                        again.append(caption)
                        continue
                    if same_caption(parsed.output, caption):
                        stats.dropped_unchanged += 1
                        finish(caption, "unchanged")
                    elif content_filter is not None and not (
                        content_filter(parsed.edit) and content_filter(parsed.output)
                    ):
                        stats.dropped_filtered_output += 1
                        finish(caption, "filtered_output")
                    else:
                        stats.kept += 1
                        finish(caption, "kept", (parsed.edit, parsed.output))
                todo = again
            for caption in todo:
                reason = last_failure.get(caption, "malformed")
                if reason == "truncated":
                    stats.dropped_truncated += 1
                else:
                    stats.dropped_malformed += 1
                finish(caption, reason)
    return stats


def print_stats(stats: TextGenerationStats, output: Path) -> None:
    print(stats.table())
    print(f"wrote {output} ({stats.kept} new triplets this run)", file=sys.stderr)
