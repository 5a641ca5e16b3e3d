"""TSDI (SCIENCE.md §7): estimate the context-independent refusal bias safety alignment leaves
in a model's first response positions, and subtract it while decoding.

b_i = mean over random neutral prompts x̃ of [log π_aligned(· | x̃, ỹ_<i) − log π_ref(· | x̃, ỹ_<i)]
for response positions i = 1..L, where ỹ is the reference model's greedy continuation
(or random pool tokens). Decoding then uses logits z_i − α·b_i for i ≤ L.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor

from jobs.generate import greedy_decode


def neutral_pool(tokenizer, texts) -> np.ndarray:
    """Token ids of neutral text (a corpus's benign prompts, or any text file), special tokens
    dropped; sampling from it with repetition keeps the text's token frequencies."""
    special = set(tokenizer.all_special_ids)
    ids = [t for text in texts for t in tokenizer(text, add_special_tokens=False).input_ids if t not in special]
    if not ids:
        raise ValueError("the neutral token pool is empty")
    return np.asarray(ids)


def random_prompts(pool: np.ndarray, lengths, m: int, seed: int, prefix: list[int], suffix: list[int]) -> list[list[int]]:
    """M prompts of pool tokens, their lengths drawn from real prompts', inside the chat template."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    return [prefix + rng.choice(pool, size=int(rng.choice(lengths))).tolist() + suffix for _ in range(m)]


def template_ids(tokenizer, template: str, probes: list[str]) -> tuple[list[int], list[int]]:
    """The token ids every real prompt starts and ends with (BOS and the template around '{prompt}').

    Read off real prompts encoded exactly as the data stage encodes them: tokenizing the template's
    pieces on their own would drop the whitespace tokens that join them to the prompt, and b₁
    would be estimated after a token sequence the model never saw."""
    from jobs.corpora import encode_prompts

    encoded = encode_prompts(tokenizer, probes, template)
    shortest = min(map(len, encoded))
    prefix = 0
    while prefix < shortest and len({e[prefix] for e in encoded}) == 1:
        prefix += 1
    suffix = 0
    while suffix < shortest - prefix and len({e[-1 - suffix] for e in encoded}) == 1:
        suffix += 1
    first = encoded[0]
    return first[:prefix], first[len(first) - suffix:]


@torch.no_grad()
def _position_logprobs(model, prompts: list[list[int]], continuations: list[list[int]], length: int, pad_id: int):
    """log π(· | x, y_<i) for i = 1..L, right-padded (so positions are exact); [B, L, V] and a [B, L] mask."""
    seqs = [p + c[: length - 1] for p, c in zip(prompts, continuations)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
    logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu()
    out = torch.zeros(len(seqs), length, logits.shape[-1])
    valid = torch.zeros(len(seqs), length, dtype=torch.bool)
    for r, (p, c) in enumerate(zip(prompts, continuations)):
        n = min(length, len(c) + 1)  # position i needs y_<i: the prompt plus i-1 continuation tokens
        out[r, :n] = torch.log_softmax(logits[r, len(p) - 1 : len(p) - 1 + n], dim=-1)
        valid[r, :n] = True
    return out, valid


@torch.no_grad()
def estimate_bias(aligned, reference, prompts: list[list[int]], length: int, pad_id: int, eos_id: int,
                  continuation: str = "reference", pool: np.ndarray | None = None, seed: int = 0,
                  batch_size: int = 64) -> torch.Tensor:
    """b [L, V]: the mean log-probability difference aligned − reference at each response position."""
    aligned.eval(), reference.eval()
    if continuation == "reference":
        conts = greedy_decode(reference, prompts, pad_id, eos_id, length, batch_size)
    elif continuation == "random":
        rng = np.random.default_rng(seed)
        conts = [rng.choice(pool, size=length).tolist() for _ in prompts]
    else:
        raise ValueError(f"continuation must be 'reference' or 'random', not {continuation!r}")
    total, count = None, torch.zeros(length)
    for start in range(0, len(prompts), batch_size):
        p, c = prompts[start : start + batch_size], conts[start : start + batch_size]
        a, valid = _position_logprobs(aligned, p, c, length, pad_id)
        r, _ = _position_logprobs(reference, p, c, length, pad_id)
        diff = ((a - r) * valid.unsqueeze(-1)).sum(0)
        total = diff if total is None else total + diff
        count += valid.sum(0)
    return total / count.clamp(min=1).unsqueeze(-1)


class TSDILogitsProcessor(LogitsProcessor):
    """Subtracts α·b_i from the logits of response position i ≤ L; later positions untouched.

    `prompt_width` is the (padded) prompt length given to `generate`, so the response position
    is `input_ids.shape[1] - prompt_width + 1`."""

    def __init__(self, bias: torch.Tensor, alpha: float, prompt_width: int, length: int | None = None):
        self.bias = bias[: length or bias.shape[0]]
        self.alpha, self.prompt_width = alpha, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        i = input_ids.shape[1] - self.prompt_width  # 0-based response position
        if i >= self.bias.shape[0] or self.alpha == 0:
            return scores
        return scores - self.alpha * self.bias[i].to(scores.device, scores.dtype)


def processor_factory(bias: torch.Tensor, alpha: float, length: int):
    """What `greedy_decode` takes: a processor list for a batch whose prompts are `width` wide."""
    from transformers import LogitsProcessorList

    return lambda width: LogitsProcessorList([TSDILogitsProcessor(bias, alpha, width, length)])


def save_bias(path: Path, bias: torch.Tensor, meta: dict) -> Path:
    """safetensors with the bias and its provenance (models, M, L, pool) as string metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"bias": bias.contiguous()}, str(path), metadata={"saferay.tsdi": json.dumps(meta)})
    return path


