"""VQ-VAE: the whole model in one file.

"Neural Discrete Representation Learning", A. van den Oord, O. Vinyals, K. Kavukcuoglu,
NeurIPS 2017, arXiv:1711.00937. Prior: "Conditional Image Generation with PixelCNN Decoders",
A. van den Oord et al., NeurIPS 2016, arXiv:1606.05328.

An encoder maps x to continuous latents z_e(x); each latent vector is replaced by its nearest
entry of a learnt codebook e (Eq. 1), the decoder reconstructs x from z_q(x) = e_k (Eq. 2), and
the loss (Eq. 3) trains decoder, encoder and codebook:

    L = log p(x|z_q(x)) + ||sg[z_e(x)] - e||^2 + beta * ||z_e(x) - sg[e]||^2

Reading order, smallest part first: nearest_code (Eq. 1), VectorQuantizer (Eq. 2, 3 and the EMA
codebook of Appendix A.1), Encoder/Decoder, VQVAE, GatedPixelCNN (the prior over codes),
bits_per_dim. Everything runs in pure PyTorch; when the optional compiled extension `vqvae_ext`
(built from csrc/ by setup.py) is importable, the nearest-neighbour search and the EMA statistics
use it instead and give the same results. This file imports nothing else of the project.

Layout conventions: tensors are channel-first, (B, C, *spatial) with 1, 2 or 3 spatial dims
(audio, images, video); the codebook is (K, D) as in nn.Embedding; K = num_embeddings,
D = embedding_dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:  # optional accelerator, see csrc/ and setup.py
    import vqvae_ext
except ImportError:
    vqvae_ext = None


def _check(cond: bool, name: str, expected: str, x: torch.Tensor) -> None:
    if not cond:
        raise ValueError(f"{name}: expected {expected}; got shape {tuple(x.shape)}, dtype {x.dtype}")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# --------------------------------------------------------------------------------------------
# Eq. 1: the posterior is a one-hot on the nearest codebook entry
#     q(z = k | x) = 1 if k = argmin_j ||z_e(x) - e_j||_2, else 0
# --------------------------------------------------------------------------------------------
def nearest_code(z: torch.Tensor, codebook: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Index of the nearest codebook entry of each row of z (Eq. 1), by squared L2 distance.

    Args:
        z: (N, D) floating latents. codebook: (K, D), same dtype and device.
        backend: "auto" (the compiled extension when it is built for z's device, else PyTorch),
            "torch" or "extension".
    Returns:
        (N,) int64 indices. Ties go to the lowest index, as torch.argmin. Distances are computed as
        ||e_k||^2 - 2 <z, e_k> (||z||^2 is the same for every k), in z's precision.
    Raises:
        ValueError on wrong ranks, a D mismatch, integer dtypes or non-finite values;
        RuntimeError if backend="extension" and the extension is not built.
    """
    _check(z.dim() == 2 and z.is_floating_point(), "z", "a floating (N, D) tensor", z)
    _check(codebook.dim() == 2 and codebook.shape[1] == z.shape[1] and codebook.shape[0] > 0
           and codebook.dtype == z.dtype, "codebook", f"a (K, {z.shape[1]}) {z.dtype} tensor, K > 0", codebook)
    if not (torch.isfinite(z).all() and torch.isfinite(codebook).all()):
        raise ValueError("nearest_code: z or codebook contains NaN or Inf")
    use_ext = vqvae_ext is not None and (z.device.type == "cpu" or (z.is_cuda and vqvae_ext.has_cuda()))
    if backend == "extension" and not use_ext:
        raise RuntimeError("nearest_code: the vqvae_ext extension is not built for this device "
                           "(pip install --no-build-isolation -e .)")
    if backend == "torch" or (backend == "auto" and not use_ext):
        distances = torch.addmm((codebook * codebook).sum(1), z, codebook.t(), alpha=-2)  # (N, K)
        return distances.argmin(1)
    return vqvae_ext.nearest_code(z.detach().contiguous(), codebook.detach().contiguous())


