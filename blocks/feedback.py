"""Learning from ratings: a model folder trained further on the bot's 👍/👎 with TRL's KTOTrainer (or DPOTrainer
on the 🔄 pairs), and the liked-share and perplexity figures before and after.

A block: blocks/build.py writes this file into the scripts that list it (make blocks), after the
trainer block, whose loading, LoRA, precision and publishing code it reuses. It imports nothing
itself; its host script imports what it uses and defines the FEEDBACK_* defaults.

The rows come from create_dataset.py --feedback: `prompt` (the prompt rule's text as the bot served
it, ending at "Ответ:"), `completion` (the reply with its leading space) and `label`, or `chosen` and
`rejected` for a pair. What TRL trains on is checked against the prompt rule, row by row: TRL
tokenizes the text itself and appends EOS as a string, so it is given a copy of the folder's tokenizer
that reads "</s>" as the EOS id (the saved one reads it as text, as the chat does), and a row whose
ids TRL would build differently (a "</s>" a user typed, a prompt the bot served with another
tokenizer) is left out and counted. The reference model is the source folder, loaded explicitly
(TRL's own default reloads whatever path the config names); under --lora it is the same weights with
the adapters switched off. The new folder gets the source's tokenizer files byte for byte and its
chat_config.json with a "feedback" record added."""

FEEDBACK_LOSSES = ("kto", "dpo")
FEEDBACK_KEEP = ("chat_config.json", "trainer_state.json", "training_curves.png")  # not copied as tokenizer files
FEEDBACK_SCORE_BATCH = 16


def feedback_val_path(path):
    """data/feedback_train.parquet -> data/feedback_val.parquet, where create_dataset.py writes it."""
    folder, name = os.path.split(path)
    return os.path.join(folder, name.replace("_train", "_val")) if "_train" in name else None


def read_feedback(path, limit=None):
    """The rows of a feedback parquet as dicts (prompt, completion, label, chosen, rejected, prompt_ids)."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise UserError(f"{path}: feedback file not found (create_dataset.py --feedback BOT.sqlite3 writes it)")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several kinds for a file that is not parquet
        raise UserError(f"{path}: not a readable parquet file ({first_line(exc)})")
    missing = {"prompt", "completion", "label", "chosen", "rejected"} - set(table.column_names)
    if missing:
        raise UserError(f"{path}: no column {', '.join(sorted(missing))} (create_dataset.py --feedback writes "
                        f"prompt, completion, label, chosen, rejected)")
    rows = table.to_pylist()
    return rows[:limit] if limit else rows


def trl_tokenizer(folder):
    """The folder's tokenizer as TRL must see it: TRL appends the EOS as text and tokenizes prompt and
    prompt + completion; with split_special_tokens (how the kit saves its tokenizers, so a typed "</s>"
    stays text) that EOS would become the characters "</s>". Only the copy given to TRL differs."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, split_special_tokens=False)


def kit_exchange_ids(tokenizer, prompt, completion):
    """(prompt ids, completion ids) by the prompt rule: the prompt's text as plain text, the reply with
    its first word's space, then the EOS id."""
    return encode_text(tokenizer, prompt), answer_ids(tokenizer, completion)


def trl_exchange_ids(trl_tok, prompt, completion):
    """(prompt ids, completion ids) the way TRL 1.16 builds them from text: EOS appended as a string,
    prompt and prompt + completion tokenized apart, the completion from where the two part."""
    text = completion if completion.endswith(trl_tok.eos_token) else completion + trl_tok.eos_token
    prompt_ids = trl_tok(text=prompt)["input_ids"]
    whole = trl_tok(text=prompt + text)["input_ids"]
    shared = 0
    while shared < min(len(prompt_ids), len(whole)) and prompt_ids[shared] == whole[shared]:
        shared += 1
    return prompt_ids[:shared], whole[shared:]


