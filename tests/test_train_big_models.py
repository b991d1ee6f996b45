"""The trainers' memory flags and model list (issue 15): --gradient-checkpointing trains to the same loss,
precision follows the GPU's generation (fp16 on a T4, bf16 from Ampere), --lora holds the frozen weights
in 16 bits where there is mixed precision, --optim-8bit needs bitsandbytes, the saved folder is fp32
whatever was loaded or saved, ruGPT-3 XL is refused in one line, and the launchers' arguments are taken."""
import json
import types

import pytest
import torch
from safetensors.torch import load_file

import tiny_model
import train_medium_context as tm
import train_transformer as tt
from test_lora import LORA_RUN, error_after_loading, exact, replies, write_base_without_pad
from test_train_transformer import PAIRS, TINY, one_line_error, write_pairs


# Training tests run on one thread each: two cores are shared by the whole suite.
pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv, persona=tt.PERSONA):
    args = tt.parse_args(argv)
    train_rows, val_rows = tt.load_splits(args.data_dir, args.rows, args.val_rows)
    return tt.run(args, train_rows, val_rows, tt.MAX_TURNS, persona)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def checkpointing_on(trainer):
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    return model.is_activation_checkpointing


# ---------------------------------------------------------------------------- gradient checkpointing

def test_gradient_checkpointing_gives_the_same_losses(tmp_path, recwarn):
    """Dropout on (the from-scratch model's 0.1): the recompute restores the random state, so every logged
    loss is the one of the run without it, full fine-tune and LoRA alike. No deprecation warning either:
    transformers 5 renamed the argument (activation_checkpointing)."""
    data = write_pairs(tmp_path / "data", PAIRS)
    steps = ["--max-steps", "6", "--eval-steps", "6", "--logging-steps", "1", "--batch-size", "4"]
    full = TINY + steps + ["--data-dir", str(data)]
    plain = run(full + ["--output", str(tmp_path / "plain")])
    checkpointed = run(full + ["--output", str(tmp_path / "ckpt"), "--gradient-checkpointing"])
    assert len(losses(plain)) == 6 and losses(checkpointed) == pytest.approx(losses(plain), abs=1e-5)
    assert checkpointing_on(checkpointed) and not checkpointing_on(plain)

    base = write_base_without_pad(tmp_path / "base")
    lora = ["--device", "cpu", "--lora", "--lora-dropout", "0.1", "--lr", "2e-2", "--seed", "0"] + steps + \
        ["--data-dir", str(data), "--model", str(base)]
    plain = run(lora + ["--output", str(tmp_path / "lora")])
    checkpointed = run(lora + ["--output", str(tmp_path / "lora_ckpt"), "--gradient-checkpointing"])
    assert losses(checkpointed) == pytest.approx(losses(plain), abs=1e-5)
    assert checkpointing_on(checkpointed) and not checkpointing_on(plain)
    assert not [w for w in recwarn if "checkpointing" in str(w.message)], [str(w.message) for w in recwarn]


# ---------------------------------------------------------------------------- precision

@pytest.mark.parametrize("capability, precision", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"),
                                                   ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_precision_follows_the_gpus_generation_not_emulated_bf16(monkeypatch, capability, precision):
    """A T4 (7.5) answers is_bf16_supported() with True (bf16 emulated, slowly): it must train in fp16 with
    loss scaling; Ampere (8.0) and later in bf16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert tt.mixed_precision("cuda") == precision
    assert tm.mixed_precision("cuda") == precision
    assert tt.mixed_precision("cpu") is None


def test_lora_with_mixed_precision_holds_the_frozen_weights_in_16_bits(tmp_path, monkeypatch):
    """What --lora does on a bf16 GPU, on the CPU's bf16 autocast: frozen weights bf16, what trains fp32, and
    the saved folder merged onto an fp32 base all the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setattr(tt, "mixed_precision", lambda device: "bf16")
    data = write_pairs(tmp_path / "data", PAIRS)
    base = write_base_without_pad(tmp_path / "base")
    out = tmp_path / "model"
    trainer = run(LORA_RUN + ["--model", str(base), "--data-dir", str(data), "--output", str(out),
                              "--max-steps", "4", "--eval-steps", "4"])
    assert trainer.args.bf16
    dtypes = {p.requires_grad: set() for p in trainer.model.parameters()}
    for p in trainer.model.parameters():
        dtypes[p.requires_grad].add(p.dtype)
    assert dtypes == {False: {torch.bfloat16}, True: {torch.float32}}
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses(trainer))
    assert all(t.dtype == torch.float32 for t in load_file(out / "model.safetensors").values())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(replies(AutoModelForCausalLM.from_pretrained(out), tokenizer)) == len(PAIRS)


# ---------------------------------------------------------------------------- 8-bit AdamW

def test_optim_8bit_without_bitsandbytes_is_one_line(tmp_path, capfd, monkeypatch):
    data = write_pairs(tmp_path / "data", PAIRS)
    installed = tt.package_installed
    monkeypatch.setattr(tt, "package_installed", lambda name: name != "bitsandbytes" and installed(name))
    assert tt.main(TINY + ["--data-dir", str(data), "--output", str(tmp_path / "m"), "--optim-8bit"]) == 1
    line = one_line_error(capfd)
    assert "--optim-8bit needs the bitsandbytes package" in line and "pip install bitsandbytes" in line
    assert not (tmp_path / "m").exists()


