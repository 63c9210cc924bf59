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

Read it top to bottom: the settings, the loop (lidr_iteration), steps 1 to 5, run and main. Below
the PLUMBING ruler is what a first reading can skip (validation, file readers, model loading,
memory planning, optimizers, the run folder, report tables); then evaluation, QAlign (the baseline),
the built-in prompts and the toy world. Where lidr departs from the authors' released scripts:
README, Departures (--recipe scripts undoes the data-pipeline departures).

  python lidr.py --iters 2               # the paper's model on a CUDA GPU, else the toy world, offline
  python lidr.py --iters 2 --model toy   # the toy world, whatever the machine
  python lidr.py --method qalign         # QAlign on the same M0, prompts and evaluation, for comparison
  python lidr.py --compare RUN,RUN       # their evaluations in one table
  python lidr.py --help                  # every flag
"""

import argparse
import ast
import contextlib
import copy
import csv
import dataclasses
import fcntl
import functools
import gc
import hashlib
import inspect
import json
import logging
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
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

# Many GPUs: under torchrun (or --nproc-per-node) every process runs this file. Each generates its
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
    method: str = setting("lidr", "lidr; or qalign: QAlign's two SFT stages (1: each question into English; 2: "
                                  "English questions with English answers) on the same prompts, model and "
                                  "evaluation, for comparison (README: QAlign beside LIDR)")
    iters: int = setting(2, "LIDR iterations M0 -> M1 -> ... (paper: 2); qalign: its 2 stages")
    out: str = setting("", "run folder; default runs/<model>-<langs>-seed<seed>[-qalign]. "
                           "Re-running into the same folder resumes it")
    seed: int = setting(0, "seed for the toy model's pre-training, sampling and the order of training pairs")
    # model
    model: str = setting("auto", "hub id or local path of a chat model; toy: the toy world's 0.4M-parameter model "
                                 "(end of this file), pre-trained on CPU in minutes on first use and cached next to "
                                 "the run folder, with the toy defaults; auto: the paper's " + PAPER_MODEL
                                 + " where a CUDA GPU is visible, else toy")
    device: str = setting("auto", "cpu, cuda, cuda:1, ...; auto = cuda if present")
    nproc_per_node: int = setting(1, "processes (GPUs) on this machine: over 1 starts them as torchrun does, each "
                                     "generating a share and training a shard (FSDP2); torchrun lidr.py does too")
    dtype: str = setting("auto", "bfloat16 or float32; auto = bfloat16 on GPU, float32 on CPU")
    recipe: str = setting("lidr", "lidr: this kit's pipeline; scripts: the authors' released data pipeline step "
                                  "for step: a failed translation drops both pairs of its prompt and language, only "
                                  "the last language's English pairs are kept, no answer is skipped as unfinished, "
                                  "empty or identical, an empty translation or one in another language is kept "
                                  "(README: Departures)")
    # step 1: prompts
    prompts: str = setting("", "a .jsonl/.json file; a folder of <lang>.jsonl files, one per language, records "
                               "joined by id (the authors' data/alpagasus/subset/id_0_1000), or several such folders, "
                               "comma-separated, read in order; a dataset id or folder for datasets.load_dataset "
                               "(train split); toy = the toy world's problems; capitals = questions on "
                               "capitals for small real models (not those --eval capitals asks); empty = the "
                               "built-in prompts")
    prompt_field: str = setting("instruction", "for datasets and per-language folders: the field holding the "
                                               "prompt (a non-empty 'input' field is appended after a newline, "
                                               "as the authors' scripts do)")
    translation_tasks: str = setting("", "a .jsonl whose records' ids are the prompts that are translation tasks "
                                         "(the authors' hand list: process_data/alpagasus/translate/"
                                         "instruction_about_translate.jsonl); empty = each record's translation_task "
                                         "flag, else a pattern")
    prompt_template: str = setting("", "a file with a template for every sampled prompt, holding {question} and "
                                       "maybe {language}; from a .py file its PROMPT_PREFIX, read without running "
                                       "it (the authors' utils/inference.py, for their arithmetic run); "
                                       "empty = prompts as written")
    langs: str = setting("en,es,ru,de,fr", "comma-separated language codes, dominant first "
                                           "(paper: en,es,ru,de,fr); 'code:Name' for other codes")
    num_prompts: int = setting(1000, "prompts per iteration; iteration t takes the t-th slice "
                                     "(paper: 1,000; scripts: a fresh 1,000 each), wrapping when the source runs out")
    # steps 2-3: sampling and self-translation
    system_prompt: str = setting("You are a helpful assistant.", "system turn; empty for none")
    max_new_tokens: int = setting(2400, "answer length cap (scripts: 2400)")
    translation_max_new_tokens: int = setting(4096, "translation length cap (scripts: 4096)")
    repetition_penalty: float = setting(1.1, "HF repetition penalty of answers (scripts: 1.1; none for translations)")
    translation_request: str = setting("", "a file with the translation request, holding {text} and {lang} (the target "
                                           "language) or {source} and {target}; from a .py file its "
                                           "TRANS_INSTRUCTION (the authors' utils/trans_prompts.py); "
                                           "empty = lidr's TRANSLATION_REQUEST")
    temperature: float = setting(0.0, "0 = greedy decoding (paper); > 0 samples")
    gen_batch_size: int = setting(0, "most prompts per generation batch; 0 = auto (32 on CPU, 512 on GPU); "
                                     "batches are also capped by free memory (KV cache and prefill)")
    engine: str = setting("generate", "generate: HF generate on padded batches of similar-length prompts; "
                                      "continuous: transformers' continuous batching (paged KV cache, a finished "
                                      "sequence's place taken at once), for stages without a repetition penalty, "
                                      "which it cannot apply. Greedy answers are the same up to float rounding "
                                      "(README: Hardware)")
    answer_field: str = setting("", "qalign: the prompt records' field holding gold English answers for stage 2; "
                                    "empty = M0's own greedy answers (those LIDR's first iteration samples)")
    # step 4: pairs
    pairing: str = setting("dominant", "dominant: pairs between the first language and each other "
                                       "(paper); ranked: between every two languages, in --langs order")
    # step 5: training
    beta: float = setting(0.1, "DPO inverse temperature")
    alpha: float = setting(1.0, "weight of the length-normalised NLL of the chosen answer")
    lr: float = setting(5e-7, "peak learning rate of AdamW")
    epochs: int = setting(1, "passes over each iteration's pairs (qalign: each stage's examples)")
    batch_size: int = setting(32, "pairs (qalign: examples) per optimizer step")
    micro_batch_size: int = setting(1, "pairs per forward pass (at most --batch-size); "
                                       "gradients accumulate over the step")
    max_len: int = setting(2048, "tokens of prompt + answer kept per sequence; longer answers are cut")
    warmup_ratio: float = setting(0.1, "fraction of steps with linear warmup; cosine decay after")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    adam_beta2: float = setting(0.999, "AdamW's second-moment decay")
    max_grad_norm: float = setting(1.0, "gradient clipping threshold")
    optim: str = setting("auto", "adamw-fp32: float32 Adam moments, plus float32 master weights and gradients "
                                 "for a bf16 model (18 bytes/param in all); adamw-bf16: bf16 weights, gradients "
                                 "and moments, stochastic rounding (8 bytes/param; on float32 weights plain AdamW); "
                                 "auto: adamw-fp32 if it fits")
    gradient_checkpointing: str = setting("auto", "on: recompute each layer's activations in the backward "
                                                  "pass instead of storing them; off; auto = on on GPU")
    # evaluation: M0 and every M_t
    eval: str = setting("", "comma-separated benchmarks: toy (held-out toy problems, exact answer), capitals "
                            "(held-out questions on capitals in en, de, es: accuracy by the city's name), mgsm "
                            "(accuracy by the last number), alpaca (answers in AlpacaEval's model_outputs.json "
                            "format, for a judge to score); all but toy: off-target rate; empty = none")
    eval_langs: str = setting("", "languages to evaluate, as in --langs; empty = --langs")
    eval_limit: int = setting(0, "most problems per benchmark and language; 0 = all")
    eval_max_new_tokens: int = setting(2048, "evaluation answer length cap (the scripts' evaluation: 2048)")
    eval_prompt_template: str = setting("", "--prompt-template's format, for the questions of every benchmark in "
                                            "--eval (the authors' arithmetic evaluation can prefix MGSM's questions "
                                            "so); empty = as written")
    mgsm: str = setting("juletxara/mgsm", "MGSM's problems: a hub dataset id, or a folder of mgsm_<lang>.tsv "
                                          "(question<TAB>answer) or mgsm_<lang>.jsonl ({query, response}: the "
                                          "authors' data/MGSM) files")
    alpaca: str = setting("", "alpaca's instructions: a file or dataset in --prompts' format, or a folder of "
                              "<lang>.json lists of {id, dataset, instruction} (the authors' data/x-alpacaeval/data); "
                              "empty = the built-in prompts")
    compare: str = setting("", "run folders, comma-separated (e.g. a lidr and a qalign run): print one table of "
                               "their evaluations, M0 and each run's last model, and exit")


# The settings with a fixed set of values: argparse refuses any other, naming the flag and the set.
CHOICES = {"method": ("lidr", "qalign"), "dtype": ("auto", "bfloat16", "float32"), "recipe": ("lidr", "scripts"),
           "engine": ("generate", "continuous"), "pairing": ("dominant", "ranked"),
           "optim": ("auto", "adamw-fp32", "adamw-bf16"), "gradient_checkpointing": ("auto", "on", "off")}

# --model toy runs the toy world (end of this file) on CPU: its prompts and evaluation, and lengths
# that fit its answers. No repetition penalty: a toy answer repeats the question's name and object,
# and often one of its numbers. NLL weight 2: DPO also lowers the end-of-turn token that ends both
# answers of a pair; at 1, some toy answers ran on past it and English fell.
TOY_DEFAULTS = dict(prompts="toy", eval="toy", num_prompts=300, system_prompt="", repetition_penalty=1.0,
                     max_new_tokens=48, translation_max_new_tokens=64, eval_max_new_tokens=48, lr=1e-4, alpha=2.0,
                     batch_size=8, micro_batch_size=8, max_len=512)

# --method qalign: QAlign's SFT hyperparameters (NJUNLP/QAlign training_scripts/finetune.sh: 3 epochs,
# lr 2e-5, 128 examples per step, 3% warmup, cosine). The toy keeps its own lr and batch size.
QALIGN_DEFAULTS = dict(lr=2e-5, epochs=3, batch_size=128, warmup_ratio=0.03)
QALIGN_TOY_DEFAULTS = dict(epochs=3, warmup_ratio=0.03)

LANGUAGE_NAMES = {
    "en": "English", "es": "Spanish", "ru": "Russian", "de": "German", "fr": "French",
    "zh": "Chinese", "ja": "Japanese", "th": "Thai", "sw": "Swahili", "bn": "Bengali",
    "it": "Italian", "pt": "Portuguese", "ar": "Arabic", "ko": "Korean", "hi": "Hindi",
    "tr": "Turkish", "vi": "Vietnamese", "nl": "Dutch", "pl": "Polish", "uk": "Ukrainian",
    "te": "Telugu", "id": "Indonesian",
}


class LidrError(Exception):
    """Bad input: main() prints it as one line and exits with code 2, without a traceback."""
    exit_code = 2


class RunFault(LidrError):
    """A fault during the run (training diverged): one line, exit code 1; nothing of it is saved."""
    exit_code = 1


# ------------------------------------------------------------------------ the loop
def lidr_iteration(model, tokenizer, prompts: list[dict], languages: dict[str, str], settings: Settings,
                   folder: Path) -> dict:
    """One LIDR iteration, M_{t-1} -> M_t, in place on `model`: steps 1 to 5 in order. Each
    stage(file, compute) computes a step's records and writes them into the iteration's folder,
    or reads them back if an earlier run of this folder finished that step (the run folder
    section), so that every step leaves a file to inspect and an interrupted run resumes where it
    stopped. Returns the iteration's metrics: pairs built and skipped per language, translations
    that failed per target language, and training's."""
    langs = list(languages)
    prompts, prompts_too_long = drop_untrainable_prompts(prompts, tokenizer, languages, settings)
    prompt_translations = stage(folder / "prompt_translations.jsonl", lambda: translate(
        model, tokenizer, prompt_translation_requests(prompts, langs), languages, settings, "translating prompts"),
        settings)
    prompts = stage(folder / "prompts.jsonl", lambda: fill_prompts(prompts, prompt_translations, langs),
                    settings)
    responses = stage(folder / "responses.jsonl", lambda: sample_responses(model, tokenizer, prompts, languages,
                                                                           settings), settings)
    translations = stage(folder / "translations.jsonl", lambda: translate(
        model, tokenizer, translation_requests(prompts, responses, langs, settings.pairing, settings.recipe),
        languages, settings, "self-translating"), settings)
    built, counts = build_pairs(prompts, responses, translations, langs, settings.pairing, settings.recipe)
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
    """Iteration t takes the t-th slice of num_prompts: fresh prompts each iteration, as the
    released scripts did, as long as the source has iters * num_prompts; then it wraps around."""
    n = min(num_prompts, len(prompts))
    return [prompts[((iteration - 1) * n + i) % len(prompts)] for i in range(n)]


def looks_like_translation_task(text: str, language_names: list[str]) -> bool:
    """'Translate ... into/to/in French' within one sentence: translating such a prompt's answer
    would corrupt it (the paper's step 4). A heuristic for prompts that don't say; the verb only,
    so 'explain mRNA translation' or 'the translation of the Bible into English' don't match."""
    names = "|".join(map(re.escape, language_names))
    unquoted_or_quoted = r"""(?:'[^'\n]*'|"[^"\n]*"|[^.?!\n'"])*"""  # a quote may hold any punctuation
    pattern = rf"\btranslat(?:e|ing)\b{unquoted_or_quoted}\b(?:into|to|in)\s+(?:{names})\b"
    return re.search(pattern, text, re.IGNORECASE) is not None


def drop_untrainable_prompts(prompts: list[dict], tokenizer, languages: dict[str, str],
                             settings: Settings) -> tuple[list[dict], dict[str, int]]:
    """Prompts whose chat-formatted tokens fill --max-len can never be trained on (tokenize_pair
    would drop their pairs): leave them out before any generation, which they would only slow or
    blow up (one 100,000-character prompt's prefill alone needs tens of GB). A too-long dominant
    prompt drops its record, another language's is set to None (never translated instead).
    Returns the prompts kept and how many were too long, per language."""
    prompt_template = template(settings, "prompt_template")
    too_long_per_lang, kept = dict.fromkeys(languages, 0), []
    for prompt in prompts:
        too_long = {lang for lang in languages if prompt.get(lang) and settings.max_len <= len(chat_prompt_ids(
            tokenizer, fill_template(prompt_template, prompt[lang], languages[lang]), settings.system_prompt))}
        for lang in too_long:
            too_long_per_lang[lang] += 1
        if next(iter(languages)) not in too_long:
            kept.append({**prompt, **dict.fromkeys(too_long)})
    if any(too_long_per_lang.values()):
        tqdm.write(f"warning: prompts longer than --max-len {settings.max_len} tokens, left out: "
                   + ", ".join(f"{lang} {n}" for lang, n in too_long_per_lang.items() if n))
    return kept, too_long_per_lang


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
    """Step 2: M_{t-1} answers every prompt in its own language. With --prompt-template each prompt
    is asked inside that template (the authors' arithmetic run asks for an answer in the language
    so); "prompt" is what was asked, and becomes the prompt of the pairs."""
    prompt_template = template(settings, "prompt_template")  # the file's text ('' without the flag)
    jobs = [(prompt["id"], lang, fill_template(prompt_template, prompt[lang], languages[lang]))
            for prompt in prompts for lang in languages if prompt.get(lang)]
    ids = [chat_prompt_ids(tokenizer, text, settings.system_prompt) for _, _, text in jobs]
    answers = generate(model, tokenizer, ids, settings.max_new_tokens, settings.gen_batch_size,
                       settings.repetition_penalty, settings.temperature, desc="sampling answers",
                       engine=settings.engine)
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
             repetition_penalty: float, temperature: float, desc: str,
             engine: str = "generate") -> list[tuple[str, bool]]:
    """(answer, finished) for each token-id prompt, in input order; finished is False when the
    answer hit max_new_tokens before a stop token. engine: generate (padded_batches, below) or
    continuous (transformers' continuous batching: continuous_batches, in the plumbing; used only
    without a repetition penalty, which it cannot apply). batch_size caps the sequences generated
    at once (0: 512 on GPU, 32 on CPU, where larger batches stop paying); free memory caps the
    rest. Greedy answers are the same, up to float rounding, with either engine and any batch
    size. Prints the plan first and the measured rate after: what a time estimate needs."""
    if not prompts:
        return []
    max_batch_size = batch_size or (512 if model.device.type == "cuda" else 32)
    stops = stop_token_ids(model, tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                              do_sample=temperature > 0, temperature=temperature or None,
                              top_k=0, top_p=1.0,  # plain temperature sampling, not the model's own defaults
                              eos_token_id=stops, pad_token_id=stops[0])
    continuous = engine == "continuous" and repetition_penalty == 1.0
    tqdm.write(f"{desc}: {len(prompts)} sequences, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} "
               f"tokens, at most {max_new_tokens} new tokens each, by "
               + ("continuous batching" if continuous else "HF generate in padded batches"))
    start_time = time.perf_counter()
    if continuous:
        outputs = continuous_batches(model, prompts, config, max_batch_size, desc)
    else:
        outputs = padded_batches(model, prompts, config, max_batch_size, desc)
    answers, new_tokens_total = [], 0
    for new_tokens in outputs:
        ends = [k for k, token in enumerate(new_tokens) if token in stops]
        answers.append((tokenizer.decode(new_tokens[:ends[0] if ends else None], skip_special_tokens=True), bool(ends)))
        new_tokens_total += ends[0] + 1 if ends else len(new_tokens)
    seconds = time.perf_counter() - start_time
    tqdm.write(f"{desc}: {new_tokens_total} new tokens in {seconds:.1f} s, {new_tokens_total / max(seconds, 1e-9):.0f} "
               f"tokens/s")
    return answers


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with: render a conversation whose
    answer is a marker and take the first token after it (Llama-3: <|eot_id|>, Qwen: <|im_end|>,
    Gemma: <end_of_turn>). Training answers end with it, and generation stops at it."""
    marker = "LIDR-MARKER"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    after_answer = tokenizer(text.split(marker, 1)[1], add_special_tokens=False).input_ids
    closing = [i for i in after_answer if tokenizer.decode([i]).strip()]
    return closing[0] if closing else tokenizer.eos_token_id


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = {end_of_turn_id(tokenizer), tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def padded_batches(model, prompts: list[list[int]], config: GenerationConfig, max_batch_size: int,
                   desc: str) -> list[list[int]]:
    """HF generate on batches of similar-length prompts, left-padded: generation_batches groups
    them, shortest first, into batches of at most max_batch_size sequences whose KV cache and
    prefill (generation_memory; both in the memory planning) fit in free memory. Each batch runs
    until its longest answer ends. Returns each prompt's new tokens. The progress bar counts
    tokens, every sequence at the cap: from the first seconds its time left is the stage's longest."""
    budget = min(gathered(free_memory(model.device))) * 3 // 4  # a quarter left for the allocator's fragmentation
    fits = lambda sequences, prompt_len: generation_memory(
        model.config, model.dtype.itemsize, sequences, prompt_len, config.max_new_tokens) <= budget
    batches = generation_batches([len(p) for p in prompts], max_batch_size, fits)
    mine = range(RANK, len(batches), WORLD)  # many GPUs: each process generates every WORLD-th batch
    seed = torch.randint(2**62, ()).item()  # a seed per batch: sampled the same on one process or many
    outputs = [[]] * len(prompts)
    bar = tqdm(total=sum(len(batches[b]) for b in mine) * config.max_new_tokens, unit="tok", unit_scale=True,
               leave=False, desc=f"{desc} ({len(mine)} batches, tokens at the cap)")
    for batch in mine:
        torch.manual_seed(seed + batch)
        batch = batches[batch]
        steps = []

        def step_progress(input_ids, scores):  # called once per generated token, as a logits processor
            steps.append(bar.update(len(batch)))
            return scores
        width = max(len(prompts[i]) for i in batch)
        # Left-pad each row with its own first token: the repetition penalty counts every input
        # id, so a shared pad id (often EOS) would be penalised in padded rows only and batched
        # greedy output would differ from one-at-a-time. The attention mask hides the pads.
        input_ids = torch.tensor([[prompts[i][0]] * (width - len(prompts[i])) + prompts[i] for i in batch])
        attention_mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch])
        output = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                                generation_config=config, logits_processor=[step_progress])
        for i, new_tokens in zip(batch, output[:, width:].tolist()):
            outputs[i] = new_tokens
        bar.update(len(batch) * (config.max_new_tokens - len(steps)))  # the steps a batch ending early saves
    bar.close()
    for share in gathered({i: outputs[i] for b in mine for i in batches[b]}):  # many GPUs: every process's
        for i, new_tokens in share.items():
            outputs[i] = new_tokens
    return outputs


