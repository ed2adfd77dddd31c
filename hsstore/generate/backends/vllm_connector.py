"""A vLLM KV connector that hands the hidden states captured by `extract_hidden_states` to hsstore.

vLLM's `extract_hidden_states` speculative method writes each token's captured states into the KV
cache of a cache-only "draft" layer, shaped [blocks, layers, block_size, H]. A KV connector reads them
out when a request finishes. vLLM's example connector writes safetensors files with CUDA streams and
pinned memory; this one copies the request's rows to CPU right away (plain indexing, so it works on
CPU and GPU alike) and delivers them to the hsstore backend:

- in memory (`_INBOX`, keyed by the request's hsstore key) when the worker runs in the backend's
  process: engine core in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and the uniproc executor;
- as `<key>.safetensors` in a hand-off directory (kv_connector_extra_config["handoff_dir"]) when it
  does not (multiprocessing engine core, tensor parallel workers). Files are renamed into place when
  complete; the backend reads each one and deletes it at once.

With tensor parallelism every rank holds the full states (the residual stream is replicated), so only
TP rank 0 delivers; all ranks report the request done so its blocks are freed.

Flow: the scheduler side records (key, token count, block ids) in `request_finished` and delays freeing
the blocks; the next step's connector metadata carries them to the workers, whose `get_finished`
extracts, delivers and reports the request finished sending.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

KEY_PARAM = "hsstore_key"  # field of a request's kv_transfer_params naming where its states go
HANDOFF_DIR = "handoff_dir"  # kv_connector_extra_config entry; absent or None means in memory
_INBOX: dict[str, torch.Tensor] = {}  # in-process deliveries: key -> [n, L, H] on CPU


def deliver(key: str, states: torch.Tensor, handoff_dir: str | None) -> None:
    """Hand one request's [n, L, H] CPU states to the backend: into the inbox, or a file renamed into place."""
    if handoff_dir is None:
        _INBOX[key] = states
        return
    path = os.path.join(handoff_dir, f"{key}.safetensors")
    save_file({"hidden_states": states.contiguous()}, path + ".part")
    os.replace(path + ".part", path)  # the backend never sees a partial file


def take(key: str, handoff_dir: str | None) -> torch.Tensor | None:
    """The states delivered for `key`, removed from the inbox or the hand-off directory; None if not yet."""
    if handoff_dir is None:
        return _INBOX.pop(key, None)
    path = os.path.join(handoff_dir, f"{key}.safetensors")
    if not os.path.exists(path):
        return None
    states = load_file(path)["hidden_states"]
    os.remove(path)
    return states


def discard(keys: list[str], handoff_dir: str | None) -> None:
    """Drop deliveries nobody will take (a failed batch), so nothing lingers."""
    for key in keys:
        take(key, handoff_dir)


@dataclass
class _PendingSave:
    req_id: str  # vLLM's internal request id, reported back as finished sending
    key: str
    num_tokens: int
    block_ids: list[int]


@dataclass
class HSStoreConnectorMetadata(KVConnectorMetadata):
    pending: list[_PendingSave] = field(default_factory=list)


class HSStoreHiddenStatesConnector(KVConnectorBase_V1, SupportsHMA):
    """Store-only connector: delivers each finished request's captured states, never loads."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if vllm_config.speculative_config is None or vllm_config.speculative_config.method != "extract_hidden_states":
            raise ValueError("HSStoreHiddenStatesConnector needs speculative_config method 'extract_hidden_states'")
        self._group_id = _hidden_state_group(kv_cache_config)
        self._block_size = (
            kv_cache_config.kv_cache_groups[self._group_id].kv_cache_spec.block_size
            if kv_cache_config is not None
            else vllm_config.cache_config.block_size
        )
        self._handoff_dir: str | None = self._kv_transfer_config.get_from_extra_config(HANDOFF_DIR, None)
        self._pending: list[_PendingSave] = []  # scheduler side, until the next metadata
        self._kv_cache: torch.Tensor | None = None  # worker side, set by register_kv_caches
        self._delivers = True  # False on TP ranks other than 0

    # ---- worker side ----

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.config import get_layers_from_vllm_config
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        from vllm.model_executor.models.extract_hidden_states import CacheOnlyAttentionLayer

        self._delivers = get_tensor_model_parallel_rank() == 0
        layers = list(get_layers_from_vllm_config(self._vllm_config, CacheOnlyAttentionLayer, list(kv_caches)))
        if len(layers) != 1:
            raise ValueError(f"expected one extract_hidden_states cache layer, found {layers}")
        self._kv_cache = kv_caches[layers[0]]
        if self._kv_cache.shape[2] != self._block_size:  # rows would be read from the wrong slots
            raise ValueError(f"hidden-state cache block size {self._kv_cache.shape[2]} != {self._block_size}")

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        pass  # the cache-only layer already wrote the states; they are read once the request finishes

    def wait_for_save(self) -> None:
        pass

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Deliver the requests handed over in this step's metadata and report them finished sending.

        The scheduler fills the metadata (request_finished) and `finished_req_ids` from the same finishing
        request in the same step, so every id reported here is also in `finished_req_ids`, as vLLM requires.
        """
        done: set[str] = set()
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        for pending in meta.pending if isinstance(meta, HSStoreConnectorMetadata) else ():
            if self._delivers:
                deliver(pending.key, self._extract(pending), self._handoff_dir)
            done.add(pending.req_id)
        return done or None, None

    def _extract(self, pending: _PendingSave) -> torch.Tensor:
        """The request's [n, L, H] rows, copied to CPU (indexing copies, so the blocks can be freed after)."""
        assert self._kv_cache is not None
        pos = torch.arange(pending.num_tokens)
        blocks = torch.as_tensor(pending.block_ids, dtype=torch.long)[pos // self._block_size]
        device = self._kv_cache.device
        return self._kv_cache[blocks.to(device), :, (pos % self._block_size).to(device)].to("cpu")

    # ---- scheduler side ----

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        pass

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = HSStoreConnectorMetadata(self._pending)
        self._pending = []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Keep the blocks of a fully prefilled hsstore request until a worker has read its states."""
        key = (request.kv_transfer_params or {}).get(KEY_PARAM)
        num_tokens = request.num_prompt_tokens
        if key is None or not block_ids or request.num_computed_tokens < num_tokens:
            return False, None  # not ours, never scheduled, or aborted mid-prompt: nothing to deliver
        self._pending.append(_PendingSave(request.request_id, key, num_tokens, list(block_ids)))
        return True, None

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        if self._group_id >= len(block_ids):
            return False, None
        return self.request_finished(request, block_ids[self._group_id])


def _hidden_state_group(kv_cache_config: KVCacheConfig | None) -> int:
    """Index of the KV cache group holding the cache-only hidden-state layer."""
    from vllm.v1.kv_cache_interface import HiddenStateCacheSpec

    if kv_cache_config is None:
        return 0
    groups = kv_cache_config.kv_cache_groups
    ids = [i for i, g in enumerate(groups) if isinstance(g.kv_cache_spec, HiddenStateCacheSpec)]
    if len(ids) == 1:
        return ids[0]
    if not ids and len(groups) == 1:
        return 0
    raise ValueError(f"cannot find the extract_hidden_states cache group among {len(groups)} groups")
