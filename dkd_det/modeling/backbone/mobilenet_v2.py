"""MobileNetV2 (Sandler et al., CVPR 2018) as a detectron2 backbone, and its FPN.

The layers mirror torchvision's ``mobilenet_v2`` (width multiplier 1.0) block for block,
``features.0`` ... ``features.18``, so that torchvision's ImageNet weights convert to it by
renaming only (``dkd_det.checkpoint.CONVERTERS["mobilenet_v2"]``). Within a block the
convolutions are detectron2 ``Conv2d`` layers with their norm from ``get_norm``
(FrozenBN, BN, SyncBN, ...):

    features.0                  stem: 3x3 conv, stride 2, 3 -> 32 channels
    features.i.expand           1x1 conv, c -> 6c          (absent in features.1, expansion 1)
    features.i.depthwise        3x3 depthwise conv, stride 1 or 2
    features.i.project          1x1 conv, linear (no activation)
    features.18                 1x1 conv, 320 -> 1280      (built only for the "last" output)

The outputs, named after detectron2's ResNet stages (``res2`` ... ``res5``):

    name   after block   stride   channels
    m2     features.3        4        24
    m3     features.6        8        32
    m4     features.13      16        96
    m5     features.17      32       320
    last   features.18      32      1280

The FPN configs use m2..m5, as is usual for MobileNetV2-FPN detectors: the final 1x1 conv
to 1280 channels only widens stride 32 before FPN's own 1x1 lateral conv projects it back
down, and costs 0.4 M parameters; ``last`` is there for who wants it (``IN_FEATURES``
["m2", "m3", "m4", "last"]).
"""

import math
from typing import Dict, List

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

__all__ = [
    "MobileNetV2",
    "InvertedResidual",
    "build_mobilenet_v2_backbone",
    "build_mobilenet_v2_fpn_backbone",
    "STAGES",
]

# (expansion t, output channels c, repeats n, stride s of the first repeat), the paper's Table 2.
_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]

# Stage name -> (first block, last block) indices into ``features``, inclusive. A stage
# ends where an output can be taken; "stem" is the stride-2 part before m2. FREEZE_AT
# counts stages in this order, like MODEL.BACKBONE.FREEZE_AT for ResNet (1: stem, 2: +m2, ...).
STAGES = {
    "stem": (0, 1),
    "m2": (2, 3),
    "m3": (4, 6),
    "m4": (7, 13),
    "m5": (14, 17),
    "last": (18, 18),
}
_OUTPUTS = [name for name in STAGES if name != "stem"]


class ConvNormReLU6(CNNBlockBase):
    """Conv -> norm -> ReLU6: the stem (``features.0``, 3x3 stride 2) and the final 1x1
    conv (``features.18``). Maps (N, in_channels, H, W) to (N, out_channels, ceil(H/stride),
    ceil(W/stride))."""

    def __init__(self, in_channels, out_channels, *, kernel_size, stride, norm):
        super().__init__(in_channels, out_channels, stride)
        self.conv = Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            bias=False,
            norm=get_norm(norm, out_channels),
            activation=nn.ReLU6(inplace=True),
        )
        weight_init.c2_msra_fill(self.conv)

    def forward(self, x):
        return self.conv(x)


class InvertedResidual(CNNBlockBase):
    """MobileNetV2's block: 1x1 expansion to ``expand_ratio * in_channels`` (ReLU6), 3x3
    depthwise conv with ``stride`` (ReLU6), linear 1x1 projection; plus the input when the
    shape is unchanged. Maps (N, in_channels, H, W) to (N, out_channels, ceil(H/stride),
    ceil(W/stride))."""

    def __init__(self, in_channels, out_channels, *, stride, expand_ratio, norm):
        super().__init__(in_channels, out_channels, stride)
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        if expand_ratio != 1:
            self.expand = Conv2d(
                in_channels,
                hidden,
                1,
                bias=False,
                norm=get_norm(norm, hidden),
                activation=nn.ReLU6(inplace=True),
            )
        else:
            self.expand = None
        self.depthwise = Conv2d(
            hidden,
            hidden,
            3,
            stride=stride,
            padding=1,
            groups=hidden,
            bias=False,
            norm=get_norm(norm, hidden),
            activation=nn.ReLU6(inplace=True),
        )
        # Linear: a ReLU here would destroy information in the narrow bottleneck (the paper's
        # point).
        self.project = Conv2d(
            hidden, out_channels, 1, bias=False, norm=get_norm(norm, out_channels)
        )
        for layer in (self.expand, self.depthwise, self.project):
            if layer is not None:
                weight_init.c2_msra_fill(layer)

    def forward(self, x):
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.depthwise(y))
        return x + y if self.use_residual else y