# ------------------------------------------------------------------------ step 3: self-translation
TRANSLATION_REQUEST = ("Translate the {source} text between <sentence> and </sentence> into {target}. "
                       "Write only the translation, between <translated> and </translated>.\n\n"
                       "<sentence>{text}</sentence>")

TRANSLATION_PREFIX = "<translated>\n"  # pre-filled assistant turn, as in the released scripts


def translation_requests(prompts: list[dict], responses: list[dict], langs: list[str], pairing: str,
                         recipe: str) -> list[dict]:
    """Step 3's work: for each pair of comparable answers, the stronger one into the weaker
    language and the weaker one back. Under --recipe lidr none for translation tasks (their pairs
    use the answers as written: translating a translation's answer would corrupt it); the
    scripts translate them too, and drop both pairs when either translation fails."""
    requests = []
    for prompt, stronger, weaker, why_not in compared_answers(prompts, responses, langs, pairing, recipe):
        if why_not is None and (recipe == "scripts" or not prompt["translation_task"]):
            requests.append({"id": prompt["id"], "source_lang": stronger["lang"], "target_lang": weaker["lang"],
                             "source": stronger["response"]})
            requests.append({"id": prompt["id"], "source_lang": weaker["lang"], "target_lang": stronger["lang"],
                             "source": weaker["response"]})
    return requests


def compared_answers(prompts: list[dict], responses: list[dict], langs: list[str], pairing: str, recipe: str):
    """(prompt record, stronger answer, weaker answer, why not) for every prompt and compared
    pair of languages. why not is None when both answers can be compared, else the reason to skip:
    no_prompt (the prompt could not be translated into a language, or was longer than --max-len
    allows: drop_untrainable_prompts), and under --recipe lidr
    unfinished (an answer hit the token cap) or empty."""
    answers = {(r["id"], r["lang"]): r for r in responses}
    for prompt in prompts:
        for stronger_lang, weaker_lang in stronger_weaker_languages(langs, pairing):
            stronger, weaker = answers.get((prompt["id"], stronger_lang)), answers.get((prompt["id"], weaker_lang))
            if stronger is None or weaker is None:
                why_not = "no_prompt"
            elif recipe == "scripts":  # the scripts compare whatever was answered
                why_not = None
            else:
                why_not = ("unfinished" if not (stronger["finished"] and weaker["finished"])
                           else "empty" if not (stronger["response"] and weaker["response"]) else None)
            yield prompt, stronger or {"lang": stronger_lang}, weaker or {"lang": weaker_lang}, why_not


def stronger_weaker_languages(langs: list[str], pairing: str) -> list[tuple[str, str]]:
    """Which languages' answers are compared: the stronger (dominant) language against each
    weaker one (paper), or, ranked, every language against every lower-ranked one."""
    if pairing == "dominant":
        return [(langs[0], weaker) for weaker in langs[1:]]
    return [(langs[i], langs[j]) for i in range(len(langs)) for j in range(i + 1, len(langs))]


def translate(model, tokenizer, requests: list[dict], languages: dict[str, str], settings: Settings,
              desc: str) -> list[dict]:
    """requests: {"id", "source_lang", "target_lang", "source"}; returns them with the model's
    raw output, the parsed "translation" (None when it failed: kept for inspection, never used) and
    the "language" it is written in (language_of; None where it can't tell, or for a language
    py3langid lacks). Under --recipe lidr a translation into another language than asked fails too:
    a small model often copies its input instead of translating, and a chosen answer in the wrong
    language would teach the model to answer in it. The request is TRANSLATION_REQUEST, or
    --translation-request's ({lang} is the target)."""
    request = template(settings, "translation_request") or TRANSLATION_REQUEST  # the file's text, if any
    ids = [chat_prompt_ids(tokenizer, request.format(
        source=languages[r["source_lang"]], target=languages[r["target_lang"]], lang=languages[r["target_lang"]],
        text=r["source"]), settings.system_prompt, TRANSLATION_PREFIX) for r in requests]
    # No repetition penalty: the prompt holds the text to copy and the closing tag (released scripts too).
    outputs = generate(model, tokenizer, ids, settings.translation_max_new_tokens, settings.gen_batch_size,
                       1.0, settings.temperature, desc=desc, engine=settings.engine)
    done = []
    for r, (raw, _) in zip(requests, outputs):
        translation = parse_translation(raw, empty_fails=settings.recipe == "lidr")
        record = {**r, "raw": raw, "translation": translation,
                  "language": language_of(translation, tuple(languages)) if translation else None}
        if settings.recipe == "lidr" and in_another_language(record):
            record["translation"] = None  # the scripts keep it
        done.append(record)
    return done


def parse_translation(generated: str, empty_fails: bool = True) -> str | None:
    """The text the model wrote after the pre-filled '<translated>\\n' and before '</translated>';
    None (a failed translation) without the closing tag, or, if empty_fails, with nothing inside
    (the scripts keep an empty translation: their pattern matches it)."""
    if "</translated>" not in generated:
        return None
    translation = generated.split("</translated>", 1)[0].strip()
    return None if empty_fails and not translation else translation


@functools.cache
def language_identifier(candidates: tuple[str, ...]) -> LanguageIdentifier | None:
    """py3langid (a character n-gram classifier of 97 languages, offline) choosing among the
    candidates; None unless it knows every one of them (it would take an unknown one for another)."""
    identifier = LanguageIdentifier.from_model_file(LANGID_MODEL, norm_probs=True)
    if len(candidates) < 2 or not set(candidates) <= set(identifier.labels):
        return None
    identifier.set_languages(list(candidates))
    return identifier


def language_of(text: str, candidates: tuple[str, ...]) -> str | None:
    """Which of the candidate languages text is written in; None when it can't tell: fewer than
    three words in Latin letters (a name alone: "Quito." reads 94% Spanish), or below 80% probability."""
    identifier = language_identifier(candidates)
    latin = all(unicodedata.name(c, "").startswith("LATIN") for c in text if c.isalpha())
    if identifier is None or (latin and len(text.split()) < 3):
        return None
    language, probability = identifier.classify(text)
    return language if probability >= 0.8 else None


def in_another_language(translation: dict) -> bool:
    return translation.get("language") not in (None, translation["target_lang"])


# ------------------------------------------------------------------------ step 4: preference pairs
def build_pairs(prompts: list[dict], responses: list[dict], translations: list[dict], langs: list[str],
                pairing: str, recipe: str) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """For each prompt and (stronger, weaker) language pair:
      stronger: prompt x_stronger, chosen y_stronger,                   rejected translate(y_weaker -> stronger)
      weaker:   prompt x_weaker,   chosen translate(y_stronger -> weaker), rejected y_weaker
    Translation tasks: the weaker pair's chosen answer is y_stronger as written; under --recipe
    lidr the stronger pair's rejected one is y_weaker as written too. The stronger language is the
    dominant one (paper), or the higher-ranked one with --pairing ranked.
    --recipe lidr skips a pair when its answers can't be compared (compared_answers), a
    translation it needs failed or is in another language (translate), or chosen == rejected.
    --recipe scripts does what the authors' utils/preprocess_dpo_format_dataset.py does: both
    pairs are dropped when either translation failed, unfinished, empty, identical and
    wrong-language answers are kept, and only the English pairs against the last language are kept
    (their loop writes one English file per language, each over the last: "overwritten").
    Returns the pairs and, per language, counts of "pairs" built and of each reason to skip."""
    translated = {(t["id"], t["source_lang"], t["target_lang"]): t for t in translations}
    # "pairs" built, or why not: compared_answers' reasons first, then this function's own
    reasons = ("pairs", "no_prompt", "unfinished", "empty", "translation_failed", "wrong_language", "identical",
               "overwritten")
    counts = {lang: dict.fromkeys(reasons, 0) for lang in langs}
    pairs = []

    def add(answer, kind, other_lang, chosen, rejected, translation_record=None):
        lang = answer["lang"]
        failed = "wrong_language" if translation_record and in_another_language(translation_record) \
            else "translation_failed"
        reason = (failed if chosen is None or rejected is None
                  else "identical" if chosen == rejected and recipe == "lidr" else "pairs")
        counts[lang][reason] += 1
        if reason == "pairs":  # the prompt is the one its language's answer was sampled with
            pairs.append({"prompt": answer["prompt"], "chosen": chosen, "rejected": rejected,
                          "id": answer["id"], "lang": lang, "kind": kind, "other_lang": other_lang})

    for prompt, stronger, weaker, why_not in compared_answers(prompts, responses, langs, pairing, recipe):
        stronger_lang, weaker_lang = stronger["lang"], weaker["lang"]
        if why_not:
            counts[stronger_lang][why_not] += 1
            counts[weaker_lang][why_not] += 1
            continue
        back = translated.get((prompt["id"], weaker_lang, stronger_lang), {})  # y_weaker, into stronger
        forward = translated.get((prompt["id"], stronger_lang, weaker_lang), {})  # y_stronger, into weaker
        back_translated, forward_translated = back.get("translation"), forward.get("translation")
        keep_stronger_pair = True
        if recipe == "scripts":
            kept_english = weaker_lang == langs[-1]  # the English pair the scripts' last file write keeps
            if back_translated is None or forward_translated is None:  # either failed: both pairs dropped
                counts[stronger_lang]["translation_failed" if kept_english else "overwritten"] += 1
                counts[weaker_lang]["translation_failed"] += 1
                continue
            if not kept_english:
                counts[stronger_lang]["overwritten"] += 1
            keep_stronger_pair = kept_english
        # The paper's two pairs. Translating the answer of a translation task would corrupt it:
        # there the answers are paired as written (the scripts still back-translate the weaker one).
        if keep_stronger_pair and prompt["translation_task"] and recipe == "lidr":
            add(stronger, "own>untranslated", weaker_lang, stronger["response"], weaker["response"])
        elif keep_stronger_pair:
            add(stronger, "own>translated", weaker_lang, stronger["response"], back_translated, back)
        if prompt["translation_task"]:
            add(weaker, "untranslated>own", stronger_lang, stronger["response"], weaker["response"])
        else:
            add(weaker, "translated>own", stronger_lang, forward_translated, weaker["response"], forward)
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
    """Prompt ids + answer ids + end-of-turn, each part tokenised on its own and the ids
    concatenated: tokenising the joined text could merge tokens across the boundary (a known DPO
    trap). An answer too long for max_len is cut at its end; the prompt is kept whole, since
    cutting it would drop BOS, the system turn and the chat header. None if the prompt alone
    fills max_len."""
    prompt_ids = chat_prompt_ids(tokenizer, pair["prompt"], system_prompt)
    room = max_len - len(prompt_ids)
    if room < 1:
        return None
    chosen, rejected = (tokenizer(pair[side], add_special_tokens=False).input_ids + [end_of_turn]
                        for side in ("chosen", "rejected"))
    return TokenizedPair(len(prompt_ids), prompt_ids + chosen[:room], prompt_ids + rejected[:room], pair["lang"],
                         truncated=max(len(chosen), len(rejected)) > room)


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


@torch.no_grad()
def reference_logps(model, pairs: list[TokenizedPair], micro_batch_size: int, pad_id: int):
    """The reference model's log-probs log ref(y|x) of every pair's chosen and rejected answer,
    (N,) each, computed once with M_{t-1} before any update: no second model in memory."""
    starts = range(0, len(pairs), micro_batch_size)
    logps = {}
    for start in tqdm(starts[RANK::WORLD], desc="reference log-probs", leave=False):  # many GPUs: a share each
        chosen, rejected, _ = chosen_rejected_logps(model, pairs[start:start + micro_batch_size], pad_id)
        logps[start] = (chosen.cpu(), rejected.cpu())
    logps = {start: both for share in gathered(logps) for start, both in share.items()}
    return torch.cat([logps[start][0] for start in starts]), torch.cat([logps[start][1] for start in starts])


def chosen_rejected_logps(model, pairs: list[TokenizedPair], pad_id: int):
    """One forward over [chosen_1..B, rejected_1..B] -> chosen logps, rejected logps, chosen lengths (B,)."""
    sequences = ([(p.chosen_input_ids, p.prompt_length) for p in pairs]
                 + [(p.rejected_input_ids, p.prompt_length) for p in pairs])
    input_ids, attention_mask, labels = (t.to(model.device) for t in collate(sequences, pad_id))
    logps, lengths = chunked_sequence_logps(model, input_ids, attention_mask, labels)
    return logps[:len(pairs)], logps[len(pairs):], lengths[:len(pairs)]


def sequence_logps(model, input_ids, attention_mask, labels):
    """Sum of log pi(token) over the labelled (answer) tokens of each sequence, and their count:
    (logps (B,), lengths (B,)). The plain version, to read; training uses chunked_sequence_logps,
    which gives the same numbers without ever holding these (B, T, V) float32 logits (4.2 GB
    for one pair of 2 x 2,048 tokens over Llama-3's 128k vocabulary, and as much for their gradient)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]  # the token each position predicts; -100 on prompt and padding
    mask = targets != -100
    token_logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


# Answer tokens whose float32 logits exist at once. A chunk's backward pass holds four float32
# (tokens x vocabulary) tensors: logits, log-probs, softmax and gradient. Over Llama-3's 128k
# vocabulary that is 2.1 GB for 1,024 tokens; for a whole 2 x 2,048-token pair at once, up to 8.4 GB.
LOGPS_CHUNK_TOKENS = 1024


def chunked_sequence_logps(model, input_ids, attention_mask, labels):
    """sequence_logps in less memory, to float rounding the same numbers and gradients
    (test_chunked_logps_and_gradients_equal_full_vocab_logps): logits are made only for answer
    positions, LOGPS_CHUNK_TOKENS at a time, and recomputed in the backward pass instead of stored."""
    # The model's own forward, where FSDP gathers a sharded model's weights, with logits for one
    # position only; use_cache=False: a KV cache is for generating, here it would only hold memory.
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
    # margin is a difference of such sums; the float32 result is then exact to its rounding.
    logps = torch.zeros(len(input_ids), dtype=torch.float64, device=token_logps.device)
    logps = logps.index_add(0, sequence_of_token, token_logps.double()).float()
    return logps, mask.sum(-1)


def answer_token_logps(output_layer, hidden, targets):
    """log pi(target) for a chunk of answer positions: hidden (n, H), targets (n,) -> (n,)."""
    logits = output_layer(hidden).float()  # (n, V), float32: bf16 log-softmax loses precision
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def accumulate_gradients(model, pairs: list[TokenizedPair], ref_chosen_logps, ref_rejected_logps,
                         beta: float, alpha: float, micro_batch_size: int, pad_id: int) -> dict:
    """Backward over one optimizer step's pairs in micro-batches. Each micro-batch's mean loss is
    weighted by its share of the step's pairs, so the gradient is the mean over the step's pairs
    whatever the micro-batching (averaging per micro-batch would weight a short last one more).
    Returns the step's per-pair metrics (N,), in the order of pairs, and their token counts."""
    micro_batches = length_grouped([max(len(p.chosen_input_ids), len(p.rejected_input_ids)) for p in pairs],
                                   micro_batch_size)
    metrics = []
    for micro, factor in this_process_share(micro_batches):
        chosen, rejected, chosen_lengths = chosen_rejected_logps(model, [pairs[i] for i in micro], pad_id)
        loss, micro_metrics = dpo_nll_loss(chosen, rejected, ref_chosen_logps[micro].to(model.device),
                                           ref_rejected_logps[micro].to(model.device), chosen_lengths, beta, alpha)
        (loss * len(micro) / len(pairs) * factor).backward()
        tokens = [len(pairs[i].chosen_input_ids) + len(pairs[i].rejected_input_ids) for i in micro]
        metrics += [(micro, {**micro_metrics, "tokens": torch.tensor(tokens)})] if factor else []
    return in_step_order(metrics)


