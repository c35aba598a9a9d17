import math
from types import SimpleNamespace

import torch

from rl.models.llada import LLaDAConfig, LLaDAModelLM
from rl.sft import sft_loss

MASK, V = 7, 10


class Recorder(torch.nn.Module):
    """Logits depend on the position only, so per-token log-probs are known in closed form."""

    def __init__(self, T):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(T, V))
        self.inputs = []

    def forward(self, input_ids, attention_mask):
        self.inputs.append(input_ids.clone())
        return SimpleNamespace(logits=self.table.expand(input_ids.shape[0], -1, -1))


def test_sft_loss_matches_hand_computation_and_never_masks_prompt():
    torch.manual_seed(0)
    prompt = torch.tensor([[0, 1, 2], [3, 3, 4]])
    answer = torch.tensor([[5, 6, 1, 2], [6, 6, 5, 0]])
    model = Recorder(7)
    eps = 1e-3
    loss = sft_loss(model, prompt, torch.ones_like(prompt), answer, MASK, torch.Generator().manual_seed(3), eps)

    g = torch.Generator().manual_seed(3)
    t = torch.rand(2, 1, generator=g)
    u = torch.rand(2, 4, generator=g)
    logp = torch.log_softmax(model.table.detach(), -1)
    expected = 0.0
    for b in range(2):
        p = (1 - eps) * t[b, 0].item() + eps
        for j in range(4):
            if u[b, j] < p:
                expected += -logp[3 + j, answer[b, j]].item() / p
    expected /= 2 * 4
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)
    seen = model.inputs[0]
    assert torch.equal(seen[:, :3], prompt)
    assert ((seen[:, 3:] == MASK) | (seen[:, 3:] == answer)).all()
    loss.backward()
    assert model.table.grad[:3].abs().sum() == 0  # prompt positions are never scored


def test_sft_training_lowers_loss_on_real_model():
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_layers=2, mlp_hidden_size=64, vocab_size=16, mask_token_id=15,
                      rope_theta=10000.0)
    model = LLaDAModelLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    prompt = torch.randint(0, 8, (16, 4))
    answer = (prompt.flip(1) + 8) % 15  # a learnable map from prompt to answer
    gen = torch.Generator().manual_seed(0)

    def eval_loss():
        with torch.no_grad():
            return sum(sft_loss(model, prompt, torch.ones_like(prompt), answer, 15, torch.Generator().manual_seed(s))
                       for s in range(8)).item() / 8

    before = eval_loss()
    for _ in range(150):
        sft_loss(model, prompt, torch.ones_like(prompt), answer, 15, gen).backward()
        opt.step(), opt.zero_grad()
    assert eval_loss() < 0.5 * before
