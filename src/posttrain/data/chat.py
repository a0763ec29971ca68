"""Chat templates and per-token assistant loss masks."""

from __future__ import annotations

# ChatML, as used by Qwen and SmolLM2. Used when a tokenizer ships no template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