def length_grouped(lengths: list[int], micro_batch_size: int) -> list[list[int]]:
    """One optimizer step's examples (by index) cut into micro-batches of similar lengths: each
    micro-batch is padded to its longest sequence, so sorting first pads less (random 64-sequence
    toy batches are 37% padding; sorted into micro-batches of 16, 11%). The step's examples, and so
    its gradient, are the same."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start:start + micro_batch_size] for start in range(0, len(order), micro_batch_size)]


def this_process_share(micro_batches: list[list[int]]) -> list[tuple[list[int], int]]:
    """The micro-batches this process runs, with a factor for its loss: all of them, 1, on one
    process. On many, every WORLD-th, WORLD (FSDP averages the processes' gradients: the sum is the
    step's), and as many on each process: FSDP's collectives run in lockstep, so factor-0 repeats
    pad the shorter shares."""
    mine = micro_batches[RANK::WORLD]
    return [(micro, WORLD) for micro in mine] + [(micro_batches[0], 0)] * (-(-len(micro_batches) // WORLD) - len(mine))


def in_step_order(metrics: list[tuple[list[int], dict]]) -> dict:
    """Per-example metrics of length-grouped micro-batches (every process's), back in the step's order."""
    metrics = [item for share in gathered([(micro, {name: value.cpu() for name, value in m.items()})
                                           for micro, m in metrics]) for item in share]
    order = torch.tensor([i for micro, _ in metrics for i in micro]).argsort()
    return {name: torch.cat([m[name] for _, m in metrics])[order] for name in metrics[0][1]}


def train(model, example_langs: list[str], accumulate, settings: Settings, log_path: Path,
          progress: Path | None = None, progress_every: int = 100) -> dict:
    """The optimizer loop of every training in this file: DPO + NLL (step 5), QAlign's two SFT
    stages, and the toy M0's pre-training. example_langs holds each training example's language.
    Each step takes --batch-size examples in a seeded shuffled order, epoch after epoch, and runs
    accumulate(model, example indices): their forward and backward passes in micro-batches, each
    micro-batch's loss weighted so that the gradient is the step's mean (accumulate_gradients,
    nll_gradients), returning per-example metric tensors and token counts. Then clip, step,
    schedule, log: AdamW (optimizer_for: float32 master weights or BF16AdamW for a bf16 model;
    before the run, the memory plan chose --optim auto's and resolve --gradient-checkpointing
    auto's), warmup then cosine decay, one line of metrics per step in log_path. With progress
    (only the toy M0's pre-training has one), all a training needs to go on is saved there every
    progress_every steps, and an interrupted one goes on from it; an interrupted DPO training
    starts again from M_{t-1}. Returns the last epoch's metrics, averaged over its examples and
    per language."""
    whole, model = model, fully_sharded(model) if WORLD > 1 else model  # many GPUs: train a sharded copy
    optimizer = optimizer_for([p for p in model.parameters() if p.requires_grad], settings)
    trained = optimizer.param_groups[0]["params"]  # the model's weights, or their float32 masters
    generator = torch.Generator().manual_seed(settings.seed)
    steps = [(epoch, step_ids) for epoch in range(settings.epochs)
             for step_ids in torch.randperm(len(example_langs), generator=generator).split(settings.batch_size)]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(len(steps), settings.warmup_ratio))
    if settings.gradient_checkpointing == "on":  # transformers 5's name for gradient_checkpointing_enable
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # HF checkpoints layers only in train mode; dropout was switched off in load_model
    parts = {"model": model, "optimizer": optimizer, "schedule": schedule}
    saved = load_progress(progress, parts)  # an interrupted training's: go on from its last save
    start, logged, last_epoch, last_epoch_langs = saved or (0, [], [], [])
    tqdm.write(f"training on {len(example_langs)} examples: {settings.epochs} epoch(s) of "
               f"{len(steps) // settings.epochs} steps, {settings.batch_size} per step in micro-batches of "
               f"{settings.micro_batch_size}")
    partial_log = temp_path(log_path)  # this process's; renamed into place when training ends
    tokens_trained, start_time = 0, time.perf_counter()
    with written_whole(partial_log, log_path), open(partial_log if RANK == 0 else os.devnull, "w") as log, \
            tqdm(total=len(steps), initial=start, desc="training", unit="step") as bar:
        log.writelines(logged)
        for step, (epoch, step_ids) in enumerate(steps[start:], start + 1):
            metrics = accumulate(model, step_ids.tolist())  # forward and backward, micro-batch by micro-batch
            tokens_trained += metrics.pop("tokens").sum().item()
            if isinstance(optimizer, MasterWeightAdamW):  # as AMP's unscale_: clip the float32 gradients
                optimizer.take_gradients()
            grad_norm = torch.nn.utils.clip_grad_norm_(trained, settings.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if WORLD > 1 else grad_norm  # over all the shards
            line = {"step": step, "epoch": epoch + 1, **{k: v.mean().item() for k, v in metrics.items()},
                    "optim/lr": schedule.get_last_lr()[0], "optim/grad_norm": grad_norm.item()}
            stop_if_diverged(line, settings)  # before one step makes every weight NaN
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            logged.append(to_json(line) + "\n")
            log.write(logged[-1])
            log.flush()
            bar.set_postfix_str(" ".join(f"{label} {line[name]:.3f}" for name, label in (
                ("loss/total", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"),
                ("loss/nll", "nll")) if name in line))
            bar.update()
            if epoch == settings.epochs - 1:
                last_epoch.append(metrics)
                last_epoch_langs += [example_langs[i] for i in step_ids]
            if progress is not None and step % progress_every == 0 and step < len(steps):
                save_progress(progress, parts, (step, logged, last_epoch, last_epoch_langs))
    if RANK == 0:  # many GPUs: rank 0 writes the run folder
        os.replace(partial_log, log_path)
    seconds = time.perf_counter() - start_time
    tqdm.write(f"training: {tokens_trained} tokens in {seconds:.1f} s, {tokens_trained / max(seconds, 1e-9):.0f} "
               f"tokens/s")
    model.eval()
    if settings.gradient_checkpointing == "on":
        model.activation_checkpointing_disable()
    if WORLD > 1:  # many GPUs: the trained shards back into every process's whole model
        with torch.no_grad():
            for weight, shard in zip(whole.parameters(), model.parameters()):
                weight.copy_(shard.full_tensor())
        del model
        gc.collect()  # FSDP's copy holds reference cycles: free its shards now, not at some later collection
    return {"steps": len(steps), **means_per_language(last_epoch, last_epoch_langs)}


def warmup_cosine(total_steps: int, warmup_ratio: float):
    warmup = round(total_steps * warmup_ratio)

    def factor(step):  # multiplies --lr at optimizer step `step` (0-based)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return factor


# ------------------------------------------------------------------------ run and main
def run(settings: Settings, command: list[str]):
    """A whole run into the run folder: M0 -> M1 -> ... -> M_iters (or QAlign's two stages),
    evaluating M0 and every M_t with --eval (evaluate_once, in the evaluation section). A folder
    with finished work goes on where it stopped (resume_point). From the plumbing: resolve fills
    in the 'auto' settings; open_run checks, loads the model, and locks and records the folder;
    finished_metrics reads a finished iteration's metrics; run_tables are the tables printed."""
    languages = parse_languages(settings.langs)
    langs = list(languages)
    all_prompts = load_prompts(settings.prompts, settings.prompt_field, languages, settings.translation_tasks,
                               answer_field=settings.answer_field)
    problems = eval_problems(settings)  # read before anything runs: bad input fails early
    settings = resolve(settings)
    out = Path(settings.out)
    start, start_model = resume_point(out, settings)
    # run_folder_lock: one process per folder, for as long as this function runs
    model, tokenizer, settings, run_folder_lock = open_run(out, settings, command, start_model, all_prompts, problems)
    history, evaluations = [], []
    if problems:  # iter_0 holds M0's evaluation
        evaluations.append(evaluate_once(model, tokenizer, problems, settings, out, 0, in_memory=start == 1))
        print(eval_table(evaluations, model_names(settings.method, 1), langs[0]))
    for t in range(1, settings.iters + 1):
        folder = out / f"iter_{t}"
        folder.mkdir(exist_ok=True)
        if t < start:  # finished before: M_t is saved, and its metrics are in its folder
            history.append(finished_metrics(folder, langs, settings))
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
    if problems:
        compare_with_sibling(out, settings)


def resume_point(out: Path, settings: Settings) -> tuple[int, str]:
    """Where a run starts: the iteration after the last one whose model (M_t) is saved in the run
    folder, and the model it starts from (that M_t, else --model). Earlier iterations are read,
    not redone; within the starting iteration every step whose file is there is reused (stage),
    and its training, if it was interrupted, starts again. check_resumable (in open_run) has
    already refused a folder made with other settings or inputs."""
    t = last_saved(out, settings.iters)
    if t == 0:
        return 1, settings.model
    finished(out / f"iter_{t}" / "model")  # a damaged M_t is refused in one line
    return t + 1, str(out / f"iter_{t}" / "model")


def last_saved(out: Path, iters: int) -> int:
    return max((t for t in range(1, iters + 1) if (out / f"iter_{t}" / "model").exists()), default=0)


def main(argv: list[str] | None = None) -> int:
    """The command line: parse_settings reads and checks the flags, then run, or --compare's table.
    Bad input (LidrError) and faults are one line and an exit code, never a traceback; an
    interrupt says what was kept (finished_work) and how to resume."""
    command = sys.argv if argv is None else ["lidr.py", *argv]
    settings, launched = None, WORLD > 1 and "LIDR_LAUNCHER" in os.environ  # launch reports for every process
    on_sigterm = signal.signal(signal.SIGTERM, signal.SIG_DFL if launched else raise_terminated)
    if launched:  # stopped by launch, quietly; the next run's lock holder clears what was half written
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        settings = parse_settings(command[1:])
        if settings.compare:
            print(compare_table(settings.compare.split(",")))
            return 0
        if settings.nproc_per_node > 1 and WORLD == 1:  # many GPUs: start the processes, as torchrun does
            return launch(settings, command)
        if WORLD > 1:  # many GPUs: one process group, a GPU each; rank 0 alone prints the run's output
            if torch.cuda.is_available():
                torch.cuda.set_device(LOCAL_RANK)
            # a process may wait hours for the others' share of a stage: no 10-minute timeout
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(days=7))
            if RANK:
                sys.stdout = open(os.devnull, "w")
                tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)
                transformers.utils.logging.disable_progress_bar()
        run(settings, command)
    except (KeyboardInterrupt, Terminated) as interrupt:  # every finished stage is already on disk, whole
        if RANK == 0 and not launched:
            print(f"lidr: interrupted; {finished_work(settings and resolve(settings))}; to resume, run the same "
                  f"command: python {shlex.join(command)}", file=sys.stderr)
        return 143 if isinstance(interrupt, Terminated) else 130
    except Exception as error:
        if launched:  # launch names the process that failed first, and why
            ErrorHandler().record_exception(error)
            return getattr(error, "exit_code", 1)
        if isinstance(error, LidrError):
            if RANK == 0:  # every process finds the same bad input
                print(f"lidr: error: {error}", file=sys.stderr)
            return error.exit_code
        if not isinstance(error, OSError):  # a bug: its traceback
            raise
        # a full disk, a folder that became read-only: during the run, after the checks
        print(f"lidr: error: {error.strerror or error}: {error.filename or 'a file of the run'}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


class Terminated(Exception):
    """SIGTERM (a job scheduler's stop), raised where the run is, as Ctrl-C raises KeyboardInterrupt."""


def raise_terminated(signum, frame):
    raise Terminated


# ======================================================================== PLUMBING
# What a first reading can skip: checking the settings and inputs, reading files, loading models,
# planning memory, the bf16 optimizers, the run folder, and the tables a run prints.

# ------------------------------------------------------------------------ validation
class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise LidrError(message)


HELP = ("LIDR (Language Imbalance Driven Rewarding, Yang et al., ICLR 2025): each iteration the model answers "
        "the same prompts in every language, translates its answers between the dominant language and the others, "
        "builds preference pairs from the gap and trains on them with DPO + NLL. 'python lidr.py --iters 2' runs "
        "it on the paper's model where a CUDA GPU is visible, else on the built-in toy world, offline. The method "
        "and its departures from the authors' scripts: the top of lidr.py and the README.")


def parse_settings(argv: list[str]) -> Settings:
    parser = OneLineArgumentParser(description=HELP, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Settings):
        toy = f"; toy: {TOY_DEFAULTS[f.name]}" if f.name in TOY_DEFAULTS else ""
        qalign = f"; qalign: {QALIGN_DEFAULTS[f.name]}" if f.name in QALIGN_DEFAULTS else ""
        parser.add_argument("--" + f.name.replace("_", "-"), type=f.type, choices=CHOICES.get(f.name),
                            help=f"{f.metadata['help']} [default: {f.default!r}{toy}{qalign}]")
    given = vars(parser.parse_args(argv))  # only the flags on the command line (SUPPRESS)
    for name, value in given.items():  # argparse reads "--iters=--" as an empty list
        if isinstance(value, list):
            raise LidrError(f"--{name.replace('_', '-')}: expected a value, got '--'")
    if "compare" in given:  # a table of finished runs, not a run
        if len(given) > 1:
            raise LidrError(f"--compare takes no other flag (got --{next(n for n in given if n != 'compare')})")
        folders = [folder.strip() for folder in given["compare"].split(",")]
        if not all(folders):
            raise LidrError(f"--compare: expected run folders, comma-separated (got '{given['compare']}')")
        return Settings(compare=",".join(folders))
    if given.get("model", "auto") == "auto":  # resolved (and said) here: it decides the toy defaults
        given["model"] = choose_model(given.get("device", "auto"))
    toy, qalign = given.get("model") == "toy", given.get("method") == "qalign"
    # in this order: QAlign's SFT settings, then the toy's, which keep QAlign's epochs and warmup
    preset = {**(QALIGN_DEFAULTS if qalign else {}), **(TOY_DEFAULTS if toy else {}),
              **(QALIGN_TOY_DEFAULTS if qalign and toy else {})}
    settings = Settings(**{**preset, **given})
    for name in ("langs", "eval_langs", "eval"):  # "en, de" and "en,de" are one setting
        setattr(settings, name, ",".join(item.strip() for item in getattr(settings, name).split(",")))
    if "micro_batch_size" not in given:  # a default must never clash with the user's --batch-size
        settings.micro_batch_size = min(settings.micro_batch_size, settings.batch_size)
    check_settings(settings)
    out = Path(settings.out).absolute()  # a path the file system cannot hold: bad input, not a fault mid-run
    nearest = next(folder for folder in out.parents if os.path.isdir(folder))
    if settings.out and (len(os.fsencode(out)) + 64 > os.pathconf(nearest, "PC_PATH_MAX") or any(
            len(os.fsencode(name)) > os.pathconf(nearest, "PC_NAME_MAX") for name in out.relative_to(nearest).parts)):
        raise LidrError(f"--out {settings.out}: a name or the path is longer than the file system allows")
    for name, benchmark in (("eval_langs", ""), ("eval_limit", ""), ("eval_max_new_tokens", ""),
                            ("eval_prompt_template", ""), ("mgsm", "mgsm"), ("alpaca", "alpaca")):
        used = benchmark in settings.eval.split(",") if benchmark else settings.eval
        if name in given and not used:  # a flag must never be silently ignored
            raise LidrError(f"--{name.replace('_', '-')} has no effect without --eval {benchmark}".rstrip())
    unused = (("beta", "alpha", "pairing", "recipe", "iters", "translation_tasks")  # LIDR's pairs only
              + (("max_new_tokens",) if settings.answer_field else ()) if qalign else ("answer_field",))
    for name in unused:
        if name in given and not (name == "iters" and settings.iters == 2):
            raise LidrError(f"--{name.replace('_', '-')} has no effect with --method {settings.method}"
                            + (" (its 2 stages are its iterations)" if name == "iters" else "")
                            + (" and --answer-field (no answers are sampled)" if name == "max_new_tokens" else ""))
    return settings


def choose_model(device: str) -> str:
    """--model auto: the paper's model where it can run (a CUDA GPU), else the toy world; says which."""
    if device != "cpu" and torch.cuda.is_available():
        print(f"--model auto: a CUDA GPU is visible, so the paper's model {PAPER_MODEL}; "
              f"--model toy runs the toy world")
        return PAPER_MODEL
    why = "--device cpu" if device == "cpu" else "no CUDA GPU is visible"
    print(f"--model auto: {why}, so the toy world (--model toy, README: The toy world); "
          f"--model {PAPER_MODEL} runs the paper's model")
    return "toy"


def check_settings(settings: Settings):
    rules = {  # setting: (holds?, what it must be)
        "iters": (1 <= settings.iters <= 1000, "between 1 and 1000"),
        "seed": (settings.seed >= 0, ">= 0"),  # numpy's seeds, which transformers.set_seed sets, are unsigned
        "num_prompts": (settings.num_prompts >= 1, ">= 1"),
        "nproc_per_node": (settings.nproc_per_node >= 1, ">= 1"),
        "max_new_tokens": (settings.max_new_tokens >= 1, ">= 1"),
        "translation_max_new_tokens": (settings.translation_max_new_tokens >= 1, ">= 1"),
        "repetition_penalty": (settings.repetition_penalty >= 0.01, ">= 0.01"),
        "temperature": (settings.temperature == 0 or settings.temperature >= 0.01, "0 (greedy) or >= 0.01"),
        "gen_batch_size": (settings.gen_batch_size >= 0, ">= 0"),
        "beta": (settings.beta > 0, "> 0"),
        "alpha": (settings.alpha >= 0, ">= 0"),
        "lr": (settings.lr > 0, "> 0"),
        "epochs": (settings.epochs >= 1, ">= 1"),
        "batch_size": (settings.batch_size >= 1, ">= 1"),
        "micro_batch_size": (1 <= settings.micro_batch_size <= settings.batch_size, "between 1 and --batch-size"),
        "max_len": (settings.max_len >= 8, ">= 8"),
        "warmup_ratio": (0 <= settings.warmup_ratio < 1, "in [0, 1)"),
        "weight_decay": (settings.weight_decay >= 0, ">= 0"),
        "adam_beta2": (0 <= settings.adam_beta2 < 1, "in [0, 1)"),
        "max_grad_norm": (settings.max_grad_norm > 0, "> 0"),
        "eval": (set(filter(None, settings.eval.split(","))) <= set(BENCHMARKS), "a comma-separated list of "
                 + ", ".join(BENCHMARKS)),
        "eval_limit": (settings.eval_limit >= 0, ">= 0"),
        "eval_max_new_tokens": (settings.eval_max_new_tokens >= 1, ">= 1"),
    }
    for f in dataclasses.fields(Settings):
        if f.type is float and not math.isfinite(getattr(settings, f.name)):  # float() reads "inf" and "nan" too
            rules[f.name] = (False, "a finite number")
        if f.type is int and getattr(settings, f.name) >= 2**31:  # beyond any real size, and torch's indices
            rules[f.name] = (False, "below 2**31")
    for name, (holds, expected) in rules.items():
        if not holds:
            raise LidrError(f"--{name.replace('_', '-')} must be {expected} (got {getattr(settings, name)})")
    if settings.device != "auto":
        try:
            kind = torch.device(settings.device).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):  # the memory plan and the optimizers know these two
            raise LidrError(f"--device {settings.device}: use auto, cpu, cuda or cuda:N")
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise LidrError(f"--device {settings.device}: no CUDA GPU is visible; use --device cpu")
    if (WORLD > 1 or settings.nproc_per_node > 1) and (settings.engine, settings.optim, settings.device) != (
            "generate", "auto", "auto"):  # many GPUs: one each, --engine generate, AdamW on float32 shards
        raise LidrError("many processes take a GPU each: leave --device, --engine and --optim at their defaults")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and settings.nproc_per_node > gpus:
        raise LidrError(f"--nproc-per-node {settings.nproc_per_node}: {gpus} GPUs are visible")
    if settings.recipe == "scripts" and settings.pairing != "dominant":
        raise LidrError("--recipe scripts pairs the dominant language with each other (the scripts have no "
                        "--pairing ranked); pass --recipe lidr for it")
    for name in TEMPLATES:
        template(settings, name)  # a template that can't be read or filled fails here, before any work
    if settings.model == "toy":
        check_toy_languages(parse_languages(settings.langs), "--model toy")
    if len(parse_languages(settings.langs)) < 2:
        raise LidrError(f"--langs needs at least two languages, dominant first (got '{settings.langs}')")
    if settings.eval_langs:
        parse_languages(settings.eval_langs, flag="--eval-langs")


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
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if WORLD > 1 and device == "cuda":  # many GPUs: one each
        device = f"cuda:{LOCAL_RANK}"
    dtype = settings.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    checkpointing = settings.gradient_checkpointing
    if checkpointing == "auto":
        checkpointing = "on" if device.startswith("cuda") else "off"
    codes = "-".join(parse_languages(settings.langs))
    method = "-qalign" if settings.method == "qalign" else ""  # beside the LIDR run, with the same M0
    out = settings.out or f"runs/{Path(settings.model).name}-{codes}-seed{settings.seed}{method}"
    return dataclasses.replace(settings, device=device, dtype=dtype, out=out, gradient_checkpointing=checkpointing)


def stop_if_diverged(line: dict, settings: Settings):
    """A step with a non-finite loss or gradient would make every weight NaN: stop before the
    model is stepped, saved or trained on (line: the step's logged metrics)."""
    loss = line.get("loss/total", line.get("loss/nll"))  # DPO + NLL, or SFT's NLL
    if not (math.isfinite(loss) and math.isfinite(line["optim/grad_norm"])):
        raise RunFault(f"training diverged at step {line['step']}: loss {loss}, gradient norm "
                       f"{line['optim/grad_norm']}; nothing of this training was saved: lower --lr "
                       f"(now {settings.lr}) and run again with another --out")


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ------------------------------------------------------------------------ file readers
def load_prompts(source: str, prompt_field: str, languages: dict[str, str], translation_tasks: str = "",
                 flag: str = "--prompts", answer_field: str = "") -> list[dict]:
    """Step 1's prompts, as records {"id": "p1", "translation_task": false, "en": "...", "de": "..."}.
    translation_task is the record's own flag, else whether the hand list translation_tasks (a
    file) has its id, else looks_like_translation_task of the dominant prompt. Languages a record
    lacks are left out here: the model translates them (fill_prompts). With answer_field, each
    record's gold English answer is kept as "answer" (QAlign's stage 2)."""
    langs = list(languages)
    dominant = langs[0]
    language_names = sorted(set(LANGUAGE_NAMES.values()) | set(languages.values()))
    if not source:
        records, where = BUILTIN_PROMPTS, "built-in prompts"  # written for this kit, at the end of the file
    elif source == "toy":
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
    hand_listed = read_translation_tasks(Path(translation_tasks)) if translation_tasks else None
    prompts, seen = [], set()
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise LidrError(f"{where}: record {number}: expected a JSON object per prompt")
        line = record.get("_line", number)  # a .jsonl file's own line number, for error messages
        where = record.get("_where", where)  # the file of a per-language folder's record
        if not isinstance(record.get("translation_task", False), bool):
            raise LidrError(f"{where}:{line}: translation_task must be true or false")
        prompt_id = str(record.get("id", f"p{number}"))
        if prompt_id in seen:
            raise LidrError(f"{where}:{line}: id '{prompt_id}' appears twice")
        seen.add(prompt_id)
        for lang in langs:
            if lang in record and not isinstance(record[lang], str):  # never replaced by a translation unasked
                raise LidrError(f"{where}:{line}: '{lang}' must be text (leave it out for the model to translate)")
        text = {lang: record[lang] for lang in langs if record.get(lang, "").strip()}
        if not all(map(is_unicode, text.values())):  # JSON's \ud800 escapes decode to what no file can hold
            raise LidrError(f"{where}:{line}: the text is not valid Unicode (a lone surrogate)")
        if dominant not in text:
            raise LidrError(f"{where}:{line}: prompt '{prompt_id}' has no '{dominant}' text "
                            f"(the dominant language, first in --langs)")
        translation_task = record.get("translation_task", prompt_id in hand_listed if hand_listed is not None
                                      else looks_like_translation_task(text[dominant], language_names))
        if answer_field and not isinstance(record.get(answer_field), str):
            raise LidrError(f"{where}:{line}: prompt '{prompt_id}' has no '{answer_field}' text (--answer-field)")
        prompts.append({"id": prompt_id, "translation_task": translation_task, **text,
                        **({"answer": record[answer_field]} if answer_field else {})})
    if not prompts:
        raise LidrError(f"{where}: no prompts")
    return prompts


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    records = []
    for number, line in enumerate(content.splitlines(), 1):
        if line.strip():
            record = parse_json(line, path, number)
            if not isinstance(record, dict):
                raise LidrError(f"{path}:{number}: expected a JSON object per prompt")
            records.append({**record, "_line": number})
    return records


def parse_json(text: str, path: Path, line: int | None = None):
    """text (the file's, or its line `line`) as JSON; bad JSON is one line naming the file and line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise LidrError(f"{path}:{line or error.lineno}: not valid JSON ({error.msg})") from None
    except RecursionError:
        raise LidrError(f"{path}{f':{line}' if line else ''}: nested too deep to be a record") from None


def read_language_folders(folders: list[str], prompt_field: str, langs: list[str], flag: str) -> list[dict]:
    """The authors' layout: in each folder one <lang>.jsonl per language of langs, records
    {"id", prompt_field, maybe "input", other fields ignored}, joined across languages by id, in the
    dominant file's order. Where the ids differ, a file whose every id starts with its language code
    has the code dropped: their GSM8K files join "degsm8k_0" to English "gsm8k_0". Folders are read
    one after the other, so with 1,000 prompts in each, iteration t takes the t-th folder, as the authors did."""
    records = []
    for folder in folders:
        if not folder.strip():
            raise LidrError(f"{flag}: an empty folder name in the list '{','.join(folders)}'")
        by_lang = {}  # lang -> {id: (text, line)}
        for lang in langs:
            path = Path(folder) / f"{lang}.jsonl"
            if not path.is_file():
                raise LidrError(f"{flag}: {path} not found (a folder of per-language prompt files needs one "
                                f"for each language of --langs)")
            by_lang[lang] = {}
            for record in read_prompt_file(path, flag):
                line, text, extra = record["_line"], record.get(prompt_field), record.get("input") or ""
                if "id" not in record:
                    raise LidrError(f"{path}:{line}: the record has no 'id' "
                                    f"(records are joined across languages by id)")
                if not isinstance(text, str) or not text.strip() or not isinstance(extra, str):
                    raise LidrError(f"{path}:{line}: '{prompt_field}' (and 'input', if any) must be text")
                if str(record["id"]) in by_lang[lang]:
                    raise LidrError(f"{path}:{line}: id '{record['id']}' appears twice")
                # a non-empty input follows its instruction after a newline, as the scripts join them
                by_lang[lang][str(record["id"])] = (text + "\n" + extra if extra else text, line)
        if any(ids.keys() != by_lang[langs[0]].keys() for ids in by_lang.values()):  # GSM8K: degsm8k_0 ~ gsm8k_0
            coded = {lang for lang, ids in by_lang.items() if all(prompt_id.startswith(lang) for prompt_id in ids)}
            by_lang = {lang: {(prompt_id.removeprefix(lang) if lang in coded else prompt_id): value
                              for prompt_id, value in ids.items()} for lang, ids in by_lang.items()}
        dominant = by_lang[langs[0]]
        for lang in langs[1:]:
            missing, extra = dominant.keys() - by_lang[lang].keys(), by_lang[lang].keys() - dominant.keys()
            if missing or extra:
                example = f"'{sorted(missing)[0]}' missing" if missing else f"'{sorted(extra)[0]}' extra"
                raise LidrError(f"{flag}: the ids of {Path(folder) / f'{lang}.jsonl'} don't match those of "
                                f"{Path(folder) / f'{langs[0]}.jsonl'} ({len(missing)} missing, {len(extra)} extra; "
                                f"e.g. {example})")
        records += [{"id": prompt_id, "_line": line, "_where": str(Path(folder) / f"{langs[0]}.jsonl"),
                     **{lang: by_lang[lang][prompt_id][0] for lang in langs}}
                    for prompt_id, (_, line) in dominant.items()]
    return records


def read_translation_tasks(path: Path) -> set[str]:
    """--translation-tasks: the ids of a JSONL file's records (the authors' list also holds the
    prompt and its answers; only the id is read)."""
    ids = set()
    for number, record in enumerate(read_prompt_file(path, "--translation-tasks"), 1):
        if not isinstance(record, dict) or "id" not in record:
            record = record if isinstance(record, dict) else {}
            where = f"{path}:{record['_line']}" if "_line" in record else f"{path}: record {number}"
            raise LidrError(f"{where}: expected a record with an 'id'")
        ids.add(str(record["id"]))
    return ids


def read_prompt_dataset(name: str, prompt_field: str, langs: list[str], flag: str) -> list[dict]:
    """A hub dataset (or a local dataset folder): prompt_field holds the dominant prompt, and
    columns named after language codes hold those languages."""
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
        text = row[prompt_field]
        if not isinstance(text, str) or not isinstance(row.get("input") or "", str):
            raise LidrError(f"{flag}: dataset '{name}', row {index}: '{prompt_field}' (and 'input') must be text")
        if row.get("input"):  # Alpaca keeps a task's input in its own column; the scripts join it so
            text += "\n" + row["input"]
        records.append({"id": str(row.get("id", index)), **{lang: row[lang] for lang in langs[1:] if row.get(lang)},
                        langs[0]: text})
    return records


# Prompt wordings a run can take from a file: flag -> (the constant read from a .py file, the
# placeholders the template must hold, those it may hold besides).
TEMPLATES = {"prompt_template": ("PROMPT_PREFIX", {"question"}, {"language"}),
             "eval_prompt_template": ("PROMPT_PREFIX", {"question"}, {"language"}),
             "translation_request": ("TRANS_INSTRUCTION", {"text"}, {"lang", "source", "target"})}


def template(settings: Settings, name: str) -> str:
    """The template that the flag `name` points to, '' if none. A .py file gives its string
    constant, read with ast so that nothing in the file runs (the authors' utils/inference.py and
    utils/trans_prompts.py hold their wordings so); any other file is the template itself."""
    path = getattr(settings, name)
    if not path:
        return ""
    constant, required, optional = TEMPLATES[name]
    where = f"--{name.replace('_', '-')} {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
        tree = ast.parse(text) if path.endswith(".py") else None
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise LidrError(f"{where}: cannot read it: {first_line(error)}") from None
    if tree:
        values = []  # the values given to the constant at the top level of the file
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if any(isinstance(target, ast.Name) and target.id == constant for target in targets):
                try:
                    values.append(string_literal(node.value) if isinstance(node, (ast.Assign, ast.AnnAssign)) else None)
                except RecursionError:  # thousands of strings joined with +
                    values.append(None)
        if len(values) != 1 or values[0] is None:
            raise LidrError(f"{where}: expected one plain {constant} = '...' string in it")
        text = values[0]
    allowed = ", ".join(f"{{{field}}}" for field in sorted(required | optional))
    try:
        parsed = list(string.Formatter().parse(text))
        fields = {field for _, field, _, _ in parsed if field is not None}
        if any(spec or conversion for _, _, spec, conversion in parsed):
            raise ValueError("a placeholder with a format spec or conversion, such as {question:>9}")
        text.format(**dict.fromkeys(required | optional, "text"))  # fails on any other field
    except (ValueError, KeyError, IndexError) as error:
        raise LidrError(f"{where}: the template can hold only {allowed} ({type(error).__name__}: {error}); "
                        f"write a brace that is no placeholder twice") from None
    if not required <= fields:
        raise LidrError(f"{where}: the template has no {' or '.join(f'{{{f}}}' for f in sorted(required))}")
    if name == "translation_request" and not fields & {"lang", "target"}:
        raise LidrError(f"{where}: the request must name the target language, with {{lang}} or {{target}}")
    return text


def string_literal(node) -> str | None:
    """The value of a string constant, or of string constants joined with +; None for anything else."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = string_literal(node.left), string_literal(node.right)
        return None if left is None or right is None else left + right
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


# ------------------------------------------------------------------------ model loading
def load_model(name: str, device: str, dtype: str, system_prompt: str):
    torch_dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    except Exception as error:
        raise model_load_error(name, error) from None
    if any(getattr(model.config, attribute, None) for attribute in ("final_logit_softcapping", "logit_scale",
                                                                     "logits_scaling")):
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
    # loss starts at exactly ln 2), and the reference log-probs are taken without dropout.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # HF attention applies it in train mode
            module.attention_dropout = 0.0
    return model.to(device=device, dtype=torch_dtype).eval(), tokenizer


def model_load_error(name: str, error: Exception) -> LidrError:
    return LidrError(f"could not load model '{name}' ({first_line(error)}); offline or without hub access, "
                     f"try --model toy")


def model_shape(name: str):
    """(config, parameter count) without loading the weights: the model is built on the meta
    device, which allocates nothing (the toy model is simply built)."""
    if name == "toy":
        model = untrained_toy_model(toy_tokenizer())
        return model.config, sum(p.numel() for p in model.parameters())
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as error:
        raise model_load_error(name, error) from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # no causal LM for the config (T5), or sizes no model can have
        raise LidrError(f"model '{name}': its config makes no causal language model ({first_line(error)})") from None
    return config, sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------ many GPUs (torchrun)
def gathered(share) -> list:
    """Every process's share, in rank order ([share] on one process)."""
    if WORLD == 1:
        return [share]
    shares = [None] * WORLD
    dist.all_gather_object(shares, share)
    return shares


def fully_sharded(model):
    """Many GPUs: a float32 copy of the model sharded across the processes by FSDP2, a decoder layer
    at a time (no whole float32 copy is ever made), then the rest. It computes in the model's dtype
    (bf16: the float32 shards are stock AdamW's master weights) and reduces gradients in float32."""
    sharded, policy = copy.deepcopy(model), MixedPrecisionPolicy(param_dtype=model.dtype, reduce_dtype=torch.float32)
    for layer in sharded.base_model.layers:
        fully_shard(layer.float(), mp_policy=policy)
    for weight in sharded.parameters():  # the rest: embeddings, final norm, output layer
        if weight.dtype != torch.float32:
            weight.data = weight.data.float()
    return fully_shard(sharded, mp_policy=policy)


def launch(settings: Settings, command: list[str]) -> int:
    """--nproc-per-node N: N processes of this command on this machine, as torchrun starts them,
    and a process that fails reported in one line (torchrun's report is a traceback). The toy M0
    is pre-trained here first, in one process."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    settings = resolve(settings)
    if settings.model == "toy":
        toy_model(Path(settings.out).parent, settings.seed, list(parse_languages(settings.langs)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ["LIDR_LAUNCHER"] = "1"
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=settings.nproc_per_node, run_id=str(os.getpid()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)(__file__, *command[1:])
    except SignalException as stop:  # Ctrl-C or a scheduler's stop: main says what was kept
        raise KeyboardInterrupt if stop.sigval == signal.SIGINT else Terminated from None
    except ChildFailedError as error:  # bad input, else a process killed (not by launch's SIGTERM), else the first
        rank, failure = min(error.failures.items(), key=lambda item: (
            item[1].exitcode != LidrError.exit_code, item[1].exitcode in (-signal.SIGTERM, 1), item[1].timestamp))
        said = first_line(failure.message["message"] if isinstance(failure.message, dict) else failure.message)
        print(f"lidr: error: {said.split(': ', 1)[1]}" if said.startswith(("LidrError: ", "RunFault: ")) else
              f"lidr: error: process {rank} of {settings.nproc_per_node} stopped ({said}), and the run with it; "
              f"{finished_work(settings)}; to resume, run the same command: python {shlex.join(command)}",
              file=sys.stderr)
        return max(failure.exitcode, 1)
    return 0


# ------------------------------------------------------------------------ continuous batching (--engine continuous)
def continuous_batches(model, prompts: list[list[int]], config: GenerationConfig, max_batch_size: int,
                       desc: str) -> list[list[int]]:
    """transformers' continuous batching: the KV cache is paged, a sequence leaves the batch the
    step it ends and a waiting one takes its place, so no step is spent on finished sequences or
    padding. The cache holds max_batch_size sequences at full length, or what fits in free memory:
    without flash attention (not a requirement here) attention runs over the whole cache under a
    block-diagonal mask, so a larger cache costs time as well as memory (README: Hardware).
    Returns each prompt's new tokens."""
    from transformers.generation import ContinuousBatchingConfig
    page = 64  # tokens per cache block
    longest = max(map(len, prompts)) + config.max_new_tokens
    blocks = min(len(prompts), max_batch_size) * math.ceil(longest / page)
    budget = free_memory(model.device) * 3 // 4 // kv_cache_bytes(model.config, model.dtype.itemsize, page)
    cache = ContinuousBatchingConfig(page_size=page, num_blocks=max(1, min(blocks, budget)),  # default: most of RAM
                                     max_requests_per_batch=max_batch_size, max_batch_tokens=1024,
                                     allow_block_sharing=False, use_cuda_graph=False, use_async_batching=False)
    attention = model.config._attn_implementation  # the manager switches it (eager -> paged|eager)
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cache)
    results = {}
    # the manager reseeds torch's generators from them: the stage's random stream goes on as it was
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        try:
            ids = manager.add_requests(inputs=prompts, max_new_tokens=config.max_new_tokens)
            manager.start()  # after queueing every request: the same batches, so the same draws, in every run
            with tqdm(total=len(prompts), desc=f"{desc} (continuous)", unit="seq", leave=False) as bar:
                while len(results) < len(ids):
                    result = manager.get_result(timeout=1)
                    if result is None and not manager.is_running():
                        break  # stopped with sequences unfinished: said below
                    if result is not None and result.is_finished():
                        results[result.request_id] = result
                        bar.update()
        finally:  # hard_stop: an interrupt must not wait for the queued sequences
            manager.stop(block=True, hard_stop=True)
            manager.destroy()
            if model.config._attn_implementation != attention:  # a manager that never started leaves it switched
                model.set_attn_implementation(attention)
    failed = [i for i in ids if i not in results or results[i].error is not None]
    if failed:  # transformers logs a failed request and goes on
        raise RunFault(f"{desc}: continuous batching failed {len(failed)} of {len(ids)} sequences "
                       f"({results[failed[0]].error if failed[0] in results else 'no result'}); --engine generate "
                       f"avoids it")
    return [results[i].generated_tokens for i in ids]


# ------------------------------------------------------------------------ memory planning
def generation_batches(lengths: list[int], max_batch_size: int, fits) -> list[list[int]]:
    """Prompt indices grouped into batches, shortest prompts first so a batch needs little padding.
    A batch grows while its count stays within max_batch_size and fits(sequences, longest prompt)
    says its memory does."""
    batches, batch = [], []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):  # i is the longest in its batch so far
        if batch and (len(batch) == max_batch_size or not fits(len(batch) + 1, lengths[i])):
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch] if batch else batches


