"""LIDR: Language Imbalance Driven Rewarding (Yang et al., ICLR 2025, arXiv 2410.08964), in one file.

An instruction-tuned LLM answers better in its dominant language (English) than in the others,
and that gap is a preference signal that costs nothing. Iteration t turns M_{t-1} into M_t:
  1. prompts: the same instructions in every language (the model translates missing ones);
  2. sampling: M_{t-1} answers every prompt in its own language;
  3. self-translation: M_{t-1} translates its dominant-language answers into each other language,
     and each other language's answers into the dominant one;
  4. pairs: dominant own answer > back-translated weaker answer, and translated dominant answer >
     the weaker language's own answer;
  5. training: DPO + NLL on the pairs, from M_{t-1}, which is also the reference model.
Both sides improve, so the gap renews and the loop repeats.

Read it top to bottom: the settings, the loop, steps 1 to 5, run. Below the PLUMBING ruler is what
a first reading can skip. Departures from the authors' scripts: README, Departures (--recipe
scripts undoes the data-pipeline ones).

  python lidr.py --iters 2               # the toy world, offline; on a CUDA GPU the paper's model (30 questions)
  python lidr.py --iters 2 --model toy   # the toy world, whatever the machine
  python lidr.py --method qalign         # QAlign on the same M0, prompts and evaluation, for comparison
  python lidr.py --help                  # every flag
"""

import argparse
import ast
import contextlib
import copy
import dataclasses
import fcntl
import functools
import gc
import hashlib
import inspect
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import string
import sys
import tempfile
import time
import unicodedata
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
import transformers
from py3langid.langid import MODEL_FILE as LANGID_MODEL, LanguageIdentifier
from tqdm import tqdm
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

# Many GPUs: under torchrun every process runs this file. Each generates its
# share of a stage's batches and trains its shard of the model (FSDP2); rank 0 writes the run folder.
RANK, WORLD, LOCAL_RANK = (int(os.environ.get(name, default)) for name, default in
                           (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))


# ------------------------------------------------------------------------ settings
PAPER_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


