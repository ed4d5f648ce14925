"""Start-up: load tokenizer, backbone and library, size the KV cache, build scheduler and runner."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.engine.config import EngineConfig
from server.engine.kv_pool import BlockPool
from server.engine.module_pool import ModulePool
from server.engine.runner import ModelRunner, RunnerConfig
from server.engine.scheduler import Scheduler, SchedulerConfig
from server.engine.transfer import host_tensor
from server.model.backbone import Backbone
from server.model.loader import BackboneConfig, load_backbone, resolve_model_dir

logger = logging.getLogger(__name__)

RUNTIME_MIN_RANK = 16
"""Smallest pool rank with runtime modules on (vLLM's default --max-lora-rank), unless max_rank says otherwise."""


@dataclass
class EngineParts:
    tokenizer: object
    library: object | None
    model: Backbone
    scheduler: Scheduler
    runner: ModelRunner
    max_model_len: int
    sampling_defaults: dict = field(default_factory=dict)
    """`sampling_defaults` of the model: what a request's omitted sampling fields become."""


SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")
"""The generation_config.json fields that become request defaults (vLLM reads the same)."""


def sampling_defaults(source: str, model_dir: str) -> dict:
    """The sampling defaults `EngineConfig.generation_config` names: from `model_dir` (auto) or another directory's
    generation_config.json, only the fields its authors set; {} for vllm or where there is no such file."""
    if source == "vllm":
        return {}
    directory = model_dir if source == "auto" else str(Path(source).expanduser())
    if source != "auto" and not (Path(directory) / "generation_config.json").is_file():
        raise ValueError(f"generation_config must be auto, vllm or a directory with a generation_config.json, "
                         f"got {source!r}")
    from transformers import GenerationConfig

    try:
        given = GenerationConfig.from_pretrained(directory).to_diff_dict()
    except OSError:  # no generation_config.json: OpenAI's defaults
        return {}
    defaults = {name: given[name] for name in SAMPLING_DEFAULT_FIELDS if given.get(name) is not None}
    if defaults.get("top_k") == 0:  # transformers' "off"
        defaults["top_k"] = -1
    bad = {name: value for name, value in defaults.items() if not _in_range(name, value)}
    if bad:
        raise ValueError(f"{directory}/generation_config.json has sampling defaults out of range: {bad}")
    return defaults


def _chat_template(given: str) -> str:
    """The template `--chat-template` names: a file's text, or the argument itself when it is a template."""
    path = Path(given).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in given or "{%" in given:
        return given
    raise ValueError(f"chat_template {given!r} is neither a file nor a Jinja template")


def _in_range(name: str, value) -> bool:
    return {"temperature": lambda v: 0.0 <= v <= 2.0, "top_p": lambda v: 0.0 < v <= 1.0,
            "top_k": lambda v: v == -1 or v >= 1, "min_p": lambda v: 0.0 <= v <= 1.0,
            "repetition_penalty": lambda v: 0.0 < v <= 10.0, "max_new_tokens": lambda v: v >= 1}[name](value)


def _load_library(config: EngineConfig, model_dir: str):
    """The library config names, with config.lora_modules added as standalone modules; None for neither."""
    if config.library is None and not config.lora_modules:
        return None
    from transformers import AutoConfig

    from router.errors import LibraryError
    from router.info import check_name
    from router.library import ModuleLibrary, fingerprint_from_hf_config, with_standalone_module
    from router.peft_io import import_peft

    expect = fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir))
    library = ModuleLibrary.load(config.library, expect=expect) if config.library is not None else None
    served = config.served_name()
    if library is not None and (served in library.tasks or served in library.modules):
        raise ValueError(f"the backbone's served name {served!r} is also a task or module of the library; "
                         "choose another --served-model-name")
    for spec in config.lora_modules:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules {spec!r}: give NAME=PATH (a PEFT LoRA directory)")
        if library is not None and name in library.tasks:  # a module of that name: with_module refuses it
            raise ValueError(f"--lora-modules {spec!r}: {name!r} already names a task of the library")
        if name in (config.served_name(), "auto"):  # requests could not address the module by it
            raise ValueError(f"--lora-modules {spec!r}: {name!r} already names the backbone or text routing (auto)")
        try:
            info, weights = import_peft(path, expect, check_name("module", name), f"PEFT adapter {path}")
            library = with_standalone_module(library, expect, info, weights)
        except LibraryError as error:  # not the library's fault: name the flag instead
            raise ValueError(f"--lora-modules {spec!r}: {error}") from None
    return library


