"""The vLLM backend: vLLM's `extract_hidden_states` speculative method plus hsstore's own KV connector.

Layer ids: vLLM's decoder loops (Llama and the other EAGLE-3 capable models in vLLM >= 0.32) record
id 0 as the embeddings and id k+1 as `hidden_states + residual` after decoder layer k, so id k is the
input of layer k and id N the last layer's output before the final norm: the store's convention, with
no derivation needed. vLLM captures each id once and in ascending order whatever order it is given, so
the engine gets the sorted distinct ids and this backend reorders (and repeats) them per call.

The ids are fixed when the engine is built. The engine is built lazily, on the first call (or at once
when `layer_ids` is given), and serves any call whose ids it captures; a call that needs other ids
shuts it down and builds a new one (about half a minute for a tiny model on CPU).

Hand-off: with tensor_parallel_size=1 the backend runs vLLM's engine core in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0 unless set otherwise) and the connector delivers states in memory.
Otherwise (tensor parallel workers, or multiprocessing enabled explicitly) the workers write one file
per request into a private temporary directory, on /dev/shm when there is one, which the backend empties
as it reads and removes on close; all processes must share that filesystem (one host).
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...errors import HSStoreError
from . import TargetDims, vllm_connector
from .vllm_connector import KEY_PARAM


class VLLMBackend:
    def __init__(
        self,
        model: str,
        *,
        device: str = "cpu",
        dtype: str = "bfloat16",
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        layer_ids: Sequence[int] | None = None,
        timeout: float = 600.0,
        **engine_kwargs: Any,
    ) -> None:
        """`engine_kwargs` go to `vllm.LLM` (e.g. enforce_eager, max_num_batched_tokens, enable_prefix_caching)."""
        self.model = model
        self.dtype = getattr(torch, dtype)
        dims = TargetDims.of(model)
        self.num_layers, self.hidden_size, self.vocab_size = dims.num_layers, dims.hidden_size, dims.vocab_size
        self.timeout = timeout
        self._check_device(device)
        if tensor_parallel_size == 1:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._in_process = _engine_in_process(tensor_parallel_size, engine_kwargs)
        self._handoff_dir: str | None = None
        if not self._in_process:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self._handoff_dir = tempfile.mkdtemp(prefix="hsstore-vllm-", dir=shm)
            weakref.finalize(self, shutil.rmtree, self._handoff_dir, True)
        self._llm_kwargs = {
            "model": model,
            "dtype": dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "max_model_len": max_model_len,
            "skip_tokenizer_init": True,  # prompts arrive as token ids; outputs are never decoded
            "enable_prefix_caching": False,  # every prompt computes its own states (overridable)
            **engine_kwargs,
        }
        self._llm: Any = None
        self._engine_ids: list[int] = []
        if layer_ids is not None:
            self._ensure_engine(layer_ids)

    def hidden_states(self, batch: Sequence[np.ndarray], layer_ids: Sequence[int]) -> list[torch.Tensor]:
        from vllm import SamplingParams, TokensPrompt

        layer_ids = list(layer_ids)
        bad = [k for k in layer_ids if not 0 <= k <= self.num_layers]
        if bad or not layer_ids:
            raise HSStoreError(f"layer ids {layer_ids} out of range 0..{self.num_layers}")
        self._ensure_engine(layer_ids)
        limit = self._llm.model_config.max_model_len
        if longest := max((len(x) for x in batch if len(x) >= limit), default=0):
            raise HSStoreError(
                f"a {longest}-token sequence: vLLM needs fewer than max_model_len={limit} tokens "
                "(one slot goes to the sampled token); raise max_model_len or shorten the sequences"
            )
        columns = [self._engine_ids.index(k) for k in layer_ids]
        tag = uuid.uuid4().hex
        keys = [f"{tag}-{i}" for i in range(len(batch))]
        todo = [i for i, x in enumerate(batch) if len(x)]  # vLLM rejects empty prompts
        prompts = [TokensPrompt(prompt_token_ids=np.asarray(batch[i]).tolist()) for i in todo]
        params = [
            SamplingParams(max_tokens=1, detokenize=False, extra_args={"kv_transfer_params": {KEY_PARAM: keys[i]}})
            for i in todo
        ]
        try:
            self._llm.generate(prompts, params, use_tqdm=False)
            got = dict(zip(todo, self._collect([keys[i] for i in todo]), strict=True))
        finally:
            vllm_connector.discard(keys, self._handoff_dir)  # leftovers of a failed batch
        empty = torch.empty(0, len(layer_ids), self.hidden_size, dtype=self.dtype)
        return [_layer_columns(got[i], columns) if i in got else empty for i in range(len(batch))]

    def close(self) -> None:
        """Shut the engine down (also before building one for other layer ids) and free its memory."""
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if self._in_process:  # the engine initialized torch.distributed in this process
            from vllm.distributed import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._handoff_dir is not None:
            shutil.rmtree(self._handoff_dir, ignore_errors=True)

    def _ensure_engine(self, layer_ids: Sequence[int]) -> None:
        """Build (or rebuild) the engine so that it captures every id in `layer_ids`."""
        if self._llm is not None and set(layer_ids) <= set(self._engine_ids):
            return
        from vllm import LLM

        self.close()
        ids = sorted(set(layer_ids))
        extra = {} if self._handoff_dir is None else {vllm_connector.HANDOFF_DIR: self._handoff_dir}
        self._llm = LLM(
            speculative_config={
                "method": "extract_hidden_states",
                "num_speculative_tokens": 1,
                "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": ids}},
            },
            kv_transfer_config={
                "kv_connector": vllm_connector.HSStoreHiddenStatesConnector.__name__,
                "kv_connector_module_path": vllm_connector.__name__,
                "kv_role": "kv_producer",
                "kv_connector_extra_config": extra,
            },
            **self._llm_kwargs,
        )
        self._engine_ids = ids

    def _collect(self, keys: list[str]) -> list[torch.Tensor]:
        """Wait for every key's states; an in-process engine only runs when stepped, so step it."""
        got: dict[str, torch.Tensor] = {}
        deadline = time.monotonic() + self.timeout
        while True:
            for key in keys:
                if key not in got and (states := vllm_connector.take(key, self._handoff_dir)) is not None:
                    got[key] = states
            if len(got) == len(keys):
                return [got[k] for k in keys]
            if time.monotonic() > deadline:
                raise HSStoreError(f"vLLM delivered hidden states for {len(got)} of {len(keys)} sequences")
            if self._in_process:
                self._llm.llm_engine.step()  # the step after a request finishes hands its states over
            else:
                time.sleep(0.002)

    @staticmethod
    def _check_device(device: str) -> None:
        from vllm.platforms import current_platform

        want = torch.device(device)
        if want.type != current_platform.device_type or want.index not in (None, 0):
            raise HSStoreError(
                f"device {device!r}: this vLLM build runs on {current_platform.device_type}; "
                "choose GPUs with CUDA_VISIBLE_DEVICES and tensor_parallel_size, not a device index"
            )


def _layer_columns(states: torch.Tensor, columns: list[int]) -> torch.Tensor:
    """[n, engine layers, H] -> [n, len(columns), H]: a view when the columns are consecutive (usually every
    captured layer in order), so the caller's thread does not copy a sample's states once more."""
    first = columns[0]
    if columns == list(range(first, first + len(columns))):
        return states[:, first : first + len(columns)]
    return states[:, columns]


def _engine_in_process(tensor_parallel_size: int, engine_kwargs: dict[str, Any]) -> bool:
    """Whether vLLM's worker (and so the connector) will run in this process."""
    from vllm import envs

    pipeline = engine_kwargs.get("pipeline_parallel_size", 1)
    executor = engine_kwargs.get("distributed_executor_backend")
    single = tensor_parallel_size == 1 and pipeline == 1 and executor in (None, "uni")
    return single and not envs.VLLM_ENABLE_V1_MULTIPROCESSING
