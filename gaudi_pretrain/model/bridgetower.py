"""BridgeTower backbone: CLIP vision tower, RoBERTa text tower and the bridged cross-modal encoder.

Module and parameter names are exactly transformers' `BridgeTowerModel` names, so its state dicts load
with strict=True and no key map. Unlike transformers' version this one is built for training speed:
SDPA attention through a kernel chosen at construction (`attention.attention_kernel`), static shapes everywhere,
optional per-layer activation checkpointing, fp32 LayerNorm under bf16 autocast, and the model is split
into `encode_images` / `encode_text` / `cross_encode` so the pretraining step runs the vision tower once
and reuses it for the MLM and ITM passes.

Data flow (T text layers, C cross layers, split = T - C + 1; Li = grid² + 1 image tokens):
    text layers 1..split      → cross_modal_text_transform + type 0 → cross_modal_text_layernorm → cross 1
    vision layers 1..split    → ln_post → cross_modal_image_transform + type 1 → cross_modal_image_layernorm
    uni-modal layer split+k   → (ln_post →) transform + type → link tower k: LN(bridge + cross k out) → cross k+1
    cross text layer: self-attn (text mask) → cross-attn to image (no mask) → FFN
    cross image layer: self-attn (no mask) → cross-attn to text (text mask) → FFN
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gaudi_pretrain.config import ModelConfig
from gaudi_pretrain.errors import ConfigError
from gaudi_pretrain.model.attention import QKV, AttentionFn, FusedInProjAttention, attention_kernel
from gaudi_pretrain.model.precision import fp32_region

DROPOUT = 0.1  # transformers' BridgeTowerTextConfig hidden/attention dropout (also used by the cross layers)
INIT_STD = 0.05  # transformers' BridgeTowerPreTrainedModel._init_weights: 0.05 × initializer_factor (1)

Features = tuple[torch.Tensor, ...]  # one [B, N, H] tensor per cross-modal layer (the bridge inputs)


def set_dropout(module: nn.Module, p: float) -> None:
    """Set every dropout (nn.Dropout modules and the attention-probability rate) to `p`."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = p


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that normalises in fp32 (same parameters and names), also where autocast would run
    layer_norm in bf16 (Gaudi's default list: see precision.py); returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        with fp32_region(x):
            return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class _Checkpointable(nn.Module):
    """Runs a layer under torch.utils.checkpoint when activation checkpointing is on and grads are needed."""

    checkpointing: bool = False

    def run(self, fn: Callable, *args):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


# ------------------------------------------------------------------------------------------- vision


class VisionEmbeddings(nn.Module):
    def __init__(self, dim: int, patch: int, image_size: int):
        super().__init__()
        self.grid = image_size // patch
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding(self.grid**2 + 1, dim)
        self.register_buffer("position_ids", torch.arange(self.grid**2 + 1), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] → [B, Li, D]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, D, g, g]
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        # Embeddings are looked up by calling their modules, never through `.weight`: ZeRO-3 gathers a
        # partitioned parameter only when its own module runs.
        return torch.cat([cls, x], dim=1) + self.position_embedding(self.position_ids).to(x.dtype)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN CLIP block: x + attn(ln_1(x)); x + c_proj(QuickGELU(c_fc(ln_2(x))))."""

    def __init__(self, dim: int, eps: float, attend: AttentionFn):
        super().__init__()
        self.attn = FusedInProjAttention(dim, dim // 64, attend)  # transformers: heads = hidden // 64
        self.ln_1 = LayerNorm(dim, eps=eps)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(dim, 4 * dim), "c_proj": nn.Linear(4 * dim, dim)})
        self.ln_2 = LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp["c_proj"](quick_gelu(self.mlp["c_fc"](self.ln_2(x))))


class VisionTransformerStack(nn.Module):
    def __init__(self, dim: int, layers: int, eps: float, attend: AttentionFn):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(dim, eps, attend) for _ in range(layers))


class VisualTower(_Checkpointable):
    """`vision_model.visual`: embeddings → ln_pre → resblocks; ln_post is applied to every bridged output
    (transformers' share_layernorm=True, as released)."""

    def __init__(self, cfg: ModelConfig, attend: AttentionFn):
        super().__init__()
        v = cfg.vision
        self.embeddings = VisionEmbeddings(v.hidden_size, v.patch_size, v.image_size)
        self.ln_pre = LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.transformer = VisionTransformerStack(v.hidden_size, v.num_hidden_layers, v.layer_norm_eps, attend)
        self.ln_post = LayerNorm(v.hidden_size, eps=v.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, num_layers: int | None = None) -> list[torch.Tensor]:
        """Outputs of the first `num_layers` blocks (all by default), each [B, Li, D], before ln_post."""
        x = self.ln_pre(self.embeddings(pixel_values))
        outs = []
        for block in self.transformer.resblocks[:num_layers]:
            x = self.run(block, x)
            outs.append(x)
        return outs


class VisionModel(nn.Module):
    def __init__(self, cfg: ModelConfig, attend: AttentionFn):
        super().__init__()
        self.visual = VisualTower(cfg, attend)


# --------------------------------------------------------------------------------------------- text


class TextEmbeddings(nn.Module):
    """RoBERTa embeddings: positions count non-pad tokens from pad_id + 1; token type is always 0."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.text
        self.pad_id = t.pad_token_id
        self.word_embeddings = nn.Embedding(t.vocab_size, t.hidden_size, padding_idx=t.pad_token_id)
        self.position_embeddings = nn.Embedding(t.max_position_embeddings, t.hidden_size, padding_idx=t.pad_token_id)
        self.token_type_embeddings = nn.Embedding(1, t.hidden_size)
        self.register_buffer("token_type_ids", torch.zeros(1, dtype=torch.long), persistent=False)
        self.LayerNorm = LayerNorm(t.hidden_size, eps=t.layer_norm_eps)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, L] → [B, L, H]
        not_pad = input_ids.ne(self.pad_id).long()
        positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_id
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(self.token_type_ids)
        )
        return self.dropout(self.LayerNorm(x))


class AttentionOutput(nn.Module):
    """`dense` → dropout → LayerNorm(· + residual) (BERT's SelfOutput and Output)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = LayerNorm(d_out, eps=eps)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    """BERT attention block: `self` (query/key/value) then `output`."""

    def __init__(self, dim: int, heads: int, eps: float, attend: AttentionFn):
        super().__init__()
        self.self = QKV(dim, heads, DROPOUT, attend)
        self.output = AttentionOutput(dim, dim, eps)

    def forward(self, x, context, key_mask):
        return self.output(self.self(x, context, key_mask), x)


class Intermediate(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.dense = nn.Linear(dim, ffn)

    def forward(self, x):
        return F.gelu(self.dense(x))


class TextLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, eps: float, attend: AttentionFn):
        super().__init__()
        self.attention = Attention(dim, heads, eps, attend)
        self.intermediate = Intermediate(dim, ffn)
        self.output = AttentionOutput(ffn, dim, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, mask)
        return self.output(self.intermediate(x), x)


class CrossLayer(nn.Module):
    """Self-attention over its own modality, cross-attention to the other, FFN (post-LN, BERT style)."""

    def __init__(self, dim: int, heads: int, ffn: int, eps: float, attend: AttentionFn):
        super().__init__()
        self.attention = Attention(dim, heads, eps, attend)
        self.crossattention = Attention(dim, heads, eps, attend)
        self.intermediate = Intermediate(dim, ffn)
        self.output = AttentionOutput(ffn, dim, eps)

    def forward(self, x, x_mask, context, context_mask):
        x = self.attention(x, x, x_mask)
        x = self.crossattention(x, context, context_mask)
        return self.output(self.intermediate(x), x)


class TextEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, attend: AttentionFn):
        super().__init__()
        t = cfg.text
        self.layer = nn.ModuleList(
            TextLayer(t.hidden_size, t.num_attention_heads, t.intermediate_size, t.layer_norm_eps, attend)
            for _ in range(t.num_hidden_layers)
        )


class Pooler(nn.Module):
    """First token → Linear → tanh."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class TextModel(_Checkpointable):
    """`text_model`: RoBERTa. Its `pooler` is unused by BridgeTower but kept: it is in the checkpoints."""

    def __init__(self, cfg: ModelConfig, attend: AttentionFn):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = TextEncoder(cfg, attend)
        self.pooler = Pooler(cfg.text.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every layer, each [B, L, H]."""
        x = self.embeddings(input_ids)
        outs = []
        for layer in self.encoder.layer:
            x = self.run(layer, x, attention_mask)
            outs.append(x)
        return outs


class LinkTower(nn.Module):
    """Bridge of type "add": LayerNorm(uni-modal bridge input + previous cross-modal output)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.LayerNorm = LayerNorm(dim, eps=eps)

    def forward(self, bridge: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(bridge + cross)


# -------------------------------------------------------------------------------------- the model


def check_architecture(cfg: ModelConfig) -> None:
    """Constraints of transformers' BridgeTower that ModelConfig alone does not state."""
    t, v = cfg.text, cfg.vision
    if cfg.num_hidden_layers > t.num_hidden_layers:
        raise ConfigError(
            f"model.num_hidden_layers {cfg.num_hidden_layers} exceeds model.text.num_hidden_layers {t.num_hidden_layers}"
        )
    if v.num_hidden_layers != t.num_hidden_layers:
        raise ConfigError(
            f"model.vision.num_hidden_layers {v.num_hidden_layers} must equal model.text.num_hidden_layers "
            f"{t.num_hidden_layers} (each uni-modal layer pair feeds one bridge)"
        )
    if cfg.num_attention_heads != t.num_attention_heads:
        raise ConfigError(
            f"model.num_attention_heads {cfg.num_attention_heads} must equal model.text.num_attention_heads "
            f"{t.num_attention_heads} (transformers builds the cross-modal layers from the text config)"
        )


class BridgeTowerModel(_Checkpointable):
    """`attention_fn`: a backend's fused attention kernel for `model.attention: sdpa` (None: torch's SDPA)."""

    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn | None = None):
        super().__init__()
        check_architecture(cfg)
        attend = attention_kernel(cfg.attention, attention_fn)
        self.cfg = cfg
        t, h = cfg.text, cfg.hidden_size
        self.split_index = t.num_hidden_layers - cfg.num_hidden_layers + 1
        self.cross_modal_text_transform = nn.Linear(t.hidden_size, h)
        self.cross_modal_image_transform = nn.Linear(cfg.vision.hidden_size, h)
        self.token_type_embeddings = nn.Embedding(2, h)  # 0 = text, 1 = image
        self.register_buffer("token_type_ids", torch.arange(2).unsqueeze(1), persistent=False)  # [[0], [1]]
        self.vision_model = VisionModel(cfg, attend)
        self.text_model = TextModel(cfg, attend)

        def cross_layers():
            return nn.ModuleList(
                CrossLayer(h, t.num_attention_heads, t.intermediate_size, t.layer_norm_eps, attend)
                for _ in range(cfg.num_hidden_layers)
            )

        self.cross_modal_image_layers = cross_layers()
        self.cross_modal_text_layers = cross_layers()
        self.cross_modal_image_pooler = Pooler(h)
        self.cross_modal_text_pooler = Pooler(h)
        self.cross_modal_text_layernorm = LayerNorm(h, eps=cfg.layer_norm_eps)
        self.cross_modal_image_layernorm = LayerNorm(h, eps=cfg.layer_norm_eps)
        links = cfg.num_hidden_layers - 1
        self.cross_modal_text_link_tower = nn.ModuleList(LinkTower(h, cfg.layer_norm_eps) for _ in range(links))
        self.cross_modal_image_link_tower = nn.ModuleList(LinkTower(h, cfg.layer_norm_eps) for _ in range(links))
        self.set_grad_checkpointing(cfg.activation_checkpointing)
        set_dropout(self, cfg.dropout)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every uni-modal and cross-modal layer (recompute activations in backward)."""
        self.checkpointing = enable
        self.vision_model.visual.checkpointing = enable
        self.text_model.checkpointing = enable

    def encode_images(self, pixel_values: torch.Tensor) -> Features:
        """Image-side bridge inputs, a pure function of the image: C tensors [B, Li, H].

        Layer `split_index` output (and every later layer's) → ln_post → transform + image type embedding;
        the first also through cross_modal_image_layernorm."""
        visual = self.vision_model.visual
        outs = visual(pixel_values, num_layers=self.cfg.text.num_hidden_layers)[self.split_index - 1 :]
        type_emb = self.token_type_embeddings(self.token_type_ids[1])
        feats = [self.cross_modal_image_transform(visual.ln_post(x)) + type_emb for x in outs]
        feats[0] = self.cross_modal_image_layernorm(feats[0])
        return tuple(feats)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Features:
        """Text-side bridge inputs: C tensors [B, L, H] (transform + text type embedding; first one normed)."""
        outs = self.text_model(input_ids, attention_mask)[self.split_index - 1 :]
        type_emb = self.token_type_embeddings(self.token_type_ids[0])
        feats = [self.cross_modal_text_transform(x) + type_emb for x in outs]
        feats[0] = self.cross_modal_text_layernorm(feats[0])
        return tuple(feats)

    def _cross_layer(self, k: int, text: torch.Tensor, image: torch.Tensor, mask: torch.Tensor):
        t_out = self.cross_modal_text_layers[k](text, mask, image, None)  # text → all image tokens
        i_out = self.cross_modal_image_layers[k](image, None, text, mask)  # image → non-pad text tokens
        return t_out, i_out

    def cross_encode(self, text: Features, attention_mask: torch.Tensor, image: Features):
        """Bridged cross-modal encoder → (text_features [B, L, H], image_features [B, Li, H])."""
        t_in, i_in = text[0], image[0]
        t_out, i_out = self.run(self._cross_layer, 0, t_in, i_in, attention_mask)
        for k in range(1, len(self.cross_modal_text_layers)):
            t_in = self.cross_modal_text_link_tower[k - 1](text[k], t_out)
            i_in = self.cross_modal_image_link_tower[k - 1](image[k], i_out)
            t_out, i_out = self.run(self._cross_layer, k, t_in, i_in, attention_mask)
        return t_out, i_out

    def pool(self, text_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Pooled text CLS ‖ pooled image CLS: [B, 2H]."""
        return torch.cat(
            [self.cross_modal_text_pooler(text_features), self.cross_modal_image_pooler(image_features)], -1
        )

    def forward(self, input_ids, attention_mask, pixel_values):
        """One full forward: (text_features, image_features, pooled) like transformers' BridgeTowerModel."""
        text_f, image_f = self.cross_encode(
            self.encode_text(input_ids, attention_mask), attention_mask, self.encode_images(pixel_values)
        )
        return text_f, image_f, self.pool(text_f, image_f)


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """transformers' BridgeTower init (`BridgeTowerPreTrainedModel._init_weights`): normal(0, 0.05) for
    linear, conv and embedding weights, zero biases, LayerNorm 1/0, pad embedding rows zero; then OpenAI
    CLIP's scheme for each visual tower, from its own width W and depth L: class and position embeddings and
    attention in-projections N(0, W^-0.5), out-projections and c_proj N(0, W^-0.5 (2L)^-0.5), c_fc
    N(0, (2W)^-0.5). The CLIP part matters: at 0.05 (or 0.02) the position signal is a few % of the patch
    content and a tower trained from scratch takes thousands of steps to learn where things are."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=INIT_STD)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, FusedInProjAttention):
            nn.init.normal_(m.in_proj_weight, std=INIT_STD)
            nn.init.zeros_(m.in_proj_bias)
    for tower in (m for m in module.modules() if isinstance(m, VisualTower)):  # after: it overrides the above
        width, depth = tower.embeddings.class_embedding.shape[0], len(tower.transformer.resblocks)
        attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * depth) ** -0.5, (2 * width) ** -0.5
        nn.init.normal_(tower.embeddings.class_embedding, std=attn_std)
        nn.init.normal_(tower.embeddings.position_embedding.weight, std=attn_std)
        for block in tower.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp["c_fc"].weight, std=fc_std)
            nn.init.normal_(block.mlp["c_proj"].weight, std=proj_std)
