"""Generation speed and faithfulness at batch size one on a CPU: plain fp32 `generate`,
the former int8 path (torch's dynamic quantization as it comes: int8 weights, one
scale per output row, activations rounded to 7 bits with one scale per call; this
bench keeps its own copy of it) and the kit's fast path (system_prompt.py /
tg_bot.py `fast_path`; since issue 23 activations get the full 8 bits on CPUs
with VNNI), one thread per physical core, on a model of
ruGPT-3 small's shape (12 layers, 768 wide, 12 heads, 50264-token vocabulary, 2048
positions) built from a config with seeded random weights, since the real ones
cannot be downloaded here.

Every reply has the same length (min_new_tokens = max_new_tokens), so speed does
not depend on the weights. The paths run interleaved, the same number of times,
on the same threads, in one process; medians are reported. It prints:
  - tokens per second, whole reply (prompt + new tokens) and per new token, and
    the ratios to fp32 and to the former int8 path;
  - the physical limit: bytes of weights each new token reads (fp32: 4 bytes a
    weight; int8: 1 byte a quantized weight plus its row's scale, 4 for the rest)
    against the memory bandwidth measured in this run, and the share of it each
    path reaches;
  - faithfulness to fp32 on a copy of the big model trained briefly here on 8
    exchanges of data/sample_dialogues.jsonl (issue 23): greedy replies identical
    on those 8 prompts, and the largest |logit difference| over the whole
    vocabulary, at the prompts' next token and along fp32's greedy replies;
  - greedy agreement on a tiny model trained here until it knows 96 exchanges by
    heart (learnt and unseen questions);
  - what reusing the persona's key/value cache across turns could save.

    python bench/generation.py                        # about 9 minutes on 2 idle cores
    python bench/generation.py --repeats 5 --threads 4 --train-steps 40

On a machine busy with other work, threads wait for each other and both paths
slow down unevenly; --threads 1 gives steadier figures there.
"""
import argparse
import copy
import json
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import system_prompt as sp  # noqa: E402  (the fast path under test)

# ----------------------------------------------------------------------------
# defaults
N_LAYER, N_EMBD, N_HEAD, VOCAB_SIZE, N_POSITIONS = 12, 768, 12, 50264, 2048  # ruGPT-3 small
PROMPT_TOKENS = 40          # persona (about 24 tokens) and a short question
NEW_TOKENS = 64             # the chat's reply length
REPEATS = 3
TRAIN_STEPS = 120           # the trained big copy: optimizer steps, each on 4 of its 8 exchanges (24 left
                            # near ties: fp32's two best tokens 0.0003-0.007 apart, below any int8 path's error)
TRAINED_PROMPTS = 8
PERSONA_TOKENS = 24         # the persona exchange in ruGPT-3's tokenizer, roughly
BANDWIDTH_MB = 512          # far beyond any cache
SEED = 0
SAMPLE = REPO / "data" / "sample_dialogues.jsonl"
TINY = {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab": 1000, "positions": 512, "steps": 300, "batch": 16,
        "exchanges": 96, "prompts": 24, "new_tokens": 24}  # trained until it knows its exchanges by heart
# ----------------------------------------------------------------------------


def measure_bandwidth(megabytes):
    """Memory bandwidth in GB/s: the best of a large copy (bytes read + written) and
    a large sum (bytes read), so neither kind of traffic is underrated."""
    source = torch.rand(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    best_copy = best_read = 0.0
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        best_copy = max(best_copy, 2 * source.nbytes / (time.perf_counter() - start))
        start = time.perf_counter()
        source.sum()
        best_read = max(best_read, source.nbytes / (time.perf_counter() - start))
    return max(best_copy, best_read) / 1e9, best_copy / 1e9, best_read / 1e9


def build_model(seed):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, vocab_size=VOCAB_SIZE,
                        n_positions=N_POSITIONS)
    return GPT2LMHeadModel(config).eval()


