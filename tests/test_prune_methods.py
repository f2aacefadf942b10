"""P-ViT gates and slimming, AP-ViT agents, saving/loading pruned models."""
import pytest
import torch

from nnlab.errors import CheckpointError
from nnlab.models import create_model
from nnlab.prune import apvit, methods, pvit
from nnlab.prune.io import load_pruned, save_pruned
from nnlab.prune.runners import APViTRunner, CPViTRunner
from nnlab.prune.slim import gated_copy, slim_vit


@pytest.fixture
def vit():
    return create_model("vit-test", num_classes=5, in_chans=3, image_size=16).eval()


def test_global_threshold_and_kept_indices():
    gates = [torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.05, 0.7, 0.3])]
    t = pvit.global_threshold(gates, 3 / 7)
    assert t == pytest.approx(0.2)
    assert pvit.kept_indices(gates[0], t).tolist() == [1, 2]
    assert pvit.kept_indices(torch.tensor([0.01, 0.02]), 1.0).tolist() == [1]  # at least one
    assert pvit.global_threshold(gates, 0.0) == float("-inf")
    with pytest.raises(ValueError):
        pvit.global_threshold(gates, 1.0)


def test_gates_change_output_and_slim_matches_gated_model(vit):
    x = torch.randn(2, 3, 16, 16)
    gated, gates = gated_copy(vit)
    with torch.no_grad():
        torch.testing.assert_close(gated(x), vit(x))           # gates start at 1
        for g in gates.all():
            g.uniform_(0, 1)
        attn_keep, mlp_keep = pvit.select(list(gates.attn), list(gates.mlp), 0.4)
        for g, keep in zip(gates.all(), attn_keep + mlp_keep):  # zero the pruned gates
            mask = torch.ones_like(g, dtype=torch.bool)
            mask[keep] = False
            g[mask] = 0.0
        slim = slim_vit(gated, gates, attn_keep, mlp_keep)
        torch.testing.assert_close(slim(x), gated(x), atol=1e-5, rtol=1e-5)
    removed = 1 - (sum(slim.config.head_dims) + sum(slim.config.mlp_dims)) / (3 * 8 + 3 * 32)
    assert removed == pytest.approx(0.4, abs=0.02)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in vit.parameters())


def test_gate_training_l1_shrinks_gates(vit):
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
    opts = methods.PViTOptions(gate_epochs=2, l1_weight=0.05, gate_gate_lr=0.05)
    gated, gates = methods.train_gates(vit, lambda e: [(x, y)] * 2, opts)
    assert float(torch.cat([g.detach() for g in gates.all()]).abs().mean()) < 0.9
    runner = methods.build_pvit(gated, gates, 0.5)
    assert methods.pvit_ratio_of(runner, vit) == pytest.approx(0.5, abs=0.02)


def test_agent_positions():
    assert apvit.agent_positions(6) == [1, 3, 5]
    assert apvit.agent_positions(12) == [1, 6, 11]
    assert apvit.agent_positions(3) == [1, 2]


def test_without_token_and_rewards():
    x = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    out = apvit.without_token(x, torch.tensor([[1, 3], [2, 1]]))
    assert out.squeeze(-1).tolist() == [[0, 2, 3], [0, 1, 2], [4, 5, 7], [4, 6, 7]]
    r = apvit.drop_rewards(torch.tensor([0.5, 0.9]), torch.tensor([[0.6, 0.4], [0.9, 0.1]]))
    torch.testing.assert_close(r, torch.tensor([[0.1, -0.1], [0.0, -0.8]]))
    t = apvit.soft_targets(r, 0.1)
    assert t[0, 0] > 0.5 > t[0, 1] and t[1, 0] == pytest.approx(0.5)


