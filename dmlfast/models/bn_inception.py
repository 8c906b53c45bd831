"""BN-Inception (Ioffe & Szegedy 2015), the Caffe model as ported to PyTorch by Cadene.

Layer names follow ``pretrainedmodels.bninception`` so that its ImageNet state dict
(``bn_inception-52deb4733.pth``, from https://github.com/Cadene/pretrained-models.pytorch, the file the
Proxy-Anchor and ProxyNCA code load) loads as is. Inputs are BGR on the 0-255 scale minus the mean
[104, 117, 128] (``make_loader(..., normalization="bn_inception")``). The output of ``forward`` is the
1024-channel feature map of ``inception_5b`` (7 x 7 at 224 px); the classifier is not part of it.
"""
from __future__ import annotations

import torch
from torch import nn

# name: (in, 1x1, 3x3 reduce, 3x3, double reduce, double 3x3, pool kind, pool proj, stride)
# 1x1 = 0 and pool proj = 0 mark the stride-2 blocks (no 1x1 branch, max pool passed through).
_BLOCKS = (
    ("3a", 192, 64, 64, 64, 64, 96, "avg", 32, 1),
    ("3b", 256, 64, 64, 96, 64, 96, "avg", 64, 1),
    ("3c", 320, 0, 128, 160, 64, 96, "max", 0, 2),
    ("4a", 576, 224, 64, 96, 96, 128, "avg", 128, 1),
    ("4b", 576, 192, 96, 128, 96, 128, "avg", 128, 1),
    ("4c", 576, 160, 128, 160, 128, 160, "avg", 128, 1),
    ("4d", 608, 96, 128, 192, 160, 192, "avg", 128, 1),
    ("4e", 608, 0, 128, 192, 192, 256, "max", 0, 2),
    ("5a", 1056, 352, 192, 320, 160, 224, "avg", 128, 1),
    ("5b", 1024, 352, 192, 320, 192, 224, "max", 128, 1),
)


class _Inception(nn.Module):
    """One mixed block; its children are registered on ``owner`` with Cadene's flat names."""

    def __init__(self, owner: nn.Module, name, cin, c1, c3r, c3, cdr, cd, pool, cp, stride):
        super().__init__()
        self.prefix = f"inception_{name}"
        self.owner = [owner]  # a list, so the owner is not registered as a child (no cycle)
        self.branches = []
        if c1:
            self.branches.append(self._convs(owner, [("1x1", cin, c1, 1, 1)]))
        self.branches.append(self._convs(owner, [("3x3_reduce", cin, c3r, 1, 1), ("3x3", c3r, c3, 3, stride)]))
        self.branches.append(self._convs(owner, [("double_3x3_reduce", cin, cdr, 1, 1), ("double_3x3_1", cdr, cd, 3, 1),
                                                 ("double_3x3_2", cd, cd, 3, stride)]))
        if stride == 2:
            pool_layer = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        elif pool == "max":
            pool_layer = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
        else:
            pool_layer = nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True)
        setattr(owner, f"{self.prefix}_pool", pool_layer)
        pool_branch = [f"{self.prefix}_pool"]
        if cp:
            pool_branch += self._convs(owner, [("pool_proj", cin, cp, 1, 1)])
        self.branches.append(pool_branch)

    def _convs(self, owner, specs):
        names = []
        for suffix, cin, cout, k, stride in specs:
            base = f"{self.prefix}_{suffix}"
            setattr(owner, base, nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2))
            setattr(owner, f"{base}_bn", nn.BatchNorm2d(cout))
            names += [base, f"{base}_bn", "relu"]
        return names

    def forward(self, x):
        owner = self.owner[0]
        outs = []
        for branch in self.branches:
            y = x
            for name in branch:
                y = torch.relu(y) if name == "relu" else getattr(owner, name)(y)
            outs.append(y)
        return torch.cat(outs, 1)


class BNInception(nn.Module):
    """BN-Inception feature extractor: ``forward(x [N,3,H,W]) -> [N,1024,H/32,W/32]``.

    ``out_channels`` is 1024. Load weights with :func:`dmlfast.models.load_backbone_weights` or
    ``load_state_dict`` (Cadene's ``last_linear.*`` keys are the classifier and are dropped)."""

    out_channels = 1024

    def __init__(self):
        super().__init__()
        self.conv1_7x7_s2 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.conv1_7x7_s2_bn = nn.BatchNorm2d(64)
        self.pool1_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2_3x3_reduce = nn.Conv2d(64, 64, 1)
        self.conv2_3x3_reduce_bn = nn.BatchNorm2d(64)
        self.conv2_3x3 = nn.Conv2d(64, 192, 3, padding=1)
        self.conv2_3x3_bn = nn.BatchNorm2d(192)
        self.pool2_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self._blocks = [_Inception(self, *spec) for spec in _BLOCKS]

    def forward(self, x):
        x = self.pool1_3x3_s2(torch.relu(self.conv1_7x7_s2_bn(self.conv1_7x7_s2(x))))
        x = torch.relu(self.conv2_3x3_reduce_bn(self.conv2_3x3_reduce(x)))
        x = self.pool2_3x3_s2(torch.relu(self.conv2_3x3_bn(self.conv2_3x3(x))))
        for block in self._blocks:
            x = block(x)
        return x