def setting(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    # run
    method: str = setting("lidr", "lidr; or qalign: QAlign's two SFT stages on the same M0, prompts and evaluation")
    iters: int = setting(2, "iterations M0 -> M1 -> ... (paper: 2); qalign: 2, its stages")
    out: str = setting("", "run folder (default runs/<model>-<langs>-seed<seed>[-qalign]); the same folder resumes")
    seed: int = setting(0, "seed of the toy M0's pre-training, sampling and the order of training pairs")
    # model
    model: str = setting("auto", "hub id or path of a chat model; toy: the toy world; auto: PAPER_MODEL on GPU, or toy")
    device: str = setting("auto", "cpu, cuda, cuda:1, ...; auto = cuda if present")
    dtype: str = setting("auto", "bfloat16 (one GPU trains it with BF16AdamW) or float32; auto = bfloat16 on GPU")
    recipe: str = setting("lidr", "lidr, or scripts: the authors' released data pipeline (scripts_pairs)")
    # step 1: prompts
    prompts: str = setting("capitals", "a .json(l) file; a folder of <lang>.jsonl joined by id (or several, "
                                       "comma-separated); a datasets id; toy; capitals: questions on capitals")
    prompt_field: str = setting("instruction", "the field holding the prompt, in folders and datasets")
    translation_tasks: str = setting("", "a .jsonl of the translation tasks' ids; empty = the records' flag, a pattern")
    prompt_template: str = setting("", "a file with {question} (and {language}), or a .py's PROMPT_PREFIX, to ask in")
    langs: str = setting("en,es,ru,de,fr", "language codes, dominant first; 'code:Name' for other codes")
    num_prompts: int = setting(1000, "prompts per iteration; iteration t takes the t-th slice, wrapping around")
    # steps 2-3: sampling and self-translation
    system_prompt: str = setting("You are a helpful assistant.", "system turn; empty for none")
    max_new_tokens: int = setting(2400, "answer length cap (scripts: 2400)")
    translation_max_new_tokens: int = setting(4096, "translation length cap (scripts: 4096)")
    repetition_penalty: float = setting(1.1, "repetition penalty of answers (scripts: 1.1; none for translations)")
    translation_request: str = setting("", "a file holding {text} and {lang} or {target}, or a .py with "
                                           "TRANS_INSTRUCTION; empty = TRANSLATION_REQUEST")
    temperature: float = setting(0.0, "0 = greedy decoding (paper); > 0 samples")
    gen_batch_size: int = setting(0, "most sequences per generation batch; 0 = 512 on GPU, 32 on CPU")
    # step 5: training
    beta: float = setting(0.1, "DPO inverse temperature")
    alpha: float = setting(1.0, "weight of the chosen answer's length-normalised NLL")
    lr: float = setting(5e-7, "peak learning rate")
    epochs: int = setting(1, "passes over each iteration's pairs (qalign: each stage's examples)")
    batch_size: int = setting(32, "pairs (qalign: examples) per optimizer step")
    micro_batch_size: int = setting(1, "pairs per forward pass; gradients accumulate over the step")
    max_len: int = setting(2048, "tokens of prompt + answer kept per sequence; longer answers are cut")
    warmup_ratio: float = setting(0.1, "fraction of steps with linear warmup; cosine decay after")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    adam_beta2: float = setting(0.999, "AdamW's second-moment decay")
    max_grad_norm: float = setting(1.0, "gradient clipping threshold")
    gradient_checkpointing: str = setting("auto", "on: recompute activations in the backward pass; auto = on on GPU")
    # evaluation: M0 and every M_t
    eval: str = setting("", "benchmarks, comma-separated: toy, capitals, mgsm, alpaca; empty = none")
    eval_langs: str = setting("", "languages to evaluate, as in --langs; empty = --langs")
    eval_limit: int = setting(0, "most problems per benchmark and language; 0 = all")
    eval_max_new_tokens: int = setting(2048, "evaluation answer length cap (the scripts': 2048)")
    eval_prompt_template: str = setting("", "--prompt-template's format, for every benchmark's questions")
    mgsm: str = setting("", "MGSM: the authors' folder of mgsm_<lang>.jsonl files (data/MGSM)")
    alpaca: str = setting("", "alpaca's instructions: X-AlpacaEval's <lang>.json folder, or --prompts' formats; "
                              "empty = --prompts")


# argparse refuses any other value, naming the flag and the set.
CHOICES = {"method": ("lidr", "qalign"), "dtype": ("auto", "bfloat16", "float32"), "recipe": ("lidr", "scripts"),
           "gradient_checkpointing": ("auto", "on", "off")}

# --model toy: the toy world's prompts, evaluation and lengths. No repetition penalty: a toy answer
# repeats the question's words. NLL weight 2: DPO also lowers the end-of-turn token ending both answers.
TOY_DEFAULTS = dict(prompts="toy", eval="toy", num_prompts=300, system_prompt="", repetition_penalty=1.0,
                    max_new_tokens=48, translation_max_new_tokens=64, eval_max_new_tokens=48, lr=1e-4, alpha=2.0,
                    batch_size=8, micro_batch_size=8, max_len=512)

# --method qalign: QAlign's SFT hyperparameters (NJUNLP/QAlign training_scripts/finetune.sh: 3 epochs,
# lr 2e-5, 128 examples per step, 3% warmup, cosine). The toy keeps its own lr and batch size.
QALIGN_DEFAULTS = dict(lr=2e-5, epochs=3, batch_size=128, warmup_ratio=0.03)
QALIGN_TOY_DEFAULTS = dict(epochs=3, warmup_ratio=0.03)


# ------------------------------------------------------------------------ the loop
def lidr_iteration(model, tokenizer, prompts: list[dict], languages: dict[str, str], settings: Settings,
                   folder: Path) -> dict:
    """One iteration, M_{t-1} -> M_t in place on `model`. Each step's records go to a file in the
    iteration's folder (stage), or are read back from it when resuming. Returns its metrics."""
    langs = list(languages)
    prompts, prompts_too_long = drop_untrainable_prompts(prompts, tokenizer, languages, settings)
    prompt_translations = stage(folder / "prompt_translations.jsonl", lambda: translate(
        model, tokenizer, prompt_translation_requests(prompts, langs), languages, settings, "translating prompts"),
        settings)
    prompts = stage(folder / "prompts.jsonl", lambda: fill_prompts(prompts, prompt_translations, langs), settings)
    responses = stage(folder / "responses.jsonl", lambda: sample_responses(
        model, tokenizer, prompts, languages, settings), settings)
    translations = stage(folder / "translations.jsonl", lambda: translate(
        model, tokenizer, translation_requests(prompts, responses, langs, settings.recipe),
        languages, settings, "self-translating"), settings)
    pair_rule = scripts_pairs if settings.recipe == "scripts" else build_pairs
    built, counts = pair_rule(prompts, responses, translations, langs)  # on resume: the same inputs, the same pairs
    pairs = stage(folder / "pairs.jsonl", lambda: built, settings)  # train on exactly what the folder holds
    every_translation = prompt_translations + translations
    failures = count_per_target_language(every_translation, langs,  # no parseable span: wrong_language's apart
                                         lambda t: t["translation"] is None and not in_another_language(t))
    wrong_language = count_per_target_language(every_translation, langs, in_another_language)
    trained = train_on_pairs(model, tokenizer, pairs, settings, folder / "train_log.jsonl")
    return {"counts": counts, "translation_failures": failures, "translations_wrong_language": wrong_language,
            "prompts_too_long": prompts_too_long, "train": trained}


# ------------------------------------------------------------------------ step 1: prompts
def prompts_for_iteration(prompts: list[dict], iteration: int, num_prompts: int) -> list[dict]:
    """Iteration t takes the t-th slice of num_prompts (fresh prompts, as the scripts did), wrapping around."""
    n = min(num_prompts, len(prompts))
    return [prompts[((iteration - 1) * n + i) % len(prompts)] for i in range(n)]


def prompt_translation_requests(prompts: list[dict], langs: list[str]) -> list[dict]:
    """Step 1 for the languages a prompt record lacks: translate its dominant prompt."""
    return [{"id": p["id"], "source_lang": langs[0], "target_lang": lang, "source": p[langs[0]]}
            for p in prompts for lang in langs if lang not in p]


def fill_prompts(prompts: list[dict], prompt_translations: list[dict], langs: list[str]) -> list[dict]:
    """Every language of every record filled: given, translated by the model, or None (failed)."""
    translated = {(t["id"], t["target_lang"]): t["translation"] for t in prompt_translations}
    return [{**p, **{lang: p.get(lang, translated.get((p["id"], lang))) for lang in langs}} for p in prompts]


# ------------------------------------------------------------------------ step 2: sampling
def sample_responses(model, tokenizer, prompts: list[dict], languages: dict[str, str],
                     settings: Settings) -> list[dict]:
    """Step 2: M_{t-1} answers every prompt in its own language, inside --prompt-template if given;
    "prompt" is what was asked, and becomes the prompt of the pairs."""
    prompt_template = template(settings, "prompt_template")  # the file's text ('' without the flag)
    jobs = [(prompt["id"], lang, fill_template(prompt_template, prompt[lang], languages[lang]))
            for prompt in prompts for lang in languages if prompt.get(lang)]
    ids = [chat_prompt_ids(tokenizer, text, settings.system_prompt) for _, _, text in jobs]
    answers = generate(model, tokenizer, ids, settings.max_new_tokens, settings.gen_batch_size,
                       settings.repetition_penalty, settings.temperature, desc="sampling answers")
    return [{"id": prompt_id, "lang": lang, "prompt": text, "response": answer.strip(), "finished": finished}
            for (prompt_id, lang, text), (answer, finished) in zip(jobs, answers)]


def fill_template(prompt_template: str, question: str, language: str) -> str:
    return prompt_template.format(question=question, language=language) if prompt_template else question


def chat_prompt_ids(tokenizer, user_text: str, system_prompt: str, assistant_prefix: str = "") -> list[int]:
    """Token ids of a chat prompt ending where the assistant starts writing (after the prefix)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user_text})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already writes BOS: adding special tokens again would double it (a known DPO trap).
    return tokenizer(text + assistant_prefix, add_special_tokens=False).input_ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             repetition_penalty: float, temperature: float, desc: str) -> list[tuple[str, bool]]:
    """(answer, finished) for each token-id prompt, in input order; finished is False when the answer hit
    max_new_tokens. HF generate on batches of similar-length prompts, shortest first, of at most batch_size
    sequences and what fits in free memory (padded_batches)."""
    if not prompts:
        return []
    configured = model.generation_config.eos_token_id  # one id, or a list (Llama-3: <|end_of_text|>, <|eot_id|>)
    stops = sorted({end_of_turn_id(tokenizer), tokenizer.eos_token_id, *(
        configured if isinstance(configured, list) else [configured])} - {None})
    config = GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                              do_sample=temperature > 0, temperature=temperature or None,
                              top_k=0, top_p=1.0,  # plain temperature sampling, not the model's own defaults
                              eos_token_id=stops, pad_token_id=stops[0])
    tqdm.write(f"{desc}: {len(prompts)} sequences, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} "
               f"tokens, at most {max_new_tokens} new tokens each")
    start_time = time.perf_counter()
    answers, new_tokens_total = [], 0
    for new_tokens in padded_batches(model, prompts, config, batch_size or (512 if model.device.type == "cuda"
                                                                             else 32), desc):
        ends = [k for k, token in enumerate(new_tokens) if token in stops]
        answers.append((tokenizer.decode(new_tokens[:ends[0] if ends else None], skip_special_tokens=True), bool(ends)))
        new_tokens_total += ends[0] + 1 if ends else len(new_tokens)
    seconds = time.perf_counter() - start_time  # the rate a time estimate needs
    tqdm.write(f"{desc}: {new_tokens_total} new tokens in {seconds:.1f} s, {new_tokens_total / max(seconds, 1e-9):.0f} "
               f"tokens/s")
    return answers


# ------------------------------------------------------------------------ step 3: self-translation
TRANSLATION_REQUEST = ("Translate the {source} text between <sentence> and </sentence> into {target}. "
                       "Write only the translation, between <translated> and </translated>.\n\n"
                       "<sentence>{text}</sentence>")

TRANSLATION_PREFIX = "<translated>\n"  # pre-filled assistant turn, as in the released scripts


def translation_requests(prompts: list[dict], responses: list[dict], langs: list[str], recipe: str) -> list[dict]:
    """Step 3's work: for each pair of comparable answers, the stronger one into the weaker language
    and the weaker one back. None for translation tasks (their pairs use the answers as written);
    the scripts translate whatever was answered."""
    requests = []
    for prompt, stronger, weaker, why_not in compared_answers(prompts, responses, langs):
        if (why_not is None and not prompt["translation_task"]) or (recipe == "scripts" and why_not != "no_prompt"):
            requests.append({"id": prompt["id"], "source_lang": stronger["lang"], "target_lang": weaker["lang"],
                             "source": stronger["response"]})
            requests.append({"id": prompt["id"], "source_lang": weaker["lang"], "target_lang": stronger["lang"],
                             "source": weaker["response"]})
    return requests


def compared_answers(prompts: list[dict], responses: list[dict], langs: list[str]):
    """(prompt, stronger answer, weaker answer, why not) for every prompt, the dominant (stronger) language
    against each other. why not: None, or the reason to skip: no_prompt (untranslated, or too long),
    unfinished (hit the cap), empty."""
    answers = {(r["id"], r["lang"]): r for r in responses}
    for prompt in prompts:
        for stronger_lang, weaker_lang in ((langs[0], weaker) for weaker in langs[1:]):
            stronger, weaker = answers.get((prompt["id"], stronger_lang)), answers.get((prompt["id"], weaker_lang))
            why_not = ("no_prompt" if stronger is None or weaker is None
                       else "unfinished" if not (stronger["finished"] and weaker["finished"])
                       else "empty" if not (stronger["response"] and weaker["response"]) else None)
            yield prompt, stronger or {"lang": stronger_lang}, weaker or {"lang": weaker_lang}, why_not


def translate(model, tokenizer, requests: list[dict], languages: dict[str, str], settings: Settings,
              desc: str) -> list[dict]:
    """requests {"id", "source_lang", "target_lang", "source"} with the model's "raw" output, the parsed
    "translation" (None: failed) and the "language" it is in. Under --recipe lidr an empty translation, or one
    in another language, fails too: a small model often copies its input, which would teach that language."""
    request = template(settings, "translation_request") or TRANSLATION_REQUEST
    ids = [chat_prompt_ids(tokenizer, request.format(
        source=languages[r["source_lang"]], target=languages[r["target_lang"]], lang=languages[r["target_lang"]],
        text=r["source"]), settings.system_prompt, TRANSLATION_PREFIX) for r in requests]
    # No repetition penalty: the prompt holds the text to copy and the closing tag (released scripts too).
    outputs = generate(model, tokenizer, ids, settings.translation_max_new_tokens, settings.gen_batch_size,
                       1.0, settings.temperature, desc=desc)
    done = []
    for r, (raw, _) in zip(requests, outputs):
        translation = parse_translation(raw, empty_fails=settings.recipe == "lidr")
        record = {**r, "raw": raw, "translation": translation,
                  "language": language_of(translation, tuple(languages)) if translation else None}
        if settings.recipe == "lidr" and in_another_language(record):
            record["translation"] = None
        done.append(record)
    return done


def parse_translation(generated: str, empty_fails: bool = True) -> str | None:
    """The model's output after the pre-filled '<translated>\\n', up to '</translated>'; None without the closing
    tag, or, if empty_fails, with nothing inside (the scripts' pattern keeps an empty one)."""
    if "</translated>" not in generated:
        return None
    translation = generated.split("</translated>", 1)[0].strip()
    return None if empty_fails and not translation else translation


def in_another_language(translation: dict) -> bool:
    return translation.get("language") not in (None, translation["target_lang"])


def language_of(text: str, candidates: tuple[str, ...]) -> str | None:
    """Which of the candidate languages text is in, by py3langid (97 languages, offline); None when it can't
    tell: fewer than three words in Latin letters ("Quito." reads 94% Spanish), or below 80% probability."""
    identifier = language_identifier(candidates)
    latin = all(unicodedata.name(c, "").startswith("LATIN") for c in text if c.isalpha())
    if identifier is None or (latin and len(text.split()) < 3):
        return None
    language, probability = identifier.classify(text)
    return language if probability >= 0.8 else None


@functools.cache
def language_identifier(candidates: tuple[str, ...]) -> LanguageIdentifier | None:
    identifier = LanguageIdentifier.from_model_file(LANGID_MODEL, norm_probs=True)
    if len(candidates) < 2 or not set(candidates) <= set(identifier.labels):  # else it takes one for another
        return None
    identifier.set_languages(list(candidates))
    return identifier


# ------------------------------------------------------------------------ step 4: preference pairs
SKIP_REASONS = ("pairs", "no_prompt", "unfinished", "empty", "translation_failed", "wrong_language", "identical",
                "overwritten")  # "pairs": built; then why a pair was not ("overwritten": scripts_pairs only)


def build_pairs(prompts: list[dict], responses: list[dict], translations: list[dict],
                langs: list[str]) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """The paper's rule, for each prompt and (stronger, weaker) language pair:
      stronger: prompt x_stronger, chosen y_stronger,                      rejected translate(y_weaker -> stronger)
      weaker:   prompt x_weaker,   chosen translate(y_stronger -> weaker), rejected y_weaker
    For a translation task both pairs use the answers as written. A pair is skipped when its answers
    can't be compared, a translation it needs failed, or chosen == rejected. Returns the pairs, and
    per language the count of "pairs" built and of each reason to skip."""
    translated = {(t["id"], t["source_lang"], t["target_lang"]): t for t in translations}
    counts = {lang: dict.fromkeys(SKIP_REASONS, 0) for lang in langs}
    pairs = []
    for prompt, stronger, weaker, why_not in compared_answers(prompts, responses, langs):
        if why_not:
            counts[stronger["lang"]][why_not] += 1
            counts[weaker["lang"]][why_not] += 1
            continue
        if prompt["translation_task"]:
            candidates = [(stronger, "own>untranslated", weaker, stronger["response"], weaker["response"], None),
                          (weaker, "untranslated>own", stronger, stronger["response"], weaker["response"], None)]
        else:
            back = translated.get((prompt["id"], weaker["lang"], stronger["lang"]), {})  # y_weaker, into stronger
            forward = translated.get((prompt["id"], stronger["lang"], weaker["lang"]), {})  # y_stronger, into weaker
            candidates = [(stronger, "own>translated", weaker, stronger["response"], back.get("translation"), back),
                          (weaker, "translated>own", stronger, forward.get("translation"), weaker["response"], forward)]
        for answer, kind, other, chosen, rejected, needed in candidates:  # needed: the translation record used
            if chosen is None or rejected is None:
                reason = "wrong_language" if needed and in_another_language(needed) else "translation_failed"
            else:
                reason = "identical" if chosen == rejected else "pairs"
            counts[answer["lang"]][reason] += 1
            if reason == "pairs":  # the prompt is the one its language's answer was sampled with
                pairs.append({"prompt": answer["prompt"], "chosen": chosen, "rejected": rejected, "id": answer["id"],
                              "lang": answer["lang"], "kind": kind, "other_lang": other["lang"]})
    return pairs, counts


# ------------------------------------------------------------------------ step 5: DPO + NLL
def train_on_pairs(model, tokenizer, pairs: list[dict], settings: Settings, log_path: Path) -> dict | None:
    """Step 5: tokenise the pairs, take the reference log-probs with the model as it is (M_{t-1}),
    then train it into M_t with DPO + NLL. None when no pair is left to train on."""
    end_of_turn = end_of_turn_id(tokenizer)
    tokenized = [tokenize_pair(tokenizer, pair, settings.system_prompt, end_of_turn, settings.max_len)
                 for pair in pairs]
    kept = [pair for pair in tokenized if pair is not None]
    truncated = sum(pair.truncated for pair in kept)
    if truncated or len(kept) < len(pairs):
        tqdm.write(f"warning: --max-len {settings.max_len}: {truncated} pairs have an answer cut short, "
                   f"{len(pairs) - len(kept)} pairs dropped (prompt alone too long)")
    if not kept:
        tqdm.write(f"nothing to train on in {log_path.parent.name}: the model stays as it was")
        return None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn
    ref_chosen_logps, ref_rejected_logps = reference_logps(model, kept, settings.micro_batch_size, pad_id)
    result = train(model, [pair.lang for pair in kept], lambda model, ids: accumulate_gradients(
        model, [kept[i] for i in ids], ref_chosen_logps[ids], ref_rejected_logps[ids], settings.beta, settings.alpha,
        settings.micro_batch_size, pad_id), settings, log_path)
    return {**result, "pairs_truncated": truncated, "pairs_prompt_too_long": len(pairs) - len(kept)}


@dataclass
class TokenizedPair:
    prompt_length: int  # chat-formatted prompt tokens that start both sequences; masked out of the loss
    chosen_input_ids: list[int]  # prompt + chosen answer + end-of-turn
    rejected_input_ids: list[int]  # prompt + rejected answer + end-of-turn
    lang: str
    truncated: bool  # an answer was cut to fit max_len (and lost its end-of-turn)


def tokenize_pair(tokenizer, pair: dict, system_prompt: str, end_of_turn: int, max_len: int) -> TokenizedPair | None:
    """Prompt ids + answer ids + end-of-turn, each part tokenised apart: tokenising the joined text could merge
    tokens across the boundary (a known DPO trap). Answers are cut to fit max_len, the prompt never (it holds
    BOS and the chat header). None if the prompt alone fills max_len."""
    prompt_ids = chat_prompt_ids(tokenizer, pair["prompt"], system_prompt)
    room = max_len - len(prompt_ids)
    if room < 1:
        return None
    chosen, rejected = (tokenizer(pair[side], add_special_tokens=False).input_ids + [end_of_turn]
                        for side in ("chosen", "rejected"))
    return TokenizedPair(len(prompt_ids), prompt_ids + chosen[:room], prompt_ids + rejected[:room], pair["lang"],
                         truncated=max(len(chosen), len(rejected)) > room)


@torch.no_grad()
def reference_logps(model, pairs: list[TokenizedPair], micro_batch_size: int, pad_id: int):
    """log ref(y|x) of every pair's chosen and rejected answer, (N,) each, computed once with M_{t-1}
    before any update: no second model in memory."""
    starts = range(0, len(pairs), micro_batch_size)
    logps = {}
    for start in tqdm(starts[RANK::WORLD], desc="reference log-probs", leave=False):  # many GPUs: a share each
        chosen, rejected, _ = chosen_rejected_logps(model, pairs[start:start + micro_batch_size], pad_id)
        logps[start] = (chosen.cpu(), rejected.cpu())
    logps = {start: both for share in gathered(logps) for start, both in share.items()}
    return torch.cat([logps[start][0] for start in starts]), torch.cat([logps[start][1] for start in starts])


def accumulate_gradients(model, pairs: list[TokenizedPair], ref_chosen_logps, ref_rejected_logps,
                         beta: float, alpha: float, micro_batch_size: int, pad_id: int) -> dict:
    """One optimizer step's forward and backward: log-probs, loss, backward, micro-batch by micro-batch. Each
    micro-batch's mean loss is weighted by its share of the step's pairs: the gradient is the mean over the
    step's pairs however they are split. Returns the step's per-pair metrics (N,) and token counts."""
    micro_batches = length_grouped([max(len(p.chosen_input_ids), len(p.rejected_input_ids)) for p in pairs],
                                   micro_batch_size)
    metrics = []
    for micro, factor in this_process_share(micro_batches):  # on one process: every micro-batch, factor 1
        chosen, rejected, chosen_lengths = chosen_rejected_logps(model, [pairs[i] for i in micro], pad_id)
        loss, micro_metrics = dpo_nll_loss(chosen, rejected, ref_chosen_logps[micro].to(model.device),
                                           ref_rejected_logps[micro].to(model.device), chosen_lengths, beta, alpha)
        (loss * len(micro) / len(pairs) * factor).backward()
        tokens = [len(pairs[i].chosen_input_ids) + len(pairs[i].rejected_input_ids) for i in micro]
        metrics += [(micro, {**micro_metrics, "tokens": torch.tensor(tokens)})] if factor else []
    return in_step_order(metrics)


def chosen_rejected_logps(model, pairs: list[TokenizedPair], pad_id: int):
    """One forward over [chosen_1..B, rejected_1..B] -> chosen logps, rejected logps, chosen lengths (B,)."""
    sequences = ([(p.chosen_input_ids, p.prompt_length) for p in pairs]
                 + [(p.rejected_input_ids, p.prompt_length) for p in pairs])
    input_ids, attention_mask, labels = (t.to(model.device) for t in collate(sequences, pad_id))
    logps, lengths = chunked_sequence_logps(model, input_ids, attention_mask, labels)
    return logps[:len(pairs)], logps[len(pairs):], lengths[:len(pairs)]


def collate(sequences: list[tuple[list[int], int]], pad_id: int):
    """(ids, prompt_length) pairs -> right-padded input_ids, attention_mask and labels (B, T);
    labels are -100 on prompt and padding, so only answer tokens reach the loss."""
    padded = functools.partial(torch.nn.utils.rnn.pad_sequence, batch_first=True)
    return (padded([torch.tensor(ids) for ids, _ in sequences], padding_value=pad_id),
            padded([torch.ones(len(ids), dtype=torch.long) for ids, _ in sequences]),
            padded([torch.tensor([-100] * prompt_length + ids[prompt_length:]) for ids, prompt_length in sequences],
                   padding_value=-100))


def sequence_logps(model, input_ids, attention_mask, labels):
    """Sum of log pi(token) over each sequence's answer tokens, and their count: (B,), (B,). The plain
    version, to read; training uses chunked_sequence_logps: the same numbers (test_lidr.py checks) without
    these (B, T, V) float32 logits, 4.2 GB for one 2 x 2,048-token pair over Llama-3's vocabulary."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]  # the token each position predicts; -100 on prompt and padding
    mask = targets != -100
    token_logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


LOGPS_CHUNK_TOKENS = 1024  # answer tokens whose float32 logits exist at once (2.1 GB of backward, 128k-token vocab)


def chunked_sequence_logps(model, input_ids, attention_mask, labels):
    """sequence_logps in less memory: logits at answer positions only, a chunk at a time, recomputed in backward."""
    # The model's own forward (where FSDP gathers a sharded model's weights), keeping one position's logits.
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1,
                   output_hidden_states=True).hidden_states[-1]
    targets = labels[:, 1:]
    mask = targets != -100
    answer_hidden, answer_targets = hidden[:, :-1][mask], targets[mask]  # (N, H), (N,) over all answer tokens
    output_layer = model.get_output_embeddings()
    token_logps = torch.cat([
        torch.utils.checkpoint.checkpoint(answer_token_logps, output_layer, h, t, use_reentrant=False)
        for h, t in zip(answer_hidden.split(LOGPS_CHUNK_TOKENS), answer_targets.split(LOGPS_CHUNK_TOKENS))])
    sequence_of_token = mask.nonzero()[:, 0]  # (N,): which sequence each answer token belongs to
    # Summed in float64: a float32 running sum over a 4,000-token answer was 0.03 nat off, and DPO's
    # margin is a difference of such sums.
    logps = torch.zeros(len(input_ids), dtype=torch.float64, device=token_logps.device)
    return logps.index_add(0, sequence_of_token, token_logps.double()).float(), mask.sum(-1)


def answer_token_logps(output_layer, hidden, targets):
    """log pi(target) for a chunk of answer positions: hidden (n, H), targets (n,) -> (n,)."""
    logits = output_layer(hidden).float()  # (n, V), float32: bf16 log-softmax loses precision
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


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


def train(model, example_langs: list[str], accumulate, settings: Settings, log_path: Path) -> dict:
    """The optimizer loop of every training here (DPO + NLL, QAlign's SFT, the toy M0): --batch-size examples
    a step, in a seeded shuffled order; accumulate(model, example indices) runs their forward and backward;
    then clip, step, schedule, log. Returns the last epoch's metrics, averaged, and per language."""
    whole, model = model, fully_sharded(model) if WORLD > 1 else model  # many GPUs: train a sharded copy
    options = dict(lr=settings.lr, betas=(0.9, settings.adam_beta2), weight_decay=settings.weight_decay)
    if model.dtype == torch.bfloat16:  # one GPU: bf16 weights (many GPUs train float32 shards)
        optimizer = BF16AdamW(model.parameters(), **options)
    else:  # fused: one kernel per tensor, no float32 temporaries
        optimizer = torch.optim.AdamW(model.parameters(), fused=True, **options)
    generator = torch.Generator().manual_seed(settings.seed)
    steps = [(epoch, step_ids) for epoch in range(settings.epochs)
             for step_ids in torch.randperm(len(example_langs), generator=generator).split(settings.batch_size)]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(len(steps), settings.warmup_ratio))
    if settings.gradient_checkpointing == "on":  # transformers 5; gradient_checkpointing_enable before
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # HF checkpoints layers only in train mode; dropout was switched off in load_model
    tqdm.write(f"training on {len(example_langs)} examples: {settings.epochs} epoch(s) of "
               f"{len(steps) // settings.epochs} steps, {settings.batch_size} per step in micro-batches of "
               f"{settings.micro_batch_size}")
    last_epoch, last_epoch_langs, tokens_trained, start_time = [], [], 0, time.perf_counter()
    partial_log = temp_path(log_path)  # renamed into place when training ends
    with written_whole(partial_log, log_path), open(partial_log if RANK == 0 else os.devnull, "w") as log:
        for step, (epoch, step_ids) in enumerate(bar := tqdm(steps, desc="training", unit="step"), 1):
            metrics = accumulate(model, step_ids.tolist())  # forward and backward, micro-batch by micro-batch
            tokens_trained += metrics.pop("tokens").sum().item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if WORLD > 1 else grad_norm  # over all the shards
            line = {"step": step, "epoch": epoch + 1, **{k: v.mean().item() for k, v in metrics.items()},
                    "optim/lr": schedule.get_last_lr()[0], "optim/grad_norm": grad_norm.item()}
            stop_if_diverged(line, settings)  # before one step makes every weight NaN
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            log.write(to_json(line) + "\n")
            log.flush()
            bar.set_postfix_str(" ".join(f"{label} {line[name]:.3f}" for name, label in (
                ("loss/total", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"),
                ("loss/nll", "nll")) if name in line))
            if epoch == settings.epochs - 1:
                last_epoch.append(metrics)
                last_epoch_langs += [example_langs[i] for i in step_ids]
    if RANK == 0:  # many GPUs: rank 0 writes the run folder
        os.replace(partial_log, log_path)
    seconds = time.perf_counter() - start_time
    tqdm.write(f"training: {tokens_trained} tokens in {seconds:.1f} s, {tokens_trained / max(seconds, 1e-9):.0f} "
               f"tokens/s; {log_path}")
    model.eval()
    if settings.gradient_checkpointing == "on":
        model.activation_checkpointing_disable()
    if WORLD > 1:  # many GPUs: the trained shards back into every process's whole model
        copy_shards_back(model, whole)
        del model
        gc.collect()  # FSDP's copy holds reference cycles: free its shards now, not at some later collection
    return {"steps": len(steps), **means_per_language(last_epoch, last_epoch_langs)}


# ------------------------------------------------------------------------ run
def run(settings: Settings, command: list[str]):
    """A whole run into the run folder: M0 -> M1 -> ... (or QAlign's two stages), evaluating M0 and every
    M_t with --eval. A folder with finished work goes on where it stopped (resume_point)."""
    languages = parse_languages(settings.langs)
    langs = list(languages)
    all_prompts = load_prompts(settings.prompts, settings.prompt_field, languages, settings.translation_tasks)
    problems = eval_problems(settings)  # read before anything runs: bad input fails early
    settings = resolve(settings)
    out = Path(settings.out)
    start, start_model = resume_point(out, settings)
    # open_run checks, loads the model, locks (for as long as run_folder_lock lives) and records the folder
    model, tokenizer, run_folder_lock = open_run(out, settings, command, start_model, all_prompts, problems)
    history, evaluations = [], []
    if problems:  # iter_0 holds M0's evaluation
        evaluations.append(evaluate_once(model, tokenizer, problems, settings, out, 0, in_memory=start == 1))
        print(eval_table(evaluations, model_names(settings.method, 1), langs[0]))
    for t in range(1, settings.iters + 1):
        folder = out / f"iter_{t}"
        folder.mkdir(exist_ok=True)
        if t < start:  # finished before: M_t is saved, and its metrics are in its folder
            if not finished(folder / "metrics.json"):
                raise LidrError(f"{folder / 'metrics.json'} is missing; move {folder / 'model'} away to redo it")
            tqdm.write(f"reusing {folder}")
            history.append(read_json(folder / "metrics.json"))
        elif settings.method == "qalign":  # both stages on the prompts of LIDR's first iteration
            print(f"== QAlign stage {t} ({['question', 'response'][t - 1]} alignment): M{t - 1} -> M{t}")
            history.append(qalign_stage(t, model, tokenizer, prompts_for_iteration(
                all_prompts, 1, settings.num_prompts), languages, settings, folder))
        else:
            print(f"== iteration {t}: M{t - 1} -> M{t}")
            history.append(lidr_iteration(model, tokenizer, prompts_for_iteration(
                all_prompts, t, settings.num_prompts), languages, settings, folder))
        if t >= start:
            write_atomic(folder / "metrics.json", to_json(history[-1], indent=2), proof=True)
            save_model(model, tokenizer, folder / "model")  # M_t: the model of iteration t + 1
            if RANK == 0:  # only there if an earlier M_t was deleted: stale
                (folder / "eval.json").unlink(missing_ok=True)
            if WORLD > 1:  # many GPUs: before any process looks for it
                dist.barrier()
        if problems:  # the model in memory is M_t from t = start - 1 on
            evaluations.append(evaluate_once(model, tokenizer, problems, settings, out, t, in_memory=t >= start - 1))
        if t >= start:
            print(run_tables(history, evaluations, langs, settings))
    tables = run_tables(history, evaluations, langs, settings)
    write_atomic(out / "summary.txt", tables + "\n")
    if start > settings.iters:  # nothing left to run: the tables were not printed
        print(tables)
    print(f"final model: {out / f'iter_{settings.iters}' / 'model'}")


# ======================================================================== PLUMBING
# What a first reading can skip: the command line, checking settings and inputs, reading files, the
# authors' pair rule, loading models, generation batches, many GPUs, memory, the run folder, tables.


# ------------------------------------------------------------------------ the command line
class LidrError(Exception):
    """Bad input: main() prints it as one line and exits with code 2, without a traceback."""
    exit_code = 2


class RunFault(LidrError):
    """A fault during the run (training diverged): one line, exit code 1; nothing of it is saved."""
    exit_code = 1


class Terminated(Exception):
    """SIGTERM (a job scheduler's stop), raised where the run is, as Ctrl-C raises KeyboardInterrupt."""


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, then run. Bad input and faults end in one line and an exit code, never a traceback."""
    command = sys.argv if argv is None else ["lidr.py", *argv]
    settings, on_sigterm = None, signal.signal(signal.SIGTERM, raise_terminated)
    try:
        settings = parse_settings(command[1:])
        if WORLD > 1:  # many GPUs: a process group, a GPU each; no 10-minute timeout: one may wait hours for the others
            if torch.cuda.is_available():
                torch.cuda.set_device(LOCAL_RANK)
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(days=7))
            if RANK:  # rank 0 alone prints the run's output
                sys.stdout = open(os.devnull, "w")
                tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)
                transformers.utils.logging.disable_progress_bar()
        run(settings, command)
    except (KeyboardInterrupt, Terminated) as interrupt:  # every finished stage is already on disk, whole
        if RANK == 0:
            out = settings and Path(resolve(settings).out)
            kept = f"what finished is kept in {out}" if out and (out / "settings.json").exists() else "nothing finished"
            print(f"lidr: interrupted; {kept}; to resume, run the same command: python {shlex.join(command)}",
                  file=sys.stderr)
        return 143 if isinstance(interrupt, Terminated) else 130
    except (LidrError, OSError) as error:  # anything else is a bug: its traceback
        if RANK == 0:  # an OSError: a full disk, a folder that became read-only, during the run
            print(f"lidr: error: {error}" if isinstance(error, LidrError) else
                  f"lidr: error: {error.strerror or error}: {error.filename or 'a file of the run'}", file=sys.stderr)
        return getattr(error, "exit_code", 1)
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def raise_terminated(signum, frame):
    raise Terminated


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise LidrError(message)


def parse_settings(argv: list[str]) -> Settings:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[1])
    for f in dataclasses.fields(Settings):
        presets = "".join(f"; {name}: {values[f.name]}" for name, values in (
            ("toy", TOY_DEFAULTS), ("qalign", QALIGN_DEFAULTS)) if f.name in values)
        parser.add_argument("--" + f.name.replace("_", "-"), type=f.type, choices=CHOICES.get(f.name),
                            default=argparse.SUPPRESS, help=f"{f.metadata['help']} [default: {f.default!r}{presets}]")
    given = vars(parser.parse_args(argv))  # only the flags on the command line (SUPPRESS)
    if empty := next((name for name, value in given.items() if isinstance(value, list)), None):  # "--iters=--"
        raise LidrError(f"--{empty.replace('_', '-')}: expected a value, got '--'")
    if given.get("model", "auto") == "auto":  # resolved (and said) here: it decides the toy defaults
        gpu = given.get("device") != "cpu" and torch.cuda.is_available()
        given["model"] = PAPER_MODEL if gpu else "toy"
        print(f"--model auto: {'a CUDA GPU is visible' if gpu else 'no CUDA GPU (or --device cpu)'}, so "
              + (f"the paper's model {PAPER_MODEL}; --model toy runs the toy world" if gpu else
                 f"the toy world (README: The toy world); --model {PAPER_MODEL} runs the paper's model"))
    toy, qalign = given["model"] == "toy", given.get("method") == "qalign"
    # in this order: QAlign's SFT settings, then the toy's, which keep QAlign's epochs and warmup
    settings = Settings(**{**(QALIGN_DEFAULTS if qalign else {}), **(TOY_DEFAULTS if toy else {}),
                           **(QALIGN_TOY_DEFAULTS if qalign and toy else {}), **given})
    for name in ("langs", "eval_langs", "eval"):  # "en, de" and "en,de" are one setting
        setattr(settings, name, ",".join(item.strip() for item in getattr(settings, name).split(",")))
    if "micro_batch_size" not in given:  # a default must never clash with the user's --batch-size
        settings.micro_batch_size = min(settings.micro_batch_size, settings.batch_size)
    check_settings(settings)
    no_effect = {name: "with --method qalign" for name in ("beta", "alpha", "recipe", "translation_tasks") if qalign}
    no_effect |= {name: "without --eval" for name in ("eval_langs", "eval_limit", "eval_max_new_tokens",
                                                      "eval_prompt_template") if not settings.eval}
    no_effect |= {name: f"without --eval {name}" for name in ("mgsm", "alpaca") if name not in settings.eval.split(",")}
    if name := min(no_effect.keys() & given.keys(), default=None):  # a flag must never be silently ignored
        raise LidrError(f"--{name.replace('_', '-')} has no effect {no_effect[name]}")
    if qalign and given.get("iters", 2) != 2:
        raise LidrError("--iters has no effect with --method qalign (its 2 stages are its iterations)")
    return settings


def check_settings(settings: Settings):
    value = functools.partial(getattr, settings)
    rules = {name: (value(name) >= 1, ">= 1") for name in (
        "num_prompts", "max_new_tokens", "translation_max_new_tokens", "epochs", "batch_size", "eval_max_new_tokens")}
    rules |= {name: (value(name) >= 0, ">= 0") for name in ("gen_batch_size", "alpha", "weight_decay", "eval_limit")}
    rules |= {name: (value(name) > 0, "> 0") for name in ("beta", "lr", "max_grad_norm")}
    rules |= {"iters": (1 <= settings.iters <= 1000, "between 1 and 1000"),
              "seed": (0 <= settings.seed < 2**32, "between 0 and 2**32 - 1"),  # numpy's, which transformers sets
              "repetition_penalty": (settings.repetition_penalty >= 0.01, ">= 0.01"),
              "temperature": (settings.temperature == 0 or settings.temperature >= 0.01, "0 (greedy) or >= 0.01"),
              "micro_batch_size": (1 <= settings.micro_batch_size <= settings.batch_size, "between 1 and --batch-size"),
              "max_len": (settings.max_len >= 8, ">= 8"),
              "warmup_ratio": (0 <= settings.warmup_ratio < 1, "in [0, 1)"),
              "adam_beta2": (0 <= settings.adam_beta2 < 1, "in [0, 1)"),
              "eval": (set(filter(None, settings.eval.split(","))) <= set(BENCHMARKS),
                       "a comma-separated list of " + ", ".join(BENCHMARKS))}
    rules |= {f.name: (False, "a finite number") for f in dataclasses.fields(Settings)  # float() reads inf and nan
              if f.type is float and not math.isfinite(value(f.name))}
    for name, (holds, expected) in rules.items():
        if not holds:
            raise LidrError(f"--{name.replace('_', '-')} must be {expected} (got {value(name)})")
    if settings.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", settings.device):
        raise LidrError(f"--device {settings.device}: use auto, cpu, cuda or cuda:N")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise LidrError(f"--device {settings.device}: no CUDA GPU is visible; use --device cpu")
    if WORLD > 1 and settings.device != "auto":
        raise LidrError("many processes take a GPU each: leave --device at auto")
    for name in TEMPLATES:
        template(settings, name)  # a template that can't be read or filled fails here, before any work
    if settings.model == "toy":
        check_toy_languages(parse_languages(settings.langs), "--model toy")
    if len(parse_languages(settings.langs)) < 2:
        raise LidrError(f"--langs needs at least two languages, dominant first (got '{settings.langs}')")
    if settings.eval_langs:
        parse_languages(settings.eval_langs, flag="--eval-langs")
    out = Path(settings.out).absolute()  # a path the file system cannot hold: bad input, not a fault mid-run
    nearest = next(folder for folder in out.parents if os.path.isdir(folder))
    if settings.out and (len(os.fsencode(out)) + 64 > os.pathconf(nearest, "PC_PATH_MAX") or any(
            len(os.fsencode(name)) > os.pathconf(nearest, "PC_NAME_MAX") for name in out.relative_to(nearest).parts)):
        raise LidrError(f"--out {settings.out}: a name or the path is longer than the file system allows")


LANGUAGE_NAMES = dict(item.split(":") for item in (
    "en:English es:Spanish ru:Russian de:German fr:French zh:Chinese ja:Japanese th:Thai sw:Swahili bn:Bengali "
    "it:Italian pt:Portuguese ar:Arabic ko:Korean hi:Hindi tr:Turkish vi:Vietnamese nl:Dutch pl:Polish "
    "uk:Ukrainian te:Telugu id:Indonesian").split())


def parse_languages(spec: str, flag: str = "--langs") -> dict[str, str]:
    """'en,de,xx:Klingon' -> {'en': 'English', 'de': 'German', 'xx': 'Klingon'}, dominant first."""
    languages = {}
    for item in spec.split(","):
        code, _, name = item.strip().partition(":")
        if not name and code not in LANGUAGE_NAMES:
            raise LidrError(f"{flag}: unknown language code '{code}'; known: "
                            f"{','.join(LANGUAGE_NAMES)}; write '{code}:Name' for others")
        if code in languages:
            raise LidrError(f"{flag}: '{code}' is listed twice")
        languages[code] = name or LANGUAGE_NAMES[code]
    return languages


def resolve(settings: Settings) -> Settings:
    """Fill in the 'auto' settings, so the run folder records what actually ran."""
    device = settings.device if settings.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    device = f"cuda:{LOCAL_RANK}" if WORLD > 1 and device == "cuda" else device  # many GPUs: one each
    gpu = device.startswith("cuda")
    method = "-qalign" if settings.method == "qalign" else ""  # beside the LIDR run, with the same M0
    codes = "-".join(parse_languages(settings.langs))
    return dataclasses.replace(
        settings, device=device, dtype=settings.dtype.replace("auto", "bfloat16" if gpu else "float32"),
        gradient_checkpointing=settings.gradient_checkpointing.replace("auto", "on" if gpu else "off"),
        out=settings.out or f"runs/{Path(settings.model).name}-{codes}-seed{settings.seed}{method}")


def stop_if_diverged(line: dict, settings: Settings):
    """A non-finite loss or gradient would make every weight NaN: stop before the step (line: its metrics)."""
    loss, grad_norm = line.get("loss/total", line.get("loss/nll")), line["optim/grad_norm"]  # DPO + NLL, or SFT's NLL
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise RunFault(f"training diverged at step {line['step']}: loss {loss}, gradient norm {grad_norm}; nothing of "
                       f"this training was saved: lower --lr (now {settings.lr}) and run again with another --out")


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ------------------------------------------------------------------------ file readers
def load_prompts(source: str, prompt_field: str, languages: dict[str, str], translation_tasks: str = "",
                 flag: str = "--prompts") -> list[dict]:
    """Step 1's prompts, as records {"id": "p1", "translation_task": false, "en": "...", "de": "..."}; the
    languages a record lacks are left out, for the model to translate."""
    langs = list(languages)
    language_names = sorted(set(LANGUAGE_NAMES.values()) | set(languages.values()))
    if source == "toy":
        check_toy_languages(languages, "--prompts toy")
        records, where = toy_prompts(), "toy prompts"
    elif source == "capitals":  # the questions a language lacks are translated by the model
        records, where = capital_prompts(), "capital questions"
    elif source.endswith((".json", ".jsonl")) or os.path.isfile(source):
        records, where = read_prompt_file(Path(source), flag), source
    elif "," in source or any(Path(source, f"{lang}.jsonl").is_file() for lang in langs):
        records, where = read_language_folders(source.split(","), prompt_field, langs, flag), source
    else:
        records, where = read_prompt_dataset(source, prompt_field, langs, flag), source
    # translation_task: the record's own, else whether --translation-tasks lists its id, else the pattern's guess
    listed = read_prompt_file(Path(translation_tasks), "--translation-tasks") if translation_tasks else []
    if not all(isinstance(record, dict) and "id" in record for record in listed):
        raise LidrError(f"{translation_tasks}: expected records with an 'id'")
    hand_listed = {str(record["id"]) for record in listed}  # their answers: unread
    prompts = {}  # id -> record
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise LidrError(f"{where}: record {number}: expected a JSON object per prompt")
        line = record.get("_line", number)  # a .jsonl file's own line number, for error messages
        where = record.get("_where", where)  # the file of a per-language folder's record
        prompt_id = str(record.get("id", f"p{number}"))
        if prompt_id in prompts:
            raise LidrError(f"{where}:{line}: id '{prompt_id}' appears twice")
        if not isinstance(record.get("translation_task", False), bool):
            raise LidrError(f"{where}:{line}: translation_task must be true or false")
        for lang in (lang for lang in langs if not isinstance(record.get(lang, ""), str)):  # never translated unasked
            raise LidrError(f"{where}:{line}: '{lang}' must be text (leave it out for the model to translate)")
        text = {lang: record[lang] for lang in langs if record.get(lang, "").strip()}
        if re.search(r"[\ud800-\udfff]", "".join(text.values())):  # JSON's \ud800 escapes: no file can hold them
            raise LidrError(f"{where}:{line}: the text is not valid Unicode (a lone surrogate)")
        if langs[0] not in text:
            raise LidrError(f"{where}:{line}: prompt '{prompt_id}' has no '{langs[0]}' text "
                            f"(the dominant language, first in --langs)")
        guess = (prompt_id in hand_listed if translation_tasks
                 else looks_like_translation_task(text[langs[0]], language_names))
        prompts[prompt_id] = {"id": prompt_id, "translation_task": record.get("translation_task", guess), **text}
    if not prompts:
        raise LidrError(f"{where}: no prompts")
    return list(prompts.values())


def looks_like_translation_task(text: str, language_names: list[str]) -> bool:
    """'Translate ... into/to/in French' within one sentence: its answer must not be translated (step 4).
    The verb only, so 'explain mRNA translation' doesn't match. For prompts that don't say."""
    names = "|".join(map(re.escape, language_names))
    unquoted_or_quoted = r"""(?:'[^'\n]*'|"[^"\n]*"|[^.?!\n'"])*"""  # a quote may hold any punctuation
    pattern = rf"\btranslat(?:e|ing)\b{unquoted_or_quoted}\b(?:into|to|in)\s+(?:{names})\b"
    return re.search(pattern, text, re.IGNORECASE) is not None


def drop_untrainable_prompts(prompts: list[dict], tokenizer, languages: dict[str, str],
                             settings: Settings) -> tuple[list[dict], dict[str, int]]:
    """Prompts that alone fill --max-len could never be trained on: left out before generation (a dominant one
    drops its record, another language's becomes None). Also returns the count per language."""
    prompt_template, dominant = template(settings, "prompt_template"), next(iter(languages))
    too_long = [{lang for lang in languages if prompt.get(lang) and settings.max_len <= len(chat_prompt_ids(
                 tokenizer, fill_template(prompt_template, prompt[lang], languages[lang]), settings.system_prompt))}
                for prompt in prompts]  # per prompt, the languages in which it alone fills --max-len
    kept = [{**prompt, **dict.fromkeys(langs)} for prompt, langs in zip(prompts, too_long) if dominant not in langs]
    too_long_per_lang = {lang: sum(lang in langs for langs in too_long) for lang in languages}
    if any(too_long_per_lang.values()):
        tqdm.write(f"warning: prompts longer than --max-len {settings.max_len} tokens, left out: "
                   + ", ".join(f"{lang} {n}" for lang, n in too_long_per_lang.items() if n))
    return kept, too_long_per_lang


def read_prompt_file(path: Path, flag: str = "--prompts") -> list[dict]:
    """A .json list of records, or a .jsonl file of one record per line (each given its "_line")."""
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise LidrError(f"{flag}: cannot read {path}: {first_line(error)}") from None
    if path.suffix == ".json":
        records = parse_json(content, path)
        if not isinstance(records, list):
            raise LidrError(f"{path}: expected a JSON list of prompt records")
        return records
    records = [(number, parse_json(line, path, number)) for number, line in enumerate(content.splitlines(), 1)
               if line.strip()]
    for number, record in records:
        if not isinstance(record, dict):
            raise LidrError(f"{path}:{number}: expected a JSON object per record")
    return [{**record, "_line": number} for number, record in records]


def parse_json(text: str, path: Path, line: int | None = None):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # RecursionError: nested thousands deep
        raise LidrError(f"{path}:{line or getattr(error, 'lineno', 1)}: not valid JSON ({first_line(error)})") from None


def read_language_folders(folders: list[str], prompt_field: str, langs: list[str], flag: str) -> list[dict]:
    """The authors' layout: per folder a <lang>.jsonl per language of records {"id", prompt_field, maybe "input"},
    joined by id. With 1,000 prompts in each folder, iteration t takes the t-th folder, as the authors did."""
    records = []
    for folder in folders:
        if not folder.strip():
            raise LidrError(f"{flag}: an empty folder name in the list '{','.join(folders)}'")
        paths = {lang: Path(folder) / f"{lang}.jsonl" for lang in langs}
        by_lang = {lang: {} for lang in langs}  # lang -> {id: (text, line)}
        for lang, path in paths.items():
            if not path.is_file():
                raise LidrError(f"{flag}: {path} not found (a folder of per-language prompt files needs one "
                                f"for each language of --langs)")
            for record in read_prompt_file(path, flag):
                line, text, extra = record["_line"], record.get(prompt_field), record.get("input") or ""
                if "id" not in record or str(record["id"]) in by_lang[lang]:
                    raise LidrError(f"{path}:{line}: each record needs an id of its own (records are joined by id)")
                if not isinstance(text, str) or not text.strip() or not isinstance(extra, str):
                    raise LidrError(f"{path}:{line}: '{prompt_field}' (and 'input', if any) must be text")
                # a non-empty input follows its instruction after a newline, as the scripts join them
                by_lang[lang][str(record["id"])] = (text + "\n" + extra if extra else text, line)
        if any(ids.keys() != by_lang[langs[0]].keys() for ids in by_lang.values()):  # GSM8K: degsm8k_0 ~ gsm8k_0
            coded = {lang for lang, ids in by_lang.items() if all(prompt_id.startswith(lang) for prompt_id in ids)}
            by_lang = {lang: {(prompt_id.removeprefix(lang) if lang in coded else prompt_id): value
                              for prompt_id, value in ids.items()} for lang, ids in by_lang.items()}
        dominant = by_lang[langs[0]].keys()
        for lang in langs[1:]:
            missing, extra = dominant - by_lang[lang].keys(), by_lang[lang].keys() - dominant
            if missing or extra:
                raise LidrError(f"{flag}: the ids of {paths[lang]} don't match those of {paths[langs[0]]} "
                                f"({len(missing)} missing, {len(extra)} extra; e.g. '{sorted(missing or extra)[0]}')")
        records += [{"id": prompt_id, "_line": line, "_where": str(paths[langs[0]]),
                     **{lang: by_lang[lang][prompt_id][0] for lang in langs}}
                    for prompt_id, (_, line) in by_lang[langs[0]].items()]
    return records


def read_prompt_dataset(name: str, prompt_field: str, langs: list[str], flag: str) -> list[dict]:
    """A hub dataset (or a local one): prompt_field holds the dominant prompt, columns named by code the others."""
    if Path(name).exists():  # a local folder reads in moments: no progress bars printed before a possible error
        datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(name, split="train")
    except Exception as error:
        raise LidrError(f"{flag}: could not load file or dataset '{name}': {first_line(error)}") from None
    if prompt_field not in table.column_names:
        raise LidrError(f"{flag}: dataset '{name}' has no column '{prompt_field}' "
                        f"(columns: {', '.join(table.column_names)})")
    records = []
    for index, row in enumerate(table):
        text, extra = row[prompt_field], row.get("input") or ""
        if not isinstance(text, str) or not isinstance(extra, str):
            raise LidrError(f"{flag}: dataset '{name}', row {index}: '{prompt_field}' (and 'input') must be text")
        # Alpaca keeps a task's input in its own column; the scripts join it so
        records.append({"id": str(row.get("id", index)), **{lang: row[lang] for lang in langs[1:] if row.get(lang)},
                        langs[0]: text + "\n" + extra if extra else text})
    return records


# Prompt wordings a run can take from a file: flag -> (the constant read from a .py file, the
# placeholder the template must hold, every placeholder it may hold).
TEMPLATES = {"prompt_template": ("PROMPT_PREFIX", "question", {"question", "language"}),
             "eval_prompt_template": ("PROMPT_PREFIX", "question", {"question", "language"}),
             "translation_request": ("TRANS_INSTRUCTION", "text", {"text", "lang", "source", "target"})}


def template(settings: Settings, name: str) -> str:
    """The template the flag `name` points to, '' if none. From a .py file (the authors' utils/inference.py,
    utils/trans_prompts.py) its string constant, read as a literal: nothing in the file runs."""
    path = getattr(settings, name)
    if not path:
        return ""
    constant, required, placeholders = TEMPLATES[name]
    where = f"--{name.replace('_', '-')} {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
        tree = ast.parse(text) if path.endswith(".py") else None
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise LidrError(f"{where}: cannot read it: {first_line(error)}") from None
    if tree:
        values = [node.value for node in tree.body if isinstance(node, ast.Assign)
                  and any(isinstance(target, ast.Name) and target.id == constant for target in node.targets)]
        text = values[0].value if len(values) == 1 and isinstance(values[0], ast.Constant) else None
        if not isinstance(text, str):
            raise LidrError(f"{where}: expected one plain {constant} = '...' string in it")
    allowed = ", ".join(f"{{{field}}}" for field in sorted(placeholders))
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
        text.format(**dict.fromkeys(placeholders, "text"))  # fails on any other field
    except (ValueError, KeyError, IndexError) as error:
        raise LidrError(f"{where}: the template can hold only {allowed} ({type(error).__name__}: {error}); "
                        f"write a brace that is no placeholder twice") from None
    if required not in fields:
        raise LidrError(f"{where}: the template has no {{{required}}}")
    if name == "translation_request" and not fields & {"lang", "target"}:
        raise LidrError(f"{where}: the request must name the target language, with {{lang}} or {{target}}")
    return text


# ------------------------------------------------------------------------ the authors' pair rule (--recipe scripts)
def scripts_pairs(prompts: list[dict], responses: list[dict], translations: list[dict],
                  langs: list[str]) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """build_pairs as the authors' utils/preprocess_dpo_format_dataset.py builds them: unfinished, empty,
    identical and wrong-language answers are paired; either translation failing drops both pairs; and only
    the English pairs against the last language are kept (each language's English file overwrote the last)."""
    translated = {(t["id"], t["source_lang"], t["target_lang"]): t["translation"] for t in translations}
    counts = {lang: dict.fromkeys(SKIP_REASONS, 0) for lang in langs}
    pairs = []
    for prompt, own, weak, why_not in compared_answers(prompts, responses, langs):  # unfinished, empty: paired
        english, lang = own["lang"], weak["lang"]
        kept_english = lang == langs[-1]  # the English pairs of the scripts' last file write
        back, forward = translated.get((prompt["id"], lang, english)), translated.get((prompt["id"], english, lang))
        if why_not == "no_prompt" or back is None or forward is None:
            reason = why_not if why_not == "no_prompt" else "translation_failed"
            counts[english][reason if kept_english or reason == "no_prompt" else "overwritten"] += 1
            counts[lang][reason] += 1
            continue
        counts[english]["pairs" if kept_english else "overwritten"] += 1
        counts[lang]["pairs"] += 1
        kept = [(own, "own>translated", lang, own["response"], back)] if kept_english else []
        task = prompt["translation_task"]  # its weaker pair keeps the English answer as written
        kept.append((weak, "untranslated>own" if task else "translated>own", english,
                     own["response"] if task else forward, weak["response"]))
        pairs += [{"prompt": answer["prompt"], "chosen": chosen, "rejected": rejected, "id": answer["id"],
                   "lang": answer["lang"], "kind": kind, "other_lang": other_lang}
                  for answer, kind, other_lang, chosen, rejected in kept]
    return pairs, counts


# ------------------------------------------------------------------------ model loading
def load_model(name: str, device: str, dtype: str, system_prompt: str):
    torch_dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    except Exception as error:
        raise LidrError(f"could not load model '{name}' ({first_line(error)}); offline or without hub access, "
                        f"try --model toy") from None
    if any(getattr(model.config, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        raise LidrError(f"model '{name}' transforms its logits after the output layer; "
                        f"lidr's chunked log-probs (chunked_sequence_logps) assume it does not")
    if not tokenizer.chat_template:
        raise LidrError(f"model '{name}' has no chat template: LIDR needs an instruction-tuned chat model")
    if system_prompt:
        try:
            chat_prompt_ids(tokenizer, "hi", system_prompt)
        except Exception as error:  # Gemma's template, for one, raises on a system turn
            raise LidrError(f"the chat template of '{name}' rejects a system turn ({first_line(error)}); "
                            f"pass --system-prompt ''") from None
    # No dropout, in training too: the policy must equal the reference at the first step (the DPO
    # loss starts at ln 2, to rounding), and the reference log-probs are taken without dropout.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # HF attention applies it in train mode
            module.attention_dropout = 0.0
    return model.to(device=device, dtype=torch_dtype).eval(), tokenizer


def model_shape(name: str):
    """(config, parameter count) without loading the weights: built on the meta device, which allocates nothing."""
    try:
        config = toy_config(toy_tokenizer()) if name == "toy" else AutoConfig.from_pretrained(name)
    except Exception as error:
        raise LidrError(f"could not load model '{name}' ({first_line(error)}); offline, try --model toy") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # no causal LM for the config (T5), or sizes no model can have
        raise LidrError(f"model '{name}': its config makes no causal language model ({first_line(error)})") from None
    return config, sum(p.numel() for p in model.parameters())


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn (Llama-3: <|eot_id|>, Qwen: <|im_end|>): the first one after
    a marker answer in a rendered conversation. Training answers end with it; generation stops at it."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "LIDR-MARKER"}], tokenize=False)
    after_answer = tokenizer(text.split("LIDR-MARKER", 1)[1], add_special_tokens=False).input_ids
    closing = [i for i in after_answer if tokenizer.decode([i]).strip()]
    return closing[0] if closing else tokenizer.eos_token_id


# ------------------------------------------------------------------------ generation batches
def padded_batches(model, prompts: list[list[int]], config: GenerationConfig, max_batch_size: int,
                   desc: str) -> list[list[int]]:
    """Each prompt's new tokens, by HF generate on left-padded batches of similar-length prompts whose KV
    cache and prefill fit in free memory. The bar counts tokens at the cap: from the start, the longest time left."""
    budget = min(gathered(device_memory(model.device, free=True))) * 3 // 4  # a quarter left for fragmentation
    fits = lambda sequences, prompt_len: generation_memory(
        model.config, model.dtype.itemsize, sequences, prompt_len, config.max_new_tokens) <= budget
    batches = generation_batches([len(p) for p in prompts], max_batch_size, fits)
    mine = range(RANK, len(batches), WORLD)  # many GPUs: each process generates every WORLD-th batch
    seed = torch.randint(2**62, ()).item()  # a seed per batch: sampled the same on one process or many
    outputs = {}
    bar = tqdm(total=sum(len(batches[b]) for b in mine) * config.max_new_tokens, unit="tok", unit_scale=True,
               leave=False, desc=f"{desc} ({len(mine)} batches, tokens at the cap)")
    for index in mine:
        torch.manual_seed(seed + index)
        batch, steps = batches[index], []
        step_progress = lambda input_ids, scores: steps.append(bar.update(len(batch))) or scores  # a logits processor
        width = max(len(prompts[i]) for i in batch)
        # Left-pad each row with its own first token: the repetition penalty counts every input id, so a shared
        # pad id (often EOS) would change batched greedy output, in padded rows only. The attention mask hides pads.
        input_ids = torch.tensor([[prompts[i][0]] * (width - len(prompts[i])) + prompts[i] for i in batch])
        attention_mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch])
        output = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                                generation_config=config, logits_processor=[step_progress])
        outputs.update(zip(batch, output[:, width:].tolist()))
        bar.update(len(batch) * (config.max_new_tokens - len(steps)))  # the steps a batch ending early saves
    bar.close()
    outputs = {i: new_tokens for share in gathered(outputs) for i, new_tokens in share.items()}  # every process's
    return [outputs[i] for i in range(len(prompts))]


def generation_batches(lengths: list[int], max_batch_size: int, fits) -> list[list[int]]:
    """Prompt indices in batches, shortest first (little padding), of at most max_batch_size sequences that fit."""
    batches = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):  # i is the longest in its batch so far
        if not batches or len(batches[-1]) == max_batch_size or not fits(len(batches[-1]) + 1, lengths[i]):
            batches.append([])
        batches[-1].append(i)
    return batches


def generation_memory(config, itemsize: int, sequences: int, prompt_len: int, max_new_tokens: int) -> int:
    """Bytes a batch holds at its peak beyond the weights: the KV cache at full length, and the prefill, whose 3
    MLP- and ~4 hidden-size values a prompt token (and eager attention's float32 scores) can outweigh the cache."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_cache = 2 * config.num_hidden_layers * kv_heads * head_dim * (prompt_len + max_new_tokens) * itemsize
    layer = (3 * config.intermediate_size + 4 * config.hidden_size) * itemsize
    scores = 2 * config.num_attention_heads * prompt_len * 4 if config._attn_implementation == "eager" else 0
    return sequences * (kv_cache + prompt_len * (layer + scores) + 2 * config.vocab_size * 4)


# ------------------------------------------------------------------------ micro-batches and many GPUs (torchrun)
def length_grouped(lengths: list[int], micro_batch_size: int) -> list[list[int]]:
    """One step's examples (by index) in micro-batches of similar lengths: each is padded to its longest, so
    sorting first pads less. The step's examples, and its gradient, are the same."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start:start + micro_batch_size] for start in range(0, len(order), micro_batch_size)]


def this_process_share(micro_batches: list[list[int]]) -> list[tuple[list[int], int]]:
    """The micro-batches this process runs, with its loss factor: on one, all with 1; on many, every WORLD-th with
    WORLD (FSDP averages gradients), and factor-0 repeats so that all run as many (FSDP runs in lockstep)."""
    mine = micro_batches[RANK::WORLD]
    return [(micro, WORLD) for micro in mine] + [(micro_batches[0], 0)] * (-(-len(micro_batches) // WORLD) - len(mine))


def in_step_order(metrics: list[tuple[list[int], dict]]) -> dict:
    """Per-example metrics of length-grouped micro-batches (every process's), back in the step's order."""
    metrics = [item for share in gathered([(micro, {name: value.cpu() for name, value in m.items()})
                                           for micro, m in metrics]) for item in share]
    order = torch.tensor([i for micro, _ in metrics for i in micro]).argsort()
    return {name: torch.cat([m[name] for _, m in metrics])[order] for name in metrics[0][1]}


def gathered(share) -> list:
    """Every process's share, in rank order ([share] on one process)."""
    if WORLD == 1:
        return [share]
    shares = [None] * WORLD
    dist.all_gather_object(shares, share)
    return shares


def fully_sharded(model):
    """A float32 copy of the model sharded by FSDP2 a decoder layer at a time (no whole float32 copy is made),
    then the rest. It computes in the model's dtype and reduces gradients in float32."""
    sharded, policy = copy.deepcopy(model), MixedPrecisionPolicy(param_dtype=model.dtype, reduce_dtype=torch.float32)
    for layer in sharded.base_model.layers:
        fully_shard(layer.float(), mp_policy=policy)
    for weight in sharded.parameters():  # the rest: embeddings, final norm, output layer
        if weight.dtype != torch.float32:
            weight.data = weight.data.float()
    return fully_shard(sharded, mp_policy=policy)


@torch.no_grad()
def copy_shards_back(sharded, whole):
    """The trained float32 shards into the whole model, rounded stochastically into bf16 (to nearest, DPO's small
    updates would mostly vanish). Every process keeps rank 0's rounding."""
    for weight, shard in zip(whole.parameters(), sharded.parameters()):
        trained = shard.full_tensor()
        weight.copy_(round_stochastically(trained) if weight.dtype == torch.bfloat16 else trained)
        if weight.dtype == torch.bfloat16:
            dist.broadcast(weight, 0)


# ------------------------------------------------------------------------ memory plan
def training_memory(config, n_params: int, settings: Settings, world: int = WORLD) -> dict[str, float]:
    """Bytes one training step holds, by part, as a fake-tensor simulation of an 8B step measured them. On `world`
    processes (FSDP2): the whole model, and 1/world of the float32 weights, gradients and moments."""
    width = 2 if settings.dtype == "bfloat16" else 4
    tokens = 2 * settings.micro_batch_size * settings.max_len  # chosen + rejected sequences
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    gradients, optimizer = n_params * width, 2 * n_params * width  # BF16AdamW's bf16 moments, or AdamW's float32
    step = OPTIMIZER_CHUNK * 32 if width == 2 else 0  # BF16AdamW's 5 float32 and 3 int32 values per chunk element
    # at the start of backward, their peak: each layer's input with checkpointing, else all that a layer keeps
    layer_activations = ((layers + 1) * tokens * hidden * width if settings.gradient_checkpointing == "on"
                         else layers * tokens * (8 * hidden + 6 * config.intermediate_size) * width)
    # the final norm's float32 input and copies, one log-prob chunk's backward, the output layer's gradient
    output_layer = tokens * hidden * (4 + 3 * width) + LOGPS_CHUNK_TOKENS * vocab * 16 + vocab * hidden * width
    earlier_gradients = gradients if settings.batch_size > settings.micro_batch_size else 0  # earlier micro-batches'
    if world > 1:  # float32 shards; the root's embedding and output layer stay gathered from forward to backward
        gradients, optimizer, step = 4 * n_params / world, 12 * n_params / world, 0
        output_layer, earlier_gradients = output_layer + 2 * vocab * hidden * width, gradients
    return {"weights": n_params * width, "gradients": gradients, "optimizer": optimizer, "step": step,
            "activations": layer_activations + output_layer, "earlier_gradients": earlier_gradients}


def training_peak(parts: dict[str, float]) -> float:
    """The activations are gone before the last gradient exists: the peak is the larger of those two moments."""
    return parts["weights"] + parts["optimizer"] + max(parts["gradients"] + parts["step"],
                                                       parts["activations"] + parts["earlier_gradients"])


def device_memory(device, free: bool = False) -> int:
    """Bytes of memory on the device (a name or a torch.device), or free there now."""
    if str(device).startswith("cuda"):
        if free:  # free in the driver, plus what torch's cache holds unused
            return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                    - torch.cuda.memory_allocated(device))
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES" if free else "SC_PHYS_PAGES")


def plan_training_memory(config, n_params: int, settings: Settings, available: int):
    """Print the training memory estimate; if it exceeds `available` bytes, refuse, naming flags that would fit."""
    missing = [name for name in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
                                 "num_attention_heads") if not getattr(config, name, None)]
    if missing:
        raise LidrError(f"model '{settings.model}': its config has no {', '.join(missing)}, which the memory plan "
                        f"reads (decoder configs in the Llama style have them)")
    total = lambda trial, world=WORLD: training_peak(training_memory(config, n_params, trial, world))
    parts, gb = training_memory(config, n_params, settings), 1e9
    print(f"training memory estimate ({settings.dtype}, checkpointing {settings.gradient_checkpointing}): weights "
          f"{parts['weights'] / gb:.1f} + optimizer {parts['optimizer'] / gb:.1f} + max(gradients "
          f"{parts['gradients'] / gb:.1f} + step {parts['step'] / gb:.1f}, activations {parts['activations'] / gb:.1f}"
          f" + earlier micro-batches' gradients {parts['earlier_gradients'] / gb:.1f}) = {total(settings) / gb:.1f} "
          f"GB of {available / gb:.1f} GB on {settings.device}")
    if total(settings) <= available:
        return
    changes = [("micro_batch_size", 1), ("gradient_checkpointing", "on")]
    if settings.device.startswith("cuda"):  # bf16 on a CPU is slow, and what fills its memory is activations
        changes = [("dtype", "bfloat16"), *changes[::-1]]
    trial = settings
    for name, value in changes:  # each in turn while it does not fit yet
        if total(trial) > available:
            trial = dataclasses.replace(trial, **{name: value})
    shorter = trial
    while total(shorter) > available and shorter.max_len > 256:  # then shorter sequences, if that fits
        shorter = dataclasses.replace(shorter, max_len=shorter.max_len // 2)
    trial = shorter if total(shorter) <= available else trial
    fixes = " ".join(f"--{name.replace('_', '-')} {getattr(trial, name)}" for name in [*dict(changes), "max_len"]
                     if getattr(trial, name) != getattr(settings, name))
    hint = (f"try {fixes}" if total(trial) <= available
            else f"even {fixes} would not fit: use a smaller --max-len or model")
    gpus = next((n for n in (2, 4, 8, 16, 32, 64) if total(settings, n) <= available), None)
    if total(trial) > available and gpus and gpus > WORLD:
        hint += f", or {gpus} such GPUs (torchrun --nproc-per-node {gpus} lidr.py ...)"
    elif parts["weights"] > available:
        hint += f"; many GPUs won't help: each generates with the whole model ({parts['weights'] / gb:.0f} GB)"
    raise LidrError(f"training needs about {total(settings) / gb:.0f} GB but {settings.device} has "
                    f"{available / gb:.0f} GB; {hint}")


# ------------------------------------------------------------------------ the optimizer and its schedule
def warmup_cosine(total_steps: int, warmup_ratio: float):
    """The factor on --lr at optimizer step `step` (0-based): a linear warm-up, then a cosine decay to 0."""
    warmup = round(total_steps * warmup_ratio)
    return lambda step: ((step + 1) / warmup if step < warmup
                         else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup))))