def kv_cache_bytes(config, itemsize: int, tokens: int) -> int:
    """The KV cache of one sequence of `tokens` tokens: keys and values, in every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * tokens * itemsize


def generation_memory(config, itemsize: int, sequences: int, prompt_len: int, max_new_tokens: int) -> int:
    """Bytes a generation batch holds at its peak, beyond the weights: the KV cache at full length,
    plus the prefill, which pushes every prompt token through a layer at once. There the MLP holds
    gate, up and their product (3 x intermediate_size per token) beside the residual stream (~4 x
    hidden_size), and eager attention also writes out the scores and their float32 softmax (2 x
    heads x prompt_len per token; sdpa's kernels do not). On Llama-3-8B a 2,000-token prompt costs
    0.26 GB of KV cache and 0.24 GB in the prefill: a long prompt costs more than its cache.
    Checked against the peak RSS of one generate call on CPU (2-layer float32 model, 4 prompts of
    2,000 tokens, median of 3): sdpa 0.27 GB measured, 0.26 GB estimated; eager 1.18 GB measured,
    1.29 GB estimated."""
    layer = (3 * config.intermediate_size + 4 * config.hidden_size) * itemsize
    scores = 2 * config.num_attention_heads * prompt_len * 4 if config._attn_implementation == "eager" else 0
    return sequences * (kv_cache_bytes(config, itemsize, prompt_len + max_new_tokens) + prompt_len * (layer + scores)
                        + 2 * config.vocab_size * 4)


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":  # free in the driver, plus what torch's cache holds unused
        return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def training_memory(config, n_params: int, settings: Settings, optim: str, checkpointing: str,
                    world: int = WORLD) -> dict[str, float]:
    """Bytes one training step holds, by part (training_peak adds them up). Each part is what a
    simulation of the step on fake tensors held (Llama-3-8B, bf16, checkpointing, pairs of 2 x
    2,048 tokens, one per micro-batch; peak with adamw-bf16 64.8 GB for a one-pair step and 68.6 GB
    for two, with adamw-fp32 145.6 GB for either; this gives each):
    - weights, gradients, optimizer state: per parameter, by optimizer (README: Hardware);
    - step: what the update holds beyond them: BF16AdamW's float32 work on one chunk (5 float32 and
      3 int32 values per element); or, for the float32 masters of a bf16 model, the bf16 gradient of
      the largest tensor (the embedding) waiting for its float32 copy; fused AdamW holds nothing;
    - activations, at the start of the backward pass, where they peak: each layer's input with
      checkpointing (without: everything a layer keeps, ~8 hidden- and 6 MLP-size values per
      token, 0.97 GB per Llama-3 layer at 4,096 tokens, against 0.89 GB simulated), the final
      norm's float32 input and copies, one log-prob chunk's backward (LOGPS_CHUNK_TOKENS) and the
      output layer's gradient, summed there over the chunks;
    - earlier_gradients: what the step's earlier micro-batches have accumulated by then, in the
      model's dtype (none when a step is one micro-batch; 68.6 GB simulated with two).
    On `world` processes (FSDP2, arithmetic): the whole model for generation, a 1/world share of the
    float32 weights, gradients (held across micro-batches) and moments, and each process's activations
    with the embedding and output layer gathered whole."""
    width = 2 if settings.dtype == "bfloat16" else 4
    tokens = 2 * settings.micro_batch_size * settings.max_len  # chosen + rejected sequences
    hidden, layers, mlp = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    vocab = config.vocab_size
    if optim == "adamw-bf16":  # two moments in the model's dtype
        gradients, optimizer, step = n_params * width, 2 * n_params * width, OPTIMIZER_CHUNK * 32
    else:  # float32 moments, plus float32 master weights and gradients for a bf16 model
        gradients, optimizer = 4 * n_params, 8 * n_params + (4 * n_params if width == 2 else 0)
        step = vocab * hidden * width if width == 2 else 0
    layer_activations = ((layers + 1) * tokens * hidden * width if checkpointing == "on"
                         else layers * tokens * (8 * hidden + 6 * mlp) * width)
    output_layer = tokens * hidden * (4 + 3 * width) + LOGPS_CHUNK_TOKENS * vocab * 16 + vocab * hidden * width
    earlier_gradients = n_params * width if settings.batch_size > settings.micro_batch_size else 0
    if world > 1:  # the root's embedding and output layer stay gathered from forward to backward
        gradients, optimizer, step = 4 * n_params / world, 12 * n_params / world, 0
        output_layer, earlier_gradients = output_layer + 2 * vocab * hidden * width, gradients
    return {"weights": n_params * width, "gradients": gradients, "optimizer": optimizer, "step": step,
            "activations": layer_activations + output_layer, "earlier_gradients": earlier_gradients}


def training_peak(parts: dict[str, float]) -> float:
    """Weights and optimizer state are held throughout; the activations are gone before the step's
    last gradient exists, so the peak is the larger of the two moments."""
    return parts["weights"] + parts["optimizer"] + max(parts["gradients"] + parts["step"],
                                                       parts["activations"] + parts["earlier_gradients"])


def device_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_training_memory(config, n_params: int, settings: Settings, available: int) -> str:
    """Print the training memory estimate next to the device's memory (available bytes) and return
    the optimizer to use; when it cannot fit, refuse with the flags that would make it fit."""
    missing = [name for name in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
                                 "num_attention_heads") if not getattr(config, name, None)]
    if missing:
        raise LidrError(f"model '{settings.model}': its config has no {', '.join(missing)}, which the memory plan "
                        f"reads (decoder configs in the Llama style have them)")

    def total(trial: Settings) -> int:
        return training_peak(training_memory(config, n_params, trial, trial.optim, trial.gradient_checkpointing))

    optim = settings.optim
    if optim == "auto":  # adamw-bf16 saves memory only on bf16 weights; many GPUs shard float32 AdamW
        fits = total(dataclasses.replace(settings, optim="adamw-fp32")) <= available
        optim = "adamw-fp32" if fits or settings.dtype != "bfloat16" or WORLD > 1 else "adamw-bf16"
    parts = training_memory(config, n_params, settings, optim, settings.gradient_checkpointing)
    gb = {name: value / 1e9 for name, value in parts.items()}
    print(f"training memory estimate ({optim}, checkpointing {settings.gradient_checkpointing}): weights "
          f"{gb['weights']:.1f} + optimizer {gb['optimizer']:.1f} + max(gradients {gb['gradients']:.1f} + step "
          f"{gb['step']:.1f}, activations {gb['activations']:.1f} + earlier micro-batches' gradients "
          f"{gb['earlier_gradients']:.1f}) = {training_peak(parts) / 1e9:.1f} GB of "
          f"{available / 1e9:.1f} GB on {settings.device}")
    if training_peak(parts) > available:
        trial, fixes = dataclasses.replace(settings, optim=optim), []
        activations = [("--micro-batch-size 1", {"micro_batch_size": 1}),
                       ("--gradient-checkpointing on", {"gradient_checkpointing": "on"})]
        changes = ([("--dtype bfloat16", {"dtype": "bfloat16"}), ("--optim adamw-bf16", {"optim": "adamw-bf16"}),
                    *activations[::-1]] if settings.device.startswith("cuda")
                   else activations)  # bf16 on a CPU is slow, and what fills its memory is activations
        for flag, change in changes:
            if any(getattr(trial, name) != value for name, value in change.items()):
                trial = dataclasses.replace(trial, **change)
                fixes.append(flag)
                if total(trial) <= available:
                    break
        shorter = trial
        while total(shorter) > available and shorter.max_len > 256:  # then shorter sequences, if that fits
            shorter = dataclasses.replace(shorter, max_len=shorter.max_len // 2)
        if total(shorter) <= available < total(trial):
            trial = shorter
            fixes.append(f"--max-len {shorter.max_len}")
        hint = (f"try {' '.join(fixes)}" if total(trial) <= available
                else f"even {' '.join(fixes)} would not fit: use a smaller --max-len or model")
        gpus = next((n for n in (2, 4, 8, 16, 32, 64) if training_peak(training_memory(
            config, n_params, settings, "adamw-fp32", settings.gradient_checkpointing, n)) <= available), None)
        hint += (f", or {gpus} such GPUs (--nproc-per-node {gpus}, or torchrun)" if total(trial) > available and
                 gpus and gpus > WORLD else
                 f"; many GPUs won't help: each generates with the whole model ({parts['weights'] / 1e9:.0f} GB)"
                 if parts["weights"] > available else "")
        raise LidrError(f"training needs about {training_peak(parts) / 1e9:.0f} GB but {settings.device} has "
                        f"{available / 1e9:.0f} GB; {hint}")
    return optim


# ------------------------------------------------------------------------ optimizers
def optimizer_for(params: list[torch.nn.Parameter], settings: Settings) -> torch.optim.Optimizer:
    """AdamW as --optim says, for these weights: float32 weights get torch's, a bf16 model float32
    master weights (adamw-fp32) or bf16 moments with stochastic rounding (adamw-bf16). Fused:
    one kernel per tensor, in place, with no float32 temporaries (the default and the
    foreach=False step make full-size ones: 4.2 GB for Llama-3-8B's embedding), and 10x faster
    than foreach=False at 124M parameters on CPU (test_bench_adamw_step_fused_vs_single_tensor)."""
    options = dict(lr=settings.lr, betas=(0.9, settings.adam_beta2), weight_decay=settings.weight_decay)
    if settings.optim == "adamw-bf16":
        return BF16AdamW(params, **options)
    if all(p.dtype == torch.float32 for p in params):
        return torch.optim.AdamW(params, fused=True, **options)
    return MasterWeightAdamW(params, **options)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW for a bf16 model on float32 "master" copies of its weights. bf16 weights cannot hold
    an update smaller than ~1/256 of their value, so at DPO learning rates most AdamW updates
    would vanish (a known DPO trap). Each step takes the model's bf16 gradients into the masters,
    updates the masters, and rounds them into the model stochastically, so that the model keeps
    sub-bf16 updates in expectation. 16 bytes per parameter besides the bf16 weights: float32
    masters, gradients and two moments. train calls take_gradients before clipping, so that the
    gradients are clipped, and their norm logged, in float32 (as AMP's scaler.unscale_)."""

    def __init__(self, params, **options):
        self.model_params = list(params)
        super().__init__([p.detach().float() for p in self.model_params], fused=True, **options)
        self.masters = self.param_groups[0]["params"]

    @torch.no_grad()
    def take_gradients(self):
        """The model's bf16 gradients into the masters, each freed once copied."""
        for master, param in zip(self.masters, self.model_params):
            if param.grad is not None:
                master.grad, param.grad = param.grad.float(), None

    @torch.no_grad()
    def step(self, closure=None):
        self.take_gradients()  # if train has not yet
        super().step(closure)
        self.zero_grad(set_to_none=True)  # used up: freed before the rounding's temporaries (5 GB on Llama-3-8B)
        for master, param in zip(self.masters, self.model_params):
            param.copy_(round_stochastically(master) if param.dtype == torch.bfloat16 else master)

    def state_dict(self):  # with the masters: the model's rounded weights cannot restore them
        return {**super().state_dict(), "masters": self.masters}

    def load_state_dict(self, state: dict):
        with torch.no_grad():
            for master, saved in zip(self.masters, state["masters"]):
                master.copy_(saved)
        super().load_state_dict({name: value for name, value in state.items() if name != "masters"})


def round_stochastically(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16, rounding up or down at random in proportion to the distance, so the
    expected result is x. bf16 is the top 16 bits of a float32: add 16 random low bits, then
    drop them. Round-to-nearest would turn every update below half a bf16 step into zero."""
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536 = 0xFFFF0000


OPTIMIZER_CHUNK = 2**24  # values updated at once: the float32 temporaries of a step stay ~0.5 GB


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019) for bf16 weights with bf16 moments: 4 bytes of state per
    parameter instead of 12 (float32 moments and master weights), so 8B-parameter full training
    fits in 80 GB. Each step runs in float32, a chunk of each tensor at a time, and its results
    are rounded stochastically: updates far below a bf16 step still add up in the weights
    (a known DPO trap), and the second moment still decays (v * 0.999 rounded to nearest is v
    again). On float32 weights it is torch.optim.AdamW."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
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


# ------------------------------------------------------------------------ the run folder
# A step's file proves that the step finished: it is written under a temp name, its sha256 put in
# its folder's finished.json, then renamed into place. A resume reuses it only if it still matches.
def write_atomic(path: Path, text: str, proof: bool = False):
    """Write to a temp file, then rename: a crash never leaves a half-written file behind."""
    if RANK:  # many GPUs: rank 0 writes the run folder
        return
    with written_whole(temp_path(path), path) as temp:
        temp.write_text(text, encoding="utf-8")
        move_into_place(temp, path, proof)


@contextlib.contextmanager
def written_whole(temp: Path, path: Path):
    """Around writing temp, path's file or folder to be: if anything fails (a full disk, an
    interrupt), temp is removed, leaving no partial file that takes space, and the error names path."""
    try:
        yield temp
    except BaseException as error:
        if temp.is_dir():
            shutil.rmtree(temp)
        temp.unlink(missing_ok=True)
        raise write_error(error, path) from None


def move_into_place(temp: Path, path: Path, proof: bool):
    """Rename temp to path; with proof, record its digest in finished.json first."""
    if proof:
        record = path.parent / "finished.json"
        recorded = read_json(record) if record.exists() else {}
        write_atomic(record, to_json({**recorded, path.name: digest(temp)}, indent=1))
    os.replace(temp, path)


def digest(path: Path) -> str:
    """The sha256 of a file, or of a folder's files' names and sha256s."""
    if path.is_file():
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    return hashlib.sha256("".join(f"{file.relative_to(path)} {digest(file)}\n" for file in sorted(path.rglob("*"))
                                  if file.is_file()).encode()).hexdigest()


def finished(path: Path) -> bool:
    """Whether path holds a finished step's result: False if absent; one line naming it if it is
    not what the step wrote (cut short, emptied, edited, copied in part)."""
    if not path.exists():
        return False
    record = path.parent / "finished.json"
    recorded = read_json(record) if record.exists() else {}
    if not isinstance(recorded, dict) or recorded.get(path.name) != digest(path):
        raise LidrError(f"{path} is not what its finished step wrote (its sha256 in {record} differs or is "
                        f"missing: cut short, emptied or edited?); move it away to have that step redone")
    return True


def write_error(error: BaseException, path: Path) -> BaseException:
    """A failed write as an OSError naming path, for main's one line: the kernel's error names no
    file, and safetensors and tokenizers (written in Rust) raise their own, "... (os error 28)"."""
    if getattr(error, "filename", None) or not isinstance(error, Exception):  # named already; an interrupt
        return error
    code = re.search(r"\(os error (\d+)\)", str(error))
    code = int(code.group(1)) if code else getattr(error, "errno", None)
    return OSError(code, os.strerror(code), str(path)) if code else error


def temp_path(path: Path) -> Path:
    """A temp name beside path that no other process uses; a leftover one is ignored (*.tmp)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def to_json(value, **options) -> str:
    """Strict JSON (a NaN or infinity is an error, never a bare NaN that other readers reject)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, **options)


def write_jsonl(path: Path, records: list[dict], proof: bool = False):
    write_atomic(path, "".join(to_json(r) + "\n" for r in records), proof)


def read_jsonl(path: Path) -> list[dict]:
    return [read_json(path, line) for line in read_text(path).splitlines()]


def read_json(path: Path, text: str | None = None):
    """A run folder's JSON (text: one line of a .jsonl file); a damaged one is one line, not a traceback."""
    try:
        return json.loads(read_text(path) if text is None else text)
    except (ValueError, RecursionError):
        raise LidrError(f"{path} is damaged (not valid JSON); move it away to have that stage redone") from None


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise LidrError(f"cannot read {path}: {first_line(error)}") from None


def stage(path: Path, compute, settings: Settings) -> list[dict]:
    """Resume: reuse a finished stage's artifact, else compute it and write it. The stage draws its
    random numbers (sampling at --temperature > 0) from a seed of its own, so a stage redone after
    an interruption gives what the uninterrupted run gave."""
    if finished(path):
        return reuse(path, settings)
    torch.manual_seed(stage_seed(settings.seed, path))
    records = compute()
    write_jsonl(path, records, proof=True)
    return records


def reuse(path: Path, settings: Settings) -> list[dict]:
    """A finished stage's records, checked against what lidr writes there."""
    tqdm.write(f"reusing {path}")
    records = read_jsonl(path)
    for line, record in enumerate(records, 1):
        check_shape(f"{path}:{line}", record, stage_record_shape(path.name, list(parse_languages(settings.langs))))
    return records


def stage_record_shape(name: str, langs: list[str]) -> dict:
    """What each stage's records hold (see check_shape): the fields later stages read."""
    translation = {"id": str, "source_lang": langs, "target_lang": langs, "source": str, "raw": str,
                   "translation": str | None, "language": [*langs, None]}
    sft_example = {"id": str, "lang": langs, "prompt": str, "response": str}
    return {"prompt_translations.jsonl": translation, "translations.jsonl": translation,
            "prompts.jsonl": {"id": str, "translation_task": bool, langs[0]: str,
                              **dict.fromkeys(langs[1:], str | None)},
            "responses.jsonl": {"id": str, "lang": langs, "prompt": str, "response": str, "finished": bool},
            "pairs.jsonl": {"prompt": str, "chosen": str, "rejected": str, "id": str, "lang": langs, "kind": str,
                            "other_lang": langs},
            "question_alignment.jsonl": sft_example, "response_alignment.jsonl": sft_example}[name]


def check_shape(where: str, value, shape, key: str = ""):
    """A reused artifact must hold what lidr wrote there; one edited by hand, cut short or written
    by another version is one line naming the file and field, not a KeyError a stage later.
    shape: a dict of required keys and their shapes, a list of allowed values, or a type."""
    if isinstance(shape, dict):
        for name, inner in shape.items():
            if not isinstance(value, dict) or name not in value:
                raise LidrError(f"{where}: '{key + name}' is missing; move the file away to have that stage redone")
            check_shape(where, value[name], inner, f"{key}{name}.")
    elif not (value in shape if isinstance(shape, list) else isinstance(value, shape)):
        raise LidrError(f"{where}: '{key.rstrip('.')}' is {value!r:.40}, not what lidr writes there; "
                        f"move the file away to have that stage redone")


def stage_seed(seed: int, path: Path) -> int:
    """A seed for each (--seed, iteration, stage): the artifact's folder and name say which."""
    return zlib.crc32(f"{seed}/{path.parent.name}/{path.name}".encode())


def save_model(model, tokenizer, path: Path):
    if RANK:  # many GPUs: rank 0 writes the run folder
        return
    with written_whole(temp_path(path), path) as temp:
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        move_into_place(temp, path, proof=True)


# What a resumed run may change: the folder's own name, the number of iterations (to extend a
# run), and settings that change how fast a run goes, and its results only by float rounding.
RESUMABLE_CHANGES = {"out", "iters", "device", "nproc_per_node", "gen_batch_size", "engine", "micro_batch_size",
                     "gradient_checkpointing"}


def save_progress(path: Path, parts: dict, loop_state: tuple):
    """All an interrupted train needs to go on: the state of its parts (model, optimizer, schedule)
    and of its loop (step, log lines, last epoch's metrics and languages); written whole or not at all."""
    with written_whole(temp_path(path), path) as temp:
        try:
            torch.save({"parts": {name: part.state_dict() for name, part in parts.items()}, "loop": loop_state}, temp)
        except RuntimeError as error:  # how torch's writer reports a full disk
            raise OSError(None, f"{first_line(error)} (a full disk?)", str(path)) from None
        os.replace(temp, path)


def load_progress(path: Path | None, parts: dict) -> tuple | None:
    """save_progress's file, if any: loads the parts' states and returns the loop's."""
    if path is None or not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=False)
    except Exception as error:
        tqdm.write(f"warning: {path} is unreadable ({first_line(error)}); training from the start")
        return None
    for name, part in parts.items():
        part.load_state_dict(saved["parts"][name])
    return saved["loop"]