def bind_device(device: str | torch.device) -> None:
    """Make a CUDA `device` the calling thread's current one (CUDA keeps it per thread): the streams and
    graphs the runner creates and the streams Triton launches on follow it, so cuda:1 works like cuda:0."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def _num_kv_blocks(config: EngineConfig, model: Backbone, device: str, kv_dtype: torch.dtype) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = model.kv_cache_bytes_per_block(config.block_size, kv_dtype)
    if torch.device(device).type == "cuda":
        free, total = torch.cuda.mem_get_info(torch.device(device))  # that device, not the current one
        used = total - free
        budget = total * config.gpu_memory_utilization - used - (1 << 30)  # 1 GiB for activations
    else:
        budget = config.kv_cache_memory_gb * (1 << 30)
    return max(int(budget // per_block), 1)


def _eos_ids(tokenizer, model_dir: str) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        eos = None
    ids |= set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
    return ids


def build_parts(config: EngineConfig) -> EngineParts:
    """Everything the engine runs with; validation errors surface here, before anything serves."""
    from transformers import AutoTokenizer

    device = config.resolved_device()
    config.graph_mode(device)  # bad values fail here, before the weights load
    config.kv_dtype(device, None)
    config.batch_limits(device)
    config.speculative()
    config.async_scheduling_on(device)
    config.check_block_size(device)
    config.check_stream_interval()
    model_dir = str(resolve_model_dir(config.model))
    library = _load_library(config, model_dir)
    largest = max((m.rank for m in library.modules.values()), default=8) if library else 8
    if config.lora_resolver_dir is not None and not Path(config.lora_resolver_dir).expanduser().is_dir():
        raise ValueError(f"lora_resolver_dir {config.lora_resolver_dir!r} is not a directory")
    if config.modules_added_while_serving():
        largest = max(largest, RUNTIME_MIN_RANK)
        num_slots = config.max_loaded_modules
    else:
        num_slots = min(config.max_loaded_modules, len(library.modules)) if library else 0
    max_rank = config.max_rank or largest
    defaults = sampling_defaults(config.generation_config, model_dir)
    if defaults:
        logger.info("sampling defaults for fields a request leaves out (%s generation_config.json; "
                    "--generation-config vllm turns them off): %s", config.generation_config, defaults)
    model = load_backbone(model_dir, BackboneConfig(config.dtype, device, num_slots, max_rank))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if config.chat_template is not None:
        tokenizer.chat_template = _chat_template(config.chat_template)
    parts = assemble_parts(config, model, tokenizer, library, _eos_ids(tokenizer, model_dir))
    parts.sampling_defaults = defaults
    return parts


def check_library_fits(library, model: Backbone) -> None:
    """ValueError unless `library` matches the backbone and its modules fit the module pool."""
    from router.library import fingerprint_from_hf_config

    library.backbone.check_compatible(fingerprint_from_hf_config(model.hf_config))
    if library.modules and model.max_slots == 0:
        raise ValueError(f"the library has {len(library.modules)} modules but the backbone has no module pool slots")
    too_big = [m.name for m in library.modules.values() if m.rank > model.max_rank]
    if too_big:
        raise ValueError(f"modules {too_big[:5]} have ranks above the module pool's max_rank {model.max_rank}")


def assemble_parts(config: EngineConfig, model: Backbone, tokenizer, library, eos_ids: set[int]) -> EngineParts:
    """KV cache, scheduler and runner around a backbone that is already built (from disk, or in memory).

    The module pool has the backbone's `max_slots` slots; `config`'s model, library, dtype, device,
    max_loaded_modules and max_rank are not read here (they chose how the backbone was built).
    """
    bind_device(model.device)
    graph_mode = config.graph_mode(str(model.device))
    config.async_scheduling_on(str(model.device))
    config.check_block_size(str(model.device))
    if library is not None:
        check_library_fits(library, model)
    kv_dtype = config.kv_dtype(str(model.device), model.dtype)
    max_num_seqs, max_num_batched_tokens = config.batch_limits(str(model.device))
    num_blocks = _num_kv_blocks(config, model, str(model.device), kv_dtype)
    max_model_len = min(config.max_model_len or model.max_position_embeddings, num_blocks * config.block_size)
    max_blocks_per_seq = -(-max_model_len // config.block_size)
    speculative = config.speculative()
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, config.scheduling_policy,
                        config.module_wait_steps),
        BlockPool(num_blocks, config.block_size, caching=config.enable_prefix_caching),
        ModulePool(model.max_slots),
        eos_ids,
        speculative,
    )
    runner_config = RunnerConfig(
        max_num_batched_tokens, max_num_seqs, max_blocks_per_seq, config.max_k, num_blocks,
        config.block_size, max_model_len, graph_mode, config.cuda_graph_max_batch, 1 + speculative.max_drafts,
        kv_dtype,
    )
    runner = ModelRunner(model, runner_config, module_loader(library, model.dtype, model.device,
                                                             config.max_cpu_modules), eos_ids)
    logger.info(
        "KV cache: %d blocks of %d tokens in %s; max_model_len %d; module slots %d",
        num_blocks, config.block_size, str(kv_dtype).removeprefix("torch."), max_model_len, model.max_slots,
    )
    return EngineParts(tokenizer, library, model, scheduler, runner, max_model_len)


def module_loader(library, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  capacity: int | None = None):
    """`load(module_id) -> (weights, scale)` over `library`: the module's weights in the pool's `dtype`, on CUDA in
    pinned host memory, so that writing them into a pool slot is a queued copy (`Backbone.write_module`) that
    neither waits for the step in flight nor makes the host wait (S-LoRA and vLLM keep their host copies of
    adapters pinned too). The `capacity` most recently loaded modules keep their copies (None: every module);
    another is converted again from the library's fp32 weights when it is next loaded."""
    if capacity is not None and capacity < 1:
        raise ValueError(f"max_cpu_modules must be at least 1, got {capacity}")
    cache: OrderedDict[str, tuple] = OrderedDict()

    def load(module_id: str):
        entry = cache.get(module_id)
        if entry is not None:
            cache.move_to_end(module_id)
            return entry
        weights = {point: (host_tensor(a.to(dtype), device), host_tensor(b.to(dtype), device))
                   for point, (a, b) in library.module_weights(module_id).items()}
        entry = cache[module_id] = (weights, library.modules[module_id].scale)
        if capacity is not None and len(cache) > capacity:
            cache.popitem(last=False)
        return entry

    return load