OPTIMIZER_CHUNK = 2**24  # values updated at once: the float32 temporaries of a step stay ~0.5 GB


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019) on bf16 weights and moments (8 bytes a parameter with the gradient), stepped
    in float32 a chunk at a time and rounded stochastically: to nearest, DPO's tiny updates would vanish (a trap)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in (p for p in group["params"] if p.grad is not None):
                state = self.state[param]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
                state["step"] += 1
                step_size = group["lr"] / (1 - beta1 ** state["step"])
                second_moment_correction = 1 - beta2 ** state["step"]
                tensors = (param, param.grad, state["exp_avg"], state["exp_avg_sq"])
                for weight, grad, exp_avg, exp_avg_sq in zip(*(t.view(-1).split(OPTIMIZER_CHUNK) for t in tensors)):
                    grad = grad.float()
                    new_exp_avg = exp_avg.float().lerp_(grad, 1 - beta1)
                    new_exp_avg_sq = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denominator = (new_exp_avg_sq / second_moment_correction).sqrt_().add_(group["eps"])
                    new_weight = weight.float().mul_(1 - group["lr"] * group["weight_decay"])
                    new_weight.addcdiv_(new_exp_avg, denominator, value=-step_size)
                    for target, value in ((weight, new_weight), (exp_avg, new_exp_avg), (exp_avg_sq, new_exp_avg_sq)):
                        target.copy_(round_stochastically(value) if target.dtype == torch.bfloat16 else value)


