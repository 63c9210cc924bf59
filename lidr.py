"""LIDR: Language Imbalance Driven Rewarding, the whole method in one file.

An instruction-tuned LLM answers better in its dominant language (English) than in others, and
that gap is a free preference signal (Yang et al., ICLR 2025, arXiv 2410.08964). Each iteration
M_{t-1} -> M_t: (1) take the same prompts in every language, (2) the model answers each in its
own language, (3) the model translates its English answers into every other language and every
other answer into English, (4) build pairs: English own answer > back-translated weaker answer,
and translated English answer > own weaker answer, (5) train on the pairs with DPO + NLL, the
reference being M_{t-1}. Both sides improve, so the gap renews and the loop repeats.

Where this file departs from the paper and the authors' released scripts:
  - The English pairs of every language are kept (the released scripts overwrote them inside the
    per-language loop, so only the last language's English pairs survived: a bug).
  - Translation-task prompts are found by a record flag or, failing that, by the word
    "translat" in the dominant prompt (the authors listed about 9 per 1,000 by hand).
  - DPO + NLL is written here in torch (the authors used LLaMA-Factory); the NLL term is
    -log pi(y_chosen|x) / |y_chosen| per pair, averaged over pairs (LLaMA-Factory's form).
    The paper's beta, alpha, lr, epochs and batch size are unknown: defaults are common DPO values.
  - Reference log-probs are computed once with M_{t-1} before the first update (same model,
    so no second copy is held in memory).
  - --pairing ranked (not in the paper) treats --langs as a ranking and pairs every two languages.

Commands:
  python lidr.py --iters 2 --model tiny          # offline smoke run on CPU, seconds
  python lidr.py --iters 2                       # the paper: Meta-Llama-3-8B-Instruct, en es ru de fr
  python lidr.py --help                          # every setting
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


# ------------------------------------------------------------------------ settings
def setting(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    # run
    iters: int = setting(2, "LIDR iterations M0 -> M1 -> ... (paper: 2)")
    out: str = setting("", "run folder; default runs/<model>-<langs>-seed<seed>. "
                           "Re-running into the same folder resumes it")
    seed: int = setting(0, "seed for the tiny model, sampling and the order of training pairs")
    # model
    model: str = setting("meta-llama/Meta-Llama-3-8B-Instruct",
                         "hub id or local path of a chat model, or 'tiny': a random tiny model "
                         "built in code (no download, CPU seconds; sets the tiny defaults below)")
    device: str = setting("auto", "cpu, cuda, cuda:1, ...; auto = cuda if present")
    dtype: str = setting("auto", "bfloat16 or float32; auto = bfloat16 on GPU, float32 on CPU")
    # prompts (step 1)
    prompts: str = setting("", "a .jsonl/.json file, or a dataset id or folder for "
                               "datasets.load_dataset (train split); empty = the built-in prompts")
    prompt_field: str = setting("instruction", "hub dataset column holding the dominant-language "
                                               "prompt (an 'input' column is appended, Alpaca-style)")
    langs: str = setting("en,es,ru,de,fr", "comma-separated language codes, dominant first "
                                           "(paper: en,es,ru,de,fr); 'code:Name' for other codes")
    num_prompts: int = setting(1000, "prompts per iteration; iteration t takes the t-th slice "
                                     "(paper: a fresh 1,000 each), wrapping when the source runs out")
    pairing: str = setting("dominant", "dominant: pairs between the first language and each other "
                                       "(paper); ranked: between every two languages, in --langs order")
    # sampling (steps 2-3)
    system_prompt: str = setting("You are a helpful assistant.", "system turn; empty for none")
    max_new_tokens: int = setting(2400, "answer length cap (paper: 2400)")
    translation_max_new_tokens: int = setting(4096, "translation length cap (paper: 4096)")
    repetition_penalty: float = setting(1.1, "HF repetition penalty (paper: 1.1)")
    temperature: float = setting(0.0, "0 = greedy decoding (paper); > 0 samples")
    gen_batch_size: int = setting(16, "prompts per generation batch")
    # training (steps 5-6)
    beta: float = setting(0.1, "DPO inverse temperature")
    alpha: float = setting(1.0, "weight of the length-normalised NLL of the chosen answer")
    lr: float = setting(5e-7, "peak learning rate of AdamW")
    epochs: int = setting(1, "passes over each iteration's pairs")
    batch_size: int = setting(32, "pairs per optimizer step")
    micro_batch_size: int = setting(1, "pairs per forward pass; gradients accumulate to --batch-size")
    max_len: int = setting(2048, "tokens of prompt + answer kept per sequence")
    warmup_ratio: float = setting(0.1, "fraction of steps with linear warmup; cosine decay after")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    max_grad_norm: float = setting(1.0, "gradient clipping threshold")


# --model tiny answers within a few dozen bytes; the paper's lengths would only burn CPU time.
TINY_DEFAULTS = dict(max_new_tokens=48, translation_max_new_tokens=64, gen_batch_size=32,
                     lr=1e-4, batch_size=8, micro_batch_size=8, max_len=512)

# What a resumed run may change: the folder's own name, the number of iterations (to extend a
# run), and settings that change how fast a run goes but not what it computes.
RESUMABLE_CHANGES = {"out", "iters", "device", "gen_batch_size", "micro_batch_size"}

LANGUAGE_NAMES = {
    "en": "English", "es": "Spanish", "ru": "Russian", "de": "German", "fr": "French",
    "zh": "Chinese", "ja": "Japanese", "th": "Thai", "sw": "Swahili", "bn": "Bengali",
    "it": "Italian", "pt": "Portuguese", "ar": "Arabic", "ko": "Korean", "hi": "Hindi",
    "tr": "Turkish", "vi": "Vietnamese", "nl": "Dutch", "pl": "Polish", "uk": "Ukrainian",
    "te": "Telugu", "id": "Indonesian",
}


class LidrError(Exception):
    """Bad input: main() prints it as one line and exits with code 2, without a traceback."""


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise LidrError(message)


def parse_settings(argv=None) -> Settings:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Settings):
        tiny = f" (tiny: {TINY_DEFAULTS[f.name]})" if f.name in TINY_DEFAULTS else ""
        parser.add_argument("--" + f.name.replace("_", "-"), type=f.type, metavar=f.type.__name__.upper(),
                            help=f"{f.metadata['help']} [default: {f.default!r}]{tiny}")
    given = vars(parser.parse_args(argv))  # only the flags on the command line (SUPPRESS)
    preset = TINY_DEFAULTS if given.get("model") == "tiny" else {}
    settings = Settings(**{**preset, **given})
    check_settings(settings)
    return settings


def check_settings(s: Settings):
    rules = [("iters", s.iters >= 1, ">= 1"), ("num-prompts", s.num_prompts >= 1, ">= 1"),
             ("max-new-tokens", s.max_new_tokens >= 1, ">= 1"),
             ("translation-max-new-tokens", s.translation_max_new_tokens >= 1, ">= 1"),
             ("repetition-penalty", s.repetition_penalty > 0, "> 0"),
             ("temperature", s.temperature >= 0, ">= 0"), ("gen-batch-size", s.gen_batch_size >= 1, ">= 1"),
             ("beta", s.beta > 0, "> 0"), ("alpha", s.alpha >= 0, ">= 0"), ("lr", s.lr > 0, "> 0"),
             ("epochs", s.epochs >= 1, ">= 1"), ("batch-size", s.batch_size >= 1, ">= 1"),
             ("micro-batch-size", 1 <= s.micro_batch_size <= s.batch_size, "between 1 and --batch-size"),
             ("max-len", s.max_len >= 8, ">= 8"), ("warmup-ratio", 0 <= s.warmup_ratio < 1, "in [0, 1)"),
             ("weight-decay", s.weight_decay >= 0, ">= 0"), ("max-grad-norm", s.max_grad_norm > 0, "> 0")]
    for flag, ok, expected in rules:
        if not ok:
            raise LidrError(f"--{flag} must be {expected} (got {getattr(s, flag.replace('-', '_'))})")
    if s.pairing not in ("dominant", "ranked"):
        raise LidrError(f"--pairing must be dominant or ranked (got {s.pairing})")
    if s.dtype not in ("auto", "bfloat16", "float32"):
        raise LidrError(f"--dtype must be auto, bfloat16 or float32 (got {s.dtype})")
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise LidrError(f"--device {s.device}: no CUDA GPU is visible; use --device cpu")
    parse_languages(s.langs)


def parse_languages(spec: str) -> dict[str, str]:
    """'en,de,xx:Klingon' -> {'en': 'English', 'de': 'German', 'xx': 'Klingon'}, dominant first."""
    languages = {}
    for item in spec.split(","):
        code, _, name = item.strip().partition(":")
        if not name and code not in LANGUAGE_NAMES:
            raise LidrError(f"--langs: unknown language code '{code}'; known: "
                            f"{','.join(LANGUAGE_NAMES)}; write '{code}:Name' for others")
        if code in languages:
            raise LidrError(f"--langs: '{code}' is listed twice")
        languages[code] = name or LANGUAGE_NAMES[code]
    if len(languages) < 2:
        raise LidrError(f"--langs needs at least two languages, dominant first (got '{spec}')")
    return languages


def resolve(s: Settings) -> Settings:
    """Fill in the 'auto' settings, so the run folder records what actually ran."""
    device = s.device if s.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = s.dtype if s.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    out = s.out or f"runs/{Path(s.model).name}-{'-'.join(parse_languages(s.langs))}-seed{s.seed}"
    return dataclasses.replace(s, device=device, dtype=dtype, out=out)


# ------------------------------------------------------------------------ load: prompts and model
def load_prompts(source: str, prompt_field: str, langs: list[str]) -> list[dict]:
    """Step 1's prompts as records {"id": "p1", "translation_task": false, "en": "...", "de": "..."}
    (a record that sets translation_task true is a translation task, PAPER.md step 4). Languages
    a record lacks are left out here and translated by the model later (complete_prompts)."""
    dominant = langs[0]
    if not source:
        records, where = BUILTIN_PROMPTS, "built-in prompts"
    elif source.endswith((".json", ".jsonl")) or os.path.isfile(source):
        records, where = read_prompt_file(Path(source)), source
    else:
        try:
            table = datasets.load_dataset(source, split="train")
        except Exception as error:
            raise LidrError(f"--prompts: could not load file or dataset '{source}': "
                            f"{first_line(error)}") from None
        if prompt_field not in table.column_names:
            raise LidrError(f"--prompt-field: dataset '{source}' has no column '{prompt_field}' "
                            f"(columns: {', '.join(table.column_names)})")
        records, where = [], source
        for i, row in enumerate(table):
            text = row[prompt_field]
            if row.get("input"):  # Alpaca/Alpagasus keep the task's input in its own column
                text += "\n\n" + row["input"]
            records.append({"id": str(row.get("id", i)), dominant: text,
                            **{lang: row[lang] for lang in langs[1:] if row.get(lang)}})
    prompts, seen = [], set()
    for number, record in enumerate(records, 1):
        line = record.pop("_line", number) if isinstance(record, dict) else number
        if not isinstance(record, dict):
            raise LidrError(f"{where}:{line}: expected a JSON object per prompt")
        prompt_id = str(record.get("id", f"p{number}"))
        if prompt_id in seen:
            raise LidrError(f"{where}:{line}: id '{prompt_id}' appears twice")
        seen.add(prompt_id)
        text = {lang: record[lang] for lang in langs if isinstance(record.get(lang), str) and record[lang].strip()}
        if dominant not in text:
            raise LidrError(f"{where}:{line}: prompt '{prompt_id}' has no '{dominant}' text "
                            f"(the dominant language, first in --langs)")
        prompts.append({"id": prompt_id, "translation_task": bool(record.get("translation_task")), **text})
    if not prompts:
        raise LidrError(f"{where}: no prompts")
    return prompts


def read_prompt_file(path: Path) -> list[dict]:
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise LidrError(f"--prompts: cannot read {path}: {first_line(error)}") from None
    if path.suffix == ".json":
        try:
            records = json.loads(content)
        except json.JSONDecodeError as error:
            raise LidrError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(records, list):
            raise LidrError(f"{path}: expected a JSON list of prompt records")
        return records
    records = []
    for number, line in enumerate(content.splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise LidrError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if isinstance(record, dict):
                record["_line"] = number  # so later errors name the file's line, not the record's index
            records.append(record)
    return records


def prompts_for_iteration(prompts: list[dict], iteration: int, num_prompts: int) -> list[dict]:
    """Iteration t takes the t-th slice of num_prompts: fresh prompts each iteration, as the
    released scripts did, as long as the source has iters * num_prompts; then it wraps around."""
    n = min(num_prompts, len(prompts))
    return [prompts[((iteration - 1) * n + i) % len(prompts)] for i in range(n)]


def load_model(name: str, device: str, dtype: str):
    torch_dtype = getattr(torch, dtype)
    if name == "tiny":
        model, tokenizer = build_tiny_model()
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        except Exception as error:
            raise LidrError(f"could not load model '{name}' ({first_line(error)}); "
                            f"offline or without hub access, try --model tiny") from None
    if not tokenizer.chat_template:
        raise LidrError(f"model '{name}' has no chat template: LIDR needs an instruction-tuned chat model")
    return model.to(device=device, dtype=torch_dtype).eval(), tokenizer


# ------------------------------------------------------------------------ chat format and sampling
def chat_prompt_ids(tokenizer, user_text: str, system_prompt: str, assistant_prefix: str = "") -> list[int]:
    """Token ids of a chat prompt ending where the assistant starts writing (after the prefix)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user_text})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already writes BOS: adding special tokens again would double it (PAPER.md traps).
    return tokenizer(text + assistant_prefix, add_special_tokens=False).input_ids


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with (<|eot_id|> for Llama-3,
    <|im_end|> for Qwen): training answers end with it, and generation stops at it."""
    marker = "LIDR-MARKER"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    after_answer = tokenizer(text.split(marker, 1)[1], add_special_tokens=False).input_ids
    special = [i for i in after_answer if i in tokenizer.all_special_ids]
    return special[0] if special else tokenizer.eos_token_id


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = {end_of_turn_id(tokenizer), tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, s: Settings, desc: str) -> list[str]:
    """Answers to token-id prompts, in input order. Prompts are sorted by length so batches
    need little padding; batches stop when every sequence has hit a stop token."""
    stops = stop_token_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=s.repetition_penalty,
                              do_sample=s.temperature > 0, temperature=s.temperature or None,
                              eos_token_id=stops, pad_token_id=stops[0])
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    for start in tqdm(range(0, len(order), s.gen_batch_size), desc=desc, unit="batch", leave=False):
        batch = order[start:start + s.gen_batch_size]
        width = max(len(prompts[i]) for i in batch)
        # Left-pad each row with its own first token: the repetition penalty counts every input
        # id, so a shared pad id (often EOS) would be penalised in padded rows only and batched
        # greedy output would differ from one-at-a-time. The attention mask hides the pads.
        input_ids = torch.tensor([[prompts[i][0]] * (width - len(prompts[i])) + prompts[i] for i in batch])
        attention_mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch])
        output = model.generate(input_ids=input_ids.to(model.device),
                                attention_mask=attention_mask.to(model.device), generation_config=config)
        for i, new_tokens in zip(batch, output[:, width:].tolist()):
            ends = [k for k, token in enumerate(new_tokens) if token in stops]
            answers[i] = tokenizer.decode(new_tokens[:ends[0] if ends else None], skip_special_tokens=True)
    return answers


def sample_responses(model, tokenizer, prompts: list[dict], langs: list[str], s: Settings) -> list[dict]:
    """Step 2: M_{t-1} answers every prompt in its own language."""
    jobs = [(p["id"], lang, p[lang]) for p in prompts for lang in langs if p.get(lang)]
    ids = [chat_prompt_ids(tokenizer, text, s.system_prompt) for _, _, text in jobs]
    answers = generate(model, tokenizer, ids, s.max_new_tokens, s, desc="sampling answers")
    return [{"id": pid, "lang": lang, "prompt": text, "response": answer}
            for (pid, lang, text), answer in zip(jobs, answers)]


# ------------------------------------------------------------------------ self-translation (step 3)
TRANSLATION_REQUEST = ("Translate the {source} text between <sentence> and </sentence> into {target}. "
                       "Write only the translation, between <translated> and </translated>.\n\n"
                       "<sentence>{text}</sentence>")
TRANSLATION_PREFIX = "<translated>\n"  # pre-filled assistant turn, as in the released scripts


def parse_translation(generated: str) -> str | None:
    """The text the model wrote after the pre-filled '<translated>\\n' and before
    '</translated>'; None (a failed translation) without the closing tag or with nothing inside."""
    if "</translated>" not in generated:
        return None
    return generated.split("</translated>", 1)[0].strip() or None


def translate(model, tokenizer, requests: list[dict], languages: dict[str, str], s: Settings, desc: str) -> list[dict]:
    """requests: {"id", "source_lang", "target_lang", "source"}; returns them with the raw output
    and the parsed "translation" (None when it failed: kept for inspection, never used)."""
    ids = [chat_prompt_ids(tokenizer, TRANSLATION_REQUEST.format(
        source=languages[r["source_lang"]], target=languages[r["target_lang"]], text=r["source"]),
        s.system_prompt, TRANSLATION_PREFIX) for r in requests]
    raw = generate(model, tokenizer, ids, s.translation_max_new_tokens, s, desc=desc)
    return [{**r, "raw": out, "translation": parse_translation(out)} for r, out in zip(requests, raw)]


def complete_prompts(model, tokenizer, prompts: list[dict], languages: dict[str, str], s: Settings):
    """Step 1, for records that lack a language: the model translates the dominant prompt.
    Returns the records with every language filled (None where translating failed) and the
    translation records."""
    dominant = next(iter(languages))
    requests = [{"id": p["id"], "source_lang": dominant, "target_lang": lang, "source": p[dominant]}
                for p in prompts for lang in languages if lang not in p]
    done = translate(model, tokenizer, requests, languages, s, desc="translating prompts") if requests else []
    filled = {(r["id"], r["target_lang"]): r["translation"] for r in done}
    return [{**p, **{lang: p.get(lang, filled.get((p["id"], lang))) for lang in languages}} for p in prompts], done


def language_pairs(langs: list[str], pairing: str) -> list[tuple[str, str]]:
    """(stronger, weaker) language pairs: the dominant one against each other (paper), or,
    ranked, every language against every lower-ranked one."""
    if pairing == "dominant":
        return [(langs[0], weaker) for weaker in langs[1:]]
    return [(langs[i], langs[j]) for i in range(len(langs)) for j in range(i + 1, len(langs))]


def is_translation_task(record: dict, dominant: str) -> bool:
    return record["translation_task"] or bool(re.search(r"translat", record[dominant], re.IGNORECASE))


def translation_requests(prompts: list[dict], responses: list[dict], langs: list[str], pairing: str) -> list[dict]:
    """Step 3's work: for each (stronger, weaker) pair, the stronger answer into the weaker language
    (skipped for translation tasks, whose pair keeps it untranslated) and the weaker one back."""
    answer = {(r["id"], r["lang"]): r["response"] for r in responses}
    requests = []
    for p in prompts:
        for strong, weak in language_pairs(langs, pairing):
            if (p["id"], strong) not in answer or (p["id"], weak) not in answer:
                continue
            if not is_translation_task(p, langs[0]):
                requests.append({"id": p["id"], "source_lang": strong, "target_lang": weak,
                                 "source": answer[p["id"], strong]})
            requests.append({"id": p["id"], "source_lang": weak, "target_lang": strong,
                             "source": answer[p["id"], weak]})
    return requests


# ------------------------------------------------------------------------ build pairs (step 4)
def build_pairs(prompts: list[dict], responses: list[dict], translations: list[dict], langs: list[str],
                pairing: str) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """For each prompt and (stronger, weaker) language pair:
      stronger: prompt x_strong, chosen y_strong,                rejected translate(y_weak -> strong)
      weaker:   prompt x_weak,   chosen translate(y_strong -> weak), rejected y_weak
    (translation tasks: chosen y_strong untranslated). Pairs with a failed translation, an empty
    side, or chosen == rejected are skipped. Returns the pairs and, per language, the counts
    {"pairs", "translation_failed", "empty", "identical"}."""
    answer = {(r["id"], r["lang"]): r["response"] for r in responses}
    translated = {(t["id"], t["source_lang"], t["target_lang"]): t["translation"] for t in translations}
    counts = {lang: {"pairs": 0, "translation_failed": 0, "empty": 0, "identical": 0} for lang in langs}
    pairs = []

    def add(p, lang, kind, other_lang, chosen, rejected):
        if chosen is None or rejected is None:
            counts[lang]["translation_failed"] += 1
        elif not chosen.strip() or not rejected.strip():
            counts[lang]["empty"] += 1
        elif chosen.strip() == rejected.strip():
            counts[lang]["identical"] += 1
        else:
            counts[lang]["pairs"] += 1
            pairs.append({"prompt": p[lang], "chosen": chosen, "rejected": rejected,
                          "id": p["id"], "lang": lang, "kind": kind, "other_lang": other_lang})

    for p in prompts:
        for strong, weak in language_pairs(langs, pairing):
            if (p["id"], strong) not in answer or (p["id"], weak) not in answer:
                continue  # its prompt could not be translated into one of the two languages
            y_strong, y_weak = answer[p["id"], strong], answer[p["id"], weak]
            add(p, strong, "own>translated", weak, y_strong, translated.get((p["id"], weak, strong)))
            if is_translation_task(p, langs[0]):
                add(p, weak, "untranslated>own", strong, y_strong, y_weak)
            else:
                add(p, weak, "translated>own", strong, translated.get((p["id"], strong, weak)), y_weak)
    return pairs, counts


# ------------------------------------------------------------------------ tokenise
@dataclass
class TokenizedPair:
    chosen: list[int]  # prompt + chosen answer + end-of-turn
    rejected: list[int]
    chosen_prompt_length: int  # tokens of prompt at the start of `chosen`, masked out of the loss
    rejected_prompt_length: int
    lang: str


def join_prompt_and_answer(prompt_ids: list[int], answer_ids: list[int], max_len: int) -> tuple[list[int], int]:
    """Concatenate ids (never re-tokenise the joined text: tokens would merge at the boundary).
    Over max_len, trim the prompt's start down to half of max_len, then the answer's end, so an
    answer is never truncated away entirely (loss stuck at ln 2, PAPER.md traps)."""
    prompt_ids = prompt_ids[-max(max_len - len(answer_ids), max_len // 2):]
    return (prompt_ids + answer_ids)[:max_len], len(prompt_ids)


def tokenize_pair(tokenizer, pair: dict, system_prompt: str, end_of_turn: int, max_len: int) -> TokenizedPair:
    prompt_ids = chat_prompt_ids(tokenizer, pair["prompt"], system_prompt)
    chosen, chosen_prompt_length = join_prompt_and_answer(
        prompt_ids, tokenizer(pair["chosen"], add_special_tokens=False).input_ids + [end_of_turn], max_len)
    rejected, rejected_prompt_length = join_prompt_and_answer(
        prompt_ids, tokenizer(pair["rejected"], add_special_tokens=False).input_ids + [end_of_turn], max_len)
    return TokenizedPair(chosen, rejected, chosen_prompt_length, rejected_prompt_length, pair["lang"])


def collate(sequences: list[tuple[list[int], int]], pad_id: int):
    """(ids, prompt_length) pairs -> right-padded input_ids, attention_mask and labels (B, T);
    labels are -100 on prompt and padding, so only answer tokens reach the loss."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), -100)
    for row, (ids, prompt_length) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, prompt_length:len(ids)] = torch.tensor(ids[prompt_length:])
    return input_ids, attention_mask, labels


