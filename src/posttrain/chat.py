"""``posttrain chat MODEL_DIR``: a terminal chat with a saved model, streaming tokens."""

from __future__ import annotations

import argparse
import re
import sys

import torch
from transformers import TextStreamer

from posttrain.data.chat import end_of_turn_token_id, render_prompt
from posttrain.models.io import load_model, load_tokenizer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain chat", description="chat with a saved model; "
                                "type /reset to clear the history, /exit or Ctrl-D to quit")
    p.add_argument("model", help="HF model directory (e.g. demo-run/sft/final) or 'tiny'")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    return p


def chat_main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    torch.manual_seed(a.seed)
    tok, model = load_tokenizer(a.model), load_model(a.model)
    model.eval()
    stop = [i for i in (end_of_turn_token_id(tok), tok.eos_token_id) if i is not None]
    history: list[dict[str, str]] = [{"role": "system", "content": a.system}] if a.system else []
    interactive = sys.stdin.isatty()
    _keep_undecodable_input()
    while True:
        try:
            user = input("you> " if interactive else "")
        except EOFError:
            return 0
        if _SURROGATE.search(user):
            # A stray byte in a pasted line must not end the session: refuse that line only.
            print(f"input is not valid {sys.stdin.encoding or 'UTF-8'}; ignored, type it again",
                  file=sys.stderr, flush=True)
            continue
        if user.strip() in ("/exit", "/quit"):
            return 0
        if user.strip() == "/reset":
            history = history[:1] if a.system else []
            continue
        history.append({"role": "user", "content": user})
        reply = _respond(model, tok, history, a, stop)
        history.append({"role": "assistant", "content": reply})


# Undecodable bytes read under "surrogateescape" (U+DC80..U+DCFF), or any lone surrogate.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _keep_undecodable_input() -> None:
    """Read stdin with "surrogateescape": a byte that is not in its encoding becomes a
    surrogate that the loop can refuse, instead of a UnicodeDecodeError ending the session."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:  # a real text stream, not a test's StringIO
        reconfigure(errors="surrogateescape")


@torch.no_grad()
def _respond(model, tok, history, a, stop) -> str:  # noqa: ANN001
    ids = torch.tensor([render_prompt(tok, history)])
    print("assistant> ", end="", flush=True)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    sample = a.temperature > 0
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens,
        do_sample=sample, temperature=a.temperature if sample else None,
        top_p=a.top_p if sample else None, top_k=a.top_k if sample and a.top_k else None,
        eos_token_id=stop, pad_token_id=tok.pad_token_id, streamer=streamer,
    )
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