def open_run(out: Path, settings: Settings, command: list[str], start_model: str, all_prompts: list[dict],
             problems: dict):
    """Everything before the first iteration, checks first so that bad input writes nothing: the
    memory plan (which picks --optim auto's optimizer), --out new or resumable with these settings
    and inputs, and writable; then the model loaded (the toy M0 pre-trained once if needed), the
    folder locked and recorded. Returns the model, its tokenizer, the settings and the lock."""
    languages = parse_languages(settings.langs)
    langs = list(languages)
    config, n_params = model_shape(start_model)
    optim = plan_training_memory(config, n_params, settings, device_memory(settings.device))
    settings = dataclasses.replace(settings, optim=optim)
    inputs_sha256 = {name: hashlib.sha256(to_json(records).encode()).hexdigest()
                     for name, records in (("prompts", all_prompts), ("evaluation problems", problems))}
    check_resumable(out, settings, inputs_sha256)
    nearest = next(folder for folder in (out, *out.parents) if folder.exists())
    try:  # before minutes of work, not after; a real file, as permissions don't tell (/proc, a full disk)
        tempfile.TemporaryFile(dir=nearest).close()
    except OSError as error:
        raise LidrError(f"--out {out}: cannot write into {nearest} ({error.strerror or error})") from None
    toy_inputs_only = (settings.prompts == "toy" and not settings.system_prompt
                       and set(settings.eval.split(",")) <= {"", "toy"}
                       and not any(getattr(settings, name) for name in TEMPLATES))
    if settings.model == "toy" and not toy_inputs_only:
        print("warning: the toy model knows only the toy world's words and its translation request: other "
              "prompts, templates, system turns and benchmarks reach it as <|unk|> tokens")
    # the toy world's M0, pre-trained once and kept next to the run folders (not when resuming from M_t)
    if start_model == "toy" and WORLD > 1 and not (toy_model_folder(out.parent, settings.seed, langs)
                                                   / "toy_recipe.json").exists():
        raise LidrError("the toy M0 is pre-trained in one process: run with --nproc-per-node, not torchrun")
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
        write_atomic(out / "toy_recipe.json", read_text(toy_m0 / "toy_recipe.json"))
    print(f"run folder {out} | {settings.model}: {sum(p.numel() for p in model.parameters()):,} parameters "
          f"on {settings.device} ({settings.dtype}) | {len(all_prompts)} prompts, "
          f"{min(settings.num_prompts, len(all_prompts))} per iteration, "
          f"{sum(p['translation_task'] for p in all_prompts)} translation tasks | langs {','.join(langs)} | "
          + (f"method qalign: stage 1 question alignment, stage 2 response alignment with "
             f"{settings.answer_field or 'M0'}'s answers" if settings.method == "qalign" else
             f"pairing {settings.pairing} | recipe {settings.recipe}")
          + f" | translation request: {settings.translation_request or 'lidr.py TRANSLATION_REQUEST'}")
    return model, tokenizer, settings, lock


