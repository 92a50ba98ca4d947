"""Pure-PyTorch stand-in for mmcv's compiled ``_ext`` (measurement machines
without a compiled mmcv). Implements the ops a RetinaNet / Faster R-CNN /
segmentor training step and test need; every other op raises when called.

sigmoid_focal_loss_* follow mmcv's CUDA kernel (no autograd graph, rows in
chunks so temporaries stay small, as the fused kernel keeps none).
"""
import torch

_CHUNK = 1 << 15


def _focal_terms(x, t, gamma):
    cls = torch.arange(x.size(1), device=x.device)
    pos = t[:, None] == cls[None]
    p = torch.sigmoid(x)
    lp = torch.nn.functional.logsigmoid(x)
    l1p = torch.nn.functional.logsigmoid(-x)
    return pos, p, lp, l1p


def sigmoid_focal_loss_forward(input, target, weight, output, gamma=2.0,
                               alpha=0.25):
    assert weight.numel() == 0, 'class weights not supported by the stub'
    with torch.no_grad():
        for s in range(0, input.size(0), _CHUNK):
            x = input[s:s + _CHUNK].float()
            pos, p, lp, l1p = _focal_terms(x, target[s:s + _CHUNK], gamma)
            loss = torch.where(pos, -alpha * (1 - p).pow(gamma) * lp,
                               -(1 - alpha) * p.pow(gamma) * l1p)
            output[s:s + _CHUNK] = loss.to(output.dtype)


def sigmoid_focal_loss_backward(input, target, weight, grad_input,
                                gamma=2.0, alpha=0.25):
    assert weight.numel() == 0, 'class weights not supported by the stub'
    with torch.no_grad():
        for s in range(0, input.size(0), _CHUNK):
            x = input[s:s + _CHUNK].float()
            pos, p, lp, l1p = _focal_terms(x, target[s:s + _CHUNK], gamma)
            g = torch.where(
                pos, alpha * (1 - p).pow(gamma) * (gamma * p * lp - (1 - p)),
                (1 - alpha) * p.pow(gamma) * (p - gamma * (1 - p) * l1p))
            grad_input[s:s + _CHUNK] = g.to(grad_input.dtype)


def nms(bboxes, scores, iou_threshold=0.5, offset=0):
    import torchvision
    if offset:
        bboxes = bboxes.clone()
        bboxes[:, 2:] += offset
    return torchvision.ops.nms(bboxes.float(), scores.float(), iou_threshold)


def roi_align_forward(input, rois, output, argmax_y, argmax_x,
                      aligned_height, aligned_width, spatial_scale,
                      sampling_ratio, pool_mode, aligned):
    import torchvision  # noqa: F401  (registers torch.ops.torchvision)
    assert pool_mode == 1, 'only avg RoIAlign in the stub'
    output.copy_(torch.ops.torchvision.roi_align(
        input, rois, spatial_scale, aligned_height, aligned_width,
        sampling_ratio, aligned))


def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input,
                       aligned_height, aligned_width, spatial_scale,
                       sampling_ratio, pool_mode, aligned):
    import torchvision  # noqa: F401
    n, c, h, w = grad_input.shape
    grad_input.copy_(torch.ops.torchvision._roi_align_backward(
        grad_output.contiguous(), rois, spatial_scale, aligned_height,
        aligned_width, n, c, h, w, sampling_ratio, aligned))


def __getattr__(name):
    if name.startswith('__'):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(f'mmcv op {name} is not in the stub _ext')
    missing.__name__ = name
    return missing
