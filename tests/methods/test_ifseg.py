"""IFSeg-with-CLIP method: grid upsampling, K-NN post-processing, decoder, loss, and an overfitting check."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode, Resize

from pipeline.methods.ifseg import IFSegConfig, IFSegDecoder, IFSegMethod, grid_tokens, knn_postprocess


def random_grids(count: int, classes: int, max_side: int, generator: torch.Generator) -> list[torch.Tensor]:
    """IFSeg law: U, V ~ Uniform{1..max_side}, ids i.i.d. uniform with replacement."""
    grids = []
    for _ in range(count):
        u, v = torch.randint(1, max_side + 1, (2,), generator=generator).tolist()
        grids.append(torch.randint(0, classes, (u, v), generator=generator))
    return grids


@pytest.mark.parametrize("size", [32, 512, 37, 5])
def test_grid_tokens_matches_torchvision_nearest(size: int) -> None:
    generator = torch.Generator().manual_seed(size)
    for grid in random_grids(40, 171, 32, generator):
        expected = Resize((size, size), interpolation=InterpolationMode.NEAREST)(grid[None].to(torch.uint8))[0]
        assert torch.equal(grid_tokens(grid, size), expected.long())


def test_grid_tokens_hand_case() -> None:
    grid = torch.tensor([[0, 1], [2, 3]])
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    assert torch.equal(grid_tokens(grid, 4), expected)
    assert torch.equal(grid_tokens(torch.tensor([[7, 8, 9]]), 2), torch.tensor([[7, 8], [7, 8]]))


def test_grid_tokens_agrees_with_wordgrid_stage_if_present() -> None:
    wordgrid = pytest.importorskip("stages.wordgrid")
    if not hasattr(wordgrid, "upsample_grid"):
        pytest.skip("stages.wordgrid has no upsample_grid yet")
    generator = torch.Generator().manual_seed(3)
    for grid in random_grids(20, 15, 32, generator):
        theirs = wordgrid.upsample_grid(grid.numpy(), 512, 512)
        assert np.array_equal(np.asarray(theirs), grid_tokens(grid, 512).numpy())


def chain_features(length: int) -> torch.Tensor:
    """[1, 2, 1, length] unit vectors at angles 0, 10, 20, ... degrees: neighbours are the adjacent tokens."""
    angles = torch.arange(length, dtype=torch.float64) * math.radians(10)
    return torch.stack([angles.cos(), angles.sin()])[None, :, None, :].float()


def test_knn_postprocess_on_chain_by_hand() -> None:
    # Class-0 probability [1, 0, 0, 0, 0] along a 5-token chain; with k=3 the neighbourhoods are
    # {0,1,2}, {0,1,2}, {1,2,3}, {2,3,4}, {2,3,4}.
    p0 = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    logits = torch.stack([p0, 1 - p0]).log()[None, :, None, :]  # softmax(log p) = p
    one = knn_postprocess(logits, chain_features(5), k=3, iterations=1)
    torch.testing.assert_close(one[0, 0, 0], torch.tensor([1 / 3, 1 / 3, 0, 0, 0]))
    two = knn_postprocess(logits, chain_features(5), k=3, iterations=2)
    torch.testing.assert_close(two[0, 0, 0], torch.tensor([2 / 9, 2 / 9, 1 / 9, 0, 0]))
    torch.testing.assert_close(two.sum(dim=1), torch.ones(1, 1, 5))


def test_knn_postprocess_k1_is_softmax_with_temperature() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=generator)
    features = torch.randn(2, 8, 3, 5, generator=generator)
    out = knn_postprocess(logits, features, k=1, iterations=25, temperature=2.0)
    torch.testing.assert_close(out, torch.softmax(logits / 2.0, dim=1))


def test_knn_postprocess_keeps_self_under_duplicate_features() -> None:
    # All tokens share one feature vector: k=1 must still be each token itself (identity), never a twin.
    logits = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    out = knn_postprocess(logits, torch.ones(1, 4, 2, 2), k=1, iterations=5)
    torch.testing.assert_close(out, torch.softmax(logits, dim=1))


def test_decoder_shapes_and_frozen_classifier() -> None:
    text = F.normalize(torch.randn(6, 16), dim=-1)
    decoder = IFSegDecoder(text, width=32, depth=2, heads=4, pos_grid=8)
    logits = decoder(torch.randn(2, 16, 5, 7))
    assert logits.shape == (2, 6, 5, 7)
    assert "text_embeddings" not in decoder.state_dict()
    assert all(p.data_ptr() != decoder.text_embeddings.data_ptr() for p in decoder.parameters())
    method = IFSegMethod(IFSegConfig(width=32, depth=2, heads=4), text)
    groups = method.param_groups(decoder)
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in decoder.parameters())
    assert groups[0]["lr"] == 5e-5 and groups[0]["weight_decay"] == 0.1


def test_loss_is_bilinear_upsampled_cross_entropy() -> None:
    text = F.normalize(torch.randn(4, 8), dim=-1)
    cfg = IFSegConfig(width=16, depth=1, heads=2, grid_size=4, label_size=8, dropout=0.0, drop_path=0.0)
    method = IFSegMethod(cfg, text)
    model = method.build_model().eval()
    grids = [torch.tensor([[0, 1], [2, 3]]), torch.tensor([[3]])]
    loss, logs = method.loss(model, {"grids": grids})
    tokens = torch.stack([text[grid_tokens(g, 4)] for g in grids]).permute(0, 3, 1, 2)
    targets = torch.stack([grid_tokens(g, 8) for g in grids])
    upsampled = F.interpolate(model(tokens), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(loss, F.cross_entropy(upsampled, targets))
    assert logs["loss"] == pytest.approx(loss.item())
    loss.backward()
    assert model.in_proj.weight.grad is not None and model.pos_embed.grad is not None


def pixel_accuracy(method: IFSegMethod, model: torch.nn.Module, grids: list[torch.Tensor]) -> float:
    with torch.no_grad():
        _, logs = method.loss(model, {"grids": grids})
    return logs["pixel_acc"]


def test_decoder_overfits_word_grids() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    text = torch.linalg.qr(torch.randn(32, 5, generator=generator))[0].T.contiguous()  # 5 orthonormal rows, D=32
    cfg = IFSegConfig(width=64, depth=2, heads=4, drop_path=0.0, grid_size=12, label_size=24, lr=1e-3, weight_decay=0.0)
    method = IFSegMethod(cfg, text)
    model = method.build_model()
    optimizer = method.build_optimizer(model)
    train, held_out = random_grids(64, 5, 12, generator), random_grids(32, 5, 12, generator)
    token_level = IFSegMethod(IFSegConfig(grid_size=12, label_size=12), text)
    assert pixel_accuracy(token_level, model.eval(), held_out) < 0.5  # untrained: about chance (0.2)
    model.train()
    for step in range(40):
        batch = [train[(step * 8 + i) % len(train)] for i in range(8)]
        loss, _ = method.loss(model, {"grids": batch})
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
    model.eval()
    # Score at token resolution: nearest upsampling to 12 and to 24 puts cell borders up to half a token apart,
    # so label-resolution accuracy has a ceiling below 1 even for a perfect token classifier.
    assert pixel_accuracy(token_level, model, held_out) > 0.9


def test_word_cross_attention_equals_hand_computation() -> None:
    from pipeline.methods.ifseg import WordCrossAttention

    torch.manual_seed(0)
    block = WordCrossAttention(width=4, heads=1).eval()
    tokens, words = torch.randn(1, 3, 4), torch.randn(1, 2, 4)
    w_q, w_k, w_v = block.attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = block.attn.in_proj_bias.chunk(3)
    normed = (tokens - tokens.mean(-1, keepdim=True)) / torch.sqrt(tokens.var(-1, unbiased=False, keepdim=True) + 1e-5)
    q, k, v = normed @ w_q.T + b_q, words @ w_k.T + b_k, words @ w_v.T + b_v  # LayerNorm weight 1, bias 0 at init
    weights = torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1)  # sqrt(4) = 2
    expected = tokens + (weights @ v) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    assert torch.allclose(block(tokens, words), expected, atol=1e-5)


def test_decoder_word_cross_attention_shapes_and_effect() -> None:
    torch.manual_seed(0)
    text = F.normalize(torch.randn(6, 16), dim=-1)
    kwargs = {"width": 32, "depth": 2, "heads": 4, "pos_grid": 8, "dropout": 0.0, "drop_path": 0.0}
    with_words = IFSegDecoder(text, **kwargs).eval()
    without = IFSegDecoder(text, word_cross_attention=False, **kwargs).eval()
    assert len(with_words.word_attn) == 2 and without.word_attn is None
    assert with_words.words(3).shape == (3, 6, 32)
    without.load_state_dict({k: v for k, v in with_words.state_dict().items() if k in without.state_dict()})
    tokens = torch.randn(2, 16, 4, 4)
    logits = with_words(tokens)
    assert logits.shape == (2, 6, 4, 4) and not torch.allclose(logits, without(tokens), atol=1e-4)
    with torch.no_grad():  # a zero residual branch leaves the self-attention-only decoder
        for block in with_words.word_attn:
            block.attn.out_proj.weight.zero_()
            block.attn.out_proj.bias.zero_()
    assert torch.allclose(with_words(tokens), without(tokens), atol=1e-5)
    assert IFSegMethod(IFSegConfig(width=32, depth=1, heads=4), text).build_model().word_attn is not None