def finished_metrics(folder: Path, langs: list[str], settings: Settings) -> dict:
    """The metrics.json of an iteration an earlier run finished, checked against what lidr writes."""
    tqdm.write(f"reusing {folder}")
    if not finished(folder / "metrics.json"):
        raise LidrError(f"{folder / 'metrics.json'} is missing; move {folder / 'model'} away to redo that iteration")
    metrics = read_json(folder / "metrics.json")
    check_shape(str(folder / "metrics.json"), metrics, {
        "examples": dict.fromkeys(langs, int), "train": dict | None} if settings.method == "qalign" else {
        "counts": dict.fromkeys(langs, {"pairs": int}), "translation_failures": dict.fromkeys(langs, int),
        "train": dict | None})
    check_shape(str(folder / "metrics.json"), metrics["train"] or {"per_lang": {}}, {"per_lang": dict}, "train.")
    return metrics


def check_resumable(out: Path, settings: Settings, inputs_sha256: dict[str, str]):
    """Before anything is loaded: --out must be new, or a run folder made with these settings and
    inputs (the prompts and evaluation problems as read, by content: a file edited since counts)."""
    settings_path = out / "settings.json"
    if settings_path.exists():
        try:
            run_record = json.loads(settings_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            run_record = None
        recorded = run_record.get("settings") if isinstance(run_record, dict) else None
        if not isinstance(recorded, dict) or not {"model", "max_new_tokens"} <= recorded.keys() or not all(
                isinstance(run_record.get(part, {}), dict) for part in ("templates", "inputs_sha256")):
            raise LidrError(f"--out {out}: its settings.json is not a lidr run's (another tool's, or cut short); "
                            f"pass another --out")
        # settings added to lidr after the folder was made: what that run did instead
        recorded = {**dataclasses.asdict(Settings()), **(TOY_DEFAULTS if recorded["model"] == "toy" else {}),
                    "eval_max_new_tokens": recorded["max_new_tokens"], **recorded}
        changed = [f"--{name.replace('_', '-')} {recorded.get(name)!r} -> {value!r}"
                   for name, value in dataclasses.asdict(settings).items()
                   if name not in RESUMABLE_CHANGES and recorded.get(name) != value]
        changed += [f"the text of --{name.replace('_', '-')}" for name in TEMPLATES
                    if run_record.get("templates", {}).get(name, "") != template(settings, name)]
        changed += [f"the {name} read" for name, digest in inputs_sha256.items()  # folders made before: unchecked
                    if run_record.get("inputs_sha256", {}).get(name, digest) != digest]
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
    """An exclusive lock on the run folder, held while the returned file is open (the OS drops it
    when the process dies): a second process on the same folder (the command started twice, a
    sweep writing into one --out) stops at once, naming the holder, instead of mixing two runs."""
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
        lock.write(f"pid {os.getpid()} on {platform.node()}: {shlex.join(command)}\n")
        lock.flush()
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
    if (out / "settings.json").exists():
        if read_json(out / "settings.json").get("lidr_sha256") != code_hash:
            print(f"warning: lidr.py changed since {out} was made (see commands.log); lidr.py there is the original")
    else:  # settings.json last: it marks the folder as recorded
        out.mkdir(parents=True, exist_ok=True)
        device = settings.device
        write_atomic(out / "lidr.py", source.decode("utf-8"))
        write_atomic(out / "settings.json", to_json({
            "settings": dataclasses.asdict(settings),
            "command": [sys.executable, *command],
            "templates": {name: template(settings, name) for name in TEMPLATES if getattr(settings, name)},
            "inputs_sha256": inputs_sha256,
            "lidr_sha256": code_hash,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "datasets": datasets.__version__},
            "hardware": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.machine(),
            "processes": WORLD,
        }, indent=2))
    log = out / "commands.log"  # rewritten whole: a full disk never leaves half a line
    write_atomic(log, (read_text(log) if log.exists() else "")
                 + f"{time.strftime('%Y-%m-%d %H:%M:%S')} lidr_sha256={code_hash[:12]} {' '.join(command)}\n")


def finished_work(settings: Settings | None) -> str:
    """What an interrupted run leaves for the next one to reuse (resume_point), in a few words."""
    out = Path(settings.out) if settings else None
    if out is None or not (out / "settings.json").exists():
        return "nothing was finished"
    t = last_saved(out, settings.iters) + 1
    stages = sorted(path.name for path in (out / f"iter_{t}").glob("*.json*")
                    if not leftover(path) and path.name != "finished.json")
    kept = ([f"M1 to M{t - 1}" if t > 2 else "M1"] if t > 1 else []) + ([f"iteration {t}'s {', '.join(stages)}"]
                                                                       if stages else [])
    return f"{out} keeps " + (" and ".join(kept) or "its settings only")


# ------------------------------------------------------------------------ report tables
def count_per_target_language(translations: list[dict], langs: list[str], counted) -> dict[str, int]:
    counts = dict.fromkeys(langs, 0)
    for translation in translations:
        counts[translation["target_lang"]] += counted(translation)
    return counts


def means_per_language(step_metrics: list[dict], langs: list[str]) -> dict:
    """train's summary: the last epoch's per-example metrics (a dict of tensors per step) averaged
    over all its examples, and over each language's (langs: each example's language)."""
    merged = {name: torch.cat([m[name] for m in step_metrics]) for name in step_metrics[0]}
    per_lang = {}
    for lang in sorted(set(langs)):
        mask = torch.tensor([example_lang == lang for example_lang in langs])
        per_lang[lang] = {name: values[mask].mean().item() for name, values in merged.items()}
    return {"last_epoch": {name: values.mean().item() for name, values in merged.items()}, "per_lang": per_lang}


def summary_table(history: list[dict], langs: list[str], settings: Settings) -> str:
    """Per iteration and language: pairs built and skipped, failed translations into the
    language, and the last epoch's training metrics over that language's pairs. For QAlign: per
    stage and language, the examples and their last epoch's NLL."""
    if settings.method == "qalign":
        rows = [f"{'stage':>5} {'lang':>4} {'examples':>8} {'nll':>6}", "-" * 26]
        for t, metrics in enumerate(history, 1):
            for lang in langs:
                trained = (metrics["train"] or {"per_lang": {}})["per_lang"].get(lang)
                nll = f"{trained['loss/nll']:6.3f}" if trained else f"{'-':>6}"
                rows.append(f"{t:>5} {lang:>4} {metrics['examples'][lang]:>8} {nll}")
        return "\n".join(rows + ["stage 1: questions into English; stage 2: English questions with English "
                                 "answers. nll: per answer token, averaged over the stage's examples in its last "
                                 "epoch."])
    recipe = settings.recipe
    header = (f"{'iter':>4} {'lang':>4} {'pairs':>6} {'skipped':>7} {'failed_tr':>9} {'wrong_lang':>10} {'loss':>7} "
              f"{'reward_acc':>10} {'margin':>7} {'logp_chosen':>11} {'nll':>6}")
    rows = [f"pairs built by --recipe {recipe}", header, "-" * len(header)]
    for iteration, metrics in enumerate(history, 1):
        for lang in langs:
            counts = metrics["counts"][lang]
            trained = (metrics["train"] or {"per_lang": {}})["per_lang"].get(lang)
            numbers = (f"{trained['loss/total']:7.4f} {trained['rewards/accuracies']:10.2f} "
                       f"{trained['rewards/margins']:7.3f} {trained['logps/chosen']:11.2f} {trained['loss/nll']:6.3f}"
                       if trained else f"{'-':>7} {'-':>10} {'-':>7} {'-':>11} {'-':>6}")
            wrong_language = metrics.get("translations_wrong_language", {}).get(lang, "-")  # older folders: none
            rows.append(f"{iteration:>4} {lang:>4} {counts['pairs']:>6} {sum(counts.values()) - counts['pairs']:>7} "
                        f"{metrics['translation_failures'][lang]:>9} {wrong_language:>10} {numbers}")
    rows.append("skipped: pairs not built, by reason in metrics.json (a prompt or translation failed, an answer "
                "was empty or hit the token cap, chosen == rejected; with --recipe scripts only missing prompts, "
                "failed translations, and the dominant language's pairs against all but the last language: "
                "overwritten); failed_tr: "
                "translations into the language with no parseable span; wrong_lang: translations into the "
                "language written in another one (language_of; failed under --recipe lidr, kept by the scripts). "
                "logp_chosen: summed over the answer; nll: per token.")
    return "\n".join(rows)


def eval_table(evaluations: list[dict], names: list[str], dominant: str) -> str:
    """Per benchmark, metric and language: one column per evaluation (M0 -> M1 -> ..., or the runs
    --compare reads); rates in percent. Accuracy also as two means: over the languages other than
    the dominant one (those LIDR is meant to lift), and over all (the paper's, English included)."""
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


def run_tables(history: list[dict], evaluations: list[dict], langs: list[str], settings: Settings) -> str:
    """What a run prints after each iteration and keeps in summary.txt: summary_table, and eval_table with --eval."""
    names = model_names(settings.method, len(evaluations))
    return summary_table(history, langs, settings) + (
        "\n\n" + eval_table(evaluations, names, langs[0]) if evaluations else "")


def compare_with_sibling(out: Path, settings: Settings):
    """LIDR's and QAlign's default folders sit side by side: the second run to finish compares them."""
    lidr_out, qalign_out = (out.with_name(out.name.removesuffix("-qalign")), out) if settings.method == "qalign" \
        else (out, out.with_name(out.name + "-qalign"))
    if lidr_out != qalign_out and all((folder / "iter_1" / "eval.json").exists() for folder in (lidr_out, qalign_out)):
        try:
            table = compare_table([str(lidr_out), str(qalign_out)])
            print(f"\nLIDR and QAlign (--compare {lidr_out},{qalign_out}):\n{table}")
        except LidrError as error:
            print(f"\n{error}")


def model_names(method: str, count: int) -> list[str]:
    """Column names of a run's evaluations: M0, M1, ... (LIDR's iterations) or QAlign's stages."""
    return ["M0"] + [f"stage{t}" if method == "qalign" else f"M{t}" for t in range(1, count)]


# What decides M0 and its evaluation: runs that differ in any of these don't compare.
SAME_M0_AND_EVALUATION = ("model", "langs", "eval", "eval_langs", "eval_limit", "eval_max_new_tokens",
                          "eval_prompt_template", "system_prompt", "temperature", "repetition_penalty", "dtype")


def compare_table(folders: list[str]) -> str:
    """--compare: M0 (the first run's) and the last evaluated model of each run folder, in one
    eval_table. The runs must start from the same M0 and evaluate it alike (the settings in
    SAME_M0_AND_EVALUATION, the toy's seed, and the evaluation problems read)."""
    evaluations, names, first = [], [], None
    for folder in map(Path, folders):
        record = read_json(folder / "settings.json") if (folder / "settings.json").exists() else None
        if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
            raise LidrError(f"--compare: {folder} is not a lidr run folder")
        settings = record["settings"]
        # each seed pre-trains its own toy M0 ("tiny": the toy world's name before)
        toy_seed = ("seed",) if settings.get("model") in ("toy", "tiny") else ()
        same = {name: settings.get(name) for name in SAME_M0_AND_EVALUATION + toy_seed}
        same["evaluation problems"] = record.get("inputs_sha256", {}).get("evaluation problems")
        run_evaluations = []
        while (folder / f"iter_{len(run_evaluations)}" / "eval.json").exists():
            run_evaluations.append(read_json(folder / f"iter_{len(run_evaluations)}" / "eval.json"))
        if len(run_evaluations) < 2:
            raise LidrError(f"--compare: {folder} has no evaluated model after M0 (run it with --eval)")
        if first is None:
            first = same
            evaluations.append(run_evaluations[0])
            names.append("M0")
        differ = [name for name in same if same[name] != first[name]]
        if differ:
            raise LidrError(f"--compare: {folder} and {folders[0]} differ in {', '.join(differ)}: another M0 or "
                            f"another evaluation, so their numbers don't compare")
        evaluations.append(run_evaluations[-1])
        names.append(f"{folder.name}:{model_names(settings.get('method', 'lidr'), len(run_evaluations))[-1]}")
    return eval_table(evaluations, names, str(first["langs"]).split(",")[0].partition(":")[0])


