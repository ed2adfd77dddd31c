"""EAGLE-3 draft, teacher, TTT loss and export, down to vLLM serving the exported draft.

Unit tests use a small random draft and check what training relies on: vLLM's module names, no
attention across packed samples, the TTT attention structure (checked against an independent
step-by-step emulation of vLLM's drafting), and the teacher against a full-vocab softmax. The
end-to-end tests run the real generate pipeline on the tiny target, train the draft for 30 steps,
export it, and serve it with vLLM's CPU build as the `eagle3` speculator.

The tiny target's lm_head is scaled up: random init gives logits of std ~0.2, a near-uniform teacher
with nothing to learn, where real targets are confident. Its chats are its own greedy replies, as
EAGLE-3 recipes regenerate responses with the target, so the draft can learn what the target says.
Tiny models run fastest single-threaded: OpenMP spin-waits dominate a busy 2-CPU machine.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hsstore.errors import HSStoreError
from hsstore.train.config import DraftConfig
from hsstore.train.export import export_draft
from hsstore.train.loss import StepMetrics, estimated_acceptance_length, ttt_loss
from hsstore.train.model import Eagle3Draft, apply_rope, sample_causal_mask, shift_within_sample, ttt_mask
from hsstore.train.teacher import Teacher, TeacherOutput, teacher_positions

H = 64
TARGET_VOCAB = 300
DRAFT_VOCAB = 100
DRAFT_VOCAB_E2E = 512
SEQ = 256  # tokens per packed row in the end-to-end tests
TOPICS = ("the sea", "a cat", "coffee", "rain", "music", "trains", "the moon", "bread", "winter", "chess", "maps")
PROMPTS = [f"Tell me about {t}." for t in TOPICS] + [f"Why do people like {t}?" for t in TOPICS]
VLLM_NAMES = {
    "fc.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
}


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- small random drafts and batches -----------------------------------------------------------------
def small_config(**overrides) -> DraftConfig:
    values = dict(
        hidden_size=H, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512, target_vocab_size=TARGET_VOCAB,
        draft_vocab_size=DRAFT_VOCAB, aux_layer_ids=(1, 2, 3), target_hidden_size=H, target_num_layers=4,
    )  # fmt: skip
    return DraftConfig(**{**values, **overrides})


def random_vocab(target_vocab: int, draft_vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randperm(target_vocab, generator=torch.Generator().manual_seed(seed))[:draft_vocab].sort().values
    t2d = torch.zeros(target_vocab, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(draft_vocab), t2d


def small_draft(seed: int = 0) -> Eagle3Draft:
    torch.manual_seed(seed)
    config = small_config()
    draft = Eagle3Draft(config, *random_vocab(TARGET_VOCAB, DRAFT_VOCAB, seed))
    with torch.no_grad():  # non-trivial norms, so a swapped norm would show
        for p in draft.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return draft


def packed_row(lengths: list[int], width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One row holding samples of `lengths`, then padding (seq id -1), in the batch contract's layout."""
    g = torch.Generator().manual_seed(seed)
    seq_ids = torch.full((width,), -1)
    position_ids = torch.zeros(width, dtype=torch.long)
    start = 0
    for i, n in enumerate(lengths):
        seq_ids[start : start + n] = i
        position_ids[start : start + n] = torch.arange(n)
        start += n
    return {
        "input_ids": torch.randint(0, TARGET_VOCAB, (1, width), generator=g),
        "loss_mask": ((torch.rand(1, width, generator=g) > 0.3) & (seq_ids >= 0)).to(torch.uint8),
        "aux": torch.randn(1, width, 3, H, generator=g).to(torch.bfloat16),
        "last": torch.randn(1, width, H, generator=g).to(torch.bfloat16),
        "position_ids": position_ids[None],
        "seq_ids": seq_ids[None],
    }


