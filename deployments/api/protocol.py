"""OpenAI wire models: the requests we accept and the responses and chunks we send.

Requests validate every field the engine will see (ranges, types, combinations) so that a bad
request is a 400 naming the field, never an engine error. Unknown fields are ignored, as vLLM's
OpenAI server does; known OpenAI and vLLM fields we do not support are rejected when set, never
silently dropped. Combinations are checked by field validators of the later field (pydantic hands
them the earlier ones), so the error's `param` names the field to change. A null for a field
OpenAI marks nullable means its default. The configurable bounds (RequestLimits) come in as the
validation context: `Model.model_validate(data, context=limits)`.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticUseDefault

from deployments.config import RequestLimits
from deployments.engines.base import FinishReason, SamplingParams

# Numbers are JSON numbers, as OpenAI takes them: `true` is not 1 and "0.7" is not 0.7 (pydantic's
# lax mode would convert both), and an integer field takes no `1.0`.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, strict=True)]
PositiveStrictInt = Annotated[StrictInt, Field(gt=0)]
NonNegativeStrictInt = Annotated[StrictInt, Field(ge=0)]
TokenId = NonNegativeStrictInt


def _use_default_for_null(value: Any) -> Any:
    if value is None:
        raise PydanticUseDefault()
    return value


# For a field OpenAI's spec marks nullable but that has a non-null default: null means the default
# (vLLM types these `X | None` too), while any other value is still checked strictly.
NullIsDefault = BeforeValidator(_use_default_for_null)


# vLLM samples greedily below this temperature (vllm/sampling_params.py, _SAMPLING_EPS).
_GREEDY_BELOW = 1e-5


def _limits(info: ValidationInfo) -> RequestLimits:
    return info.context if isinstance(info.context, RequestLimits) else RequestLimits()


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(BaseModel):
    # Unknown options are ignored, as OpenAI's and vLLM's servers do: the SDK sends OpenAI's
    # include_obfuscation (padding against length side channels, which this server adds none of).
    model_config = ConfigDict(extra="ignore")

    include_usage: Annotated[StrictBool, NullIsDefault] = False
    # vLLM's: usage in every chunk. Not honoured, so refused when asked for.
    continuous_usage_stats: Annotated[StrictBool, NullIsDefault] = False

    @field_validator("continuous_usage_stats")
    @classmethod
    def _no_continuous_usage(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "continuous_usage_stats is not supported: usage comes in the last chunk"
            )
        return value


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]


# vLLM's request fields beyond OpenAI's that both endpoints know and this server does not honour
# (vllm/entrypoints/openai/{completion,chat_completion}/protocol.py), with their defaults: beam
# search, structured outputs (and the guided_* names they had before vLLM 0.10), output options
# the simulated engine cannot reproduce (special tokens in the text, bad_words, which vLLM
# tokenizes inside the engine), prompt truncation, extra logprobs, scheduling and transfer knobs.
_UNSUPPORTED_VLLM_FIELDS: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,),
    "length_penalty": (1.0,),  # beam search only
    "watermarking": (False,),
    "structured_outputs": (),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "bad_words": ([],),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "truncate_prompt_tokens": (),
    "truncation_side": (),
    "prompt_logprobs": (),
    "logprob_token_ids": (),
    "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,),
    "thinking_token_budget": (),
    "repetition_detection": (),
    "stream_interval": (),
    "priority": (0,),
    "cache_salt": (),  # the router salts the prefix cache per tenant
    "kv_transfer_params": (),
    "ec_transfer_params": (),
    "vllm_xargs": (),
}


def _same(value: Any, default: Any) -> bool:
    """JSON equality: `true` is not 1 (Python's == says it is), but 1 is 1.0."""
    return value == default and isinstance(value, bool) == isinstance(default, bool)


class _SamplingFields(_Request):
    """The sampling fields completions and chat share (OpenAI's, plus vLLM's common extras)."""

    model: str = Field(min_length=1)
    temperature: FiniteFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: FiniteFloat | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=-1, description="vLLM extension; 0 or -1: off.")
    n: Annotated[PositiveStrictInt, NullIsDefault] = 1
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    presence_penalty: FiniteFloat | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: FiniteFloat | None = Field(None, ge=-2.0, le=2.0)
    # vLLM's sampling extensions, with the ranges vLLM's SamplingParams._verify_args enforces
    # (vllm/sampling_params.py); min_tokens <= max_tokens is checked once max_tokens is known.
    min_p: FiniteFloat | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: FiniteFloat | None = Field(None, gt=0.0)
    min_tokens: NonNegativeStrictInt = 0
    include_stop_str_in_output: StrictBool = False
    allowed_token_ids: list[TokenId] | None = Field(None, min_length=1)
    ignore_eos: StrictBool = False
    stream: Annotated[StrictBool, NullIsDefault] = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None

    # Known request fields (OpenAI's and vLLM's) this server does not honour, each with the values
    # that ask for nothing besides null: its default. Any other value is a 400 naming the field, as
    # a field validator's would be; unknown fields stay ignored, as vLLM ignores them. Fields that
    # only label a request (metadata, store, service_tier, prompt_cache_key, safety_identifier,
    # vLLM's request_id and session_id) change no answer and are ignored like `user`.
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = _UNSUPPORTED_VLLM_FIELDS

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data  # pydantic's own error says what is wrong
        for name, value in data.items():
            allowed = cls.unsupported.get(name)
            if allowed is None or value is None or any(_same(value, a) for a in allowed):
                continue
            unset = " or ".join(["null", *(json.dumps(a) for a in allowed)])
            error = ValueError(f"{name} is not supported by this server (send {unset} or omit it)")
            raise ValidationError.from_exception_data(
                cls.__name__,
                [
                    InitErrorDetails(
                        type="value_error", loc=(name,), input=value, ctx={"error": error}
                    )
                ],
            )
        return data

    @field_validator("n")
    @classmethod
    def _n_bound(cls, n: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_n
        if n > limit:
            raise ValueError(f"at most {limit} choices per request")
        temperature = info.data.get("temperature")
        if n > 1 and temperature is not None and temperature < _GREEDY_BELOW:
            # vLLM refuses it (SamplingParams._verify_greedy_sampling), which reached the
            # client as a 500 from the vLLM engine only: every choice would be the same.
            raise ValueError("n must be 1 with greedy sampling (temperature 0)")
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

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, response_format: ResponseFormat | None) -> ResponseFormat | None:
        if response_format is not None and response_format.type != "text":
            raise ValueError(f"response_format {response_format.type!r} is not supported")
        return response_format

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
            seed=None if self.seed == -1 else self.seed,  # vLLM's "no seed", for both engines
            stop=self.stop_list(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            min_tokens=self.min_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            allowed_token_ids=None
            if self.allowed_token_ids is None
            else tuple(self.allowed_token_ids),
            logprobs=logprobs,
            n=self.n,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_SamplingFields):
    unsupported = {
        **_UNSUPPORTED_VLLM_FIELDS,
        "prompt_embeds": (),
        "add_special_tokens": (True,),  # the prompt gets BOS, as vLLM's default does
    }

    # One prompt: text or token ids. (A batch of prompts in one request is not supported.)
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    max_tokens: PositiveStrictInt | None = 16  # OpenAI's default for completions.
    logprobs: NonNegativeStrictInt | None = None
    echo: Annotated[StrictBool, NullIsDefault] = False
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
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


