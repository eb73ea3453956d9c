"""The dilated backbone, every head's forward pass, input checks and the trained-model cache."""
from __future__ import annotations

import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

from attnlib import models, train
from conftest import randomize_, requires_data



def test_dilated_resnet18_has_output_stride_8():
    backbone = models.dilated_resnet18().eval()
    with torch.no_grad():
        c3, c4 = backbone(torch.randn(1, 3, 360, 480))
    assert c3.shape == (1, 256, 45, 60)
    assert c4.shape == (1, 512, 45, 60)


def test_dilation_changes_no_weight():
    backbone = models.dilated_resnet18()
    reference = torchvision.models.resnet18()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    backbone.load_state_dict(state)  # strict: same names, same shapes
    assert sum(p.numel() for p in backbone.parameters()) == sum(v.numel() for k, v in reference.named_parameters()
                                                                 if not k.startswith("fc."))
    for layer, rate in ((backbone.layer3, 2), (backbone.layer4, 4)):
        for block in layer:
            for conv in (block.conv1, block.conv2):
                assert (conv.stride, conv.dilation, conv.padding) == ((1, 1), (rate, rate), (rate, rate))
        assert layer[0].downsample[0].stride == (1, 1)


def test_pretrained_without_network_says_so(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="could not fetch.*pretrained=False"):
        models.dilated_resnet18(pretrained=True)


def test_ann_head_drops_out_as_mmseg():
    """mmseg's ANNHead: Dropout2d(0.1) after AFNB and before the classifier, none inside AFNB and APNB."""
    torch.manual_seed(0)
    model = models.build("ann")
    rates = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout2d) and m.p > 0}
    assert rates == {"head.dropout": 0.1, "classifier.0": 0.1, "aux_head.1": 0.1}
    head = model.head.train()
    c3, c4 = torch.randn(2, 256, 9, 11), torch.randn(2, 512, 9, 11)
    with torch.no_grad():  # training mode: BatchNorm uses batch statistics, and no block drops anything
        assert torch.equal(head.fusion(c3, c4), head.fusion(c3, c4))
        x = torch.randn(2, 128, 9, 11)
        assert torch.equal(head.context(x), head.context(x))


@pytest.mark.parametrize("head", models.HEADS)
def test_every_head_segments_a_full_frame(head):
    torch.manual_seed(0)
    model = models.build(head).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 360, 480))
    assert out.shape == (1, 11, 360, 480)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("head", models.HEADS)
def test_every_head_trains_in_channels_last(head):
    """The trainer's layout: channels_last weights and input, train mode, a backward pass."""
    torch.manual_seed(0)
    model = models.build(head).train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 48).contiguous(memory_format=torch.channels_last)
    logits, aux = model(x, return_aux=True)
    (logits.logsumexp(1).mean() + aux.logsumexp(1).mean()).backward()
    assert logits.shape == (2, 11, 32, 48)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_auxiliary_output_only_on_request():
    model = models.build("fcn").train()
    x = torch.randn(2, 3, 32, 48)
    logits, aux = model(x, return_aux=True)
    assert logits.shape == aux.shape == (2, 11, 32, 48)
    assert model(x).shape == (2, 11, 32, 48)
    assert models.build("fcn", aux=False)(x, return_aux=True)[1] is None


def test_unknown_head_lists_valid_names():
    with pytest.raises(ValueError, match="unknown head 'psp'.*'fcn'.*'isanet'"):
        models.build("psp")


@pytest.mark.parametrize("x, message", [
    (torch.randn(3, 64, 64), "4-D"),
    (torch.randn(1, 1, 64, 64), "expected 3 input channels, got 1"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "floating-point"),
])
def test_input_is_validated(x, message):
    with pytest.raises(ValueError, match=message):
        models.build("fcn", aux=False)(x)


