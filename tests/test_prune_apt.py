"""APT's joint training of AP-ViT agents with the backbone (nnlab.prune.apt): the three streams."""
import pytest
import torch

from nnlab.models import create_model
from nnlab.prune import apt, apvit
from nnlab.prune.methods import APViTOptions, build_apvit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def vit():
    torch.manual_seed(0)
    model = create_model("vit-test", num_classes=5, in_chans=3, image_size=16).eval()
    with torch.no_grad():
        model.head.weight.mul_(20)  # spread the class probabilities, so that clips move them
    return model


def test_stream2_labels_a_clip_good_exactly_when_it_raises_the_true_class_probability(vit):
    """Pins the reward sign and the clip: the label is 1 where removing the chosen token from the
    agent's block on raises p(true class), computed here image by image with a plain loop."""
    agent = apvit.Agent(16, 8)
    x, y = torch.randn(12, 3, 16, 16), torch.randint(0, 5, (12,))
    with torch.no_grad():
        p_old = vit(x).softmax(-1).gather(1, y[:, None]).squeeze(1)
    clip = apt.clip_one(vit, agent, x, y, p_old, 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        t = apt.tokens_at(vit, x, 1)
        torch.testing.assert_close(clip.logit, agent(t)[torch.arange(12), clip.token])
        for b in range(12):
            keep = [i for i in range(t.shape[1]) if i != int(clip.token[b])]
            h = t[b:b + 1, keep]
            for block in vit.blocks[1:]:
                h = block(h)
            p_new = vit.classify(h).softmax(-1)[0, y[b]]
            assert clip.label[b] == float(p_new > p_old[b]), b
    assert 0 < clip.label.sum() < 12  # both outcomes occur, so a flipped sign would be caught
    assert (clip.token >= 1).all()  # CLS is never clipped


def test_stream1_trains_the_backbone_and_stream2_the_agents(vit):
    agents = torch.nn.ModuleList(apvit.Agent(16, 8) for _ in range(2))
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    backbone, agent = apt.joint_step(vit, agents, [1, 2], x, y, torch.Generator().manual_seed(0))
    backbone.backward()
    assert all(p.grad is None for p in agents.parameters())
    assert vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    vit.zero_grad(set_to_none=True)
    agent.backward()
    assert all(p.grad is None for p in vit.parameters())
    assert all(a.fc2.weight.grad.abs().sum() > 0 for a in agents)


def test_train_jointly_fine_tunes_a_copy_and_prunes_with_its_agents(vit):
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
    batches = lambda epoch: [(x[:8], y[:8]), (x[8:], y[8:])]  # noqa: E731
    model, agents, positions = apt.train_jointly(vit, batches, APViTOptions(hidden=8), epochs=1)
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in before.items())  # the base is untouched
    assert not torch.equal(model.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert positions == [1, 2] and not model.training
    run = build_apvit(model, agents, positions, 0.4, x)
    with torch.no_grad():
        run(x)
    assert run.achieved_ratio() == pytest.approx(0.4, abs=0.15)