def feedback_text(completion):
    """A reply as the completion TRL appends to the prompt: the prompt rule's turn, after its space."""
    return " " + prepare_turn(completion or "")


def feedback_examples(tokenizer, trl_tok, rows, loss, max_length):
    """The TRL rows (text) whose ids TRL would build as the prompt rule does, and counts of those left out."""
    examples, dropped = [], {"tokenized differently": 0, "served with other ids": 0, "too long": 0}
    for row in rows:
        if loss == "kto":
            if row.get("completion") is None or row.get("label") is None:
                continue
            replies = [feedback_text(row["completion"])]
        else:
            if row.get("chosen") is None or row.get("rejected") is None:
                continue
            replies = [feedback_text(row["chosen"]), feedback_text(row["rejected"])]
        kit = [kit_exchange_ids(tokenizer, row["prompt"], reply) for reply in replies]
        served = row.get("prompt_ids")
        if served is not None and list(served) != kit[0][0]:
            dropped["served with other ids"] += 1
            continue
        if any(trl_exchange_ids(trl_tok, row["prompt"], reply) != ids for reply, ids in zip(replies, kit)):
            dropped["tokenized differently"] += 1
            continue
        if any(len(p) + len(c) > max_length for p, c in kit):
            dropped["too long"] += 1
            continue
        if loss == "kto":
            examples.append({"prompt": row["prompt"], "completion": replies[0], "label": bool(row["label"])})
        else:
            examples.append({"prompt": row["prompt"], "chosen": replies[0], "rejected": replies[1]})
    return examples, dropped


def check_trl_ids(dataset, examples, tokenizer, loss):
    """TRL's tokenized rows against the prompt rule's ids; UserError naming the first that differs (a TRL
    version that tokenizes another way must not train silently on other ids)."""
    keys = ("completion_ids",) if loss == "kto" else ("chosen_ids", "rejected_ids")
    texts = ("completion",) if loss == "kto" else ("chosen", "rejected")
    for i, (row, example) in enumerate(zip(dataset, examples)):
        for key, text in zip(keys, texts):
            got = list(row["prompt_ids"]) + list(row[key])
            want = sum(kit_exchange_ids(tokenizer, example["prompt"], example[text]), [])
            if got != want:
                raise UserError(f"TRL tokenized feedback row {i} differently from the prompt rule "
                                f"({len(got)} ids, the rule gives {len(want)}); not training on other ids")


def reply_nll(model, tokenizer, rows, device, batch_size=FEEDBACK_SCORE_BATCH):
    """Per rated row, (NLL of the reply's tokens and EOS after its prompt, their count), by the kit's ids."""
    import torch

    built = [kit_exchange_ids(tokenizer, row["prompt"], feedback_text(row["completion"])) for row in rows]
    sums = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(built), batch_size):
            chunk = built[start:start + batch_size]
            width = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for i, (p, c) in enumerate(chunk):
                ids[i, :len(p) + len(c)] = torch.tensor(p + c)
                labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
            mask = torch.arange(width)[None, :] < torch.tensor([len(p) + len(c) for p, c in chunk])[:, None]
            logits = model(input_ids=ids.to(device), attention_mask=mask.long().to(device)).logits.float().cpu()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                    ignore_index=IGNORE_INDEX, reduction="none")
            counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
            sums += [(float(n), int(k)) for n, k in zip(nll.sum(1), counts)]
    return sums


