"""Chat with a tuned decoder: replies to conversations, and the interactive `mode=chat` command.

A reply is KV-cache generation (fmjax.infer.generate) from the chat template's prompt, stopped at
the end-of-turn marker (or eos, or max_new_tokens).
"""
from __future__ import annotations

from typing import Callable, Sequence

from fmjax.data.chat import Template
from fmjax.infer import generate


def replies(model, params, tokenizer, template: Template, conversations: Sequence[Sequence[dict]], *,
            max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
            seed: int = 0) -> list[str]:
    """The next assistant turn of each conversation."""
    prompts = [template.prompt(tokenizer, c) for c in conversations]
    new_ids = generate.generate_ids(model, params, prompts, max_new_tokens=max_new_tokens,
                                    eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                    stop_ids=[[template.end_id]])
    return [tokenizer.decode(ids).strip() for ids in new_ids]


def fit_history(tokenizer, template: Template, history: list[dict], max_prompt_tokens: int) -> list[dict]:
    """`history` without its oldest exchanges (a system turn stays) until its prompt fits."""
    history = list(history)
    while len(template.prompt(tokenizer, history)) > max_prompt_tokens:
        first = 1 if history and history[0]["role"] == "system" else 0
        if len(history) - first <= 1:
            break  # the new user turn alone: generation takes it as it is
        del history[first:first + 2]
    return history


def interactive(model, params, tokenizer, template: Template, *, system_prompt: str, max_new_tokens: int,
                max_prompt_tokens: int, temperature: float, seed: int,
                read: Callable[[str], str] = input, write: Callable[[str], None] = print) -> list[dict]:
    """A read-reply loop: every line read is a user turn, answered in context. `/reset` forgets the
    conversation; `/quit` or end of input ends it. Returns the last conversation."""
    start = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history = list(start)
    for turn in range(1_000_000):
        try:
            line = read("user> ").strip()
        except EOFError:
            break
        if line == "/quit":
            break
        if line == "/reset":
            history = list(start)
            continue
        if not line:
            continue
        history = fit_history(tokenizer, template, history + [{"role": "user", "content": line}],
                              max_prompt_tokens)
        reply, = replies(model, params, tokenizer, template, [history], max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed + turn)
        write(f"assistant> {reply}")
        history.append({"role": "assistant", "content": reply})
    return history
