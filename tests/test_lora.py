"""--lora in the trainers (issue 15): only the adapters and the added pad row train, a LoRA run over the
20 pairs learns them and stops on EOS, the saved folder is the adapter merged into a plain fp32 GPT-2
that gives the adapter model's replies (through the chat's int8 path too), --save-adapter keeps the
adapter alone, and --resume continues a LoRA run from its adapter checkpoints.

The base is a tiny GPT-2 in the layout of ruGPT-3 medium and large (no pad token: the trainer adds one).
A LoRA cannot move a random model's logits much, since the frozen tied head keeps them near zero, so its
embeddings are scaled up to the size a trained model's have."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import train_transformer as tt
from test_train_transformer import PAIRS, StepRecorder, greedy_reply, one_line_error, write_pairs

EMBEDDING_SCALE = 10.0
LORA_RUN = ["--device", "cpu", "--lora", "--lora-dropout", "0", "--lr", "2e-2", "--batch-size", "20", "--seed", "0"]


# Training tests run on one thread each: two cores are shared by the whole suite.
pytestmark = pytest.mark.usefixtures("one_thread")


def write_base_without_pad(folder, n_embd=64, n_layer=2):
    """A GPT-2 folder whose tokenizer declares <s>, </s>, <unk> and no pad, as GPT-2-layout models do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(tt.tokenizer_texts([([q], a) for q, a in PAIRS], 1, tt.PERSONA)),
                            trainers.BpeTrainer(vocab_size=400, min_frequency=2, show_progress=False,
                                                special_tokens=["<s>", "</s>", "<unk>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        model_max_length=128)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=n_embd, n_layer=n_layer,
                                       n_head=2, bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(EMBEDDING_SCALE)
        model.transformer.wpe.weight.mul_(EMBEDDING_SCALE)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_base_without_pad(tmp_path_factory.mktemp("base") / "gpt2_layout")


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    """A --lora --save-adapter run over the 20 pairs; (output folder, the Trainer with the adapter model)."""
    root = tmp_path_factory.mktemp("lora")
    data = write_pairs(root / "data", PAIRS)
    out = root / "model"
    args = tt.parse_args(LORA_RUN + ["--model", str(base), "--data-dir", str(data), "--output", str(out),
                                     "--save-adapter", "--max-steps", "400", "--eval-steps", "200",
                                     "--logging-steps", "100"])
    train_rows, val_rows = tt.load_splits(args.data_dir, args.rows, args.val_rows)
    trainer = tt.run(args, train_rows, val_rows, tt.MAX_TURNS, tt.PERSONA)
    return out, trainer


def error_after_loading(capfd):
    """The one error line of a run that failed once the model was loaded: transformers' loading bar comes first."""
    err = capfd.readouterr().err.strip().splitlines()
    lines = [line for line in err if not re.match(r"(Loading weights|Writing model shards):", line)]
    assert len(lines) == 1 and lines[0].startswith("train_transformer.py: error: "), err
    return lines[0]


def replies(model, tokenizer):
    model.eval()
    return [greedy_reply(model, tokenizer, question) for question, _ in PAIRS]


def exact(results):
    return sum(stopped and reply == answer for (reply, stopped), (_, answer) in zip(results, PAIRS))


def test_lora_trains_only_the_adapters_and_the_added_pad_row(lora_run, base, capsys):
    _, trainer = lora_run
    model = trainer.model
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    d, layers, r = config["n_embd"], config["n_layer"], model.peft_config["default"].r
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or "trainable_tokens_delta" in name for name in trainable), sorted(trainable)
    # per layer, A (r x fan_in) and B (fan_out x r) on c_attn (d -> 3d), attn.c_proj (d -> d), c_fc (d -> 4d)
    # and mlp.c_proj (4d -> d): 16 r d; plus one row of d for the pad the trainer added (tied to the LM head)
    assert sum(trainable.values()) == layers * 16 * r * d + d
    indices = model.peft_config["default"].trainable_token_indices
    assert (indices if isinstance(indices, list) else [i for ids in indices.values() for i in ids]) == \
        [config["vocab_size"]]  # the pad, the one token added after the base's vocabulary


def test_the_merged_folder_learned_the_pairs_and_answers_as_the_adapter_model(lora_run, base):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    out, trainer = lora_run
    assert not (out / "adapter_config.json").exists()      # a plain model folder, not an adapter
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert type(merged) is GPT2LMHeadModel and merged.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in load_file(out / "model.safetensors").values())
    merged_replies = replies(merged, tokenizer)
    assert exact(merged_replies) >= 18, merged_replies
    assert merged_replies == replies(trainer.model, tokenizer)
    # the merge changed the adapted weights and the pad's row, nothing else
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    pad = tokenizer.pad_token_id
    changed = set()
    for name, weight in after.items():
        old = before[name]
        if name.endswith("wte.weight"):
            assert torch.equal(weight[:pad], old) and len(weight) == pad + 1
        elif not torch.equal(weight, old):
            changed.add(name)
    assert changed == {f"transformer.h.{i}.{layer}.weight" for i in range(2)
                       for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def test_save_adapter_keeps_a_small_adapter_that_gives_the_same_replies(lora_run, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = lora_run
    tokenizer = AutoTokenizer.from_pretrained(out)
    weights = load_file(out / tt.ADAPTER_DIR / "adapter_model.safetensors")
    assert weights and all("lora_" in name or "trainable_tokens" in name for name in weights), sorted(weights)
    # as the README says: the base, resized to the run's tokenizer, then the adapter
    model, _ = tt.load_pretrained(str(base))
    model.resize_token_embeddings(len(tokenizer))
    with tt.peft_quietly():
        adapted = PeftModel.from_pretrained(model, out / tt.ADAPTER_DIR)
    assert replies(adapted, tokenizer) == replies(AutoModelForCausalLM.from_pretrained(out), tokenizer)
    # and the run's checkpoints are as small: no whole embedding tables
    checkpoint = tt.complete_checkpoint(str(out), adapter=True)
    assert set(load_file(os.path.join(checkpoint, "adapter_model.safetensors"))) == set(weights)


def test_the_merged_folder_answers_through_the_chats_int8_path(lora_run):
    import system_prompt as sp

    out, _ = lora_run
    chat = sp.load_weights(sp.open_model_folder(str(out), "cpu"), quantize="int8", threads=1)
    assert chat["quantize"] == "int8"
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in chat["model"].modules())
    assert exact(replies(chat["model"], chat["tokenizer"])) >= 18


def test_resume_continues_a_lora_run_from_its_adapter_checkpoint(base, tmp_path, monkeypatch, capfd):
    data = write_pairs(tmp_path / "data", PAIRS)
    out = tmp_path / "model"
    common = LORA_RUN + ["--model", str(base), "--data-dir", str(data), "--output", str(out), "--eval-steps", "2",
                         "--batch-size", "4", "--save-total-limit", "5"]
    assert tt.main(common + ["--max-steps", "4"]) == 0
    assert tt.complete_checkpoint(str(out)) is None  # LoRA checkpoints hold the adapter, not a model
    assert tt.complete_checkpoint(str(out), adapter=True).endswith("checkpoint-4")
    capfd.readouterr()
    assert tt.main([a for a in common if a != "--lora"] + ["--max-steps", "6", "--resume"]) == 1
    assert "its checkpoints are of a run with --lora; add --lora" in error_after_loading(capfd)

    recorder = StepRecorder()
    make_callbacks = tt.make_callbacks
    monkeypatch.setattr(tt, "make_callbacks", lambda args: make_callbacks(args) + [recorder.callback])
    assert tt.main(common + ["--max-steps", "6", "--resume"]) == 0
    assert (recorder.start, recorder.steps) == (4, 2)
    state = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == 6
    assert "LoRA r=16 on c_attn, c_proj, c_fc" in capfd.readouterr().out
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32


def test_a_lora_folder_mid_run_is_named_as_such(base, tmp_path, capfd):
    """A chat script or trainer given a --lora run's folder before it ends finds adapter checkpoints only."""
    folder = tmp_path / "unfinished"
    (folder / "checkpoint-2").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json"):
        (folder / "checkpoint-2" / name).write_text("{}", encoding="utf-8")
    with pytest.raises(tt.UserError, match="a --lora run that has not finished"):
        tt.load_pretrained(str(folder))
    import evaluate
    import perplexity
    import system_prompt
    import tg_bot

    for reader in (system_prompt.find_weights_folder, tg_bot.find_weights_folder, perplexity.resolve_weights,
                   evaluate.resolve_weights):
        with pytest.raises(Exception, match="a --lora run that has not finished") as raised:
            reader(folder)
        assert type(raised.value).__name__ == "UserError"


def test_lora_one_line_errors(base, tmp_path, capfd):
    from transformers import LlamaConfig, LlamaForCausalLM

    data = write_pairs(tmp_path / "data", PAIRS)
    out = tmp_path / "m"
    common = ["--data-dir", str(data), "--output", str(out), "--device", "cpu"]
    assert tt.main(common + ["--lora", "--from-scratch"]) == 1
    assert "--lora adapts a trained model" in one_line_error(capfd)
    assert tt.main(common + ["--from-scratch", "--save-adapter"]) == 1
    assert "--save-adapter keeps the LoRA adapter" in one_line_error(capfd)
    assert tt.main(common + ["--model", str(base), "--lora", "--lora-dropout", "1.5"]) == 1
    assert "--lora-dropout 1.5: must be at least 0 and below 1" in one_line_error(capfd)
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(llama)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (llama / name).write_bytes((base / name).read_bytes())
    capfd.readouterr()
    assert tt.main(common + ["--model", str(llama), "--lora"]) == 1
    assert "--lora adapts GPT-2 blocks (c_attn, c_proj, c_fc), which this llama model does not have" in \
        error_after_loading(capfd)
    assert not out.exists()