def test_optim_8bit_trains_with_8_bit_state(tmp_path):
    if not tt.package_installed("bitsandbytes"):
        pytest.skip("bitsandbytes is not installed (make test installs it from requirements-dev.txt; "
                    "pip install bitsandbytes): the 8-bit AdamW cannot run here")
    data = write_pairs(tmp_path / "data", PAIRS)
    trainer = run(TINY + ["--data-dir", str(data), "--output", str(tmp_path / "m"), "--optim-8bit",
                          "--max-steps", "2", "--eval-steps", "2", "--batch-size", "4"])
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(optimizer).__module__.startswith("bitsandbytes")
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    assert any(v.dtype == torch.uint8 for v in states)


# ---------------------------------------------------------------------------- the saved folder is fp32

def test_a_16_bit_folder_trains_in_fp32(tmp_path):
    """transformers 5 keeps a folder's saved dtype; mixed precision wants fp32 master weights."""
    folder = tiny_model.build_tiny_model(tmp_path / "bf16")
    model, _ = tt.load_pretrained(str(folder))
    model.to(torch.bfloat16).save_pretrained(folder)
    model, _ = tt.load_pretrained(str(folder))
    assert model.dtype == torch.float32


def test_a_16_bit_save_is_turned_back_to_fp32_for_the_chats_int8_path(tmp_path):
    """What DeepSpeed with bf16 saves: the int8 path of the chat fails on it; upcast, it answers."""
    import system_prompt as sp
    from transformers import AutoModelForCausalLM

    folder = tiny_model.build_tiny_model(tmp_path / "bf16")
    AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)
    chat = sp.load_weights(sp.open_model_folder(str(folder), "cpu"), quantize="int8", threads=1)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(RuntimeError):
        chat["model"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert tt.upcast_saved_weights(str(folder)) is True
    assert json.loads((folder / "config.json").read_text(encoding="utf-8"))["dtype"] == "float32"
    assert AutoModelForCausalLM.from_pretrained(folder).dtype == torch.float32
    chat = sp.load_weights(sp.open_model_folder(str(folder), "cpu"), quantize="int8", threads=1)
    out = chat["model"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                                 do_sample=False)
    assert out.shape == (1, 5)
    assert tt.upcast_saved_weights(str(folder)) is False  # already fp32: left alone


# ---------------------------------------------------------------------------- model list and launchers

@pytest.mark.parametrize("name", ["ai-forever/rugpt3xl", "sberbank-ai/rugpt3xl"])
def test_rugpt3_xl_is_refused_in_one_line_before_the_hub(name, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_pairs(tmp_path / "data", PAIRS)
    assert tt.main(["--model", name, "--data-dir", str(data), "--output", str(tmp_path / "m"), "--device", "cpu"]) == 1
    line = one_line_error(capfd)
    assert "Megatron" in line and "sparse attention" in line and "no config.json" in line and tt.RUGPT3_LARGE in line
    assert "unreachable" not in line


def test_the_launchers_local_rank_is_taken():
    """The deepspeed launcher appends --local_rank=N to the script's arguments."""
    assert tt.parse_args(["--local_rank=0"]).local_rank == 0
    assert tm.parse_args(["--local-rank", "1"]).local_rank == 1


def test_a_launcher_that_drops_deepspeed_stops_the_run():
    """accelerate launch --cpu turns DeepSpeed off without a word; the trainers say so instead."""
    args = types.SimpleNamespace(deepspeed="deepspeed/zero2.json")
    with pytest.raises(tt.UserError, match="accelerate launch --cpu"):
        tt.check_deepspeed_engaged(types.SimpleNamespace(is_deepspeed_enabled=False), args)
    tt.check_deepspeed_engaged(types.SimpleNamespace(is_deepspeed_enabled=True), args)


def test_deepspeed_flag_one_line_errors(tmp_path, capfd, repo_root):
    data = write_pairs(tmp_path / "data", PAIRS)
    common = TINY + ["--data-dir", str(data), "--output", str(tmp_path / "m")]
    assert tt.main(common + ["--deepspeed", str(tmp_path / "missing.json")]) == 1
    assert "missing.json: DeepSpeed config not found" in one_line_error(capfd)
    (tmp_path / "bad.json").write_text("{stage: 2", encoding="utf-8")
    assert tt.main(common + ["--deepspeed", str(tmp_path / "bad.json")]) == 1
    assert "bad.json: not a JSON DeepSpeed config" in one_line_error(capfd)
    assert tt.main(common + ["--deepspeed", str(repo_root / "deepspeed" / "zero2.json"), "--optim-8bit"]) == 1
    assert "--optim-8bit with --deepspeed" in one_line_error(capfd)
    if not tt.package_installed("deepspeed"):  # the repository's deepspeed/ folder must not pass for it
        assert tt.main(common + ["--deepspeed", str(repo_root / "deepspeed" / "zero2.json")]) == 1
        assert "--deepspeed needs the deepspeed package" in one_line_error(capfd)
    assert not (tmp_path / "m").exists()
