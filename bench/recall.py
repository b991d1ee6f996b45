"""Does the context model remember what the user said? A recall benchmark through the chat.

Synthetic dialogues: the user gives a name and a city in the first turn ("Привет!
Меня зовут Илья Шевченко, я живу в городе Мурманске."), the bot greets without
repeating them, one to three exchanges of small talk follow, and the user asks
them back two to four exchanges after giving them ("Как меня зовут?" -> "Тебя
зовут Илья Шевченко.", "Где я живу?" -> "Ты живёшь в городе Мурманске."). An
answer that remembers repeats the user's words, as an answer on topic does. A GPT-2 is trained from scratch on
them by train_medium_context.py's own code (its main(), default turn window; the
rows are the answers asked back, --every-turn adds the small talk),
then held-out dialogues (the same names and cities, other pairs of them) are
answered through system_prompt.py's chat code with the folder's default settings
(sampling, repetition penalty and n-gram blocking, int8 on a CPU). A reply counts
if it names the fact. It reports the share recalled for:

  - the defaults (the turn window training recorded, penalties on the reply only);
  - control: the same dialogues with the fact removed from the first turn, so the
    share is what guessing gets (chance);
  - the chat with --max-turns 4 (the old window): the fact is cut away;
  - n-gram blocking and repetition penalty over the prompt too (the old decoding,
    transformers' own processors): "в городе Мурманске" and "зовут Илья Шевченко"
    repeat three tokens of the prompt, and blocking bans the third.

The answer must come from the context: the defaults must beat the control, and
each wrong default must show as a drop.

Run it (CPU: about 20 minutes on two idle cores with the defaults, longer on a busy
machine; sizes are flags):
    python bench/recall.py
    python bench/recall.py --steps 300 --n-layer 2 --n-embd 128     # a quick look (recalls little)
    python bench/recall.py --device cuda --dialogues 20000 --steps 4000 --n-layer 6 --n-embd 384
    python bench/recall.py --model /tmp/recall-model                 # score a folder trained before
"""
import argparse
import contextlib
import io
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import system_prompt as sp  # noqa: E402  (the chat under test)
import train_medium_context as tm  # noqa: E402  (the trainer under test)

# ----------------------------------------------------------------------------
# defaults
DIALOGUES = 4000            # training dialogues (each gives one row per bot turn)
VAL_DIALOGUES = 200
TEST_DIALOGUES = 60         # half asked for the name, half for the city
N_LAYER, N_HEAD, N_EMBD = 4, 4, 256
VOCAB_SIZE = 2000
STEPS = 800
BATCH_SIZE = 32
LR = 1e-3
EVAL_STEPS = 500
NARROW_TURNS = 4            # the context trainer's old default window
SEED = 0
# ----------------------------------------------------------------------------

SURNAMES = ["Шевченко", "Коваленко", "Бондаренко", "Ткаченко", "Кравченко", "Олейник", "Мельник", "Кравец",
            "Лысенко", "Руденко", "Савченко", "Марченко", "Левченко", "Гончаренко", "Павленко", "Дорошенко",
            "Костенко", "Кузьменко", "Приходько", "Кириленко"]
NAMES = ["Илья", "Анна", "Мария", "Олег", "Денис", "Ольга", "Ирина", "Сергей", "Павел", "Наталья", "Артём",
         "Никита", "Дмитрий", "Алексей", "Екатерина", "Татьяна", "Виктор", "Егор", "Полина", "Светлана", "Максим",
         "Роман", "Кирилл", "Вера", "Юлия", "Андрей", "Михаил", "Георгий", "Глеб", "Зоя"]
CITIES = ["Мурманске", "Казани", "Самаре", "Твери", "Омске", "Томске", "Перми", "Уфе", "Сочи", "Туле", "Рязани",
          "Калуге", "Пскове", "Орле", "Курске", "Иркутске", "Норильске", "Тюмени", "Вологде", "Костроме",
          "Ярославле", "Смоленске", "Саратове", "Воронеже", "Липецке", "Брянске", "Барнауле", "Хабаровске",
          "Якутске", "Махачкале"]
INTRODUCTIONS = ["Привет! Меня зовут {name}, я живу в городе {city}.", "Здравствуй. Я {name}, живу в городе {city}.",
                 "Добрый день! Меня зовут {name}, а живу я в городе {city}."]