def feedback_figures(model, tokenizer, rows, device):
    """On rated rows: "liked_share", the share of (👍 reply, 👎 reply) combinations in which the model gives
    the 👍 one the higher mean log-likelihood per token (0.5: it cannot tell them apart), and the
    perplexity of the 👍 and of the 👎 replies."""
    import math

    rated = [row for row in rows if row.get("completion") is not None and row.get("label") is not None]
    if not rated:
        return None
    scores = reply_nll(model, tokenizer, rated, device)
    liked = [-n / k for (n, k), row in zip(scores, rated) if row["label"]]
    disliked = [-n / k for (n, k), row in zip(scores, rated) if not row["label"]]

    def perplexity(label):
        picked = [(n, k) for (n, k), row in zip(scores, rated) if bool(row["label"]) == label]
        return math.exp(sum(n for n, _ in picked) / max(sum(k for _, k in picked), 1)) if picked else None

    share = None
    if liked and disliked:
        ranked = sorted([(s, 1) for s in liked] + [(s, 0) for s in disliked])
        wins, below, i = 0.0, 0, 0
        while i < len(ranked):  # ties count half
            j = i
            while j < len(ranked) and ranked[j][0] == ranked[i][0]:
                j += 1
            tied_liked = sum(label for _, label in ranked[i:j])
            wins += tied_liked * below + 0.5 * tied_liked * (j - i - tied_liked)
            below += (j - i) - tied_liked
            i = j
        share = wins / (len(liked) * len(disliked))
    return {"liked_share": share, "liked_perplexity": perplexity(True), "disliked_perplexity": perplexity(False),
            "rows": len(rated)}


def describe_figures(figures):
    if figures is None:
        return "no rated validation rows"
    share = "n/a (needs both 👍 and 👎)" if figures["liked_share"] is None else f"{figures['liked_share']:.3f}"
    ppl = lambda value: "n/a" if value is None else f"{value:.2f}"  # noqa: E731
    return (f"liked share {share}, perplexity of 👍 replies {ppl(figures['liked_perplexity'])}, of 👎 replies "
            f"{ppl(figures['disliked_perplexity'])} ({figures['rows']} rated rows)")


def feedback_source(folder):
    """The folder to start from: a finished model folder of the kit (the one the bot served)."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: model folder not found (--feedback starts from the folder the bot served)")
    for name in ("config.json", "chat_config.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"{folder}: no {name}; --feedback starts from a finished model folder of the kit")
    with open(os.path.join(folder, "chat_config.json"), encoding="utf-8") as f:
        try:
            config = json.load(f)
        except ValueError as exc:
            raise UserError(f"{folder}/chat_config.json: not JSON ({first_line(exc)})")
    return config


def copy_tokenizer_files(src, dest):
    """The source's tokenizer files as they are (not re-saved: a round trip through save_pretrained may
    rewrite them), so the new folder tokenizes exactly as the served one did."""
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not name.startswith(".") and not MODEL_FILE_RE.match(name) \
                and name not in FEEDBACK_KEEP:
            shutil.copy2(path, os.path.join(dest, name))


def feedback_config(args, device, lr, loss, max_length, desirable_weight=1.0):
    """KTOConfig / DPOConfig with the settings that move a small model without wrecking it (measured:
    lr 2e-5, beta 0.1, 2 epochs), TRL's GPU-minded defaults (bf16 everywhere, gradient checkpointing,
    lr 1e-6) replaced by the kit's, and no checkpoints: the run is short and writes its folder at the end."""
    from trl import DPOConfig, KTOConfig

    precision = mixed_precision(device)
    common = dict(
        output_dir=os.path.join(args.output, FINAL_TMP + "-run"), use_cpu=device != "cuda",
        bf16=precision == "bf16", fp16=precision == "fp16", deepspeed=args.deepspeed,
        **({"optim": "adamw_bnb_8bit"} if args.optim_8bit else {}),
        # TRL's default is on; transformers 5 names it activation_checkpointing and warns on the old name
        **{"gradient_checkpointing": None, **(checkpointing_arguments(True) if args.gradient_checkpointing
                                              else {"activation_checkpointing": False})},
        num_train_epochs=args.feedback_epochs,
        max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=lr, lr_scheduler_type="cosine",
        warmup_steps=WARMUP, save_strategy="no", eval_strategy="no", logging_steps=args.logging_steps,
        report_to="none", seed=args.seed, dataloader_num_workers=0, max_length=max_length, beta=args.feedback_beta,
        disable_dropout=True,
    )
    if loss == "kto":
        # sequential: KTO estimates its KL term from each batch's neighbours, so the rows go in the (shuffled)
        # order they are given
        return KTOConfig(**common, desirable_weight=desirable_weight, train_sampling_strategy="sequential")
    return DPOConfig(**common)