def round_stochastically(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16, up or down at random in proportion to the distance, so the expected result is x:
    bf16 is the top 16 bits of a float32, so add 16 random low bits, then drop them."""
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536 = 0xFFFF0000


# ------------------------------------------------------------------------ the run folder
# A step's file proves that the step finished: write_atomic(..., proof=True) writes it under a temp name, puts
# its sha256 in its folder's finished.json, then renames it into place. A resume reuses it only if it still matches.
def write_atomic(path: Path, content, proof: bool = False):
    """A text (or, with content(temp), a folder) written to a temp name, then renamed: never half a file."""
    if RANK:  # many GPUs: rank 0 writes the run folder
        return
    with written_whole(temp_path(path), path) as temp:
        if isinstance(content, str):
            temp.write_text(content, encoding="utf-8")
        else:
            content(temp)
        if proof:
            record = path.parent / "finished.json"
            recorded = read_json(record) if record.exists() else {}
            write_atomic(record, to_json({**recorded, path.name: digest(temp)}, indent=1))
        os.replace(temp, path)


def save_model(model, tokenizer, path: Path):
    def save(folder):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    write_atomic(path, save, proof=True)


@contextlib.contextmanager
def written_whole(temp: Path, path: Path):
    """Writing temp, path to be: on any failure (a full disk, an interrupt) temp is removed, the error names path."""
    try:
        yield temp
    except BaseException as error:
        if temp.is_dir():
            shutil.rmtree(temp)
        temp.unlink(missing_ok=True)
        raise write_error(error, path) from None


def digest(path: Path) -> str:
    """The sha256 of a file, or of a folder's files' names and sha256s."""
    if path.is_file():
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    return hashlib.sha256("".join(f"{file.relative_to(path)} {digest(file)}\n" for file in sorted(path.rglob("*"))
                                  if file.is_file()).encode()).hexdigest()


def finished(path: Path) -> bool:
    """Whether path holds a finished step's result; one line naming it if it is not what the step wrote."""
    if not path.exists():
        return False
    record = path.parent / "finished.json"
    recorded = read_json(record) if record.exists() else {}
    if not isinstance(recorded, dict) or recorded.get(path.name) != digest(path):
        raise LidrError(f"{path} is not what its finished step wrote (its sha256 in {record} differs or is "
                        f"missing: cut short, emptied or edited?); move it away to have that step redone")
    return True


def write_error(error: BaseException, path: Path) -> BaseException:
    """A failed write as an OSError naming path: the kernel's names no file, and safetensors and tokenizers
    (written in Rust) raise their own, "... (os error 28)"."""
    if getattr(error, "filename", None) or not isinstance(error, Exception):  # named already; an interrupt
        return error
    code = re.search(r"\(os error (\d+)\)", str(error))
    code = int(code.group(1)) if code else getattr(error, "errno", None)
    return OSError(code, os.strerror(code), str(path)) if code else error


def temp_path(path: Path) -> Path:
    """A temp name beside path that no other process uses; the lock holder clears leftover ones (*.tmp)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def to_json(value, **options) -> str:
    """Strict JSON (a NaN or infinity is an error, never a bare NaN that other readers reject)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, **options)


