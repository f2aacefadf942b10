"""CP-ViT, ToMe, token runners and FLOP counts."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nnlab.models import create_model
from nnlab.prune import cpvit, tome
from nnlab.prune.flops import vit_macs
from nnlab.prune.runners import CPViTRunner, ToMeRunner, TokenRunner


@pytest.fixture
def vit():
    return create_model("vit-test", num_classes=5, in_chans=3, image_size=16).eval()  # 16 patches, depth 3


def test_column_mass_and_head_scores():
    probs = torch.rand(2, 3, 5, 5).softmax(-1)
    mass = cpvit.column_mass(probs)
    torch.testing.assert_close(mass.sum(-1), torch.full((2,), 15.0))
    hs = cpvit.head_scores(probs, mass)
    assert hs.shape == (2, 3) and bool((hs > 0).all())
    # A head that only looks at the highest-score token scores higher than a uniform head
    focused = torch.zeros(1, 2, 4, 4)
    focused[0, 0, :, 2] = 1.0
    focused[0, 1] = 0.25
    s = cpvit.head_scores(focused, torch.tensor([[1.0, 1.0, 5.0, 1.0]]))
    assert s[0, 0] > s[0, 1]


def test_attention_range():
    peaked = torch.tensor([[10.0, 0.1, 0.1, 0.1]])
    flat = torch.ones(1, 4)
    assert cpvit.attention_range(peaked).item() == pytest.approx(0.25)
    assert cpvit.attention_range(flat).item() == pytest.approx(1.0)


@pytest.mark.parametrize("target", [0.1, 0.5, 0.8])
def test_cascade_ratios_meet_target_and_grow(target):
    ranges = [0.9, 0.8, 0.5, 0.6, 0.4, 0.3]
    r = cpvit.cascade_ratios(target, ranges, r_max=0.95)
    assert sum(r) / len(r) == pytest.approx(target, abs=1e-6)
    assert all(b >= a for a, b in zip(r, r[1:])) and max(r) <= 0.95


def test_cascade_ratios_adapt_to_range():
    wide = cpvit.cascade_ratios(0.3, [0.5, 1.0, 0.5, 0.5], r_max=0.95)
    narrow = cpvit.cascade_ratios(0.3, [0.5, 0.1, 0.5, 0.5], r_max=0.95)
    assert narrow[1] > wide[1]
    with pytest.raises(ValueError):
        cpvit.cascade_ratios(1.0, [0.5], 0.9)


def test_keep_counts_monotone():
    k = cpvit.keep_counts([0.1, 0.05, 0.5, 0.99], 10)
    assert k == [9, 9, 5, 1]


def test_select_patches_matches_reference():
    x, s = torch.randn(3, 9, 4), torch.rand(3, 9)
    fast_x, fast_s = cpvit.select_patches(x, s, 4)
    ref_x, ref_s = cpvit.select_patches_reference(x, s, 4)
    order = fast_s[:, 1:].argsort(-1)  # compare as sets: sort both by score
    torch.testing.assert_close(fast_x[:, 0], x[:, 0])
    torch.testing.assert_close(fast_s[:, 1:].sort(-1).values, ref_s[:, 1:].sort(-1).values)
    torch.testing.assert_close(fast_x[:, 1:].gather(1, order[..., None].expand(-1, -1, 4)),
                               ref_x[:, 1:].gather(1, ref_s[:, 1:].argsort(-1)[..., None].expand(-1, -1, 4)))


def test_cpvit_runner_without_pruning_equals_base(vit):
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(CPViTRunner(vit, [16, 16, 16])(x), vit(x), atol=1e-5, rtol=1e-5)


def test_cpvit_runner_removes_tokens(vit):
    keep = cpvit.keep_counts(cpvit.cascade_ratios(0.5, [0.8, 0.7, 0.6], 1 - 1 / 16), 16)
    run = CPViTRunner(vit, keep)
    with torch.no_grad():
        assert run(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert run.token_counts().mlp == [1 + k for k in keep]
    assert run.achieved_ratio() == pytest.approx(1 - sum(keep) / 48)
    base = TokenRunner(vit)
    with torch.no_grad():
        base(torch.randn(2, 3, 16, 16))
    assert run.macs() < 0.75 * base.macs()


def test_cpvit_pruned_patch_stays_pruned(vit):
    """A patch whose content is erased (zero) vanishes in layer 0 and never comes back: the kept
    set of a later layer is a subset of the earlier one by construction (gather from survivors)."""
    run = CPViTRunner(vit, [8, 4, 2])
    with torch.no_grad():
        run(torch.randn(2, 3, 16, 16))
    assert run.token_counts().attn == [17, 9, 5]


def test_bipartite_matching_protects_cls_and_merges_r():
    metric = torch.randn(2, 9, 4)
    plan = tome.bipartite_soft_matching(metric, 3)
    assert plan.src.shape == (2, 3) and plan.unmerged.shape == (2, 2)
    assert bool((plan.unmerged[:, 0] == 0).all())        # CLS stays first
    assert not bool((plan.src == 0).any())


def test_bipartite_matching_merges_duplicates():
    base = torch.randn(1, 5, 8)
    metric = torch.cat([base[:, :1], base[:, 1:2], base[:, 1:2] * 2, base[:, 3:]], 1)  # tokens 1, 2 parallel
    # token 2 (even -> set A index 1) duplicates token 1 (odd -> set B index 0)
    plan = tome.bipartite_soft_matching(metric, 1)
    assert plan.src.tolist() == [[1]] and plan.dst.tolist() == [[0]]


def test_merge_weighted_matches_reference():
    x, size = torch.randn(3, 11, 4), torch.randint(1, 4, (3, 11, 1)).float()
    plan = tome.bipartite_soft_matching(torch.randn(3, 11, 6), 4)
    fx, fs = tome.merge_weighted(x, size, plan)
    rx, rs = tome.merge_weighted_reference(x, size, plan)
    torch.testing.assert_close(fx, rx)
    torch.testing.assert_close(fs, rs)
    torch.testing.assert_close(fs.sum((1, 2)), size.sum((1, 2)))   # sizes are conserved
    torch.testing.assert_close((fx * fs).sum(1), (x * size).sum(1))  # so is the weighted mass


def test_token_take_and_add_at_match_gather_and_scatter():
    """The row-copy fast paths equal gather / scatter_reduce, repeated destinations included (two
    sources merged into one token must both be added), and gradients flow through them."""
    from nnlab.prune import tokens

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, 5, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(9, generator=g)[:4] for _ in range(3)])
    torch.testing.assert_close(tokens.take(x, idx), tokens.take_reference(x, idx), rtol=0, atol=0)
    dst = torch.tensor([[0, 0, 2], [1, 1, 1], [3, 0, 2]])       # repeats add up
    src = torch.randn(3, 3, 5, generator=g)
    fast, ref = tokens.add_at(x, dst, src), tokens.add_at_reference(x, dst, src)
    torch.testing.assert_close(fast, ref)
    assert torch.allclose(fast[1, 1], x[1, 1] + src[1].sum(0))
    (gf,) = torch.autograd.grad(tokens.take(x, idx).sum() + fast.square().sum(), x)
    (gr,) = torch.autograd.grad(tokens.take_reference(x, idx).sum() + ref.square().sum(), x)
    torch.testing.assert_close(gf, gr)


def test_merge_reads_a_and_b_from_the_interleaved_tokens():
    x = torch.randn(2, 13, 6)
    plan = tome.bipartite_soft_matching(torch.randn(2, 13, 6), 5)
    torch.testing.assert_close(tome.merge(x, plan), tome.merge_reference(x, plan))


def test_fused_tome_merge_matches_the_loop_reference():
    """The C++ merge (inference, CPU float32) against the per-image loop: unmerged A rows, B rows,
    sources added at repeated destinations, averages and sizes; with a gradient wanted it falls
    back to the torch merge, which autograd can follow."""
    from nnlab.prune import kernels

    if kernels.merge_kernel() is None:
        pytest.skip("no C++ toolchain: the torch merge runs instead")
    g = torch.Generator().manual_seed(1)
    x, size = torch.randn(4, 13, 7, generator=g), torch.randint(1, 5, (4, 13, 1), generator=g).float()
    plan = tome.bipartite_soft_matching(torch.randn(4, 13, 5, generator=g), 5)
    assert (plan.dst[:, :, None] == plan.dst[:, None, :]).sum() > plan.dst.numel()  # some repeats
    fx, fs = kernels.merge_weighted(x, size, plan)
    rx, rs = tome.merge_weighted_reference(x, size, plan)
    torch.testing.assert_close(fx, rx)
    torch.testing.assert_close(fs, rs, rtol=0, atol=0)
    bad = tome.MergePlan(plan.unmerged, plan.src, plan.dst + 7)
    with pytest.raises(ValueError, match="dst out of range"):
        kernels.merge_weighted(x, size, bad)
    xg = x.clone().requires_grad_()
    out, _ = kernels.merge_weighted(xg, size, plan)
    out.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_tome_schedule_and_r_for_ratio():
    assert tome.token_schedule(16, 3, 2) == [14, 12, 10]
    assert tome.token_schedule(16, 3, 100) == [8, 4, 2]
    r = tome.r_for_ratio(0.5, 64, 6)
    achieved = 1 - sum(tome.token_schedule(64, 6, r)) / (6 * 64)
    assert abs(achieved - 0.5) < 0.05
    assert tome.r_for_ratio(0.0, 64, 6) == 0


def test_tome_runner(vit):
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ToMeRunner(vit, 0)(x), vit(x), atol=1e-5, rtol=1e-5)
        run = ToMeRunner(vit, 3)
        assert run(x).shape == (4, 5)
    assert run.token_counts().mlp == [14, 11, 8]


def test_size_bias_is_proportional_attention():
    """A token of size 2 must act like two identical tokens of size 1 in attention."""
    from nnlab.models.vit import attention_reference
    q, k, v = torch.randn(3, 1, 1, 3, 4).unbind(0)
    dup_k, dup_v = torch.cat([k, k[:, :, 2:]], 2), torch.cat([v, v[:, :, 2:]], 2)
    out_dup, _ = attention_reference(q, dup_k, dup_v, 0.5)
    bias = tome.size_bias(torch.tensor([[[1.0], [1.0], [2.0]]]))
    out_prop, _ = attention_reference(q, k, v, 0.5, bias)
    torch.testing.assert_close(out_prop, out_dup)


def _counted_macs(model, x):
    # The math backend decomposes fused attention into matmuls the counter sees
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        model(x)
    return fc.get_total_flops() / 2 / x.shape[0]


def test_flops_match_torch_counter(vit):
    x = torch.randn(2, 3, 16, 16)
    base = TokenRunner(vit)
    assert _counted_macs(base, x) == pytest.approx(vit_macs(vit.config))
    assert base.macs() == pytest.approx(vit_macs(vit.config))
    cp = CPViTRunner(vit, [8, 4, 2])
    assert _counted_macs(cp, x) == pytest.approx(cp.macs())
    tm = ToMeRunner(vit, 3)
    assert _counted_macs(tm, x) == pytest.approx(tm.macs())


def test_vit_b16_flops():
    with torch.device("meta"):  # no memory, no init cost
        cfg = create_model("vit-b16", num_classes=1000, in_chans=3, image_size=224).config
    assert vit_macs(cfg) / 1e9 == pytest.approx(17.58, abs=0.05)  # the published 17.6 GFLOPs


def test_throughput_counts_images_per_second():
    import time

    from nnlab.prune.common import throughput

    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.02)
            return x
    ips = throughput(Slow(), torch.zeros(8, 1), warmup=0, repeats=2)
    assert 0 < ips <= 8 / 0.02


def test_markdown_table_and_plots(tmp_path):
    from nnlab.prune.plots import markdown_table, write_plots
    rows = [{"method": "base", "ratio": 0.0, "top1": 0.90, "top5": 0.99, "gflops": 1.0, "images_per_s": 10.0,
             "achieved_ratio": 0.0}]  # fractions in rows and CSVs, percent in the tables
    rows += [{"method": m, "ratio": r, "top1": 0.90 - 0.10 * r, "top5": 0.99, "gflops": 1 - r, "images_per_s": 10 / (1 - r),
              "achieved_ratio": r} for m in ("cp-vit", "tome") for r in (0.3, 0.6)]
    text = markdown_table(rows)
    assert "| 0 (base) | 90.00 | 99.00 | 90.00 | 99.00 |" in text
    assert "| 0.6 | 84.00 | 99.00 | 84.00 | 99.00 |" in text
    paths = write_plots(rows, tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)


def test_random_subset_mixes_classes():
    from nnlab.data import ImageSet
    images = ImageSet(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), torch.arange(100) // 10)  # sorted by class
    sub = images.random_subset(20, seed=0)
    assert len(sub) == 20 and len(set(sub.labels.tolist())) > 3
    assert images.random_subset(20, seed=0).labels.tolist() == sub.labels.tolist()
    assert images.random_subset(None) is images


# --------------------------------------------------------------------------- reference twins (issue 13)


def test_cpvit_runner_matches_the_per_image_reference_logits_and_kept_patches(vit):
    """Pins the mechanism: column mass (attention received), accumulated over layers by token
    identity, pruned patches never back. A row sum, no accumulation or re-admitted patches differ."""
    from nnlab.prune.reference import cpvit_reference

    keep = [10, 6, 3]
    run = CPViTRunner(vit, keep)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = run(x)
        for b in range(len(x)):
            ref_logits, ref_kept, _ = cpvit_reference(vit, x[b], keep)
            torch.testing.assert_close(logits[b], ref_logits, rtol=1e-4, atol=1e-5)
            for layer, ids in enumerate(ref_kept):
                assert sorted(run.kept[layer][b, 1:].tolist()) == ids, (b, layer)
    for b in range(len(x)):  # each later kept set is inside the earlier one
        assert set(run.kept[2][b].tolist()) <= set(run.kept[1][b].tolist()) <= set(run.kept[0][b].tolist())


def test_tome_runner_matches_the_per_image_reference(vit):
    """Pins bipartite matching on keys, size-weighted merges and proportional attention (the
    runner without its size bias differs from the reference)."""
    from nnlab.prune.reference import tome_reference

    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    run = ToMeRunner(vit, [3, 3, 2])
    with torch.no_grad():
        logits = run(x)
        for b in range(len(x)):
            torch.testing.assert_close(logits[b], tome_reference(vit, x[b], [3, 3, 2]), rtol=1e-4, atol=1e-5)
        no_prop = ToMeRunner(vit, [3, 3, 2])
        no_prop_bias = tome.size_bias
        try:
            tome.size_bias = lambda size: None  # proportional attention switched off
            off = no_prop(x)
        finally:
            tome.size_bias = no_prop_bias
    assert not torch.allclose(off, logits, atol=1e-4)


def test_accuracy_at_equal_gflops_interpolates_and_drops_capped_repeats(tmp_path):
    """Issue 13: methods compared at equal measured compute, not at nominal ratios; a capped method
    (the same achieved ratio for several targets) is one point."""
    from nnlab.prune.plots import at_equal_gflops, distinct_points, equal_compute_table, write_table

    base = {"method": "base", "ratio": 0.0, "top1": 0.90, "top5": 0.99, "gflops": 1.0, "images_per_s": 10.0,
            "achieved_ratio": 0.0}
    # cp-vit: top-1 = 0.90 - 0.20 (1 - gflops); p-vit capped at achieved 0.4 for nominal 0.5 and 0.7
    cp = [dict(base, method="cp-vit", ratio=r, gflops=1 - r, top1=0.90 - 0.20 * r, achieved_ratio=r) for r in (0.2, 0.6)]
    pv = [dict(base, method="p-vit", ratio=r, gflops=0.7, top1=0.85, achieved_ratio=0.4) for r in (0.5, 0.7)]
    rows = [base, *cp, *pv]
    assert len(distinct_points(rows, "p-vit")) == 1
    table = at_equal_gflops(rows)
    assert table["cp-vit"][0.6] == pytest.approx(0.82) and table["cp-vit"][0.9] == pytest.approx(0.88)
    assert table["cp-vit"][0.3] is None  # never that cheap
    assert table["p-vit"][0.8] == pytest.approx(0.85 + (0.90 - 0.85) * (0.8 - 0.7) / 0.3)
    assert "| 0.6 x base | - | 82.00 | CP-ViT |" in equal_compute_table(rows)  # columns P-ViT, CP-ViT (the seed's order)
    assert "| 0.8 x base | 86.67 | 86.00 | P-ViT > CP-ViT |" in equal_compute_table(rows)
    text = write_table(rows, tmp_path / "results.md").read_text()
    assert "at equal compute" in text


def test_ranking_orders_by_top1_with_ties_and_gaps():
    from nnlab.prune.plots import ranking

    assert ranking({"p-vit": 0.80, "cp-vit": 0.85, "ap-vit": 0.8003, "tome": None}) == "CP-ViT > AP-ViT = P-ViT"
    assert ranking({"p-vit": 0.70, "cp-vit": 0.60}) == "P-ViT > CP-ViT"  # best first, whatever the seed says
    assert ranking({"tome": None}) == "-"


def test_seed_table_puts_the_seed_beside_ours_with_drops_from_each_base(tmp_path):
    """Issue 13: the seed's Table 1 beside the sweep's top-1 at the same nominal ratios; each drop is
    from its own base model (the seed's 98.00, ours the sweep's base row)."""
    from nnlab.prune.plots import write_table
    from nnlab.prune.sweep import _seed_numbers

    assert _seed_numbers("mnist") is None
    seed = _seed_numbers("cifar10")
    base = {"method": "base", "ratio": 0.0, "top1": 0.85, "top5": 0.99, "gflops": 1.0, "images_per_s": 10.0,
            "achieved_ratio": 0.0}
    rows = [base] + [dict(base, method=m, ratio=0.5, top1=t, gflops=0.5, achieved_ratio=0.5)
                     for m, t in (("p-vit", 0.70), ("ap-vit", 0.80), ("cp-vit", 0.84))]
    text = write_table(rows, tmp_path / "results.md", seed=seed).read_text()
    assert "| 0 (base) | 98.00 | 85.00 |" in text
    assert "| 0.5 | 89.44 (-8.56) | 70.00 (-15.00) | 92.89 (-5.11) | 80.00 (-5.00) | 94.47 (-3.53) | 84.00 (-1.00) |" in text
    assert "| 0.9 | 28.66 (-69.34) | - |" in text  # not run at 0.9: a dash, not a made-up number


def test_a_method_with_its_own_unpruned_row_starts_its_curve_there():
    """P-ViT's gated model (ratio 0) is what gets pruned: its curve and its equal-compute figures
    start from it, not from the base model, and the table labels that row as trained."""
    from nnlab.prune.plots import at_equal_gflops, curve, markdown_table

    base = {"method": "base", "ratio": 0.0, "top1": 0.90, "top5": 0.99, "gflops": 1.0, "images_per_s": 10.0,
            "achieved_ratio": 0.0}
    gated = dict(base, method="p-vit", top1=0.80)
    pruned = dict(base, method="p-vit", ratio=0.5, gflops=0.5, top1=0.70, achieved_ratio=0.5)
    tome = dict(base, method="tome", ratio=0.5, gflops=0.5, top1=0.70, achieved_ratio=0.5)
    rows = [base, gated, pruned, tome]
    assert curve(rows, "p-vit") == [gated, pruned] and curve(rows, "tome") == [base, tome]
    table = at_equal_gflops(rows)
    assert table["p-vit"][0.9] == pytest.approx(0.78) and table["tome"][0.9] == pytest.approx(0.86)
    assert "| 0 (trained, unpruned) | 80.00 | 99.00 | - | - |" in markdown_table(rows)


# --------------------------------------------------------------------------- CP-ViT head pruning (issue 13)


@pytest.fixture
def vit4():
    """vit-test with 4 heads of width 4, so that head subsets are non-trivial, and q/k weights
    scaled up so that attention is peaked (at init it is nearly uniform, and every head scores alike)."""
    model = create_model("vit-test", num_classes=5, in_chans=3, image_size=16, heads=4).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * 16] = torch.randn(32, 16, generator=g) * 2.0  # the q and k rows
    return model


def test_cpvit_with_removed_heads_matches_the_per_image_reference(vit4):
    """The sliced attention computes only the kept heads, through their own q/k/v rows and projection
    columns: a wrong row layout, wrong projection columns or a zeroed-but-computed head all differ
    from the reference, which sums each kept head's output through its projection block."""
    from nnlab.prune.reference import cpvit_reference

    keep, heads = [10, 6, 3], [[0, 2, 3], [1], [0, 3]]
    run = CPViTRunner(vit4, keep, heads)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = run(x)
        for b in range(len(x)):
            ref_logits, ref_kept, _ = cpvit_reference(vit4, x[b], keep, heads)
            torch.testing.assert_close(logits[b], ref_logits, rtol=1e-4, atol=1e-5)
            assert [sorted(k[b, 1:].tolist()) for k in run.kept] == ref_kept
        assert not torch.allclose(logits, CPViTRunner(vit4, keep)(x), atol=1e-3)  # heads really removed
    assert run.block_heads() == [3, 1, 2] and run.heads_kept() == pytest.approx(6 / 12)
    assert sum(p.numel() for p in run.sliced.parameters()) < 3 * sum(p.numel() for p in vit4.blocks[0].attn.parameters())


