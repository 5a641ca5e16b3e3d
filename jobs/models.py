"""Tokenizers and causal LMs: a tiny Llama built from a config, or any causal LM by path or hub id."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.records import InputError

if TYPE_CHECKING:
    import torch

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
TURN_TOKENS = ["<|user|>", "<|assistant|>"]


def train_tokenizer(texts, vocab_size: int, out_dir: str | os.PathLike):
    """Train a BPE tokenizer on `texts` and save it as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    # Digits one by one so that arithmetic is learnable; Metaspace so decoding is exact.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Metaspace()
    specials = list(SPECIAL_TOKENS.values()) + TURN_TOKENS
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=TURN_TOKENS, **SPECIAL_TOKENS)
    fast.save_pretrained(str(out_dir))
    return fast


def pad_token_id(path: str | os.PathLike) -> int | None:
    """`load_tokenizer(path).pad_token_id`, read from a saved fast tokenizer's two files with
    `tokenizers` alone: the driver needs only this number, and importing AutoTokenizer costs it
    ~4 s. Whatever those files do not settle goes to `load_tokenizer`."""
    import json

    from tokenizers import Tokenizer

    try:
        config = json.loads((Path(path) / "tokenizer_config.json").read_text())
        name = config.get("pad_token") or config.get("eos_token")  # no pad token: eos, as load_tokenizer does
        name = name.get("content") if isinstance(name, dict) else name
        found = Tokenizer.from_file(str(Path(path) / "tokenizer.json")).token_to_id(name) if name else None
    except Exception:  # no such files, or not these formats: the full load says what is wrong
        found = None
    return found if found is not None else load_tokenizer(path).pad_token_id


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    if looks_local(path) and not Path(path).exists():
        raise InputError(f"tokenizer path does not exist: {path}")
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:  # most causal LMs ship without one; left padding uses eos
        tok.pad_token = tok.eos_token
    return tok


def tiny_llama(cfg: dict, tokenizer):
    """A Llama-architecture model of a few hundred thousand parameters, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
        max_position_embeddings=cfg["max_len"], tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """Any causal LM by local path or hub id (the hub only where a network exists), in float32
    unless `dtype` says otherwise. (torch is imported here, not with the module: the driver checks
    paths with `looks_local` and otherwise never needs it.)"""
    import torch
    from transformers import AutoModelForCausalLM

    if looks_local(path) and not Path(path).exists():
        raise InputError(f"model path does not exist: {path}")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)


def ray_device() -> str:
    """The device Ray gave this process: a GPU where its task or actor asked for one (Ray sets
    CUDA_VISIBLE_DEVICES to it), else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_vocab(model_path: str | os.PathLike, tokenizer, where: str) -> None:
    """A tokenizer whose ids run past the model's embedding table is the wrong tokenizer.

    Reads the model's config only, so a 7B model is not loaded to check it."""
    from transformers import AutoConfig

    if looks_local(model_path) and not Path(model_path).exists():
        raise InputError(f"model path does not exist: {model_path}")
    rows = AutoConfig.from_pretrained(str(model_path)).vocab_size
    if len(tokenizer) > rows:
        raise InputError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows")


def apply_lora(model, lora: dict):
    """Low-rank adapters (PEFT) on the attention projections; only they train (for large models)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                            target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM"))


def save_model(model, tokenizer, out_dir: str | os.PathLike) -> None:
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def looks_local(path) -> bool:
    s = str(path)
    return s.startswith(("/", ".", "~")) or os.sep in s and s.count("/") != 1
