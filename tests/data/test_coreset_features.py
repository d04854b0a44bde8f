import copy

import torch

from memcompile.data import AdamHistory, top_coordinates


def test_adam_history_matches_torch_adam_when_one_example_is_selected():
    # Selecting one example per step makes the history exactly Adam's state fed with that gradient,
    # so the feature equals Adam's update direction (lr = 1).
    torch.manual_seed(0)
    grads = [torch.randn(5, 6, dtype=torch.float64) for _ in range(4)]
    picks = [2, 0, 4, 1]
    history = AdamHistory(betas=(0.8, 0.95), eps=1e-6)
    param = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([param], lr=1.0, betas=(0.8, 0.95), eps=1e-6)
    for g, pick in zip(grads, picks):
        features = history.normalise(g)
        for i in range(5):
            # Adam's step for example i from a deep copy of the state (in-place moments would leak).
            trial = torch.optim.Adam([param], lr=1.0, betas=(0.8, 0.95), eps=1e-6)
            trial.load_state_dict(copy.deepcopy(opt.state_dict()))
            start = param.detach().clone()
            param.grad = g[i].clone()
            trial.step()
            expected = start - param.detach()
            with torch.no_grad():
                param.copy_(start)
            torch.testing.assert_close(features[i], expected)
        param.grad = g[pick].clone()
        opt.step()
        with torch.no_grad():
            param.zero_()
        history.update(g[pick : pick + 1])
    assert history.step == 4


def test_history_is_mean_of_selected_moments():
    g = torch.randn(4, 3, dtype=torch.float64)
    history = AdamHistory(betas=(0.9, 0.99))
    history.update(g[[0, 2]])
    torch.testing.assert_close(history.m, 0.1 * (g[0] + g[2]) / 2)
    torch.testing.assert_close(history.v, 0.01 * (g[0] ** 2 + g[2] ** 2) / 2)
    m_prev, v_prev = history.m.clone(), history.v.clone()
    history.update(g[[1]])
    torch.testing.assert_close(history.m, 0.9 * m_prev + 0.1 * g[1])
    torch.testing.assert_close(history.v, 0.99 * v_prev + 0.01 * g[1] ** 2)


def test_top_coordinates_by_absolute_mean():
    f = torch.tensor([[1.0, -5.0, 0.5, 2.0], [1.0, 3.0, -0.5, 2.5]])
    # |column means| = 1, 1, 0, 2.25
    assert top_coordinates(f, 1).tolist() == [3]
    assert sorted(top_coordinates(f, 3).tolist()) == [0, 1, 3]
    assert top_coordinates(f, 99).numel() == 4
