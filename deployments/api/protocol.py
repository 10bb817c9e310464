"""OpenAI wire models: the requests we accept and the responses and chunks we send.

Requests validate every field the engine will see (ranges, types, combinations) so that a bad
request is a 400 naming the field, never an engine error. Unknown fields are ignored, as vLLM's
OpenAI server does; known OpenAI fields we do not support are rejected when set, never silently
dropped. Combinations are checked by field validators of the later field (pydantic hands them the
earlier ones), so the error's `param` names the field to change. The configurable bounds
(RequestLimits) come in as the validation context: `Model.model_validate(data, context=limits)`.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from deployments.config import RequestLimits
from deployments.engines.base import FinishReason, SamplingParams

# Numbers are JSON numbers, as OpenAI takes them: `true` is not 1 and "0.7" is not 0.7 (pydantic's
# lax mode would convert both), and an integer field takes no `1.0`.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, strict=True)]
PositiveStrictInt = Annotated[StrictInt, Field(gt=0)]
NonNegativeStrictInt = Annotated[StrictInt, Field(ge=0)]
TokenId = NonNegativeStrictInt


def _limits(info: ValidationInfo) -> RequestLimits:
    return info.context if isinstance(info.context, RequestLimits) else RequestLimits()


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class _SamplingFields(_Request):
    """The sampling fields completions and chat share (OpenAI's, plus vLLM's common extras)."""

    model: str = Field(min_length=1)
    temperature: FiniteFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: FiniteFloat | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1, description="vLLM extension; 0 or -1: off.")
    n: PositiveStrictInt = 1
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: FiniteFloat | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: FiniteFloat | None = Field(None, ge=-2.0, le=2.0)
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    logit_bias: dict[str, float] | None = None

    @field_validator("n")
    @classmethod
    def _n_bound(cls, n: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_n
        if n > limit:
            raise ValueError(f"at most {limit} choices per request")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(
        cls, stop: str | list[str] | None, info: ValidationInfo
    ) -> str | list[str] | None:
        limits = _limits(info)
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > limits.max_stop_sequences:
            raise ValueError(f"at most {limits.max_stop_sequences} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > limits.max_stop_chars for s in stops):
            raise ValueError(f"a stop sequence has at most {limits.max_stop_chars} characters")
        return stop

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids_bound(cls, ids: list[int] | None, info: ValidationInfo) -> list[int] | None:
        limit = _limits(info).max_stop_sequences
        if ids is not None and len(ids) > limit:
            raise ValueError(f"at most {limit} stop token ids")
        return ids

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(
        cls, options: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return options

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias:
            raise ValueError("logit_bias is not supported")
        return bias

    @property
    def include_usage_chunk(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=self.stop_list(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=logprobs,
            n=self.n,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_SamplingFields):
    # One prompt: text or token ids. (A batch of prompts in one request is not supported.)
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    max_tokens: PositiveStrictInt | None = 16  # OpenAI's default for completions.
    logprobs: NonNegativeStrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None
    best_of: PositiveStrictInt | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("exactly one prompt per request is supported")
            prompt = prompt[0]
        if len(prompt) == 0:
            raise ValueError("prompt must not be empty")
        return prompt

    @field_validator("logprobs")
    @classmethod
    def _logprobs_bound(cls, logprobs: int | None, info: ValidationInfo) -> int | None:
        return _check_logprobs(logprobs, info)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix is not supported")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        if best_of is not None and best_of != info.data.get("n"):
            raise ValueError("best_of other than n is not supported")
        return best_of


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


# What clients send for a tool-calling field they leave unset, or to ask for no tool use: null,
# an empty list, or "none" (tool_choice, function_call). Anything else asks for tool calls.
_NO_TOOL_USE: tuple[Any, ...] = (None, [], "none")


def _no_tool_use(value: Any, info: ValidationInfo) -> Any:
    if value not in _NO_TOOL_USE:
        raise ValueError(f"{info.field_name} is not supported: this server does not call tools")
    return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=64)
    # An assistant turn's calls (from another server): dropping them would misstate the turn.
    tool_calls: list[dict[str, Any]] | None = None

    _no_tool_calls = field_validator("tool_calls")(_no_tool_use)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: PositiveStrictInt | None = None
    max_completion_tokens: PositiveStrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: NonNegativeStrictInt | None = None
    response_format: ResponseFormat | None = None
    # Tool calling, and its deprecated functions form: refused unless they ask for no tool use.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _messages_bound(
        cls, messages: list[ChatMessage], info: ValidationInfo
    ) -> list[ChatMessage]:
        limit = _limits(info).max_messages
        if len(messages) > limit:
            raise ValueError(f"at most {limit} messages")
        return messages

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return _check_logprobs(top, info)

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, response_format: ResponseFormat | None) -> ResponseFormat | None:
        if response_format is not None and response_format.type != "text":
            raise ValueError(f"response_format {response_format.type!r} is not supported")
        return response_format

    _no_tools = field_validator(
        "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call"
    )(_no_tool_use)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The field requested_max_tokens comes from, for errors about it."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def _check_logprobs(logprobs: int | None, info: ValidationInfo) -> int | None:
    limit = _limits(info).max_logprobs
    if logprobs is not None and logprobs > limit:
        raise ValueError(f"at most {limit} log-probabilities per token")
    return logprobs


# ---- responses ----------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


def make_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "inference-cluster"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