def load_bias(path: Path) -> tuple[torch.Tensor, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("bias"), json.loads(f.metadata()["saferay.tsdi"])


def pool_texts(data_dir: str, pool: str) -> list[str]:
    """'benign': the task training prompts; otherwise a text file, one prompt-like line each."""
    if pool == "benign":
        from jobs.corpora import read_split
        from jobs.storage import names

        splits = [n for n in names(data_dir) if n.startswith("task_") and n.endswith("_train")]
        return [t for s in splits for t in read_split(data_dir, s, ["prompt"])["prompt"]]
    path = Path(pool)
    if not path.is_file():
        from jobs.records import InputError

        raise InputError(f"{pool}: TSDI token pool file does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def estimate_model_bias(aligned_dir: str, reference_dir: str, data_dir: str, cfg: dict, template: str, seed: int,
                        out_path: str, threads: int = 1) -> dict:
    """One aligned model's bias against the reference, saved as a safetensors artifact; on the GPU
    Ray gave this task, if any."""
    from jobs.models import load_model, load_tokenizer, ray_device
    from jobs.storage import local, publish

    torch.set_num_threads(threads)
    aligned_dir, reference_dir = local(aligned_dir), local(reference_dir)  # copies on this node, from a store
    device = ray_device()
    aligned, reference = load_model(aligned_dir).to(device), load_model(reference_dir).to(device)
    tok = load_tokenizer(aligned_dir)
    texts = pool_texts(data_dir, cfg["pool"])
    pool = neutral_pool(tok, texts)
    lengths = [max(1, len(tok(t, add_special_tokens=False).input_ids)) for t in texts]
    probes = texts[:: max(1, len(texts) // 256)]  # spread over every task: no task's own wording is "template"
    prompts = random_prompts(pool, lengths, cfg["prompts"], seed, *template_ids(tok, template, probes))
    bias = estimate_bias(aligned, reference, prompts, cfg["length"], tok.pad_token_id, tok.eos_token_id,
                         cfg["continuation"], pool, seed)
    meta = {"aligned": aligned_dir, "reference": reference_dir, "m": cfg["prompts"], "length": cfg["length"],
            "pool": cfg["pool"], "continuation": cfg["continuation"], "seed": seed}
    with tempfile.TemporaryDirectory() as tmp:  # a store location: written here, then put there
        publish(save_bias(Path(tmp) / Path(out_path).name, bias, meta), out_path)
    top = bias.topk(3, dim=-1).indices  # the tokens alignment pushed up most, per position
    return {"bias_norms": bias.norm(dim=-1).tolist(),
            "top_tokens": [tok.convert_ids_to_tokens(row) for row in top.tolist()]}