NO_FACT = "Привет! Давай поговорим."
GREETINGS = ["Привет! Приятно познакомиться.", "Здравствуй! Рад знакомству.", "Очень приятно! О чём поговорим?"]
SMALL_TALK = [("Как дела?", "Хорошо, спасибо. А у тебя?"), ("Что делаешь?", "Читаю книгу про море."),
              ("Какая у вас погода?", "Солнечно и тепло."), ("Любишь музыку?", "Да, особенно джаз."),
              ("Что посоветуешь на ужин?", "Попробуй гречку с грибами."), ("Ты спишь ночью?", "Я не сплю, я бот."),
              ("Есть планы на выходные?", "Отдохнуть и погулять в парке."),
              ("Какой фильм посмотреть?", "Посмотри старую комедию."), ("Устал сегодня.", "Отдохни, выпей чаю."),
              ("Что нового?", "Ничего особенного, всё спокойно."), ("Ты любишь кошек?", "Да, они милые."),
              ("Посоветуй книгу.", "Почитай рассказы Чехова."), ("Сколько сейчас времени?", "Посмотри на часы."),
              ("Мне скучно.", "Давай сыграем в слова."), ("Хочу кофе.", "Свари себе чашку."),
              ("Завтра рано вставать.", "Тогда ложись пораньше.")]
QUESTIONS = {"name": (["Как меня зовут?", "Напомни, как меня зовут?", "Ты помнишь моё имя?"],
                      "Тебя зовут {name}."),
             "city": (["Где я живу?", "В каком городе я живу?", "Напомни, где я живу?"],
                      "Ты живёшь в городе {city}.")}


def dialogue(rng, kind, with_fact=True):
    """(turns, answer, fact): the user's turns and the bot's, the last turn the question."""
    name = f"{rng.choice(NAMES)} {rng.choice(SURNAMES)}"
    city, introduction = rng.choice(CITIES), rng.choice(INTRODUCTIONS)
    first = introduction.format(name=name, city=city) if with_fact else NO_FACT
    turns = [first, rng.choice(GREETINGS)]
    for question, answer in rng.sample(SMALL_TALK, rng.randint(1, 3)):
        turns += [question, answer]
    questions, answer = QUESTIONS[kind]
    turns.append(rng.choice(questions))
    return turns, answer.format(name=name, city=city), name if kind == "name" else city


def context_rows(dialogues, every_turn=False):
    """Rows of the context file: the answer to the question asked back, after the whole
    dialogue; with every_turn, also each bot turn of small talk (four times the rows, and
    the steps a CPU cannot spare)."""
    rows = []
    for i, (turns, answer, _) in enumerate(dialogues):
        whole = turns + [answer]
        for k in range(1 if every_turn else len(turns), len(whole), 2):
            rows.append({"dialogue_id": i, "context": whole[:k], "answer": whole[k]})
    return rows


def write_data(folder, train, val, every_turn=False):
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    for split, dialogues in (("train", train), ("val", val)):
        pd.DataFrame(context_rows(dialogues, every_turn)).to_parquet(folder / f"context_{split}.parquet")
    return folder


def train(args, folder, data):
    """The model, trained by train_medium_context.py's main() with its default turn window."""
    argv = ["--data-dir", str(data), "--output", str(folder), "--from-scratch", "--device", args.device,
            "--n-layer", str(args.n_layer), "--n-head", str(args.n_head), "--n-embd", str(args.n_embd),
            "--vocab-size", str(args.vocab_size), "--max-steps", str(args.steps), "--batch-size",
            str(args.batch_size), "--lr", str(args.lr), "--eval-steps", str(args.eval_steps), "--logging-steps",
            str(args.eval_steps), "--seed", str(args.seed), "--save-total-limit", "1"]
    printed = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        code = tm.main(argv)
    if code != 0:
        raise SystemExit(f"recall.py: train_medium_context.py failed (exit {code})")
    seconds = time.perf_counter() - start
    done = [line for line in printed.getvalue().splitlines() if line.startswith(("done:", "special tokens:"))]
    return seconds, done


def whole_sequence_processors(generation, prompt_length):
    """The old decoding: transformers' repetition penalty and n-gram blocking over prompt and reply."""
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    processors = []
    if float(generation.get("repetition_penalty") or 1.0) != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(generation["repetition_penalty"])))
    if int(generation.get("no_repeat_ngram_size") or 0) > 0:
        processors.append(NoRepeatNGramLogitsProcessor(int(generation["no_repeat_ngram_size"])))
    return processors


def recalled(reply, fact):
    return re.search(r"(?<!\w)" + re.escape(fact) + r"(?!\w)", reply) is not None


def ask(chat, settings, tests, batch=16):
    """The chat's replies to the test dialogues, generated in batches as the bot does."""
    tokenizer = chat["tokenizer"]
    prompts = [sp.chat_prompt_ids(turns, settings, tokenizer) for turns, _, _ in tests]
    replies = []
    for start in range(0, len(prompts), batch):
        replies += sp.generate_replies(chat, settings, prompts[start:start + batch])
    return replies


