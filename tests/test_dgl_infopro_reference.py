"""DGL and InfoPro against their reference code: the reference layouts as
settings, and the reconstruction target without batch padding."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.optim import OptimWrapper

from local_utils import TINY_RETINANET, det_batch, small_aux
from mmlocal.models.local.heads.recon_decoder import (ReconDecoder,
                                                      padding_mask)
from test_local_learner import build


# ------------------------------------------------------------------- DGL
def test_dgl_reference_layer_stack():
    """``num_convs=3, channels=None, pool=4``: eugenium/DGL's MLP-SR stack
    (3 x [1x1 conv at the input width, BN, ReLU] on a 4x pooled map); the
    default stays 2 x 128."""
    ref = build(num_modules=3, aux=small_aux(
        'mmlocal.DGLAux', channels=None, num_convs=3, pool=4))
    default = build(num_modules=3, aux=small_aux('mmlocal.DGLAux',
                                                 channels=128))
    for aux, aux_default, k in zip(ref.aux_nets, default.aux_nets,
                                   range(2)):
        width = ref._seq.block_out_channels[ref.module_ranges[k][1] - 1]
        pool, *convs = aux.mlp
        assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 4
        assert len(convs) == 3
        for conv in convs:
            assert isinstance(conv, ConvModule) and conv.with_norm
            assert conv.conv.kernel_size == (1, 1) and conv.conv.bias is None
            assert conv.conv.in_channels == conv.conv.out_channels == width
        assert [c.conv.out_channels for c in aux_default.mlp] == [128, 128]
    ow = OptimWrapper(torch.optim.SGD(ref.parameters(), lr=0.01))
    out = ref.train_step(det_batch(), ow)
    assert all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize('kwargs, option', [
    (dict(channels=0), 'channels'), (dict(channels=True), 'channels'),
    (dict(num_convs=-1), 'num_convs'), (dict(pool=0), 'pool')
])
def test_dgl_bad_options_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=f'{option}='):
        build(aux=small_aux('mmlocal.DGLAux', **kwargs))


# ------------------------------------------------------- InfoPro decoder
def infopro_decoder_as_written(in_channels):
    """InfoPro-Pytorch's decoder (``Experiments on ImageNet/networks/
    resnet.py`` Decoder, ``decoder_inter`` of its Cityscapes
    encoder_decoder.py) as a plain Sequential: from stride 8, 128 -> 32 ->
    12 -> 3 with align_corners=True upsampling, biases before BN."""
    def up():
        return nn.Upsample(scale_factor=2, mode='bilinear',
                           align_corners=True)
    return nn.Sequential(
        nn.Conv2d(in_channels, 128, 1), nn.BatchNorm2d(128), nn.ReLU(),
        up(), nn.Conv2d(128, 32, 3, padding=1), nn.BatchNorm2d(32),
        nn.ReLU(),
        up(), nn.Conv2d(32, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        up(), nn.Conv2d(12, 3, 3, padding=1))


def test_recon_decoder_reference_layout_equals_infopro():
    torch.manual_seed(0)
    ours = ReconDecoder(24, stride=8, out_stride=1, channels=128,
                        widths=(32, 12), final_upsample=True,
                        align_corners=True)
    ref = infopro_decoder_as_written(24)
    convs = [m for m in ours.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
    ref_convs = [m for m in ref if isinstance(m, nn.Conv2d)]
    ref_norms = [m for m in ref if isinstance(m, nn.BatchNorm2d)]
    assert [c.weight.shape for c in convs] == \
        [c.weight.shape for c in ref_convs]
    with torch.no_grad():
        for a, b in zip(convs, ref_convs):
            b.weight.copy_(a.weight)
            if a.bias is not None:
                b.bias.copy_(a.bias)
            else:  # a bias before BN: cancelled by the batch mean
                b.bias.normal_()
        for a, b in zip(norms, ref_norms):
            a.weight.normal_()
            a.bias.normal_()
            b.load_state_dict(a.state_dict())
    y = torch.randn(2, 24, 5, 7)
    out = ours.train()(y)
    assert out.shape == (2, 3, 40, 56)
    torch.testing.assert_close(out, ref.train()(y), rtol=1e-4, atol=1e-5)


def test_recon_decoder_default_layout_is_unchanged():
    dec = ReconDecoder(24, stride=16, out_stride=2, channels=128)
    convs = [m for m in dec.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == \
        [(24, 128), (128, 64), (64, 32), (32, 16), (16, 3)]
    assert dec(torch.zeros(1, 24, 2, 3)).shape == (1, 3, 16, 24)


@pytest.mark.parametrize('kwargs, match', [
    (dict(widths=(32, )), r'widths=\(32,\) must be 2 positive ints'),
    (dict(widths=(32, 0, 4)), 'widths='),
    (dict(out_stride=8, final_upsample=True), 'final_upsample'),
])
def test_recon_decoder_bad_layout_names_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReconDecoder(8, stride=8, **dict(dict(out_stride=2), **kwargs))


# ------------------------------------- reconstruction target and padding
def test_padding_is_left_out_of_the_reconstruction_target():
    """On a batch padded to a common size, the loss equals the mean of each
    image's own BCE over its pixels only (not the mean-grey padding)."""
    torch.manual_seed(0)
    dec = ReconDecoder(8, stride=8, out_stride=4, channels=16).eval()
    inputs = torch.zeros(2, 3, 64, 64)
    samples = det_batch(2, 64)['data_samples']
    samples[1].set_metainfo(dict(img_shape=(40, 56)))
    valid = padding_mask(samples, inputs)
    assert valid[0].all() and valid[1, :, :40, :56].all()
    assert valid[1].sum() == 40 * 56
    image = torch.rand(2, 3, 64, 64)
    image[1, :, 40:] = 0.5  # what padding looks like: the mean
    image[1, :, :, 56:] = 0.5
    y = torch.randn(2, 8, 8, 8)
    loss = dec.loss(y, image, valid)
    logits = dec(y)
    bce0 = F.binary_cross_entropy_with_logits(
        logits[0], F.avg_pool2d(image[0], 4), reduction='none')
    bce1 = F.binary_cross_entropy_with_logits(
        logits[1, :, :10, :14], F.avg_pool2d(image[1, :, :40, :56], 4),
        reduction='none')
    expected = (bce0.sum() + bce1.sum()) / (bce0.numel() + bce1.numel())
    torch.testing.assert_close(loss, expected)
    # an all-image batch: no mask, the plain mean
    assert padding_mask(det_batch(2, 64)['data_samples'], inputs) is None
    torch.testing.assert_close(
        dec.loss(y, image, torch.ones(2, 1, 64, 64)), dec.loss(y, image))