def write_jsonl(path: Path, records: list[dict], proof: bool = False):
    write_atomic(path, "".join(to_json(r) + "\n" for r in records), proof)


def read_json(path: Path, lines: bool = False):
    """A run folder's JSON (lines: a .jsonl file's records); a damaged one is one line, not a traceback."""
    try:
        text = path.read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines()] if lines else json.loads(text)
    except (OSError, ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise LidrError(f"{path} is damaged or unreadable ({first_line(error)}); move it away to have that "
                        f"stage redone") from None


def stage(path: Path, compute, settings: Settings) -> list[dict]:
    """A step's records: a finished earlier run's file, else computed from the step's own seed and written."""
    if finished(path):
        tqdm.write(f"reusing {path}")
        return read_json(path, lines=True)
    torch.manual_seed(stage_seed(settings.seed, path))
    records = compute()
    write_jsonl(path, records, proof=True)
    return records


def stage_seed(seed: int, path: Path) -> int:
    """A seed per (--seed, iteration, step), from the file's folder and name: a step redone gives the same."""
    return zlib.crc32(f"{seed}/{path.parent.name}/{path.name}".encode())


def resume_point(out: Path, settings: Settings) -> tuple[int, str]:
    """The iteration after the last saved M_t, and the model it starts from (that M_t, else --model). Within it,
    stage reuses each finished step's file; training, not a stage, is redone."""
    t = max((t for t in range(1, settings.iters + 1) if (out / f"iter_{t}" / "model").exists()), default=0)
    if t == 0:
        return 1, settings.model
    finished(out / f"iter_{t}" / "model")  # a damaged M_t is refused in one line
    return t + 1, str(out / f"iter_{t}" / "model")


def open_run(out: Path, settings: Settings, command: list[str], start_model: str, all_prompts: list[dict],
             problems: dict):
    """Everything before the first iteration, checks first so that bad input writes nothing; then the model
    loaded (the toy M0 pre-trained once if needed), the folder locked and recorded."""
    languages = parse_languages(settings.langs)
    langs = list(languages)
    plan_training_memory(*model_shape(start_model), settings, device_memory(settings.device))
    inputs_sha256 = {name: hashlib.sha256(to_json(records).encode()).hexdigest()
                     for name, records in (("prompts", all_prompts), ("evaluation problems", problems))}
    check_resumable(out, settings, inputs_sha256)
    nearest = next(folder for folder in (out, *out.parents) if folder.exists())
    try:  # before minutes of work, not after; a real file, as permissions don't tell (/proc, a full disk)
        tempfile.TemporaryFile(dir=nearest).close()
    except OSError as error:
        raise LidrError(f"--out {out}: cannot write into {nearest} ({error.strerror or error})") from None
    # the toy world's M0, pre-trained once and kept next to the run folders (not when resuming from M_t)
    if start_model == "toy" and WORLD > 1 and not (toy_model_folder(out.parent, settings.seed, langs)
                                                   / "toy_recipe.json").exists():
        raise LidrError("the toy M0 is pre-trained in one process: run the command once without torchrun")
    if settings.model == "toy" and (settings.prompts != "toy" or settings.eval not in ("", "toy")
                                    or settings.system_prompt or any(getattr(settings, name) for name in TEMPLATES)):
        print("warning: the toy model knows only the toy world's words: other prompts, benchmarks, templates and "
              "system turns reach it as <|unk|> tokens")
    toy_m0 = toy_model(out.parent, settings.seed, langs) if start_model == "toy" else None
    transformers.set_seed(settings.seed)
    model, tokenizer = load_model(str(toy_m0 or start_model), settings.device, settings.dtype, settings.system_prompt)
    if WORLD > 1 and not hasattr(model.base_model, "layers"):  # fully_sharded shards its decoder layers
        raise LidrError(f"--model {settings.model}: many processes need a Llama-style model (base_model.layers)")
    prompt_template = template(settings, "prompt_template")
    shortest = min(len(chat_prompt_ids(tokenizer, fill_template(prompt_template, prompt[langs[0]], languages[langs[0]]),
                                       settings.system_prompt)) for prompt in all_prompts)
    if shortest >= settings.max_len:  # no pair or example could be trained on
        raise LidrError(f"--max-len {settings.max_len}: every prompt is longer (the shortest, chat-formatted, is "
                        f"{shortest} tokens); raise --max-len")
    if WORLD > 1:  # many GPUs: every process has checked the folder before rank 0 writes into it
        dist.barrier()
    lock = lock_run_folder(out, command) if RANK == 0 else None  # held while the run goes on: one run per folder
    if RANK == 0:
        record_run(out, settings, command, inputs_sha256)  # only now: bad input above has written nothing
    if toy_m0:  # which cached M0 the run started from, and how it was made
        write_atomic(out / "toy_recipe.json", (toy_m0 / "toy_recipe.json").read_text(encoding="utf-8"))
    print(f"run folder {out} | {settings.model}: {sum(p.numel() for p in model.parameters()):,} parameters "
          f"on {settings.device} ({settings.dtype}) | {len(all_prompts)} prompts, "
          f"{min(settings.num_prompts, len(all_prompts))} per iteration, "
          f"{sum(p['translation_task'] for p in all_prompts)} translation tasks | langs {','.join(langs)} | "
          + ("method qalign" if settings.method == "qalign" else f"recipe {settings.recipe}"))
    return model, tokenizer, lock


# What a resumed run may change: the folder's own name, the number of iterations (to extend a
# run), and settings that change how fast a run goes, and its results only by float rounding.
RESUMABLE_CHANGES = {"out", "iters", "device", "gen_batch_size", "micro_batch_size", "gradient_checkpointing"}


def check_resumable(out: Path, settings: Settings, inputs_sha256: dict[str, str]):
    """--out must be new, or a run folder made with these settings and inputs (by content: an edited file counts)."""
    settings_path = out / "settings.json"
    if settings_path.exists():
        try:
            run_record = json.loads(settings_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
            run_record = None
        parts = ("settings", "templates", "inputs_sha256")
        if not isinstance(run_record, dict) or not all(isinstance(run_record.get(part), dict) for part in parts):
            raise LidrError(f"--out {out}: its settings.json is not a lidr run's (another tool's, or cut short); "
                            f"pass another --out")
        recorded = run_record["settings"]
        changed = [f"--{name.replace('_', '-')} {recorded.get(name)!r} -> {value!r}"
                   for name, value in dataclasses.asdict(settings).items()
                   if name not in RESUMABLE_CHANGES and recorded.get(name) != value]
        changed += [f"the text of --{name.replace('_', '-')}" for name in TEMPLATES
                    if run_record["templates"].get(name, "") != template(settings, name)]
        changed += [f"the {name} read" for name, sha256 in inputs_sha256.items()
                    if run_record["inputs_sha256"].get(name) != sha256]
        if settings.dtype == "bfloat16" and run_record.get("processes") != WORLD:  # another optimizer: see train
            changed.append(f"the processes, {run_record.get('processes')} -> {WORLD} (bf16: BF16AdamW on one, "
                           f"float32 shards on many)")
        if changed:
            raise LidrError(f"{out} was made with other settings ({'; '.join(changed)}); "
                            f"pass another --out, or the same settings to resume it")
    elif out.exists() and (not out.is_dir() or any(not leftover(entry) for entry in out.iterdir())):
        raise LidrError(f"--out {out} exists and is not a lidr run folder; pass another --out")


def leftover(entry: Path) -> bool:
    """What a process that stopped before writing settings.json may leave: never a reason to refuse."""
    return entry.name == "run.lock" or entry.name.endswith(".tmp") or (
        entry.name == "lidr.py" and entry.read_bytes() == Path(__file__).read_bytes())  # record_run writes it first


def lock_run_folder(out: Path, command: list[str]):
    """An exclusive lock on the run folder while the returned file is open (the OS drops it when the process
    dies): a second process on the folder stops at once, naming the holder, instead of mixing two runs."""
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / "run.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise LidrError(f"{out} is in use by another lidr process ({lock.read().strip() or 'unknown'}); "
                        f"wait for it to end, or pass another --out") from None
    try:
        lock.truncate(0)
        print(f"pid {os.getpid()} on {platform.node()}: {shlex.join(command)}", file=lock, flush=True)
    except OSError as error:
        raise write_error(error, out / "run.lock") from None
    for temp in (*out.glob(".*.tmp"), *out.glob("iter_*/.*.tmp")):  # killed runs' (no other process writes here)
        if temp.is_dir():
            shutil.rmtree(temp)
        temp.unlink(missing_ok=True)
    return lock


def record_run(out: Path, settings: Settings, command: list[str], inputs_sha256: dict[str, str]):
    """A run folder says how it was made: settings, command, versions, hardware and the code;
    commands.log adds each invocation, with the hash of the code that ran it."""
    source = Path(__file__).read_bytes()
    code_hash = hashlib.sha256(source).hexdigest()
    if not (out / "settings.json").exists():  # written last: it marks the folder as recorded
        out.mkdir(parents=True, exist_ok=True)
        device = settings.device
        write_atomic(out / "lidr.py", source.decode("utf-8"))
        write_atomic(out / "settings.json", to_json({
            "settings": dataclasses.asdict(settings), "command": [sys.executable, *command],
            "templates": {name: template(settings, name) for name in TEMPLATES if getattr(settings, name)},
            "inputs_sha256": inputs_sha256, "lidr_sha256": code_hash,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "datasets": datasets.__version__},
            "hardware": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.machine(),
            "processes": WORLD,
        }, indent=2))
    elif read_json(out / "settings.json").get("lidr_sha256") != code_hash:
        print(f"warning: lidr.py changed since {out} was made (see commands.log); lidr.py there is the original")
    log = out / "commands.log"  # rewritten whole: a full disk never leaves half a line
    write_atomic(log, (log.read_text(encoding="utf-8") if log.exists() else "")
                 + f"{time.strftime('%Y-%m-%d %H:%M:%S')} lidr_sha256={code_hash[:12]} {' '.join(command)}\n")


