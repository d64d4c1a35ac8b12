"""Sparsemax (Euclidean projection onto the probability simplex) and the ZO-DARTS+ temperature schedule.

sparsemax(z) = argmin_{p >= 0, sum p = 1} ||p - z||^2. Unlike softmax it gives exact zeros, so an
architecture's operation weights can drop ops entirely; dividing z by a temperature that shrinks
during the search pushes the output towards one-hot (ZO-DARTS+: tau0 = 1.5, times 0.75 every 5 epochs).
"""
import torch


def _threshold(z, dim):
    """Threshold tau(z) and support size k(z) along dim, both with size 1 along dim.

    With z sorted descending (z_(1) >= ... >= z_(K)) and cumulative sums c_j, the support is the
    largest k with 1 + k * z_(k) > c_k, and tau = (c_k - 1) / k; the output is max(z - tau, 0).
    """
    z_sorted, _ = torch.sort(z, dim=dim, descending=True)
    cumsum = z_sorted.cumsum(dim)
    # ranks 1..K laid out along dim so they broadcast against z_sorted.
    shape = [1] * z.dim()
    shape[dim] = z.shape[dim]
    ranks = torch.arange(1, z.shape[dim] + 1, device=z.device, dtype=z.dtype).view(shape)
    # The condition holds for a prefix of ranks (rank 1 always), so counting it gives k.
    in_support = 1 + ranks * z_sorted > cumsum
    k = in_support.sum(dim=dim, keepdim=True)
    tau = (cumsum.gather(dim, k - 1) - 1) / k.to(z.dtype)
    return tau, k


class SparsemaxFunction(torch.autograd.Function):
    """Closed-form forward and backward; use through sparsemax()."""

    @staticmethod
    def forward(ctx, z, dim):
        # Shifting by the max changes nothing mathematically but keeps cumsum small for large inputs.
        z = z - z.amax(dim=dim, keepdim=True)
        tau, _ = _threshold(z, dim)
        out = torch.clamp(z - tau, min=0)
        ctx.dim = dim
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # The Jacobian is diag(s) - s s^T / |S| with s the support indicator: on the support the
        # incoming gradient minus its mean over the support, zero elsewhere.
        (out,) = ctx.saved_tensors
        support = (out > 0).to(grad_out.dtype)
        size = support.sum(dim=ctx.dim, keepdim=True)
        mean = (grad_out * support).sum(dim=ctx.dim, keepdim=True) / size
        return support * (grad_out - mean), None


def sparsemax(z, dim=-1):
    """Project z onto the probability simplex along dim. Any shape, floating dtypes, any device.

    Returns a tensor shaped like z: non-negative, summing to 1 along dim, often with exact zeros.
    """
    if not torch.is_floating_point(z):
        raise TypeError(f'sparsemax needs a floating-point tensor, got {z.dtype}')
    if z.dim() == 0 or z.shape[dim] == 0:
        raise ValueError(f'sparsemax needs at least one element along dim {dim}, got shape {tuple(z.shape)}')
    return SparsemaxFunction.apply(z, dim % z.dim())


def temperature(epoch, tau0=1.5, factor=0.75, every=5):
    """ZO-DARTS+ annealing: tau0 * factor ** (epoch // every); use as sparsemax(alpha / tau)."""
    if every < 1:
        raise ValueError(f'temperature: every must be >= 1 epoch, got {every}')
    if epoch < 0:
        raise ValueError(f'temperature: epoch must be >= 0, got {epoch}')
    return tau0 * factor ** (epoch // every)
