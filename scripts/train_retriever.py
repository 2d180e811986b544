"""Train `tiny-retriever`: a small LLaMA (the embedded byte tokenizer, GQA, RoPE) that finds needles in long
contexts, so that accuracy-versus-compression sweeps mean something on a CPU machine.

    python scripts/train_retriever.py --out exporter/models/tiny-retriever     # under an hour on 2 cores

Deterministic (one seed for the weights, the data and their order); prints the training curve as JSON lines.

Data, all generated here. Prompts are built by the product's own NIAH builder (`validate.niah`, chat template,
generated haystack sentences) around a random fact, so the model must read the context; the evaluation's default
San Francisco needle never occurs:
* needle task: "The best thing to do in {place} is {activity}." asked as "What is the best thing to do in
  {place}?"; places and activities random (real and made-up names, known and random words, some capitalised,
  and short function words such as "a", "in the" before 40% of the words, as in real answers);
* key-value lookup among distractors: "The magic number of {key} is {digits}." in 30% of the facts, and in
  every prompt 0 to length/80 facts of the same forms about other keys plus sentences made of activity words
  (hard negatives: copying by the last few bytes alone lands in the wrong place);
* a copy task: random words (15-30% of them numbers, so that digits are copied too; a function word before a
  quarter of them), then the same words again (every byte of the repeat is a target). Alone for the first phase,
  it makes the copying ("induction") heads form; later it is 20-30% of the rows.
The loss is the answer's (its bytes and EOS) plus 0.2 x the language-model loss of the whole row.

Two choices make retrieval hold at lengths the short phases never see:
* RoPE theta 500000 (LLaMA-3's): a quarter of the rotary pairs turn less than a radian over 4k tokens, so a
  head can match content at any distance without having trained at that distance;
* positional skips (PoSE, arXiv 2309.10400): a share of the rows jumps its positions once, at a random point of
  the context, so needle-to-question distances up to 4096 are seen at the cost of a short row.
The long phase trains on real prompts of 256 to 4032 tokens (each row its own length, unpadded, so SDPA runs its
causal kernel) so that attention stays sharp among thousands of keys while short answers stay in the mix; the
learning rate decays to a tenth, not to zero, so that this phase still learns. A short phase of 320-768 tokens
ends the run: it sharpens the answers the long phase taught (in an experiment it took the key-value lookup from 0.7
to 1.0 over the NIAH grid).

Function words matter because the haystack is full of them: a copy that matches only the last byte or two ("a ",
"in ") jumps back to the wrong place and repeats ("eat a a a a"). Without them in the data the model could not
copy "eat a sandwich and sit in Dolores Park" beyond 1k tokens (0.765 over the NIAH grid); with them it does (0.97).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.checkpoint import load_model  # noqa: E402
from validate.niah import Needle, build_haystack_prompt, generated_sentences  # noqa: E402

# fmt: off
CITIES = (
    "Oslo", "Lima", "Cairo", "Kyoto", "Berlin", "Madrid", "Toronto", "Nairobi", "Dublin", "Vienna", "Prague",
    "Lisbon", "Seoul", "Mumbai", "Sydney", "Boston", "Chicago", "Denver", "Havana", "Athens", "Helsinki", "Quito",
    "Bogota", "Manila", "Hanoi", "Warsaw", "Zurich", "Geneva", "Marseille", "Naples", "Porto", "Krakow", "Tbilisi",
    "New York", "Los Angeles", "Buenos Aires", "Cape Town", "Hong Kong", "Mexico City", "Rio de Janeiro",
    "Salt Lake City", "Saint Petersburg", "Kuala Lumpur", "Tel Aviv", "New Orleans", "Las Vegas", "Santa Fe",
)
WORDS = (
    "walk", "along", "the", "river", "and", "watch", "boats", "drink", "coffee", "in", "a", "small", "cafe", "visit",
    "museum", "of", "modern", "art", "climb", "hill", "at", "sunset", "swim", "lake", "ride", "bicycle", "through",
    "old", "town", "buy", "fresh", "bread", "from", "market", "listen", "to", "jazz", "night", "read", "book",
    "under", "tree", "take", "boat", "tour", "harbour", "eat", "noodles", "near", "station", "dance", "square",
    "play", "chess", "with", "locals", "sit", "on", "bench", "by", "fountain", "try", "spicy", "soup", "corner",
    "explore", "gardens", "after", "rain", "photograph", "bridges", "morning", "hike", "up", "trail", "cold",
    "ice", "cream", "beach", "fly", "kite", "park", "sunny", "day", "sandwich", "sing", "songs", "street",
    "paint", "houses", "learn", "cook", "fish", "rice", "green", "tea", "warm", "evening", "watch", "birds",
    "meet", "friends", "for", "lunch", "bake", "pie", "apple", "orchard", "catch", "train", "coast", "rest",
)
# fmt: on
# short function words, alone and in pairs: the haystack is full of them, so a copy that matches only the last byte
# or two ("a ", "in ") jumps to the wrong place; real answers ("eat a sandwich and sit in ...") are made of them
FUNCTION = ("a", "an", "the", "in", "on", "and", "of", "to", "at", "by", "with", "for", "in a", "on the", "in the",
            "by a", "of the", "at a", "to the", "and a")
SYLLABLES = ("ka", "lo", "mi", "ra", "ven", "tor", "bel", "dun", "sar", "qui", "zen", "po", "mar", "lin", "gra")
PHASES = "650:32:96:256:1.0:0:0.15,400:12:320:768:0.3:0.3:0.3,550:4:256:4032:0.2:0:0.3,100:12:320:768:0.3:0.3:0.3"


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))


def place(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(CITIES)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def activity(rng: random.Random) -> str:
    def word() -> str:
        r = rng.random()
        w = rng.choice(WORDS) if r < 0.5 else random_word(rng) if r < 0.8 else place(rng)
        return w.capitalize() if rng.random() < 0.15 else w

    words = []
    for _ in range(rng.randint(3, 10)):
        if words and rng.random() < 0.4:
            words.append(rng.choice(FUNCTION))
        words.append(word())
    return " ".join(words)


def fact(rng: random.Random, key: str) -> tuple[str, str, str]:
    """(needle sentence, question, answer) about `key`."""
    if rng.random() < 0.7:
        what = activity(rng)
        return f"The best thing to do in {key} is {what}.", f"What is the best thing to do in {key}?", what
    digits = str(rng.randint(10_000, 9_999_999))
    return f"The magic number of {key} is {digits}.", f"What is the magic number of {key}?", digits


def needle_row(rng: random.Random, tokenizer, haystack: list[str], length: int) -> tuple[list[int], int]:
    """(ids = prompt + answer + EOS, index where the answer starts) for a prompt of at most `length` tokens."""
    keys = list(dict.fromkeys(place(rng) for _ in range(6)))
    needle, question, answer = fact(rng, keys[0])
    count = length // 40 + 10  # more sentences than the prompt holds (a byte per token, ~80 per sentence)
    start = rng.randrange(len(haystack) - count)
    sentences = haystack[start : start + count]
    fits = max(2, length // 80)
    for _ in range(rng.randint(0, fits)):
        sentences.insert(rng.randrange(fits), fact(rng, rng.choice(keys[1:]) if len(keys) > 1 else place(rng))[0])
    for _ in range(rng.randint(0, max(2, length // 120))):
        words = activity(rng) if rng.random() < 0.5 else " ".join(rng.choice(WORDS) for _ in range(6))
        sentences.insert(rng.randrange(fits), f"{rng.choice(('Some say', 'Nobody would', 'They like to'))} {words}.")
    prompt = build_haystack_prompt(tokenizer, sentences, length, rng.uniform(0, 100),
                                   Needle(needle, question, answer), chat=True)
    target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt.ids + target, len(prompt.ids)


def copy_row(rng: random.Random, tokenizer, length: int, digits: float = 0.0) -> tuple[list[int], int]:
    """Random words (a `digits` share of them numbers), a newline, then the same words: predictable only by
    looking back."""
    words: list[str] = []
    while len(" ".join(words)) < length // 2 - 8:
        if words and rng.random() < 0.25:
            words.append(rng.choice(FUNCTION))
        r = rng.random()
        if rng.random() < digits:
            words.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
        else:
            words.append(random_word(rng) if r < 0.5 else rng.choice(WORDS) if r < 0.8 else place(rng))
    text = " ".join(words)
    first = tokenizer(text + "\n")["input_ids"]
    return first + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id], len(first)


ALONE = 256  # phases longer than this run each row alone, unpadded: SDPA's causal kernel is ~1.7x faster at 4k


def runs_alone(phase: dict) -> bool:
    """Whether the phase draws each row's length and task alone and runs each row unpadded."""
    return phase["hi"] > ALONE


