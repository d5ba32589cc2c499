"""A few seconds of next-token pretraining for a random-init LLM on a caption corpus.

A random frozen LLM still passes token identities through its residual stream, but its attention mixes
tokens arbitrarily; a short causal-LM fit on the shapes captions makes its layers contextual (which colour
goes with which shape, what "left of" refers to), which the DiT then reads through deep fusion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fusedit.text.encoder import TextEncoder


def pretrain_llm(
    text: TextEncoder,
    corpus: list[str],
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Fit ``text.llm`` as a causal LM (output head tied to the input embeddings). Returns the losses."""
    llm = text.llm
    was_trainable = [p.requires_grad for p in llm.parameters()]
    llm.requires_grad_(True).train()
    opt = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    device = next(llm.parameters()).device
    losses = []
    for _ in tqdm(range(steps), desc="pretrain LLM", disable=not progress, leave=False):
        idx = torch.randint(len(corpus), (batch_size,), generator=gen).tolist()
        ids, mask = text.tokenize([corpus[i] for i in idx], device)
        h = llm(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        logits = h[:, :-1] @ llm.get_input_embeddings().weight.T
        target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for p, req in zip(llm.parameters(), was_trainable):
        p.requires_grad_(req)
    llm.eval()
    return losses