@requires_data
def test_load_trained_trains_once_then_loads(tmp_path, monkeypatch):
    tiny = train.Schedule(name="quick", steps=2, batch_size=2, crop_size=(32, 48), lr=1e-3, weight_decay=1e-2,
                          train_limit=2, eval_limit=1, eval_batch_size=1)
    monkeypatch.setitem(train.PROFILES, "quick", tiny)
    model, record = models.load_trained("fcn", "quick", checkpoint_dir=tmp_path)
    assert not model.training
    assert (tmp_path / "fcn-quick-seed0.pt").is_file()
    assert record["metrics"]["images"] == 1 and 0 <= record["metrics"]["miou"] <= 1
    assert len(record["history"]["loss"]) == 2 and record["run"]["train_images"] == 4
    monkeypatch.setattr(train, "load_split", lambda *a, **k: pytest.fail("a cached model must not be retrained"))
    again, record_again = models.load_trained("fcn", "quick", checkpoint_dir=tmp_path)
    assert record_again == record
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_danet_has_mmseg_per_branch_classifiers():
    torch.manual_seed(0)
    model = models.build("danet").eval()
    assert model.branch_names == ("pam", "cam") and model.arch["branch_classifiers"] is True
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        logits, aux, branches = model(x, return_aux=True, return_branches=True)
        torch.testing.assert_close(model(x), logits)
        assert set(branches) == {"pam", "cam"} and all(t.shape == (1, 11, 32, 48) for t in branches.values())
        # each branch classifier reads its own branch of the head
        _, position, channel = model.head(model.backbone(x)[1], return_branches=True)
        expected = torch.nn.functional.interpolate(model.branch_classifiers["cam"](channel), size=(32, 48), mode="bilinear")
        torch.testing.assert_close(branches["cam"], expected)
        assert not torch.allclose(branches["pam"], branches["cam"])
    assert models.build("danet", aux=False).branch_names == ()
    assert models.build("danet", aux=False).arch["branch_classifiers"] is False
    fcn = models.build("fcn").eval()
    assert fcn.branch_names == () and "branch_classifiers" not in fcn.arch  # other heads' checkpoints unchanged
    with torch.no_grad():
        assert fcn(x, return_branches=True)[1] == {}


@torch.no_grad()
def mmseg_isa_head(head, x):
    """mmseg 1.2.2 ``ISAHead.forward`` up to ``cls_seg`` (decode_heads/isa_head.py), line by line, on the
    weights of ``head``.  Its ``SelfAttentionBlock`` is openseg's ``SelfAttentionBlock2D`` (query and key
    two conv-BN-ReLU, value one conv, ``matmul_norm``, an output conv-BN-ReLU)."""

    def relation(sa, x):
        n, _, h, w = x.shape
        query = sa.query(x).reshape(n, sa.key_channels, -1).permute(0, 2, 1)
        key = sa.key(x).reshape(n, sa.key_channels, -1)
        value = sa.value(x).reshape(n, sa.value.out_channels, -1).permute(0, 2, 1)
        sim_map = (torch.matmul(query, key) * sa.key_channels ** -.5).softmax(dim=-1)
        context = torch.matmul(sim_map, value).permute(0, 2, 1).reshape(n, -1, h, w)
        return sa.out(context)

    x = head.conv_in(x)
    residual = x
    n, c, h, w = x.size()
    loc_h, loc_w = head.isa.down_factor
    glb_h, glb_w = math.ceil(h / loc_h), math.ceil(w / loc_w)
    pad_h, pad_w = glb_h * loc_h - h, glb_w * loc_w - w
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    x = x.view(n, c, glb_h, loc_h, glb_w, loc_w).permute(0, 3, 5, 1, 2, 4).reshape(-1, c, glb_h, glb_w)
    x = relation(head.isa.long_range, x)
    x = x.view(n, loc_h, loc_w, c, glb_h, glb_w).permute(0, 4, 5, 3, 1, 2).reshape(-1, c, loc_h, loc_w)
    x = relation(head.isa.short_range, x)
    x = x.view(n, glb_h, glb_w, c, loc_h, loc_w).permute(0, 3, 1, 4, 2, 5).reshape(n, c, glb_h * loc_h, glb_w * loc_w)
    if pad_h > 0 or pad_w > 0:
        x = x[:, :, pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w]
    return head.conv_cat(torch.cat([x, residual], dim=1))


@pytest.mark.parametrize("pad_mode", ["zeros", "mask"])
def test_isa_head_with_zeros_padding_is_mmseg_isa_head(pad_mode):
    """45×60 at 8×8 blocks needs padding: only pad_mode="zeros" is mmseg's head (its value conv's bias,
    which mmseg has and openseg does not, is the one difference left; attnlib's is openseg's, bias-free)."""
    head = randomize_(models.ISAHead(in_channels=16, channels=8, isa_channels=4, pad_mode=pad_mode), std=0.3)
    head = head.double().eval()
    x = torch.randn(2, 16, 45, 60, dtype=torch.float64)
    with torch.no_grad():
        gap = (head(x) - mmseg_isa_head(head, x)).abs().max().item()
    assert (gap < 1e-12) == (pad_mode == "zeros"), gap


def test_isa_head_defaults_to_masked_padding():
    assert models.build("isanet").head.isa.pad_mode == "mask"
