"""Twenty chats writing at once to the real bot: replies per second and latency,
one reply at a time (--max-batch 1) against batched (the bot's default
--max-batch), in one run.

The bot is tg_bot.py itself, a subprocess talking to the fake Bot API server of
the tests (tests/fake_bot_api.py), as in the end-to-end tests. Its model has
ruGPT-3 small's shape (12 layers, 768 wide, 12 heads, 2048 positions) with
seeded random weights, saved to a temporary folder with a byte-level BPE
tokenizer of 50257 tokens trained here (on the bundled sample dialogues and
made-up syllables, since ruGPT-3's own cannot be downloaded). Its chat_config.json
sets min_new_tokens = max_new_tokens, so every reply has the same length whatever
the weights say; the bot's debug log confirms it for every batch.

Each chat writes, waits for the reply, and writes again (--rounds times); all
chats start together. Latency is from a message's arrival at the server to the
reply's; replies per second count every reply over the whole run. Both runs use
the bot's fast path (int8 on a CPU) and its default threads.

    python bench/bot_load.py                           # about 3 minutes on 2 cores
    python bench/bot_load.py --chats 20 --rounds 3 --new-tokens 32 --batch 16
"""
import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fake_bot_api import FakeBotApi, LiveBot  # noqa: E402  (the tests' fake server and bot runner)

# ----------------------------------------------------------------------------
# defaults
N_LAYER, N_EMBD, N_HEAD, N_POSITIONS, VOCAB_SIZE = 12, 768, 12, 2048, 50257  # ruGPT-3 small
CHATS = 20
ROUNDS = 2
NEW_TOKENS = 64             # the kit's default reply length (chat_config.json's max_new_tokens)
TOKEN = "24680:BENCH-token"
SAMPLE = REPO / "data" / "sample_dialogues.jsonl"
SYLLABLE_LINES = 40_000     # enough text for 50257 BPE tokens
REPLY_TIMEOUT = 900         # seconds; a reply this late means the bot is stuck
SEED = 0
BATCH_LINE = re.compile(r"batch of \d+: ([\d,]+) new tokens in ([\d.]+) s")
# ----------------------------------------------------------------------------