def score(replies, tests):
    by_kind = {"name": [0, 0], "city": [0, 0]}
    for reply, (_, answer, fact) in zip(replies, tests):
        kind = "name" if answer.startswith("Тебя зовут") else "city"
        by_kind[kind][0] += recalled(reply, fact)
        by_kind[kind][1] += 1
    return by_kind


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dialogues", type=int, default=DIALOGUES)
    parser.add_argument("--test", type=int, default=TEST_DIALOGUES)
    parser.add_argument("--n-layer", type=int, default=N_LAYER)
    parser.add_argument("--n-head", type=int, default=N_HEAD)
    parser.add_argument("--n-embd", type=int, default=N_EMBD)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--eval-steps", type=int, default=EVAL_STEPS)
    parser.add_argument("--every-turn", action="store_true",
                        help="train on every bot turn, not only on the answers asked back (needs more steps)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: physical cores)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--output", help="keep the trained model folder here (default: a temporary folder)")
    parser.add_argument("--model", help="score this folder, trained before by this benchmark, instead of training")
    parser.add_argument("--samples", type=int, default=3, help="replies shown for each variant")
    return parser.parse_args(argv)


def main(argv=None):
    import torch
    from transformers import set_seed

    args = parse_args(argv)
    torch.set_num_threads(args.threads or sp.physical_cores())
    rng = random.Random(args.seed)
    kinds = ["name", "city"]
    train_set = [dialogue(rng, kinds[i % 2]) for i in range(args.dialogues)]
    val_set = [dialogue(rng, kinds[i % 2]) for i in range(VAL_DIALOGUES)]
    test_rng = random.Random(args.seed + 1)
    tests, controls = [], []
    for i in range(args.test):
        state = test_rng.getstate()
        tests.append(dialogue(test_rng, kinds[i % 2]))
        test_rng.setstate(state)  # the same dialogue without the fact
        controls.append(dialogue(test_rng, kinds[i % 2], with_fact=False))
    print(f"{args.dialogues} training dialogues ({len(context_rows(train_set, args.every_turn))} rows), "
          f"{args.test} test dialogues; "
          f"the fact is {sorted({(len(t) - 1) // 2 for t, _, _ in tests})} exchanges before its question", flush=True)

    with tempfile.TemporaryDirectory(prefix="recall-") as tmp:
        folder = Path(args.model or args.output or Path(tmp) / "model")
        if not args.model:
            print(f"training {args.n_layer} layers x {args.n_embd} wide for {args.steps} steps of "
                  f"{args.batch_size} on {args.device} (train_medium_context.py) ...", flush=True)
            seconds, done = train(args, folder, write_data(Path(tmp) / "data", train_set, val_set, args.every_turn))
            print(f"trained in {seconds / 60:.1f} min; " + "; ".join(done), flush=True)
        window = json.loads((folder / "chat_config.json").read_text(encoding="utf-8"))["max_turns"]
        chat = sp.open_model_folder(folder, args.device)
        defaults = sp.resolve_settings(sp.parse_args(["--model", str(folder)]), chat)
        narrow = sp.resolve_settings(sp.parse_args(["--model", str(folder), "--max-turns", str(NARROW_TURNS)]), chat)
        sp.load_weights(chat, "auto", args.threads)

        variants = [(f"defaults (window {window} turns, penalties on the reply)", defaults, tests, None),
                    ("control: the fact removed (chance)", defaults, controls, None),
                    (f"chat --max-turns {NARROW_TURNS} (the window cuts the fact)", narrow, tests, None),
                    ("penalties over the prompt too (old decoding)", defaults, tests, whole_sequence_processors)]
        results = []
        for name, settings, dialogues, processors in variants:
            set_seed(args.seed)
            original = sp.reply_processors
            if processors is not None:
                sp.reply_processors = processors
            try:
                replies = ask(chat, settings, dialogues)
            finally:
                sp.reply_processors = original
            results.append((name, score(replies, dialogues), replies[:args.samples]))

    print(f"\nrecall through the chat ({chat['quantize']}, sampling as chat_config.json says), "
          f"{args.test} held-out dialogues:")
    print(f"{'variant':58} {'names':>9} {'cities':>9} {'all':>7}")
    for name, by_kind, _ in results:
        hits = by_kind["name"][0] + by_kind["city"][0]
        total = by_kind["name"][1] + by_kind["city"][1]
        print(f"{name:58} {by_kind['name'][0]:4d}/{by_kind['name'][1]:<4d} {by_kind['city'][0]:4d}/"
              f"{by_kind['city'][1]:<4d} {hits / total:6.0%}")
    print(f"chance: a name guessed among {len(NAMES)} x {len(SURNAMES)} is right 1 time in "
          f"{len(NAMES) * len(SURNAMES)}, a city 1 in {len(CITIES)}")
    print("\nsample replies:")
    for name, _, samples in results:
        print(f"  {name}: " + " | ".join(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
