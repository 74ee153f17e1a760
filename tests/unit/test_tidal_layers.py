"""sift.bench.tidal_layers' schedule search: the dynamic programme against brute force, and the kept-mass
bookkeeping against a direct count."""
import itertools

import torch

from sift.bench.tidal_layers import best_schedule, kept_mass, schedule_mass, selection_masks


def test_best_schedule_is_the_brute_force_optimum():
    torch.manual_seed(0)
    n = 9
    mass = torch.rand(n, n)
    for dense in range(2, 7):
        found = best_schedule(mass, dense)
        assert found[0] + len(found) == dense  # layers before the first selection + the selecting layers
        best = max(schedule_mass(mass, [first, *rest])
                   for first in range(1, dense) for rest in itertools.combinations(range(first + 1, n), dense - 1 - first))
        assert schedule_mass(mass, found) == best


def test_kept_mass_counts_the_selected_tokens():
    torch.manual_seed(1)
    scores = torch.rand(3, 2, 40)  # [layers, kv heads, tokens]
    masks = selection_masks(scores, budget=8, sinks=2, recent=3)
    assert masks.sum(-1).eq(8).all()  # budget - 1 ranked or kept tokens + the current one
    assert masks[..., :2].all() and masks[..., -4:].all()  # the sinks, the latest 3 and the current token
    mass = kept_mass(scores, masks)
    probs = scores / scores.sum(-1, keepdim=True)
    assert torch.allclose(mass[0, 2], (probs[2] * masks[0]).sum(-1).mean())
    assert torch.allclose(mass[1, 1], (probs[1] * masks[1]).sum(-1).mean())
