"""The engine's one frozen config. The CLI builds its flags from these fields, in one place."""

from __future__ import annotations

from dataclasses import dataclass


LARGE_GPU_BYTES = 70 << 30
"""GPUs with at least this much memory get vLLM's larger batch defaults (EngineConfig.batch_limits)."""


@dataclass(frozen=True)
class EngineConfig:
    """How the engine loads the backbone and the library and how it batches."""

    model: str
    """Hugging Face model directory (config.json, safetensors, tokenizer), or a Hub id (org/name)."""
    served_model_name: str | None = None
    """The backbone's name in the API (requests' `model`, /v1/models), as vLLM's --served-model-name; None:
    the model directory's name, or the Hub id."""
    library: str | None = None
    """Module library directory; none serves the backbone alone."""
    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    max_num_seqs: int | None = None
    """Requests running at once at most; default as vLLM's: 1024 on a GPU of 70 GiB or more (A100-80GB, H100,
    H200, B200), 256 on a smaller one, and 64 on the CPU."""
    scheduling_policy: str = "fcfs"
    """fcfs (first come, first served) or priority: requests' `priority` (lower first, then arrival) orders
    admission, and the lowest ranked running request is preempted first (vLLM's --scheduling-policy)."""
    module_wait_steps: int = 32
    """Steps a request waiting for module pool slots lets later requests (whose modules can be resident) be
    admitted before it; then it holds the line until slots free (0: strict arrival order)."""
    max_num_batched_tokens: int | None = None
    """Tokens per step at most (the token budget); longer prompts are prefilled in chunks. Default as vLLM's
    OpenAI server: 8192 on a GPU of 70 GiB or more, 2048 on a smaller one, and 512 on the CPU."""
    max_model_len: int | None = None
    """Prompt plus output tokens at most; default: the backbone's max_position_embeddings."""
    kv_cache_memory_gb: float = 0.5
    """Memory for the KV cache on the CPU, in GiB."""
    kv_cache_dtype: str = "auto"
    """auto (the model's dtype) or fp8 (float8 e4m3, as vLLM's --kv-cache-dtype fp8 without scales): a cached token
    takes half the bytes of bf16, so the same memory holds twice the context, at the cost of keys and values rounded
    to 3 mantissa bits (and saturated at +-448). Queries are not quantized: attention reads the cached values back in
    the model's dtype. On CUDA it needs compute capability 8.9 or newer (Ada, Hopper, Blackwell)."""
    gpu_memory_utilization: float = 0.85
    """On CUDA: share of the device memory the process may use (weights, pools, activations, KV)."""
    num_kv_blocks: int | None = None
    """Exact number of KV blocks, overriding the memory budgets (tests)."""
    enable_prefix_caching: bool = True
    """Reuse the KV of full blocks that an earlier request computed for the same tokens under the same
    composition (modules, gates and module weights): shared system prompts, few-shot examples and chat
    history are computed once. Outputs are the same either way."""
    max_loaded_modules: int = 16
    """Module pool slots: modules resident on the device at once."""
    max_cpu_modules: int | None = None
    """Modules whose host copy in the serving dtype (pinned, on CUDA) is kept ready for loading into a slot, least
    recently loaded dropped first, as vLLM's --max-cpu-loras; None: every module once loaded. A module without
    one is converted from the library's fp32 weights when it is loaded."""
    max_rank: int | None = None
    """Largest module rank the pool holds; default: the library's largest."""
    max_k: int = 4
    """Modules per request at most."""
    lora_modules: tuple[str, ...] = ()
    """PEFT LoRA directories served as modules next to the library, as vLLM's --lora-modules: NAME=PATH each.
    Requests name them (`"model": NAME`); no task's composition uses them."""
    runtime_modules: bool = False
    """Allow loading PEFT LoRA adapters as modules while serving (POST /v1/load_lora_adapter, as vLLM's
    VLLM_ALLOW_RUNTIME_LORA_UPDATING): the pool then has max_loaded_modules slots of rank max_rank (default
    at least 16) even when the library is smaller or absent. Off by default: it reads server-side paths."""
    lora_resolver_dir: str | None = None
    """A directory of PEFT LoRA adapters, one per subdirectory: a request naming an unknown model or module
    NAME (as `model`, or in `modules`) loads DIR/NAME as a module on first use and keeps it (vLLM's filesystem
    LoRA resolver; LoRAX's dynamic adapters). The module pool is then sized as with runtime_modules; the
    load and unload endpoints stay off unless runtime_modules is set too."""
    tool_call_parser: str | None = None
    """How the API reads tool calls out of free text for tool_choice auto, as vLLM's --tool-call-parser:
    hermes (`<tool_call>{...}</tool_call>`: Qwen2.5, Qwen3, Hermes), llama3_json (`{"name": ..., "parameters":
    {...}}`: Llama 3.x), mistral (`[TOOL_CALLS]...`), qwen3_coder (`<function=...>` XML: Qwen3-Coder) or pythonic
    (`[f(a=1)]`: Llama 3.2, Llama 4); see `server.api.tool_parsers`. None refuses auto with a 400; required
    and named tool choices need no parser."""
    tool_call_structural_tags: bool = True
    """With tool_choice auto and a tool_call_parser whose format has a tag (hermes, llama3_json, qwen3_coder:
    xgrammar's; mistral: v3's array or v11's NAME[ARGS], as the chat template writes calls, in
    `structured.mistral_tool_call_tag`), generate the reply under a structural tag (xgrammar's, the mechanism vLLM's
    and NVIDIA Dynamo's tool-call parsers use for this): the text stays free, and each call the model starts is held
    to the format and to its tool's parameters schema (one call unless parallel_tool_calls), so it always parses; a
    function whose `strict` is false keeps free arguments. With tool_choice none, a format with a call marker
    (hermes, qwen3_coder, mistral) keeps the marker out of the reply. With tool_choice required or a named function, the reply is nothing but calls in
    that format (`api.tools.call_tool_grammar`) rather than JSON. Off: auto's calls are read from free text as
    generated, and required and named calls are JSON."""
    reasoning_parser: str | None = None
    """Return a reasoning model's `<think>` block apart from its answer (the message's `reasoning` and
    `reasoning_content`), as vLLM's --reasoning-parser: qwen3 or deepseek_r1 (`server.api.reasoning`). Tool
    calls and structured outputs then apply to the answer. None: the whole reply is content."""
    chat_template: str | None = None
    """A Jinja chat template to use instead of the tokenizer's, as vLLM's --chat-template: a file's path, or
    the template itself. For models whose tokenizer has none, or a fixed one."""
    generation_config: str = "auto"
    """Sampling defaults for the fields a request leaves out, as vLLM's --generation-config: auto (the model's
    generation_config.json, where its authors put the settings they recommend: temperature, top_p, top_k,
    min_p, repetition_penalty, and max_new_tokens as a chat's default max_tokens), vllm (none: OpenAI's
    defaults), or a directory holding a generation_config.json."""
    responses_store_size: int = 1000
    """Responses API: how many responses are kept in memory (least recently used out first) for
    `previous_response_id` and GET/DELETE /v1/responses/{id}; 0 keeps none, and then a previous_response_id is
    a 400. Nothing is written to disk: a restart forgets them."""
    speculative_config: str | None = None
    """Speculative decoding, as vLLM's --speculative-config JSON: `{"method": "ngram", "num_speculative_tokens": 4,
    "prompt_lookup_max": 4, "prompt_lookup_min": 2}` runs up to 4 draft tokens a step, found by n-gram lookup in the
    request's own prompt and output, and keeps those the model would have drawn anyway (the output does not
    change). Tessera's `prediction_tokens` (default 16; 0 ignores them) sets how many tokens of a request's OpenAI
    `prediction` are drafted per step, and `grammar_tokens` (default 16; 0: none) how many of the tokens a
    structured output's grammar forces next; both work without this flag too. Every sampling parameter
    and structured outputs work with drafts. A step is not overlapped with the one before (async scheduling waits)
    when that one ran drafts or a request in it is likely to draft next (`Scheduler.needs_tokens`). Steps that run
    drafts replay verify graphs of 1 + the most drafts per sequence (the largest
    of the three counts) token rows a sequence, for batches whose rows fit 512 and max_num_batched_tokens, and run
    eagerly above that; `"disable_by_batch_size": N` stops drafting while more than N requests run."""
    seed: int = 0
    """Seed for requests that give none."""
    cuda_graphs: str = "auto"
    """Decode steps replayed from CUDA graphs per batch-size bucket: auto (on CUDA; off on the CPU), off, or
    padded (the same bucketed fixed-shape decode run eagerly, without capture: for debugging and CPU tests)."""
    cuda_graph_max_batch: int = 256
    """Largest decode batch served by a graph; larger decode steps run eagerly."""
    async_scheduling: str = "auto"
    """Plan and launch step N+1 before step N's tokens are read back, so the CPU work between steps overlaps
    the device's: auto (on CUDA; off on the CPU), on or off. Outputs are the same either way."""
    stream_interval: int = 1
    """Tokens a request gathers before its reader is woken, as vLLM's --stream-interval: 1 streams every token as it
    comes; N sends about one chunk per N tokens (the first token and the end at once), which cuts the HTTP
    server's work per token about N-fold where hundreds of streams share it. The text is the same. At any setting
    a reader that falls behind gets what gathered as one increment."""
    engine_process: bool = False
    """Run the engine in a process of its own (`server.engine.process`), as vLLM's EngineCore: the HTTP server's
    work per streamed token (SSE chunks, socket writes, asyncio) then no longer takes the interpreter lock from
    the step loop. Off: the engine's step loop is a thread of the server's process."""

    def speculative(self):
        """The parsed `speculative_config` (`speculative.SpeculativeConfig`); ValueError when it is bad."""
        from server.engine.speculative import SpeculativeConfig

        return SpeculativeConfig.from_json(self.speculative_config)

    def modules_added_while_serving(self) -> bool:
        """Whether modules can join the library after start-up (runtime_modules or a LoRA resolver)."""
        return self.runtime_modules is True or self.lora_resolver_dir is not None

    def served_name(self) -> str:
        """The backbone's model name in the API: served_model_name, else a local directory's name, or the Hub
        id as given."""
        from pathlib import Path

        if self.served_model_name is not None:
            if not self.served_model_name.strip() or self.served_model_name == "auto":
                raise ValueError(f"served_model_name must be a non-empty name other than auto, got "
                                 f"{self.served_model_name!r}")
            return self.served_model_name
        local = Path(self.model).expanduser()
        return local.name if local.is_dir() else self.model

    def graph_mode(self, device: str) -> str:
        """`capture`, `padded` or `off`: how decode steps run on `device`."""
        if self.cuda_graphs not in ("auto", "off", "padded"):
            raise ValueError(f"cuda_graphs must be auto, off or padded, got {self.cuda_graphs!r}")
        if self.cuda_graph_max_batch < 1 or self.cuda_graphs == "off":
            return "off"
        if self.cuda_graphs == "padded":
            return "padded"
        return "capture" if device.startswith("cuda") else "off"

    def async_scheduling_on(self, device: str) -> bool:
        """Whether steps on `device` are scheduled asynchronously (overlapped with the previous step)."""
        if self.async_scheduling not in ("auto", "on", "off"):
            raise ValueError(f"async_scheduling must be auto, on or off, got {self.async_scheduling!r}")
        if self.async_scheduling == "auto":
            return device.startswith("cuda")
        return self.async_scheduling == "on"

    def batch_limits(self, device: str) -> tuple[int, int]:
        """(max_num_seqs, max_num_batched_tokens) on `device`: the given values, else that device's defaults;
        ValueError for a value under 1."""
        import torch

        default = (64, 512)  # the CPU
        if device.startswith("cuda"):
            large = torch.cuda.get_device_properties(torch.device(device)).total_memory >= LARGE_GPU_BYTES
            default = (1024, 8192) if large else (256, 2048)
        seqs = self.max_num_seqs if self.max_num_seqs is not None else default[0]
        tokens = self.max_num_batched_tokens if self.max_num_batched_tokens is not None else default[1]
        for name, value in (("max_num_seqs", seqs), ("max_num_batched_tokens", tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        return seqs, tokens

    def kv_dtype(self, device: str, model_dtype):
        """The KV cache's torch dtype on `device` for a model of `model_dtype`; ValueError for a bad value or a GPU
        without float8."""
        import torch

        if self.kv_cache_dtype == "auto":
            return model_dtype
        if self.kv_cache_dtype not in ("fp8", "fp8_e4m3"):
            raise ValueError(f"kv_cache_dtype must be auto or fp8 (fp8_e4m3), got {self.kv_cache_dtype!r}")
        if device.startswith("cuda"):
            capability = torch.cuda.get_device_capability(torch.device(device))
            if capability < (8, 9):
                raise ValueError(f"kv_cache_dtype fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                                 f"{torch.cuda.get_device_name(torch.device(device))} has {capability[0]}."
                                 f"{capability[1]}: use kv_cache_dtype auto")
        return torch.float8_e4m3fn

    def check_stream_interval(self) -> None:
        value = self.stream_interval
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"stream_interval must be an integer >= 1, got {value!r}")

    def check_block_size(self, device: str) -> None:
        """Raise ValueError unless `block_size` suits `device`: any size >= 1 on the CPU; on CUDA a power of two
        >= 16, since the Triton attention kernels load one KV block as a tile (`tl.arange`) and multiply it
        with `tl.dot`, which needs 16 or more rows."""
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {size!r}")
        if device.startswith("cuda") and (size < 16 or size & (size - 1)):
            raise ValueError(f"block_size must be a power of two >= 16 on CUDA (16, 32, ...), got {size}")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