# ------------------------------------------------------------------------ report tables
def count_per_target_language(translations: list[dict], langs: list[str], counted) -> dict[str, int]:
    return {lang: sum(counted(t) for t in translations if t["target_lang"] == lang) for lang in langs}


def means_per_language(step_metrics: list[dict], langs: list[str]) -> dict:
    """train's summary: the last epoch's per-example metrics averaged over all its examples, and per language."""
    merged = {name: torch.cat([m[name] for m in step_metrics]) for name in step_metrics[0]}
    per_lang = {lang: {name: values[torch.tensor([lang == example_lang for example_lang in langs])].mean().item()
                       for name, values in merged.items()} for lang in sorted(set(langs))}
    return {"last_epoch": {name: values.mean().item() for name, values in merged.items()}, "per_lang": per_lang}


def run_tables(history: list[dict], evaluations: list[dict], langs: list[str], settings: Settings) -> str:
    """What a run prints after each iteration and keeps in summary.txt: per iteration and language, the pairs
    and training (QAlign: the examples and their NLL), then, with --eval, the evaluation."""
    trained = [(t, lang, metrics, (metrics["train"] or {"per_lang": {}})["per_lang"].get(lang))
               for t, metrics in enumerate(history, 1) for lang in langs]
    if settings.method == "qalign":
        rows = [f"{'stage':>5} {'lang':>4} {'examples':>8} {'nll':>6}", "-" * 26] + [
            f"{t:>5} {lang:>4} {metrics['examples'][lang]:>8} " + (f"{train['loss/nll']:6.3f}" if train else "     -")
            for t, lang, metrics, train in trained] + [
            "stage 1: questions into English; stage 2: English answers. nll: per answer token, last epoch."]
    else:
        header = (f"{'iter':>4} {'lang':>4} {'pairs':>6} {'skipped':>7} {'failed_tr':>9} {'wrong_lang':>10} "
                  f"{'loss':>7} {'reward_acc':>10} {'margin':>7} {'logp_chosen':>11} {'nll':>6}")
        rows = [f"pairs built by --recipe {settings.recipe}", header, "-" * len(header)]
        for t, lang, metrics, train in trained:
            counts = metrics["counts"][lang]
            numbers = (f"{train['loss/total']:7.4f} {train['rewards/accuracies']:10.2f} "
                       f"{train['rewards/margins']:7.3f} {train['logps/chosen']:11.2f} {train['loss/nll']:6.3f}"
                       if train else f"{'-':>7} {'-':>10} {'-':>7} {'-':>11} {'-':>6}")
            failed, wrong = metrics["translation_failures"][lang], metrics["translations_wrong_language"][lang]
            rows.append(f"{t:>4} {lang:>4} {counts['pairs']:>6} {sum(counts.values()) - counts['pairs']:>7} "
                        f"{failed:>9} {wrong:>10} {numbers}")
        rows.append("skipped: pairs not built, by reason in metrics.json; failed_tr: translations into the "
                    "language with no parseable span; wrong_lang: ones in another language. logp_chosen: summed; "
                    "nll: per token.")
    names = model_names(settings.method, len(evaluations))
    return "\n".join(rows) + ("\n\n" + eval_table(evaluations, names, langs[0]) if evaluations else "")


def eval_table(evaluations: list[dict], names: list[str], dominant: str) -> str:
    """Per benchmark, metric and language, one column per model (M0 -> M1 -> ...); rates in percent. Accuracy
    also as means over the languages but the dominant one (those LIDR lifts) and over all (the paper's)."""
    widths = [max(6, len(name)) for name in names]
    header = f"{'benchmark':<9} {'metric':<10} {'lang':>6} " + " ".join(f"{n:>{w}}" for n, w in zip(names, widths))
    rows = [header, "-" * len(header)]

    def row(benchmark, metric, lang, values):
        return f"{benchmark:<9} {metric:<10} {lang:>6} " + " ".join(
            f"{'-':>{w}}" if v is None else f"{v:{w}.1f}" for v, w in zip(values, widths))
    for benchmark, by_lang in evaluations[0].items():
        for metric in ("accuracy", "number", "off_target", "finished", "words"):
            langs = [lang for lang in by_lang if any(metric in e[benchmark][lang] for e in evaluations)]
            scale = 1 if metric == "words" else 100
            for lang in langs:  # a metric can be missing for a model: off_target when language_of can't tell
                values = [evaluation[benchmark][lang].get(metric) for evaluation in evaluations]
                rows.append(row(benchmark, metric, lang, [None if v is None else v * scale for v in values]))
            others = [lang for lang in langs if lang != dominant]
            for name, means in (("others", others), ("all", langs)):  # the paper's means take in English too
                if metric in ("accuracy", "number") and len(others) > 1:
                    rows.append(row(benchmark, metric, name, [
                        sum(evaluation[benchmark][lang][metric] for lang in means) * scale / len(means)
                        for evaluation in evaluations]))
    rows.append(f"accuracy, number, off_target, finished: % of problems; words: mean answer length; "
                f"others: mean over the languages but {dominant}; all: over every language, as the paper's means. "
                f"Every answer: iter_<t>/eval_answers.jsonl.")
    return "\n".join(rows)


