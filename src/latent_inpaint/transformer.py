"""Stage 2: the bidirectional transformer that predicts the tokens of masked positions (Eq. 6).

The input is C(D): each visible token is looked up in the VQGAN codebook (frozen, saved with the
model) and projected to the model width; every masked position gets one learned [MASK] embedding.
Attention keys are restricted to the visible positions plus each query's own position, so a
masked position is never context for another one ("don't look into the dark"): the token ids
written at masked positions cannot change any output.

Tokens are (B, N) with N = grid * grid in raster order; `visible` is (B, N) bool.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from latent_inpaint.config import TransformerConfig, build, to_dict


def _checked(tokens: torch.Tensor, visible: torch.Tensor, grid: int) -> torch.Tensor:
    """`visible` as bool, once tokens (B, N) and visible (B, N) are a grid x grid map."""
    if tokens.shape[1] != grid * grid:
        raise ValueError(f"expected {grid}x{grid} = {grid * grid} tokens, got {tokens.shape[1]}")
    if visible.shape != tokens.shape:
        raise ValueError(f"visible {tuple(visible.shape)} must match tokens {tuple(tokens.shape)}")
    return visible.bool()


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head}")
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, N, C); allowed (B, 1, N, N) bool: query i may attend to key j."""
        b, n, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (t.view(b, n, self.n_head, c // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, N, C/H)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(b, n, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block (minGPT): x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), allowed)
        return x + self.mlp(self.ln_2(x))


class BidirectionalTransformer(nn.Module):
    """Logits over the K codebook entries for every position, from the visible tokens alone."""

    def __init__(self, cfg: TransformerConfig, codebook: torch.Tensor, grid: int):
        super().__init__()
        if codebook.dim() != 2:
            raise ValueError(f"codebook must be (K, embed_dim), got shape {tuple(codebook.shape)}")
        self.cfg = cfg
        self.grid = grid
        self.n_embed, embed_dim = codebook.shape  # K, n_z
        # A buffer, not a parameter: the VQGAN's codebook is fixed, and saving it with the model
        # keeps a checkpoint self-contained.
        self.register_buffer("codebook", codebook.detach().clone())
        self.tok_proj = nn.Linear(embed_dim, cfg.n_embd)
        self.mask_emb = nn.Parameter(torch.zeros(cfg.n_embd))
        self.pos_emb = nn.Parameter(torch.zeros(grid * grid, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, self.n_embed, bias=False)

        self.apply(self._init_weights)
        nn.init.normal_(self.mask_emb, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), as each block adds two.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def spec(self) -> dict:
        """What rebuilds this model (saved.load_model); the codebook is in its weights."""
        return {"model": type(self).__name__, "transformer": to_dict(self.cfg), "n_embed": self.n_embed,
                "embed_dim": self.codebook.shape[1], "grid": self.grid}

    @classmethod
    def from_spec(cls, spec: dict) -> BidirectionalTransformer:
        codebook = torch.zeros(spec["n_embed"], spec["embed_dim"])  # a placeholder the saved weights replace
        return cls(build(TransformerConfig, spec["transformer"], "transformer spec"), codebook, spec["grid"])

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on Linear weights only (the official setting); none on biases,
        LayerNorm, [MASK] or positional embeddings."""
        decay = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = list(self.parameters())
        return [
            {"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
        ]

    def forward(self, tokens: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """tokens (B, N) long, visible (B, N) bool -> logits (B, N, K).

        Ids at masked positions are ignored (any value, e.g. -1, is allowed there).
        """
        b, n = tokens.shape
        visible = _checked(tokens, visible, self.grid)
        ids = torch.where(visible, tokens, torch.zeros_like(tokens))  # masked ids may be out of range
        code = self.tok_proj(self.codebook[ids])  # (B, N, C)
        x = torch.where(visible[..., None], code, self.mask_emb.to(code.dtype))
        x = self.drop(x + self.pos_emb)

        # Keys: the visible positions, plus the query itself so a masked query has something to
        # attend to. (B, 1, N, N), shared by the heads.
        own = torch.eye(n, dtype=torch.bool, device=tokens.device)
        allowed = (visible[:, None, :] | own)[:, None]
        for block in self.blocks:
            x = block(x, allowed)
        return self.head(self.ln_f(x))  # (B, N, K)


class OfficialTransformer(nn.Module):
    """The authors' released transformer (transformer.variant "official"), with the same interface
    and blocks as BidirectionalTransformer but their input: token ids (code i is id i + 1, id 0 is
    [MASK]) through a learned embedding `tok_emb` of K + 1 rows, and a start token (id 0, always
    visible) in front, so `pos_emb` has N + 1 rows and the head K + 1 classes. Class 0 ([MASK])
    and the start position are dropped from the logits `forward` returns."""

    def __init__(self, cfg: TransformerConfig, n_embed: int, grid: int):
        super().__init__()
        self.cfg, self.grid, self.n_embed = cfg, grid, n_embed
        self.tok_emb = nn.Embedding(n_embed + 1, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(grid * grid + 1, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, n_embed + 1, bias=False)
        self.apply(BidirectionalTransformer._init_weights)
        nn.init.normal_(self.tok_emb.weight, std=0.02)

    def spec(self) -> dict:
        """What rebuilds this model (saved.load_model)."""
        return {"model": type(self).__name__, "transformer": to_dict(self.cfg), "n_embed": self.n_embed,
                "grid": self.grid}

    @classmethod
    def from_spec(cls, spec: dict) -> OfficialTransformer:
        return cls(build(TransformerConfig, spec["transformer"], "transformer spec"), spec["n_embed"], spec["grid"])

    num_parameters = BidirectionalTransformer.num_parameters
    param_groups = BidirectionalTransformer.param_groups

    def forward_ids(self, ids: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Their GPT as is: ids (B, N+1) long with the start token first, visible (B, N+1) ->
        logits (B, N+1, K+1)."""
        n = ids.shape[1]
        x = self.drop(self.tok_emb(ids) + self.pos_emb[:n])
        own = torch.eye(n, dtype=torch.bool, device=ids.device)
        allowed = (visible.bool()[:, None, :] | own)[:, None]  # (B, 1, N+1, N+1)
        for block in self.blocks:
            x = block(x, allowed)
        return self.head(self.ln_f(x))

    def forward(self, tokens: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """As BidirectionalTransformer.forward: tokens (B, N) long, visible (B, N) bool -> logits (B, N, K)."""
        b, n = tokens.shape
        visible = _checked(tokens, visible, self.grid)
        ids = torch.where(visible, tokens + 1, torch.zeros_like(tokens))
        start = torch.zeros(b, 1, dtype=ids.dtype, device=ids.device)
        seen = torch.ones(b, 1, dtype=torch.bool, device=ids.device)
        logits = self.forward_ids(torch.cat([start, ids], 1), torch.cat([seen, visible], 1))
        return logits[:, 1:, 1:]  # (B, N, K)


def build_transformer(cfg: TransformerConfig, codebook: torch.Tensor, grid: int) -> nn.Module:
    """The stage-2 transformer transformer.variant names: the paper's (codebook-vector input) or
    the released one (token ids)."""
    if cfg.variant == "official":
        return OfficialTransformer(cfg, codebook.shape[0], grid)
    return BidirectionalTransformer(cfg, codebook, grid)