# ======================================================================== evaluation
# --eval runs on M0 and on every M_t. Each benchmark gives, per language, the prompts to answer
# and a scorer of one answer; every answer and its scores are kept in the run folder.

# A number: digits, thousands grouped by a comma, point or (no-break) space, maybe a decimal part.
NUMBER = re.compile(r"(?<!\d)-?\d+(?:[,. \u00a0\u202f]\d{3}(?!\d))*(?:[.,]\d+)?")


def last_number(text: str) -> float | None:
    """MGSM's answer: the last number in the text, None if there is none. '1,250', '1.250' and
    '1 250' are 1250 (a comma or point before exactly three digits groups thousands); '18,00'
    and '2.5' are decimals. So '2.125' reads as 2125: MGSM's answers are whole numbers."""
    numbers = NUMBER.findall(text)
    if not numbers:
        return None
    number = re.sub(r"[ \u00a0\u202f]|[,.](?=\d{3}(?:[,.]|$))", "", numbers[-1])
    return float(number.replace(",", "."))


def off_target(text: str, lang: str, candidates: tuple[str, ...]) -> bool | None:
    """Is the answer in another language than asked (the paper's off-target rate)? language_of
    among the candidates (the run's and the evaluated languages); None where it can't tell."""
    language = language_of(text, candidates)
    return None if language is None else language != lang


def read_mgsm(source: str, lang: str) -> list[dict]:
    """MGSM's test problems in one language, from a folder of mgsm_<lang>.jsonl files ({"query",
    "response"}: the authors' data/MGSM) or mgsm_<lang>.tsv files, or from a hub dataset: its
    mgsm_<lang>.tsv (question<TAB>answer, no header; answers may have thousands commas), else its
    config <lang> with question/answer_number columns."""
    if (Path(source) / f"mgsm_{lang}.jsonl").is_file():
        path = Path(source) / f"mgsm_{lang}.jsonl"
        problems = []
        for record in read_prompt_file(path, "--mgsm"):
            gold = last_number(str(record.get("response", "")))
            if not isinstance(record.get("query"), str) or gold is None or not math.isfinite(gold):
                raise LidrError(f"{path}:{record['_line']}: expected {{\"query\": question, \"response\": number}}")
            problems.append({"id": f"mgsm-{lang}-{record['_line']}", "prompt": record["query"].strip(), "gold": gold})
        if not problems:
            raise LidrError(f"{path}: no problems in it")
        return problems
    path = Path(source) / f"mgsm_{lang}.tsv"
    if not Path(source).is_dir():
        from huggingface_hub import hf_hub_download  # installed with transformers
        try:
            path = Path(hf_hub_download(source, f"mgsm_{lang}.tsv", repo_type="dataset"))
        except Exception as error:
            try:  # a copy converted to a plain dataset (recent `datasets` no longer runs MGSM's loading script)
                table = datasets.load_dataset(source, lang, split="test")
                return [{"id": f"mgsm-{lang}-{i}", "prompt": row["question"], "gold": float(row["answer_number"])}
                        for i, row in enumerate(table, 1)]
            except Exception:
                raise LidrError(f"--mgsm: could not get mgsm_{lang}.tsv from '{source}': "
                                f"{first_line(error)}") from None
    if not path.is_file():
        raise LidrError(f"--mgsm: no mgsm_{lang}.tsv or mgsm_{lang}.jsonl in {source} "
                        f"(MGSM has en,es,fr,de,ru,zh,ja,th,sw,bn,te)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise LidrError(f"--mgsm: cannot read {path}: {first_line(error)}") from None
    problems = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        # one row per line (MGSM quotes some questions): an unclosed quote can't swallow the next lines
        try:
            row = next(csv.reader([line], delimiter="\t"))
        except csv.Error:  # a question longer than csv's field limit
            row = []
        gold = last_number(row[-1]) if len(row) == 2 else None
        if gold is None or not math.isfinite(gold) or not row[0].strip():
            raise LidrError(f"{path}:{number}: expected a question, a tab and a number")
        problems.append({"id": f"mgsm-{lang}-{number}", "prompt": row[0].strip(), "gold": gold})
    return problems


BENCHMARKS = ("toy", "capitals", "mgsm", "alpaca")


def eval_problems(settings: Settings) -> dict[str, dict[str, list[dict]]]:
    """{benchmark: {lang: [{"id", "prompt", "gold"}]}}, read before anything runs, so that bad input
    fails early. gold: the toy's exact answer, MGSM's number, None for alpaca."""
    languages = parse_languages(settings.eval_langs or settings.langs, "--eval-langs")
    problems = {}
    for benchmark in filter(None, settings.eval.split(",")):
        if benchmark == "toy":
            check_toy_languages(languages, "--eval toy")
            problems["toy"] = {lang: toy_eval_problems(lang) for lang in languages}
        elif benchmark == "capitals":
            problems["capitals"] = {lang: capital_questions(lang, held_out=True) for lang in languages}
        elif benchmark == "mgsm":
            problems["mgsm"] = {lang: read_mgsm(settings.mgsm, lang) for lang in languages}
        elif settings.alpaca and any(Path(settings.alpaca, f"{lang}.json").is_file() for lang in languages):
            problems["alpaca"] = {lang: read_alpaca_file(Path(settings.alpaca, f"{lang}.json"), lang)
                                  for lang in languages}  # the authors' X-AlpacaEval layout
        else:  # records in --prompts' format: the run's dominant language, and those to evaluate
            records = load_prompts(settings.alpaca, "instruction", {**parse_languages(settings.langs), **languages},
                                   flag="--alpaca")
            problems["alpaca"] = {lang: [{"id": r["id"], "prompt": r[lang], "gold": None, "dataset": f"lidr-{lang}"}
                                         for r in records if lang in r] for lang in languages}
    for benchmark, by_lang in problems.items():  # an empty file, or instructions lacking a language
        for lang, items in by_lang.items():
            if not items:
                source = {"mgsm": settings.mgsm, "alpaca": settings.alpaca or "the built-in prompts"}[benchmark]
                raise LidrError(f"--eval {benchmark}: no '{lang}' problems in {source}; pass another "
                                f"--{benchmark} or --eval-langs")
    return {benchmark: {lang: items[:settings.eval_limit or None] for lang, items in by_lang.items()}
            for benchmark, by_lang in problems.items()}


def read_alpaca_file(path: Path, lang: str) -> list[dict]:
    """One language of X-AlpacaEval as the authors released it: a JSON list of {"id", "dataset",
    "instruction"}; dataset (AlpacaEval's source subset) is kept for the judge."""
    if not path.is_file():
        raise LidrError(f"--alpaca: {path} not found (a folder of <lang>.json files needs one per evaluated language)")
    records = read_prompt_file(path, "--alpaca")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) \
                or not isinstance(record.get("dataset", ""), str):
            raise LidrError(f"{path}: record {number}: expected an object with an 'instruction' (and 'dataset') string")
    return [{"id": str(r.get("id", number)), "prompt": r["instruction"], "gold": None,
             "dataset": r.get("dataset", f"lidr-{lang}")} for number, r in enumerate(records, 1)]


def score(benchmark: str, answer: str, finished: bool, gold, lang: str, candidates: tuple[str, ...]) -> dict:
    """One answer's scores; a language's metrics are their means. candidates: the languages an
    answer may be written in, for off_target."""
    if benchmark == "toy":  # number: the right number in any toy language, as MGSM scores a number
        return {"accuracy": float(answer == gold), "number": float(toy_numbers(answer) == toy_numbers(gold))}
    off = {"off_target": off_target(answer, lang, candidates)}
    if benchmark == "mgsm":
        return {"accuracy": float(last_number(answer) == gold), **off}
    if benchmark == "capitals":
        return {"accuracy": float(names_any(answer, gold)), **off, "finished": float(finished)}
    return {**off, "finished": float(finished), "words": float(len(answer.split()))}


def evaluate(model, tokenizer, problems: dict, settings: Settings, folder: Path, model_name: str) -> dict:
    """Answer every benchmark's problems with the model as it is, the way step 2 samples (chat
    template, system prompt, decoding; --eval-prompt-template, --eval-max-new-tokens), and score
    the answers. Writes them all to eval_answers.jsonl, and alpaca's in AlpacaEval's model_outputs
    format to alpaca_<lang>.json. Returns {benchmark: {lang: {metric: mean over the problems}}}."""
    jobs = [(benchmark, lang, problem) for benchmark, by_lang in problems.items()
            for lang, items in by_lang.items() for problem in items]
    eval_template = template(settings, "eval_prompt_template")
    languages = parse_languages(settings.eval_langs or settings.langs)
    ids = [chat_prompt_ids(tokenizer, fill_template(eval_template, problem["prompt"], languages[lang]),
                           settings.system_prompt) for _, lang, problem in jobs]
    answers = generate(model, tokenizer, ids, settings.eval_max_new_tokens, settings.gen_batch_size,
                       settings.repetition_penalty, settings.temperature, desc=f"evaluating {model_name}",
                       engine=settings.engine)
    candidates = tuple({**parse_languages(settings.langs), **languages})
    records = [{"benchmark": benchmark, "lang": lang, **problem, "answer": answer.strip(), "finished": finished,
                "scores": score(benchmark, answer.strip(), finished, problem["gold"], lang, candidates)}
               for (benchmark, lang, problem), (answer, finished) in zip(jobs, answers)]
    write_jsonl(folder / "eval_answers.jsonl", records)
    results = {}
    for benchmark, by_lang in problems.items():
        for lang in by_lang:
            scored = [r for r in records if r["benchmark"] == benchmark and r["lang"] == lang]
            metrics = results.setdefault(benchmark, {}).setdefault(lang, {})
            for metric in scored[0]["scores"] if scored else []:
                values = [r["scores"][metric] for r in scored if r["scores"][metric] is not None]
                if values:  # off_target is None where language_of can't tell
                    metrics[metric] = sum(values) / len(values)
            if benchmark == "alpaca":
                outputs = [{"instruction": r["prompt"], "output": r["answer"], "generator": model_name,
                            "dataset": r["dataset"]} for r in scored]
                write_atomic(folder / f"alpaca_{lang}.json", to_json(outputs, indent=1))
    return results


def evaluate_once(model, tokenizer, problems: dict, settings: Settings, out: Path, t: int, in_memory: bool) -> dict:
    """--eval of M_t, kept in iter_<t>/eval.json (reused from it when resuming); in_memory: whether
    `model` is M_t, so that a missing evaluation can be redone."""
    folder = out / f"iter_{t}"
    if finished(folder / "eval.json"):
        results = read_json(folder / "eval.json")
        check_shape(str(folder / "eval.json"), results, {benchmark: dict.fromkeys(by_lang, dict)
                                                         for benchmark, by_lang in problems.items()})
        return results
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
# QAlign (Zhu et al. 2024, arXiv 2401.07817; NJUNLP/QAlign) moves English ability into other
# languages by SFT alone: stage 1 teaches the model to translate each question into English
# (question alignment), stage 2 fine-tunes it on English questions with English answers
# (response alignment). The authors used gold answers (MetaMathQA) on a base model; here, in
# LIDR's label-free setting, the answers are M0's own unless --answer-field names gold ones.
QALIGN_REQUEST = "Translate the following sentences from {source} to {target}."  # their data/gsmtrans/gsmtrans.py


def qalign_stage(t: int, model, tokenizer, prompts: list[dict], languages: dict[str, str], settings: Settings,
                 folder: Path) -> dict:
    """QAlign's stage t (1 or 2), M_{t-1} -> M_t in place, on the prompts of LIDR's first
    iteration. Stage 1 also samples M0's English answers for stage 2, before any training."""
    langs = list(languages)
    if t == 1:
        prompts, prompts_too_long = drop_untrainable_prompts(prompts, tokenizer, languages, settings)
        prompt_translations = stage(folder / "prompt_translations.jsonl", lambda: translate(
            model, tokenizer, prompt_translation_requests(prompts, langs), languages, settings, "translating prompts"),
            settings)
        prompts = stage(folder / "prompts.jsonl", lambda: fill_prompts(prompts, prompt_translations, langs), settings)
        english = {langs[0]: languages[langs[0]]}
        responses = [] if settings.answer_field else stage(folder / "responses.jsonl", lambda: sample_responses(
            model, tokenizer, prompts, english, settings), settings)
        stage(folder / "response_alignment.jsonl", lambda: response_alignment_examples(
            prompts, responses, languages, settings), settings)
        examples = stage(folder / "question_alignment.jsonl", lambda: question_alignment_examples(
            prompts, languages), settings)
    else:
        prompts_too_long = dict.fromkeys(langs, 0)
        examples = reuse(folder.parent / "iter_1" / "response_alignment.jsonl", settings)
    trained = train_on_examples(model, tokenizer, examples, settings, folder / "train_log.jsonl")
    examples_per_lang = {lang: sum(e["lang"] == lang for e in examples) for lang in langs}
    return {"examples": examples_per_lang, "prompts_too_long": prompts_too_long, "train": trained}


def question_alignment_examples(prompts: list[dict], languages: dict[str, str]) -> list[dict]:
    """Stage 1's data: each question in a language other than the dominant one -> the dominant
    (English) question, under QAlign's instruction. Only questions are needed, no answers."""
    dominant = next(iter(languages))
    return [{"id": p["id"], "lang": lang,
             "prompt": QALIGN_REQUEST.format(source=languages[lang], target=languages[dominant]) + " " + p[lang],
             "response": p[dominant]}
            for p in prompts for lang in languages if lang != dominant and p[lang]]


def response_alignment_examples(prompts: list[dict], responses: list[dict], languages: dict[str, str],
                                settings: Settings) -> list[dict]:
    """Stage 2's data: English prompts (as sampled: --prompt-template applies) with English answers,
    the records' gold --answer-field, or M0's finished, non-empty answers (as LIDR's pairs need)."""
    dominant = next(iter(languages))
    if settings.answer_field:
        prompt_template = template(settings, "prompt_template")
        return [{"id": p["id"], "lang": dominant,
                 "prompt": fill_template(prompt_template, p[dominant], languages[dominant]), "response": p["answer"]}
                for p in prompts]
    return [{"id": r["id"], "lang": dominant, "prompt": r["prompt"], "response": r["response"]}
            for r in responses if r["finished"] and r["response"]]


def train_on_examples(model, tokenizer, examples: list[dict], settings: Settings, log_path: Path) -> dict | None:
    """One SFT stage: tokenise the examples in the chat format pairs use and train on the NLL of
    their answers (train with nll_gradients). None when no example is left to train on."""
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
    """An SFT example {"prompt", "response"} as (ids, prompt length), built as tokenize_pair
    builds a pair; None if the prompt alone fills max_len."""
    prompt_ids = chat_prompt_ids(tokenizer, example["prompt"], system_prompt)
    room = max_len - len(prompt_ids)
    answer_ids = tokenizer(example["response"], add_special_tokens=False).input_ids + [end_of_turn]
    return (prompt_ids + answer_ids[:room], len(prompt_ids)) if room >= 1 else None


def nll_gradients(model, sequences: list[tuple[list[int], int]], micro_batch_size: int, pad_id: int) -> dict:
    """SFT's backward over one optimizer step's (ids, prompt length) sequences, in length-grouped
    micro-batches: the NLL of the answer tokens, averaged over all the step's answer tokens (each
    micro-batch's sum is divided by the step's count, so micro-batching changes nothing). collate
    labels prompt and padding tokens -100: they are out of the loss. Returns each sequence's NLL
    per token and its token count, in the order of sequences."""
    answer_tokens = sum(len(ids) - prompt_length for ids, prompt_length in sequences)
    micro_batches = length_grouped([len(ids) for ids, _ in sequences], micro_batch_size)
    metrics = []
    for micro, factor in this_process_share(micro_batches):
        batch = collate([sequences[i] for i in micro], pad_id)
        logps, lengths = chunked_sequence_logps(model, *(t.to(model.device) for t in batch))
        (-logps.sum() / answer_tokens * factor).backward()
        metrics += [(micro, {"loss/nll": (-logps / lengths).detach(), "tokens": batch[1].sum(-1)})] if factor else []
    return in_step_order(metrics)