def model_names(method: str, count: int) -> list[str]:
    """Column names of a run's evaluations: M0, M1, ... (LIDR's iterations) or QAlign's stages."""
    return ["M0"] + [f"stage{t}" if method == "qalign" else f"M{t}" for t in range(1, count)]


# ======================================================================== evaluation
# --eval runs on M0 and on every M_t. Each benchmark gives, per language, the prompts to answer
# and a scorer of one answer; every answer and its scores are kept in the run folder.
BENCHMARKS = ("toy", "capitals", "mgsm", "alpaca")


def eval_problems(settings: Settings) -> dict[str, dict[str, list[dict]]]:
    """{benchmark: {lang: [{"id", "prompt", "gold"}]}}; gold: the toy's answer, the capital's names, MGSM's number."""
    languages = parse_languages(settings.eval_langs or settings.langs, "--eval-langs")
    problems = {}
    for benchmark in filter(None, settings.eval.split(",")):
        if benchmark == "toy":
            check_toy_languages(languages, "--eval toy")
            problems["toy"] = {lang: toy_eval_problems(lang) for lang in languages}
        elif benchmark == "capitals":
            problems["capitals"] = {lang: capital_questions(lang, held_out=True) for lang in languages}
        elif benchmark == "mgsm":
            if not settings.mgsm:
                raise LidrError("--eval mgsm needs --mgsm: the folder of the authors' mgsm_<lang>.jsonl (data/MGSM)")
            problems["mgsm"] = {lang: read_mgsm(settings.mgsm, lang) for lang in languages}
        elif settings.alpaca and any(Path(settings.alpaca, f"{lang}.json").is_file() for lang in languages):
            problems["alpaca"] = {lang: read_alpaca(settings.alpaca, lang) for lang in languages}
        else:  # records in --prompts' formats: the run's dominant language, and those to evaluate
            records = load_prompts(settings.alpaca or settings.prompts, "instruction",
                                   {**parse_languages(settings.langs), **languages}, flag="--alpaca")
            problems["alpaca"] = {lang: [{"id": r["id"], "prompt": r[lang], "gold": None, "dataset": f"lidr-{lang}"}
                                         for r in records if lang in r] for lang in languages}
    for benchmark, by_lang in problems.items():  # an empty file, or instructions lacking a language
        for lang, items in by_lang.items():
            if not items:
                source = {"mgsm": settings.mgsm, "alpaca": settings.alpaca or settings.prompts}[benchmark]
                raise LidrError(f"--eval {benchmark}: no '{lang}' problems in {source}; pass another "
                                f"--{benchmark} or --eval-langs")
    return {benchmark: {lang: items[:settings.eval_limit or None] for lang, items in by_lang.items()}
            for benchmark, by_lang in problems.items()}


def read_mgsm(folder: str, lang: str) -> list[dict]:
    """The authors' MGSM in one language: data/MGSM/mgsm_<lang>.jsonl, a {"query", "response"} per line."""
    path = Path(folder) / f"mgsm_{lang}.jsonl"
    problems = []
    for record in read_prompt_file(path, "--mgsm"):
        gold = last_number(str(record.get("response", "")))
        if not isinstance(record.get("query"), str) or gold is None or not math.isfinite(gold):
            raise LidrError(f"{path}:{record['_line']}: expected {{\"query\": question, \"response\": number}}")
        problems.append({"id": f"mgsm-{lang}-{record['_line']}", "prompt": record["query"].strip(), "gold": gold})
    return problems


def read_alpaca(folder: str, lang: str) -> list[dict]:
    """The authors' X-AlpacaEval in one language: <lang>.json, a list of {"id", "dataset", "instruction"}."""
    path = Path(folder) / f"{lang}.json"
    records = read_prompt_file(path, "--alpaca")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) \
                or not isinstance(record.get("dataset", ""), str):
            raise LidrError(f"{path}: record {number}: expected an object with an 'instruction' (and 'dataset') string")
    return [{"id": str(r.get("id", number)), "prompt": r["instruction"], "gold": None,
             "dataset": r.get("dataset", f"lidr-{lang}")} for number, r in enumerate(records, 1)]


def last_number(text: str) -> float | None:
    """MGSM's answer: the last number in the text, or None. '1,250', '1.250' and '1 250' are 1250 (a comma, point or
    (no-break) space before exactly three digits groups thousands); '18,00' and '2.5' are decimals."""
    numbers = re.findall(r"(?<!\d)-?\d+(?:[,. \u00a0\u202f]\d{3}(?!\d))*(?:[.,]\d+)?", text)
    if not numbers:
        return None
    number = re.sub(r"[ \u00a0\u202f]|[,.](?=\d{3}(?:[,.]|$))", "", numbers[-1])
    return float(number.replace(",", "."))


def score(benchmark: str, answer: str, finished: bool, gold, lang: str, candidates: tuple[str, ...]) -> dict:
    """One answer's scores; a language's metrics are their means. off_target: is the answer in another of the
    candidate languages than asked (the paper's off-target rate; None where language_of can't tell)?"""
    if benchmark == "toy":  # number: the right number in any toy language, as MGSM scores a number
        return {"accuracy": float(answer == gold), "number": float(toy_numbers(answer) == toy_numbers(gold))}
    language = language_of(answer, candidates)
    off = {"off_target": None if language is None else language != lang}
    if benchmark == "mgsm":
        return {"accuracy": float(last_number(answer) == gold), **off}
    if benchmark == "capitals":
        return {"accuracy": float(names_any(answer, gold)), **off, "finished": float(finished)}
    return {**off, "finished": float(finished), "words": float(len(answer.split()))}


def evaluate(model, tokenizer, problems: dict, settings: Settings, folder: Path, model_name: str) -> dict:
    """Answers every problem as step 2 samples, into eval_answers.jsonl, and alpaca's into alpaca_<lang>.json
    (AlpacaEval's model_outputs, for the judge). Returns {benchmark: {lang: {metric: mean over the problems}}}."""
    jobs = [(benchmark, lang, problem) for benchmark, by_lang in problems.items()
            for lang, items in by_lang.items() for problem in items]
    eval_template = template(settings, "eval_prompt_template")
    languages = parse_languages(settings.eval_langs or settings.langs)
    ids = [chat_prompt_ids(tokenizer, fill_template(eval_template, problem["prompt"], languages[lang]),
                           settings.system_prompt) for _, lang, problem in jobs]
    answers = generate(model, tokenizer, ids, settings.eval_max_new_tokens, settings.gen_batch_size,
                       settings.repetition_penalty, settings.temperature, desc=f"evaluating {model_name}")
    candidates = tuple({**parse_languages(settings.langs), **languages})
    records = [{"benchmark": benchmark, "lang": lang, **problem, "answer": answer.strip(), "finished": finished,
                "scores": score(benchmark, answer.strip(), finished, problem["gold"], lang, candidates)}
               for (benchmark, lang, problem), (answer, finished) in zip(jobs, answers)]
    write_jsonl(folder / "eval_answers.jsonl", records)
    results = {}
    for benchmark, by_lang in problems.items():
        for lang in by_lang:
            scored = [r for r in records if r["benchmark"] == benchmark and r["lang"] == lang]
            values = {metric: [r["scores"][metric] for r in scored if r["scores"][metric] is not None]
                      for metric in (scored[0]["scores"] if scored else ())}  # off_target is None: language unknown
            results.setdefault(benchmark, {})[lang] = {metric: sum(v) / len(v) for metric, v in values.items() if v}
            if benchmark == "alpaca":
                outputs = [{"instruction": r["prompt"], "output": r["answer"], "generator": model_name,
                            "dataset": r["dataset"]} for r in scored]
                write_atomic(folder / f"alpaca_{lang}.json", to_json(outputs, indent=1))
    return results


def evaluate_once(model, tokenizer, problems: dict, settings: Settings, out: Path, t: int, in_memory: bool) -> dict:
    """--eval of M_t, kept in iter_<t>/eval.json for resuming; in_memory: `model` is M_t, so it can redo one."""
    folder = out / f"iter_{t}"
    if finished(folder / "eval.json"):
        return read_json(folder / "eval.json")
    if not in_memory:
        raise LidrError(f"{folder / 'eval.json'} is missing and M{t} is not the model being resumed; "
                        f"to redo it, move the later iter_* folders out of {out}")
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(stage_seed(settings.seed, folder / "eval.json"))  # as a stage: resumed == uninterrupted
    model_name = f"{Path(settings.model).name}-{settings.method}-{model_names(settings.method, t + 1)[t]}"
    results = evaluate(model, tokenizer, problems, settings, folder, model_name)
    write_atomic(folder / "eval.json", to_json(results, indent=2), proof=True)
    return results


# ======================================================================== QAlign, for comparison
# QAlign (Zhu et al. 2024, arXiv 2401.07817; NJUNLP/QAlign) moves English ability into other languages by SFT
# alone: stage 1 trains translating each question into English, stage 2 English questions with English answers.
# The authors used gold answers on a base model; here, in LIDR's label-free setting, M0's own answers.
QALIGN_REQUEST = "Translate the following sentences from {source} to {target}."  # their data/gsmtrans/gsmtrans.py


def qalign_stage(t: int, model, tokenizer, prompts: list[dict], languages: dict[str, str], settings: Settings,
                 folder: Path) -> dict:
    """QAlign's stage t (1 or 2), M_{t-1} -> M_t in place; stage 1 first samples M0's English answers for stage 2."""
    langs = list(languages)
    prompts_too_long = dict.fromkeys(langs, 0)
    if t == 1:
        prompts, prompts_too_long = drop_untrainable_prompts(prompts, tokenizer, languages, settings)
        prompt_translations = stage(folder / "prompt_translations.jsonl", lambda: translate(
            model, tokenizer, prompt_translation_requests(prompts, langs), languages, settings, "translating prompts"),
            settings)
        prompts = stage(folder / "prompts.jsonl", lambda: fill_prompts(prompts, prompt_translations, langs), settings)
        responses = stage(folder / "responses.jsonl", lambda: sample_responses(  # in English only
            model, tokenizer, prompts, {langs[0]: languages[langs[0]]}, settings), settings)
        stage(folder / "response_alignment.jsonl", lambda: response_alignment_examples(responses), settings)
        examples = stage(folder / "question_alignment.jsonl", lambda: question_alignment_examples(
            prompts, languages), settings)
    else:
        path = folder.parent / "iter_1" / "response_alignment.jsonl"  # stage 1 wrote it
        if not finished(path):
            raise LidrError(f"{path} is missing; move {folder.parent / 'iter_1' / 'model'} away to redo stage 1")
        examples = read_json(path, lines=True)
    trained = train_on_examples(model, tokenizer, examples, settings, folder / "train_log.jsonl")
    examples_per_lang = {lang: sum(e["lang"] == lang for e in examples) for lang in langs}
    return {"examples": examples_per_lang, "prompts_too_long": prompts_too_long, "train": trained}


def question_alignment_examples(prompts: list[dict], languages: dict[str, str]) -> list[dict]:
    """Stage 1's data: each question in a weaker language -> the dominant (English) one, under QAlign's request."""
    dominant = next(iter(languages))
    return [{"id": p["id"], "lang": lang,
             "prompt": QALIGN_REQUEST.format(source=languages[lang], target=languages[dominant]) + " " + p[lang],
             "response": p[dominant]}
            for p in prompts for lang in languages if lang != dominant and p[lang]]


def response_alignment_examples(responses: list[dict]) -> list[dict]:
    """Stage 2's data: English prompts (as sampled) with M0's finished, non-empty answers (as LIDR's pairs need)."""
    return [{"id": r["id"], "lang": r["lang"], "prompt": r["prompt"], "response": r["response"]}
            for r in responses if r["finished"] and r["response"]]


def train_on_examples(model, tokenizer, examples: list[dict], settings: Settings, log_path: Path) -> dict | None:
    """One SFT stage on the NLL of the examples' answers. None when no example is left to train on."""
    end_of_turn = end_of_turn_id(tokenizer)
    sequences = [tokenize_example(tokenizer, e, settings.system_prompt, end_of_turn, settings.max_len)
                 for e in examples]
    kept = [(example["lang"], sequence) for example, sequence in zip(examples, sequences) if sequence]
    if not kept:
        tqdm.write(f"nothing to train on in {log_path.parent.name}: the model stays as it was")
        return None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn
    result = train(model, [lang for lang, _ in kept], lambda model, ids: nll_gradients(
        model, [kept[i][1] for i in ids], settings.micro_batch_size, pad_id), settings, log_path)
    return {**result, "examples_prompt_too_long": len(examples) - len(kept)}


def tokenize_example(tokenizer, example: dict, system_prompt: str, end_of_turn: int,
                     max_len: int) -> tuple[list[int], int] | None:
    """An SFT example {"prompt", "response"} as (ids, prompt length), as tokenize_pair builds a pair."""
    prompt_ids = chat_prompt_ids(tokenizer, example["prompt"], system_prompt)
    room = max_len - len(prompt_ids)
    answer_ids = tokenizer(example["response"], add_special_tokens=False).input_ids + [end_of_turn]
    return (prompt_ids + answer_ids[:room], len(prompt_ids)) if room >= 1 else None


def nll_gradients(model, sequences: list[tuple[list[int], int]], micro_batch_size: int, pad_id: int) -> dict:
    """SFT's backward over one step's (ids, prompt length) sequences, as accumulate_gradients: the NLL of the
    answer tokens, averaged over all the step's answer tokens. Returns each one's NLL per token and tokens."""
    answer_tokens = sum(len(ids) - prompt_length for ids, prompt_length in sequences)
    micro_batches = length_grouped([len(ids) for ids, _ in sequences], micro_batch_size)
    metrics = []
    for micro, factor in this_process_share(micro_batches):
        batch = collate([sequences[i] for i in micro], pad_id)
        logps, lengths = chunked_sequence_logps(model, *(t.to(model.device) for t in batch))
        (-logps.sum() / answer_tokens * factor).backward()
        metrics += [(micro, {"loss/nll": (-logps / lengths).detach(), "tokens": batch[1].sum(-1)})] if factor else []
    return in_step_order(metrics)


# ======================================================================== capitals: a check for small real models
# Short questions whose answer is a name a small chat model knows in English, checked without a judge.
# SmolLM2-135M-Instruct names most capitals in English and few in German or Spanish: a language gap on knowledge
# the model has (README: A real model). --eval capitals asks the first 20 countries, --prompts capitals the other 30.
CAPITAL_QUESTION = {"en": "What is the capital of {}?", "de": "Was ist die Hauptstadt von {}?",
                    "es": "¿Cuál es la capital de {}?"}