# ------------------------------------------------------------------------ log-probs
def sequence_logps(model, input_ids, attention_mask, labels):
    """Sum of log pi(token) over the labelled (answer) tokens of each sequence, in float32
    (fp16/bf16 log-softmax loses precision and can give NaN). Returns (logps (B,), lengths (B,))."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
    targets = labels[:, 1:]  # the token each position predicts
    mask = targets != -100
    token_logps = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def pair_logps(model, pairs: list[TokenizedPair], pad_id: int):
    """One forward over [chosen_1..B, rejected_1..B]: (chosen logps, rejected logps, chosen lengths)."""
    sequences = ([(p.chosen, p.chosen_prompt_length) for p in pairs]
                 + [(p.rejected, p.rejected_prompt_length) for p in pairs])
    input_ids, attention_mask, labels = (t.to(model.device) for t in collate(sequences, pad_id))
    logps, lengths = sequence_logps(model, input_ids, attention_mask, labels)
    return logps[:len(pairs)], logps[len(pairs):], lengths[:len(pairs)]


@torch.no_grad()
def reference_logps(model, pairs: list[TokenizedPair], micro_batch_size: int, pad_id: int) -> torch.Tensor:
    """Step 6: log ref(y|x) for every pair, computed once with M_{t-1} before any update, so the
    reference needs no second model in memory. Returns (N, 2): chosen, rejected."""
    model.eval()
    rows = []
    for start in tqdm(range(0, len(pairs), micro_batch_size), desc="reference log-probs", leave=False):
        chosen, rejected, _ = pair_logps(model, pairs[start:start + micro_batch_size], pad_id)
        rows.append(torch.stack([chosen, rejected], dim=1).cpu())
    return torch.cat(rows)


# ------------------------------------------------------------------------ loss (step 5)
def dpo_nll_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 chosen_lengths, beta: float, alpha: float):
    """DPO (Rafailov et al. 2023, eq. 7) plus the chosen answer's length-normalised NLL
    (Pang et al. 2024), per pair:
        -log sigmoid(beta * [(pc - rc) - (pr - rr)]) + alpha * (-pc / |y_c|)
    All inputs (B,): summed log-probs of each answer under the policy (p) and the reference (r).
    Returns the loss averaged over pairs and a dict of detached per-pair metrics (B,)."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    dpo = -F.logsigmoid(chosen_rewards - rejected_rewards)
    nll = -policy_chosen_logps / chosen_lengths
    losses = dpo + alpha * nll
    metrics = {"loss/total": losses, "loss/dpo": dpo, "loss/nll": nll,
               "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
               "rewards/margins": chosen_rewards - rejected_rewards,
               "logps/chosen": policy_chosen_logps, "logps/rejected": policy_rejected_logps}
    return losses.mean(), {name: value.detach() for name, value in metrics.items()}


