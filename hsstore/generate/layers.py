"""Which target layers to capture, in vLLM's numbering.

Id k is the input of decoder layer k (id 0 = the embeddings), and id N (N = number of layers) is the
last decoder layer's output before the final norm. EAGLE-3 fuses three "aux" layers, low, middle
and high, and trains against the target's distribution, which the last layer gives.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import HSStoreError


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's choice, [2, N // 2, N - 3]; for shallow targets where that repeats a layer (N < 8),
    three distinct layers spread over 1..N-1 instead, since the draft always fuses three."""
    ids = sorted({2, num_layers // 2, num_layers - 3})
    if len(ids) == 3 and ids[0] >= 0:
        return ids
    if num_layers < 3:
        raise HSStoreError(f"a target with {num_layers} layers has too few for EAGLE-3's three aux layers")
    return sorted({1, max(2, num_layers // 2), num_layers - 1})


def parse_layer_ids(text: str | None, num_layers: int) -> list[int]:
    """'2,16,29' -> [2, 16, 29], validated against the model; None -> EAGLE-3's default."""
    if not text:
        return default_aux_layer_ids(num_layers)
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HSStoreError(f"--layer-ids {text!r}: expected comma-separated integers like '2,16,29'") from None
    validate_layer_ids(ids, num_layers)
    return ids


def validate_layer_ids(ids: Sequence[int], num_layers: int) -> None:
    bad = [i for i in ids if not 0 <= i <= num_layers]
    if bad or not ids:
        raise HSStoreError(
            f"layer ids {list(ids)} out of range: this target has {num_layers} layers, so ids run 0..{num_layers} "
            f"(id k = input of decoder layer k, id {num_layers} = last layer output before the final norm)"
        )
    if len(set(ids)) != len(ids):
        raise HSStoreError(f"layer ids {list(ids)} repeat a layer")