def test_head_scores_collected_over_images_match_the_reference(vit4):
    from nnlab.prune.reference import cpvit_reference

    keep = [10, 6, 3]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    from nnlab.prune.methods import head_importance

    sums = head_importance(vit4, keep, x, batch_size=3)  # two batches: the sums must accumulate
    with torch.no_grad():
        ref = [torch.tensor(s) for s in cpvit_reference(vit4, x[0], keep)[2]]
        for b in range(1, len(x)):
            ref = [r + torch.tensor(s) for r, s in zip(ref, cpvit_reference(vit4, x[b], keep)[2])]
    for got, want in zip(sums, ref):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-6)
        assert want.max() > 1.03 * want.min()  # heads differ, so the test can tell scores apart


def test_select_heads_and_head_counts():
    s = torch.tensor([0.3, 0.9, 0.1, 0.5])
    assert cpvit.select_heads(s, 2) == cpvit.select_heads_reference(s, 2) == [1, 3]
    assert cpvit.head_keep_counts([0.0, 0.3, 0.9], 4) == [4, 3, 1]


def test_build_cpvit_removes_the_lowest_scoring_heads_on_a_layer_aware_cascade(vit4):
    from nnlab.prune.methods import CPViTOptions, build_cpvit, head_importance

    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    ranges = [0.8, 0.7, 0.6]
    patches_only = build_cpvit(vit4, 0.6, ranges, x, CPViTOptions(heads=False))
    run = build_cpvit(vit4, 0.6, ranges, x, CPViTOptions(head_share=0.8))
    assert patches_only.heads is None and run.keep == patches_only.keep
    counts = cpvit.head_keep_counts(cpvit.cascade_ratios(0.48, ranges, 1 - 1 / 4), 4)
    assert run.block_heads() == counts and counts == sorted(counts, reverse=True) and sum(counts) < 12
    sums = head_importance(vit4, run.keep, x)
    assert run.heads == [cpvit.select_heads_reference(s, k) for s, k in zip(sums, counts)]
    with torch.no_grad():
        patches_only(x), run(x)
    assert run.macs() < patches_only.macs() and patches_only.heads_kept() == 1.0
    assert _counted_macs(run, x) == pytest.approx(run.macs())  # FLOPs count the heads really computed


