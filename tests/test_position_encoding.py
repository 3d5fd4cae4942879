"""Positional encodings: DETR's sine encoding against the official `pos` intermediate of detr_r50.pt, the learned
encoding's layout, and the 3-D (time, y, x) encoding against an element-by-element transcription of its formula."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine, PositionEmbeddingSine3D

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "detr_r50.pt"


@pytest.fixture(scope="module")
def detr_fixture():
    return torch.load(FIXTURE, weights_only=False)


def test_sine_matches_official_pos_intermediate(detr_fixture):
    fx = detr_fixture
    inter = fx["outputs"]["intermediate"]
    hidden_dim = fx["config"]["args"]["hidden_dim"]
    # the feature mask is the image padding mask resized (nearest) to the feature map, as DETR's backbone does
    padded_mask = fx["inputs"]["padded_mask"]
    feature_mask = F.interpolate(padded_mask[None].float(), size=inter["backbone_src"].shape[-2:]).bool()[0]
    assert torch.equal(feature_mask, inter["feature_mask"]), "nearest-resized padding mask differs from the official"
    pos = PositionEmbeddingSine(hidden_dim // 2, normalize=True)(inter["backbone_src"], feature_mask)
    torch.testing.assert_close(pos, inter["pos"], rtol=1e-4, atol=1e-4)


def _reference_axis(count, last, d, temperature=10000.0, scale=2 * math.pi):
    """One position's d sine features, written out per channel."""
    value = count / (last + 1e-6) * scale
    return [math.sin(value / temperature ** (2 * (i // 2) / d)) if i % 2 == 0
            else math.cos(value / temperature ** (2 * (i // 2) / d)) for i in range(d)]


def test_sine_padding_mask_respected():
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[:, 3:, :] = True
    mask[:, :, 4:] = True
    pos = PositionEmbeddingSine(8, normalize=True)(torch.zeros(1, 3, 4, 6), mask)
    assert pos.shape == (1, 16, 4, 6)
    # valid region = 3 rows x 4 cols: y before x; the last valid row/column reaches 2 pi
    for y in range(3):
        for x in range(4):
            expected = _reference_axis(y + 1, 3, 8) + _reference_axis(x + 1, 4, 8)
            torch.testing.assert_close(pos[0, :, y, x], torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # the unpadded crop of a padded map equals the encoding of the crop alone
    alone = PositionEmbeddingSine(8, normalize=True)(torch.zeros(1, 3, 3, 4), torch.zeros(1, 3, 4, dtype=torch.bool))
    torch.testing.assert_close(pos[:, :, :3, :4], alone)


def test_sine_scale_requires_normalize():
    with pytest.raises(ValueError, match="normalize"):
        PositionEmbeddingSine(8, scale=1.0)


def test_learned_layout_and_keys():
    enc = PositionEmbeddingLearned(16)
    assert set(enc.state_dict()) == {"row_embed.weight", "col_embed.weight"}
    assert enc.row_embed.weight.shape == (50, 16)
    pos = enc(torch.zeros(2, 3, 5, 7))
    assert pos.shape == (2, 32, 5, 7)
    # channels [x (col), y (row)], identical across the batch
    torch.testing.assert_close(pos[1, :16, 2, 4], enc.col_embed.weight[4])
    torch.testing.assert_close(pos[0, 16:, 2, 4], enc.row_embed.weight[2])
    torch.testing.assert_close(pos[0], pos[1])
    with pytest.raises(ValueError, match="50"):
        enc(torch.zeros(1, 3, 51, 4))


def _random_frame_masks(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        vh, vw = torch.randint(1, h + 1, (1,), generator=g).item(), torch.randint(1, w + 1, (1,), generator=g).item()
        mask[i, vh:, :] = True
        mask[i, :, vw:] = True
    return mask


def test_sine3d_per_frame_mask_matches_formula():
    """VisTR layout: [B*T, H, W] frame masks, clip-major, channels [z, y, x], every axis normalised."""
    b, t, h, w, d = 2, 3, 4, 5, 6
    mask = _random_frame_masks(b * t, h, w, seed=0)
    pos = PositionEmbeddingSine3D(d, num_frames=t, normalize=True)(torch.zeros(b * t, 3, h, w), mask)
    assert pos.shape == (b, t, 3 * d, h, w)
    not_mask = (~mask).view(b, t, h, w).float()
    z, y, x = not_mask.cumsum(1), not_mask.cumsum(2), not_mask.cumsum(3)
    for bi in range(b):
        for ti in range(t):
            for yi in range(h):
                for xi in range(w):
                    expected = (_reference_axis(z[bi, ti, yi, xi], z[bi, -1, yi, xi], d)
                                + _reference_axis(y[bi, ti, yi, xi], y[bi, ti, -1, xi], d)
                                + _reference_axis(x[bi, ti, yi, xi], x[bi, ti, yi, -1], d))
                    torch.testing.assert_close(pos[bi, ti, :, yi, xi], torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_sine3d_shared_mask_is_expanded_per_frame_mask():
    """TrackFormer layout: one [B, H, W] mask shared by num_frames frames = the VisTR layout with repeated masks;
    its y/x channels then equal the 2-D encoding's."""
    b, t, h, w, d = 2, 2, 4, 5, 8
    mask = _random_frame_masks(b, h, w, seed=1)
    x = torch.zeros(b, 3, h, w)
    shared = PositionEmbeddingSine3D(d, num_frames=t, normalize=True, per_frame_mask=False)(x, mask)
    repeated = PositionEmbeddingSine3D(d, num_frames=t, normalize=True)(x, mask.repeat_interleave(t, 0))
    torch.testing.assert_close(shared, repeated)
    pos2d = PositionEmbeddingSine(d, normalize=True)(x, mask)
    for ti in range(t):
        torch.testing.assert_close(shared[:, ti, d:], pos2d)
    # the time channels hold frame (t + 1) / T * 2 pi wherever the pixel is valid
    for ti in range(t):
        expected = torch.tensor(_reference_axis(ti + 1, t, d))
        torch.testing.assert_close(shared[0, ti, :d, 0, 0], expected, rtol=1e-5, atol=1e-5)


def test_sine3d_rejects_wrong_frame_count():
    with pytest.raises(ValueError, match="num_frames"):
        PositionEmbeddingSine3D(4, num_frames=3, normalize=True)(torch.zeros(4, 3, 2, 2),
                                                                 torch.zeros(4, 2, 2, dtype=torch.bool))
