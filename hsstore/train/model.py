"""The EAGLE-3 draft: fc fuses three target layers, one Llama decoder layer reads [embedding; hidden].

Module and parameter names are the ones vLLM's `LlamaForCausalLMEagle3` loads (fc, midlayer.*, norm,
lm_head, d2t, t2d), so export is a state-dict copy. The layer mirrors vLLM's forward exactly:

    x   = cat[input_layernorm(embed(token)), hidden_norm(hidden)]      # 2H wide
    h   = hidden + o_proj(attention(q/k/v_proj(x)))                     # residual on the hidden stream
    out = h + mlp(post_attention_layernorm(h))                          # pre-norm state, fed to the next step
    logits = lm_head(norm(out))                                         # over the draft vocab

Training-time test (TTT) runs the layer `steps` times. Index t of step k stands for position t + k:
its token is the one k + 1 places ahead (in the same sample), its hidden state is step k - 1's output
at t (step 0: fc(aux at t)). Its query attends to step-0 keys at indices <= t of the same sample (the
context, as vLLM's draft KV cache holds it) and to the keys of steps 1..k at index t (its own chain of
drafted tokens): the "extended" attention of EAGLE-3, built here as one boolean mask for SDPA.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HSStoreError
from .config import NUM_AUX_LAYERS, DraftConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # (keys, values) of each TTT step so far, [B, kv_heads, T, d]
PAD_TOKEN = 0  # input token where a shifted token would come from another sample (the position is masked anyway)


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalize in fp32, scale in the input's dtype (as vLLM and transformers do)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: DraftConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scale of the target's RoPE (scaled variants via transformers)."""
    if config.rope_type == "default":
        # in fp32 exactly as transformers and vLLM compute it: far positions amplify any rounding difference
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim
        return 1.0 / (config.rope_theta**exponents), 1.0
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if config.rope_type not in ROPE_INIT_FUNCTIONS:
        raise HSStoreError(f"rope type {config.rope_type!r} is not supported; known: {sorted(ROPE_INIT_FUNCTIONS)}")
    llama = LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=config.rope_parameters,
    )
    inv_freq, scale = ROPE_INIT_FUNCTIONS[config.rope_type](llama, torch.device("cpu"))
    return inv_freq.float(), float(scale)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        inv_freq, self.scale = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived from the config, never exported

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, 1, T, head_dim] in fp32."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]
        return angles.cos() * self.scale, angles.sin() * self.scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotation (Llama's), computed in fp32."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


class Attention(nn.Module):
    """Llama attention over a 2H-wide input; keys/values of earlier TTT steps come from `cache`."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        width = 2 * config.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """x [B, T, 2H]; mask [B, 1, T, T * (len(cache) + 1)] bool, True = may attend. Appends to `cache`."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.append((k, v))
        keys = torch.cat([c[0] for c in cache], dim=2)
        values = torch.cat([c[1] for c in cache], dim=2)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise HSStoreError(f"draft config: hidden_act {config.hidden_act!r}; the EAGLE-3 layer uses silu")
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """vLLM's Eagle3 LlamaDecoderLayer (layer 0, norm after residual): residual on the hidden stream only."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache,
    ) -> torch.Tensor:
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        h = hidden + self.self_attn(x, cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


# --- masks and shifts -------------------------------------------------------------------------------
def sample_causal_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] sample index per token -> [B, 1, T, T]: causal and never across packed samples.

    Padding (seq id -1) attends to earlier padding only: every row keeps its diagonal, so SDPA never
    sees an all-masked row (which would give NaN)."""
    t = seq_ids.shape[1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=seq_ids.device).tril()
    return (same & causal)[:, None]


def ttt_mask(context_mask: torch.Tensor, step: int) -> torch.Tensor:
    """Step `step`'s mask over [step-0 keys, step-1 keys, ..., own keys]: context causal, later steps diagonal."""
    b, _, t, _ = context_mask.shape
    diagonal = torch.eye(t, dtype=torch.bool, device=context_mask.device).expand(b, 1, t, t)
    return torch.cat([context_mask, *([diagonal] * step)], dim=-1)


def shift_within_sample(tokens: torch.Tensor, seq_ids: torch.Tensor, shift: int, fill: int = PAD_TOKEN) -> torch.Tensor:
    """out[:, t] = tokens[:, t + shift] when that token is in the same sample, else `fill`."""
    if shift == 0:
        return tokens
    out = torch.full_like(tokens, fill)
    if shift < tokens.shape[1]:
        same = seq_ids[:, shift:] == seq_ids[:, :-shift]
        out[:, :-shift] = torch.where(same, tokens[:, shift:], fill)
    return out


# --- the draft ---------------------------------------------------------------------------------------
class Eagle3Draft(nn.Module):
    """fc + one decoder layer + norm + lm_head over the draft vocab; d2t/t2d map draft ids to target ids."""

    def __init__(
        self,
        config: DraftConfig,
        d2t: torch.Tensor | None = None,
        t2d: torch.Tensor | None = None,
        embed: torch.Tensor | None = None,
    ) -> None:
        """`embed`: the target's embedding [target_vocab, H], kept in its dtype (random if None: tests)."""
        super().__init__()
        self.config = config
        h = config.hidden_size
        if embed is None:
            embed = torch.randn(config.target_vocab_size, h) * 0.02
        if tuple(embed.shape) != (config.target_vocab_size, h):
            raise HSStoreError(
                f"target embed_tokens is {tuple(embed.shape)}, the draft config expects "
                f"({config.target_vocab_size}, {h}); is the config for another target?"
            )
        self.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=True)  # frozen; vLLM shares the target's
        self.fc = nn.Linear(NUM_AUX_LAYERS * config.target_hidden_size, h, bias=False)
        self.midlayer = DecoderLayer(config)
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        if d2t is None:  # identity mapping onto the first draft_vocab_size target ids
            d2t = torch.zeros(config.draft_vocab_size, dtype=torch.long)
        if t2d is None:
            t2d = torch.arange(config.target_vocab_size) < config.draft_vocab_size
        self.register_buffer("d2t", torch.as_tensor(d2t, dtype=torch.long).clone())
        self.register_buffer("t2d", torch.as_tensor(t2d, dtype=torch.bool).clone())
        check_vocab_maps(self.d2t, self.t2d, config)

    @classmethod
    def from_target(
        cls,
        config: DraftConfig,
        target_dir: str | Path,
        d2t: torch.Tensor,
        t2d: torch.Tensor,
        *,
        init_head_from_target: bool = True,
    ) -> Eagle3Draft:
        """A fresh draft with the target's embedding (and, by default, its final norm and lm_head rows of
        the draft vocab as a starting point: the draft then begins by reading its state like the target)."""
        from ..targetweights import load_embed_tokens, load_final_norm, load_lm_head

        draft = cls(config, d2t, t2d, embed=load_embed_tokens(target_dir))
        with torch.no_grad():
            if init_head_from_target:
                draft.norm.weight.copy_(load_final_norm(target_dir))
                draft.lm_head.weight.copy_(load_lm_head(target_dir)[draft.draft_ids_in_target])
        return draft

    @property
    def draft_ids_in_target(self) -> torch.Tensor:
        return torch.arange(len(self.d2t), device=self.d2t.device) + self.d2t

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # --- pieces ------------------------------------------------------------------------------------
    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """aux [B, T, 3, H_target] (the store's layout) -> [B, T, H]."""
        return self.fc(aux.flatten(-2).to(self.fc.weight.dtype))

    def step(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache,
    ) -> torch.Tensor:
        """One draft forward: tokens [B, T] and hidden [B, T, H] -> pre-norm hidden [B, T, H]."""
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        cos, sin = self.rotary(position_ids)
        return self.midlayer(embeds, hidden, cos, sin, mask, cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-norm hidden [..., H] -> logits over the draft vocab [..., draft_vocab]."""
        return self.lm_head(self.norm(hidden))

    # --- training-time test ---------------------------------------------------------------------------
    def unroll(
        self,
        input_ids: torch.Tensor,
        aux: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: torch.Tensor,
        steps: int = 1,
    ) -> list[torch.Tensor]:
        """Unroll `steps` TTT steps over a packed batch; returns each step's pre-norm hidden [B, T, H].

        Step k at index t: token input_ids[t + k + 1] (same sample), position position_ids[t] + k, hidden
        from step k - 1 at t, so it predicts token t + k + 2: what vLLM's k-th draft step does after the
        target accepted tokens up to t + 1."""
        input_ids, seq_ids, position_ids = input_ids.long(), seq_ids.long(), position_ids.long()
        context = sample_causal_mask(seq_ids)
        hidden = self.fuse(aux)
        cache: KVCache = []
        outputs = []
        for k in range(steps):
            tokens = shift_within_sample(input_ids, seq_ids, k + 1)
            hidden = self.step(tokens, hidden, position_ids + k, ttt_mask(context, k), cache)
            outputs.append(hidden)
        return outputs

    def forward(
        self,
        input_ids: torch.Tensor,
        aux: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: torch.Tensor,
        steps: int = 1,
        select: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Each TTT step's logits over the draft vocab: [B, T, draft_vocab], or [N_k, draft_vocab] at the
        positions `select[k]` ([B, T] bool) marks, so the lm_head runs only where a loss needs it.

        Everything that touches parameters happens here, so DDP/FSDP wrappers see one forward call."""
        hiddens = self.unroll(input_ids, aux, position_ids, seq_ids, steps)
        if select is None:
            return [self.logits(h) for h in hiddens]
        return [self.logits(h[sel]) for h, sel in zip(hiddens, select, strict=True)]


def check_vocab_maps(d2t: torch.Tensor, t2d: torch.Tensor, config: DraftConfig) -> None:
    """d2t [draft_vocab] and t2d [target_vocab] must describe the same set of target ids."""
    if d2t.shape != (config.draft_vocab_size,) or t2d.shape != (config.target_vocab_size,):
        raise HSStoreError(
            f"draft vocab maps: d2t {tuple(d2t.shape)} / t2d {tuple(t2d.shape)}, the draft config expects "
            f"({config.draft_vocab_size},) / ({config.target_vocab_size},); rebuild with `hsstore vocab "
            f"--draft-vocab-size {config.draft_vocab_size}` or fix draft_vocab_size"
        )
    ids = torch.arange(len(d2t), device=d2t.device) + d2t
    if (
        int(t2d.sum()) != len(d2t)
        or bool((ids < 0).any() | (ids >= len(t2d)).any())
        or not bool(t2d[ids.clamp(0, len(t2d) - 1)].all())
    ):
        raise HSStoreError("draft vocab maps: d2t and t2d disagree (d2t must map onto exactly the ids t2d marks)")
