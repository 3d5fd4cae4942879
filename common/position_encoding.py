"""Positional encodings of the DETR family: 2-D sine, learned, and 3-D (time, y, x) sine.

All modules take ``(x, mask)``: ``x`` is the feature map (only its shape and device are used) and ``mask`` is a bool
tensor that is True on padding. Numerics follow the official code exactly (float32 cumulative sums, eps 1e-6 in the
normalisation, ``dim_t = temperature ** (2 * (i // 2) / num_pos_feats)``, sine on even / cosine on odd channels,
interleaved), so that the released checkpoints see the same inputs they were trained with.

- ``PositionEmbeddingSine``: DETR (facebookresearch/detr ``models/position_encoding.py``); ``offset=-0.5`` gives the
  Deformable-DETR / TrackFormer single-frame variant.
- ``PositionEmbeddingLearned``: DETR's ``--position_embedding learned`` (keys ``row_embed`` / ``col_embed``, 50 rows).
- ``PositionEmbeddingSine3D``: VisTR's and TrackFormer's multi-frame encoding (channels ``[z, y, x]``), with the two
  ways those repositories form the time axis (see ``per_frame_mask``).
"""
import math

import torch
from torch import nn


def _sine_features(embed, dim_t):
    """[..., ] positions -> [..., num_pos_feats]: sin on even channels, cos on odd ones, interleaved pairwise."""
    pos = embed[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def _frequencies(num_pos_feats, temperature, device):
    # dim_t_i = T^(2 floor(i/2) / d): channel pairs (2k, 2k+1) share a frequency
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * (dim_t // 2) / num_pos_feats)


def _check_scale(scale, normalize):
    if scale is not None and not normalize:
        raise ValueError("PositionEmbeddingSine: `scale` is only used with normalize=True")
    return 2 * math.pi if scale is None else scale


class PositionEmbeddingSine(nn.Module):
    """2-D sine encoding of "Attention is all you need", per axis, as DETR computes it.

    forward(x [B, C, H, W], mask [B, H, W] bool, True on padding) -> pos [B, 2 * num_pos_feats, H, W], channels
    ``[y (num_pos_feats), x (num_pos_feats)]``. Positions count only non-padded pixels (cumulative sum of ~mask);
    with ``normalize`` they are divided by the last count (+ eps 1e-6) and multiplied by ``scale`` (default 2 pi).
    ``offset`` is added to the counts before normalising: 0 in DETR, -0.5 in Deformable DETR / TrackFormer.
    """

    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None, offset=0.0):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = _check_scale(scale, normalize)
        self.offset = offset

    def forward(self, x, mask=None):
        if mask is None:
            mask = torch.zeros((x.shape[0], *x.shape[-2:]), dtype=torch.bool, device=x.device)
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # [B, H, W]
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = _frequencies(self.num_pos_feats, self.temperature, x.device)
        pos_y = _sine_features(y_embed, dim_t)  # [B, H, W, num_pos_feats]
        pos_x = _sine_features(x_embed, dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, 2 * num_pos_feats, H, W]


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: a row and a column table of 50 entries each (feature maps up to 50 x 50).

    forward(x [B, C, H, W], mask ignored) -> pos [B, 2 * num_pos_feats, H, W], channels ``[x (col), y (row)]``
    as in DETR (note: the opposite order of the sine encoding).
    """

    def __init__(self, num_pos_feats=256, num_embeddings=50):
        super().__init__()
        self.row_embed = nn.Embedding(num_embeddings, num_pos_feats)
        self.col_embed = nn.Embedding(num_embeddings, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, x, mask=None):
        h, w = x.shape[-2:]
        limit = self.row_embed.num_embeddings
        if h > limit or w > limit:
            raise ValueError(f"PositionEmbeddingLearned holds {limit} rows/columns, got a {h}x{w} feature map")
        x_emb = self.col_embed(torch.arange(w, device=x.device))  # [W, D]
        y_emb = self.row_embed(torch.arange(h, device=x.device))  # [H, D]
        pos = torch.cat([x_emb.unsqueeze(0).expand(h, w, -1), y_emb.unsqueeze(1).expand(h, w, -1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).repeat(x.shape[0], 1, 1, 1)  # [B, 2 * D, H, W]


class PositionEmbeddingSine3D(nn.Module):
    """3-D sine encoding over (time, y, x) used by VisTR and TrackFormer; channels ``[z, y, x]``, each num_pos_feats.

    Both official implementations compute the same formula on a [B, T, H, W] padding mask: cumulative sums of
    ~mask over time (z), rows (y) and columns (x), each normalised by its last value (+ eps 1e-6) times ``scale``
    when ``normalize``, then the DETR sine features. They differ only in how the [B, T, H, W] mask is formed:

    - ``per_frame_mask=True`` (VisTR, ``models/position_encoding.py``): ``mask`` is [B * T, H, W], one mask per
      frame, frames of a clip consecutive (clip-major); it is reshaped to [B, T, H, W].
    - ``per_frame_mask=False`` (TrackFormer, ``PositionEmbeddingSine3D``): ``mask`` is [B, H, W], one mask per
      sample, repeated over the ``num_frames`` frames (previous and current frame share it).

    forward(x, mask) -> pos [B, T, 3 * num_pos_feats, H, W]. Used with hidden_dim // 3 features per axis
    (VisTR 384 // 3 = 128, TrackFormer 288 // 3 = 96).
    """

    def __init__(self, num_pos_feats=64, num_frames=2, temperature=10000, normalize=False, scale=None,
                 per_frame_mask=True):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.num_frames = num_frames
        self.temperature = temperature
        self.normalize = normalize
        self.scale = _check_scale(scale, normalize)
        self.per_frame_mask = per_frame_mask

    def forward(self, x, mask):
        n, h, w = mask.shape
        if self.per_frame_mask:
            if n % self.num_frames:
                raise ValueError(f"PositionEmbeddingSine3D: {n} frame masks is not a multiple of "
                                 f"num_frames={self.num_frames}")
            mask = mask.reshape(n // self.num_frames, self.num_frames, h, w)
        else:
            mask = mask.view(n, 1, h, w).expand(n, self.num_frames, h, w)
        not_mask = ~mask
        z_embed = not_mask.cumsum(1, dtype=torch.float32)  # [B, T, H, W]
        y_embed = not_mask.cumsum(2, dtype=torch.float32)
        x_embed = not_mask.cumsum(3, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            z_embed = z_embed / (z_embed[:, -1:, :, :] + eps) * self.scale
            y_embed = y_embed / (y_embed[:, :, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, :, -1:] + eps) * self.scale
        dim_t = _frequencies(self.num_pos_feats, self.temperature, x.device)
        pos = torch.cat([_sine_features(e, dim_t) for e in (z_embed, y_embed, x_embed)], dim=4)
        return pos.permute(0, 1, 4, 2, 3)  # [B, T, 3 * num_pos_feats, H, W]