def train_tokenizer(seed):
    """A byte-level BPE of VOCAB_SIZE tokens. Real Russian lines (repeated, so that
    their words become tokens, as in ruGPT-3's vocabulary) and made-up syllable
    words to fill the rest."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    lines = []
    if SAMPLE.is_file():
        for line in SAMPLE.read_text(encoding="utf-8").splitlines():
            lines += json.loads(line)["sample"]
    lines += ["Вопрос: Кто ты?", "Ответ: Я дружелюбный помощник. Отвечаю коротко и по делу."]
    rng = random.Random(seed)
    syllables = [c + v for c in "бвгдзклмнпрстфхцчшщ" for v in "аеиоуыэюя"]
    made_up = [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(12))
               for _ in range(SYLLABLE_LINES)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines * 20 + made_up, vocab_size=VOCAB_SIZE, min_frequency=1, show_progress=False,
                            special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def write_model_folder(folder, new_tokens, seed):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer(seed)
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, n_positions=N_POSITIONS,
                        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    chat_config = {"format_version": 1, "question_label": "Вопрос: ", "answer_label": "Ответ: ", "turn_separator": "\n",
                   "persona": {"question": "Кто ты?", "answer": "Я дружелюбный помощник. Отвечаю коротко и по делу."},
                   "context_tokens": N_POSITIONS - new_tokens, "max_turns": 4,
                   "generation": {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": True,
                                  "temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.15,
                                  "no_repeat_ngram_size": 3}}
    (folder / "chat_config.json").write_text(json.dumps(chat_config, ensure_ascii=False, indent=2), encoding="utf-8")
    return len(tokenizer), sum(p.numel() for p in model.parameters())


def chat_load(api, chats, rounds):
    """Every chat writes `rounds` messages, each after the reply to the one before;
    (latencies, seconds from the first message to the last reply)."""
    latencies, lock = [], threading.Lock()
    start = threading.Barrier(len(chats) + 1)

    def talk(chat_id):
        start.wait()
        for number in range(rounds):
            api.push_text(chat_id, f"Сообщение {number + 1} из чата {chat_id}: расскажи что-нибудь интересное")
            sent = time.monotonic()
            reply = api.wait_for_messages(chat_id, number + 1, timeout=REPLY_TIMEOUT)[-1]
            with lock:
                latencies.append(reply["time"] - sent)

    threads = [threading.Thread(target=talk, args=(chat_id,), daemon=True) for chat_id in chats]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.monotonic()
    for thread in threads:
        thread.join()
    return latencies, time.monotonic() - began


def run_bot(model_dir, workdir, name, bot_flags, chats, rounds, new_tokens):
    """One bot process under the load; its figures."""
    workdir = workdir / name
    workdir.mkdir()
    with FakeBotApi(TOKEN) as api:
        bot = LiveBot(api, TOKEN, workdir, ["--model", str(model_dir), "--db", str(workdir / "history.sqlite3"),
                                            "--poll-seconds", "1", "--log-level", "DEBUG"] + bot_flags)
        try:
            bot.start(timeout=600)
            api.push_text(1, "Разминка")  # the first reply pays for allocations; not counted
            api.wait_for_messages(1, 1, timeout=REPLY_TIMEOUT)
            latencies, seconds = chat_load(api, chats, rounds)
        finally:
            code = bot.stop(timeout=REPLY_TIMEOUT)
    if code != 0:
        raise RuntimeError(f"the bot ({name}) exited with {code}; its log is in {workdir}")
    # The model thread logs "batch of N: <new tokens of each reply> new tokens in S s".
    found = BATCH_LINE.findall(bot.log_text())[1:]  # [1:]: the warm-up
    batches = [[int(n) for n in lengths.split(",")] for lengths, _ in found]
    timeline = " ".join(f"{len(batch)}:{float(seconds):.1f}s" for batch, (_, seconds) in zip(batches, found))
    short = sum(length < new_tokens for batch in batches for length in batch)
    replies = len(latencies)
    return {"name": name, "replies": replies, "seconds": seconds, "rate": replies / seconds,
            "p50": statistics.median(latencies), "p95": statistics.quantiles(latencies, n=20, method="inclusive")[18],
            "batches": len(batches), "mean_batch": sum(map(len, batches)) / max(1, len(batches)),
            "largest": max(map(len, batches), default=0), "short": short, "timeline": timeline}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=CHATS)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="messages each chat writes, one after another")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="the fixed length of every reply")
    parser.add_argument("--batch", type=int, help="--max-batch of the batched run (default: the bot's default)")
    parser.add_argument("--threads", type=int, help="--threads of both bots (default: the bot's default)")
    parser.add_argument("--seed", type=int, default=SEED)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.chats < 1 or args.rounds < 1 or args.new_tokens < 1:
        print("bench/bot_load.py: error: --chats, --rounds and --new-tokens must be at least 1", file=sys.stderr)
        return 1
    common = ["--threads", str(args.threads)] if args.threads else []
    batched = ["--max-batch", str(args.batch)] if args.batch else []
    chats = list(range(1001, 1001 + args.chats))
    print(f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    with tempfile.TemporaryDirectory(prefix="bot_load-") as tmp:
        tmp = Path(tmp)
        started = time.monotonic()
        vocab, params = write_model_folder(tmp / "model", args.new_tokens, args.seed)
        print(f"model folder: {N_LAYER} layers, {N_EMBD} wide, vocabulary {vocab}, {params / 1e6:.1f} M parameters, "
              f"random weights; written in {time.monotonic() - started:.0f} s", flush=True)
        print(f"{args.chats} chats at once, {args.rounds} messages each (each after the reply to the one before), "
              f"replies of exactly {args.new_tokens} tokens (sampling as in chat_config.json)", flush=True)
        results = []
        for name, flags in (("one at a time", ["--max-batch", "1"] + common), ("batched", batched + common)):
            result = run_bot(tmp / "model", tmp, name.replace(" ", "-"), flags, chats, args.rounds, args.new_tokens)
            result["name"], result["flags"] = name, " ".join(flags) or "(defaults)"
            results.append(result)
            print(f"  {name}: done in {result['seconds']:.0f} s", flush=True)
    print(f"\n{'run':14} {'bot flags':26} {'replies':>7} {'seconds':>8} {'replies/s':>10} {'p50 s':>7} {'p95 s':>7} "
          f"{'batches':>8} {'mean batch':>11} {'largest':>8}")
    for r in results:
        print(f"{r['name']:14} {r['flags']:26} {r['replies']:7d} {r['seconds']:8.1f} {r['rate']:10.2f} {r['p50']:7.1f} "
              f"{r['p95']:7.1f} {r['batches']:8d} {r['mean_batch']:11.1f} {r['largest']:8d}")
    print("batches in order, size:seconds: " + " | ".join(f"{r['name']}: {r['timeline'][:300]}" for r in results))
    alone, together = results
    ratio = together["rate"] / alone["rate"]
    print(f"batched / one at a time: {ratio:.2f}x replies per second (goal: at least 3x: "
          f"{'met' if ratio >= 3 else 'NOT met'}); p95 latency {together['p95']:.1f} s against {alone['p95']:.1f} s "
          f"({'no worse' if together['p95'] <= alone['p95'] else 'WORSE'})")
    short = sum(r["short"] for r in results)
    print(f"replies shorter than {args.new_tokens} tokens (stopped at a label the random model happened to write): "
          f"{short}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
