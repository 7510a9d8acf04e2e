"""A local transformers chat model as an autointerp backend (offline; the default is SmolLM2-135M-Instruct).

Requests are grouped by their sampling settings and generated in batches (left-padded, one
``generate`` call per batch), greedily at temperature 0, so a reply is reproducible and a cached
one is the reply. The prompt is the tokenizer's chat template when it has one, else a plain
"System: / User: / Assistant:" transcript framed like training windows. Token log-probabilities
come from the generation's own logits when a request asks for them. A request that cannot run
(a prompt longer than the model's context) gets an error reply, never an exception.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence

import torch

from ..data.tokens import encode_prompt, framing
from ..models.hookpoints import unwrap
from ..models.loading import LoadedModel
from .backend import ChatMessage, ChatReply, ChatRequest, TokenLogprobs

__all__ = ["TransformersChatBackend", "prompt_token_ids"]


def prompt_token_ids(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    """The conversation as token ids ready for the assistant's answer."""
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template spells its own specials
        first = framing(tokenizer).first
        return ids if first is None or ids[:1] == [first] else [first] + ids
    transcript = "".join(f"{m.role.capitalize()}: {m.content}\n" for m in messages) + "Assistant:"
    return encode_prompt(tokenizer, transcript)


class TransformersChatBackend:
    """Chat completions from a loaded causal LM (``LoadedModel`` from :func:`jumpscope.load_model`)."""

    def __init__(self, loaded: LoadedModel, *, batch_size: int = 8, seed: int = 0):
        if loaded.kind != "causal_lm":
            raise ValueError(f"{loaded.name} is an {loaded.kind}; an autointerp backend needs a causal LM")
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.name} has no tokenizer; an autointerp backend needs one")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.loaded, self.batch_size, self.seed = loaded, batch_size, seed
        self.stats = {"requests": 0, "failures": 0, "prompt_tokens": 0, "completion_tokens": 0}
        config = unwrap(loaded.model).config
        self.context = int(getattr(config, "max_position_embeddings", 0) or 0) or None

    @property
    def identity(self) -> str:
        return f"transformers:{self.loaded.name}"

    def complete(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        replies: list[ChatReply | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[(request.max_tokens, request.temperature, request.top_logprobs)].append(index)
        for (max_tokens, temperature, top_logprobs), indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                for index, reply in zip(chunk, self._generate([requests[i] for i in chunk], max_tokens,
                                                              temperature, top_logprobs)):
                    replies[index] = reply
        return replies  # type: ignore[return-value]

    @torch.no_grad()
    def _generate(self, requests: list[ChatRequest], max_tokens: int, temperature: float,
                  top_logprobs: int) -> list[ChatReply]:
        tokenizer, module = self.loaded.tokenizer, unwrap(self.loaded.model)
        prompts, out = [], [None] * len(requests)
        for index, request in enumerate(requests):
            ids = prompt_token_ids(tokenizer, request.messages)
            if self.context is not None and len(ids) + max_tokens > self.context:
                out[index] = ChatReply(text=None, error=f"prompt of {len(ids)} tokens + {max_tokens} new exceeds the "
                                                        f"model's context of {self.context}")
            else:
                prompts.append((index, ids))
        self.stats["requests"] += len(requests)
        self.stats["failures"] += len(requests) - len(prompts)
        if not prompts:
            return out  # type: ignore[return-value]
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else module.config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos_ids) if eos_ids else 0)
        width = max(len(ids) for _, ids in prompts)
        device = next(module.parameters()).device
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
        attention = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        for row, (_, ids) in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids):] = torch.tensor(ids, device=device)
            attention[row, width - len(ids):] = 1
        sampling = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0) if temperature > 0 \
            else dict(do_sample=False)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                generated = module.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_tokens,
                                            pad_token_id=pad, eos_token_id=list(eos_ids) or None, output_scores=True,
                                            return_dict_in_generate=True, **sampling)
        except (RuntimeError, ValueError) as error:  # one bad batch costs its requests, not the run
            message = f"generation failed: {str(error).splitlines()[0][:200]}"
            for index, _ in prompts:
                out[index] = ChatReply(text=None, error=message)
            self.stats["failures"] += len(prompts)
            return out  # type: ignore[return-value]
        new = generated.sequences[:, width:]
        for row, (index, ids) in enumerate(prompts):
            tokens = new[row].tolist()
            end = next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
            tokens = tokens[:end]
            logprobs = None
            if top_logprobs > 0:
                logprobs = tuple(self._logprobs(generated.scores[step][row], token, top_logprobs)
                                 for step, token in enumerate(tokens))
            self.stats["prompt_tokens"] += len(ids)
            self.stats["completion_tokens"] += len(tokens)
            out[index] = ChatReply(text=tokenizer.decode(tokens, skip_special_tokens=True), logprobs=logprobs,
                                   prompt_tokens=len(ids), completion_tokens=len(tokens))
        return out  # type: ignore[return-value]

    def _logprobs(self, scores: torch.Tensor, token: int, top: int) -> TokenLogprobs:
        logp = torch.log_softmax(scores.float(), dim=-1)
        values, ids = logp.topk(top)
        decode = self.loaded.tokenizer.decode
        alternatives: dict[str, float] = {}
        for value, index in zip(values.tolist(), ids.tolist()):  # best first: a string two ids decode to keeps the best
            if math.isfinite(value):
                alternatives.setdefault(decode([index]), value)
        return TokenLogprobs(decode([token]), float(logp[token]), alternatives)
