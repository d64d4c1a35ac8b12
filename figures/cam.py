"""3D LayerCAM (Jiang et al., IEEE TIP 2021) of the retrain network: where in the cube a cell's features
raise the class score.

For a cell output A (1, C, d, h, w) and the gradient G = d score / d A of the class logit, the cell's map is
ReLU(sum_c ReLU(G_c) * A_c) (d, h, w): each voxel's activations weighted by their own positive gradient,
unlike Grad-CAM's one weight per channel. The map is upsampled (trilinear) to the input cube and scaled to
[0, 1]. Several cells are fused by averaging their scaled maps (our choice), then scaling again to [0, 1].
"""
import torch
import torch.nn.functional as F


def layer_cam_maps(activation, gradient):
    """LayerCAM of one layer at its own resolution: (N, C, d, h, w) x2 -> (N, d, h, w), >= 0."""
    return F.relu((F.relu(gradient) * activation).sum(1))


def scale01(maps):
    """Each map of (N, ...) scaled to [0, 1] by its own min and max (a constant map becomes zero)."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    shape = (-1,) + (1,) * (maps.dim() - 1)
    return (maps - lo.view(shape)) / span.view(shape)


def upsample(maps, size):
    """(N, d, h, w) -> (N, size, size, size), trilinear."""
    return F.interpolate(maps[:, None].float(), size=(size,) * 3, mode='trilinear', align_corners=False)[:, 0]


def default_cells(model):
    """The last cell (as the published code shows it)."""
    return (len(model.cells) - 1,)


def layer_cam(model, x, cells=None, target=None):
    """LayerCAM of NetworkLUNA `model` for cubes x (N, 1, S, S, S).

    cells: indices into model.cells (default: the last cell; negative indices count from the end); their
    maps are fused by averaging. target: class index, or None for each cube's predicted class.
    Returns (cam (N, S, S, S) in [0, 1], probabilities (N, num_classes), target classes (N,)). The model
    runs in eval mode (BatchNorm running statistics, no drop path); its mode is restored afterwards.
    """
    cells = default_cells(model) if cells is None else tuple(cells)
    n = len(model.cells)
    for c in cells:
        if not -n <= c < n:
            raise IndexError(f'cell {c} does not exist (the network has {n} cells)')
    cells = sorted({c % n for c in cells})
    saved = {}

    def keep(index):
        def hook(_module, _inputs, output):
            output.retain_grad()
            saved[index] = output
        return hook
    was_training = model.training
    model.eval()
    handles = [model.cells[c].register_forward_hook(keep(c)) for c in cells]
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # so that every cell output is part of the graph
            logits = model(x).float()
            classes = logits.argmax(1) if target is None else torch.full_like(logits[:, 0], target, dtype=torch.long)
            logits.gather(1, classes[:, None]).sum().backward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    size = x.shape[-1]
    maps = [scale01(upsample(layer_cam_maps(saved[c].detach().float(), saved[c].grad.float()), size))
            for c in cells]
    cam = scale01(torch.stack(maps).mean(0))
    return cam.detach(), F.softmax(logits.detach(), 1), classes
