"""The Gemma chat policy: one place that turns OpenAI-style messages into token ids.

The server and the trainer both call it, so a model is trained on exactly the tokens it is served.

Policy, in the order it is applied:
- Roles are `system`, `developer`, `user`, `assistant` and `tool`; anything else is an error.
- Gemma has no system turn. Each `system` or `developer` message is folded into the next user turn,
  above its text and separated by a blank line; with no user turn after it, it becomes one.
- Content is a string or a list of parts. Text parts are joined with a newline, so `"Hi"` and
  `[{"type": "text", "text": "Hi"}]` give the same tokens. Image and audio parts stay in place as
  markers the model's processor expands.
- Consecutive turns of the same role are merged (Gemma's template needs them to alternate).
- Assistant `tool_calls` and `tool` messages are rendered only when the model's template has a tool
  format; otherwise they are an error that says how to send tool results instead.
- Exactly one `<bos>` starts every prompt, chat or raw completion.
- Generation stops on every end id the model defines (`<eos>`, `<end_of_turn>`, and any in its
  generation config).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
MEDIA_PARTS = {"image_url": "image", "image": "image", "input_audio": "audio", "audio": "audio"}


class ChatError(ValueError):
    """A message the policy cannot render; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Rendered:
    token_ids: list[int]
    text: str  # the prompt as text, with media markers, for engines that expand media themselves
    media: list[dict[str, Any]] = field(default_factory=list)  # media parts, in prompt order


