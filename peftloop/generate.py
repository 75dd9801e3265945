"""Text generation with a KV cache: greedy, or sampling with temperature and top-p.

Prompts of different lengths are padded on the left, so every row's next token sits in the
last column; the attention mask hides the pads and position ids count real tokens only.
``generate`` works on token ids; ``generate_text`` adds the tokenizer (``peftloop generate``).
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one attention layer, grown along the sequence axis at each step."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """One token id per row: argmax when temperature == 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int,
             eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
             temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """New token ids for each prompt (the prompt itself is not included; stops at eos)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.as_tensor(p, device=device)
        mask[i, longest - len(p):] = 1
    caches = [KVCache() for _ in range(model.config.num_hidden_layers)]
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    step_ids, step_positions = ids, positions
    for _ in range(max_new_tokens):
        logits = model(step_ids, attention_mask=mask, position_ids=step_positions, kv_caches=caches)[:, -1]
        next_ids = sample_next(logits, temperature, top_p, generator)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad_token_id), next_ids)
        for i, t in enumerate(next_ids.tolist()):
            if not finished[i]:
                out[i].append(t)
        finished |= torch.tensor([t in eos for t in next_ids.tolist()], device=device)
        if bool(finished.all()):
            break
        step_ids = next_ids[:, None]
        step_positions = step_positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    model.train(was_training)
    return out


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, chat: bool = False,
                  system: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0) -> list[str]:
    """Text in, text out: each prompt encoded (or formatted as one user turn with the chat template
    when ``chat``), continued until a stop token, decoded without special tokens."""
    if chat:
        before = [{"role": "system", "content": system}] if system else []
        prompt_ids = [tokenizer.apply_chat_template([*before, {"role": "user", "content": p}],
                                                    add_generation_prompt=True) for p in prompts]
    else:
        prompt_ids = [tokenizer.encode(p) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    outputs = generate(model, prompt_ids, max_new_tokens, eos_token_id=tokenizer.stop_token_ids,
                       pad_token_id=pad, temperature=temperature, top_p=top_p,
                       generator=torch.Generator().manual_seed(seed))
    return [tokenizer.decode(ids) for ids in outputs]