def _text_parts_only(content: Any) -> Any:
    """A part of another type (image_url, input_audio, file) gets an error that says so, not the
    string branch's "Input should be a valid string"."""
    if isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise ValueError(f"content parts of type {kind!r} are not supported: text only")
    return content


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
    _text_only = field_validator("content", mode="before")(_text_parts_only)


class ChatCompletionRequest(_SamplingFields):
    unsupported = {
        **_UNSUPPORTED_VLLM_FIELDS,
        # OpenAI's: other output modalities, predicted outputs, reasoning and search options
        "modalities": (["text"],),
        "audio": (),
        "prediction": (),
        "reasoning_effort": (),
        "verbosity": (),
        "web_search_options": (),
        # vLLM's chat template and rendering options (the router renders with the template as
        # is: deployments/api/chat.py)
        "echo": (False,),
        "add_generation_prompt": (True,),
        "continue_final_message": (False,),
        "add_special_tokens": (False,),
        "documents": (),
        "chat_template": (),
        "chat_template_kwargs": (),
        "media_io_kwargs": (),
        "mm_processor_kwargs": (),
        "return_prompt_text": (False,),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: PositiveStrictInt | None = None
    max_completion_tokens: PositiveStrictInt | None = None
    logprobs: Annotated[StrictBool, NullIsDefault] = False
    top_logprobs: NonNegativeStrictInt | None = None
    # Tool calling, and its deprecated functions form: refused unless they ask for no tool use.
    # tool_choice comes before tools, whose validator reads it.
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
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

    _no_tools = field_validator("tool_choice", "parallel_tool_calls", "functions", "function_call")(
        _no_tool_use
    )

    @field_validator("tools")
    @classmethod
    def _tools_unused(
        cls, tools: list[dict[str, Any]] | None, info: ValidationInfo
    ) -> list[dict[str, Any]] | None:
        # tool_choice "none" asks for a text answer whatever the tools, and OpenAI and vLLM give
        # one. This server does not call tools, so it does not render them into the prompt
        # either: vLLM's prompt with --exclude-tools-when-tool-choice-none. Without "none" the
        # default is "auto", which is refused.
        if info.data.get("tool_choice") == "none":
            return tools
        return _no_tool_use(tools, info)

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