class ChatPolicy:
    def __init__(self, tokenizer, generation_config_path: Path | None = None):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.vocab_size = len(tokenizer)  # len() walks the added tokens: not per request
        self.stop_token_ids = _end_ids(tokenizer, generation_config_path)
        template = tokenizer.chat_template or ""
        self.has_tool_format = "tool_calls" in template or "tool_call" in template

    # -- messages -> normalised turns -----------------------------------------------------------

    def normalize(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Apply the policy above; returns turns of `user` / `assistant` (and `tool` when kept)."""
        if not messages:
            raise ChatError("messages is empty; send at least one user message", "messages")

        turns: list[dict[str, Any]] = []
        pending_system: list[str] = []
        for index, message in enumerate(messages):
            role = message.get("role")
            if role not in ROLES:
                raise ChatError(
                    f"messages[{index}].role={role!r} is not one of {', '.join(ROLES)}",
                    f"messages[{index}].role",
                )
            parts = self._parts(message, index)

            if role in ("system", "developer"):
                pending_system.append("\n".join(p["text"] for p in parts if p["type"] == "text"))
                continue
            if role == "tool" or message.get("tool_calls"):
                self._check_tools(index, role)
                turns.append(dict(message))
                continue

            if role == "user" and pending_system:
                parts = [{"type": "text", "text": "\n\n".join(pending_system) + "\n\n"}, *parts]
                pending_system = []
            _append_turn(turns, role, parts)

        if pending_system:
            _append_turn(turns, "user", [{"type": "text", "text": "\n\n".join(pending_system)}])
        return turns

    def _parts(self, message: dict[str, Any], index: int) -> list[dict[str, Any]]:
        content = message.get("content")
        where = f"messages[{index}].content"
        if content is None:
            if message.get("tool_calls") or message.get("role") == "assistant":
                return []
            raise ChatError(f"{where} is missing; send a string or a list of parts", where)
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ChatError(
                f"{where} must be a string or a list of parts, got {type(content).__name__}", where
            )

        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in MEDIA_PARTS:
                parts.append({"type": MEDIA_PARTS[kind], "source": part, "where": f"{where}[{j}]"})
            else:
                raise ChatError(
                    f"{where}[{j}] has type={kind!r}; expected 'text', 'image_url' or "
                    "'input_audio' (a text part needs a string 'text')",
                    f"{where}[{j}]",
                )
        return parts

    def _check_tools(self, index: int, role: str) -> None:
        if self.has_tool_format:
            return
        what = "a tool message" if role == "tool" else "an assistant message with tool_calls"
        raise ChatError(
            f"messages[{index}] is {what}, but this model's chat template has no tool format. "
            "Send tool results as text in a user message instead.",
            f"messages[{index}]",
        )

    # -- turns -> tokens ------------------------------------------------------------------------

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> Rendered:
        turns = self.normalize(messages)
        text = self._template(turns, add_generation_prompt)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        media = [p for turn in turns for p in _turn_parts(turn) if p["type"] != "text"]
        return Rendered(token_ids=self._one_bos(ids), text=text, media=media)

    def render_for_training(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation and a mask that is 1 on assistant tokens only.

        Each assistant turn is found by rendering the conversation up to it with a generation
        prompt: what the full rendering adds after that prefix is the turn's own tokens
        (its text and `<end_of_turn>`), which is exactly what the model must learn to produce.
        """
        turns = self.normalize(messages)
        ids = self._one_bos(
            self.tokenizer(self._template(turns, False), add_special_tokens=False).input_ids
        )
        mask = [0] * len(ids)
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            prefix = self._template(turns[:i], True) if i else None
            start = len(self._one_bos(self.tokenizer(prefix, add_special_tokens=False).input_ids))
            upto = self._one_bos(
                self.tokenizer(
                    self._template(turns[: i + 1], False), add_special_tokens=False
                ).input_ids
            )
            # The template ends a turn with "<end_of_turn>\n"; the newline is not generated.
            end = len(upto) - 1 if upto and upto[-1] not in self.stop_token_ids else len(upto)
            for k in range(start, min(end, len(mask))):
                mask[k] = 1
        return ids, mask

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """A raw completion prompt: text is tokenized with one BOS; token ids get one if missing."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        else:
            ids = list(prompt)
        return self._one_bos(ids)

    def _template(self, turns: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        for_template = [_for_template(turn) for turn in turns]
        return self.tokenizer.apply_chat_template(
            for_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _one_bos(self, ids: list[int]) -> list[int]:
        if self.bos_id is None:
            return ids
        start = 0
        while start < len(ids) and ids[start] == self.bos_id:
            start += 1
        return [self.bos_id, *ids[start:]]


def _append_turn(turns: list[dict[str, Any]], role: str, parts: list[dict[str, Any]]) -> None:
    if turns and turns[-1]["role"] == role and "tool_calls" not in turns[-1]:
        turns[-1]["content"] = [*turns[-1]["content"], {"type": "text", "text": "\n\n"}, *parts]
        return
    turns.append({"role": role, "content": parts})


def _turn_parts(turn: dict[str, Any]) -> list[dict[str, Any]]:
    content = turn.get("content")
    return content if isinstance(content, list) else []


def _for_template(turn: dict[str, Any]) -> dict[str, Any]:
    """Join adjacent text parts (newline between separate parts) so a string and a one-part list
    render identically; media parts become the bare markers chat templates understand."""
    if turn["role"] not in ("user", "assistant") or "tool_calls" in turn:
        return turn
    parts: list[dict[str, Any]] = []
    for part in turn["content"]:
        if part["type"] != "text":
            parts.append({"type": part["type"]})
        elif parts and parts[-1]["type"] == "text":
            glue = "" if part["text"] == "\n\n" or parts[-1]["text"].endswith("\n\n") else "\n"
            parts[-1] = {"type": "text", "text": parts[-1]["text"] + glue + part["text"]}
        else:
            parts.append(dict(part))
    if all(p["type"] == "text" for p in parts):
        return {"role": turn["role"], "content": "".join(p["text"] for p in parts)}
    return {"role": turn["role"], "content": parts}


def _end_ids(tokenizer, generation_config_path: Path | None) -> list[int]:
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.append(end_of_turn)
    if generation_config_path and generation_config_path.exists():
        configured = json.loads(generation_config_path.read_text()).get("eos_token_id")
        ids.extend(configured if isinstance(configured, list) else [configured] * bool(configured))
    return sorted(set(ids))