def test_rank_targets():
    r = torch.tensor([[0.3, -0.2], [0.0, 0.0], [0.1, -0.5]])
    t = apvit.rank_targets(r)
    assert t[0, 0] == 1.0 and t[2, 1] == 0.0
    assert t[1, 0] == t[1, 1] and float(t[1, 0]) == pytest.approx(2.5 / 5)  # ties share the mean rank
    assert bool((t[0, 0] > t[2, 0]) & (t[2, 0] > t[1, 0]) & (t[1, 0] > t[0, 1]))


def test_compact_and_padding_bias():
    x = torch.arange(10, dtype=torch.float32).view(2, 5, 1)
    keep = torch.tensor([[1, 0, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out, valid = apvit.compact(x, keep)
    assert out.squeeze(-1).tolist()[0] == [0, 2, 4] and valid.tolist() == [[True] * 3, [True, False, False]]
    bias = apvit.padding_bias(valid)
    assert bias.shape == (2, 1, 1, 3) and bias[1, 0, 0, 1] == float("-inf")
    assert apvit.padding_bias(torch.ones(2, 3, dtype=torch.bool)) is None


def test_apvit_runner_matches_per_image_reference(vit):
    """Batched (padded + masked) AP-ViT equals running each image alone with its tokens removed."""
    agents = torch.nn.ModuleList(apvit.Agent(16, 8) for _ in range(2))
    run = APViTRunner(vit, agents, [1, 2], threshold=0.5)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        batched = run(x)
        single = torch.cat([run(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(APViTRunner(vit, agents, [1, 2], threshold=1.0)(x), vit(x),
                                   atol=1e-5, rtol=1e-5)


def test_agents_train_and_threshold_meets_ratio(vit):
    x, y = torch.randn(24, 3, 16, 16), torch.randint(0, 5, (24,))
    agents, pos = methods.train_agents(vit, x, y, methods.APViTOptions(epochs=2, candidates=4))
    assert pos == [1, 2] and len(agents) == 2
    table = methods.threshold_table(vit, agents, pos, x, [0.0, 0.5, 1.0])
    assert table[0][1] >= table[1][1] >= table[2][1] == 0.0
    run = methods.build_apvit(vit, agents, pos, 0.3, x)
    with torch.no_grad():
        run(x)
    assert run.achieved_ratio() == pytest.approx(0.3, abs=0.1)


def test_threshold_for_ratio():
    assert apvit.threshold_for_ratio([0.2, 0.5, 0.8], [0.7, 0.4, 0.1], 0.45) == 0.5


@pytest.mark.parametrize("kind", ["cp-vit", "tome", "p-vit", "ap-vit"])
def test_pruned_models_save_and_load(vit, tmp_path, kind):
    x = torch.randn(2, 3, 16, 16)
    if kind == "cp-vit":
        run = CPViTRunner(vit, [8, 4, 2])
    elif kind == "tome":
        run = methods.build_tome(vit, 0.4)
    elif kind == "p-vit":
        gated, gates = gated_copy(vit)
        with torch.no_grad():
            for g in gates.all():
                g.uniform_(0, 1)
        run = methods.build_pvit(gated, gates, 0.5)
    else:
        run = APViTRunner(vit, torch.nn.ModuleList(apvit.Agent(16, 8) for _ in range(2)), [1, 2], 0.5)
    save_pruned(run, tmp_path / kind, ratio=0.5)
    back = load_pruned(tmp_path / kind)
    assert type(back) is type(run) and back.spec() == run.spec()
    with torch.no_grad():
        torch.testing.assert_close(back(x), run(x), atol=0, rtol=0)


def test_load_pruned_errors(tmp_path):
    with pytest.raises(CheckpointError, match="pruned.json"):
        load_pruned(tmp_path)


def test_apvit_flops_count_the_padding_the_batch_computes(vit):
    """Issue 13: a batch runs at its largest kept count; the FLOP count must say so (it was the
    per-image count, so AP-ViT looked cheaper than it ran), while the ratio counts real drops."""
    torch.manual_seed(3)
    agents = torch.nn.ModuleList(apvit.Agent(16, 8) for _ in range(2))
    for a in agents:
        torch.nn.init.normal_(a.fc2.weight, std=3.0)  # spread the prune probabilities
    x = torch.randn(6, 3, 16, 16)
    batched, alone = APViTRunner(vit, agents, [1, 2], threshold=0.5), APViTRunner(vit, agents, [1, 2], threshold=0.5)
    with torch.no_grad():
        batched(x)
        for i in range(len(x)):
            alone(x[i:i + 1])
    assert batched.achieved_ratio() == pytest.approx(alone.achieved_ratio())  # the same tokens dropped
    assert alone.achieved_ratio() > 0
    padded = batched.token_counts().attn
    assert all(p >= a for p, a in zip(padded, alone.token_counts().attn))
    assert batched.macs() > alone.macs()  # the padding is real work, and it is counted


def test_keep_lowest_matches_reference():
    x, prob = torch.randn(3, 9, 4), torch.rand(3, 9)
    torch.testing.assert_close(apvit.keep_lowest(x, prob, 4), apvit.keep_lowest_reference(x, prob, 4))
    assert torch.equal(apvit.keep_lowest(x, prob, 4)[:, 0], x[:, 0])  # CLS stays, first


def _fixed_count_reference(vit, agents, positions, counts, image):
    """One image, plain loop: at each agent, keep CLS and the `count` patches of lowest drop probability."""
    x = vit.embed(image[None])
    for layer, block in enumerate(vit.blocks):
        if layer in positions:
            i = positions.index(layer)
            prob = torch.sigmoid(agents[i](x))
            x = apvit.keep_lowest_reference(x, prob, min(counts[i], x.shape[1] - 1))
        x = block(x)
    return vit.classify(x)[0]


def test_apvit_fixed_count_runs_without_padding_and_matches_the_per_image_reference(vit):
    """Issue 13: every image keeps the same number of patches per agent (its own lowest-probability
    ones), so no padding is computed; a kept-the-highest or re-ordered variant differs from the loop."""
    torch.manual_seed(3)
    agents = torch.nn.ModuleList(apvit.Agent(16, 8) for _ in range(2))
    for a in agents:
        torch.nn.init.normal_(a.fc2.weight, std=3.0)
    x = torch.randn(4, 3, 16, 16)
    run = APViTRunner(vit, agents, [1, 2], threshold=0.5, counts=[10, 5])
    with torch.no_grad():
        logits = run(x)
        for b in range(len(x)):
            torch.testing.assert_close(logits[b], _fixed_count_reference(vit, agents, [1, 2], [10, 5], x[b]),
                                       rtol=1e-4, atol=1e-5)
    assert run.token_counts().attn == [17, 11, 6] and run.kept_per_agent() == [11, 6]
    assert run.achieved_ratio() == pytest.approx(1 - (16 + 10 + 5) / 48)


def test_build_apvit_fixed_count_keeps_the_calibrated_mean_and_computes_less(vit):
    torch.manual_seed(3)
    agents = torch.nn.ModuleList(apvit.Agent(16, 8) for _ in range(2))
    for a in agents:
        torch.nn.init.normal_(a.fc2.weight, std=3.0)
    x = torch.randn(16, 3, 16, 16)
    padded = methods.build_apvit(vit, agents, [1, 2], 0.4, x, fixed_count=False)
    fixed = methods.build_apvit(vit, agents, [1, 2], 0.4, x)
    assert padded.counts is None and fixed.threshold == padded.threshold
    with torch.no_grad():
        padded(x), fixed(x)
    assert fixed.counts == [max(1, round(t - 1)) for t in padded.kept_per_agent()]
    assert fixed.achieved_ratio() == pytest.approx(padded.achieved_ratio(), abs=0.05)
    assert fixed.macs() < padded.macs()  # the same mean tokens, without the padding


def test_agent_split_fc1_equals_the_concat_form():
    agent = apvit.Agent(16, 8)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(agent(x), agent.forward_reference(x), rtol=1e-5, atol=1e-6)