def test_a_pruned_cpvit_with_heads_is_saved_and_loaded(vit4, tmp_path):
    from nnlab.prune.io import load_pruned, save_pruned

    run = CPViTRunner(vit4, [10, 6, 3], [[0, 2, 3], [1], [0, 3]])
    x = torch.randn(2, 3, 16, 16)
    save_pruned(run, tmp_path / "m", ratio=0.5, top1=0.0)
    loaded = load_pruned(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), run(x))
    assert loaded.heads == run.heads


# --------------------------------------------------------------------------- conv-stem ViT (issue 13)


@pytest.fixture
def stem_vit():
    return create_model("vit-test", num_classes=5, in_chans=3, image_size=16, stem=[6, 8]).eval()


def test_conv_stem_gives_one_token_per_patch_and_its_flops_are_counted(stem_vit):
    x = torch.randn(2, 3, 16, 16)
    assert stem_vit.embed(x).shape == (2, 1 + 16, 16)
    base = TokenRunner(stem_vit)
    assert _counted_macs(base, x) == pytest.approx(vit_macs(stem_vit.config))  # stem convs + 1x1 + blocks
    plain = create_model("vit-test", num_classes=5, in_chans=3, image_size=16)
    stem_only = vit_macs(stem_vit.config) - vit_macs(plain.config) + 16 * 3 * 16 * 16  # minus plain embed
    assert stem_only == pytest.approx(8 * 8 * 3 * 6 * 9 + 4 * 4 * 6 * 8 * 9 + 16 * 8 * 16)
    cp = CPViTRunner(stem_vit, [8, 4, 2])
    assert _counted_macs(cp, x) == pytest.approx(cp.macs())


def test_conv_stem_must_match_the_patch_size():
    from nnlab.errors import ConfigError

    with pytest.raises(ConfigError, match="log2\\(patch_size\\) = 2"):
        create_model("vit-test", num_classes=5, in_chans=3, image_size=16, stem=[8])


def test_slimming_keeps_the_stem(stem_vit):
    from nnlab.prune.slim import slim_vit

    c = stem_vit.config
    with torch.no_grad():
        stem_vit.stem[1].running_mean.uniform_(-1, 1)  # a trained stem's BatchNorm statistics
        full = slim_vit(stem_vit, None, [torch.arange(d) for d in c.head_dims], [torch.arange(d) for d in c.mlp_dims])
        x = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(full(x), stem_vit(x))
