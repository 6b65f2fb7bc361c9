"""Teaching a tiny random model a fixed answer, for tests that need a model to say something exact
(a tool call, a reasoning model's thinking): gradient steps until greedy decoding gives it."""

from __future__ import annotations

import torch

from glmchat.generate import generate_tokens


def teach(model, examples: list[tuple[list[int], list[int]]], max_steps: int = 300):
    """Fit the model to answer each prompt with its target ids (greedy); returns it in eval mode."""
    model.requires_grad_(True).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(max_steps):
        loss = 0.0
        for prompt, target in examples:
            logits = model(torch.tensor([prompt + target[:-1]]))[0, len(prompt) - 1 :]
            loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor(target))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9:
            model.eval()
            if all(list(generate_tokens(model, p, max_new_tokens=len(t))) == t for p, t in examples):
                return model.requires_grad_(False)
            model.train()
    raise AssertionError("the tiny model did not learn its answers")