# --- the model -------------------------------------------------------------------------------------
def test_shapes_and_vllm_names() -> None:
    draft = small_draft()
    batch = packed_row([20, 9], 32)
    args = (batch["input_ids"], batch["aux"], batch["position_ids"], batch["seq_ids"])
    assert [tuple(h.shape) for h in draft.unroll(*args, steps=3)] == [(1, 32, H)] * 3
    assert [tuple(x.shape) for x in draft(*args, steps=3)] == [(1, 32, DRAFT_VOCAB)] * 3
    select = [batch["seq_ids"] == 0, batch["seq_ids"] == 1]
    assert [tuple(x.shape) for x in draft(*args, steps=2, select=select)] == [(20, DRAFT_VOCAB), (9, DRAFT_VOCAB)]
    assert set(draft.state_dict()) == VLLM_NAMES | {"embed_tokens.weight"}
    trainable = {n for n, p in draft.named_parameters() if p.requires_grad}
    assert trainable == VLLM_NAMES - {"d2t", "t2d"}
    assert draft.midlayer.self_attn.q_proj.in_features == 2 * H  # attention reads [embed; hidden]
    assert draft.fc.in_features == 3 * H


def test_no_attention_across_packed_samples() -> None:
    draft = small_draft()
    batch = packed_row([14, 11], 32, seed=1)
    changed = {k: v.clone() for k, v in batch.items()}
    second = changed["seq_ids"] == 1
    changed["input_ids"][second] = (changed["input_ids"][second] + 7) % TARGET_VOCAB
    changed["aux"][second] = -changed["aux"][second] * 3
    with torch.no_grad():
        a = draft(batch["input_ids"], batch["aux"], batch["position_ids"], batch["seq_ids"], steps=4)
        b = draft(changed["input_ids"], changed["aux"], changed["position_ids"], changed["seq_ids"], steps=4)
    first = batch["seq_ids"][0] == 0
    for step_a, step_b in zip(a, b, strict=True):
        assert torch.equal(step_a[0, first], step_b[0, first])
        assert not torch.allclose(step_a[0, second[0]], step_b[0, second[0]])


def test_ttt_mask_structure() -> None:
    seq_ids = torch.tensor([[0, 0, 0, 1, 1, -1]])
    context = sample_causal_mask(seq_ids)[0, 0]
    want = torch.tensor(
        [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0],
         [0, 0, 0, 0, 0, 1]], dtype=torch.bool,
    )  # fmt: skip
    assert torch.equal(context, want)
    mask = ttt_mask(sample_causal_mask(seq_ids), 2)[0, 0]
    assert mask.shape == (6, 18)
    assert torch.equal(mask[:, :6], want)  # step-0 keys: the context, causal within the sample
    for block in (1, 2):  # keys of later steps: only the query's own chain (same index)
        assert torch.equal(mask[:, 6 * block : 6 * (block + 1)], torch.eye(6, dtype=torch.bool))
    assert torch.equal(
        shift_within_sample(torch.tensor([[5, 6, 7, 8, 9, 3]]), seq_ids, 1), torch.tensor([[6, 7, 0, 9, 0, 0]])
    )


