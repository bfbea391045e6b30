"""Alignment module (Seifi et al. stage 2): TSupCon against the equations, patch-label voting, module and method."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.methods.align import AlignConfig, AlignmentModule, AlignMethod, patch_labels, tsupcon_loss


def loop_tsupcon(z: torch.Tensor, y: list[int], t: torch.Tensor, tau: float, self_pos: bool, all_k: bool) -> float:
    """Eq. 1-4 of paper 003 term by term, in float64 Python loops."""
    z, t = z.double(), t.double()
    n, k_total = len(y), len(t)

    def s(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b) / tau

    text_sum = 0.0
    for k in range(k_total):
        members = [i for i in range(n) if y[i] == k]
        if not members:
            continue
        terms = []
        for i in members:
            denom = sum(math.exp(s(z[i], t[kk])) for kk in range(k_total))
            denom += sum(math.exp(s(z[i], z[j])) for j in range(n) if j != i)
            terms.append(-s(z[i], t[k]) + math.log(denom))
        text_sum += sum(terms) / len(members)
    image_sum = 0.0
    for i in range(n):
        positives = [p for p in range(n) if y[p] == y[i] and (self_pos or p != i)]
        if not positives:
            continue
        log_denom = math.log(sum(math.exp(s(z[i], z[j])) for j in range(n) if j != i))
        image_sum += sum(-s(z[i], z[p]) + log_denom for p in positives) / len(positives)
    classes = k_total if all_k else len(set(y))
    return (text_sum + image_sum) / (n + classes)


@pytest.mark.parametrize("tau", [1.0, 0.1])
@pytest.mark.parametrize("self_pos", [True, False])
@pytest.mark.parametrize("all_k", [False, True])
def test_tsupcon_matches_equation_loop(tau: float, self_pos: bool, all_k: bool) -> None:
    generator = torch.Generator().manual_seed(7)
    z = F.normalize(torch.randn(7, 5, generator=generator), dim=-1)
    t = F.normalize(torch.randn(4, 5, generator=generator), dim=-1)  # class 3 absent; class 2 is a singleton
    y = [0, 1, 0, 2, 1, 1, 0]
    loss = tsupcon_loss(z, torch.tensor(y), t, tau, self_pos, all_k)
    assert loss.item() == pytest.approx(loop_tsupcon(z, y, t, tau, self_pos, all_k), abs=1e-5)


def test_tsupcon_hand_computed_two_patches() -> None:
    # z1 = t1 = e1, z2 = t2 = e2: ℓ_t(t_k) = -1 + log(e + 1 + 1); ℓ_im(z_i) = -1 + log(exp 0) = -1 (self positive).
    eye = torch.eye(2)
    loss = tsupcon_loss(eye, torch.tensor([0, 1]), eye)
    assert loss.item() == pytest.approx((2 * (-1 + math.log(math.e + 2)) + 2 * -1) / 4, abs=1e-6)
    # Without the self positive both patches are singletons: Σ ℓ_im = 0 but B·N still counts them.
    loss = tsupcon_loss(eye, torch.tensor([0, 1]), eye, include_self_positive=False)
    assert loss.item() == pytest.approx(2 * (-1 + math.log(math.e + 2)) / 4, abs=1e-6)


def test_tsupcon_normaliser_counts_all_text_features_by_default() -> None:
    # z1 = t1 = e1, z2 = t2 = e2, t3 = e3 absent from the batch. Per patch ℓ_t = -1 + log(e + 1 + 1 + 1) (K = 3
    # prototypes and one other patch in the denominator), ℓ_im = -1 + log(exp 0) = -1 (self positive).
    eye = torch.eye(3)
    z, y = eye[:2], torch.tensor([0, 1])
    total = 2 * (-1 + math.log(math.e + 3)) + 2 * -1
    assert tsupcon_loss(z, y, eye).item() == pytest.approx(total / (2 + 3), abs=1e-6)  # Eq. 1: B·N + K, K = 3
    present = tsupcon_loss(z, y, eye, count_absent_classes=False)
    assert present.item() == pytest.approx(total / (2 + 2), abs=1e-6)  # the variant: K = classes present
    assert AlignConfig().count_absent_classes is True


def test_tsupcon_gradients_and_edge_cases() -> None:
    z = F.normalize(torch.randn(5, 3), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(2, 3), dim=-1)
    tsupcon_loss(z, torch.tensor([0, 0, 1, 1, 0]), t).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    single = tsupcon_loss(F.normalize(torch.ones(1, 3), dim=-1), torch.tensor([1]), t)  # only ℓ_t is defined
    expected = -float(t[1].sum()) / math.sqrt(3) + math.log(float(torch.exp(t.sum(1) / math.sqrt(3)).sum()))
    assert single.item() == pytest.approx(expected / 3, abs=1e-6)  # B·N + K = 1 + 2 text features
    empty = torch.zeros(0, 3, requires_grad=True)
    assert tsupcon_loss(empty, torch.zeros(0, dtype=torch.long), t).item() == 0.0
    with pytest.raises(ValueError, match="labels must lie"):
        tsupcon_loss(z, torch.tensor([0, 0, 2, 1, 0]), t)


def test_patch_labels_hand_case() -> None:
    ig = 255
    label = np.array(
        [
            [1, 1, 2, 2, ig, ig],
            [1, 3, 2, ig, ig, ig],
            [4, 4, 5, 5, 6, 6],
            [4, 5, 6, 5, 7, 8],
        ],
        dtype=np.uint8,
    )
    # Cells of 2x2: [1,1,1,3]->1 (3/4); [2,2,2,ig]->2 (3/4); all ignore->ig; [4,4,4,5]->4;
    # [5,5,6,5]->5; [6,6,7,8]->6 (2/4 = min_fraction, kept).
    expected = torch.tensor([[1, 2, ig], [4, 5, 6]])
    assert torch.equal(patch_labels(label, (2, 3)), expected)
    assert torch.equal(patch_labels(torch.from_numpy(label), (2, 3)), expected)
    strict = patch_labels(label, (2, 3), min_fraction=0.75)
    assert torch.equal(strict, torch.tensor([[1, 2, ig], [4, 5, ig]]))
    # Tie 2 vs 2 picks the smaller id; 2 class pixels + 2 ignore pixels is exactly half -> kept.
    assert patch_labels(np.array([[9, 9], [3, 3]]), (1, 1)).item() == 3
    assert patch_labels(np.array([[7, ig], [7, ig]]), (1, 1)).item() == 7
    assert patch_labels(np.array([[7, ig], [ig, ig]]), (1, 1)).item() == ig


def loop_patch_labels(label: np.ndarray, grid: tuple[int, int], ignore: int, min_fraction: float) -> np.ndarray:
    """Direct rule: cell bounds from floor(y * h / H), vote, threshold on the whole cell."""
    height, width = label.shape
    out = np.full(grid, ignore, dtype=np.int64)
    rows, cols = np.arange(height) * grid[0] // height, np.arange(width) * grid[1] // width
    for r in range(grid[0]):
        for c in range(grid[1]):
            cell = label[np.ix_(rows == r, cols == c)]
            values, counts = np.unique(cell[cell != ignore], return_counts=True)
            if len(values) and counts.max() >= min_fraction * cell.size:
                out[r, c] = values[np.argmax(counts)]
    return out


def test_patch_labels_on_real_camvid_annotation(shared_data: Path) -> None:
    from PIL import Image

    path = sorted((shared_data / "camvid" / "valannot").glob("*.png"))[0]
    label = np.array(Image.open(path))
    assert label.shape == (360, 480)
    for grid in [(25, 34), (24, 32)]:  # non-divisible, and divisible (15 px cells)
        ours = patch_labels(label, grid, ignore_index=11, min_fraction=0.5).numpy()
        assert np.array_equal(ours, loop_patch_labels(label, grid, 11, 0.5))
    assert np.array_equal(
        patch_labels(label, (360, 480), ignore_index=11).numpy(), label.astype(np.int64)
    )  # 1 px cells


@pytest.mark.parametrize("head", ["transformer", "mlp", "linear"])
def test_alignment_module_heads(head: str) -> None:
    module = AlignmentModule(in_dim=16, out_dim=8, head=head, heads=4).eval()
    features = torch.randn(2, 16, 3, 4)
    z = module(features)
    assert z.shape == (2, 8, 3, 4)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 3, 4))
    changed = features.clone()
    changed[:, :, 0, 0] += torch.randn(2, 16)  # not a constant shift: LayerNorm would remove that
    other_patches_moved = not torch.allclose(module(changed)[:, :, 1:, :], z[:, :, 1:, :])
    assert other_patches_moved == (head == "transformer")  # only self-attention mixes patches


def test_alignment_module_rejects_unknown_head() -> None:
    with pytest.raises(ValueError, match="align head"):
        AlignmentModule(16, 8, head="conv")


def test_align_method_loss_drops_ignored_patches_and_predicts_cosine() -> None:
    torch.manual_seed(0)
    text = F.normalize(torch.randn(3, 8), dim=-1)
    method = AlignMethod(AlignConfig(heads=4), text, in_dim=16)
    model = method.build_model().eval()
    features = torch.randn(2, 16, 2, 3)
    labels = torch.tensor([[[0, 1, 255], [2, 2, 255]], [[1, 255, 0], [0, 1, 2]]])
    loss, logs = method.loss(model, {"features": features, "patch_labels": labels})
    z = model(features).permute(0, 2, 3, 1).reshape(-1, 8)
    keep = labels.flatten() != 255
    torch.testing.assert_close(loss, tsupcon_loss(z[keep], labels.flatten()[keep], text))
    assert logs["valid_patches"] == 9.0
    logits = method.predict_logits(model, features)
    assert logits.shape == (2, 3, 2, 3)
    torch.testing.assert_close(logits[1, 2, 0, 1], model(features)[1, :, 0, 1] @ text[2])
    optimizer = method.build_optimizer(model)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.01


def test_align_training_separates_classes() -> None:
    # Patch features = class centroid + noise; a few SGD steps must align patches with their text prototypes.
    generator = torch.Generator().manual_seed(0)
    text = torch.linalg.qr(torch.randn(8, 3, generator=generator))[0].T.contiguous()
    centroids = torch.randn(3, 16, generator=generator)
    labels = torch.randint(0, 3, (5, 4, 4), generator=generator)
    features = (centroids[labels] + 0.3 * torch.randn(5, 4, 4, 16, generator=generator)).permute(0, 3, 1, 2)
    torch.manual_seed(0)
    method = AlignMethod(AlignConfig(heads=4, lr=0.5), text, in_dim=16)
    model = method.build_model()
    optimizer = method.build_optimizer(model)
    batch = {"features": features, "patch_labels": labels}
    first, _ = method.loss(model, batch)
    for _ in range(15):
        loss, logs = method.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first.item()
    assert logs["patch_acc"] > 0.95


def test_text_ce_variant_is_cross_entropy_over_prototypes_only() -> None:
    """``loss: text_ce``: -log softmax_k(z·t_k / τ)[y], mean over labelled patches; other patches play no part."""
    text = torch.eye(2)
    method = AlignMethod(AlignConfig(head="linear", loss="text_ce", temperature=0.5), text, in_dim=2)
    model = method.build_model()
    with torch.no_grad():  # identity map: z = normalised feature
        model.proj.weight.copy_(torch.eye(2))
        model.proj.bias.zero_()
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]).T.reshape(1, 2, 1, 3)
    labels = torch.tensor([[[0, 0, 255]]])
    loss, _ = method.loss(model, {"features": features, "patch_labels": labels})
    # patch 0: z = (1, 0), logits (2, 0); patch 1: z = (0.6, 0.8), logits (1.2, 1.6); both labelled 0
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(0.4))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() != pytest.approx(AlignMethod(AlignConfig(head="linear"), text, 2).loss(
        model, {"features": features, "patch_labels": labels})[0].item(), abs=1e-3)


def test_patch_targets_use_the_methods_min_fraction_and_the_vocabularys_ignore_id() -> None:
    """A 301-class vocabulary (uint16 maps: 65535 = unlabelled, 255 = a class). 2 x 2 patches of 14 x 14 px:
    (0, 0) 64 % class 300, (0, 1) 29 % class 1, (1, 0) unlabelled, (1, 1) all class 255; the rest unlabelled."""
    label = np.full((28, 28), 65535, dtype=np.int64)
    label[:9, :14] = 300  # 126 of 196 pixels
    label[:4, 14:] = 1  # 56 of 196
    label[14:, 14:] = 255
    text = F.normalize(torch.randn(301, 8), dim=-1)
    maps = torch.from_numpy(label)[None]
    for min_fraction, expected in ((0.5, [[300, 65535], [65535, 255]]), (0.25, [[300, 1], [65535, 255]]),
                                   (0.7, [[65535, 65535], [65535, 255]])):
        method = AlignMethod(AlignConfig(head="linear", loss="text_ce", min_fraction=min_fraction), text, in_dim=4,
                             ignore_index=65535)
        targets = method.patch_targets(maps, (2, 2))
        assert targets.tolist() == [expected], min_fraction
        _, logs = method.loss(method.build_model(), {"features": torch.randn(1, 4, 2, 2), "patch_labels": targets})
        assert logs["valid_patches"] == sum(v != 65535 for row in expected for v in row)


@pytest.mark.parametrize("method", ["align", "zegclip"])
def test_registry_gives_align_and_zegclip_the_vocabularys_ignore_id(method: str) -> None:
    """pascal_context_459 labels are uint16 with 65535 = unlabelled: the built method must ignore 65535, not 255."""
    from pipeline.data.vocab import load_vocab
    from pipeline.methods.configs import MethodConfig
    from pipeline.methods.registry import METHODS
    from pipeline.models.configs import ClipConfig, Dinov2Config

    cfg = MethodConfig(method=method, prompt_templates="single", clip=ClipConfig(model_name="toy-vit", pretrained=None),
                       dinov2=Dinov2Config(name="toy"))
    built = METHODS[method].build(cfg, load_vocab("pascal_context_459"), torch.device("cpu"))
    assert built.method.ignore_index == 65535
