"""Turning a prompt (text, token ids or chat messages) into checked token ids."""
from __future__ import annotations

from collections.abc import Sequence

from .errors import ValidationError


class PromptEncoder:
    def __init__(self, tokenizer, vocab_size: int, context_tokens: int, model_name: str):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_tokens = context_tokens
        self.model_name = model_name

    def encode(self, prompt: str | Sequence[int] | Sequence[dict], max_tokens: int) -> list[int]:
        """Token ids, checked against the vocabulary and the context (ValueError naming what is wrong)."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt).input_ids
        elif prompt and all(isinstance(m, dict) for m in prompt):
            ids = self._chat(prompt)
        else:
            ids = list(prompt)
            if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size for i in ids):
                raise ValidationError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if not ids:
            raise ValidationError("prompt is empty")
        if len(ids) + max_tokens > self.context_tokens:
            raise ValidationError(
                f"prompt is {len(ids)} tokens and max_tokens is {max_tokens}: {len(ids) + max_tokens} exceeds the "
                f"model's context of {self.context_tokens} tokens"
            )
        return ids

    def _chat(self, messages: Sequence[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValidationError(f"{self.model_name} has no chat template: send a text prompt instead")
        if any(not isinstance(m.get("role"), str) or not m["role"] or not isinstance(m.get("content"), str)
               for m in messages):
            raise ValidationError("every chat message needs a non-empty role and a string content")
        try:
            rendered = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - the model's template refused these messages (jinja raises)
            raise ValidationError(f"{self.model_name}'s chat template refused the messages: {exc}") from exc
        return self.tokenizer(rendered, add_special_tokens=False).input_ids