# ------------------------------------------------------------------------ train
def accumulate_gradients(model, pairs: list[TokenizedPair], ref: torch.Tensor, s: Settings, pad_id: int) -> dict:
    """Backward over one optimizer step's pairs in micro-batches. Each micro-batch's mean loss is
    weighted by its share of the step's pairs, so the gradient is the mean over the step's pairs
    whatever the micro-batching (averaging per micro-batch would weight a short last one more).
    Returns the per-pair metrics of the step, concatenated (N,)."""
    ref = ref.to(model.device)
    metrics = []
    for start in range(0, len(pairs), s.micro_batch_size):
        micro = pairs[start:start + s.micro_batch_size]
        chosen, rejected, chosen_lengths = pair_logps(model, micro, pad_id)
        loss, micro_metrics = dpo_nll_loss(chosen, rejected, ref[start:start + len(micro), 0],
                                           ref[start:start + len(micro), 1], chosen_lengths, s.beta, s.alpha)
        (loss * len(micro) / len(pairs)).backward()
        metrics.append(micro_metrics)
    return {name: torch.cat([m[name] for m in metrics]).cpu() for name in metrics[0]}


def warmup_cosine(total_steps: int, warmup_ratio: float):
    warmup = round(total_steps * warmup_ratio)

    def factor(step):  # multiplies --lr at optimizer step `step` (0-based)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return factor