class MobileNetV2(Backbone):
    """MobileNetV2 with width multiplier 1.0, torchvision's layout, detectron2's norms.

    ``forward`` maps images (N, 3, H, W), normalised as the weights expect, to
    ``{name: (N, C, ceil(H / stride), ceil(W / stride))}`` for each requested output
    (see the module docstring for names, strides and channels). Blocks after the last
    requested output are not built, so that no parameter goes unused in training.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_features=("m2", "m3", "m4", "m5"),
        norm: str = "FrozenBN",
        freeze_at: int = 0,
    ):
        """
        Args:
            in_channels: channels of the input image.
            out_features: a non-empty subset of ``"m2", "m3", "m4", "m5", "last"``.
            norm: a detectron2 norm name for ``get_norm``: "FrozenBN", "BN", "SyncBN", ...
            freeze_at: the number of stages (stem, m2, m3, m4, m5, last) whose parameters are
                frozen and whose norms become FrozenBN; 0 trains everything.
        """
        super().__init__()
        out_features = list(out_features)
        unknown = [f for f in out_features if f not in _OUTPUTS]
        if not out_features or unknown:
            raise ValueError(
                f"MobileNetV2 out_features {out_features}: each must be one of {_OUTPUTS}."
            )
        self._out_features = sorted(out_features, key=_OUTPUTS.index)
        num_blocks = STAGES[self._out_features[-1]][1] + 1
        num_stages = list(STAGES).index(self._out_features[-1]) + 1
        if not 0 <= freeze_at <= num_stages:
            raise ValueError(
                f"MobileNetV2 freeze_at={freeze_at}: must be in [0, {num_stages}] for outputs "
                f"{self._out_features}."
            )

        blocks: List[CNNBlockBase] = [
            ConvNormReLU6(in_channels, 32, kernel_size=3, stride=2, norm=norm)
        ]
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                blocks.append(
                    InvertedResidual(
                        blocks[-1].out_channels,
                        c,
                        stride=s if i == 0 else 1,
                        expand_ratio=t,
                        norm=norm,
                    )
                )
        blocks.append(
            ConvNormReLU6(blocks[-1].out_channels, 1280, kernel_size=1, stride=1, norm=norm)
        )
        self.features = nn.Sequential(*blocks[:num_blocks])

        self._out_feature_strides: Dict[str, int] = {}
        self._out_feature_channels: Dict[str, int] = {}
        self._output_at = {}  # block index -> output name
        stride = 1
        for name, (first, last) in STAGES.items():
            if last >= num_blocks:
                break
            stride *= math.prod(b.stride for b in blocks[first : last + 1])
            if name in self._out_features:
                self._out_feature_strides[name] = stride
                self._out_feature_channels[name] = blocks[last].out_channels
                self._output_at[last] = name
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0):
        """Freeze the first ``freeze_at`` stages (stem, m2, m3, ...): no gradients, FrozenBN.

        Returns:
            the backbone itself.
        """
        for name in list(STAGES)[:freeze_at]:
            first, last = STAGES[name]
            for block in self.features[first : last + 1]:
                block.freeze()
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (N, C, H, W) images, any H and W.

        Returns:
            {name: (N, channels, ceil(H / stride), ceil(W / stride))} for ``out_features``.
        """
        if x.dim() != 4:
            raise ValueError(f"MobileNetV2 takes (N, C, H, W) inputs, got shape {list(x.shape)}.")
        outputs = {}
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self._output_at:
                outputs[self._output_at[i]] = x
        return outputs


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_backbone(cfg, input_shape: ShapeSpec):
    """The bare MobileNetV2 of ``cfg.MODEL.MOBILENET`` (OUT_FEATURES, NORM), with detectron2's
    ``MODEL.BACKBONE.FREEZE_AT`` stages frozen (stem, m2, m3, ...; 0 trains everything), as
    detectron2's ResNet honours it.

    Returns:
        MobileNetV2: a :class:`Backbone` whose ``output_shape()`` gives each output's
        channels and stride (4, 8, 16, 32).
    """
    m = cfg.MODEL.MOBILENET
    return MobileNetV2(
        input_shape.channels,
        out_features=m.OUT_FEATURES,
        norm=m.NORM,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_fpn_backbone(cfg, input_shape: ShapeSpec):
    """MobileNetV2 + detectron2's FPN with a max-pooled P6, as ``build_resnet_fpn_backbone``.

    ``MODEL.FPN.IN_FEATURES`` names MobileNetV2 outputs (e.g. ["m2", "m3", "m4", "m5"]);
    the result has p2..p6 at strides 4..64 with ``MODEL.FPN.OUT_CHANNELS`` channels, and
    inputs must be padded to a multiple of its ``size_divisibility`` (32), as ImageList does.
    """
    bottom_up = build_mobilenet_v2_backbone(cfg, input_shape)
    missing = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {list(cfg.MODEL.FPN.IN_FEATURES)} asks for {missing}, which "
            f"MODEL.MOBILENET.OUT_FEATURES {list(cfg.MODEL.MOBILENET.OUT_FEATURES)} "
            "does not produce."
        )
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
