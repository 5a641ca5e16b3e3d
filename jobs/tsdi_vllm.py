"""TSDI (SCIENCE.md §7) as a vLLM logits processor: logits z_i − α·b_i at response positions
i ≤ L, the same subtraction `jobs/tsdi.py::TSDILogitsProcessor` makes inside `generate`.

vLLM's (V1) processors act on the whole running batch and are installed when the engine starts;
a request asks for TSDI through `SamplingParams.extra_args={"tsdi": {"bias", "alpha", "length"}}`
and every other request passes through untouched. The processor sees each request's running list
of output tokens, so the response position is that list's length. Imported by vLLM's engine
process by name (`FQCN`), hence its own module: importing it needs vLLM.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

FQCN = "jobs.tsdi_vllm:TSDIBias"


class TSDIBias(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.biases: dict[str, torch.Tensor] = {}  # bias file -> b [L, V] on the device
        self.rows: dict[int, tuple[torch.Tensor, float, list[int]]] = {}  # batch row -> (b[:L], α, output ids)

    def is_argmax_invariant(self) -> bool:
        return False  # it changes greedy choices: that is its purpose

    def _state(self, params, prompt_ids, output_ids):
        tsdi = (params.extra_args or {}).get("tsdi")
        if not tsdi or tsdi["alpha"] == 0:
            return None
        if tsdi["bias"] not in self.biases:
            from jobs.tsdi import load_bias

            self.biases[tsdi["bias"]] = load_bias(tsdi["bias"])[0].to(self.device, torch.float32)
        bias = self.biases[tsdi["bias"]]
        return bias[: tsdi.get("length") or bias.shape[0]], float(tsdi["alpha"]), output_ids

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, (bias, alpha, output_ids) in self.rows.items():
            i = len(output_ids)  # 0-based position of the token about to be chosen
            if i < bias.shape[0]:
                v = min(bias.shape[1], logits.shape[1])  # vLLM may pad the vocabulary
                logits[row, :v] -= alpha * bias[i, :v].to(logits.dtype)
        return logits