def train(model, pairs: list[TokenizedPair], ref: torch.Tensor, s: Settings, pad_id: int, log_path: Path) -> dict:
    """Steps 5-6: DPO + NLL with AdamW, warmup then cosine decay, and gradient clipping.
    Writes one line of step metrics per optimizer step to log_path; returns the last epoch's
    metrics, averaged over all pairs and per language."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps_per_epoch = math.ceil(len(pairs) / s.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(s.epochs * steps_per_epoch, s.warmup_ratio))
    generator = torch.Generator().manual_seed(s.seed)
    model.train()
    partial_log = log_path.with_name(log_path.name + ".partial")
    with open(partial_log, "w") as log, tqdm(total=s.epochs * steps_per_epoch, desc="training", unit="step") as bar:
        for epoch in range(s.epochs):
            order = torch.randperm(len(pairs), generator=generator).tolist()
            epoch_metrics, epoch_langs = [], []
            for start in range(0, len(pairs), s.batch_size):
                step_ids = order[start:start + s.batch_size]
                metrics = accumulate_gradients(model, [pairs[i] for i in step_ids], ref[step_ids], s, pad_id)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                line = {"step": bar.n + 1, "epoch": epoch + 1, **{k: v.mean().item() for k, v in metrics.items()},
                        "optim/lr": schedule.get_last_lr()[0], "optim/grad_norm": grad_norm.item()}
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                log.write(json.dumps(line) + "\n")
                log.flush()
                bar.set_postfix_str(f"loss {line['loss/total']:.4f} acc {line['rewards/accuracies']:.2f} "
                                    f"margin {line['rewards/margins']:.3f} nll {line['loss/nll']:.3f}")
                bar.update()
                epoch_metrics.append(metrics)
                epoch_langs += [pairs[i].lang for i in step_ids]
    os.replace(partial_log, log_path)
    model.eval()
    merged = {k: torch.cat([m[k] for m in epoch_metrics]) for k in epoch_metrics[0]}
    langs = sorted(set(epoch_langs))
    per_lang = {lang: {k: v[torch.tensor([x == lang for x in epoch_langs])].mean().item() for k, v in merged.items()}
                for lang in langs}
    return {"steps": bar.n, "last_epoch": {k: v.mean().item() for k, v in merged.items()}, "per_lang": per_lang}


# ------------------------------------------------------------------------ run folder
def write_atomic(path: Path, text: str):
    """Write to a temp file, then rename: a crash never leaves a half-written artifact behind."""
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def write_jsonl(path: Path, records: list[dict]):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def stage(path: Path, compute) -> list[dict]:
    """Resume: reuse a finished stage's artifact, else compute it and write it."""
    if path.exists():
        tqdm.write(f"reusing {path}")
        return read_jsonl(path)
    records = compute()
    write_jsonl(path, records)
    return records


