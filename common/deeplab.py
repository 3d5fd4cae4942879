"""DeepLab-v2 ResNet-101, multi-level, exactly as AdaptSegNet and ADVENT build it.

Official code: wasidennis/AdaptSegNet `model/deeplab_multi.py` (`DeeplabMulti`) and valeoai/ADVENT
`advent/model/deeplabv2.py` (`get_deeplab_v2`). Module names are theirs, so the state dict has exactly their 640 keys
(632 without the aux head) and the released models load with `load_state_dict(..., strict=True)`:

    conv1, bn1, layer1..layer4   Caffe-style ResNet-101 trunk, output stride 8
    layer5.conv2d_list.{0..3}    ASPP classifier on layer3 (1024 ch): the aux head (multi-level only)
    layer6.conv2d_list.{0..3}    ASPP classifier on layer4 (2048 ch): the main head

`ResNetTrunk` is the backbone alone (ProDA puts its own head on it, with trainable BN).
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.training import load_checkpoint

# ImageNet/COCO DeepLab init: four ASPP dilations (= paddings) of both heads.
ASPP_DILATIONS = (6, 12, 18, 24)


class Bottleneck(nn.Module):
    """Caffe-style bottleneck: the stride sits on the 1x1 `conv1`, not on the 3x3 as in torchvision."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)
        self.bn1 = norm_layer(planes)
        # 3x3 with padding = dilation keeps the resolution in the dilated layer3 (2) and layer4 (4).
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNetTrunk(nn.Module):
    """DeepLab-v2 ResNet: stem, layer1 (s1), layer2 (s2), layer3 (dilation 2), layer4 (dilation 4); stride 8.

    `layers` are the blocks per layer ((3, 4, 23, 3) = ResNet-101); `width` is the stem width and the planes of
    layer1 (planes 1x/2x/4x/8x width, outputs 4x that), so width=64 is the paper's model and smaller widths give
    small demo models. forward(x) -> (layer3 output [B, 16*width, H/8, W/8], layer4 output [B, 32*width, H/8, W/8]).
    """

    def __init__(self, layers=(3, 4, 23, 3), width=64, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        # ceil_mode=True as Caffe: a 65x97 input gives 17x25 here, not 16x24.
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(width, layers[0], 1, 1, norm_layer)
        self.layer2 = self._make_layer(2 * width, layers[1], 2, 1, norm_layer)
        self.layer3 = self._make_layer(4 * width, layers[2], 1, 2, norm_layer)
        self.layer4 = self._make_layer(8 * width, layers[3], 1, 4, norm_layer)

    def _make_layer(self, planes, blocks, stride, dilation, norm_layer):
        # The official rule (stride != 1 or inplanes != 4 * planes or dilation in {2, 4}) puts a projection shortcut
        # in the first block of every layer, even layer3/layer4 where the shapes already agree.
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
            norm_layer(planes * Bottleneck.expansion),
        )
        blocks_ = [Bottleneck(self.inplanes, planes, stride, dilation, downsample, norm_layer)]
        self.inplanes = planes * Bottleneck.expansion
        blocks_ += [Bottleneck(self.inplanes, planes, 1, dilation, None, norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*blocks_)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x3 = self.layer3(self.layer2(self.layer1(x)))
        return x3, self.layer4(x3)


class AtrousConv2d(nn.Conv2d):
    """A 3x3 convolution with padding = dilation (DeepLab's atrous branches): nn.Conv2d's parameters and result (up
    to floating-point rounding), computed without the kernel's outer rows (columns) when the feature map is no
    taller (wider) than the dilation. Those taps then only ever read the zero padding: they add nothing to the
    output and their gradient is zero, as in nn.Conv2d. On the demos' small maps (10 x 17 at dilations 12-24) this
    is most of the ASPP's work; at the papers' input sizes every tap reads the map and nothing is skipped."""

    def __init__(self, in_channels, out_channels, dilation, bias=True):
        super().__init__(in_channels, out_channels, kernel_size=3, padding=dilation, dilation=dilation, bias=bias)

    def forward(self, x):
        rows, cols = (d < size for d, size in zip(self.dilation, x.shape[-2:]))
        if rows and cols:
            return super().forward(x)
        weight = self.weight[:, :, slice(None) if rows else slice(1, 2), slice(None) if cols else slice(1, 2)]
        padding = (self.dilation[0] if rows else 0, self.dilation[1] if cols else 0)
        return F.conv2d(x, weight, self.bias, padding=padding, dilation=self.dilation)


class ASPPClassifier(nn.Module):
    """DeepLab-v2 classifier: four parallel 3x3 convs (dilation = padding = 6, 12, 18, 24) whose logits are summed.

    `branches` is how many are summed. AdaptSegNet's `Classifier_Module.forward` returns inside its loop, so its
    released models sum only conv2d_list[0] + conv2d_list[1] (branches=2; the author confirms it, issues #20, #60);
    ADVENT sums all four (branches=4). All four convs always exist, so the state dict is the same either way.
    """

    def __init__(self, inplanes, num_classes, branches=4):
        super().__init__()
        assert 1 <= branches <= len(ASPP_DILATIONS), f"aspp branches must be 1..4, got {branches}"
        self.branches = branches
        self.conv2d_list = nn.ModuleList(
            AtrousConv2d(inplanes, num_classes, d) for d in ASPP_DILATIONS
        )

    def forward(self, x):
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1 : self.branches]:
            out += conv(x)
        return out