CAPITALS = [entry.split("|") for entry in (  # country in en, de, es | its capital's names
    "Germany|Deutschland|Alemania|Berlin/Berlín; Italy|Italien|Italia|Rome/Rom/Roma; Japan|Japan|Japón|Tokyo/Tokio; "
    "Russia|Russland|Rusia|Moscow/Moskau/Moscú; Canada|Kanada|Canadá|Ottawa; Egypt|Ägypten|Egipto|Cairo/Kairo; "
    "Sweden|Schweden|Suecia|Stockholm/Estocolmo; Poland|Polen|Polonia|Warsaw/Warschau/Varsovia; "
    "Austria|Österreich|Austria|Vienna/Wien/Viena; Greece|Griechenland|Grecia|Athens/Athen/Atenas; "
    "Portugal|Portugal|Portugal|Lisbon/Lissabon/Lisboa; Kenya|Kenia|Kenia|Nairobi; Peru|Peru|Perú|Lima; "
    "Thailand|Thailand|Tailandia|Bangkok; South Korea|Südkorea|Corea del Sur|Seoul/Seúl; "
    "Belgium|Belgien|Bélgica|Brussels/Brüssel/Bruselas; Romania|Rumänien|Rumania|Bucharest/Bukarest/Bucarest; "
    "Iceland|Island|Islandia|Reykjavik; Venezuela|Venezuela|Venezuela|Caracas; Malaysia|Malaysia|Malasia|Kuala Lumpur; "
    "France|Frankreich|Francia|Paris/París; Spain|Spanien|España|Madrid; China|China|China|Beijing/Peking/Pekín; "
    "Australia|Australien|Australia|Canberra; Brazil|Brasilien|Brasil|Brasília; India|Indien|India|Delhi; "
    "Argentina|Argentinien|Argentina|Buenos Aires; Norway|Norwegen|Noruega|Oslo; Finland|Finnland|Finlandia|Helsinki; "
    "Denmark|Dänemark|Dinamarca|Copenhagen/Kopenhagen/Copenhague; Ireland|Irland|Irlanda|Dublin; "
    "Hungary|Ungarn|Hungría|Budapest; Chile|Chile|Chile|Santiago; Cuba|Kuba|Cuba|Havana/Havanna/Habana; "
    "Vietnam|Vietnam|Vietnam|Hanoi; Indonesia|Indonesien|Indonesia|Jakarta/Yakarta; Nigeria|Nigeria|Nigeria|Abuja; "
    "Morocco|Marokko|Marruecos|Rabat; Colombia|Kolumbien|Colombia|Bogotá; "
    "New Zealand|Neuseeland|Nueva Zelanda|Wellington; Pakistan|Pakistan|Pakistán|Islamabad; "
    "England|England|Inglaterra|London/Londres; Scotland|Schottland|Escocia|Edinburgh/Edimburgo; "
    "Bulgaria|Bulgarien|Bulgaria|Sofia; Serbia|Serbien|Serbia|Belgrade/Belgrad/Belgrado; "
    "Croatia|Kroatien|Croacia|Zagreb; Ghana|Ghana|Ghana|Accra/Acra; Ecuador|Ecuador|Ecuador|Quito; "
    "Afghanistan|Afghanistan|Afganistán|Kabul; Nepal|Nepal|Nepal|Kathmandu/Katmandu").split("; ")]
CAPITALS_HELD_OUT = 20


def capital_questions(lang: str, held_out: bool) -> list[dict]:
    """--eval capitals' problems (held_out) or the questions --prompts capitals trains on, in one language."""
    if lang not in CAPITAL_QUESTION:
        raise LidrError(f"--eval capitals: the questions are in {','.join(CAPITAL_QUESTION)} (got '{lang}')")
    column = list(CAPITAL_QUESTION).index(lang)  # the country's name in lang
    chosen = CAPITALS[:CAPITALS_HELD_OUT] if held_out else CAPITALS[CAPITALS_HELD_OUT:]
    return [{"id": f"capital-{row[0]}", "prompt": CAPITAL_QUESTION[lang].format(row[column]), "gold": row[3].split("/")}
            for row in chosen]


def capital_prompts() -> list[dict]:
    questions = {lang: capital_questions(lang, held_out=False) for lang in CAPITAL_QUESTION}
    return [{"id": question["id"], "translation_task": False,
             **{lang: questions[lang][i]["prompt"] for lang in CAPITAL_QUESTION}}
            for i, question in enumerate(questions["en"])]


def names_any(answer: str, names: list[str]) -> bool:
    """Does the answer name one of names, as a word, whatever its case and accents?"""
    def plain(text):
        return "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))
    return any(re.search(rf"\b{re.escape(plain(name))}\b", plain(answer)) for name in names)


# ======================================================================== the toy world
# A teaching device, not a result about real LLMs: --model toy is a 0.4M-parameter Llama that lidr pre-trains in a
# few CPU minutes on word problems with one exact answer in five languages, imbalanced (thousands of correct English
# examples, fewer and mostly careless ones in each other language), and on answer sentences translated in step 3's
# format. M0 then answers English well, the others badly, and translates well: the loop has real pairs to learn from.
TOY_LANGS = ("en", "es", "ru", "de", "fr")
TOY_NUMBERS = {  # 2, 3, ...
    "en": "two three four five six seven eight nine ten eleven twelve",
    "es": "dos tres cuatro cinco seis siete ocho nueve diez once doce",
    "ru": "два три четыре пять шесть семь восемь девять десять "
          "одиннадцать двенадцать",
    "de": "zwei drei vier fünf sechs sieben acht neun zehn elf zwölf",
    "fr": "deux trois quatre cinq six sept huit neuf dix onze douze",
}
TOY_OBJECTS = {"en": "apples pears coins flowers", "es": "manzanas peras monedas flores",
               "ru": "яблок груш монет цветов", "de": "Äpfel Birnen Münzen Blumen",
               "fr": "pommes poires pièces fleurs"}
TOY_NAMES = "Ana Ben Eva Max Lea Tom Sam Mia".split()
TOY_TEMPLATES = {  # (gets more, gives away, answer)
    "en": ("{name} has {a} {obj} and gets {b} more. How many {obj} does {name} have now?",
           "{name} has {a} {obj} and gives {b} away. How many {obj} does {name} have now?", "{name} has {c} {obj}."),
    "es": ("{name} tiene {a} {obj} y recibe {b} más. ¿Cuántas {obj} tiene {name} ahora?",
           "{name} tiene {a} {obj} y regala {b}. ¿Cuántas {obj} tiene {name} ahora?", "{name} tiene {c} {obj}."),
    "ru": ("{name} имеет {a} {obj} и получает ещё {b}. "
           "Сколько {obj} имеет {name} теперь?",
           "{name} имеет {a} {obj} и отдаёт {b}. Сколько {obj} имеет {name} теперь?",
           "{name} имеет {c} {obj}."),
    "de": ("{name} hat {a} {obj} und bekommt {b} dazu. Wie viele {obj} hat {name} jetzt?",
           "{name} hat {a} {obj} und verschenkt {b}. Wie viele {obj} hat {name} jetzt?", "{name} hat {c} {obj}."),
    "fr": ("{name} a {a} {obj} et reçoit {b} de plus. Combien de {obj} a {name} maintenant ?",
           "{name} a {a} {obj} et donne {b}. Combien de {obj} a {name} maintenant ?", "{name} a {c} {obj}."),
}

# The world, then M0 and its pre-training. English has ~2,700 examples, all correct. Fewer weak examples left the gap
# as wide but gave the loop less to build on; fewer sequences seen left some seeds' M0 weak in English or translating.
TOY_RECIPE = dict(largest_number=12, eval_problems=200, weak_examples=1000, weak_careless=0.6,
                  hidden_size=96, layers=3, sequences_seen=76_800, batch_size=64, lr=3e-3, adam_beta2=0.98)


def check_toy_languages(languages: dict[str, str], flag: str):
    if not set(languages) <= set(TOY_LANGS) or next(iter(languages)) != "en":
        raise LidrError(f"{flag}: the toy world has only {','.join(TOY_LANGS)}, English first "
                        f"(got {','.join(languages)})")


def toy_problem_list() -> list[tuple]:
    """Every problem (a, b, gives_away, name, object), in a fixed shuffled order: the first eval_problems held out."""
    numbers = range(2, TOY_RECIPE["largest_number"] + 1)
    problems = [(a, b, gives, name, obj) for a in numbers for b in numbers for gives in (False, True)
                for name in TOY_NAMES for obj in range(4) if (a - b if gives else a + b) in numbers]
    random.Random(0).shuffle(problems)
    return problems


def toy_answer(lang: str, number: int, name: str, obj: int) -> str:
    return TOY_TEMPLATES[lang][2].format(name=name, c=TOY_NUMBERS[lang].split()[number - 2],
                                         obj=TOY_OBJECTS[lang].split()[obj])


def toy_text(lang: str, problem: tuple, answer: int | None = None) -> tuple[str, str]:
    """(question, answer sentence) in one language; answer overrides the correct number."""
    a, b, gives, name, obj = problem
    words = TOY_NUMBERS[lang].split()
    question = TOY_TEMPLATES[lang][gives].format(name=name, a=words[a - 2], b=words[b - 2],
                                                 obj=TOY_OBJECTS[lang].split()[obj])
    return question, toy_answer(lang, answer or (a - b if gives else a + b), name, obj)


def toy_numbers(text: str) -> list[int]:
    """The numbers a toy sentence states, in whichever toy language it writes them."""
    values = {word: value for words in TOY_NUMBERS.values() for value, word in enumerate(words.split(), 2)}
    return [values[word] for word in re.findall(r"\w+", text) if word in values]


def toy_prompts() -> list[dict]:
    """--prompts toy: the loop's prompts, the non-held-out problems in every toy language."""
    return [{"id": f"toy{i}", "translation_task": False, **{lang: toy_text(lang, p)[0] for lang in TOY_LANGS}}
            for i, p in enumerate(toy_problem_list()[TOY_RECIPE["eval_problems"]:])]


def toy_eval_problems(lang: str) -> list[dict]:
    return [{"id": f"toy-eval{i}", "prompt": question, "gold": answer} for i, (question, answer) in
            enumerate(toy_text(lang, p) for p in toy_problem_list()[:TOY_RECIPE["eval_problems"]])]


def toy_translation_requests(langs) -> list[tuple[str, str]]:
    """(request, answer) for every answer sentence, English <-> each other language, in step 3's format."""
    sentences = [(number, name, obj) for number in range(2, TOY_RECIPE["largest_number"] + 1)
                 for name in TOY_NAMES for obj in range(4)]
    return [(TRANSLATION_REQUEST.format(source=LANGUAGE_NAMES[source], target=LANGUAGE_NAMES[target],
                                        text=toy_answer(source, *sentence)),
             toy_answer(target, *sentence) + "\n</translated>")
            for lang in langs[1:] for source, target in (("en", lang), (lang, "en")) for sentence in sentences]


def toy_tokenizer():
    """Word-level: a token is a word or a punctuation mark with the whitespace before it, so
    decoding is exact. The vocabulary is every piece of every text the toy world can write."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|pad|>", unk_token="<|unk|>",
                    additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])
    split = pre_tokenizers.Split(Regex(r"\s*\w+(?:-\w+)*|\s*[^\w\s]|\s+"), behavior="isolated")

    def tokenizer_with(words):
        backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|unk|>"))
        backend.pre_tokenizer, backend.decoder = split, decoders.Fuse()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **specials)
        tokenizer.chat_template = (  # Llama-3's layout
            "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
        return tokenizer

    # Every text the toy world writes: each answer, and each prompt as the chat template renders it (no system turn)
    bare = tokenizer_with(["<|unk|>"])  # no vocabulary yet
    chat = bare.apply_chat_template([{"role": "user", "content": "\0"}], add_generation_prompt=True, tokenize=False)
    exchanges = [toy_text(lang, problem) for lang in TOY_LANGS for problem in toy_problem_list()]
    texts = [TRANSLATION_PREFIX] + [text for question, answer in exchanges + toy_translation_requests(TOY_LANGS)
                                    for text in (chat.replace("\0", question), answer)]
    special = re.compile("|".join(map(re.escape, bare.all_special_tokens)))
    pieces = {piece for text in texts for part in special.split(text) for piece, _ in split.pre_tokenize_str(part)}
    return tokenizer_with(["<|unk|>", *sorted(pieces)])


def toy_config(tokenizer):
    hidden = TOY_RECIPE["hidden_size"]
    return transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=TOY_RECIPE["layers"], num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def toy_pretraining_data(tokenizer, seed: int, langs) -> list[tuple[list[int], int]]:
    """(ids, prompt length) sequences in lidr's chat format: every English problem, TOY_RECIPE's share of mostly
    careless ones per other language, and the translations of answer sentences."""
    rng = random.Random(seed)
    problems = toy_problem_list()[TOY_RECIPE["eval_problems"]:]
    examples = [("", *toy_text("en", p)) for p in problems]  # (assistant prefix, question, answer)
    for lang in langs[1:]:
        for problem in rng.sample(problems, TOY_RECIPE["weak_examples"]):
            careless = rng.random() < TOY_RECIPE["weak_careless"]  # it answers the problem's first number
            examples.append(("", *toy_text(lang, problem, answer=problem[0] if careless else None)))
    examples += [(TRANSLATION_PREFIX, *request) for request in toy_translation_requests(langs)]
    end_of_turn = end_of_turn_id(tokenizer)
    prompts = [chat_prompt_ids(tokenizer, question, "", prefix) for prefix, question, _ in examples]
    return [(prompt + tokenizer(answer, add_special_tokens=False).input_ids + [end_of_turn], len(prompt))
            for prompt, (_, _, answer) in zip(prompts, examples)]


def toy_model_folder(root: Path, seed: int, langs) -> Path:
    """root/toy-m0-<langs>-seed<seed>-<hash>: a change to the toy's data, model or training code makes another M0."""
    functions = (toy_problem_list, toy_text, toy_answer, toy_translation_requests, toy_tokenizer, chat_prompt_ids,
                 end_of_turn_id, toy_config, toy_pretraining_data, toy_model, train, nll_gradients,
                 length_grouped, in_step_order, collate, chunked_sequence_logps, answer_token_logps, warmup_cosine)
    recipe = json.dumps([TOY_RECIPE, TOY_TEMPLATES, TOY_NUMBERS, TOY_OBJECTS, TOY_NAMES, TRANSLATION_REQUEST,
                         TRANSLATION_PREFIX, LANGUAGE_NAMES])
    recipe += "".join(inspect.getsource(function) for function in functions)
    return root / f"toy-m0-{'-'.join(langs)}-seed{seed}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"


def toy_model(root: Path, seed: int, langs) -> Path:
    """The toy M0 of a seed and languages: pre-trained once on the answers' NLL by the run's `train`, then kept."""
    folder = toy_model_folder(root, seed, langs)
    if (folder / "toy_recipe.json").exists():  # written last: the model is complete
        return folder
    torch.manual_seed(seed)
    tokenizer = toy_tokenizer()
    model = AutoModelForCausalLM.from_config(toy_config(tokenizer))
    sequences = toy_pretraining_data(tokenizer, seed, langs)
    # as many steps whatever the languages (fewer languages, more epochs); micro-batches of 16 pad less than 64
    settings = Settings(lr=TOY_RECIPE["lr"], adam_beta2=TOY_RECIPE["adam_beta2"], batch_size=TOY_RECIPE["batch_size"],
                        epochs=max(1, round(TOY_RECIPE["sequences_seen"] / len(sequences))), micro_batch_size=16,
                        warmup_ratio=0.05, weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing="off", seed=seed)
    tqdm.write(f"pre-training the toy M0 (once, kept in {folder})")
    # Built in a private folder, then renamed into place: two runs pre-training the same M0 at once
    # never see a half-written one; the second to finish uses the first's.
    building = temp_path(folder)
    with written_whole(building, folder):
        building.mkdir(parents=True, exist_ok=True)
        train(model, ["all"] * len(sequences), lambda model, ids: nll_gradients(
            model, [sequences[i] for i in ids], settings.micro_batch_size, tokenizer.pad_token_id),
            settings, building / "train_log.jsonl")
        model.save_pretrained(building)
        tokenizer.save_pretrained(building)
        record = {"m0": str(folder.resolve()), "seed": seed, "langs": list(langs), **TOY_RECIPE}
        (building / "toy_recipe.json").write_text(to_json(record, indent=2), encoding="utf-8")
        try:
            os.rename(building, folder)
        except OSError:  # another run's M0 is in place
            shutil.rmtree(building)
    return folder


if __name__ == "__main__":
    sys.exit(main())