def _code_statistics(z: torch.Tensor, indices: torch.Tensor, num_embeddings: int):
    """Per-code counts (K,) and sums of z (K, D), without a one-hot (N, K) matrix."""
    if vqvae_ext is not None and (z.device.type == "cpu" or (z.is_cuda and vqvae_ext.has_cuda())):
        return vqvae_ext.ema_stats(z.contiguous(), indices.contiguous(), num_embeddings)
    counts = torch.bincount(indices, minlength=num_embeddings).to(z.dtype)
    sums = z.new_zeros(num_embeddings, z.shape[1]).index_add_(0, indices, z)
    return counts, sums


class VQOutput(NamedTuple):
    z_q: torch.Tensor              # (B, D, *S) quantized latents, straight-through gradient to z_e
    indices: torch.Tensor          # (B, *S) int64 code indices
    codebook_loss: torch.Tensor    # scalar, ||sg[z_e] - e||^2 (zero with the EMA codebook)
    commitment_loss: torch.Tensor  # scalar, beta * ||z_e - sg[e]||^2
    perplexity: torch.Tensor       # scalar, exp(entropy of code usage in this batch)
    counts: torch.Tensor           # (K,) how often each code was chosen in this batch


class VectorQuantizer(nn.Module):
    """Vector quantization layer with straight-through gradient (Sec. 3.1, Eq. 1-3, App. A.1).

    Example: z_e of shape (16, 64, 8, 8) with D = 64 is flattened to (1024, 64) latents, each
    replaced by the nearest of K codebook rows; z_q has shape (16, 64, 8, 8), indices (16, 8, 8).

    Args:
        num_embeddings: K, the codebook size.
        embedding_dim: D, the dimension of each codebook vector and of z_e's channel axis.
        commitment_cost: beta of Eq. 3, on the commitment term (paper: 0.25).
        decay: if set (paper: 0.99), the codebook is the exponential moving average of Appendix
            A.1 (a buffer, not a parameter) and the codebook loss term is dropped.
        epsilon: Laplace smoothing of the EMA cluster sizes.
        kmeans_init: initialise the codebook by k-means on the first training batch (not in the
            paper; off by default).
        dead_code_threshold: if set, codes whose moving-average usage (expected count per batch)
            falls below it are restarted from random encoder outputs (not in the paper).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25,
                 decay: float | None = None, epsilon: float = 1e-5, kmeans_init: bool = False,
                 dead_code_threshold: float | None = None):
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"num_embeddings and embedding_dim must be >= 1; got {num_embeddings}, {embedding_dim}")
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1) or None; got {decay}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.commitment_cost, self.decay, self.epsilon = commitment_cost, decay, epsilon
        self.kmeans_init, self.dead_code_threshold = kmeans_init, dead_code_threshold
        if decay is None:
            codebook = torch.empty(num_embeddings, embedding_dim).uniform_(-1 / num_embeddings, 1 / num_embeddings)
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", torch.randn(num_embeddings, embedding_dim))
            # The averages start as if each code had been chosen once with its own value, so that
            # m / N = e at step 0 and an unused code stays put instead of being divided by epsilon.
            self.register_buffer("ema_embed_sum", self.codebook.clone())
        # Moving average of code usage N_i (Eq. 6); also serves dead-code detection.
        self.register_buffer("ema_cluster_size", torch.ones(num_embeddings))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    def forward(self, z_e: torch.Tensor) -> VQOutput:
        """Quantize z_e of shape (B, D, *spatial); see VQOutput for the returned fields.

        Runs in float32 whatever the autocast state or input dtype (z_q is returned in z_e's dtype).
        Raises ValueError for a wrong channel count or rank, integer dtype, empty batch, NaN/Inf.
        """
        D, K = self.embedding_dim, self.num_embeddings
        _check(z_e.dim() >= 3 and z_e.shape[1] == D and z_e.is_floating_point() and z_e.shape[0] > 0
               and z_e.numel() > 0, "z_e", f"a floating (B, {D}, *spatial) tensor with B > 0", z_e)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z = z_e.float().movedim(1, -1)                             # (B, *S, D)
            flat = z.reshape(-1, D)                                    # (N, D), N = B * prod(S)
            if self.training and not self.initialized:
                self._kmeans_init(flat.detach())
            codebook = self.codebook.float()
            indices = nearest_code(flat.detach(), codebook.detach())   # Eq. 1, (N,)
            e = F.embedding(indices, codebook)                         # (N, D), e_k

            # Eq. 3, each term averaged over latents and their D components (as the authors'
            # Sonnet code), so that its scale matches a per-pixel mean reconstruction error.
            # The codebook term moves e towards sg[z_e]; the commitment term (beta) moves z_e
            # towards sg[e]. beta belongs to the commitment term, not to the codebook term.
            commitment_loss = self.commitment_cost * F.mse_loss(flat, e.detach())
            if self.decay is None:
                codebook_loss = F.mse_loss(e, flat.detach())
            else:
                codebook_loss = flat.new_zeros(())  # the EMA of App. A.1 replaces this term

            # Eq. 2 with the straight-through estimator: the forward value is e_k, the backward
            # pass copies the gradient at z_q unchanged to z_e.
            z_q = flat + (e - flat).detach()

            counts, sums = _code_statistics(flat.detach(), indices, K)
            probs = counts / counts.sum()
            perplexity = torch.exp(torch.special.entr(probs).sum())
            if self.training:
                self._update_codebook(counts, sums, flat.detach())
        z_q = z_q.reshape(z.shape).movedim(-1, 1).to(z_e.dtype)        # (B, D, *S)
        return VQOutput(z_q, indices.reshape(z.shape[:-1]), codebook_loss, commitment_loss, perplexity, counts)

    @torch.no_grad()
    def _update_codebook(self, counts: torch.Tensor, sums: torch.Tensor, flat: torch.Tensor) -> None:
        """Appendix A.1 (Eq. 6-8) and the dead-code restart; identical on every process."""
        if _distributed():  # the statistics of the whole global batch, so codebooks stay equal
            counts, sums = counts.clone(), sums.clone()
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        gamma = 0.99 if self.decay is None else self.decay
        self.ema_cluster_size.mul_(gamma).add_(counts, alpha=1 - gamma)     # Eq. 6: N_i
        if self.decay is not None:
            self.ema_embed_sum.mul_(gamma).add_(sums, alpha=1 - gamma)      # Eq. 7: m_i
            n = self.ema_cluster_size.sum()
            # Laplace smoothing keeps N_i > 0 for codes that have not been chosen lately.
            cluster_size = (self.ema_cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
            self.codebook.copy_(self.ema_embed_sum / cluster_size[:, None])  # Eq. 8: e_i = m_i / N_i
        if self.dead_code_threshold is not None:
            dead = self.ema_cluster_size < self.dead_code_threshold
            if dead.any():  # the same decision on every process: the counts were all-reduced
                replacement = flat[torch.randint(len(flat), (int(dead.sum()),), device=flat.device)]
                self._broadcast_assign(dead, replacement)

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor, iterations: int = 10) -> None:
        """Codebook from k-means on the first batch (process 0's), broadcast to all processes."""
        K = self.num_embeddings
        # k-means++ seeding: each next centroid is a latent drawn with probability proportional to
        # its squared distance to the nearest centroid so far, so that separate clusters get one each
        # (uniform seeding often puts two in one cluster, a local minimum Lloyd's steps never leave).
        centroids = flat[torch.randint(len(flat), (1,), device=flat.device)]
        d2 = ((flat - centroids) ** 2).sum(1)                                      # (N,)
        for _ in range(1, K):
            weights = d2 if d2.sum() > 0 else torch.ones_like(d2)  # fewer distinct latents than K
            centroids = torch.cat([centroids, flat[torch.multinomial(weights, 1)]])
            d2 = torch.minimum(d2, ((flat - centroids[-1]) ** 2).sum(1))
        for _ in range(iterations):
            counts, sums = _code_statistics(flat, nearest_code(flat, centroids), K)
            used = counts > 0  # an empty cluster keeps its centroid
            centroids[used] = sums[used] / counts[used, None]
        self._broadcast_assign(torch.ones(K, dtype=torch.bool, device=flat.device), centroids)
        self.initialized.fill_(True)

    def _broadcast_assign(self, mask: torch.Tensor, values: torch.Tensor) -> None:
        """codebook[mask] = values (process 0's values), resetting the EMA state of those codes."""
        codebook = self.codebook.detach().clone()
        codebook[mask] = values.to(codebook.dtype)
        if _distributed():
            dist.broadcast(codebook, src=0)
        self.codebook.data.copy_(codebook)
        self.ema_cluster_size[mask] = 1.0
        if self.decay is not None:
            self.ema_embed_sum[mask] = self.codebook[mask]

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for integer indices of shape (B, *S): z_q of shape (B, D, *S).

        Raises ValueError for non-integer indices or values outside [0, K).
        """
        _check(not indices.is_floating_point() and not indices.is_complex() and indices.dim() >= 2,
               "indices", "an integer (B, *spatial) tensor", indices)
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_embeddings):
            raise ValueError(f"indices: values must lie in [0, {self.num_embeddings}); got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return F.embedding(indices.long(), self.codebook).movedim(-1, 1)


# --------------------------------------------------------------------------------------------
# Encoder and decoder (Sec. 4.1): strided 4x4 convolutions and residual blocks
# (ReLU, 3x3 conv, ReLU, 1x1 conv), for 1-D (audio), 2-D (images) or 3-D (video) inputs.
# --------------------------------------------------------------------------------------------
def _conv(dims: int, transposed: bool = False):
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3; got {dims}")
    return [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][dims - 1] if transposed \
        else [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1]


class ResidualStack(nn.Module):
    """num_layers residual blocks x + conv1x1(relu(conv3x3(relu(x)))), then a ReLU. Keeps shape."""

    def __init__(self, channels: int, res_channels: int, num_layers: int, dims: int = 2):
        super().__init__()
        conv = _conv(dims)
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.ReLU(), conv(channels, res_channels, 3, padding=1),
            nn.ReLU(), conv(res_channels, channels, 1)) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return F.relu(x)


class Encoder(nn.Module):
    """x (B, C, *S) -> features (B, hidden, *S / 2**num_downsamples).

    num_downsamples stride-2 convolutions with window 4 (paper: 2 for 32x32 images -> 8x8,
    6 for audio -> 64x fewer steps), a 3x3 convolution, then the residual stack.
    """

    def __init__(self, in_channels: int, hidden_channels: int = 256, res_channels: int = 256,
                 num_res_layers: int = 2, num_downsamples: int = 2, dims: int = 2):
        super().__init__()
        conv, layers = _conv(dims), []
        for i in range(num_downsamples):
            layers += [conv(in_channels if i == 0 else hidden_channels, hidden_channels, 4, stride=2, padding=1), nn.ReLU()]
        layers += [conv(hidden_channels if num_downsamples else in_channels, hidden_channels, 3, padding=1),
                   ResidualStack(hidden_channels, res_channels, num_res_layers, dims)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """z_q (B, D, *S) -> (B, out_channels, *S * 2**num_upsamples): the encoder mirrored,
    with transposed stride-2 convolutions of window 4."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 256,
                 res_channels: int = 256, num_res_layers: int = 2, num_upsamples: int = 2, dims: int = 2):
        super().__init__()
        conv, conv_t = _conv(dims), _conv(dims, transposed=True)
        layers = [conv(in_channels, hidden_channels, 3, padding=1),
                  ResidualStack(hidden_channels, res_channels, num_res_layers, dims)]
        for i in range(num_upsamples):
            last = i == num_upsamples - 1
            layers += [conv_t(hidden_channels, out_channels if last else hidden_channels, 4, stride=2, padding=1)]
            layers += [] if last else [nn.ReLU()]
        if not num_upsamples:
            layers += [conv(hidden_channels, out_channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.net(z_q)


# --------------------------------------------------------------------------------------------
# The VQ-VAE: encoder, 1x1 projection to D, quantizer, decoder, and the loss of Eq. 3.
# --------------------------------------------------------------------------------------------
@dataclass
class VQVAEConfig:
    in_channels: int = 3
    hidden_channels: int = 256           # paper, Sec. 4.1: "all having 256 hidden units"
    res_channels: int = 256              # the Sonnet example uses 32
    num_res_layers: int = 2
    num_downsamples: int = 2             # 32x32 -> 8x8
    dims: int = 2                        # spatial rank: 1 audio, 2 images, 3 video
    num_embeddings: int = 512            # K
    embedding_dim: int = 64              # D
    num_groups: int = 1                  # codes per latent position (paper's bits/dim model: 8x8x10)
    commitment_cost: float = 0.25        # beta
    decay: float | None = None           # 0.99 for the EMA codebook of App. A.1
    epsilon: float = 1e-5
    kmeans_init: bool = False
    dead_code_threshold: float | None = None
    likelihood: str = "gaussian"         # "gaussian" (MSE) or "categorical" (256-way per channel)
    data_variance: float = 1.0           # Gaussian decoder: loss = MSE / data_variance (Sonnet)


class VQVAEOutput(NamedTuple):
    x_recon: torch.Tensor               # (B, C, *S) reconstruction in the input's [-0.5, 0.5] scale
    logits: torch.Tensor | None         # (B, 256, C, *S) for the categorical decoder, else None
    z_e: torch.Tensor                   # (B, G*D, *S') encoder output
    z_q: torch.Tensor                   # (B, G*D, *S') quantized
    indices: torch.Tensor               # (B, *S') if G == 1 else (B, G, *S')
    recon_loss: torch.Tensor            # -log p(x|z_q) per dim: MSE / data_variance, or nats
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    loss: torch.Tensor                  # Eq. 3: recon + codebook + commitment
    perplexity: torch.Tensor
    counts: torch.Tensor                # (K,)


class VQVAE(nn.Module):
    """The VQ-VAE of Sec. 3 with the architecture of Sec. 4.1.

    Input x: float (B, C, *S) scaled to [-0.5, 0.5] (x_uint8 / 255 - 0.5), each spatial size a
    multiple of 2**num_downsamples. With num_groups = G > 1 each latent position holds G codes
    from one shared codebook (z_e has G*D channels).
    """

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        if config.likelihood not in ("gaussian", "categorical"):
            raise ValueError(f"likelihood must be 'gaussian' or 'categorical'; got {config.likelihood!r}")
        self.config = c = config
        categorical = c.likelihood == "categorical"
        self.encoder = Encoder(c.in_channels, c.hidden_channels, c.res_channels, c.num_res_layers, c.num_downsamples, c.dims)
        self.pre_quantize = _conv(c.dims)(c.hidden_channels, c.num_groups * c.embedding_dim, 1)
        self.quantizer = VectorQuantizer(c.num_embeddings, c.embedding_dim, c.commitment_cost, c.decay,
                                         c.epsilon, c.kmeans_init, c.dead_code_threshold)
        self.decoder = Decoder(c.num_groups * c.embedding_dim, c.hidden_channels if categorical else c.in_channels,
                               c.hidden_channels, c.res_channels, c.num_res_layers, c.num_downsamples, c.dims)
        # 256 logits per channel from a 1x1 convolution: 4x cheaper than a last 4x4 transposed one.
        self.logits = nn.Sequential(nn.ReLU(), _conv(c.dims)(c.hidden_channels, 256 * c.in_channels, 1)) \
            if categorical else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, *S) -> z_e (B, G*D, *S / 2**num_downsamples). Raises ValueError on bad x."""
        c = self.config
        _check(x.dim() == c.dims + 2 and x.shape[1] == c.in_channels and x.is_floating_point()
               and x.shape[0] > 0 and all(s > 0 and s % 2 ** c.num_downsamples == 0 for s in x.shape[2:]),
               "x", f"a floating (B, {c.in_channels}, *S) tensor with {c.dims} spatial dims, B > 0 and "
               f"each spatial size a multiple of {2 ** c.num_downsamples}", x)
        return self.pre_quantize(self.encoder(x))

    def quantize(self, z_e: torch.Tensor) -> VQOutput:
        """Quantize z_e (B, G*D, *S), each of the G groups with the shared codebook."""
        G, D = self.config.num_groups, self.config.embedding_dim
        if G == 1:
            return self.quantizer(z_e)
        out = self.quantizer(z_e.unflatten(1, (G, D)).transpose(1, 2))  # (B, D, G, *S)
        return out._replace(z_q=out.z_q.transpose(1, 2).flatten(1, 2))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (B, *S') if G == 1 else (B, G, *S') -> decoder output (see decode_latents)."""
        c = self.config
        expected = c.dims + (1 if c.num_groups == 1 else 2)
        _check(indices.dim() == expected and (c.num_groups == 1 or indices.shape[1] == c.num_groups),
               "indices", f"a tensor with {expected} dims" + ("" if c.num_groups == 1 else f", shape[1] == {c.num_groups}"), indices)
        z_q = self.quantizer.lookup(indices)
        # (B, D, G, *S') -> (B, G*D, *S'), group-major channels as in quantize
        return self.decode_latents(z_q if c.num_groups == 1 else z_q.transpose(1, 2).flatten(1, 2))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, G*D, *S') -> Gaussian mean (B, C, *S) or categorical logits (B, 256, C, *S)."""
        out = self.decoder(z_q)
        if self.logits is not None:
            out = self.logits(out).unflatten(1, (self.config.in_channels, 256)).transpose(1, 2)
        return out

    def reconstruction(self, decoded: torch.Tensor) -> torch.Tensor:
        """Decoder output -> image in [-0.5, 0.5]: the mean (the categorical's expected value)."""
        if self.config.likelihood == "gaussian":
            return decoded
        levels = torch.arange(256, device=decoded.device, dtype=torch.float32) / 255 - 0.5
        return torch.einsum("bk...,k->b...", decoded.float().softmax(1), levels)

    def log_likelihood(self, x: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        """log p(x|z_q) in nats per example, (B,): the categorical decoder only (discrete x)."""
        if self.config.likelihood != "categorical":
            raise ValueError("log_likelihood needs likelihood='categorical' (a discrete p(x|z))")
        target = ((x.float() + 0.5) * 255).round().clamp(0, 255).long()    # (B, C, *S) in 0..255
        return -F.cross_entropy(decoded.float(), target, reduction="none").flatten(1).sum(1)

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        z_e = self.encode(x)
        vq = self.quantize(z_e)
        decoded = self.decode_latents(vq.z_q)
        if self.config.likelihood == "gaussian":
            recon_loss = F.mse_loss(decoded.float(), x.float()) / self.config.data_variance
        else:
            recon_loss = -self.log_likelihood(x, decoded).mean() / x[0].numel()
        loss = recon_loss + vq.codebook_loss + vq.commitment_loss   # Eq. 3 (recon is -log p(x|z_q))
        logits = decoded if self.config.likelihood == "categorical" else None
        return VQVAEOutput(self.reconstruction(decoded), logits, z_e, vq.z_q, vq.indices, recon_loss,
                           vq.codebook_loss, vq.commitment_loss, loss, vq.perplexity, vq.counts)


# --------------------------------------------------------------------------------------------
# The prior (Sec. 3.2, 4.2): a gated PixelCNN over the map of codes, trained after the VQ-VAE.
# Gated activation y = tanh(W_f * x + V_f h) . sigmoid(W_g * x + V_g h), where h is a class (or a
# conditioning map); a vertical stack sees the rows above, a horizontal stack the pixels to the
# left, which together cover everything before a pixel in raster order (no blind spot).
# --------------------------------------------------------------------------------------------
def _gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer of both stacks; `first` masks the current pixel (mask A, no residual)."""

    def __init__(self, channels: int, kernel_size: int, first: bool, num_classes: int | None, cond_channels: int):
        super().__init__()
        k, self.first = kernel_size, first
        self.vertical = nn.Conv2d(channels, 2 * channels, (k // 2 + 1, k))   # rows i-k//2 .. i
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, k // 2 + (0 if first else 1)))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.class_bias = nn.Embedding(num_classes, 2 * channels) if num_classes else None
        self.cond_bias = nn.Conv2d(cond_channels, 2 * channels, 1) if cond_channels else None

    def forward(self, v, h, label=None, cond=None):
        H, W, k = v.shape[2], v.shape[3], self.vertical.kernel_size[1]
        v_pre = self.vertical(F.pad(v, (k // 2, k // 2, k // 2, 0)))          # (B, 2c, H, W)
        h_pre = self.horizontal(F.pad(h, (k // 2, 0)))[..., :W]               # first: j-k//2 .. j-1
        # Row i of the horizontal stack may only see vertical features of rows < i: shift down.
        h_pre = h_pre + self.vertical_to_horizontal(F.pad(v_pre, (0, 0, 1, 0))[:, :, :H])
        if self.class_bias is not None:
            bias = self.class_bias(label)[:, :, None, None]
            v_pre, h_pre = v_pre + bias, h_pre + bias
        if self.cond_bias is not None:
            bias = self.cond_bias(cond)
            v_pre, h_pre = v_pre + bias, h_pre + bias
        h_out = self.horizontal_out(_gate(h_pre))
        return _gate(v_pre), h_out if self.first else h + h_out


class GatedPixelCNN(nn.Module):
    """Autoregressive prior p(z) = prod_i p(z_i | z_<i, class) over maps of codes (raster order).

    With num_groups = G > 1 each position holds G codes (VQVAE's groups), ordered within the
    position: the stacks see all codes of earlier positions, and a head adds the embeddings of the
    same position's earlier groups.

    Args:
        num_embeddings: K. num_groups: G. channels, num_layers, kernel_size (odd, >= 3): size.
        num_classes: if set, a learnt class-conditional bias in every layer.
        cond_channels: if > 0, a conditioning map (B, cond_channels, H, W) biases every layer.
    Input codes: (B, H, W) if G == 1 else (B, G, H, W), int64 in [0, K).
    """

    def __init__(self, num_embeddings: int = 512, num_groups: int = 1, channels: int = 128,
                 num_layers: int = 12, kernel_size: int = 5, num_classes: int | None = None,
                 cond_channels: int = 0):
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3; got {kernel_size}")
        self.num_embeddings, self.num_groups, self.num_classes = num_embeddings, num_groups, num_classes
        self.embedding = nn.Embedding(num_embeddings * num_groups, channels)
        self.layers = nn.ModuleList(GatedLayer(channels, kernel_size, i == 0, num_classes, cond_channels)
                                    for i in range(num_layers))
        self.group_embedding = nn.Embedding(num_embeddings * num_groups, channels)  # same position
        self.group_query = nn.Parameter(torch.zeros(num_groups, channels))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv3d(channels, channels, 1), nn.ReLU(),
                                  nn.Conv3d(channels, num_embeddings, 1))

    def _grouped(self, codes: torch.Tensor) -> torch.Tensor:
        received, codes = codes, codes[:, None] if self.num_groups == 1 else codes  # report the shape passed
        _check(codes.dim() == 4 and codes.shape[1] == self.num_groups and not codes.is_floating_point()
               and codes.shape[0] > 0, "codes", "an integer (B, H, W) tensor" if self.num_groups == 1
               else f"an integer (B, {self.num_groups}, H, W) tensor", received)
        if codes.min() < 0 or codes.max() >= self.num_embeddings:
            raise ValueError(f"codes: values must lie in [0, {self.num_embeddings})")
        offsets = torch.arange(self.num_groups, device=codes.device)[None, :, None, None]
        return codes.long() + offsets * self.num_embeddings  # a separate embedding per group

    def forward(self, codes: torch.Tensor, label: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, K, H, W) if G == 1 else (B, K, G, H, W), for p(z_i | z_<i)."""
        if (self.num_classes is None) != (label is None):
            raise ValueError("label: pass class labels (B,) exactly when the model has num_classes")
        grouped = self._grouped(codes)                                      # (B, G, H, W)
        x = self.embedding(grouped).sum(1).permute(0, 3, 1, 2)              # (B, c, H, W)
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h, label, cond)
        # Within a position, group g sees the groups < g (exclusive cumulative sum).
        same = self.group_embedding(grouped).permute(0, 4, 1, 2, 3)          # (B, c, G, H, W)
        earlier = same.cumsum(2) - same
        logits = self.head(h[:, :, None] + earlier + self.group_query.t()[None, :, :, None, None])
        return logits[:, :, 0] if self.num_groups == 1 else logits         # (B, K, [G,] H, W)

    def log_prob(self, codes: torch.Tensor, label: torch.Tensor | None = None,
                 cond: torch.Tensor | None = None) -> torch.Tensor:
        """log p(z) in nats, (B,)."""
        logits = self(codes, label, cond)
        return -F.cross_entropy(logits, codes.long(), reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, shape: tuple[int, int], label: torch.Tensor | None = None, batch_size: int | None = None,
               cond: torch.Tensor | None = None, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> torch.Tensor:
        """Draw codes (B, H, W) (or (B, G, H, W)) position by position, in raster order.

        B is len(label) when the model is class-conditional, else batch_size. Pass a seeded
        torch.Generator for repeatable samples.
        """
        B = len(label) if label is not None else batch_size
        device = self.embedding.weight.device
        codes = torch.zeros(B, self.num_groups, *shape, dtype=torch.long, device=device)
        for i in range(shape[0]):
            for j in range(shape[1]):
                for g in range(self.num_groups):
                    logits = self(codes if self.num_groups > 1 else codes[:, 0], label, cond)
                    logits = logits if self.num_groups > 1 else logits[:, :, None]
                    probs = (logits[:, :, g, i, j].float() / temperature).softmax(1)
                    codes[:, g, i, j] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        return codes if self.num_groups > 1 else codes[:, 0]


# --------------------------------------------------------------------------------------------
# Sec. 4.1: the log-likelihood bound log p(x) >= log p(x|z_q(x)) + log p(z_q(x)), in bits/dim.
# --------------------------------------------------------------------------------------------
def bits_per_dim(log_px_given_z: torch.Tensor, num_dims: int, log_pz: torch.Tensor | None = None,
                 num_latents: int | None = None, num_embeddings: int | None = None) -> torch.Tensor:
    """-(log p(x|z_q) + log p(z)) / (num_dims * ln 2), per example.

    Args:
        log_px_given_z: (B,) nats. num_dims: dimensions of one x (3072 for a 32x32x3 image).
        log_pz: (B,) nats from a prior; if None, the uniform prior of training is used,
            log p(z) = -num_latents * log K (the constant KL of Sec. 3.1).
    Returns: (B,) bits per dimension.
    """
    if log_pz is None:
        if num_latents is None or num_embeddings is None:
            raise ValueError("bits_per_dim: pass log_pz, or num_latents and num_embeddings for the uniform prior")
        log_pz = torch.full_like(log_px_given_z, -num_latents * math.log(num_embeddings))
    return -(log_px_given_z + log_pz) / (num_dims * math.log(2))