class DeepLabV2(ResNetTrunk):
    """DeepLab-v2 for AdaptSegNet/ADVENT: `layer5` (aux) on layer3 and `layer6` (main) on layer4, both at stride 8.

    forward(x [B, 3, H, W]) -> (aux, main) logits [B, num_classes, ceil(H/8), ceil(W/8)] when multi_level, else main.
    As in both official repos the BN affine parameters are frozen (requires_grad=False); BN itself stays in whatever
    mode the caller sets (both official loops call model.train(), so BN uses batch statistics).
    """

    def __init__(self, num_classes=19, multi_level=True, aspp_branches=4, layers=(3, 4, 23, 3), width=64):
        super().__init__(layers, width)
        self.multi_level = multi_level
        if multi_level:
            self.layer5 = ASPPClassifier(16 * width, num_classes, aspp_branches)
        self.layer6 = ASPPClassifier(32 * width, num_classes, aspp_branches)
        # Official init: every conv N(0, 0.01) (classifier biases keep PyTorch's default), BN weight 1, bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        freeze_bn_affine(self)

    def forward(self, x):
        x3, x4 = super().forward(x)
        main = self.layer6(x4)
        return (self.layer5(x3), main) if self.multi_level else main


def freeze_bn_affine(model):
    """requires_grad=False on every BatchNorm weight/bias (the official models do this in their constructors)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters():
                p.requires_grad_(False)
    return model


def optim_parameters(model, lr):
    """SGD groups: [{backbone params requiring grad, lr}, {layer5 + layer6 params, 10 * lr}].

    Each parameter appears once. The official `get_1x_lr_params_NOscale` walks `modules()` and yields each module's
    recursive `parameters()`, so a backbone conv weight is listed ~3 times (314 entries for 104 tensors); on PyTorch
    0.4 SGD then applied its update once per entry, i.e. roughly a 3x backbone step. We do not replicate that.
    """
    heads = [p for name, p in model.named_parameters() if name.split(".")[0] in ("layer5", "layer6")]
    head_ids = {id(p) for p in heads}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    return [{"params": backbone, "lr": lr}, {"params": heads, "lr": 10 * lr}]


def load_caffe_init(model, path):
    """Load the Caffe-converted DeepLab init (AdaptSegNet `DeepLab_resnet_pretrained_init-f81d91e8.pth`, ADVENT
    `DeepLab_resnet_pretrained_imagenet.pth`) into `model`, as both official training scripts do.

    Its keys carry a `Scale.` prefix (`Scale.layer1.0.conv1.weight`): drop the first dotted component; skip keys whose
    second component is `layer5` (the checkpoint's single-level classifier on layer4, not our aux head), so layer5 and
    layer6 keep their N(0, 0.01) init. Prints what was loaded, missing and unexpected; returns (missing, unexpected).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepLab init checkpoint not found: {path}")
    ckpt = load_checkpoint(path)  # one clear error for a text, truncated or pickled file
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path}: expected a flat state dict of tensors with 'Scale.'-prefixed keys")
    own = model.state_dict()
    new, unexpected, mismatched = {}, [], []
    for key, value in ckpt.items():
        parts = key.split(".")
        if len(parts) < 2 or parts[1] == "layer5":
            continue
        name = ".".join(parts[1:])
        if name not in own:
            unexpected.append(key)
        elif own[name].shape != value.shape:
            mismatched.append(f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(own[name].shape)}")
        else:
            new[name] = value
    if mismatched:
        raise ValueError(f"{path}: shape mismatch for {len(mismatched)} keys: " + "; ".join(mismatched[:10]))
    if not new:
        raise ValueError(
            f"{path}: no checkpoint key matches the model; expected 'Scale.'-prefixed DeepLab keys such as "
            f"'Scale.conv1.weight', got {list(ckpt)[:5]}"
        )
    # Checkpoints converted before PyTorch 0.4 have no BN num_batches_tracked: not worth reporting as missing.
    missing = [k for k in own if k not in new and not k.endswith("num_batches_tracked")]
    model.load_state_dict({**own, **new})
    print(f"load_caffe_init: {len(new)} tensors from {path}; missing (kept at init): {missing}; "
          f"unexpected (ignored): {unexpected}")
    return missing, unexpected