def save_model(model, tokenizer, path: Path):
    temp = path.with_name(path.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)  # left by a run that died while saving
    model.save_pretrained(temp)
    tokenizer.save_pretrained(temp)
    os.replace(temp, path)


def open_run_folder(s: Settings) -> Path:
    """Create the run folder with how it was made, or check that a resumed run matches it."""
    out = Path(s.out)
    settings_path = out / "settings.json"
    if settings_path.exists():
        recorded = json.loads(settings_path.read_text())["settings"]
        changed = [f"--{k.replace('_', '-')} {recorded.get(k)!r} -> {v!r}" for k, v in dataclasses.asdict(s).items()
                   if k not in RESUMABLE_CHANGES and recorded.get(k) != v]
        if changed:
            raise LidrError(f"{out} was made with other settings ({'; '.join(changed)}); "
                            f"pass another --out, or the same settings to resume it")
    elif out.exists() and any(out.iterdir()):
        raise LidrError(f"--out {out} exists and is not a lidr run folder; pass another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        source = Path(__file__).read_bytes()
        write_atomic(settings_path, json.dumps({
            "settings": dataclasses.asdict(s),
            "command": [sys.executable, *sys.argv],
            "lidr_sha256": hashlib.sha256(source).hexdigest(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "datasets": datasets.__version__},
            "hardware": torch.cuda.get_device_name() if s.device.startswith("cuda") else platform.processor() or "cpu",
        }, indent=2))
        (out / "lidr.py").write_bytes(source)  # the exact code of this run
    with open(out / "commands.log", "a") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
    return out


def summary_table(iteration_metrics: list[dict], langs: list[str]) -> str:
    header = (f"{'iter':>4} {'lang':>4} {'pairs':>6} {'skipped':>7} {'tr.fail':>7} {'loss':>8} "
              f"{'acc':>5} {'margin':>8} {'logp_ch':>9} {'nll':>7}")
    rows = [header, "-" * len(header)]
    for t, m in enumerate(iteration_metrics, 1):
        for lang in langs:
            c = m["counts"][lang]
            trained = (m["train"] or {"per_lang": {}})["per_lang"].get(lang)
            numbers = (f"{trained['loss/total']:8.4f} {trained['rewards/accuracies']:5.2f} "
                       f"{trained['rewards/margins']:8.4f} {trained['logps/chosen']:9.2f} {trained['loss/nll']:7.3f}"
                       if trained else f"{'-':>8} {'-':>5} {'-':>8} {'-':>9} {'-':>7}")
            rows.append(f"{t:>4} {lang:>4} {c['pairs']:>6} {c['empty'] + c['identical']:>7} "
                        f"{m['translation_failures'][lang]:>7} {numbers}")
    return "\n".join(rows)


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ------------------------------------------------------------------------ main: the loop
def run(s: Settings):
    languages = parse_languages(s.langs)
    langs = list(languages)
    all_prompts = load_prompts(s.prompts, s.prompt_field, langs)
    s = resolve(s)
    out = Path(s.out)
    finished = [t for t in range(1, s.iters + 1) if (out / f"iter_{t}" / "model").exists()]
    start_model = str(out / f"iter_{finished[-1]}" / "model") if finished else s.model
    transformers.set_seed(s.seed)
    model, tokenizer = load_model(start_model, s.device, s.dtype)
    out = open_run_folder(s)  # only now: bad input above has written nothing
    print(f"run folder {out} | {s.model} on {s.device} ({s.dtype}) | {len(all_prompts)} prompts, "
          f"{min(s.num_prompts, len(all_prompts))} per iteration | langs {','.join(langs)} | pairing {s.pairing}")
    end_of_turn = end_of_turn_id(tokenizer)
    iteration_metrics = []
    for t in range(1, s.iters + 1):
        folder = out / f"iter_{t}"
        if t in finished:
            tqdm.write(f"reusing {folder}")
            iteration_metrics.append(json.loads((folder / "metrics.json").read_text()))
            continue
        folder.mkdir(exist_ok=True)
        print(f"== iteration {t}: M{t - 1} -> M{t}")
        def complete_and_record():
            records, done = complete_prompts(model, tokenizer, prompts_for_iteration(all_prompts, t, s.num_prompts),
                                             languages, s)
            write_jsonl(folder / "prompt_translations.jsonl", done)
            return records
        prompts = stage(folder / "prompts.jsonl", complete_and_record)
        responses = stage(folder / "responses.jsonl", lambda: sample_responses(model, tokenizer, prompts, langs, s))
        translations = stage(folder / "translations.jsonl", lambda: translate(
            model, tokenizer, translation_requests(prompts, responses, langs, s.pairing), languages, s,
            desc="self-translating"))
        pairs, counts = build_pairs(prompts, responses, translations, langs, s.pairing)
        stage(folder / "pairs.jsonl", lambda: pairs)
        failures = {lang: 0 for lang in langs}
        for record in translations + read_jsonl(folder / "prompt_translations.jsonl"):
            failures[record["target_lang"]] += record["translation"] is None

        if pairs:
            tokenized = [tokenize_pair(tokenizer, p, s.system_prompt, end_of_turn, s.max_len) for p in pairs]
            truncated = sum(len(p.chosen) == s.max_len or len(p.rejected) == s.max_len for p in tokenized)
            if truncated:
                tqdm.write(f"warning: {truncated} of {len(pairs)} pairs reach --max-len {s.max_len} and are truncated")
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn
            ref = reference_logps(model, tokenized, s.micro_batch_size, pad_id)
            trained = train(model, tokenized, ref, s, pad_id, folder / "train_log.jsonl")
        else:
            tqdm.write(f"no pairs survived in iteration {t}: M{t} = M{t - 1}")
            trained = None
        metrics = {"counts": counts, "translation_failures": failures, "translations": len(translations), "train": trained}
        write_atomic(folder / "metrics.json", json.dumps(metrics, indent=2))
        save_model(model, tokenizer, folder / "model")  # M_t, the model of iteration t + 1
        iteration_metrics.append(metrics)
    table = summary_table(iteration_metrics, langs)
    write_atomic(out / "summary.txt", table + "\n")
    print(table)
    print(f"final model: {out / f'iter_{s.iters}' / 'model'}")


def main(argv=None) -> int:
    try:
        run(parse_settings(argv))
    except LidrError as error:
        print(f"lidr: error: {error}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------ offline defaults
# Used by --model tiny and when --prompts is omitted: they let the whole loop run with no download.

def build_tiny_model():
    """A randomly initialised 2-layer Llama (~90k parameters) with a byte-level tokenizer and a
    Llama-3-style chat template, built in code. It writes noise: most of its translations fail."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()  # GPT-2's printable stand-in for each of the 256 bytes
    backend = Tokenizer(models.BPE(vocab={byte_to_char[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>",
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config), tokenizer


BUILTIN_PROMPTS = [  # written for this kit; the same instruction in the five languages of the paper
    {"id": "b01",
     "en": "Give three tips for staying healthy.",
     "es": "Da tres consejos para mantenerse sano.",
     "ru": "Дай три совета, как оставаться здоровым.",
     "de": "Nenne drei Tipps, um gesund zu bleiben.",
     "fr": "Donne trois conseils pour rester en bonne santé."},
    {"id": "b02",
     "en": "Explain why the sky is blue in two sentences.",
     "es": "Explica en dos frases por qué el cielo es azul.",
     "ru": "Объясни в двух предложениях, почему небо голубое.",
     "de": "Erkläre in zwei Sätzen, warum der Himmel blau ist.",
     "fr": "Explique en deux phrases pourquoi le ciel est bleu."},
    {"id": "b03",
     "en": "Write a short poem about the sea.",
     "es": "Escribe un poema corto sobre el mar.",
     "ru": "Напиши короткое стихотворение о море.",
     "de": "Schreibe ein kurzes Gedicht über das Meer.",
     "fr": "Écris un court poème sur la mer."},
    {"id": "b04",
     "en": "What is the capital of Australia?",
     "es": "¿Cuál es la capital de Australia?",
     "ru": "Какая столица у Австралии?",
     "de": "Was ist die Hauptstadt von Australien?",
     "fr": "Quelle est la capitale de l'Australie ?"},
    {"id": "b05",
     "en": "A shop sells pencils at 3 for 2 dollars. How much do 12 pencils cost?",
     "es": "Una tienda vende lápices a 3 por 2 dólares. ¿Cuánto cuestan 12 lápices?",
     "ru": "Магазин продаёт карандаши по 3 штуки за 2 доллара. Сколько стоят 12 карандашей?",
     "de": "Ein Laden verkauft Bleistifte zu 3 Stück für 2 Dollar. Was kosten 12 Bleistifte?",
     "fr": "Un magasin vend des crayons à 3 pour 2 dollars. Combien coûtent 12 crayons ?"},
    {"id": "b06",
     "en": "Describe how to make a cup of tea.",
     "es": "Describe cómo preparar una taza de té.",
     "ru": "Опиши, как заварить чашку чая.",
     "de": "Beschreibe, wie man eine Tasse Tee zubereitet.",
     "fr": "Décris comment préparer une tasse de thé."},
    {"id": "b07",
     "en": "Suggest a name for a small bakery.",
     "es": "Sugiere un nombre para una pequeña panadería.",
     "ru": "Предложи название для маленькой пекарни.",
     "de": "Schlage einen Namen für eine kleine Bäckerei vor.",
     "fr": "Propose un nom pour une petite boulangerie."},
    {"id": "b08",
     "en": "Summarise the plot of Little Red Riding Hood in one sentence.",
     "es": "Resume el argumento de Caperucita Roja en una frase.",
     "ru": "Перескажи сюжет «Красной Шапочки» в одном предложении.",
     "de": "Fasse die Handlung von Rotkäppchen in einem Satz zusammen.",
     "fr": "Résume l'histoire du Petit Chaperon rouge en une phrase."},
    {"id": "b09",
     "en": "List the planets of the solar system in order from the sun.",
     "es": "Enumera los planetas del sistema solar en orden desde el sol.",
     "ru": "Перечисли планеты Солнечной системы по порядку от Солнца.",
     "de": "Zähle die Planeten des Sonnensystems in der Reihenfolge ab der Sonne auf.",
     "fr": "Énumère les planètes du système solaire dans l'ordre à partir du soleil."},
    {"id": "b10",
     "en": "Write a polite email asking a colleague to move a meeting to Friday.",
     "es": "Escribe un correo cortés pidiendo a un colega que mueva una reunión al viernes.",
     "ru": "Напиши вежливое письмо с просьбой к коллеге перенести встречу на пятницу.",
     "de": "Schreibe eine höfliche E-Mail, in der du einen Kollegen bittest, ein Treffen auf Freitag zu verlegen.",
     "fr": "Écris un e-mail poli demandant à un collègue de déplacer une réunion à vendredi."},
    {"id": "b11",
     "en": "What are the advantages of riding a bicycle to work?",
     "es": "¿Cuáles son las ventajas de ir al trabajo en bicicleta?",
     "ru": "Каковы преимущества поездок на работу на велосипеде?",
     "de": "Welche Vorteile hat es, mit dem Fahrrad zur Arbeit zu fahren?",
     "fr": "Quels sont les avantages d'aller au travail à vélo ?"},
    {"id": "b12",
     "en": "Explain the difference between weather and climate.",
     "es": "Explica la diferencia entre el tiempo y el clima.",
     "ru": "Объясни разницу между погодой и климатом.",
     "de": "Erkläre den Unterschied zwischen Wetter und Klima.",
     "fr": "Explique la différence entre la météo et le climat."},
    {"id": "b13", "translation_task": True,
     "en": "Translate into French: 'The library opens at nine.'",
     "es": "Traduce al francés: 'The library opens at nine.'",
     "ru": "Переведи на французский: 'The library opens at nine.'",
     "de": "Übersetze ins Französische: 'The library opens at nine.'",
     "fr": "Traduis en français : 'The library opens at nine.'"},
    {"id": "b14",
     "en": "Give an example of a renewable energy source and explain how it works.",
     "es": "Da un ejemplo de fuente de energía renovable y explica cómo funciona.",
     "ru": "Приведи пример возобновляемого источника энергии и объясни, как он работает.",
     "de": "Nenne ein Beispiel für eine erneuerbare Energiequelle und erkläre, wie sie funktioniert.",
     "fr": "Donne un exemple de source d'énergie renouvelable et explique son fonctionnement."},
    {"id": "b15",
     "en": "If a train travels 60 km in 45 minutes, what is its average speed in km/h?",
     "es": "Si un tren recorre 60 km en 45 minutos, ¿cuál es su velocidad media en km/h?",
     "ru": "Если поезд проезжает 60 км за 45 минут, какова его средняя скорость в км/ч?",
     "de": "Wenn ein Zug 60 km in 45 Minuten fährt, wie hoch ist seine Durchschnittsgeschwindigkeit in km/h?",
     "fr": "Si un train parcourt 60 km en 45 minutes, quelle est sa vitesse moyenne en km/h ?"},
    {"id": "b16", "translation_task": True,
     "en": "Translate 'good morning, friends' into Spanish.",
     "es": "Traduce 'good morning, friends' al español.",
     "ru": "Переведи 'good morning, friends' на испанский.",
     "de": "Übersetze 'good morning, friends' ins Spanische.",
     "fr": "Traduis 'good morning, friends' en espagnol."},
]


if __name__ == "__main__":
    sys.exit(main())