def draw_rows(rng: random.Random, tokenizer, haystack: list[str], phase: dict) -> list[tuple[bool, list[int], int]]:
    """(copy task?, ids = prompt + answer + EOS, answer start) per row. Short phases draw one length and task per
    batch (rows are padded together); long phases draw them per row, so a batch mixes lengths."""
    alone = runs_alone(phase)
    rows = []
    for b in range(phase["batch"]):
        if b == 0 or alone:
            length, copy = rng.randint(phase["lo"], phase["hi"]), rng.random() < phase["copy"]
        ids, start = (copy_row(rng, tokenizer, length, phase["digits"]) if copy
                      else needle_row(rng, tokenizer, haystack, length))
        rows.append((copy, ids, start))
    return rows


def tensors(rng: random.Random, rows: list[tuple[bool, list[int], int]], pad: int, skip: float, max_pos: int):
    """ids, mask, answer: [B, T] (right-padded); positions: [B, T] with a PoSE skip in a `skip` share of rows."""
    size, width = len(rows), max(len(ids) for _, ids, _ in rows)
    ids = torch.full((size, width), pad, dtype=torch.long)
    mask = torch.zeros(size, width, dtype=torch.long)
    answer = torch.zeros(size, width, dtype=torch.bool)
    positions = torch.arange(width).repeat(size, 1)
    for b, (copy, row, start) in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
        answer[b, start : len(row)] = True
        tail = 20 if copy else 120  # the question (and the chat tail) stays next to the answer
        if rng.random() < skip and max_pos > len(row) and start - tail > 8:
            positions[b, rng.randint(8, start - tail):] += rng.randint(0, max_pos - len(row))
    return ids, mask, answer, positions