def test_infopro_step_on_a_padded_batch_reads_the_mask():
    """Through the learner: images of two sizes are padded by the data
    preprocessor; the aux loss is the masked one."""
    learner = build(TINY_RETINANET, num_modules=2,
                    aux=small_aux(recon=dict(channels=16, out_stride=4)))
    batch = det_batch(2, 64)
    batch['inputs'][1] = batch['inputs'][1][:, :48, :40].clone()
    batch['data_samples'][1].set_metainfo(
        dict(img_shape=(48, 40), ori_shape=(48, 40), pad_shape=(48, 40)))
    data = learner.data_preprocessor(copy.deepcopy(batch), True)
    inputs, samples = data['inputs'], data['data_samples']
    assert inputs.shape[-2:] == (64, 64)
    aux = learner.aux_nets[0]
    start, end = learner.module_ranges[0]
    with torch.no_grad():
        h = learner._seq.forward_blocks(
            learner._seq.forward_stem(inputs, {}), start, end, {})
        got = aux.loss(h, inputs, samples)['loss_recon']
        y = aux.transform(h)
        valid = padding_mask(samples, inputs)
        assert valid is not None and valid[1].sum() == 48 * 40
        masked = aux.recon_weight * aux.recon.loss(y, aux.image01(inputs),
                                                   valid)
        unmasked = aux.recon_weight * aux.recon.loss(y, aux.image01(inputs))
    torch.testing.assert_close(got, masked)
    assert not torch.allclose(got, unmasked)