def check_feedback_flags(args):
    if args.feedback_loss not in FEEDBACK_LOSSES:
        raise UserError(f"--feedback-loss {args.feedback_loss!r}: must be one of {', '.join(FEEDBACK_LOSSES)}")
    if args.from_scratch:
        raise UserError("--feedback trains a model folder further; --from-scratch has nothing to start from")
    if args.resume:
        raise UserError("--feedback runs are short and keep no checkpoints; run it again instead of --resume")
    if os.path.abspath(args.output) == os.path.abspath(args.model):
        raise UserError(f"--output {args.output}: the folder the bot may be serving; write the new model to "
                        f"another folder and compare the two (evaluate.py) before switching")
    if args.feedback_loss == "kto" and args.batch_size < 2:
        raise UserError("--batch-size 1: KTO estimates its KL term from the other rows of a batch; use 2 or more")


def run_feedback(args):
    """Train args.model on the ratings in args.feedback and write args.output; returns the TRL trainer."""
    import random

    from transformers import AutoConfig, AutoTokenizer, set_seed
    from trl import DPOTrainer, KTOTrainer

    if args.output == OUTPUT_DIR:  # the fine-tuning default: beside the source instead, never over it
        args.output = os.path.normpath(args.model) + "_feedback"
    check_training_flags(args)
    check_feedback_flags(args)
    loss = args.feedback_loss
    source_config = feedback_source(args.model)
    device = pick_device(args.device)
    check_output_dir(args.output)
    train_rows = read_feedback(args.feedback)
    val_path = args.feedback_val or feedback_val_path(args.feedback)
    val_rows = read_feedback(val_path, args.val_rows) if val_path and os.path.isfile(val_path) else []
    try:  # the tokenizers and the config first: the data's faults are told before the weights load
        tokenizer, trl_tok = AutoTokenizer.from_pretrained(args.model), trl_tokenizer(args.model)
        positions = context_size(AutoConfig.from_pretrained(args.model))
    except (OSError, ValueError) as exc:
        raise UserError(f"{args.model}: cannot load its tokenizer or config ({first_line(exc)})")
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        raise UserError(f"{args.model}: the tokenizer's pad is missing or is EOS; --feedback trains folders the "
                        f"kit's trainers wrote")
    max_length = min(int(source_config.get("max_length") or positions), positions)
    examples, dropped = feedback_examples(tokenizer, trl_tok, train_rows, loss, max_length)
    random.Random(args.seed).shuffle(examples)  # the export is shuffled; a hand-made file may not be
    if args.rows:
        examples = examples[:args.rows]
    liked = sum(1 for e in examples if e.get("label"))
    disliked = len(examples) - liked
    if loss == "kto" and not (liked and disliked):
        raise UserError(f"{args.feedback}: {liked} 👍 and {disliked} 👎 usable rows; KTO needs both")
    if loss == "dpo" and not examples:
        raise UserError(f"{args.feedback}: no usable pairs (chosen, rejected): DPO learns from replies 🔄 replaced; "
                        f"use --feedback-loss kto")
    desirable_weight = disliked / liked if loss == "kto" else 1.0
    set_seed(args.seed)
    model, tokenizer = load_pretrained(args.model)
    ref_model = None if args.lora else load_pretrained(args.model)[0]
    lr = args.lr or (FEEDBACK_LR_LORA if args.lora else FEEDBACK_LR)
    precision = mixed_precision(device)
    if args.lora:
        model = apply_lora(model, args, [], args.model)
        if precision and not args.deepspeed:
            cast_frozen_weights(model, precision)
    launch_alone(args)
    fconfig = feedback_config(args, device, lr, loss, max_length, desirable_weight)
    is_main = fconfig.process_index == 0
    left_out = ", ".join(f"{n} {why}" for why, n in dropped.items() if n) or "none"
    if is_main:
        what = f"{liked} 👍, {disliked} 👎, desirable_weight {desirable_weight:.3f}" if loss == "kto" else \
            f"{len(examples)} pairs"
        print(f"feedback: {loss.upper()} from {args.model} (the reference model, loaded as it is): {what}; "
              f"rows left out: {left_out}; lr {lr}, beta {args.feedback_beta}, {args.feedback_epochs:g} epochs",
              flush=True)
        if args.lora:
            print(describe_lora(model), flush=True)
        print(describe_memory_settings(args, precision), flush=True)
    before = None
    if is_main and val_rows:  # the model where it trains (the Trainer would move it there anyway)
        before = feedback_figures(model if args.deepspeed else model.to(device), tokenizer, val_rows, device)
    if is_main:
        print(f"before, on {val_path}: {describe_figures(before)}", flush=True)
        clear_previous_run(args.output)
        os.makedirs(args.output, exist_ok=True)
        # the folder is the kit's from now on: a crashed run can be run again into it
        write_json_atomic(os.path.join(args.output, "chat_config.json"), source_config)
    from datasets import Dataset

    trainer_class = KTOTrainer if loss == "kto" else DPOTrainer
    trainer = trainer_class(model=model, ref_model=ref_model, args=fconfig, train_dataset=Dataset.from_list(examples),
                            processing_class=trl_tok)
    check_trl_ids(trainer.train_dataset, examples, tokenizer, loss)
    trainer.train()

    final_tmp = os.path.join(args.output, FINAL_TMP)
    if trainer.is_world_process_zero():
        for stale in (final_tmp, fconfig.output_dir, final_tmp + "-adapter"):
            if os.path.isdir(stale):
                shutil.rmtree(stale)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_world_process_zero():
        if args.lora:
            adapter_tmp = final_tmp + "-adapter"
            trained.save_pretrained(adapter_tmp, save_embedding_layers=False)
            trained = merge_lora(args, tokenizer, adapter_tmp)
            shutil.rmtree(adapter_tmp)
        trained.save_pretrained(final_tmp)
        upcast_saved_weights(final_tmp)
        copy_tokenizer_files(args.model, final_tmp)
        after = feedback_figures(trained.to(device), tokenizer, val_rows, device) if val_rows else None
        record = {"loss": loss, "from": os.path.abspath(args.model), "file": os.path.abspath(args.feedback),
                  "rows": len(examples), "liked": liked if loss == "kto" else None,
                  "disliked": disliked if loss == "kto" else None, "learning_rate": lr, "beta": args.feedback_beta,
                  "epochs": args.feedback_epochs, "desirable_weight": desirable_weight, "lora": bool(args.lora),
                  "validation_before": before, "validation_after": after}
        earlier = source_config.get("feedback")
        config = dict(source_config, feedback=record if not earlier else
                      dict(record, earlier=earlier if isinstance(earlier, list) else [earlier]))
        write_json_atomic(os.path.join(final_tmp, "chat_config.json"), config)
        publish_folder(final_tmp, args.output)
        trainer.state.save_to_json(os.path.join(args.output, "trainer_state.json"))
        if os.path.isdir(fconfig.output_dir):
            shutil.rmtree(fconfig.output_dir)
        print(f"after: {describe_figures(after)}", flush=True)
        print(f"done: step {trainer.state.global_step}; model in {args.output}/ (tokenizer files and "
              f"chat_config.json as in {args.model}, with a \"feedback\" record); compare the two with "
              f"evaluate.py --model {args.model} {args.output} before switching the bot", flush=True)
    leave_process_group(trainer)
    return trainer