def old_int8(model):
    """The former fast path (before issue 23), kept here to compare against: torch's dynamic
    quantization of every linear layer as it comes, activations rounded to 7 bits (torch's
    reduce_range) with one scale for the whole tensor as each layer is called."""
    model = sp.conv1d_to_linear(sp.fuse_gelu(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in torch 2.13 in favour of torchao
        return torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, inplace=True)


def weight_bytes_per_token(model):
    """Bytes of weights one new token reads: every layer's weights and the output
    layer (the token embedding's matrix, read whole there); the embedding lookups
    read one row each and are left out. A layer holding int8 weights as buffers
    (the kit's Int8WeightLinear: qweight, scales, bias) counts its buffers."""
    quantized = torch.ao.nn.quantized.dynamic.Linear
    total = 0
    for module in model.modules():
        if isinstance(module, quantized):
            weight = module.weight()
            total += weight.numel() + weight.shape[0] * 8  # int8 weights, a scale and a zero point a row
            bias = module.bias()
            total += 0 if bias is None else bias.numel() * 4
        elif isinstance(module, torch.nn.Embedding):
            continue
        else:
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            if hasattr(module, "qweight"):
                total += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    return total


def timed_generate(model, ids, new_tokens):
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        start = time.perf_counter()
        output = model.generate(ids, attention_mask=torch.ones_like(ids), **options)
        seconds = time.perf_counter() - start
    assert output.shape[1] == ids.shape[1] + new_tokens
    return seconds, output[0, ids.shape[1]:].tolist()


def speed(models, ids, new_tokens, repeats):
    """Median seconds of a whole reply and of a one-token reply (the prompt's share),
    for each model, interleaved so that a busy moment of the machine hits both."""
    for model in models.values():
        timed_generate(model, ids, 2)  # warm-up: first calls allocate and pack
    whole, first = {name: [] for name in models}, {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            whole[name].append(timed_generate(model, ids, new_tokens)[0])
            first[name].append(timed_generate(model, ids, 1)[0])
    return ({name: statistics.median(times) for name, times in whole.items()},
            {name: statistics.median(times) for name, times in first.items()})


def greedy(model, ids, new_tokens, eos_token_id):
    with torch.inference_mode():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                do_sample=False, eos_token_id=eos_token_id, pad_token_id=0)
    return output[0, ids.shape[1]:].tolist()


def agreement(plain, fast, prompts, new_tokens, eos_token_id=None):
    """(identical replies, differing tokens, tokens, first divergences, fp32's replies) of
    greedy replies; without an EOS every reply has the full length."""
    same, differing, total, firsts, replies = 0, 0, 0, [], []
    for ids in prompts:
        exact = greedy(plain, ids, new_tokens, eos_token_id)
        quick = greedy(fast, ids, new_tokens, eos_token_id)
        same += exact == quick
        differing += sum(a != b for a, b in zip(exact, quick)) + abs(len(exact) - len(quick))
        total += max(len(exact), len(quick))
        firsts.append(next((k for k, (a, b) in enumerate(zip(exact, quick)) if a != b), None))
        replies.append(exact)
    return same, differing, total, firsts, replies


def logit_errors(plain, fast, prompts, replies):
    """The largest |logit difference| from fp32 over the whole vocabulary: at each prompt's
    next token, and at every step of fp32's greedy reply (fed whole, as fp32 wrote it); and
    fp32's smallest margin between its first and second token along those replies."""
    at_next = along = 0.0
    margin = float("inf")
    with torch.inference_mode():
        for ids, reply in zip(prompts, replies):
            full = torch.cat([ids, torch.tensor([reply], dtype=ids.dtype)], 1)[:, :-1] if reply else ids
            exact = plain(full).logits[0, ids.shape[1] - 1:]
            diff = (fast(full).logits[0, ids.shape[1] - 1:] - exact).abs()
            at_next, along = max(at_next, diff[0].max().item()), max(along, diff.max().item())
            top = exact.topk(2, dim=-1).values
            margin = min(margin, (top[:, 0] - top[:, 1]).min().item())
    return at_next, along, margin


def batch_tensors(batch, pad_token_id):
    """Input ids (padded on the right), labels on the answers only, and the attention mask."""
    width = max(len(p) + len(a) for p, a in batch)
    ids = torch.full((len(batch), width), pad_token_id)
    labels = torch.full((len(batch), width), -100)
    for i, (prompt, answer) in enumerate(batch):
        ids[i, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[i, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer)
    return ids, labels, (labels != -100) | (ids != pad_token_id)


def train_briefly(plain, rows, steps, pad_token_id, seed):
    """A copy of the big model trained a few steps on a few exchanges (prompt rule's ids,
    answer and EOS), 4 a step: enough for peaked distributions on those prompts, as a real
    model has them, where the random model's logits are near ties everywhere. bf16
    autocast: twice as fast on a CPU with bf16 instructions, and only the copy's training
    is affected; both paths then start from the same fp32 weights."""
    model = copy.deepcopy(plain).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    rng = random.Random(seed)
    for _ in range(steps):
        ids, labels, mask = batch_tensors(rng.sample(rows, min(4, len(rows))), pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), loss.item()


# --- a tiny model trained here, for agreement on peaked distributions
def read_exchanges(path):
    exchanges = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            turns = json.loads(line)["sample"]
            exchanges += [(turns[i], turns[i + 1]) for i in range(len(turns) - 1)]
    return exchanges


def train_tiny(exchanges, seed):
    """A small GPT-2 that has learnt the sample's exchanges in the chat format: the
    prompt rule's ids, as the trainers build them and the chat feeds them."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([sp.prompt_text([q]) + " " + sp.prepare_turn(a) for q, a in exchanges],
                            vocab_size=TINY["vocab"], min_frequency=1, show_progress=False,
                            special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    rows = [(sp.fit_prompt(tokenizer, [q], 1, 10_000), sp.answer_ids(tokenizer, a)) for q, a in exchanges]
    rows = [(prompt, answer) for prompt, answer in rows if len(prompt) + len(answer) <= TINY["positions"] // 2]
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=TINY["n_layer"], n_embd=TINY["n_embd"], n_head=TINY["n_head"],
                                       vocab_size=len(tokenizer), n_positions=TINY["positions"],
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = random.Random(seed)
    model.train()
    for _ in range(TINY["steps"]):
        ids, labels, mask = batch_tensors(rng.sample(rows, min(TINY["batch"], len(rows))), tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer, rows, loss.item()


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for both paths (default: physical cores)")
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--train-steps", type=int, default=TRAIN_STEPS,
                        help="steps of the briefly trained big copy (0: no faithfulness on it)")
    parser.add_argument("--seed", type=int, default=SEED)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.new_tokens < 2 or args.prompt_tokens < PERSONA_TOKENS or args.repeats < 1 or args.train_steps < 0:
        print("bench/generation.py: error: --new-tokens must be at least 2, --prompt-tokens at least "
              f"{PERSONA_TOKENS}, --repeats at least 1, --train-steps at least 0", file=sys.stderr)
        return 1
    threads = args.threads or sp.physical_cores()
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    transformers.logging.set_verbosity_error()  # a note per tiny model built; nothing to act on
    fast_path = sp.fast_path
    print(f"torch {torch.__version__}, {threads} threads ({sp.physical_cores()} physical cores, "
          f"{os.cpu_count()} logical), load average {os.getloadavg()[0]:.1f} at start; the kit's fast path "
          f"rounds activations to {8 if sp.int8_activations_full_range() else 7} bits", flush=True)

    bandwidth, copy_rate, read_rate = measure_bandwidth(BANDWIDTH_MB)
    print(f"memory bandwidth: {bandwidth:.1f} GB/s ({BANDWIDTH_MB} MB copy {copy_rate:.1f} GB/s read+write, "
          f"sum {read_rate:.1f} GB/s read)", flush=True)

    plain = build_model(args.seed)
    paths = {"plain fp32": plain, "old int8": old_int8(copy.deepcopy(plain)),
             "fast int8": fast_path(copy.deepcopy(plain))}
    params = sum(p.numel() for p in plain.parameters())
    print(f"model: {N_LAYER} layers, {N_EMBD} wide, vocabulary {VOCAB_SIZE}: {params / 1e6:.1f} M parameters, "
          f"random weights (seed {args.seed}); old int8 = dynamic quantization (before issue 23), fast int8 = "
          f"{type(paths['fast int8'].lm_head).__name__} layers", flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, VOCAB_SIZE, (1, args.prompt_tokens), generator=generator)
    whole, first = speed(paths, ids, args.new_tokens, args.repeats)

    print(f"\nbatch size one, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy, "
          f"median of {args.repeats}:")
    print(f"{'path':10} {'reply s':>8} {'tokens/s':>9} {'ms/new token':>13} {'weights MB/token':>17} "
          f"{'GB/s':>6} {'share of bandwidth':>19} {'bandwidth allows':>17}")
    rows = {}
    for name, model in paths.items():
        per_token = (whole[name] - first[name]) / (args.new_tokens - 1)
        read = weight_bytes_per_token(model)
        rows[name] = (args.new_tokens / whole[name], per_token)
        print(f"{name:10} {whole[name]:8.2f} {args.new_tokens / whole[name]:9.1f} {per_token * 1e3:13.1f} "
              f"{read / 1e6:17.0f} {read / per_token / 1e9:6.1f} {read / per_token / 1e9 / bandwidth:18.0%} "
              f"{bandwidth * 1e9 / read:10.0f} tok/s")
    for name in ("old int8", "fast int8"):
        print(f"{name} / plain fp32: {rows[name][0] / rows['plain fp32'][0]:.2f}x tokens/s for the whole reply, "
              f"{rows['plain fp32'][1] / rows[name][1]:.2f}x per new token")
    ratio = rows["fast int8"][0] / rows["old int8"][0]
    print(f"fast int8 / old int8: {ratio:.2f}x tokens/s, {rows['old int8'][1] / rows['fast int8'][1]:.2f}x per new "
          f"token (goal: no slower: {'met' if ratio >= 0.97 else 'NOT met'}, within 3% noise)", flush=True)

    fast = paths["fast int8"]
    persona = torch.randint(0, VOCAB_SIZE, (1, PERSONA_TOKENS), generator=generator)
    with torch.inference_mode():
        fast(persona)
        start = time.perf_counter()
        for _ in range(args.repeats):
            fast(persona)
        prefix = (time.perf_counter() - start) / args.repeats
    print(f"persona key/value cache: its {PERSONA_TOKENS} tokens take {prefix * 1e3:.0f} ms to read in, "
          f"{prefix / whole['fast int8']:.0%} of a {args.new_tokens}-token fast reply. Not reused: a saving this "
          f"size is not worth a cache that left-padded rows of one batch, each with the persona at another "
          f"offset, could not share.", flush=True)

    if not SAMPLE.is_file():
        print(f"\n{SAMPLE} is absent: no agreement on a trained model")
        return 0
    exchanges = read_exchanges(SAMPLE)
    model, tokenizer, learnt, loss = train_tiny(exchanges[:TINY["exchanges"]], args.seed)
    eos = tokenizer.eos_token_id
    if args.train_steps:
        trained, big_loss = train_briefly(plain, learnt[:TRAINED_PROMPTS], args.train_steps, tokenizer.pad_token_id,
                                          args.seed)
        prompts = [torch.tensor([prompt]) for prompt, _ in learnt[:TRAINED_PROMPTS]]
        print(f"\nfaithfulness to fp32 on the big model trained {args.train_steps} steps on {len(prompts)} exchanges "
              f"(final loss {big_loss:.2f}), their {len(prompts)} prompts, greedy, up to {args.new_tokens} new "
              f"tokens (issue 23 goal: at least 7/8 identical, max logit error at most 0.078, twice llama.cpp "
              f"Q8_0's):")
        for name, build in (("old int8", old_int8), ("fast int8", fast_path)):
            quick = build(copy.deepcopy(trained))
            same, differing, total, firsts, replies = agreement(trained, quick, prompts, args.new_tokens, eos)
            at_next, along, margin = logit_errors(trained, quick, prompts, replies)
            print(f"  {name:9}: {same}/{len(prompts)} replies identical, {differing}/{total} tokens differ "
                  f"(first differences at {[k for k in firsts if k is not None]}); max |logit error| "
                  f"{at_next:.3f} at the next token, {along:.3f} along fp32's replies "
                  f"(fp32's smallest top-1/top-2 margin there {margin:.3f})", flush=True)
            del quick
        del trained

    print(f"\ngreedy agreement with fp32 on a tiny model trained here ({TINY['n_layer']} layers, "
          f"{TINY['n_embd']} wide, {TINY['steps']} steps on the first {len(learnt)} exchanges of {SAMPLE.name}, "
          f"final loss {loss:.2f}), up to {TINY['new_tokens']} new tokens:")
    seen = [torch.tensor([prompt]) for prompt, _ in learnt[:TINY["prompts"]]]
    unseen = [torch.tensor([sp.fit_prompt(tokenizer, [question], 1, 10_000)])
              for question, _ in exchanges[-TINY["prompts"]:]]
    for name, build in (("old int8", old_int8), ("fast int8", fast_path)):
        quick = build(copy.deepcopy(model))
        for label, prompts in (("questions it learnt (peaked distributions)", seen),
                               ("questions it never saw (near ties)", unseen)):
            same, differing, total, firsts, _ = agreement(model, quick, prompts, TINY["new_tokens"], eos)
            print(f"  {name:9}, {label}: {same}/{len(prompts)} replies identical, {differing}/{total} tokens differ "
                  f"(first differences at {[k for k in firsts if k is not None]})", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