def losses(model, ids, mask, answer, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer loss, LM loss), nats per token."""
    full = bool(mask.all())  # no padding: no mask, so SDPA takes its causal kernel
    logits = model(input_ids=ids, attention_mask=None if full else mask, position_ids=positions).logits[:, :-1]
    logits = logits.float()
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
    lm_mask, ans_mask = mask[:, 1:].bool(), answer[:, 1:]
    return (per_token * ans_mask).sum() / ans_mask.sum(), (per_token * lm_mask).sum() / lm_mask.sum()


@torch.no_grad()
def exact(model, tokenizer, haystack: list[str], rng: random.Random, length: int, n: int) -> float:
    """Share of held-out prompts whose greedy answer is exactly the fact's."""
    hits = 0
    for _ in range(n):
        ids, start = needle_row(rng, tokenizer, haystack, length)
        out = model.generate(torch.tensor([ids[:start]]), max_new_tokens=len(ids) - start + 2, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        hits += out[0, start:].tolist()[: len(ids) - start] == ids[start:]
    return hits / n


def parse_phases(text: str, max_len: int = 4096) -> list[dict]:
    """`steps:batch:min_len:max_len[:copy_share[:skip_share[:digit_share]]]`, comma-separated; ValueError names a
    bad one."""
    keys = ("steps", "batch", "lo", "hi", "copy", "skip", "digits")
    phases = []
    for part in text.split(","):
        try:
            values = [float(v) for v in part.split(":")]
        except ValueError:
            values = []
        if not 4 <= len(values) <= len(keys):
            raise ValueError(f"phase {part!r}: expected "
                             "steps:batch:min_len:max_len[:copy_share[:skip_share[:digit_share]]]")
        phase = dict(zip(keys, values + [0.0] * (len(keys) - len(values)), strict=True))
        phase = {k: int(v) if k in ("steps", "batch", "lo", "hi") else v for k, v in phase.items()}
        if min(phase["steps"], phase["batch"], phase["lo"]) < 1 or not phase["lo"] <= phase["hi"] <= max_len:
            raise ValueError(f"phase {part!r}: steps, batch and lengths must be positive, min_len <= max_len <= "
                             f"{max_len}")
        if not all(0 <= phase[k] <= 1 for k in ("copy", "skip", "digits")):
            raise ValueError(f"phase {part!r}: the shares must be between 0 and 1")
        phases.append(phase)
    return phases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="Checkpoint directory to write.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phases", default=PHASES,
                   help="steps:batch:min_len:max_len:copy_share:skip_share:digit_share per phase, comma-separated. "
                        f"Phases with max_len > {ALONE} draw each row's length and task alone.")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rope-theta", type=float, default=500000.0)
    p.add_argument("--eval-every", type=int, default=0,
                   help="Held-out exact answers every N steps (0: never). Checks add time, not weight changes.")
    p.add_argument("--init", type=Path, default=None, help="Continue from this checkpoint directory.")
    args = p.parse_args()
    try:
        phases = parse_phases(args.phases)
    except ValueError as exc:
        p.error(str(exc))
    if args.init is not None and not (args.init / "config.json").is_file():
        p.error(f"--init {args.init}: not a checkpoint directory (no config.json)")

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    rng, eval_rng = random.Random(args.seed), random.Random(args.seed + 1)
    tokenizer = load_model("tiny-llama3").tokenizer()
    haystack = [s for s, _ in zip(generated_sentences(args.seed + 7), range(60_000), strict=False)]
    held_out = [s for s, _ in zip(generated_sentences(args.seed + 8), range(5_000), strict=False)]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                         rope_theta=args.rope_theta, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config) if args.init is None else LlamaForCausalLM.from_pretrained(
        args.init, use_safetensors=True, local_files_only=True)
    model.config._attn_implementation = "sdpa"
    total = sum(ph["steps"] for ph in phases)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 100 if args.init is None else 20
    # a cosine down to a tenth, not to zero: the last (long) phase still has to learn
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, total) / total))))
    step, t0 = 0, time.time()
    for phase in phases:
        for _ in range(phase["steps"]):
            model.train()
            rows = draw_rows(rng, tokenizer, haystack, phase)
            groups = [[row] for row in rows] if runs_alone(phase) else [rows]
            answer_loss = lm_loss = 0.0
            for group in groups:
                ids, mask, answer, positions = tensors(rng, group, tokenizer.pad_token_id, phase["skip"],
                                                       config.max_position_embeddings)
                answer_part, lm_part = losses(model, ids, mask, answer, positions)
                ((answer_part + 0.2 * lm_part) / len(groups)).backward()
                answer_loss, lm_loss = answer_loss + answer_part.item(), lm_loss + lm_part.item()
            copies = sum(copy for copy, _, _ in rows)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            row = {"step": step, "task": "copy" if copies == len(rows) else "needle" if not copies else "mixed",
                   "len": max(len(ids) for _, ids, _ in rows), "answer_loss": round(answer_loss / len(groups), 4),
                   "lm_loss": round(lm_loss / len(groups), 4),
                   "minutes": round((time.time() - t0) / 60, 2)}
            if args.eval_every and (step % args.eval_every == 0 or step == total):
                model.eval()
                for length, n in ((512, 8), (2048, 4), (4000, 4)):
                    row[f"exact@{length}"] = exact(model, tokenizer, held_out, eval_rng, length, n)
            if step % 20 == 0 or step == total or "exact@512" in row:
                print(json.dumps(row), flush=True)
    save(model, tokenizer, args, step, time.time() - t0)