# ======================================================================== built-in prompts
# Used when --prompts is omitted, so the whole loop runs with no download.
BUILTIN_PROMPTS = [  # written for this kit; the same instruction in the five languages of the paper
    {"id": "b01", "en": "Give three tips for staying healthy.", "es": "Da tres consejos para mantenerse sano.",
     "ru": "Дай три совета, как оставаться здоровым.", "de": "Nenne drei Tipps, um gesund zu bleiben.",
     "fr": "Donne trois conseils pour rester en bonne santé."},
    {"id": "b02", "en": "Explain why the sky is blue in two sentences.",
     "es": "Explica en dos frases por qué el cielo es azul.",
     "ru": "Объясни в двух предложениях, почему небо голубое.",
     "de": "Erkläre in zwei Sätzen, warum der Himmel blau ist.",
     "fr": "Explique en deux phrases pourquoi le ciel est bleu."},
    {"id": "b03", "en": "Write a short poem about the sea.", "es": "Escribe un poema corto sobre el mar.",
     "ru": "Напиши короткое стихотворение о море.", "de": "Schreibe ein kurzes Gedicht über das Meer.",
     "fr": "Écris un court poème sur la mer."},
    {"id": "b04", "en": "What is the capital of Australia?", "es": "¿Cuál es la capital de Australia?",
     "ru": "Какая столица у Австралии?", "de": "Was ist die Hauptstadt von Australien?",
     "fr": "Quelle est la capitale de l'Australie ?"},
    {"id": "b05", "en": "A shop sells pencils at 3 for 2 dollars. How much do 12 pencils cost?",
     "es": "Una tienda vende lápices a 3 por 2 dólares. ¿Cuánto cuestan 12 lápices?",
     "ru": "Магазин продаёт карандаши по 3 штуки за 2 доллара. Сколько стоят 12 карандашей?",
     "de": "Ein Laden verkauft Bleistifte zu 3 Stück für 2 Dollar. Was kosten 12 Bleistifte?",
     "fr": "Un magasin vend des crayons à 3 pour 2 dollars. Combien coûtent 12 crayons ?"},
    {"id": "b06", "en": "Describe how to make a cup of tea.", "es": "Describe cómo preparar una taza de té.",
     "ru": "Опиши, как заварить чашку чая.", "de": "Beschreibe, wie man eine Tasse Tee zubereitet.",
     "fr": "Décris comment préparer une tasse de thé."},
    {"id": "b07", "en": "Suggest a name for a small bakery.", "es": "Sugiere un nombre para una pequeña panadería.",
     "ru": "Предложи название для маленькой пекарни.", "de": "Schlage einen Namen für eine kleine Bäckerei vor.",
     "fr": "Propose un nom pour une petite boulangerie."},
    {"id": "b08", "en": "Summarise the plot of Little Red Riding Hood in one sentence.",
     "es": "Resume el argumento de Caperucita Roja en una frase.",
     "ru": "Перескажи сюжет «Красной Шапочки» в одном предложении.",
     "de": "Fasse die Handlung von Rotkäppchen in einem Satz zusammen.",
     "fr": "Résume l'histoire du Petit Chaperon rouge en une phrase."},
    {"id": "b09", "en": "List the planets of the solar system in order from the sun.",
     "es": "Enumera los planetas del sistema solar en orden desde el sol.",
     "ru": "Перечисли планеты Солнечной системы по порядку от Солнца.",
     "de": "Zähle die Planeten des Sonnensystems in der Reihenfolge ab der Sonne auf.",
     "fr": "Énumère les planètes du système solaire dans l'ordre à partir du soleil."},
    {"id": "b10", "en": "Write a polite email asking a colleague to move a meeting to Friday.",
     "es": "Escribe un correo cortés pidiendo a un colega que mueva una reunión al viernes.",
     "ru": "Напиши вежливое письмо с просьбой к коллеге перенести встречу на пятницу.",
     "de": "Schreibe eine höfliche E-Mail, in der du einen Kollegen bittest, ein Treffen auf Freitag zu verlegen.",
     "fr": "Écris un e-mail poli demandant à un collègue de déplacer une réunion à vendredi."},
    {"id": "b11", "en": "What are the advantages of riding a bicycle to work?",
     "es": "¿Cuáles son las ventajas de ir al trabajo en bicicleta?",
     "ru": "Каковы преимущества поездок на работу на велосипеде?",
     "de": "Welche Vorteile hat es, mit dem Fahrrad zur Arbeit zu fahren?",
     "fr": "Quels sont les avantages d'aller au travail à vélo ?"},
    {"id": "b12", "en": "Explain the difference between weather and climate.",
     "es": "Explica la diferencia entre el tiempo y el clima.", "ru": "Объясни разницу между погодой и климатом.",
     "de": "Erkläre den Unterschied zwischen Wetter und Klima.",
     "fr": "Explique la différence entre la météo et le climat."},
    {"id": "b13", "translation_task": True, "en": "Translate into French: 'The library opens at nine.'",
     "es": "Traduce al francés: 'The library opens at nine.'",
     "ru": "Переведи на французский: 'The library opens at nine.'",
     "de": "Übersetze ins Französische: 'The library opens at nine.'",
     "fr": "Traduis en français : 'The library opens at nine.'"},
    {"id": "b14", "en": "Give an example of a renewable energy source and explain how it works.",
     "es": "Da un ejemplo de fuente de energía renovable y explica cómo funciona.",
     "ru": "Приведи пример возобновляемого источника энергии и объясни, как он работает.",
     "de": "Nenne ein Beispiel für eine erneuerbare Energiequelle und erkläre, wie sie funktioniert.",
     "fr": "Donne un exemple de source d'énergie renouvelable et explique son fonctionnement."},
    {"id": "b15", "en": "If a train travels 60 km in 45 minutes, what is its average speed in km/h?",
     "es": "Si un tren recorre 60 km en 45 minutos, ¿cuál es su velocidad media en km/h?",
     "ru": "Если поезд проезжает 60 км за 45 минут, какова его средняя скорость в км/ч?",
     "de": "Wenn ein Zug 60 km in 45 Minuten fährt, wie hoch ist seine Durchschnittsgeschwindigkeit in km/h?",
     "fr": "Si un train parcourt 60 km en 45 minutes, quelle est sa vitesse moyenne en km/h ?"},
    {"id": "b16", "translation_task": True, "en": "Translate 'good morning, friends' into Spanish.",
     "es": "Traduce 'good morning, friends' al español.", "ru": "Переведи 'good morning, friends' на испанский.",
     "de": "Übersetze 'good morning, friends' ins Spanische.", "fr": "Traduis 'good morning, friends' en espagnol."},
]


# ======================================================================== capitals: a check for small real models
# Short questions whose answer is a name a small chat model knows in English, checked without a
# judge. SmolLM2-135M-Instruct names most capitals in English and few in German or Spanish: a
# language gap on knowledge the model has (README: A real model). --eval capitals asks the first
# 20 countries, --prompts capitals the other 30.
CAPITAL_QUESTION = {"en": "What is the capital of {}?", "de": "Was ist die Hauptstadt von {}?",
                    "es": "¿Cuál es la capital de {}?"}
CAPITALS = [line.split("|") for line in """\
Germany|Deutschland|Alemania|Berlin/Berlín
Italy|Italien|Italia|Rome/Rom/Roma
Japan|Japan|Japón|Tokyo/Tokio
Russia|Russland|Rusia|Moscow/Moskau/Moscú
Canada|Kanada|Canadá|Ottawa
Egypt|Ägypten|Egipto|Cairo/Kairo
Sweden|Schweden|Suecia|Stockholm/Estocolmo
Poland|Polen|Polonia|Warsaw/Warschau/Varsovia
Austria|Österreich|Austria|Vienna/Wien/Viena
Greece|Griechenland|Grecia|Athens/Athen/Atenas
Portugal|Portugal|Portugal|Lisbon/Lissabon/Lisboa
Kenya|Kenia|Kenia|Nairobi
Peru|Peru|Perú|Lima
Thailand|Thailand|Tailandia|Bangkok
South Korea|Südkorea|Corea del Sur|Seoul/Seúl
Belgium|Belgien|Bélgica|Brussels/Brüssel/Bruselas
Romania|Rumänien|Rumania|Bucharest/Bukarest/Bucarest
Iceland|Island|Islandia|Reykjavik
Venezuela|Venezuela|Venezuela|Caracas
Malaysia|Malaysia|Malasia|Kuala Lumpur
France|Frankreich|Francia|Paris/París
Spain|Spanien|España|Madrid
China|China|China|Beijing/Peking/Pekín
Australia|Australien|Australia|Canberra
Brazil|Brasilien|Brasil|Brasília
India|Indien|India|Delhi
Argentina|Argentinien|Argentina|Buenos Aires
Norway|Norwegen|Noruega|Oslo
Finland|Finnland|Finlandia|Helsinki
Denmark|Dänemark|Dinamarca|Copenhagen/Kopenhagen/Copenhague
Ireland|Irland|Irlanda|Dublin
Hungary|Ungarn|Hungría|Budapest
Chile|Chile|Chile|Santiago
Cuba|Kuba|Cuba|Havana/Havanna/Habana
Vietnam|Vietnam|Vietnam|Hanoi
Indonesia|Indonesien|Indonesia|Jakarta/Yakarta
Nigeria|Nigeria|Nigeria|Abuja
Morocco|Marokko|Marruecos|Rabat
Colombia|Kolumbien|Colombia|Bogotá
New Zealand|Neuseeland|Nueva Zelanda|Wellington
Pakistan|Pakistan|Pakistán|Islamabad
England|England|Inglaterra|London/Londres
Scotland|Schottland|Escocia|Edinburgh/Edimburgo
Bulgaria|Bulgarien|Bulgaria|Sofia
Serbia|Serbien|Serbia|Belgrade/Belgrad/Belgrado
Croatia|Kroatien|Croacia|Zagreb
Ghana|Ghana|Ghana|Accra/Acra
Ecuador|Ecuador|Ecuador|Quito
Afghanistan|Afghanistan|Afganistán|Kabul
Nepal|Nepal|Nepal|Kathmandu/Katmandu
""".splitlines()]
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
# A teaching device, not a result about real LLMs. --model toy is a 0.4M-parameter Llama that
# lidr pre-trains in a few CPU minutes, in the toy languages of --langs, on a world built in with
# a language imbalance:
#   - the task: small arithmetic word problems with one exact answer ("Ana has three apples and
#     gets four more. How many apples does Ana have now?" -> "Ana has seven apples."), written
#     in English, Spanish, Russian, German and French from small word lists (word-for-word
#     templates; the grammar is simplified). Numbers are words, different in every language;
#   - English, the dominant language, has thousands of correct examples; every other language
#     fewer, and most of them answered carelessly with the problem's first number;
#   - translation examples of answer sentences, both ways between English and each language, in
#     exactly the tagged format of step 3.
# M0 then answers English well and the others badly, and translates well, so the unchanged loop
# has real pairs to learn from; --eval toy scores exact answers on held-out problems.
TOY_LANGS = ("en", "es", "ru", "de", "fr")

TOY_SYSTEM_PROMPT = TOY_DEFAULTS["system_prompt"]  # none: shorter sequences, faster pre-training

TOY_NUMBERS = {  # 2, 3, ...
    "en": "two three four five six seven eight nine ten eleven twelve",
    "es": "dos tres cuatro cinco seis siete ocho nueve diez once doce",
    "ru": "два три четыре пять шесть семь восемь девять десять одиннадцать двенадцать",
    "de": "zwei drei vier fünf sechs sieben acht neun zehn elf zwölf",
    "fr": "deux trois quatre cinq six sept huit neuf dix onze douze",
}

TOY_OBJECTS = {"en": "apples pears coins flowers", "es": "manzanas peras monedas flores",
               "ru": "яблок груш монет цветов", "de": "Äpfel Birnen Münzen Blumen", "fr": "pommes poires pièces fleurs"}

TOY_NAMES = "Ana Ben Eva Max Lea Tom Sam Mia".split()

TOY_TEMPLATES = {  # (gets more, gives away, answer)
    "en": ("{name} has {a} {obj} and gets {b} more. How many {obj} does {name} have now?",
           "{name} has {a} {obj} and gives {b} away. How many {obj} does {name} have now?", "{name} has {c} {obj}."),
    "es": ("{name} tiene {a} {obj} y recibe {b} más. ¿Cuántas {obj} tiene {name} ahora?",
           "{name} tiene {a} {obj} y regala {b}. ¿Cuántas {obj} tiene {name} ahora?", "{name} tiene {c} {obj}."),
    "ru": ("{name} имеет {a} {obj} и получает ещё {b}. Сколько {obj} имеет {name} теперь?",
           "{name} имеет {a} {obj} и отдаёт {b}. Сколько {obj} имеет {name} теперь?", "{name} имеет {c} {obj}."),
    "de": ("{name} hat {a} {obj} und bekommt {b} dazu. Wie viele {obj} hat {name} jetzt?",
           "{name} hat {a} {obj} und verschenkt {b}. Wie viele {obj} hat {name} jetzt?", "{name} hat {c} {obj}."),
    "fr": ("{name} a {a} {obj} et reçoit {b} de plus. Combien de {obj} a {name} maintenant ?",
           "{name} a {a} {obj} et donne {b}. Combien de {obj} a {name} maintenant ?", "{name} a {c} {obj}."),
}

# English: ~2,700 examples, all correct; every weaker language 1,000, 60% of them careless. Fewer
# weak examples left the gap as wide but gave the loop less to build on; fewer sequences seen left
# some seeds' M0 weak in English or in translating (README: The toy world).
TOY_RECIPE = dict(largest_number=12, eval_problems=200, weak_examples=1000, weak_careless=0.6,  # the world
                  hidden_size=96, layers=3, sequences_seen=76_800, batch_size=64, lr=3e-3,  # M0 and its pre-training
                  adam_beta2=0.98)

TOY_PROGRESS_STEPS = 100  # pre-training steps between saves of its progress (not part of the recipe)


def check_toy_languages(languages: dict[str, str], flag: str):
    if not set(languages) <= set(TOY_LANGS) or next(iter(languages)) != "en":
        raise LidrError(f"{flag}: the toy world has only {','.join(TOY_LANGS)}, English first "
                        f"(got {','.join(languages)})")


def toy_problem_list() -> list[tuple]:
    """Every problem (a, b, gives_away, name, object), in one fixed shuffled order: the first
    TOY_RECIPE["eval_problems"] are held out for --eval toy, the rest are pre-training and loop prompts."""
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

    # Every prompt as the chat template renders it (rendered once around a placeholder), and every answer.
    messages = [{"role": "system", "content": TOY_SYSTEM_PROMPT}] if TOY_SYSTEM_PROMPT else []
    chat = tokenizer_with(["<|unk|>"]).apply_chat_template(messages + [{"role": "user", "content": "\0"}],
                                                           add_generation_prompt=True, tokenize=False)
    texts = [TRANSLATION_PREFIX]
    for lang in TOY_LANGS:
        for problem in toy_problem_list():
            question, answer = toy_text(lang, problem)
            texts += [chat.replace("\0", question), answer]
    for request, answer in toy_translation_requests(TOY_LANGS):
        texts += [chat.replace("\0", request), answer]
    special = re.compile("|".join(map(re.escape, [v for v in specials.values() if isinstance(v, str)]
                                      + specials["additional_special_tokens"])))
    pieces = {piece for text in texts for part in special.split(text) for piece, _ in split.pre_tokenize_str(part)}
    return tokenizer_with(["<|unk|>", *sorted(pieces)])


def untrained_toy_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden = TOY_RECIPE["hidden_size"]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=TOY_RECIPE["layers"], num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def toy_pretraining_data(tokenizer, seed: int, langs) -> list[tuple[list[int], int]]:
    """(ids, prompt length) sequences in lidr's chat format: word problems (every English one, and
    TOY_RECIPE's share of mostly careless ones per other language) and translations of answer sentences."""
    rng = random.Random(seed)
    problems = toy_problem_list()[TOY_RECIPE["eval_problems"]:]
    examples = [toy_text("en", p) for p in problems]
    for lang in langs[1:]:
        for a, b, gives, name, obj in rng.sample(problems, TOY_RECIPE["weak_examples"]):
            careless = rng.random() < TOY_RECIPE["weak_careless"]
            examples.append(toy_text(lang, (a, b, gives, name, obj), answer=a if careless else None))
    end_of_turn = end_of_turn_id(tokenizer)
    sequences = []
    for user_text, answer, prefix in ([(q, a, "") for q, a in examples]
                                      + [(q, a, TRANSLATION_PREFIX) for q, a in toy_translation_requests(langs)]):
        prompt = chat_prompt_ids(tokenizer, user_text, TOY_SYSTEM_PROMPT, prefix)
        sequences.append((prompt + tokenizer(answer, add_special_tokens=False).input_ids + [end_of_turn], len(prompt)))
    return sequences


def toy_model_folder(root: Path, seed: int, langs) -> Path:
    """root/toy-m0-<langs>-seed<seed>-<recipe hash>: any change to the toy's data, model or
    pre-training (its code included) makes another M0."""
    functions = (toy_problem_list, toy_text, toy_answer, toy_translation_requests, toy_tokenizer, chat_prompt_ids,
                 end_of_turn_id, untrained_toy_model, toy_pretraining_data, toy_model, train, nll_gradients,
                 length_grouped, in_step_order, collate, chunked_sequence_logps, answer_token_logps, optimizer_for,
                 warmup_cosine)
    recipe = json.dumps([TOY_RECIPE, TOY_TEMPLATES, TOY_NUMBERS, TOY_OBJECTS, TOY_NAMES, TOY_SYSTEM_PROMPT,
                         TRANSLATION_REQUEST, TRANSLATION_PREFIX, LANGUAGE_NAMES])
    recipe += "".join(inspect.getsource(function) for function in functions)
    return root / f"toy-m0-{'-'.join(langs)}-seed{seed}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"


def toy_model(root: Path, seed: int, langs) -> Path:
    """The toy M0 of a seed, in the toy languages of the run: pre-trained once with the SFT of
    QAlign's stages (nll_gradients in train), then kept in toy_model_folder for every later run."""
    folder = toy_model_folder(root, seed, langs)
    if (folder / "toy_recipe.json").exists():  # written last: the model is complete
        return folder
    torch.manual_seed(seed)
    tokenizer = toy_tokenizer()
    model = untrained_toy_model(tokenizer)
    sequences = toy_pretraining_data(tokenizer, seed, langs)
    # the run's optimizer loop, with the toy recipe's settings; the same number of steps whatever
    # the languages (fewer languages, more epochs). Micro-batches of 16 pad less than one of 64.
    epochs = max(1, round(TOY_RECIPE["sequences_seen"] / len(sequences)))
    settings = Settings(lr=TOY_RECIPE["lr"], adam_beta2=TOY_RECIPE["adam_beta2"], epochs=epochs,
                        batch_size=TOY_RECIPE["batch_size"], micro_batch_size=16,
                        warmup_ratio=0.05, weight_decay=0.0, max_grad_norm=1.0, optim="adamw-fp32",
                        gradient_checkpointing="off", seed=seed)
    tqdm.write(f"pre-training the toy M0 (once, kept in {folder})")
    # Built whole in a private folder, then renamed into place: two runs pre-training the same M0 at
    # once never see or delete a half-written one; the second to finish uses the first's. Progress
    # is saved every TOY_PROGRESS_STEPS steps: an interrupted pre-training goes on from there, to
    # the same M0 (and log) as an uninterrupted one.
    building, progress = temp_path(folder), root / f".{folder.name}.progress.pt"
    building.mkdir(parents=True, exist_ok=True)
    try:
        train(model, ["all"] * len(sequences), lambda model, ids: nll_gradients(
            model, [sequences[i] for i in ids], settings.micro_batch_size, tokenizer.pad_token_id),
            settings, building / "train_log.jsonl", progress, TOY_PROGRESS_STEPS)
        model.save_pretrained(building)
        tokenizer.save_pretrained(building)
    except BaseException as error:  # interrupted, or a full disk: the progress file is what is kept
        shutil.rmtree(building, ignore_errors=True)
        raise write_error(error, folder) from None
    record = {"m0": str(folder.resolve()), "seed": seed, "langs": list(langs), **TOY_RECIPE}
    write_atomic(building / "toy_recipe.json", to_json(record, indent=2))
    if folder.exists() and not (folder / "toy_recipe.json").exists():
        shutil.rmtree(folder)  # left incomplete by an older lidr
    try:
        os.rename(building, folder)
    except OSError:  # another run's M0 is in place
        shutil.rmtree(building)
    progress.unlink(missing_ok=True)
    return folder


if __name__ == "__main__":
    sys.exit(main())
