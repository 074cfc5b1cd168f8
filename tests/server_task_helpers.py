"""Real server tasks (BackdoorIndicator's indicator, FLARE's PLRs) over the helpers' small
'model': its 26 parameters, in order, are those of a 3 -> 4 -> 2 MLP."""

import torch
from torch import nn

from fl_defense.server_tasks import IndicatorTask, PenultimateFeatures


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def tiny_indicator(samples: int = 8) -> IndicatorTask:
    ood = torch.rand((samples, 3), generator=torch.Generator().manual_seed(5)) * 4 - 2
    return IndicatorTask(tiny_mlp(), ood, num_classes=2, seed=1)


def tiny_features(samples: int = 6) -> PenultimateFeatures:
    return PenultimateFeatures(tiny_mlp(), torch.rand((samples, 3), generator=torch.Generator().manual_seed(6)),
                               max_samples=samples)