def save(model, tokenizer, args, steps: int, seconds: float) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    (out / "README.md").write_text(f"""# tiny-retriever

A {params:.2f}M-parameter LLaMA (4 layers, hidden 192, 6 query / 2 KV heads of 32, RoPE theta
{args.rope_theta:g}, pkv-export's embedded byte tokenizer) trained by pkv-export's `scripts/train_retriever.py` to
answer questions about facts hidden in long generated haystacks. It loads in transformers as an ordinary
`LlamaForCausalLM`.

- Command: `python scripts/train_retriever.py --out {out} --seed {args.seed} --phases {args.phases}
  --lr {args.lr} --rope-theta {args.rope_theta:g}`
- Data: generated by the script. NIAH prompts from pkv-export's builder with a random fact each ("The best thing
  to do in PLACE is ACTIVITY." or "The magic number of KEY is DIGITS."), distractor facts and sentences of the
  same words; a copy task. The evaluation's default San Francisco needle is not in it.
- Steps: {steps}, seed {args.seed}, {seconds / 60:.0f} minutes on a 2-core CPU; loss: answer + 0.2 x LM.
- Intended use: accuracy-versus-KV-compression measurements on CPU (NIAH, key-value lookup). It knows nothing
  else.
""")


if __name__ == "__main__":
    main()
