r"""Segmentation networks: a dilated ResNet-18, one context head per paper, and a trainer cache.

Every network of the book is the same three-part pipeline,

.. code-block:: text

    image B×3×H×W ─► dilated ResNet-18 ─► layer4 B×512×H/8×W/8 ─► context head ─► B×128×H/8×W/8
                                      └─► layer3 B×256×H/8×W/8 ─► (ANN's keys, auxiliary head)
                      ─► dropout 0.1 + 1×1 conv ─► B×K×H/8×W/8 ─► bilinear ×8 ─► B×K×H×W

so that the chapters compare heads and nothing else.  The heads follow
mmsegmentation's decode heads (``mmseg/models/decode_heads/*``, configs
``configs/_base_/models/*``) with every width divided by 4, because ResNet-18's last
stage has 512 channels where ResNet-50's has 2048: mmseg's ``channels=512`` becomes
128 here, ``project_channels=256`` (ANN) becomes 64, ``isa_channels=256`` becomes 64.

=============  =====================================================================================
``HEADS``      head (after mmseg)
=============  =====================================================================================
``fcn``        FCNHead: 3×3 conv 512→128, 3×3 conv 128→128, concat the input, 3×3 conv → 128
``nonlocal``   NLHead: conv, ``NonLocal2d(128, 64)`` (logits scaled by 1/√d, as mmseg and the authors' code), conv, concat, conv
``gcnet``      GCHead: conv, ``ContextBlock(128, 1/4, "att", ("add",))``, conv, concat, conv
``danet``      DAHead (:class:`attnlib.danet.DualAttentionHead`): (conv, PAM, conv) + (conv, CAM, conv),
               plus a classifier on each branch for mmseg's two per-branch losses
``ccnet``      CCHead: conv, ``RecurrentCrissCross(128, recurrence=2)``, conv, concat, conv
``ann``        ANNHead: AFNB(layer3 → layer4, 64 key/value channels), dropout, 3×3 conv → 128, APNB
``isanet``     ISAHead: conv, interlaced sparse attention, concat the conv's output, 1×1 conv
=============  =====================================================================================

Simplifications, said once: AFNB and APNB use a single query scale (mmseg's default), and
every conv is conv-BN-ReLU.  DANet keeps mmseg's per-branch losses: with ``aux=True`` the
model has a dropout + 1×1 classifier on the PAM branch and one on the CAM branch
(``branch_classifiers``, mmseg's ``pam_cls_seg`` / ``cam_cls_seg``), and the trainer adds
their losses with weight :data:`attnlib.train.BRANCH_WEIGHT` (1, as mmseg's DAHead).
``model.head`` is the head; the attention block inside it is ``model.head.context``
(nonlocal, gcnet, ccnet, ann's APNB), ``model.head.pam`` / ``.cam`` (danet),
``model.head.isa`` (isanet) and ``model.head.fusion`` (ann's AFNB).
The auxiliary head is mmseg's ``auxiliary_head`` scaled the same way: one 3×3 conv
256→64 on layer3, dropout 0.1, 1×1 conv; the trainer weights its loss by 0.4.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from . import release, train
from ._checks import check_feature_map
from .data import user_folder
from .ann import AFNB, APNB
from .ccnet import RecurrentCrissCross
from .danet import DualAttentionHead
from .gcnet import ContextBlock
from .isanet import InterlacedSparseAttention
from .nonlocal_block import NonLocal2d

__all__ = ["HEADS", "Segmentor", "build", "cache_dir", "dilated_resnet18", "load_trained"]

HEADS = ("fcn", "nonlocal", "gcnet", "danet", "ccnet", "ann", "isanet")

CHANNELS = 128  # mmseg's channels=512 on ResNet-50's 2048, divided by 4 for ResNet-18's 512
LAYER3_CHANNELS, LAYER4_CHANNELS = 256, 512


class ResNetFeatures(nn.Module):
    """ResNet stem and four stages that return the layer3 and layer4 feature maps.

    The attribute names are torchvision's, so a torchvision ``resnet18`` state dict
    (without ``fc``) loads into it as is.
    """

    def __init__(self, net: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c3 = self.layer3(self.layer2(self.layer1(x)))
        return c3, self.layer4(c3)


def _dilate(layer: nn.Sequential, dilation: int) -> None:
    """Make a stage keep its input resolution: stride 1 everywhere, every 3×3 conv dilated.

    The simple rule (no "multi-grid", no reduced dilation in the first block): all 3×3
    convs of the stage get ``dilation`` and the matching ``padding``, so each keeps the
    spatial size and sees the same pixels the strided network saw, spread ``dilation``
    apart.  The 1×1 shortcut conv loses its stride too.
    """
    for block in layer:
        for conv in (block.conv1, block.conv2):
            conv.stride, conv.dilation, conv.padding = (1, 1), (dilation, dilation), (dilation, dilation)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def dilated_resnet18(pretrained: bool = False) -> ResNetFeatures:
    """ResNet-18 at output stride 8: layer3 and layer4 keep stride 1, dilations 2 and 4.

    torchvision's ``BasicBlock`` refuses ``replace_stride_with_dilation``, so the convs
    are edited in place (:func:`_dilate`); no weight changes shape, which is why
    ImageNet weights still load.  From scratch, the last BN of every residual branch
    starts at zero (``zero_init_residual``) so each block starts as the identity.

    Args:
        pretrained: load torchvision's ``ResNet18_Weights.IMAGENET1K_V1``.  Raises
            ``RuntimeError`` if they cannot be fetched (e.g. no network).

    Returns:
        a module mapping B×3×H×W to ``(layer3, layer4)``: B×256×H/8×W/8 and B×512×H/8×W/8.
    """
    net = torchvision.models.resnet18(zero_init_residual=True)
    if pretrained:
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as err:  # URLError, timeout, corrupt download: all mean "no weights"
            raise RuntimeError(
                f"dilated_resnet18(pretrained=True): could not fetch torchvision's ImageNet weights "
                f"ResNet18_Weights.IMAGENET1K_V1 from {weights.url} ({type(err).__name__}: {err}). "
                f"Use pretrained=False to train from scratch, or put the file in {torch.hub.get_dir()}/checkpoints."
            ) from err
        net.load_state_dict(state)
    _dilate(net.layer3, 2)
    _dilate(net.layer4, 4)
    return ResNetFeatures(net)


class ConvBNReLU(nn.Sequential):
    """mmcv's ``ConvModule``: k×k conv (no bias), BatchNorm, ReLU; 'same' padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ContextHead(nn.Module):
    """mmseg's ``FCNHead(num_convs=2, concat_input=True)`` with a context block between its convs.

    conv 3×3 (in→C) → ``context`` → conv 3×3 (C→C) → concat the head's input → conv 3×3 → C.
    With ``context=nn.Identity()`` it is the FCN baseline; mmseg's NLHead, GCHead and
    CCHead are exactly this with their block in the middle.
    """

    def __init__(self, context: nn.Module, in_channels: int = LAYER4_CHANNELS, channels: int = CHANNELS) -> None:
        super().__init__()
        self.conv_in = ConvBNReLU(in_channels, channels)
        self.context = context
        self.conv_out = ConvBNReLU(channels, channels)
        self.conv_cat = ConvBNReLU(in_channels + channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_out(self.context(self.conv_in(x)))
        return self.conv_cat(torch.cat([x, y], dim=1))


class ANNHead(nn.Module):
    """ANN's head (mmseg ``ANNHead``): AFNB fuses layer3 into layer4, then a conv and APNB.

    AFNB takes queries from layer4 and pooled keys/values from layer3 (1+9+36+64 = 110
    keys for pool sizes (1, 3, 6, 8)) and keeps layer4's 512 channels; dropout 0.1 and a
    3×3 conv bring it to C; APNB is the same pyramid attention within that map.
    The only head that reads layer3 (``uses_layer3``).

    Dropout is mmseg's: the head's 0.1 after AFNB and the classifier's 0.1, and none inside
    the blocks (mmseg's AFNB and APNB end in a ConvModule).  The authors' network instead
    drops 0.05 at the end of each block and has no other dropout in its head; stacking both
    would drop more than either.
    """

    uses_layer3 = True

    def __init__(self, low_channels: int = LAYER3_CHANNELS, high_channels: int = LAYER4_CHANNELS,
                 channels: int = CHANNELS, project_channels: int = 64, pool_sizes: tuple[int, ...] = (1, 3, 6, 8)) -> None:
        super().__init__()
        self.fusion = AFNB(low_channels, high_channels, high_channels, project_channels, project_channels, pool_sizes,
                           dropout=0.0)
        self.dropout = nn.Dropout2d(0.1)
        self.bottleneck = ConvBNReLU(high_channels, channels)
        self.context = APNB(channels, channels, project_channels, project_channels, pool_sizes, dropout=0.0)

    def forward(self, c3: torch.Tensor, c4: torch.Tensor) -> torch.Tensor:
        return self.context(self.bottleneck(self.dropout(self.fusion(c3, c4))))


class ISAHead(nn.Module):
    """ISANet's head (mmseg ``ISAHead``): conv, interlaced sparse attention, concat, 1×1 conv.

    As in mmseg the concatenation is with the first conv's output (the attention's own
    input), not with the backbone features, and the fusing conv is 1×1.  ``pad_mode="zeros"``
    lets the padded positions take part in the attention as mmseg's does; the book trains
    with the block's default, ``"mask"`` (45×60 is not divisible by 8×8, so the two differ).
    """

    def __init__(self, in_channels: int = LAYER4_CHANNELS, channels: int = CHANNELS, isa_channels: int = 64,
                 down_factor: tuple[int, int] = (8, 8), pad_mode: str = "mask") -> None:
        super().__init__()
        self.conv_in = ConvBNReLU(in_channels, channels)
        self.isa = InterlacedSparseAttention(channels, isa_channels, channels, channels, down_factor=down_factor,
                                             pad_mode=pad_mode)
        self.conv_cat = ConvBNReLU(2 * channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        return self.conv_cat(torch.cat([self.isa(x), x], dim=1))


def _head(name: str) -> nn.Module:
    """The context head called ``name`` (one of :data:`HEADS`)."""
    if name == "fcn":
        return ContextHead(nn.Identity())
    if name == "nonlocal":  # mmseg NLHead: reduction=2, embedded Gaussian
        return ContextHead(NonLocal2d(CHANNELS, CHANNELS // 2, mode="embedded_gaussian"))
    if name == "gcnet":  # mmseg GCHead: ratio=1/4, attention pooling, channel-add fusion
        return ContextHead(ContextBlock(CHANNELS, ratio=1 / 4, pooling="att", fusions=("add",)))
    if name == "danet":  # mmseg DAHead: pam_channels=64 on 512, i.e. reduction 8
        return DualAttentionHead(LAYER4_CHANNELS, CHANNELS, reduction=8)
    if name == "ccnet":  # mmseg CCHead: recurrence=2, weights shared between the two passes
        return ContextHead(RecurrentCrissCross(CHANNELS, reduction=8, recurrence=2))
    if name == "ann":
        return ANNHead()
    if name == "isanet":
        return ISAHead()
    raise ValueError(f"unknown head {name!r}: expected one of {HEADS}")


class Segmentor(nn.Module):
    """Dilated ResNet-18 → context head → classifier → bilinear upsampling to the input size.

    Args:
        head: one of :data:`HEADS`.
        num_classes: K, the classifier's outputs (CamVid: 11).
        pretrained: start the backbone from ImageNet weights (see :func:`dilated_resnet18`).
        aux: build the auxiliary FCN head on layer3 (used by the trainer, loss weight 0.4),
            and for ``"danet"`` a classifier on each attention branch (loss weight 1 each).

    ``forward(x)`` returns the logits, B×K×H×W.  ``forward(x, return_aux=True)`` returns
    ``(logits, aux_logits)``, the second also B×K×H×W, or ``None`` without an auxiliary
    head.  ``return_branches=True`` appends a dict of per-branch logits, B×K×H×W each, named
    by :attr:`branch_names` (``("pam", "cam")`` for DANet with ``aux``, else empty).  The
    output type depends on the arguments only, never on train/eval mode.
    """

    def __init__(self, head: str = "fcn", num_classes: int = 11, pretrained: bool = False, aux: bool = True) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}: expected one of {HEADS}")
        self.arch = {"head": head, "num_classes": num_classes, "aux": aux}
        # mmseg's DAHead classifies each attention branch too; recorded in arch, so that a
        # DANet checkpoint from before these classifiers is refused by name.
        self.branch_names = ("pam", "cam") if head == "danet" and aux else ()
        if head == "danet":
            self.arch["branch_classifiers"] = bool(self.branch_names)
        self.backbone = dilated_resnet18(pretrained)
        self.head = _head(head)
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(CHANNELS, num_classes, 1))
        self.aux_head = nn.Sequential(
            ConvBNReLU(LAYER3_CHANNELS, CHANNELS // 2), nn.Dropout2d(0.1), nn.Conv2d(CHANNELS // 2, num_classes, 1)
        ) if aux else None
        self.branch_classifiers = nn.ModuleDict(
            {name: nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(CHANNELS, num_classes, 1)) for name in self.branch_names})
        for cls in ((self.classifier[-1],) + ((self.aux_head[-1],) if aux else ())
                    + tuple(c[-1] for c in self.branch_classifiers.values())):
            nn.init.normal_(cls.weight, std=0.01)  # mmseg's init of the final 1×1 conv
            nn.init.zeros_(cls.bias)

    def forward(self, x: torch.Tensor, return_aux: bool = False, return_branches: bool = False):
        _, _, h, w = check_feature_map(x, 3, "Segmentor")

        def upsample(t: torch.Tensor) -> torch.Tensor:
            # In float32: under bf16 autocast the argmax would otherwise see rounded logits.
            return F.interpolate(t.float(), size=(h, w), mode="bilinear", align_corners=False)

        c3, c4 = self.backbone(x)
        branches = {}
        if getattr(self.head, "uses_layer3", False):
            features = self.head(c3, c4)
        elif return_branches and self.branch_names:
            features, *branch_features = self.head(c4, return_branches=True)
            branches = {name: upsample(self.branch_classifiers[name](t))
                        for name, t in zip(self.branch_names, branch_features)}
        else:
            features = self.head(c4)
        outputs = (upsample(self.classifier(features)),)
        if return_aux:
            outputs += (None if self.aux_head is None else upsample(self.aux_head(c3)),)
        if return_branches:
            outputs += (branches,)
        return outputs[0] if len(outputs) == 1 else outputs

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.arch.items())


def build(name: str, num_classes: int = 11, pretrained: bool = False, aux: bool = True) -> Segmentor:
    """The network with context head ``name`` (one of :data:`HEADS`); see :class:`Segmentor`."""
    return Segmentor(name, num_classes=num_classes, pretrained=pretrained, aux=aux)


def cache_dir(checkpoint_dir: str | os.PathLike | None = None) -> Path:
    """Where trained models are cached: the argument, else ``$ATTNLIB_CHECKPOINTS``,
    else ``$XDG_CACHE_HOME/attnlib/checkpoints`` (``~/.cache/attnlib/checkpoints``)."""
    return user_folder(checkpoint_dir, "ATTNLIB_CHECKPOINTS", "checkpoints")


def load_trained(name: str, profile: str | None = None, root: str | os.PathLike | None = None,
                 checkpoint_dir: str | os.PathLike | None = None, *, seed: int = 0) -> tuple[Segmentor, dict]:
    """The network with head ``name`` trained on CamVid under ``profile``: one call per chapter.

    If ``<checkpoint dir>/<name>-<profile>-seed<seed>.pt`` holds a finished run, its
    weights and recorded metrics are loaded (``torch.load(weights_only=True)``).  If it is
    absent and the book's release publishes that file, it is downloaded and checked
    against its SHA-256 first (:func:`attnlib.release.fetch`; any failure falls back to
    training, with a warning saying why).
    Otherwise the network is built from ``seed`` and trained by :func:`attnlib.train.fit`
    on the profile's schedule (an interrupted run resumes from its last checkpoint),
    saved there, and returned.

    Args:
        name: one of :data:`HEADS`.
        profile: ``"quick"`` or ``"full"``; ``None`` asks :func:`attnlib.train.profile`.
        root: the CamVid folder (default: ``$ATTNLIB_DATA``, see :mod:`attnlib.data`).
        checkpoint_dir: see :func:`cache_dir`.
        seed: seeds the initial weights, the data order and the augmentation.

    Returns:
        ``(model, record)``: the model in eval mode (on the GPU if there is one) and what
        :func:`attnlib.train.fit` recorded: ``record["metrics"]``, the final evaluation
        (``miou``, per-class ``iou``, ...; see :func:`attnlib.train.evaluate`),
        ``record["history"]``, the training curves, and ``record["run"]``, the device, time
        and memory of the run.
    """
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}: expected one of {HEADS}")
    profile = train.profile() if profile is None else train.check_profile(profile)
    path = cache_dir(checkpoint_dir) / f"{name}-{profile}-seed{seed}.pt"
    if not path.exists():
        release.fetch(path.name, path)  # the published weights, if any; on failure we train
    train.seed_everything(seed)
    model = build(name)
    result = train.fit(model, train.PROFILES[profile], root=root, seed=seed, checkpoint=path, resume=True)
    return model.eval(), result