def emulate_vllm_drafting(draft: Eagle3Draft, ids: torch.Tensor, aux: torch.Tensor, steps: int) -> torch.Tensor:
    """Step k's output at every index t, computed the way vLLM drafts, one query at a time.

    Context pass: index i reads token i + 1, fc(aux i), position i; its key/value enters the KV cache.
    A chain from t: step k reads token t + k + 1 and step k - 1's output at position t + k, attending to
    the cached context 0..t and the chain's own earlier keys. Returns [steps, n, H]."""
    layer, attn = draft.midlayer, draft.midlayer.self_attn
    n, nh, nkv, d = len(ids), attn.num_heads, attn.num_kv_heads, attn.head_dim

    def token(i: int) -> torch.Tensor:
        return ids[i] if i < n else torch.tensor(0)

    def project(tok: torch.Tensor, hidden: torch.Tensor, pos: int) -> tuple[torch.Tensor, ...]:
        x = torch.cat([layer.input_layernorm(draft.embed_tokens(tok)), layer.hidden_norm(hidden)])
        cos, sin = draft.rotary(torch.tensor([[pos]]))
        q = apply_rope(attn.q_proj(x).view(1, nh, 1, d), cos, sin).view(nh, d)
        k = apply_rope(attn.k_proj(x).view(1, nkv, 1, d), cos, sin).view(nkv, d)
        return q, k, attn.v_proj(x).view(nkv, d)

    def finish(hidden: torch.Tensor, q: torch.Tensor, keys: list, values: list) -> torch.Tensor:
        k = torch.stack(keys).repeat_interleave(nh // nkv, dim=1)  # [S, nh, d]
        v = torch.stack(values).repeat_interleave(nh // nkv, dim=1)
        weights = torch.softmax(torch.einsum("hd,shd->hs", q, k) / math.sqrt(d), dim=-1)
        h = hidden + attn.o_proj(torch.einsum("hs,shd->hd", weights, v).reshape(-1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    fused = draft.fuse(aux)
    context = [project(token(i + 1), fused[i], i) for i in range(n)]
    out = torch.zeros(steps, n, fused.shape[-1])
    for t in range(n):
        keys, values = [c[1] for c in context[: t + 1]], [c[2] for c in context[: t + 1]]
        h = out[0, t] = finish(fused[t], context[t][0], keys, values)
        for k in range(1, steps):
            q, key, value = project(token(t + k + 1), h, t + k)
            keys, values = [*keys, key], [*values, value]
            h = out[k, t] = finish(h, q, keys, values)
    return out


def test_ttt_unroll_matches_vllm_style_drafting() -> None:
    draft = small_draft(seed=2)
    batch = packed_row([13, 9], 24, seed=2)
    aux = batch["aux"].float()
    with torch.no_grad():
        outs = torch.stack(draft.unroll(batch["input_ids"], aux, batch["position_ids"], batch["seq_ids"], steps=3))
        outs = outs[:, 0]
        for sample, span in enumerate((slice(0, 13), slice(13, 22))):
            want = emulate_vllm_drafting(draft, batch["input_ids"][0, span], aux[0, span], steps=3)
            torch.testing.assert_close(outs[:, span], want, atol=2e-5, rtol=2e-5, msg=f"sample {sample}")


# --- the teacher -------------------------------------------------------------------------------------
def reference_teacher(norm_w: torch.Tensor, lm_head: torch.Tensor, last: torch.Tensor, eps: float) -> torch.Tensor:
    """Full-vocab softmax of the target, in float64."""
    x = last.double()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_w.double()
    return torch.softmax(x @ lm_head.double().T, dim=-1)


@pytest.mark.parametrize(("chunk_size", "token_chunk"), [(4096, 4096), (7, 5)])
def test_teacher_matches_full_vocab_softmax(chunk_size: int, token_chunk: int) -> None:
    g = torch.Generator().manual_seed(3)
    vocab, draft_vocab, width = 40, 12, 16
    d2t, t2d = random_vocab(vocab, draft_vocab, seed=3)
    norm_w = torch.rand(width, generator=g) + 0.5
    lm_head = torch.randn(vocab, width, generator=g) * 1.5
    teacher = Teacher(norm_w, lm_head, d2t, t2d, eps=1e-6, chunk_size=chunk_size, token_chunk=token_chunk)
    last = torch.randn(2, 30, width, generator=g)
    loss_mask = torch.rand(2, 30, generator=g) > 0.2
    seq_ids = torch.tensor([[0] * 12 + [1] * 14 + [-1] * 4, [0] * 30])
    loss_mask &= seq_ids >= 0
    out = teacher(last, loss_mask, seq_ids)

    full = reference_teacher(norm_w, lm_head, last, 1e-6)
    draft_ids = torch.arange(draft_vocab) + d2t
    next_ok = torch.zeros_like(loss_mask)
    next_ok[:, :-1] = loss_mask[:, 1:] & (seq_ids[:, 1:] == seq_ids[:, :-1])
    top1_in_draft = t2d[full.argmax(-1)]
    assert torch.equal(out.mask, next_ok & top1_in_draft)
    assert bool((next_ok & ~top1_in_draft).any()) and bool(out.mask.any())  # both cases are exercised
    restricted = full[..., draft_ids] / full[..., draft_ids].sum(-1, keepdim=True)
    torch.testing.assert_close(out.probs[out.mask].double(), restricted[out.mask], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.mass[next_ok].double(), full[..., draft_ids].sum(-1)[next_ok], atol=1e-6, rtol=1e-5)
    assert torch.equal(out.top1[out.mask], full.argmax(-1)[out.mask])
    assert not bool(out.probs[~next_ok].any())  # nothing computed where no target can be

    reference = Teacher(norm_w, lm_head, d2t, t2d, eps=1e-6, chunk_size=10**6)(last, loss_mask, seq_ids)
    torch.testing.assert_close(out.probs, reference.probs, atol=1e-6, rtol=1e-6)
    assert torch.equal(out.mask, reference.mask)


def test_teacher_refuses_another_vocab() -> None:
    d2t, t2d = random_vocab(50, 10)
    with pytest.raises(HSStoreError, match="lm_head has 40 rows"):
        Teacher(torch.ones(8), torch.randn(40, 8), d2t, t2d, eps=1e-6)


def test_tied_target_uses_embedding_as_lm_head(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    d2t, t2d = random_vocab(64, 16)
    teacher = Teacher.from_target(tmp_path, d2t, t2d)
    assert torch.equal(teacher.draft_rows, embed[torch.arange(16) + d2t])


# --- the loss ----------------------------------------------------------------------------------------
def small_teacher(draft: Eagle3Draft, seed: int = 0) -> Teacher:
    g = torch.Generator().manual_seed(seed)
    lm_head = torch.randn(draft.config.target_vocab_size, H, generator=g) * 0.5
    return Teacher(torch.ones(H), lm_head, draft.d2t, draft.t2d, eps=1e-6)


def test_loss_is_the_same_packed_or_alone() -> None:
    """Packing two samples in a row changes nothing: per-step sums equal those of each sample alone."""
    draft, width = small_draft(seed=4), 24
    teacher = small_teacher(draft, seed=4)
    packed = packed_row([13, 9], width, seed=4)
    alone = {k: torch.zeros_like(v).repeat(2, *([1] * (v.ndim - 1))) for k, v in packed.items()}
    alone["seq_ids"].fill_(-1)
    for row, span in enumerate((slice(0, 13), slice(13, 22))):
        n = span.stop - span.start
        for key, value in packed.items():
            alone[key][row, :n] = value[0, span]
    with torch.no_grad():
        _, together = ttt_loss(draft, packed, teacher, ttt_steps=3)
        _, apart = ttt_loss(draft, alone, teacher, ttt_steps=3)
    assert bool((together.count > 0).all()) and together.count.tolist() == apart.count.tolist()
    for name in ("loss_sum", "correct", "accept_sum"):
        torch.testing.assert_close(getattr(together, name), getattr(apart, name), rtol=1e-4, atol=1e-4)


def test_each_step_drops_the_last_positions_of_each_sample() -> None:
    """With every token trained on and a full draft vocab, step k counts n - k - 2 positions of a sample of n."""
    config = small_config(draft_vocab_size=TARGET_VOCAB)
    draft = Eagle3Draft(config)
    teacher = Teacher(torch.ones(H), torch.randn(TARGET_VOCAB, H), draft.d2t, draft.t2d, eps=1e-6)
    batch = packed_row([10, 7], 20)
    batch["loss_mask"] = (batch["seq_ids"] >= 0).to(torch.uint8)
    loss, metrics = ttt_loss(draft, batch, teacher, ttt_steps=4)
    assert metrics.count.tolist() == [(10 - k - 2) + (7 - k - 2) for k in range(4)]
    loss.backward()
    assert draft.fc.weight.grad is not None and draft.embed_tokens.weight.grad is None
    assert bool((metrics.expected_acceptance <= 1 + 1e-6).all())


def test_chained_acceptance_and_decoding_walk() -> None:
    """A draft that always proposes one token, a teacher whose top-1 is that token at random positions: the
    chained counts equal a per-index walk (stop at the first wrong, unusable or out-of-vocab position), and
    the decoding walk jumps over each chain's kept drafts plus the target's token, reply by reply."""
    draft, steps, width = small_draft(seed=5), 3, 40
    with torch.no_grad():
        draft.lm_head.weight.zero_()  # equal logits: argmax is draft id 0 everywhere
    proposed = int(draft.draft_ids_in_target[0])
    batch = packed_row([23, 14], width, seed=5)
    seq_ids = batch["seq_ids"]
    g = torch.Generator().manual_seed(5)
    top1 = torch.where(torch.rand(1, width, generator=g) < 0.75, proposed, proposed + 1)
    top1[torch.rand(1, width, generator=g) < 0.1] = -1  # the target's top-1 is outside the draft vocab
    mask = teacher_positions(batch["loss_mask"], seq_ids) & (top1 >= 0)
    probs = torch.softmax(torch.randn(1, width, DRAFT_VOCAB, generator=g), -1)
    teacher = TeacherOutput(probs, mask, torch.where(mask, top1, -1), torch.ones(1, width))
    with torch.no_grad():
        _, metrics = ttt_loss(draft, batch, teacher, ttt_steps=steps, walk=True)

    sample, trained = seq_ids[0].tolist(), batch["loss_mask"][0].tolist()
    kept: dict[int, int] = {}  # chain start -> drafts kept
    for t in range(width - 2):
        if sample[t] < 0 or sample[t + 2] != sample[t] or not trained[t + 2]:
            continue
        kept[t] = 0
        for k in range(steps):
            j = t + k + 1
            if j + 1 >= width or sample[j + 1] != sample[t] or not mask[0, j] or top1[0, j] != proposed:
                break
            kept[t] += 1
    chained = [sum(n > k for n in kept.values()) for k in range(steps)]
    assert kept and chained[0] > chained[-1] > 0  # the case is not degenerate
    assert metrics.chained.tolist() == chained and metrics.chains.tolist() == [len(kept)] * steps

    walk: list[int] = []  # kept drafts of each chain the decoding walk makes
    for t in range(width - 1):
        if trained[t + 1] and not trained[t] and sample[t] == sample[t + 1] >= 0:  # a reply starts at t + 1
            while t in kept:
                walk.append(kept[t])
                t += kept[t] + 1
    assert len(walk) < len(kept) and max(walk) > 0
    assert metrics.walked.tolist() == [sum(n > k for n in walk) for k in range(steps)]
    assert metrics.walks.tolist() == [len(walk)] * steps
    values = metrics.summary()
    assert values["acceptance_length_chained"] == pytest.approx(1 + sum(chained) / len(kept))
    assert values["acceptance_length_decoding"] == pytest.approx(1 + sum(walk) / len(walk))
    assert values["chain_0"] == pytest.approx(chained[0] / len(kept))


# --- config ------------------------------------------------------------------------------------------
def test_bundled_configs_load() -> None:
    llama = DraftConfig.from_file("llama-3.1-8b")
    assert (llama.hidden_size, llama.target_num_layers, llama.aux_layer_ids) == (4096, 32, (2, 16, 29))
    assert llama.rope_type == "llama3" and llama.draft_vocab_size == 32000
    qwen = DraftConfig.from_file("qwen3-8b", draft_vocab_size=16000)
    assert (qwen.target_vocab_size, qwen.aux_layer_ids, qwen.draft_vocab_size) == (151936, (2, 18, 33), 16000)
    with pytest.raises(HSStoreError, match="not found; bundled configs"):
        DraftConfig.from_file("no-such-target")


def test_config_from_target_and_validation(tiny_llama3: Path, make_manifest) -> None:
    config = DraftConfig.from_target(tiny_llama3, 512, (1, 2, 3))
    assert (config.hidden_size, config.head_dim, config.target_vocab_size) == (64, 32, 2048)
    assert config.num_key_value_heads == 1 and config.rope_type == "default"
    assert DraftConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(HSStoreError, match="exactly 3 aux layers"):
        small_config(aux_layer_ids=(1, 2))
    with pytest.raises(HSStoreError, match="reuses the target's token embedding"):
        small_config(hidden_size=32)
    with pytest.raises(HSStoreError, match="unknown keys"):
        DraftConfig.from_dict({**small_config().to_dict(), "hiden_size": 3})
    store_manifest = make_manifest(hidden_size=128, vocab_size=TARGET_VOCAB)
    with pytest.raises(HSStoreError, match="hidden size is 128, the draft config expects 64"):
        small_config(target_num_layers=8).check_store(store_manifest)
    with pytest.raises(HSStoreError, match=r"aux layers \[2, 4, 5\], the draft config says \[1, 2, 3\]"):
        small_config(target_num_layers=8).check_store(make_manifest(vocab_size=TARGET_VOCAB))


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen3-8b"])
def test_rope_matches_transformers(name: str) -> None:
    """The draft rotates like the target (Llama-3 scaled RoPE included), or positions would mean other things."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from hsstore.train.model import RotaryEmbedding

    config = DraftConfig.from_file(name)
    llama = LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=config.rope_parameters,
    )
    reference = LlamaRotaryEmbedding(llama)
    positions = torch.tensor([[0, 1, 7, 500, 9000, 70000]])
    want_cos, want_sin = reference(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = RotaryEmbedding(config)(positions)
    torch.testing.assert_close(cos[:, 0], want_cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin[:, 0], want_sin, atol=1e-5, rtol=1e-5)


def test_estimated_acceptance_length() -> None:
    assert estimated_acceptance_length([]) == 1.0
    assert estimated_acceptance_length([1.0, 1.0, 1.0]) == 4.0
    assert estimated_acceptance_length(torch.tensor([0.5, 0.5])) == pytest.approx(1.75)


# --- end to end: real store, training, export, vLLM --------------------------------------------------
def self_generated_chats(target: Path, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """ShareGPT-style chats whose replies are the target's own greedy continuations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16)
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    replies = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [
        {"id": f"self-{i}", "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": r}]}
        for i, (p, r) in enumerate(zip(prompts, replies, strict=True))
    ]


@pytest.fixture(scope="module")
def store(confident_target: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store from the real generate pipeline (HF backend), then `hsstore vocab --draft-vocab-size 512`."""
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from hsstore.cli import app
    from hsstore.generate.backends.hf import HFBackend
    from hsstore.generate.inputs import load_samples
    from hsstore.generate.pipeline import StoreSettings, build_manifest, run_generate
    from hsstore.manifest import Geometry

    root = tmp_path_factory.mktemp("train-store")
    data = root / "chats.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in self_generated_chats(confident_target, PROMPTS, 48)) + "\n")
    tok = AutoTokenizer.from_pretrained(confident_target)
    loaded = load_samples([data], tok, seq_length=SEQ, cache_dir=root / "cache")
    backend = HFBackend(str(confident_target), dtype="bfloat16")
    settings = StoreSettings(
        out=str(root / "store"), aux_layer_ids=[1, 2, 3], geometry=Geometry(64, 1024), batch_tokens=4096,
        max_seq_length=SEQ, codec="lossless", teacher="last",
    )  # fmt: skip
    manifest = build_manifest(backend, str(confident_target), settings, loaded.tokenizer_info, loaded.sources)
    run_generate(backend, manifest, loaded.samples, settings)
    result = CliRunner().invoke(app, ["vocab", settings.out, "--draft-vocab-size", str(DRAFT_VOCAB_E2E)])
    assert result.exit_code == 0, result.output
    return settings.out


def pack_store(reader, width: int, rows_per_batch: int) -> list[dict[str, torch.Tensor]]:
    """Greedy packing of whole samples into rows of `width` tokens (the batch contract; a stand-in for
    the training data pipeline)."""
    rows: list[list[dict]] = [[]]
    used = 0
    for i in range(len(reader)):
        sample = reader[i]
        n = min(len(sample["input_ids"]), width)
        if used + n > width:
            rows.append([])
            used = 0
        rows[-1].append(sample)
        used += n
    batches = []
    for start in range(0, len(rows), rows_per_batch):
        group = rows[start : start + rows_per_batch]
        h = group[0][0]["aux"].shape[-1]
        b = {
            "input_ids": torch.zeros(len(group), width, dtype=torch.long),
            "loss_mask": torch.zeros(len(group), width, dtype=torch.bool),
            "aux": torch.zeros(len(group), width, 3, h, dtype=torch.bfloat16),
            "last": torch.zeros(len(group), width, h, dtype=torch.bfloat16),
            "position_ids": torch.zeros(len(group), width, dtype=torch.long),
            "seq_ids": torch.full((len(group), width), -1, dtype=torch.long),
        }
        for r, row in enumerate(group):
            offset = 0
            for s, sample in enumerate(row):
                n = min(len(sample["input_ids"]), width)
                span = slice(offset, offset + n)
                b["input_ids"][r, span] = sample["input_ids"][:n].long()
                b["loss_mask"][r, span] = sample["loss_mask"][:n].bool()
                b["aux"][r, span] = sample["aux"][:n]
                b["last"][r, span] = sample["last"][:n]
                b["position_ids"][r, span] = torch.arange(n)
                b["seq_ids"][r, span] = s
                offset += n
        batches.append(b)
    return batches


@dataclass
class Trained:
    target: Path
    draft: Eagle3Draft
    before: tuple[float, StepMetrics]
    after: tuple[float, StepMetrics]


@pytest.fixture(scope="module")
def trained(confident_target: Path, store: str) -> Trained:
    """30 AdamW steps of 3-step TTT over the store; loss and metrics on a fixed batch before and after."""
    from hsstore.reader import StoreReader
    from hsstore.vocab import read_draft_vocab

    reader = StoreReader(store)
    vocab = read_draft_vocab(reader)
    d2t, t2d = torch.as_tensor(vocab.d2t), torch.as_tensor(vocab.t2d)
    config = DraftConfig.from_target(confident_target, len(d2t), reader.manifest.hidden_spec("aux").layer_ids)
    config.check_store(reader.manifest, len(d2t))
    torch.manual_seed(0)
    draft = Eagle3Draft.from_target(config, confident_target, d2t, t2d)
    teacher = Teacher.from_target(confident_target, d2t, t2d)
    batches = pack_store(reader, SEQ, rows_per_batch=2)
    probe = teacher(batches[0]["last"], batches[0]["loss_mask"], batches[0]["seq_ids"])

    def evaluate() -> tuple[float, StepMetrics]:
        with torch.no_grad():
            loss, metrics = ttt_loss(draft, batches[0], probe, ttt_steps=3)
        return float(loss), metrics

    before = evaluate()
    optimizer = torch.optim.AdamW(draft.trainable_parameters(), lr=5e-3)
    for step in range(30):
        loss, _ = ttt_loss(draft, batches[step % len(batches)], teacher, ttt_steps=3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return Trained(confident_target, draft, before, evaluate())


def test_training_reduces_loss_and_metrics_are_in_range(trained: Trained) -> None:
    (loss0, m0), (loss1, m1) = trained.before, trained.after
    print(f"TTT loss {loss0:.2f} -> {loss1:.2f}; after: { ({k: round(v, 3) for k, v in m1.summary().items()}) }")
    assert loss1 < 0.7 * loss0, (loss0, loss1)
    assert float(m1.accuracy[0]) > float(m0.accuracy[0]), (m0.summary(), m1.summary())
    for m in (m0, m1):
        assert bool((m.count > 0).all())
        for values in (m.accuracy, m.expected_acceptance):
            assert bool(((values >= 0) & (values <= 1)).all()), m.summary()
        assert 1.0 <= m.summary()["acceptance_length_greedy"] <= 4.0
        assert bool((m.count[1:] <= m.count[:-1]).all())  # later steps lose the last positions of each sample
    assert (m1 + m1).count.tolist() == (2 * m1.count).tolist()
    assert StepMetrics.from_tensor(m1.as_tensor()).correct.tolist() == m1.correct.tolist()


@pytest.mark.parametrize("fmt", ["vllm", "speculators"])
def test_export_layout(trained: Trained, fmt: str, tmp_path: Path) -> None:
    out = export_draft(trained.draft, tmp_path / fmt, trained.target, fmt)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
        assert torch.equal(f.get_tensor("d2t"), trained.draft.d2t)
    assert names == VLLM_NAMES  # no embed_tokens: vLLM shares the target's
    config = json.loads((out / "config.json").read_text())
    if fmt == "vllm":
        assert config["architectures"] == ["LlamaForCausalLMEagle3"]
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
        assert (config["draft_vocab_size"], config["vocab_size"], config["target_hidden_size"]) == (512, 2048, 64)
        return
    assert "model_type" not in config  # how vLLM tells the speculators format apart
    pytest.importorskip("vllm")
    from vllm.transformers_utils.config import maybe_override_with_speculators
    from vllm.transformers_utils.configs.speculators import SpeculatorsConfig

    model, _, spec = maybe_override_with_speculators(str(out), None, trust_remote_code=False)
    assert model == str(trained.target) and spec == {"method": "eagle3", "num_speculative_tokens": 3, "model": str(out)}
    parsed = SpeculatorsConfig.from_pretrained(out)
    assert parsed.architectures == ["Eagle3LlamaForCausalLM"]
    assert parsed.norm_before_residual is False and parsed.eagle_aux_hidden_state_layer_ids == [1, 2, 3]


def test_export_full_vocab_and_partial_state(tmp_path: Path) -> None:
    draft = Eagle3Draft(small_config(draft_vocab_size=TARGET_VOCAB))
    out = export_draft(draft, tmp_path / "full", dtype=torch.float32)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == VLLM_NAMES - {"d2t", "t2d"}  # vLLM has no mapping to load for a full vocab
    partial = {k: v for k, v in draft.state_dict().items() if k != "fc.weight"}
    with pytest.raises(HSStoreError, match=r"lacks \['fc.weight'\]"):
        export_draft(draft, tmp_path / "partial", state_dict=partial)
    with pytest.raises(HSStoreError, match="names its verifier"):
        export_draft(draft, tmp_path / "spec", format="speculators")


@pytest.mark.slow
def test_vllm_serves_exported_draft(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's CPU build loads the export as the eagle3 speculator and reports its acceptance."""
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory

    draft_dir = export_draft(trained.draft, tmp_path / "draft", trained.target)
    llm = LLM(
        model=str(trained.target),
        speculative_config={"method": "eagle3", "model": str(draft_dir), "num_speculative_tokens": 3},
        max_model_len=512,
        max_num_seqs=4,
        enforce_eager=True,
        disable_log_stats=False,
        dtype="bfloat16",
    )
    try:
        chats = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
        outputs = llm.chat(chats, SamplingParams(temperature=0.0, max_tokens=48))
        metrics = {m.name: m for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode")}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    assert all(len(o.outputs[0].token_ids) > 0 for o in outputs)
    drafts = metrics["vllm:spec_decode_num_drafts"].value
    drafted = metrics["vllm:spec_decode_num_draft_tokens"].value
    accepted = metrics["vllm:spec_decode_num_accepted_tokens"].value
    per_position = metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values
    print(f"vLLM eagle3: {drafts} drafts, {drafted} draft tokens, {accepted} accepted, per position {per_position}")
    assert drafts > 0 and drafted == 3 * drafts
    assert 0 <= accepted <= drafted and len(per_position) == 3 and sum(per_position) == accepted
    assert accepted > 0, "a draft trained on the target's own replies should get some tokens accepted"
